"""Theorem 4.1: the best EMA weight against the step size, 1 - beta* ~ eta^(2/3).

Runs :func:`saddlescape.studies.beta_exponent_study` (a second moment tracked along a moving
sequence, the library's EMA estimator in the loop) and plots the measured best 1 - beta against
eta with the fitted exponent and the predicted 2/3.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from saddlescape.experiments.common import Output, Progress, pyplot
from saddlescape.studies import PREDICTED_SLOPE, beta_exponent_study

FULL = (np.logspace(-5.0, -2.0, 7), np.geomspace(1.5e-4, 0.2, 40), 4000)
QUICK = (np.logspace(-4.5, -2.5, 5), np.geomspace(3e-4, 0.1, 16), 400)


def run(out: Path, quick: bool = False, seeds: int | None = None, progress: bool = True) -> dict[str, Any]:
    o = Output.create(out, "estimation")
    etas, grid, replicas = QUICK if quick else FULL
    if seeds is not None:
        replicas = seeds  # the study's independent noise replicas play the seeds' part
    bar = Progress("estimation", 1, progress)
    res = beta_exponent_study(etas, grid, replicas, seed=0)
    bar.advance()
    bar.close()
    o.write_csv(["eta", "best_one_minus_beta", "noise_free_best", "leading_order"],
                zip(res.etas, res.best_one_minus_beta, res.expected_best_one_minus_beta,
                    res.predicted_one_minus_beta))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    x = np.geomspace(res.etas.min(), res.etas.max(), 50)
    ax.plot(res.etas, res.best_one_minus_beta, "o", label="measured best 1 - beta")
    ax.plot(x, np.exp(res.intercept) * x**res.slope, "-",
            label=f"fit: slope {res.slope:.3f} +- {res.slope_stderr:.3f}")
    lead = res.predicted_one_minus_beta[0] * (x / res.etas[0]) ** PREDICTED_SLOPE
    ax.plot(x, lead, "--", label="Theorem 4.1: slope 2/3")
    ax.set(xscale="log", yscale="log", xlabel="eta (step length)", ylabel="1 - beta_best",
           title=f"best EMA weight against the step size ({replicas} replicas)")
    ax.legend(fontsize=8)
    o.save_figure(fig)
    return o.finish(fitted_exponent=res.slope, exponent_stderr=res.slope_stderr,
                    predicted_exponent=PREDICTED_SLOPE, noise_free_exponent=res.expected_slope,
                    replicas=replicas)
