"""Fig. 2: softmax logistic regression, constant beta against beta_t = 1 - C lr_t^(2/3).

Diagonal RMSProp (Algorithm 2: G_t = beta_t G_(t-1) + (1 - beta_t) g_t^2 from G_0 = 0, step
lr_t (G_t + eps)^(-1/2) g_t, no bias correction) with the paper's step size
lr_t = 0.001 / sqrt(t) (t counted from 1; ``schedules.inverse_sqrt(0.001)``), eps = 1e-8 and
mini-batches of 100, from x = 0 (loss log 10). Constant beta in {0.7, 0.9, 0.97, 0.99} against the
schedule beta_t = 1 - C lr_t^(2/3) of Theorem 4.1 for C in {0.1, 0.3, 1}. Records the exact
training loss over all samples once per epoch (round(n / 100) steps); the median over seeds with
a 10-90% band.

Data: scikit-learn's bundled handwritten digits (1797 x 64, default), or MNIST's training split
from a folder of IDX files (``data=FOLDER``, ``--data FOLDER``; see
:func:`saddlescape.datasets.mnist`).

Reading the result: the schedule's beta_t starts at 1 - C 0.01 and rises towards 1, so with
G_0 = 0 and no bias correction G_t is still warming up for many steps and under-estimates
E[g^2]: its total weight on gradients so far, 1 - prod_s beta_s, is reported as ``ema_mass_*``.
An under-estimated G means steps larger than lr_t / sqrt(E[g^2]). To separate this effective
step size from the quality of the estimate, the experiment repeats every setting with the
bias-corrected estimate G_t / (1 - prod_s beta_s) (``ss.Adam`` with beta1 = 0 and form
"inv_sqrt": the same method with the warm-up removed), its own panel and ``debiased_*`` summary
entries. On the digits (500 epochs, 3 seeds) the schedules' lead over the constants comes from
the warm-up: the paper's RMSProp ends at loss 0.61 (C = 0.1) against 1.23 (beta = 0.99, the best
constant), while with the bias correction all seven settings end between 1.37 and 1.41, the
constants slightly ahead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

import saddlescape as ss
from saddlescape import datasets, schedules
from saddlescape.optimizers import Optimizer
from saddlescape.experiments.common import Output, Progress, bands, pyplot

NAME = "beta-schedule"
#: The paper's step size lr_t = LR0 / sqrt(t), eps and batch size.
LR0 = 0.001
EPS = 1e-8
BATCH = 100
CONSTANT_BETAS = (0.7, 0.9, 0.97, 0.99)
SCHEDULE_CS = (0.1, 0.3, 1.0)
#: Epochs per data set: (full run, quick run).
EPOCHS = {"digits": (500, 20), "mnist": (10, 1)}
DEFAULT_SEEDS = 3


@dataclass(frozen=True)
class Setting:
    """One curve: a constant beta or the schedule with constant C."""

    kind: str  # "constant" or "schedule"
    value: float

    @property
    def label(self) -> str:
        return f"beta={self.value:g}" if self.kind == "constant" else f"C={self.value:g}"

    @property
    def key(self) -> str:
        return f"beta_{self.value:g}" if self.kind == "constant" else f"C_{self.value:g}"

    def beta(self) -> float | schedules.Schedule:
        if self.kind == "constant":
            return self.value
        return schedules.beta_from_lr_schedule(schedules.inverse_sqrt(LR0), C=self.value)

    def optimizer(self, dim: int, debiased: bool = False) -> Callable[[], Optimizer]:
        """A factory of fresh optimizers: RMSProp (the paper's), or with debiased=True the same
        with G_t / (1 - prod beta_s) (Adam without momentum, form "inv_sqrt")."""
        if debiased:
            return lambda: ss.Adam(dim, schedules.inverse_sqrt(LR0), beta1=0.0, beta2=self.beta(),
                                   eps=EPS, structure="diag", form="inv_sqrt")
        return lambda: ss.RMSProp(dim, schedules.inverse_sqrt(LR0), self.beta(), eps=EPS,
                                  structure="diag")

    def betas(self, steps: int) -> np.ndarray:
        """beta_t for t = 0, ..., steps - 1 (the values the optimizer uses)."""
        if self.kind == "constant":
            return np.full(steps, self.value)
        lr = LR0 / np.sqrt(np.arange(steps) + 1.0)
        return 1.0 - self.value * lr ** (2.0 / 3.0)


SETTINGS = tuple([Setting("constant", b) for b in CONSTANT_BETAS]
                 + [Setting("schedule", c) for c in SCHEDULE_CS])


def _load(data: str | None) -> tuple[str, np.ndarray, np.ndarray]:
    if data is None:
        X, y = datasets.digits()
        return "digits", X, y
    try:
        X, y = datasets.mnist(data, split="train")
    except FileNotFoundError as e:
        raise ValueError(f"--data {data}: {e}") from e
    if X.shape[0] == 0:
        raise ValueError(f"--data {data}: the MNIST files hold no images")
    return "mnist", X, y


def run(out: Path, quick: bool = False, seeds: int | None = None, progress: bool = True,
        data: str | None = None, epochs: int | None = None) -> dict[str, Any]:
    """Runs the experiment and writes OUT/beta-schedule/{beta-schedule.png, .csv, summary.txt}.

    Args:
        out: the output folder.
        quick: a small instance (1 seed; 20 epochs of digits, about 3 s, or 1 of MNIST).
        seeds: the number of seeds (default 3; 1 with quick).
        progress: show a progress bar on stderr.
        data: an MNIST folder (see :func:`saddlescape.datasets.mnist`); None for the digits.
        epochs: override the number of epochs (default 500 for digits, 10 for MNIST).

    Returns:
        The summary: the final training loss (median over seeds) of each setting
        (``final_loss_beta_0.7``, ..., ``final_loss_C_1``), the EMA's total weight
        1 - prod beta_t at the end for the schedules (``ema_mass_C_*``), the best setting overall,
        among constants and among schedules, and the best schedule's loss minus the best
        constant's (negative: the schedule wins); the same for the debiased control, prefixed
        ``debiased_``. The CSV holds every curve (column ``estimate``: "ema" for the paper's
        RMSProp, "debiased" for the control).

    Raises:
        ValueError: seeds or epochs < 1; a data folder that is missing, lacks the IDX files or
            holds malformed ones.
        ImportError: matplotlib (or, for the digits, scikit-learn) is not installed.
    """
    for name, v in (("seeds", seeds), ("epochs", epochs)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    dataset, X, y = _load(data)
    pyplot()  # fail early, before the runs, if matplotlib is missing
    n_seeds = seeds if seeds is not None else (1 if quick else DEFAULT_SEEDS)
    n_epochs = epochs if epochs is not None else EPOCHS[dataset][1 if quick else 0]
    per_epoch = max(1, round(X.shape[0] / BATCH))
    steps = n_epochs * per_epoch

    problem = ss.problems.LogisticRegression(X, y, batch_size=BATCH, classes=10)
    x0 = np.zeros(problem.dim)
    output = Output.create(out, NAME)
    variants = (False, True)  # the paper's RMSProp, then the debiased control
    bar = Progress(f"{NAME} ({dataset})", len(variants) * len(SETTINGS), progress)
    curves: dict[tuple[bool, Setting], tuple[np.ndarray, ...]] = {}
    t = np.zeros(0)
    try:
        for debiased in variants:
            for s in SETTINGS:
                r = ss.run_many(problem, s.optimizer(problem.dim, debiased), x0, steps,
                                seeds=n_seeds, record_every=per_epoch, record_x=False)
                assert r.f is not None
                t = r.t
                curves[debiased, s] = bands(r.f)
                bar.advance()
    finally:
        bar.close()
    epoch = t / per_epoch

    rows = []
    for (debiased, s), (med, lo, hi) in curves.items():
        for i in range(t.size):
            rows.append([s.label, s.kind, s.value, "debiased" if debiased else "ema", int(t[i]),
                         epoch[i], med[i], lo[i], hi[i]])
    output.write_csv(["setting", "kind", "value", "estimate", "step", "epoch", "loss_median",
                      "loss_q10", "loss_q90"], rows)
    _plot(pyplot(), output, curves, epoch, steps, per_epoch, dataset, n_seeds)

    final = {key: float(band[0][-1]) for key, band in curves.items()}
    numbers: dict[str, Any] = {
        "data": dataset if data is None else f"mnist ({data})",
        "samples": X.shape[0], "features": X.shape[1], "epochs": n_epochs,
        "steps_per_epoch": per_epoch, "steps": steps, "seeds": n_seeds, "lr0": LR0,
        "initial_loss": float(curves[False, SETTINGS[0]][0][0]),
    }
    for debiased in variants:
        pre = "debiased_" if debiased else ""
        loss = {s: final[debiased, s] for s in SETTINGS}
        numbers.update({f"{pre}final_loss_{s.key}": loss[s] for s in SETTINGS})
        if not debiased:
            numbers.update({f"ema_mass_{s.key}": float(-np.expm1(np.sum(np.log(s.betas(steps)))))
                            for s in SETTINGS if s.kind == "schedule"})
        best = min(SETTINGS, key=lambda s: loss[s])
        best_const = min((s for s in SETTINGS if s.kind == "constant"), key=lambda s: loss[s])
        best_sched = min((s for s in SETTINGS if s.kind == "schedule"), key=lambda s: loss[s])
        numbers.update({
            f"{pre}best": best.label, f"{pre}best_constant": best_const.label,
            f"{pre}best_schedule": best_sched.label,
            f"{pre}best_schedule_minus_best_constant": loss[best_sched] - loss[best_const],
        })
    return output.finish(**numbers)


def _plot(plt: Any, output: Output, curves: dict[tuple[bool, Setting], tuple[np.ndarray, ...]],
          epoch: np.ndarray, steps: int, per_epoch: int, dataset: str, n_seeds: int) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4), gridspec_kw={"width_ratios": [1.4, 1.4, 1]})
    blues = plt.get_cmap("Blues")(np.linspace(0.45, 0.95, len(CONSTANT_BETAS)))
    reds = plt.get_cmap("Reds")(np.linspace(0.5, 0.95, len(SCHEDULE_CS)))
    colors = dict(zip(SETTINGS, [*blues, *reds]))
    seeds_text = f"median of {n_seeds} seeds, 10-90% band" if n_seeds > 1 else "1 seed"
    titles = {False: f"{dataset}: diagonal RMSProp, lr_t = {LR0:g}/sqrt(t)\n({seeds_text})",
              True: "the same with debiased G_t / (1 - prod beta_s)\n(control: no warm-up)"}
    top = max(float(band[0][0]) for band in curves.values())
    bottom = min(float(np.nanmin(band[1])) for band in curves.values())
    for (debiased, s), (med, lo, hi) in curves.items():
        ax = axes[int(debiased)]
        style = "--" if s.kind == "constant" else "-"
        name = s.label if s.kind == "constant" else f"beta_t = 1 - {s.value:g} lr_t^(2/3)"
        ax.plot(epoch, med, style, color=colors[s], label=name, lw=1.6)
        if n_seeds > 1:
            ax.fill_between(epoch, lo, hi, color=colors[s], alpha=0.2, lw=0)
    for debiased in (False, True):
        ax = axes[int(debiased)]
        ax.set_ylim(bottom - 0.05 * (top - bottom), top + 0.05 * (top - bottom))
        ax.set_xlabel("epoch")
        ax.set_ylabel("training loss (all samples)")
        ax.set_title(titles[debiased], fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axb = axes[2]
    for s in SETTINGS:
        axb.plot(np.arange(1, steps + 1) / per_epoch, 1.0 - s.betas(steps),
                 "--" if s.kind == "constant" else "-", color=colors[s], lw=1.4)
    axb.set_xscale("log")
    axb.set_yscale("log")
    axb.set_xlabel("epoch")
    axb.set_ylabel("1 - beta_t")
    axb.set_title("the EMA weights", fontsize=10)
    axb.grid(alpha=0.3, which="both")
    output.save_figure(fig)
