"""Escape times from the saddle of the Sec. 6 problem, for SGD and RMSProp.

The paper predicts that the adaptive method escapes faster when the gradient noise in the
escape direction is small: its preconditioner rescales that noise up to unit size. Here the
noise covariance is diag(1, s) with s in {1, 0.1, 0.01, 0.001} (s is the noise variance along
the escape direction e_2, where the curvature is -0.1), x0 = 0, and the escape time of a run is
the first recorded step with |x_2| >= 0.3 (the minima sit at |x_2| = 0.56); runs that never get
there are censored at the horizon. SGD and diagonal RMSProp (beta = 1 - lr^(2/3)) run with the
same step sizes; the summary gives, for each noise level and step size, the median escape time
of each and their ratio, and the fraction of runs that escaped. A median that is censored (half
the runs or more never escaped) is a lower bound; the summary says so (``*_censored``) and the
figure draws it hollow.

A control separates the two things the preconditioner does near the saddle. Along the escape
direction the diagonal estimate tends to the noise variance s, so RMSProp moves there like SGD
with the step lr / sqrt(s): a larger step, and noise rescaled to unit variance. "SGD lr/sqrt(s)"
is SGD with that step in every direction; when it escapes about as fast as RMSProp, the gain is
the larger effective step in the escape direction, which the preconditioner finds by itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

import saddlescape as ss
from saddlescape.experiments.common import Output, Progress, pyplot

THRESHOLD = 0.3


def escape_times(x: np.ndarray, t: np.ndarray, horizon: int) -> np.ndarray:
    """The first recorded step with |x_2| >= THRESHOLD per seed (x: seeds x records x 2), or
    horizon + 1 where there is none (censored)."""
    hit = np.abs(x[:, :, 1]) >= THRESHOLD
    first = np.where(hit.any(axis=1), hit.argmax(axis=1), -1)
    return np.where(first >= 0, t[np.maximum(first, 0)], horizon + 1)


def run(out: Path, quick: bool = False, seeds: int | None = None, progress: bool = True) -> dict[str, Any]:
    o = Output.create(out, "escape-time")
    noises = (1.0, 0.01) if quick else (1.0, 0.1, 0.01, 0.001)
    lrs = (0.003,) if quick else (0.01, 0.003, 0.001)
    steps = 20_000 if quick else 50_000
    n_seeds = seeds or (8 if quick else 64)
    every = 10
    bar = Progress("escape-time", len(noises) * len(lrs) * 3, progress)
    rows, times, diverged = [], {}, {}
    for s in noises:
        p = ss.problems.SaddleProblem(noise_cov=(1.0, s))
        for lr in lrs:
            makers = {"SGD": lambda lr=lr: ss.SGD(lr),
                      "RMSProp": lambda lr=lr: ss.RMSProp(2, lr, beta=ss.beta_from_lr(lr), eps=1e-8,
                                                           structure="diag"),
                      "SGD lr/sqrt(s)": lambda lr=lr, s=s: ss.SGD(lr / np.sqrt(s))}
            for name, make in makers.items():
                # The control's step lr / sqrt(s) can be too large for the confining x^10 term;
                # its runs may diverge, and a setting with any diverged run is left out.
                control = name == "SGD lr/sqrt(s)"
                r = ss.run_many(p, make, np.zeros(2), steps, seeds=n_seeds, record_every=every,
                                on_error="return" if control else "raise")
                diverged[(name, s, lr)] = float(np.mean(np.array(r.status) != "completed"))
                et = escape_times(r.x, r.t, steps).astype(float)
                if diverged[(name, s, lr)] > 0:
                    et[:] = np.nan
                times[(name, s, lr)] = et
                escaped = et <= steps
                rows += [(name, s, lr, int(seed), e if np.isnan(e) else int(e), bool(k))
                         for seed, e, k in zip(r.seeds, et, escaped)]
                bar.advance()
    bar.close()
    o.write_csv(["method", "escape_noise_variance", "lr", "seed", "escape_step", "escaped"], rows)

    plt = pyplot()
    fig, axes = plt.subplots(1, len(lrs), figsize=(5 * len(lrs), 4), squeeze=False)
    for ax, lr in zip(axes[0], lrs):
        for i, name in enumerate(("SGD", "RMSProp", "SGD lr/sqrt(s)")):
            med = np.array([np.median(times[(name, s, lr)]) for s in noises])
            q10 = [np.quantile(times[(name, s, lr)], 0.1) for s in noises]
            q90 = [np.quantile(times[(name, s, lr)], 0.9) for s in noises]
            style = "--" if name == "SGD lr/sqrt(s)" else "-"
            ax.plot(noises, med, style, color=f"C{i}", label=name)
            ax.fill_between(noises, q10, q90, color=f"C{i}", alpha=0.15)
            censored = med > steps
            ax.plot(np.array(noises)[~censored], med[~censored], "o", color=f"C{i}")
            ax.plot(np.array(noises)[censored], med[censored], "o", mfc="none", color=f"C{i}",
                    label="censored median (a lower bound)" if censored.any() else None)
        ax.axhline(steps, color="k", lw=0.6, ls=":")
        ax.set(xscale="log", yscale="log", xlabel="noise variance along the escape direction",
               ylabel="escape step (median, 10-90%)", title=f"lr = {lr:g} ({n_seeds} seeds)")
        ax.legend(fontsize=8)
    o.save_figure(fig)

    for s in noises:
        for lr in lrs:
            sgd, rms, ctl = (np.median(times[(n, s, lr)])
                             for n in ("SGD", "RMSProp", "SGD lr/sqrt(s)"))
            key = f"noise{s:g}_lr{lr:g}"
            o.summary[f"{key}_sgd_median_escape"] = float(sgd)
            o.summary[f"{key}_rmsprop_median_escape"] = float(rms)
            o.summary[f"{key}_sgd_scaled_median_escape"] = float(ctl)  # NaN: it diverged
            o.summary[f"{key}_sgd_scaled_diverged"] = diverged[("SGD lr/sqrt(s)", s, lr)]
            o.summary[f"{key}_sgd_over_rmsprop"] = float(sgd / rms)
            o.summary[f"{key}_sgd_scaled_over_rmsprop"] = float(ctl / rms)
            o.summary[f"{key}_sgd_escaped"] = float(np.mean(times[("SGD", s, lr)] <= steps))
            o.summary[f"{key}_rmsprop_escaped"] = float(np.mean(times[("RMSProp", s, lr)] <= steps))
            # a censored median is only a lower bound (and so is the ratio built on it)
            o.summary[f"{key}_sgd_median_censored"] = bool(sgd > steps)
    return o.finish(horizon=steps, threshold=THRESHOLD, seeds=n_seeds,
                    censored_value=steps + 1)
