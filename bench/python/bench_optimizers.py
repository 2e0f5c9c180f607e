"""Benchmark the optimizers and the native loop against numpy and torch, in one run.

1. ``saddlescape.run`` on the 2-D saddle problem (Sec. 6), one thread: diagonal RMSProp and
   full-matrix RMSProp (closed-form 2 x 2 inverse square root), in steps/s, against a plain numpy
   per-step loop of the same algorithm (same component sampling, same update).
2. The diagonal RMSProp ``step`` at d = 10^7: one pass reading x, g, v and writing x, v
   (40 bytes per entry), against the memory bandwidth measured in the same run (the fastest of
   numpy's ``np.add(a, b, out=c)``, in-place ``np.add(a, b, out=a)`` (one core) and in-place
   ``torch.add`` (all cores), counted as 24 bytes per entry) and against
   ``torch.optim.RMSprop`` (alpha = beta; torch's eps sits outside the root, our form "adam").
   The step splits its passes over SADDLESCAPE_NUM_THREADS threads (default: all cores).
3. Full-matrix RMSProp at d = 1024 on a noisy quadratic: the exact per-step direction
   (saddlescape solver "eigh") against numpy and torch per-step eigendecompositions doing the
   same update, all starting from the same well-conditioned estimate; and the "lowrank" solver,
   exact to its quadrature tolerance, with its relative error against the exact direction.

    OPENBLAS_NUM_THREADS=1 python bench/python/bench_optimizers.py --only saddle
    python bench/python/bench_optimizers.py --only diag full
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np

import saddlescape as ss
from benchutil import compare

try:
    import torch
except ImportError:
    torch = None

LR = 0.001


def saddle(rounds: int, steps: int) -> None:
    p = ss.problems.SaddleProblem()
    h, b = p.h, p.b
    beta = ss.beta_from_lr(LR)
    x0 = np.zeros(2)

    def ours(structure: str):
        def go():
            opt = ss.RMSProp(2, LR, beta=beta, structure=structure, eps=1e-8)
            ss.run(p, opt, x0, steps, seed=0, record_every=steps, record_x=False)
        return go

    def numpy_loop(structure: str, n: int):
        def go():
            rng = np.random.default_rng(0)
            x = x0.copy()
            v = np.zeros(2)
            G = np.zeros((2, 2))
            for _ in range(n):
                g = h * x + 10 * x**9 + b[rng.integers(b.shape[0])]
                if structure == "diag":
                    v = beta * v + (1 - beta) * g * g
                    x -= LR * g / np.sqrt(v + 1e-8)
                else:
                    G = beta * G + (1 - beta) * np.outer(g, g)
                    w, V = np.linalg.eigh(G)
                    x -= LR * (V @ ((V.T @ g) / np.sqrt(np.clip(w, 0, None) + 1e-8)))
        return go

    n_np = 20000
    print(f"\n### 1. run() on the 2-D saddle problem, one thread ({steps:.0e} native steps, "
          f"{n_np} numpy steps per timing)\n")
    print("| structure | saddlescape steps/s | numpy loop steps/s | ratio |")
    print("|---|---|---|---|")
    for structure in ("diag", "full"):
        t = compare({"ours": ours(structure), "numpy": numpy_loop(structure, n_np)}, rounds, 0.3,
                    settle_s=0.05)
        ours_rate, np_rate = steps / t["ours"], n_np / t["numpy"]
        print(f"| {structure} | {ours_rate / 1e6:.1f} M | {np_rate / 1e3:.1f} k | "
              f"{ours_rate / np_rate:.0f}x |", flush=True)


def diag(d: int, rounds: int) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(d) * 1e-3
    g = rng.standard_normal(d)
    beta = 0.99
    opt = ss.RMSProp(d, 1e-9, beta=beta, structure="diag", form="adam", eps=1e-8)
    a, b2, c = rng.standard_normal(d), rng.standard_normal(d), np.empty(d)
    routes = {
        "saddlescape": lambda: opt.step(x, g),
        "add": lambda: np.add(a, b2, out=c),
        "add_inplace": lambda: np.add(a, b2, out=a),
    }
    if torch is not None:
        tx = torch.nn.Parameter(torch.from_numpy(rng.standard_normal(d) * 1e-3))
        tx.grad = torch.from_numpy(g.copy())
        topt = torch.optim.RMSprop([tx], lr=1e-9, alpha=beta, eps=1e-8)
        routes["torch"] = topt.step
        # torch's elementwise add runs on all cores: the bandwidth with every core streaming.
        ta, tb = torch.from_numpy(a), torch.from_numpy(b2)
        routes["add_torch"] = lambda: torch.add(ta, tb, out=ta)
    t = compare(routes, rounds, 0.3)
    one = min(t["add"], t["add_inplace"])
    bws = {"one core (numpy add)": 24 * d / one}
    if "add_torch" in t:
        bws["all cores (torch add)"] = 24 * d / t["add_torch"]
    ours = 40 * d / t["saddlescape"]
    print(f"\n### 2. Diagonal RMSProp step, d = {d:.0e}, float64 (40 bytes per entry)\n")
    print("| route | time | GB/s | share of one-core bandwidth | share of all-core bandwidth |")
    print("|---|---|---|---|---|")
    all_bw = bws.get("all cores (torch add)", float("nan"))
    one_bw = bws["one core (numpy add)"]
    print(f"| bandwidth, one core: numpy in-place add (24 B/entry) | {one * 1e3:.2f} ms | "
          f"{one_bw / 1e9:.2f} | 100% | {100 * one_bw / all_bw:.0f}% |")
    if "add_torch" in t:
        print(f"| bandwidth, all cores: torch in-place add (24 B/entry) | {t['add_torch'] * 1e3:.2f} ms"
              f" | {all_bw / 1e9:.2f} | {100 * all_bw / one_bw:.0f}% | 100% |")
    print(f"| saddlescape RMSProp.step | {t['saddlescape'] * 1e3:.2f} ms | {ours / 1e9:.2f} | "
          f"{100 * ours / one_bw:.0f}% | {100 * ours / all_bw:.0f}% |")
    if "torch" in t:
        tt = 40 * d / t["torch"]
        print(f"| torch.optim.RMSprop.step | {t['torch'] * 1e3:.2f} ms | {tt / 1e9:.2f} | "
              f"{100 * tt / one_bw:.0f}% | {100 * tt / all_bw:.0f}% |")
        print(f"\nsaddlescape is {t['torch'] / t['saddlescape']:.2f}x faster than torch.optim.RMSprop.")


def full(d: int, rounds: int, refresh: int, tol: float, lowrank_steps: int, exact_steps: int) -> None:
    rng = np.random.default_rng(1)
    h = np.linspace(0.05, 1.0, d)
    noise = np.linspace(0.05, 1.0, d)[::-1].copy()
    q = ss.problems.NoisyQuadratic(np.diag(h), noise)
    lr, beta, eps = 0.01, 0.999, 1e-8
    x0 = rng.standard_normal(d)
    # A common start: the estimate after 3000 gradients (full rank, as in a long run), so that no
    # route profits from the deflation a rank-deficient early estimate gives the eigensolver.
    warm = ss.RMSProp(d, lr, beta=beta, eps=eps, burn_in=3000)
    ss.run(q, warm, x0, 0, seed=1)
    state = warm.state_dict()
    G0 = warm.estimate()

    def make(solver: str) -> ss.RMSProp:
        o = ss.RMSProp(d, lr, beta=beta, eps=eps, burn_in=3000, solver=solver,
                       refresh_every=refresh if solver == "lowrank" else 1, tol=tol)
        o.load_state_dict(state)
        return o

    exact, low = make("eigh"), make("lowrank")
    sq = np.sqrt(noise)

    def numpy_steps():
        G = G0.copy()
        x = x0.copy()
        r = np.random.default_rng(2)
        for _ in range(exact_steps):
            g = h * x + sq * r.standard_normal(d)
            G *= beta
            G += (1 - beta) * np.outer(g, g)
            w, V = np.linalg.eigh(G)
            x -= lr * (V @ ((V.T @ g) / np.sqrt(np.clip(w, 0, None) + eps)))

    routes = {
        "exact": lambda: ss.run(q, exact, x0, exact_steps, seed=3, record_every=exact_steps,
                                record_x=False),
        "lowrank": lambda: ss.run(q, low, x0, lowrank_steps, seed=3, record_every=lowrank_steps,
                                  record_x=False),
        "numpy": numpy_steps,
    }
    if torch is not None:
        th, tsq = torch.from_numpy(h), torch.from_numpy(sq)

        def torch_steps():
            G = torch.from_numpy(G0.copy())
            x = torch.from_numpy(x0.copy())
            gen = torch.Generator().manual_seed(2)
            for _ in range(exact_steps):
                g = th * x + tsq * torch.randn(d, generator=gen, dtype=torch.float64)
                G.mul_(beta).add_(torch.outer(g, g), alpha=1 - beta)
                w, V = torch.linalg.eigh(G)
                x -= lr * (V @ ((V.T @ g) / torch.sqrt(w.clamp(min=0) + eps)))

        routes["torch"] = torch_steps
    t = compare(routes, rounds, 1.0, settle_s=0.3)
    rate = {k: (lowrank_steps if k == "lowrank" else exact_steps) / v for k, v in t.items()}

    # The lowrank direction against the exact one, fed the same gradients from the same state.
    e1, e2 = make("eigh"), make("lowrank")
    src = q.sampler(5)
    x = x0.copy()
    errs = []
    for _ in range(4 * refresh):
        gk = src.sample(x)
        xa, xb = x.copy(), x.copy()
        e1.step(xa, gk)
        e2.step(xb, gk)
        da, db = x - xa, x - xb
        errs.append(np.linalg.norm(da - db) / np.linalg.norm(da))
        x = xa

    best = max(rate.get("numpy", 0), rate.get("torch", 0))
    print(f"\n### 3. Full-matrix RMSProp, d = {d}, noisy quadratic (steps/s, median of {rounds})\n")
    print("| route | steps/s | vs numpy | vs the faster baseline |")
    print("|---|---|---|---|")
    for k, label in (("numpy", "numpy per-step eigh"), ("torch", "torch per-step eigh"),
                     ("exact", "saddlescape, solver eigh (exact)"),
                     ("lowrank", f"saddlescape, solver lowrank (refresh_every={refresh}, tol={tol:g})")):
        if k in rate:
            print(f"| {label} | {rate[k]:.2f} | {rate[k] / rate['numpy']:.2f}x | {rate[k] / best:.2f}x |")
    print(f"\nlowrank relative error of A g against the exact direction over {len(errs)} steps: "
          f"median {statistics.median(errs):.1e}, max {max(errs):.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=["saddle", "diag", "full"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=2_000_000)
    parser.add_argument("--diag-dim", type=int, default=10**7)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--refresh", type=int, default=24)
    parser.add_argument("--tol", type=float, default=1e-8,
                        help="the lowrank solver's quadrature tolerance (the target is 1e-6)")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; numpy {np.__version__}; "
          f"torch {torch.__version__ if torch else 'not installed'}; "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}")
    if "saddle" in args.only:
        saddle(args.rounds, args.steps)
    if "diag" in args.only:
        diag(args.diag_dim, args.rounds)
    if "full" in args.only:
        full(args.dim, max(3, args.rounds // 2), args.refresh, args.tol, lowrank_steps=48,
             exact_steps=3)


if __name__ == "__main__":
    main()
