"""saddlescape.torch on the GPU against the CPU: the 64-256-256-10 MLP trained for 100 steps with
the diagonal rule (both forms, and Adam; on the device, RMSProp through
saddlescape.cuda.rmsprop_diag_step) and the block rule (both forms, RMSProp and Adam; the device
engine of saddlescape.cuda's batched routines, and the host's block engine staged through host
memory) on CUDA tensors and on CPU tensors from the same start and the same batches (data made
here, no download). Prints the largest relative difference of
the parameters and the final losses; exits 1 where they differ by more than float32 rounding
over the run can explain (1e-3 relative) or a loss is not finite.

    python bench/gpu/torch_check.py            # needs a CUDA device
    python bench/gpu/torch_check.py --device cpu   # checks the script itself
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

import saddlescape.torch as st

STEPS = 100


def train(device: str, make, data) -> tuple[list[torch.Tensor], float, float]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 10)).to(device)
    opt = make(model.parameters())
    X, y = (t.to(device) for t in data)
    start = time.perf_counter()
    for i in range(STEPS):
        idx = slice((i * 64) % 1024, (i * 64) % 1024 + 64)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(X[idx]), y[idx])
        loss.backward()
        opt.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    sec = (time.perf_counter() - start) / STEPS
    return [p.detach().cpu().double() for p in model.parameters()], loss.item(), sec


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # the CPU comparison needs full float32 GEMMs
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("torch_check: no CUDA device")
        return 1
    g = torch.Generator().manual_seed(1)
    W = torch.randn(64, 10, generator=g)
    X = torch.randn(1024, 64, generator=g)
    data = (X, (X @ W + 0.5 * torch.randn(1024, 10, generator=g)).argmax(1))
    routes = {
        "RMSProp diag inv_sqrt": lambda p: st.RMSProp(p, lr=1e-3, structure="diag"),
        "RMSProp diag adam": lambda p: st.RMSProp(p, lr=1e-3, structure="diag", form="adam"),
        "Adam diag": lambda p: st.Adam(p, lr=1e-3, structure="diag"),
        # engine "auto": the device engine on CUDA parameters (saddlescape.cuda's batched EMA
        # update and inverse root), the host engine on the CPU; "host": the host engine on both.
        "RMSProp block inv_sqrt (auto)": lambda p: st.RMSProp(p, lr=1e-3, structure="block",
                                                              eps=1e-4),
        "RMSProp block inv_sqrt (host)": lambda p: st.RMSProp(p, lr=1e-3, structure="block",
                                                              eps=1e-4, engine="host"),
        "RMSProp block adam (auto)": lambda p: st.RMSProp(p, lr=1e-3, structure="block",
                                                          eps=1e-4, form="adam"),
        "Adam block (auto)": lambda p: st.Adam(p, lr=1e-3, structure="block", eps=1e-4),
        "Adam block inv_sqrt (auto)": lambda p: st.Adam(p, lr=1e-3, structure="block",
                                                        eps=1e-4, form="inv_sqrt"),
    }
    ok = True
    print(f"| route | loss {a.device} | loss cpu | max rel diff of parameters | "
          f"step+fwd/bwd {a.device} | cpu |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, make in routes.items():
        pd, ld, sd = train(a.device, make, data)
        pc, lc, sc = train("cpu", make, data)
        diff = max(float((u - v).abs().max() / v.abs().max()) for u, v in zip(pd, pc))
        good = math.isfinite(ld) and math.isfinite(lc) and diff <= 1e-3
        ok &= good
        print(f"| {name} | {ld:.5f} | {lc:.5f} | {diff:.2e}{'' if good else ' FAIL'} | "
              f"{sd * 1e6:.0f} us | {sc * 1e6:.0f} us |")
    print("torch_check:", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
