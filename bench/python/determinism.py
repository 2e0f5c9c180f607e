"""Run-to-run reproducibility of the host block engine, and what its fix costs.

1. Trains the 64-256-256-10 MLP of bench/gpu/torch_check.py (100 steps, block RMSProp,
   host engine, float32) ``--runs`` times in this process and reports how many runs differ from
   the first, and by how much (the engine's threads must not change the rounding).
2. Times scipy's ssyevd at n = 256 with LAPACK's minimum workspace (what the engine now passes)
   against 4x that (what a grown per-thread buffer used to pass), interleaved, and checks that
   both give the same bits.

    python bench/python/determinism.py                 # 8 runs, about a minute
    OPENBLAS_NUM_THREADS=1 python bench/python/determinism.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "gpu"))

import torch  # noqa: E402
from scipy.linalg import lapack  # noqa: E402
from torch_check import train  # noqa: E402

import saddlescape.torch as st  # noqa: E402


def repeated_training(runs: int) -> None:
    g = torch.Generator().manual_seed(1)
    W = torch.randn(64, 10, generator=g)
    X = torch.randn(1024, 64, generator=g)
    data = (X, (X @ W + 0.5 * torch.randn(1024, 10, generator=g)).argmax(1))

    def make(p):
        return st.RMSProp(p, lr=1e-3, structure="block", eps=1e-4, engine="host")

    first, _, _ = train("cpu", make, data)
    diffs = []
    for _ in range(runs - 1):
        params, _, _ = train("cpu", make, data)
        diffs.append(max(float((u - v).abs().max() / v.abs().max()) for u, v in zip(params, first)))
    differ = sum(d > 0 for d in diffs)
    print(f"training, {runs} runs: {differ} of {runs - 1} differ from the first; largest relative "
          f"difference {max(diffs, default=0.0):.3g}")


def syevd_workspace(n: int = 256, rounds: int = 80) -> None:
    rng = np.random.default_rng(0)
    A = rng.standard_normal((n, n)).astype(np.float32)
    A = A @ A.T
    lmin = 1 + 6 * n + 2 * n * n
    times: dict[str, list[float]] = {"minimum": [], "4x": []}
    out = {}
    for _ in range(rounds):
        for name, lwork in (("minimum", lmin), ("4x", 4 * lmin)):
            t = time.perf_counter()
            w, v, info = lapack.ssyevd(A, compute_v=1, lwork=lwork, liwork=3 + 5 * n)
            times[name].append(time.perf_counter() - t)
            out[name] = (w, v)
    same = all(np.array_equal(a, b) for a, b in zip(out["minimum"], out["4x"]))
    print(f"ssyevd n = {n}, median of {rounds} interleaved calls: minimum workspace "
          f"{statistics.median(times['minimum']) * 1e3:.2f} ms, 4x workspace "
          f"{statistics.median(times['4x']) * 1e3:.2f} ms; same bits: {same}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=8)
    a = ap.parse_args()
    print(f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, "
          f"SADDLESCAPE_NUM_THREADS={os.environ.get('SADDLESCAPE_NUM_THREADS', 'unset')}, "
          f"{os.cpu_count()} cores")
    repeated_training(a.runs)
    syevd_workspace()


if __name__ == "__main__":
    main()
