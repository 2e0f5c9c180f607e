"""Worst relative error of the block engine's direction between refreshes (the low-rank
quadrature) against a dense float64 reference, over spectra, eps, tol and refresh_every; the
check behind the quadrature's node rules (bench/RESULTS.md). For each case it prints the worst
error over the steps divided by tol (must stay below 1), and the number of steps.

    python bench/python/sweep_lowrank.py                  # both forms
    python bench/python/sweep_lowrank.py --form inv_sqrt
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np

import saddlescape


def reference(G: np.ndarray, g: np.ndarray, eps: float, form: str) -> np.ndarray:
    w, V = np.linalg.eigh(G)
    w = np.clip(w, 0.0, None)
    f = 1 / np.sqrt(w + eps) if form == "inv_sqrt" else 1 / (np.sqrt(w) + eps)
    return V @ (f * (V.T @ g))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--form", choices=["inv_sqrt", "adam", "both"], default="both")
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    forms = ["inv_sqrt", "adam"] if args.form == "both" else [args.form]
    rng = np.random.default_rng(0)
    n = 24
    for form in forms:
        worst = (0.0, None)
        cases = 0
        for tol, eps, decades, R, scale in itertools.product(
                [1e-3, 1e-6, 1e-8, 1e-10, 1e-13], [1e-12, 1e-8, 1e-4, 1.0, 1e3], [0, 4, 8, 12, 16], [4, 16],
                [1e-6, 1.0, 1e6]):
            # Full-rank gradients with coordinate scales over `decades` decades, in a random
            # basis: after n steps cond(G) ~ 10^(2 decades), capped by eps.
            Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
            s = scale * np.logspace(-decades / 2, 0, n)
            e = saddlescape.BlockEngine([n], beta=0.95, eps=eps, form=form, refresh_every=R,
                                        dtype=np.float64, tol=tol)
            G = np.zeros((n, n))
            errs = []
            for t in range(n + args.steps):
                g = Q @ (s * rng.standard_normal(n))
                d = e.update_direction(g)
                G = 0.95 * G + 0.05 * np.outer(g, g)
                # Full rank, and the dense references resolve f(G) g well below tol: an
                # eigenvalue rounded by u lambda_max moves f(lambda_min) by `sens` (relative),
                # so what is left is the quadrature's error.
                w = np.linalg.eigvalsh(G)
                lo, hi = max(w[0], 1e-300), w[-1]
                sens = (1.1e-16 * (hi + eps) / (lo + eps) if form == "inv_sqrt"
                        else 1.1e-16 * hi / (2 * np.sqrt(lo) * (np.sqrt(lo) + eps)))
                if t >= n and sens <= 0.01 * tol:
                    ref = reference(G, g, eps, form)
                    errs.append(np.linalg.norm(d - ref) / np.linalg.norm(ref))
            if not errs:
                continue
            cases += 1
            ratio = max(errs) / tol
            if ratio > worst[0]:
                worst = (ratio, dict(tol=tol, eps=eps, decades=decades, R=R, scale=scale))
        print(f"{form}: worst error / tol = {worst[0]:.3g} at {worst[1]} ({cases} cases)")


if __name__ == "__main__":
    main()
