"""Sec. 3.2: the counterexample of Reddi et al., where EMA RMSProp converges to the wrong end.

F(x) = zeta x on [-1, 1] (:class:`saddlescape.problems.ReddiCounterexample`): the stochastic
gradient is C with probability p = (1 + zeta) / (C + 1) and -1 otherwise, so E[g] = zeta > 0 and
the minimum is x = -1, F = -zeta. With a large C the rare large gradient dominates a short EMA of
g^2: diagonal RMSProp with beta = 0.9 takes small steps right after it and large steps in
between, and drifts to x = +1. The idealized preconditioner (E[g^2] + eps)^(-1/2) (a constant
here) and SGD converge to -1. All with lr_t = 0.1 / sqrt(t + 1), from x0 = 0, projected onto
[-1, 1]; the suboptimality gap F(x_T) + zeta against C.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

import saddlescape as ss
from saddlescape.experiments.common import Output, Progress, bands, pyplot

ZETA = 0.5
LR0 = 0.1


def methods(p: Any) -> dict[str, Any]:
    lr = ss.schedules.inverse_sqrt(LR0)
    return {
        "RMSProp beta=0.9": lambda: ss.RMSProp(1, lr, beta=0.9, eps=1e-8, structure="diag"),
        "RMSProp beta=0.99": lambda: ss.RMSProp(1, lr, beta=0.99, eps=1e-8, structure="diag"),
        "idealized": lambda: ss.PreconditionedSGD(lr, p, eps=1e-8),
        "SGD": lambda: ss.SGD(lr),
    }


def run(out: Path, quick: bool = False, seeds: int | None = None, progress: bool = True) -> dict[str, Any]:
    o = Output.create(out, "counterexample")
    cs = (2.0, 20.0) if quick else (2.0, 5.0, 10.0, 20.0, 50.0, 100.0)
    steps = 5000 if quick else 20000
    n_seeds = seeds or (4 if quick else 32)
    bar = Progress("counterexample", len(cs) * 4, progress)
    gaps: dict[str, list[np.ndarray]] = {}
    rows = []
    for C in cs:
        p = ss.problems.ReddiCounterexample(C, ZETA)
        for name, make in methods(p).items():
            r = ss.run_many(p, make, [0.0], steps, seeds=n_seeds, record_every=steps)
            gap = r.f[:, -1] + ZETA
            gaps.setdefault(name, []).append(gap)
            med, lo, hi = (float(np.quantile(gap, q)) for q in (0.5, 0.1, 0.9))
            rows.append((name, C, med, lo, hi, float(np.median(r.x_final[:, 0]))))
            key = name.replace(" ", "_").replace("=", "")
            o.summary[f"C{C:g}_{key}_final_F"] = med - ZETA
            bar.advance()
    bar.close()
    o.write_csv(["method", "C", "gap_median", "gap_q10", "gap_q90", "x_final_median"], rows)

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (name, g) in enumerate(gaps.items()):
        arr = np.stack(g, axis=1)  # seeds x C
        med, lo, hi = bands(arr)
        ax.plot(cs, med, "o-", color=f"C{i}", label=name)
        ax.fill_between(cs, lo, hi, color=f"C{i}", alpha=0.2)
    ax.axhline(2 * ZETA, color="k", lw=0.6, ls=":")
    ax.set(xscale="log", xlabel="C", ylabel="F(x_T) - F* (2 zeta: the wrong end)",
           title=f"counterexample, zeta = {ZETA}, {steps} steps, {n_seeds} seeds")
    ax.legend(fontsize=8)
    o.save_figure(fig)
    return o.finish(zeta=ZETA, steps=steps, seeds=n_seeds)
