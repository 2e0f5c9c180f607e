"""Resident memory and step time of saddlescape.torch's block optimizers over a run, against
torch.optim.Adam on the same model in the same process: the check behind the block engine's
spare-pool fix (bench/RESULTS.md, issue 15). The 64-256-256-10 MLP (85,002 parameters), float32
blocks of 256, one batch of 64 rows made here. Each route runs in a fresh subprocess so that
one route's memory cannot hide another's; prints RSS after the first step and after the last,
the growth per step, and the median step.

    OMP_NUM_THREADS=1 SADDLESCAPE_NUM_THREADS=1 python bench/python/bench_block_memory.py [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import json, statistics, sys, time
import torch
import saddlescape.torch as st
route, steps = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                            torch.nn.ReLU(), torch.nn.Linear(256, 10))
make = {
    "torch.optim.Adam": lambda p: torch.optim.Adam(p, lr=1e-3),
    "RMSProp block inv_sqrt": lambda p: st.RMSProp(p, lr=1e-3, structure="block", eps=1e-4),
    "RMSProp block adam": lambda p: st.RMSProp(p, lr=1e-3, structure="block", eps=1e-4,
                                               form="adam"),
    "Adam block adam": lambda p: st.Adam(p, lr=1e-3, structure="block", eps=1e-4),
}[route]
opt = make(model.parameters())
X, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
times = []
for i in range(steps):
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(X), y).backward()
    t = time.perf_counter()
    opt.step()
    times.append(time.perf_counter() - t)
    if i == 0:
        first = rss()
print(json.dumps({"first": first, "last": rss(), "step": statistics.median(times)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    a = ap.parse_args()
    print(f"| route | RSS after step 1 | after step {a.steps} | growth per step | median step |")
    print("|---|---:|---:|---:|---:|")
    for route in ("torch.optim.Adam", "RMSProp block inv_sqrt", "RMSProp block adam",
                  "Adam block adam"):
        out = subprocess.run([sys.executable, "-c", CHILD, route, str(a.steps)],
                             capture_output=True, text=True, check=True, timeout=1800)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        grow = (r["last"] - r["first"]) / max(a.steps - 1, 1)
        print(f"| {route} | {r['first']:.0f} MB | {r['last']:.0f} MB | {grow:.1f} MB | "
              f"{r['step'] * 1e3:.1f} ms |", flush=True)


if __name__ == "__main__":
    main()
