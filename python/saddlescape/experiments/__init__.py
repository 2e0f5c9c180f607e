"""Reproductions of the paper's claims: ``python -m saddlescape.experiments NAME --out DIR``.

Each experiment writes a PNG figure, a CSV of the plotted data and a short text summary into
``DIR/NAME/`` and returns the summary. ``--quick`` runs a small instance (for tests and a first
look). ``--seeds N`` sets the independent repetitions: runs per setting for saddle,
beta-schedule, counterexample and escape-time; Monte-Carlo repetitions (of 400000 gradients
each) for isotropy; noise replicas of the EMA study for estimation (default 4000, at least 2);
runs per setting for epsilon and rmsprop-vs-sgd; constants has no randomness and ignores it.

Experiments: see :data:`EXPERIMENTS`. The plots need matplotlib
(``pip install 'saddlescape[experiments]'``).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

#: Experiment name -> (module, one-line description).
EXPERIMENTS: dict[str, tuple[str, str]] = {
    "saddle": ("saddle", "Fig. 1: SGD against diagonal RMSProp from the saddle of the Sec. 6 problem"),
    "beta-schedule": ("beta_schedule",
                      "Fig. 2: logistic regression, constant beta against beta_t = 1 - C lr_t^(2/3)"),
    "counterexample": ("counterexample",
                       "Sec. 3.2: EMA RMSProp against the idealized preconditioner and SGD"),
    "isotropy": ("isotropy", "Sec. 3.1: covariance of the rescaled noise near a stationary point"),
    "estimation": ("estimation", "Thm. 4.1: the best beta against the step size"),
    "escape-time": ("escape_time", "escape times of SGD and RMSProp from the saddle"),
    "constants": ("constants", "Def. 4.2: the preconditioner constants against Props. 4.3/4.4"),
    "epsilon": ("epsilon", "Sec. 5.1: bounds (10), (11) against eps, beside RMSProp's runs"),
    "rmsprop-vs-sgd": ("rmsprop_vs_sgd",
                       "Sec. 5.2: the bounds (12)/(13) against measured escape-time ratios"),
    "train": ("train", "an MLP and a CNN on digits: saddlescape.torch against torch.optim"),
}

__all__ = ["EXPERIMENTS", "run"]


def run(name: str, out: str | Path, quick: bool = False, seeds: int | None = None,
        data: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Runs one experiment and returns its summary (also written to OUT/NAME/summary.txt).

    Raises:
        ValueError: an unknown name, seeds < 1, or data given to an experiment without data.
    """
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
    if seeds is not None and (isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1):
        raise ValueError(f"seeds must be an integer >= 1, got {seeds!r}")
    if name == "estimation" and seeds is not None and seeds < 2:
        raise ValueError(f"estimation: --seeds sets its noise replicas (default 4000) and must be "
                         f">= 2, got {seeds}")
    if data is not None and name != "beta-schedule":
        raise ValueError(f"--data is for beta-schedule only, not {name}")
    from saddlescape.experiments.common import pyplot

    pyplot()  # fail before the runs, not after, if matplotlib is missing
    module = importlib.import_module(f"saddlescape.experiments.{EXPERIMENTS[name][0]}")
    kwargs: dict[str, Any] = {"quick": quick, "seeds": seeds, "progress": progress}
    if name == "beta-schedule":
        kwargs["data"] = data
    return module.run(Path(out), **kwargs)
