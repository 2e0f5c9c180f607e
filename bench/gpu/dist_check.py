"""ShardedRMSProp on CUDA parameters with NCCL against the single-process optimizer on the CPU.

Launched by torchrun, one process per GPU (a single GPU gives world size 1, which still runs the
NCCL collectives and the host-staged engine):

    torchrun --standalone --nproc_per_node=$(nvidia-smi -L | wc -l) bench/gpu/dist_check.py
    torchrun --standalone --nproc_per_node=2 bench/gpu/dist_check.py --backend gloo --device cpu
        # checks the script itself on a CPU-only machine

Each rank trains the 64-256-256-10 MLP on its share of the same global batches for STEPS steps;
rank 0 also trains it in one process with saddlescape.torch.RMSProp(structure="block") on the
CPU on the whole batches. Then a torch.distributed.checkpoint save and load into a fresh
optimizer must continue exactly as the uninterrupted one. Prints the largest relative difference
and the step time; exits 1 where the ranks disagree, a loss is not finite, the GPU run and the
CPU reference differ by more than float32 rounding over the run explains (1e-3 relative), or
the resumed step differs.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist

import saddlescape.torch as st
from saddlescape.torch.distributed import ShardedRMSProp

STEPS = 30
BATCH = 64
# eps = 1e-3 bounds the gain of (G + eps I)^(-1/2) at 30, so that rounding differences (the
# ranks' mean gradient against the whole batch's; GPU against CPU kernels) stay near rounding.
OPTIONS = dict(lr=1e-3, beta=0.99, eps=1e-3, block_size=256, refresh_every=16)


def make_model(device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                               torch.nn.Linear(256, 256), torch.nn.ReLU(),
                               torch.nn.Linear(256, 10)).to(device)


def batches():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(STEPS * BATCH, 64, generator=g)
    y = torch.randint(0, 10, (STEPS * BATCH,), generator=g)
    return [(X[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH]) for i in range(STEPS)]


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).cpu() for p in model.parameters()])


def step(model, opt, X, y) -> float:
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(X), y)
    loss.backward()
    opt.step()
    return loss.item()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="nccl")
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = a.device
    if device == "cuda":
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group(a.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    data = batches()
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    # The loss is the mean over the rank's rows; equal shares make the mean of the ranks'
    # gradients the whole batch's.
    assert BATCH % world == 0, "use a world size dividing 64"
    model = make_model(device)
    opt = ShardedRMSProp(model.parameters(), **OPTIONS)
    losses, start = [], time.perf_counter()
    for X, y in data[:-1]:
        losses.append(step(model, opt, X[rows].to(device), y[rows].to(device)))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    per_step = (time.perf_counter() - start) / (STEPS - 1)
    ok = all(math.isfinite(v) for v in losses)
    # Every rank holds the same parameters, bit for bit.
    mine = flat(model)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather_object(every, mine)
    same = all(torch.equal(e, every[0]) for e in every)
    # A DCP checkpoint, loaded into a fresh optimizer, continues as the uninterrupted one.
    folder = [tempfile.mkdtemp(prefix="saddlescape-dcp-")] if rank == 0 else [None]
    dist.broadcast_object_list(folder)
    path = os.path.join(folder[0], "ckpt")
    opt.save_sharded_checkpoint(path)
    resumed = ShardedRMSProp(model.parameters(), **OPTIONS)
    resumed.load_sharded_checkpoint(path)
    snapshot = [p.detach().clone() for p in model.parameters()]
    X, y = data[-1]
    step(model, opt, X[rows].to(device), y[rows].to(device))
    after = flat(model)
    with torch.no_grad():
        for p, s in zip(model.parameters(), snapshot):
            p.copy_(s)
    step(model, resumed, X[rows].to(device), y[rows].to(device))
    resume_same = torch.equal(after, flat(model))
    code = 0
    if rank == 0:
        ref_model = make_model("cpu")
        ref = st.RMSProp(ref_model.parameters(), structure="block", **OPTIONS)
        ref_losses = [step(ref_model, ref, X, y) for X, y in data]
        rel = float((after - flat(ref_model)).abs().max() / flat(ref_model).abs().max())
        print(f"world size {world} ({a.backend}, {device}): {per_step * 1e3:.1f} ms per step; "
              f"loss {losses[0]:.4f} -> {losses[-1]:.4f} on rank 0's rows (CPU reference on the "
              f"whole batches {ref_losses[0]:.4f} -> {ref_losses[-2]:.4f}); largest "
              f"relative parameter difference to the CPU reference {rel:.2e}; ranks identical: "
              f"{same}; DCP resume identical: {resume_same}; bytes/step "
              f"{opt.communication_bytes()}")
        if not (ok and same and resume_same and rel <= 1e-3):
            print("dist_check: FAILED")
            code = 1
        else:
            print("dist_check: OK")
    dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
