"""Benchmark the EMA second-moment updates against numpy and bare BLAS, in one run.

Full structure, rank-1 update G <- beta G + (1 - beta) g g^T at d in {256, 1024, 4096}:
  - saddlescape.EMAEstimator.update (syr on one triangle, beta folded into a scale factor);
  - numpy: ``G *= beta; G += (1 - beta) * np.outer(g, g)`` (what a user would write);
  - bare BLAS: scipy's dsyr on a Fortran-ordered lower triangle, in place: the floor any
    implementation of a rank-1 symmetric update pays (it omits the decay, which the scale
    factor makes free).
Diagonal structure at d = 10^7: saddlescape's fused update against numpy's
``v *= beta; v += (1 - beta) * g * g`` and against the machine's memory bandwidth measured in
the same run (numpy's ``np.add(a, b, out=c)``: two arrays read, one written, the same traffic
as the update: read g, read v, write v). Bandwidth counts the bytes the algorithm must move.

    python bench/python/bench_estimators.py
"""

from __future__ import annotations

import argparse
import os
import platform
from typing import Callable

import numpy as np

import saddlescape
from benchutil import compare

try:
    from scipy.linalg import blas as scipy_blas
except ImportError:
    scipy_blas = None


def full_rank1(d: int, rounds: int, target_s: float) -> dict[str, float]:
    rng = np.random.default_rng(d)
    g = rng.standard_normal(d)
    beta = 0.999
    est = saddlescape.EMAEstimator(d, structure="full", beta=beta)
    G = np.zeros((d, d))
    routes: dict[str, Callable[[], object]] = {
        "saddlescape": lambda: est.update(g),
        "numpy": lambda: (G.__imul__(beta), G.__iadd__((1 - beta) * np.outer(g, g))),
    }
    if scipy_blas is not None:
        A = np.zeros((d, d), order="F")
        routes["dsyr"] = lambda: scipy_blas.dsyr(1 - beta, g, lower=1, a=A, overwrite_a=1)
    return compare(routes, rounds, target_s)


def diag(d: int, rounds: int, target_s: float) -> tuple[dict[str, float], float]:
    rng = np.random.default_rng(0)
    g = rng.standard_normal(d)
    beta = 0.999
    est = saddlescape.EMAEstimator(d, structure="diag", beta=beta)
    v = np.zeros(d)
    a, b, c = rng.standard_normal(d), rng.standard_normal(d), np.empty(d)
    tmp = np.empty(d)

    def numpy_update() -> None:
        v.__imul__(beta)
        np.multiply(g, g, out=tmp)
        tmp.__imul__(1 - beta)
        v.__iadd__(tmp)

    t = compare({"saddlescape": lambda: est.update(g), "numpy": numpy_update,
                 "triad": lambda: np.add(a, b, out=c)}, rounds, target_s)
    bandwidth = 3 * 8 * d / t["triad"]
    return t, bandwidth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--diag", type=int, default=10**7)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--target", type=float, default=0.05)
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; numpy {np.__version__}; "
          f"scipy BLAS {'yes' if scipy_blas else 'not installed'}")
    print(f"median of {args.rounds} interleaved rounds; ratio = baseline time / saddlescape time\n")
    print("Full rank-1 update, float64\n")
    print("| d | saddlescape | numpy | vs numpy | bare dsyr | vs dsyr |")
    print("|---|---|---|---|---|---|")
    for d in args.sizes:
        t = full_rank1(d, args.rounds, args.target)
        s = t["saddlescape"]
        syr = (f"{t['dsyr'] * 1e6:.1f} us | {t['dsyr'] / s:.2f}x" if "dsyr" in t else "- | -")
        print(f"| {d} | {s * 1e6:.1f} us | {t['numpy'] * 1e6:.1f} us | {t['numpy'] / s:.1f}x | {syr} |",
              flush=True)
    t, bw = diag(args.diag, args.rounds, args.target)
    moved = 3 * 8 * args.diag
    ours = moved / t["saddlescape"]
    print(f"\nDiagonal update, float64, d = {args.diag:.0e}: bytes moved = 3 x 8 x d\n")
    print("| route | time | GB/s | share of measured bandwidth |")
    print("|---|---|---|---|")
    print(f"| bandwidth (numpy add, same traffic) | {t['triad'] * 1e3:.2f} ms | {bw / 1e9:.2f} | 100% |")
    print(f"| saddlescape | {t['saddlescape'] * 1e3:.2f} ms | {ours / 1e9:.2f} | {100 * ours / bw:.0f}% |")
    print(f"| numpy (4 passes) | {t['numpy'] * 1e3:.2f} ms | {moved / t['numpy'] / 1e9:.2f} | "
          f"{100 * moved / t['numpy'] / bw:.0f}% |")


if __name__ == "__main__":
    main()
