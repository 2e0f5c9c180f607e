"""Fig. 1: from the saddle point of the Sec. 6 problem, SGD against diagonal RMSProp.

The problem is :class:`saddlescape.problems.SaddleProblem` with its defaults: H = diag(1, -0.1),
gradient noise of covariance diag(1, 0.01) (small in the escape direction e_2) and the confining
term ||x||_10^10; x0 = 0 is a strict saddle and the minima are near x = (0, +-0.56) with
f = -0.0126. SGD runs with lr in {0.03, 0.01, 0.007} (the paper's) and 0.001 (the step RMSProp
uses, for a matched comparison); diagonal RMSProp with lr in {0.01, 0.001, 0.0001} and
beta = 1 - lr^(2/3). 10^4 steps, the objective against the step over many seeds: the median and
the 10-90% band (the paper shows one run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

import saddlescape as ss
from saddlescape.experiments.common import Output, Progress, bands, pyplot

STEPS = 10_000
SGD_LRS = (0.03, 0.01, 0.007, 0.001)
RMSPROP_LRS = (0.01, 0.001, 0.0001)
BASIN = -0.01  # f below this: in the basin of a local minimum (the minimum is -0.0126)


def settings() -> list[tuple[str, float, Any]]:
    out: list[tuple[str, float, Any]] = []
    for lr in SGD_LRS:
        out.append(("SGD", lr, lambda lr=lr: ss.SGD(lr)))
    for lr in RMSPROP_LRS:
        out.append(("RMSProp", lr, lambda lr=lr: ss.RMSProp(2, lr, beta=ss.beta_from_lr(lr),
                                                             eps=1e-8, structure="diag")))
    return out


def run(out: Path, quick: bool = False, seeds: int | None = None, progress: bool = True) -> dict[str, Any]:
    o = Output.create(out, "saddle")
    n_seeds = seeds or (8 if quick else 256)
    every = 50
    p = ss.problems.SaddleProblem()
    bar = Progress("saddle", len(settings()), progress)
    curves = {}
    for name, lr, make in settings():
        r = ss.run_many(p, make, np.zeros(2), STEPS, seeds=n_seeds, record_every=every,
                        record_x=False)
        curves[(name, lr)] = r.f
        bar.advance()
    bar.close()
    t = r.t
    rows = []
    for (name, lr), f in curves.items():
        med, lo, hi = bands(f)
        rows += [(name, lr, int(tt), m, a, b) for tt, m, a, b in zip(t, med, lo, hi)]
    o.write_csv(["method", "lr", "step", "f_median", "f_q10", "f_q90"], rows)

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, name in zip(axes, ("SGD", "RMSProp")):
        for i, ((n, lr), f) in enumerate((k, v) for k, v in curves.items() if k[0] == name):
            med, lo, hi = bands(f)
            ax.plot(t, med, color=f"C{i}", label=f"lr = {lr:g}")
            ax.fill_between(t, lo, hi, color=f"C{i}", alpha=0.2)
        ax.axhline(BASIN, color="k", lw=0.6, ls=":")
        ax.set(xlabel="step", title=f"{name} from the saddle ({n_seeds} seeds: median, 10-90%)")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("f(x_t)")
    o.save_figure(fig)

    for (name, lr), f in curves.items():
        key = f"{name.lower()}_lr{lr:g}"
        o.summary[f"{key}_final_f_median"] = float(np.median(f[:, -1]))
        o.summary[f"{key}_fraction_in_basin"] = float(np.mean(f[:, -1] < BASIN))
    return o.finish(seeds=n_seeds, steps=STEPS, basin_threshold=BASIN)
