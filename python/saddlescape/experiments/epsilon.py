"""Sec. 5.1: the damping eps of A = (G + eps I)^(-1/2), bounds (10) and (11) against runs.

Sec. 5.1 reads the first-order rate through Gamma / lambda_min(A), bounded by (10),
d lambda_min(G) / (eps + lambda_min(G)) (lambda_max(G) + eps), which falls towards
d lambda_min(G) as eps grows (large eps: SGD), and the second-order rate through
Lambda_1^4 Lambda_2^4 Gamma^4 / (lambda_-^10 nu^4) <= d^4 kappa(G)^4 (lambda_max(G) + eps) (11),
smallest at eps = 0. Here both are evaluated on the Sec. 6 saddle problem (noise covariance
diag(1, 0.01)) with lambda_min(G), lambda_max(G) over the box |x_1|, |x_2| <= 0.3 of the
``constants`` experiment, next to the constants measured on that box for the idealized
preconditioner: Gamma / lambda_- (the left side of (10) as printed), Gamma / lambda_-^2 (the
factor of Theorem 4.2's iteration count T = 2 (f(x0) - f*) L Gamma / (tau^4 lambda_-^2)) and the
second-order factor. Each curve is drawn relative to its value at eps = 0.

The runs, for eps from 0 to 1000 (lr = 0.003; 16 seeds quick, 64 full):

* idealized full-matrix RMSProp A(x) = (G(x) + eps I)^(-1/2) with the fixed lr;
* diagonal EMA RMSProp (beta = 1 - lr^(2/3)) with the fixed lr (its eps must be > 0: eps = 0
  is run as 1e-12);
* idealized RMSProp with Theorem 4.2's step eta = tau^2 lambda_- / (L Gamma), Prop. 4.4's
  lambda_- and Gamma, normalized to lr at eps = 0: eta(eps) = lr sqrt(1 + eps / lambda_max(G)).
  This is the step the bounds assume; with it, large eps is SGD with the step
  lr / sqrt(lambda_max(G)) rather than a vanishing one;
* SGD with the step lr / sqrt(eps), the large-eps limit of the fixed-lr methods (only where
  that step is at most 0.1; larger ones diverge).

Two measurements per run: the first-order time, the first step T (on the record grid, every
10 steps) at which the running mean (1/T) sum_t ||grad f(x_t)||^2 falls to tau^2 = 0.01 from
x0 = (0.5, 0) (the left side of Theorem 4.2's guarantee (5)), and the escape time from the
saddle x0 = 0 of the ``escape-time`` experiment (|x_2| >= 0.3). Runs that do not get there are
censored at the horizon; the summary gives the medians.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

import saddlescape as ss
from saddlescape import diagnostics as dg
from saddlescape.experiments.common import Output, Progress, pyplot
from saddlescape.experiments.constants import grid, measure
from saddlescape.experiments.escape_time import THRESHOLD, escape_times

LR = 0.003
S = 0.01
TAU2 = 0.01
X0_FIRST = (0.5, 0.0)
EMA_ZERO = 1e-12  # the EMA RMSProp's stand-in for eps = 0
CONTROL_MAX_STEP = 0.1
ZERO_AT = 1e-10  # where eps = 0 is drawn on the log axis
FAMILIES = ("idealized, fixed lr", "EMA diag, fixed lr", "idealized, Thm 4.2 step",
            "SGD lr/sqrt(eps)")


def first_order_times(grad_norm: np.ndarray, t: np.ndarray, tau2: float,
                      horizon: int) -> np.ndarray:
    """Per seed (grad_norm: seeds x records), the first record step T > 0 at which the mean of
    ||grad f||^2 over the records up to T is <= tau2, or horizon + 1 (censored). NaN records
    (a run that stopped) never count."""
    g2 = np.where(np.isnan(grad_norm), np.inf, grad_norm.astype(float) ** 2)
    mean = np.cumsum(g2, axis=1) / np.arange(1, g2.shape[1] + 1)
    hit = mean <= tau2
    hit[:, 0] = False  # T = 0: no steps taken yet
    first = np.where(hit.any(axis=1), hit.argmax(axis=1), -1)
    return np.where(first >= 0, t[np.maximum(first, 0)], horizon + 1)


def makers(p: Any, eps: float, lam_max: float) -> dict[str, Any]:
    out = {
        "idealized, fixed lr": lambda: ss.PreconditionedSGD(LR, p, eps=eps),
        "EMA diag, fixed lr": lambda: ss.RMSProp(2, LR, beta=ss.beta_from_lr(LR),
                                                 eps=max(eps, EMA_ZERO), structure="diag"),
        "idealized, Thm 4.2 step": lambda: ss.PreconditionedSGD(
            LR * np.sqrt(1 + eps / lam_max), p, eps=eps),
    }
    if eps > 0 and LR / np.sqrt(eps) <= CONTROL_MAX_STEP:
        out["SGD lr/sqrt(eps)"] = lambda: ss.SGD(LR / np.sqrt(eps))
    return out


def run(out: Path, quick: bool = False, seeds: int | None = None, progress: bool = True) -> dict[str, Any]:
    o = Output.create(out, "epsilon")
    epss = (0.0, 1e-4, 1e-2, 1.0, 100.0) if quick else (
        0.0, 1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0, 1000.0)
    steps_first = 10_000 if quick else 40_000
    steps_escape = 20_000 if quick else 100_000
    n_seeds = seeds or (16 if quick else 64)
    points = grid(7 if quick else 21)
    p = ss.problems.SaddleProblem(noise_cov=(1.0, S))
    bar = Progress("epsilon", len(epss), progress)
    theory: dict[float, dict[str, float]] = {}
    runs: dict[tuple[str, float], dict[str, float]] = {}
    for eps in epss:
        m = measure(S, points, eps=eps, methods=("RMSProp (full, idealized)",))
        c = m["RMSProp (full, idealized)"]
        lo, hi = c["lambda_min_G"], c["lambda_max_G"]
        G = np.diag([hi, lo])  # d = 2: the extremes over the box, as the propositions take them
        b = dg.prop_4_4_bounds(G, eps)
        meas = c["measured"]
        theory[eps] = {"bound_10": dg.bound_10(G, eps), "bound_11": dg.bound_11(G, eps),
                       "prop_gamma_over_lminus2": b.Gamma / b.lambda_minus ** 2,
                       "gamma_over_lminus": dg.first_order_term(meas),
                       "gamma_over_lminus2": meas.Gamma / meas.lambda_minus ** 2,
                       "second_order_factor": dg.second_order_factor(meas),
                       "lambda_min_G": lo, "lambda_max_G": hi}
        for name, make in makers(p, eps, hi).items():
            r = ss.run_many(p, make, np.array(X0_FIRST), steps_first, seeds=n_seeds,
                            record_every=10, record_x=False, on_error="return")
            ft = first_order_times(r.grad_norm, r.t, TAU2, steps_first)
            r2 = ss.run_many(p, make, np.zeros(2), steps_escape, seeds=n_seeds, record_every=10,
                             on_error="return")
            et = escape_times(np.nan_to_num(r2.x, nan=0.0), r2.t, steps_escape)
            stopped = np.concatenate([np.array(r.status), np.array(r2.status)]) != "completed"
            runs[(name, eps)] = {"first_order": float(np.median(ft)),
                                 "first_order_reached": float(np.mean(ft <= steps_first)),
                                 "escape": float(np.median(et)),
                                 "escaped": float(np.mean(et <= steps_escape)),
                                 "diverged": float(np.mean(stopped))}
        bar.advance()
    bar.close()

    nan = float("nan")
    empty = {"first_order": nan, "first_order_reached": nan, "escape": nan, "escaped": nan,
             "diverged": nan}
    header = ["eps", *theory[epss[0]], "family", "first_order_median", "first_order_reached",
              "escape_median", "escaped", "diverged"]
    rows = []
    for eps in epss:
        for name in FAMILIES:
            r = runs.get((name, eps), empty)
            rows.append((eps, *theory[eps].values(), name, r["first_order"],
                         r["first_order_reached"], r["escape"], r["escaped"], r["diverged"]))
    o.write_csv(header, rows)

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    x = np.array([max(e, ZERO_AT) for e in epss])
    ax = axes[0]
    curves = {"bound (10) as printed": ("bound_10", "C3", "--"),
              "Gamma / lambda_- measured (lhs of (10))": ("gamma_over_lminus", "C3", "-"),
              "Gamma / lambda_-^2 measured (Thm 4.2)": ("gamma_over_lminus2", "C1", "-"),
              "Gamma / lambda_-^2 of Prop. 4.4": ("prop_gamma_over_lminus2", "C1", "--"),
              "bound (11)": ("bound_11", "C0", "--"),
              "second-order factor measured": ("second_order_factor", "C0", "-")}
    for label, (key, colour, style) in curves.items():
        v = np.array([theory[e][key] for e in epss])
        ax.plot(x, v / v[0], style, color=colour, marker="o", ms=3, label=label)
    ax.set(xscale="log", yscale="log", xlabel=f"eps (eps = 0 drawn at {ZERO_AT:g})",
           ylabel="relative to eps = 0", title="the bounds and the measured constants")
    ax.legend(fontsize=7)
    panels = ((axes[1], "first_order", steps_first,
               f"first-order time: mean ||grad f||^2 <= {TAU2:g} from {X0_FIRST}"),
              (axes[2], "escape", steps_escape,
               f"escape time from the saddle (|x_2| >= {THRESHOLD:g})"))
    for ax, key, horizon, title in panels:
        for i, name in enumerate(FAMILIES):
            v = np.array([runs.get((name, e), empty)[key] for e in epss])
            ax.plot(x, v, "o-" if i < 3 else "x--", color=f"C{i}", label=name, ms=4)
        ax.axhline(horizon, color="k", lw=0.6, ls=":")
        ax.set(xscale="log", yscale="log", xlabel="eps", ylabel=f"median step ({n_seeds} seeds)",
               title=title)
        ax.legend(fontsize=7)
    axes[1].title.set_fontsize(9)
    o.save_figure(fig)

    for eps in epss:
        key = f"eps{eps:g}"
        o.summary[f"{key}_bound_10"] = theory[eps]["bound_10"]
        o.summary[f"{key}_bound_11"] = theory[eps]["bound_11"]
        o.summary[f"{key}_gamma_over_lminus2"] = theory[eps]["gamma_over_lminus2"]
        for name, short in zip(FAMILIES, ("ideal", "ema", "theory", "sgd")):
            r = runs.get((name, eps))
            if r is None:
                continue
            o.summary[f"{key}_{short}_first_order_median"] = r["first_order"]
            o.summary[f"{key}_{short}_escape_median"] = r["escape"]
    for name, short in zip(FAMILIES[:3], ("ideal", "ema", "theory")):
        f = [runs[(name, e)]["first_order"] for e in epss]
        es = [runs[(name, e)]["escape"] for e in epss]
        o.summary[f"{short}_best_eps_first_order"] = epss[int(np.argmin(f))]
        o.summary[f"{short}_best_eps_escape"] = epss[int(np.argmin(es))]
        o.summary[f"{short}_first_order_large_over_zero"] = f[-1] / f[0]
        o.summary[f"{short}_escape_large_over_zero"] = es[-1] / es[0]
    b10 = [theory[e]["bound_10"] for e in epss]
    b11 = [theory[e]["bound_11"] for e in epss]
    s = o.summary
    answer = (f"from eps = 0 to {epss[-1]:g}, bound (10) changes by {b10[-1] / b10[0]:.3g}x and "
              f"Theorem 4.2's Gamma / lambda_-^2 (measured) by "
              f"{theory[epss[-1]]['gamma_over_lminus2'] / theory[0.0]['gamma_over_lminus2']:.3g}x, "
              f"the first-order time with Theorem 4.2's step by "
              f"{s['theory_first_order_large_over_zero']:.3g}x (with the fixed lr by "
              f"{s['ideal_first_order_large_over_zero']:.3g}x); "
              f"bound (11) by {b11[-1] / b11[0]:.3g}x and the escape time by "
              f"{s['theory_escape_large_over_zero']:.3g}x (Theorem 4.2's step) and "
              f"{s['ideal_escape_large_over_zero']:.3g}x (fixed lr; fixed-lr ratios are lower "
              f"bounds where the large eps is censored); the escape is fastest at "
              f"eps = {s['ideal_best_eps_escape']:g} (fixed lr) and {s['theory_best_eps_escape']:g} "
              f"(Theorem 4.2's step)")
    return o.finish(answer=answer, bound_10_large_over_zero=b10[-1] / b10[0],
                    bound_11_large_over_zero=b11[-1] / b11[0],
                    lr=LR, tau2=TAU2, first_order_horizon=steps_first,
                    escape_horizon=steps_escape, seeds=n_seeds,
                    censored_value_first=steps_first + 1,
                    censored_value_escape=steps_escape + 1)
