"""Benchmark saddlescape.inv_sqrt against the numpy and torch routes, in one run.

The baselines compute the same matrix, (G + eps I)^(-1/2), the way a user would without this
library: numpy's ``eigh`` plus the reconstruction ``(V * w**-0.5) @ V.T``, and where torch is
installed ``torch.linalg.eigh`` plus the same reconstruction on zero-copy tensors. Each round
times every route once, in an order that rotates, after a pause that lets the other libraries'
thread pools go idle (see benchutil.py), and the table reports medians over rounds.

    python bench/python/bench_inv_sqrt.py                # the table of bench/RESULTS.md
    python bench/python/bench_inv_sqrt.py --sizes 16 64 --rounds 31
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
    import torch
except ImportError:  # the torch column is optional
    torch = None


def spd(d: int, rng: np.random.Generator) -> np.ndarray:
    """A well-conditioned random SPD matrix (condition about 10-100), C-contiguous float64."""
    x = rng.standard_normal((d, 2 * d))
    return np.ascontiguousarray(x @ x.T / (2 * d) + 0.05 * np.eye(d))


def numpy_route(g: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(g)
    return (v * w**-0.5) @ v.T


def torch_route(g: "torch.Tensor") -> "torch.Tensor":
    w, v = torch.linalg.eigh(g)
    return (v * w.rsqrt()) @ v.T


def bench_size(d: int, rounds: int, target_s: float, with_newton: bool) -> dict[str, float]:
    rng = np.random.default_rng(d)
    g = spd(d, rng)
    routes: dict[str, Callable[[], object]] = {
        "saddlescape": lambda: saddlescape.inv_sqrt(g),
        "numpy": lambda: numpy_route(g),
    }
    if with_newton:
        routes["saddlescape newton"] = lambda: saddlescape.inv_sqrt(g, method="newton")
    if torch is not None:
        gt = torch.from_numpy(g)
        routes["torch"] = lambda: torch_route(gt)

    # The routes must agree before their times mean anything.
    ref = numpy_route(g)
    for name, fn in routes.items():
        out = fn()
        out = out.numpy() if torch is not None and isinstance(out, torch.Tensor) else out
        err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
        if not err < 1e-8:
            raise SystemExit(f"{name} disagrees with numpy at d = {d}: relative error {err:.2e}")

    return compare(routes, rounds, target_s)


def fmt_time(t: float) -> str:
    return f"{t * 1e3:.3f} ms" if t < 1.0 else f"{t:.2f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 256, 1024, 2048])
    parser.add_argument("--rounds", type=int, default=11, help="timed rounds (median taken)")
    parser.add_argument("--target", type=float, default=0.05, help="seconds per timed sample")
    parser.add_argument("--newton", action="store_true", help="also time method='newton'")
    args = parser.parse_args()

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.processor() or ''}")
    print(f"numpy {np.__version__}, saddlescape {saddlescape.__version__}, "
          f"torch {torch.__version__ + f' ({torch.get_num_threads()} threads)' if torch else 'not installed'}")
    print(f"float64, median of {args.rounds} rounds; ratio = baseline time / saddlescape time\n")
    cols = ["d", "saddlescape", "numpy", "vs numpy"]
    if torch is not None:
        cols += ["torch", "vs torch"]
    if args.newton:
        cols += ["newton", "newton vs numpy"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for d in args.sizes:
        t = bench_size(d, args.rounds, args.target, args.newton)
        ours = t["saddlescape"]
        row = [str(d), fmt_time(ours), fmt_time(t["numpy"]), f"{t['numpy'] / ours:.2f}x"]
        if torch is not None:
            row += [fmt_time(t["torch"]), f"{t['torch'] / ours:.2f}x"]
        if args.newton:
            row += [fmt_time(t["saddlescape newton"]), f"{t['numpy'] / t['saddlescape newton']:.2f}x"]
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
