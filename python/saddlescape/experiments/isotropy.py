"""Sec. 3.1, eq. 3: the rescaled noise becomes isotropic near a stationary point.

On the saddle problem of Sec. 6 (h = (1, -0.1), noise covariance diag(1, 0.01), components with
exactly zero mean and exactly that covariance) the iterate approaches two stationary points
along the direction (1, 1) / sqrt(2): the strict saddle at 0, and the local minimum at
(0, 0.01^(1/8)) where F's gradient h_2 x_2 + 10 x_2^9 vanishes. At each point x the covariance
of the rescaled noise A (g - grad f(x)) is measured from ``n`` stochastic gradients (the median
and a 10-90% band over the seeds) and evaluated in closed form, A (E[g g^T] - grad f grad f^T) A
(eq. 3), for

* RMSProp's idealized preconditioner A = E[g g^T]^(-1/2) (eps = 0), where the closed form is
  I - A grad f grad f^T A and ||Cov - I|| = s / (1 + s), s = grad f^T Cov(g)^(-1) grad f,
  falls to 0 as x approaches the stationary point;
* SGD's A = I, where Cov = diag(1, 0.01) everywhere and ||Cov - I|| = 0.99.

The sampled distance cannot fall below the Monte-Carlo error of the estimate, about
2 sqrt(1/n) here; the CSV records the error ||sampled - closed form|| next to it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from saddlescape import problems
from saddlescape.diagnostics import rescaled_noise_covariance
from saddlescape.experiments.common import Output, Progress, bands, pyplot

__all__ = ["run"]

#: The local minimum of the Sec. 6 problem: x_2^8 = 0.1 / 10.
MINIMUM = np.array([0.0, 0.01 ** 0.125])
TARGETS: dict[str, np.ndarray] = {"saddle": np.zeros(2), "minimum": MINIMUM}
DIRECTION = np.array([1.0, 1.0]) / np.sqrt(2.0)

HEADER = ["target", "distance", "grad_norm",
          "adaptive_closed", "adaptive_sampled", "adaptive_sampled_q10", "adaptive_sampled_q90",
          "adaptive_sampling_error",
          "sgd_closed", "sgd_sampled", "sgd_sampled_q10", "sgd_sampled_q90"]


def run(out: Path, quick: bool = False, seeds: int | None = None,
        progress: bool = True) -> dict[str, Any]:
    """Measures ||Cov(A (g - grad f)) - I||_2 along two approaches to stationary points.

    Args:
        out: the output folder; the files go to ``out/isotropy/``.
        quick: 5 distances, 20000 gradients per point and 2 seeds (well under a second) instead
            of 25 distances, 400000 gradients and 8 seeds.
        seeds: independent Monte-Carlo repetitions per point (None: 2 quick, 8 full).
        progress: show a progress bar on stderr.

    Returns:
        The summary (also in ``summary.txt``): for each target, the distances ||Cov - I|| at the
        closest and the farthest point, closed form and sampled (median over seeds), for the
        adaptive preconditioner and for SGD, and the largest Monte-Carlo error.

    Raises:
        ValueError: seeds is not an integer >= 1.
    """
    if seeds is not None and (isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1):
        raise ValueError(f"seeds must be an integer >= 1, got {seeds!r}")
    n_seeds = seeds if seeds is not None else (2 if quick else 8)
    n = 20_000 if quick else 400_000
    distances = np.geomspace(0.5, 1e-4, 5 if quick else 25)
    problem = problems.SaddleProblem()

    output = Output.create(out, "isotropy")
    bar = Progress("isotropy", len(TARGETS) * distances.size * n_seeds, enabled=progress)
    rows: list[list[Any]] = []
    curves: dict[str, dict[str, np.ndarray]] = {}
    worst_error = 0.0
    for t, (target, center) in enumerate(TARGETS.items()):
        k_count = distances.size
        closed = {"adaptive": np.empty(k_count), "sgd": np.empty(k_count)}
        sampled = {"adaptive": np.empty((n_seeds, k_count)), "sgd": np.empty((n_seeds, k_count))}
        error = np.empty((n_seeds, k_count))
        grad_norm = np.empty(k_count)
        for k, r in enumerate(distances):
            x = center + r * DIRECTION
            grad_norm[k] = float(np.linalg.norm(problem.gradient(x)))
            for s in range(n_seeds):
                seed = 1_000_000 * s + 1000 * t + k
                for name, A in (("adaptive", "adaptive"), ("sgd", None)):
                    res = rescaled_noise_covariance(problem, x, A, eps=0.0, n=n, seed=seed)
                    assert res.closed_form is not None and res.closed_form_distance is not None
                    closed[name][k] = res.closed_form_distance
                    sampled[name][s, k] = res.sampled_distance
                    if name == "adaptive":
                        error[s, k] = float(np.linalg.norm(res.sampled - res.closed_form, 2))
                bar.advance()
        worst_error = max(worst_error, float(error.max()))
        med_a, lo_a, hi_a = bands(sampled["adaptive"])
        med_s, lo_s, hi_s = bands(sampled["sgd"])
        med_e = np.median(error, axis=0)
        curves[target] = {"closed_adaptive": closed["adaptive"], "closed_sgd": closed["sgd"],
                          "med_a": med_a, "lo_a": lo_a, "hi_a": hi_a,
                          "med_s": med_s, "lo_s": lo_s, "hi_s": hi_s}
        for k, r in enumerate(distances):
            rows.append([target, float(r), grad_norm[k],
                         closed["adaptive"][k], med_a[k], lo_a[k], hi_a[k], med_e[k],
                         closed["sgd"][k], med_s[k], lo_s[k], hi_s[k]])
        c = curves[target]
        output.summary.update({
            f"{target}_closest_distance": float(distances[-1]),
            f"{target}_adaptive_closed_at_closest": float(c["closed_adaptive"][-1]),
            f"{target}_adaptive_sampled_at_closest": float(c["med_a"][-1]),
            f"{target}_sgd_closed_at_closest": float(c["closed_sgd"][-1]),
            f"{target}_sgd_sampled_at_closest": float(c["med_s"][-1]),
            f"{target}_adaptive_closed_at_farthest": float(c["closed_adaptive"][0]),
            f"{target}_adaptive_sampled_at_farthest": float(c["med_a"][0]),
        })
    bar.close()
    output.write_csv(HEADER, rows)

    plt = pyplot()
    fig, axes = plt.subplots(1, len(TARGETS), figsize=(11, 4.2), sharey=True)
    for ax, (target, c) in zip(axes, curves.items()):
        ax.plot(distances, c["closed_adaptive"], "-", color="C1",
                label="RMSProp A = E[gg^T]^(-1/2): closed form")
        ax.fill_between(distances, c["lo_a"], c["hi_a"], color="C1", alpha=0.25, linewidth=0)
        ax.plot(distances, c["med_a"], "o", color="C1", ms=4,
                label=f"RMSProp: sampled (n = {n}, median of {n_seeds})")
        ax.plot(distances, c["closed_sgd"], "--", color="C0", label="SGD A = I: closed form")
        ax.fill_between(distances, c["lo_s"], c["hi_s"], color="C0", alpha=0.25, linewidth=0)
        ax.plot(distances, c["med_s"], "s", color="C0", ms=4, label="SGD: sampled")
        ax.axhline(2.0 / np.sqrt(n), color="0.5", lw=0.8, ls=":",
                   label="Monte-Carlo floor ~ 2 / sqrt(n)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.invert_xaxis()
        ax.set_xlabel(f"||x - x*|| (x* = the {target})")
        ax.set_title(f"approaching the {target} of the Sec. 6 problem")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("||Cov(A (g - grad f)) - I||_2")
    axes[0].legend(fontsize=7, loc="lower left")
    output.save_figure(fig)

    return output.finish(n=n, seeds=n_seeds, points_per_target=int(distances.size),
                         max_sampling_error=worst_error)
