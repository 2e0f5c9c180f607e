"""Definition 4.2: the constants of SGD, idealized full-matrix RMSProp and idealized diagonal
RMSProp on the Sec. 6 saddle problem, beside the bounds of Propositions 4.3 and 4.4.

The problem is :class:`saddlescape.problems.SaddleProblem` with noise covariance diag(1, s), s
the noise variance along the escape direction e_2, shrinking from 1 to 1e-4. A
(Lambda_1, Lambda_2, Gamma, nu, lambda_-)-preconditioner must satisfy its inequalities for all
x; here they are evaluated (:func:`saddlescape.diagnostics.preconditioner_constants`, closed
forms from the problem's exact E[g g^T]) on a grid over the box |x_1|, |x_2| <= 0.3 around the
saddle (the region an escaping run crosses: the escape experiments stop at |x_2| = 0.3), with
the quadratic model f~ taken at the saddle, and the worst value over the grid is reported:
the largest Lambda_1, Lambda_2, Gamma and the smallest nu, lambda_-. The bounds are the
propositions' with lambda_min(G) and lambda_max(G) taken over the same grid (the worst of the
per-point bounds, which is the same thing: each bound is monotone in them). The idealized
preconditioners use eps = 1e-8, as the escape experiments' RMSProp.

Prop. 4.3 covers A = I and Prop. 4.4 A = (G + eps I)^(-1/2); the diagonal
A = (diag(G) + eps I)^(-1/2) is covered by the paper's Appendix D, not available here, and is
only drawn next to Prop. 4.4's values (``claimed`` is False in the CSV). The figure's last
panel is the preconditioner's part of the second-order time (8),
Lambda_1^4 Lambda_2^4 Gamma^4 / (lambda_-^10 nu^4): SGD's nu is s, RMSProp's is about 1 (the
rescaled noise is isotropic), but RMSProp's Lambda_1 and Lambda_2 are (s + eps)^(-1/2) along
the escape direction, so both factors grow like s^(-4).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

import saddlescape as ss
from saddlescape import diagnostics as dg
from saddlescape.experiments.common import Output, Progress, pyplot

EPS = 1e-8
BOX = 0.3
METHODS = {  # name -> (the preconditioner for preconditioner_constants, its proposition)
    "SGD": (None, "Prop. 4.3"),
    "RMSProp (full, idealized)": ("adaptive", "Prop. 4.4"),
    "RMSProp (diag, idealized)": ("diagonal", "Prop. 4.4 (full-matrix; not claimed)"),
}
NAMES = ("Lambda1", "Lambda2", "Gamma", "nu", "lambda_minus")


def grid(n: int, box: float = BOX) -> np.ndarray:
    """n x n points on [-box, box]^2, and 2n points on the escape axis x = (0, +-t),
    t from 1e-4 to box: there the gradient lies along e_2, where RMSProp's A is largest, and
    Lambda_1 of the adaptive preconditioner tends to its supremum (s + eps)^(-1/2) as t -> 0."""
    u = np.linspace(-box, box, n)
    square = np.stack(np.meshgrid(u, u, indexing="ij"), axis=-1).reshape(-1, 2)
    t = np.geomspace(1e-4, box, n)
    axis = np.stack([np.zeros(2 * n), np.concatenate([t, -t])], axis=1)
    return np.concatenate([square, axis])


def worst(constants: list[dg.Constants]) -> dg.Constants:
    """The constants valid for all of them: the largest Lambda_1, Lambda_2, Gamma and the
    smallest nu, lambda_- (NaN Lambdas, unconstrained, skipped)."""
    def top(name: str) -> float:
        v = np.array([getattr(c, name) for c in constants])
        v = v[~np.isnan(v)]
        return float(v.max()) if v.size else float("nan")

    return dg.Constants(top("Lambda1"), top("Lambda2"), top("Gamma"),
                        min(c.nu for c in constants), min(c.lambda_minus for c in constants))


def measure(s: float, points: np.ndarray, sigma2: float = 1.0, eps: float = EPS,
            methods: tuple[str, ...] = tuple(METHODS)) -> dict[str, dict[str, Any]]:
    """For noise covariance sigma2 * diag(1, s) and the damping eps: per method the worst
    measured constants, the worst nu along the escape directions, the worst of the per-point
    bounds, whether every point satisfies its bound (and which constants do not), and the
    extremes of lambda_min(G), lambda_max(G) over the points."""
    p = ss.problems.SaddleProblem(noise_cov=(sigma2, sigma2 * s))
    out: dict[str, dict[str, Any]] = {}
    for name in methods:
        A, prop = METHODS[name]
        r = dg.preconditioner_constants(p, A, points, x0=np.zeros(2), eps=eps)
        bounds = [dg.prop_4_3_bounds(G) if A is None else dg.prop_4_4_bounds(G, eps)
                  for G in r.second_moments]
        # nu is tiny for SGD at small s: a few machine epsilons of ||A G A|| of slack
        checks = [dg.check_bounds(r.at(i), b, rtol=1e-7, atol=1e-12)
                  for i, b in enumerate(bounds)]
        violated = [n for n in NAMES if not all(getattr(c, n) for c in checks)]
        lam = np.linalg.eigvalsh(r.second_moments)
        out[name] = {"measured": r.worst(), "bound": worst(bounds), "holds": not violated,
                     "lambda_min_G": float(lam[:, 0].min()),
                     "lambda_max_G": float(lam[:, -1].max()),
                     "violated": " ".join(violated),
                     "nu_escape": float(np.nanmin(r.nu_escape)), "proposition": prop,
                     "claimed": A != "diagonal"}
    return out


def run(out: Path, quick: bool = False, seeds: int | None = None, progress: bool = True) -> dict[str, Any]:
    o = Output.create(out, "constants")
    noises = tuple(10.0 ** -np.arange(0, 5)) if quick else tuple(10.0 ** -np.arange(0, 4.25, 0.5))
    points = grid(7 if quick else 21)
    bar = Progress("constants", len(noises), progress)
    results = {}
    for s in noises:
        results[s] = measure(s, points)
        bar.advance()
    bar.close()

    header = ["escape_noise_variance", "method", "proposition", "claimed", *NAMES, "nu_escape",
              "second_order_factor", "first_order_term", *(f"bound_{n}" for n in NAMES),
              "bound_second_order_factor", "bounds_hold", "violated"]
    rows = []
    for s, per in results.items():
        for name, m in per.items():
            c, b = m["measured"], m["bound"]
            rows.append((s, name, m["proposition"], m["claimed"], *(getattr(c, n) for n in NAMES),
                         m["nu_escape"], dg.second_order_factor(c), dg.first_order_term(c),
                         *(getattr(b, n) for n in NAMES), dg.second_order_factor(b), m["holds"],
                     m["violated"]))
    o.write_csv(header, rows)

    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    titles = {"Lambda1": "Lambda_1 (max)", "Lambda2": "Lambda_2 (max)", "Gamma": "Gamma (max)",
              "nu": "nu (min)", "lambda_minus": "lambda_- (min)"}
    x = np.array(noises)
    for ax, key in zip(axes.flat, (*NAMES, "factor")):
        for i, name in enumerate(METHODS):
            ms = [results[s][name]["measured"] for s in noises]
            bs = [results[s][name]["bound"] for s in noises]
            if key == "factor":
                mv = [dg.second_order_factor(c) for c in ms]
                bv = [dg.second_order_factor(c) for c in bs]
            else:
                mv = [getattr(c, key) for c in ms]
                bv = [getattr(c, key) for c in bs]
            # The bounds are attained or nearly so, and the two RMSProps nearly agree: the
            # full matrix is drawn wide and pale under the diagonal, the bounds as markers.
            ax.plot(x, mv, "-", color=f"C{i}", label=f"{name} measured",
                    lw=5 if i == 1 else 1.5, alpha=0.45 if i == 1 else 1.0)
            ax.plot(x, bv, ("+", "x", "1")[i], color=f"C{i}", label=METHODS[name][1], ms=9)
        ax.set(xscale="log", yscale="log", xlabel="noise variance s along the escape direction",
               title=titles.get(key, "second-order factor of (8)"))
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"Definition 4.2 constants over the box |x| <= {BOX} around the saddle "
                 f"({len(points)} points, eps = {EPS:g}); markers: the propositions' bounds",
                 fontsize=10)
    o.save_figure(fig)

    claimed_hold = all(m["holds"] for per in results.values() for m in per.values()
                       if m["claimed"])
    for s in noises:
        per = results[s]
        key = f"s{s:g}"
        for name, short in zip(METHODS, ("sgd", "full", "diag")):
            c = per[name]["measured"]
            o.summary[f"{key}_{short}_Lambda1"] = c.Lambda1
            o.summary[f"{key}_{short}_Gamma"] = c.Gamma
            o.summary[f"{key}_{short}_nu"] = c.nu
            o.summary[f"{key}_{short}_lambda_minus"] = c.lambda_minus
            o.summary[f"{key}_{short}_second_order_factor"] = dg.second_order_factor(c)
            o.summary[f"{key}_{short}_bounds_hold"] = per[name]["holds"]
            if per[name]["violated"]:
                o.summary[f"{key}_{short}_violated"] = per[name]["violated"]
        o.summary[f"{key}_sgd_over_full_factor"] = (
            dg.second_order_factor(per["SGD"]["measured"])
            / dg.second_order_factor(per["RMSProp (full, idealized)"]["measured"]))
    return o.finish(claimed_bounds_hold=claimed_hold, points=len(points), box=BOX, eps=EPS)
