"""Benchmark saddlescape.torch's optimizers against torch.optim on the same models, in one run.

Models (float32; on the CPU, or with ``--device cuda`` on the GPU, where the block route is timed
with both engines, ``engine="device"`` and ``"host"``):

* ``mlp``: the 64-256-256-10 MLP of the block issue, 85,002 parameters in 6 tensors, batch 128;
* ``large``: ten 1000 x 1000 linear layers with biases (10,010,000 parameters, 20 tensors),
  batch 32.

For each model, the optimizer step of every route on the same gradients (computed once; the
steps go on from there, so the estimates evolve as in training), and the model's forward plus
backward pass for scale. Routes: torch.optim.RMSprop (for-loop and foreach; torch 2.13 has no
fused RMSprop), torch.optim.Adam (foreach and fused), saddlescape.torch.RMSProp with structure
"diag" in both forms, saddlescape.torch.Adam (diag), and on the MLP saddlescape.torch.RMSProp
with structure "block" (B = 256, float32 estimates, refresh_every = 16; exact directions; each
step on a new gradient, after 320 untimed steps that make every block full rank). Ratios
are (torch's fastest RMSprop route) / (the route): above 1, faster than torch.

Each timed block follows a pause and one untimed call (benchutil.compare); rounds rotate the
routes; medians over rounds.

    python bench/python/bench_torch.py                 # both models, 7 rounds (~2 minutes)
    python bench/python/bench_torch.py --only mlp --rounds 11
    python bench/python/bench_torch.py --quick         # a few seconds
    python bench/python/bench_torch.py --device cuda   # on a GPU (bench/gpu/check.sh)
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchutil  # noqa: E402

try:
    import torch
except ImportError:  # pragma: no cover - the benchmark needs torch
    print("bench_torch.py needs torch (pip install torch==2.13.0)")
    raise SystemExit(0)

import saddlescape.torch as st  # noqa: E402


def mlp() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                torch.nn.ReLU(), torch.nn.Linear(256, 10))
    return model, torch.randn(128, 64), torch.randint(0, 10, (128,))


def large() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(10):
        layers += [torch.nn.Linear(1000, 1000), torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers[:-1])
    return model, torch.randn(32, 1000), torch.randint(0, 1000, (32,))


def routes(model: torch.nn.Module, block: bool, cuda: bool) -> dict[str, torch.optim.Optimizer]:
    p = list(model.parameters())
    lr = 1e-5
    out = {
        "torch RMSprop (for-loop)": torch.optim.RMSprop(p, lr=lr, foreach=False),
        "torch RMSprop (foreach)": torch.optim.RMSprop(p, lr=lr, foreach=True),
        "torch Adam (foreach)": torch.optim.Adam(p, lr=lr, foreach=True),
        "torch Adam (fused)": torch.optim.Adam(p, lr=lr, fused=True),
        "saddlescape RMSProp diag inv_sqrt": st.RMSProp(p, lr=lr, structure="diag"),
        "saddlescape RMSProp diag adam": st.RMSProp(p, lr=lr, structure="diag", form="adam"),
        "saddlescape Adam diag": st.Adam(p, lr=lr),
    }
    if block and cuda:  # both engines: estimates on the GPU, or on the host (staged)
        from saddlescape import cuda as sc

        engines = ("device", "host") if sc.is_available() else ("host",)
        if not sc.is_available():
            print(f"(the device engine is skipped: {sc.unavailable_reason()})")
        for engine in engines:
            out[f"saddlescape RMSProp block B=256 ({engine} engine)"] = st.RMSProp(
                p, lr=lr, structure="block", block_size=256, refresh_every=16,
                dtype=torch.float32, engine=engine)
    elif block:
        out["saddlescape RMSProp block B=256"] = st.RMSProp(
            p, lr=lr, structure="block", block_size=256, refresh_every=16, dtype=torch.float32)
    return out


def block_steps(model, x, y, opts, slow, warmup: int):
    """The block routes' steps, each on a new gradient. One gradient over and over would keep
    every block's estimate at rank 1, refreshed for almost nothing; the gradients of `warmup`
    random batches (untimed, the first `warmup` steps) make them full rank, the steady state of
    training (rank-deficient blocks refresh faster: bench_blocks.py item 4)."""
    params = [p for p in model.parameters()]
    pool = []
    gen = torch.Generator().manual_seed(1)
    for _ in range(warmup + 64):
        model.zero_grad(set_to_none=False)
        xb = torch.randn(x.shape, generator=gen).to(x.device)
        yb = torch.randint(0, 10, y.shape, generator=gen).to(y.device)
        torch.nn.functional.cross_entropy(model(xb), yb).backward()
        pool.append([p.grad.clone() for p in params])
    calls = {k: 0 for k in slow}

    def stepper(name):
        def step():
            i = calls[name]
            calls[name] += 1
            grads = pool[i] if i < warmup else pool[warmup + (i - warmup) % 64]
            for p, g in zip(params, grads):
                p.grad.copy_(g)
            opts[name].step()
        return step

    out = {k: stepper(k) for k in slow}
    for k, f in out.items():
        for _ in range(warmup):
            f()
    return out


def synced(fns: dict, cuda: bool) -> dict:
    """On a GPU each timed call ends with a synchronisation, so that it counts the kernels it
    queued (the same small cost for every route)."""
    if not cuda:
        return fns

    def wrap(f):
        def call():
            f()
            torch.cuda.synchronize()
        return call
    return {k: wrap(f) for k, f in fns.items()}


def bench(name: str, make, rounds: int, target_s: float, block: bool, device: str,
          warmup: int = 320) -> None:
    model, x, y = make()
    model, x, y = model.to(device), x.to(device), y.to(device)
    cuda = x.is_cuda
    n = sum(q.numel() for q in model.parameters())
    print(f"\n## {name}: {n:,} parameters in {len(list(model.parameters()))} tensors "
          f"(float32), batch {x.shape[0]}, on {device}")

    def fwd_bwd() -> None:
        model.zero_grad(set_to_none=False)
        torch.nn.functional.cross_entropy(model(x), y).backward()

    fwd_bwd()
    opts = routes(model, block, cuda)
    steps = {k: o.step for k, o in opts.items()}
    slow = {k: v for k, v in steps.items() if "block" in k}
    fast = {k: v for k, v in steps.items() if "block" not in k}
    times = benchutil.compare(synced({**fast, "forward + backward": fwd_bwd}, cuda), rounds,
                              target_s)
    if slow:  # ~50 ms a step: fewer calls per round, the same rounds
        times.update(benchutil.compare(synced(block_steps(model, x, y, opts, slow, warmup), cuda),
                                       rounds, max(target_s, 0.5)))
    base_name = min(("torch RMSprop (for-loop)", "torch RMSprop (foreach)"), key=times.get)
    base = times[base_name]
    print(f"baseline: {base_name}, {base * 1e6:.0f} us per step\n")
    print("| route | step (us) | torch's fastest RMSprop / route |")
    print("|---|---:|---:|")
    for k, t in times.items():
        print(f"| {k} | {t * 1e6:,.0f} | {base / t:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="mlp,large")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    a = ap.parse_args()
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_torch.py --device cuda: torch finds no CUDA device")
        raise SystemExit(1)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads); python "
          f"{platform.python_version()}; OPENBLAS_NUM_THREADS="
          f"{os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}")
    rounds, target = (2, 0.05) if a.quick else (a.rounds, 0.3)
    cases = {"mlp": (mlp, True), "large": (large, False)}
    for name in a.only.split(","):
        make, block = cases[name]
        bench(name, make, rounds, target, block and not a.quick, a.device)


if __name__ == "__main__":
    main()
