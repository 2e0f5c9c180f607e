"""Benchmark data-parallel training with sharded block preconditioners (issue 13), in one run.

The 64-256-256-10 MLP (85,002 parameters; blocks of at most 256: 333 blocks), float32, a global
batch of 256 random rows split over the ranks, on gloo over localhost, at world sizes 1 and 2.
Routes, each timed over the whole step (forward, backward, communication, update):

- ``ddp_adam``: DistributedDataParallel + torch.optim.Adam (the baseline);
- ``ddp_replicated``: DDP + an unsharded saddlescape.BlockEngine on every rank (the known design
  without sharding: every rank holds and computes every block);
- ``sharded``: saddlescape.torch.distributed.ShardedRMSProp on the plain model (float32, and
  bfloat16 communication).

Bytes per step: the formula of the collectives (bytes one rank sends in ring algorithms) and
the loopback interface's counter (/proc/net/dev ``lo``, all ranks' traffic of the step,
including gloo's framing; other processes on the machine using localhost add to it). Memory per
rank: the optimizer state in bytes (Adam: 2 D floats; block engines: ``memory_bytes``) and the
process's peak RSS. Per-block costs (a refresh and a direction of one block of 256) are measured
for the projection that ``--project`` prints.

    python bench/python/bench_distributed.py                  # world sizes 1 and 2, 20 steps
    python bench/python/bench_distributed.py --steps 10 --quick
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time


def lo_bytes() -> int:
    try:
        with open("/proc/net/dev") as f:
            for line in f:
                if line.strip().startswith("lo:"):
                    parts = line.split(":")[1].split()
                    return int(parts[8])  # transmitted bytes (lo: received = transmitted)
    except OSError:
        pass
    return -1


def mlp(torch, width: int):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.ReLU(),
                               torch.nn.Linear(width, width), torch.nn.ReLU(),
                               torch.nn.Linear(width, 10))


def worker(rank: int, world: int, init: str, out: str, args: dict) -> None:
    os.environ["SADDLESCAPE_NUM_THREADS"] = "1"
    import numpy as np
    import torch
    import torch.distributed as dist

    import saddlescape
    from saddlescape.torch.distributed import ShardedRMSProp, parameter_blocks

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    rng = np.random.default_rng(1)
    X = torch.from_numpy(rng.standard_normal((256, 64)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 10, size=256))
    rows = slice(rank * 256 // world, (rank + 1) * 256 // world)
    Xr, yr = X[rows], y[rows]
    results = {}

    def timed(name, model, step_fn, state_bytes):
        def one():
            model.zero_grad()
            torch.nn.functional.cross_entropy(model(Xr), yr).backward()
            step_fn()
        for _ in range(args["warmup"]):
            one()
        dist.barrier()
        times, b0 = [], lo_bytes()
        for _ in range(args["steps"]):
            t = time.perf_counter()
            one()
            times.append(time.perf_counter() - t)
        dist.barrier()
        b1 = lo_bytes()
        results[name] = {"ms": 1e3 * statistics.median(times),
                         "lo_bytes_per_step": (b1 - b0) / args["steps"],
                         "state_bytes": state_bytes,
                         "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}

    width = args["width"]
    D = sum(p.numel() for p in mlp(torch, width).parameters())
    ring = lambda n, c: 2 * (world - 1) * n / world * c  # noqa: E731 - ring all-reduce bytes
    # DDP + Adam
    model = mlp(torch, width)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    timed("ddp_adam", ddp, adam.step, 2 * D * 4)
    results["ddp_adam"]["formula_bytes"] = ring(D, 4)
    # DDP + replicated engine
    model = mlp(torch, width)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    params = list(model.parameters())
    sizes = [B for _, _, B in parameter_blocks([tuple(p.shape) for p in params], 256)]
    eng = saddlescape.BlockEngine(sizes, beta=0.99, eps=1e-8, refresh_every=16)
    flat = np.concatenate([p.detach().numpy().reshape(-1) for p in params])

    def replicated_step():
        g = np.concatenate([p.grad.numpy().reshape(-1) for p in params])
        eng.step(flat, g, 1e-3)
        with torch.no_grad():
            at = 0
            for p in params:
                p.copy_(torch.from_numpy(flat[at:at + p.numel()]).view_as(p))
                at += p.numel()

    timed("ddp_replicated", ddp, replicated_step, eng.memory_bytes)
    results["ddp_replicated"]["formula_bytes"] = ring(D, 4)
    del eng
    # sharded
    for name, dt in (("sharded", torch.float32), ("sharded_bf16", torch.bfloat16)):
        model = mlp(torch, width)
        opt = ShardedRMSProp(model.parameters(), lr=1e-3, beta=0.99, eps=1e-8, block_size=256,
                             refresh_every=16, comm_dtype=dt)
        timed(name, model, opt.step, opt.memory_bytes)
        results[name]["formula_bytes"] = opt.communication_bytes()["total"]
        results[name]["blocks_owned"] = len(opt.owned_blocks)
        del opt
    # per-block costs (rank 0 only), for the projection
    if rank == 0:
        e = saddlescape.BlockEngine([256], beta=0.99, eps=1e-8, refresh_every=16)
        g = rng.standard_normal(256).astype(np.float32)
        for _ in range(20):
            e.update_direction(g)
        ts = []
        for _ in range(9):
            t = time.perf_counter()
            e.refresh(0, warm=False)
            ts.append(time.perf_counter() - t)
        td = []
        for _ in range(15):  # 15 < refresh_every after a refresh: directions only
            t = time.perf_counter()
            e.update_direction(g)
            td.append(time.perf_counter() - t)
        results["per_block"] = {"refresh_ms": 1e3 * statistics.median(ts),
                                "direction_ms": 1e3 * statistics.median(td), "D": D,
                                "n_blocks": len(sizes)}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


def run(world: int, args: dict) -> list[dict]:
    import torch.multiprocessing as mp

    # One thread per library in each rank, set before the children import them: the ranks share
    # the cores, and OpenBLAS threads spinning on a busy machine slowed block steps 40x.
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "SADDLESCAPE_NUM_THREADS"):
        os.environ[k] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(world, os.path.join(tmp, "pg"), tmp, args), nprocs=world,
                 join=True)
        out = []
        for r in range(world):
            with open(os.path.join(tmp, f"rank{r}.json")) as f:
                out.append(json.load(f))
        return out


def projection(per_block: dict, D_model: int, block: int = 256) -> str:
    """A projection (not a measurement) for W = 8..256 ranks."""
    import math

    from saddlescape.sharding import assign_blocks

    n_blocks = math.ceil(D_model / block)
    lines = [f"Projection for a model of {D_model:,} parameters in {n_blocks:,} blocks of {block} "
             f"(measured per block: refresh {per_block['refresh_ms']:.2f} ms, direction "
             f"{per_block['direction_ms']:.3f} ms, amortised {per_block['refresh_ms'] / 16 + per_block['direction_ms']:.3f} ms per step "
             f"with refresh_every = 16). Bytes are sent per rank per step (ring collectives, "
             f"float32).", "",
             "| ranks W | blocks per rank (max) | block compute per step, sharded | replicated | "
             "bytes sent, sharded | DDP + Adam | DDP + all-gather of directions | state per rank, sharded | replicated |",
             "|---|---|---|---|---|---|---|---|---|"]
    per = per_block["refresh_ms"] / 16 + per_block["direction_ms"]
    state = 2 * block * block * 4 + 2 * 16 * block * 4
    for W in (8, 16, 32, 64, 128, 256):
        a = assign_blocks([block] * n_blocks, W)
        most = max(len(b) for b in a.blocks)
        L = max(a.sizes)
        ours = 2 * (W - 1) * (L + 1) * 4
        ddp = 2 * (W - 1) * D_model / W * 4
        known = ddp + (W - 1) * L * 4
        lines.append(f"| {W} | {most} | {most * per:.1f} ms | {n_blocks * per:.0f} ms | "
                     f"{ours / 1e6:.1f} MB | {ddp / 1e6:.1f} MB | {known / 1e6:.1f} MB | "
                     f"{most * state / 1e6:.1f} MB | {n_blocks * state / 1e6:.0f} MB |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="a 64-32-32-10 MLP, for a smoke run")
    ap.add_argument("--worlds", default="1,2")
    a = ap.parse_args()
    args = {"steps": a.steps, "warmup": a.warmup, "width": 32 if a.quick else 256}
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python "
          f"{sys.version.split()[0]}; MLP 64-{args['width']}-{args['width']}-10, global batch "
          f"256, {a.steps} timed steps (median)")
    per_block = None
    table = ["| W | route | step | vs DDP+Adam | bytes/step/rank (formula) | lo bytes/step (all ranks) | "
             "optimizer state/rank | peak RSS/rank |", "|---|---|---|---|---|---|---|---|"]
    for world in [int(w) for w in a.worlds.split(",")]:
        res = run(world, args)
        base = max(r["ddp_adam"]["ms"] for r in res)
        for name in ("ddp_adam", "ddp_replicated", "sharded", "sharded_bf16"):
            ms = max(r[name]["ms"] for r in res)  # a step ends when the slowest rank's does
            st = max(r[name]["state_bytes"] for r in res)
            rss = max(r[name]["rss_mb"] for r in res)
            table.append(f"| {world} | {name} | {ms:.1f} ms | {base / ms:.2f}x | "
                         f"{res[0][name]['formula_bytes'] / 1e3:.0f} kB | "
                         f"{res[0][name]['lo_bytes_per_step'] / 1e3:.0f} kB | {st / 1e6:.1f} MB | "
                         f"{rss:.0f} MB |")
        per_block = res[0]["per_block"]
    print("\n".join(table))
    print()
    print(projection(per_block, per_block["D"]))
    print()
    print(projection(per_block, 100_000_000))


if __name__ == "__main__":
    main()
