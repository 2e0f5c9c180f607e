"""Theorem 4.1's choice of beta: the EMA weight that best tracks a moving second moment.

Points move along a line by eta per step; the EMA (saddlescape.EMAEstimator, one independent
replica per coordinate of a diagonal estimate) tracks G(x) = 2 + tanh(x) from noisy samples
with E[Y_t] = G(x_t). For each eta the script sweeps 1 - beta, finds the beta with the
smallest mean squared error against G(x_T), and fits log(1 - beta_best) against log(eta).
Theorem 4.1 predicts the slope 2/3 (beta = 1 - C eta^(2/3)). The instance is described in
saddlescape.studies.beta_exponent_study.

    python bench/python/study_beta_exponent.py                  # the full study, ~1 minute
    python bench/python/study_beta_exponent.py --quick          # the instance of the test
    python bench/python/study_beta_exponent.py --out /tmp/fig --seed 3

Writes beta_exponent.csv (one row per eta), beta_exponent_curves.csv (every eta and beta) and,
where matplotlib is installed, beta_exponent.png into --out (default: bench/figures).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from saddlescape.studies import PREDICTED_SLOPE, BetaExponentStudy, beta_exponent_study

# (etas, one_minus_betas, replicas). The grid reaches about 3x below the smallest and 4x above
# the largest leading-order optimum 1.08 eta^(2/3), so that every minimum is bracketed.
FULL = (np.logspace(-5.0, -2.0, 7), np.geomspace(1.5e-4, 0.2, 40), 4000)
# The instance of tests/python/test_studies.py.
QUICK = (np.logspace(-4.5, -2.5, 5), np.geomspace(3e-4, 0.1, 16), 400)


def print_report(res: BetaExponentStudy, seconds: float) -> None:
    print(f"{'eta':>10} {'best 1-beta':>12} {'noise-free':>11} {'leading':>10} {'best/lead':>9} "
          f"{'error at best':>14} {'rmse':>8}")
    for i, eta in enumerate(res.etas):
        best, lead = res.best_one_minus_beta[i], res.predicted_one_minus_beta[i]
        print(f"{eta:10.3e} {best:12.4e} {res.expected_best_one_minus_beta[i]:11.4e} {lead:10.4e} "
              f"{best / lead:9.3f} {res.best_error[i]:14.4e} {np.sqrt(res.best_error[i]):8.4f}")
    print(f"slope of log(1 - beta_best) vs log(eta): {res.slope:.4f} +- {res.slope_stderr:.4f} "
          f"(standard error); predicted {PREDICTED_SLOPE:.4f}")
    print(f"noise-free slope (closed-form expected error, same grid): {res.expected_slope:.4f}")
    print(f"slope of log(error at best) vs log(eta): {res.error_slope:.4f} (predicted 2/3; "
          f"rmse ~ eta^{res.error_slope / 2:.3f}, predicted eta^(1/3))")
    z = np.abs(res.errors - res.expected_errors) / res.error_stderr
    print(f"measured vs closed-form error: max |z| = {z.max():.2f} over {z.size} (eta, beta) pairs")
    print(f"{res.replicas} replicas, {res.one_minus_betas.size} betas, up to {res.steps.max()} "
          f"steps per EMA, seed {res.seed}, {seconds:.1f} s")


def write_csv(res: BetaExponentStudy, out: Path) -> list[Path]:
    fit = (f"# slope={res.slope:.6g} slope_stderr={res.slope_stderr:.6g} "
           f"expected_slope={res.expected_slope:.6g} predicted_slope={PREDICTED_SLOPE:.6g} "
           f"error_slope={res.error_slope:.6g} replicas={res.replicas} seed={res.seed}\n")
    summary, curves = out / "beta_exponent.csv", out / "beta_exponent_curves.csv"
    with summary.open("w", newline="") as f:
        f.write(fit)
        w = csv.writer(f)
        w.writerow(["eta", "best_one_minus_beta", "expected_best_one_minus_beta",
                    "predicted_one_minus_beta", "error_at_best"])
        for i, eta in enumerate(res.etas):
            row = (eta, res.best_one_minus_beta[i], res.expected_best_one_minus_beta[i],
                   res.predicted_one_minus_beta[i], res.best_error[i])
            w.writerow([f"{v:.8g}" for v in row])
    with curves.open("w", newline="") as f:
        f.write(fit)
        w = csv.writer(f)
        w.writerow(["eta", "one_minus_beta", "steps", "error", "error_stderr", "expected_error"])
        for i, eta in enumerate(res.etas):
            for j, a in enumerate(res.one_minus_betas):
                w.writerow([f"{eta:.8g}", f"{a:.8g}", int(res.steps[j]), f"{res.errors[i, j]:.8g}",
                            f"{res.error_stderr[i, j]:.8g}", f"{res.expected_errors[i, j]:.8g}"])
    return [summary, curves]


def plot(res: BetaExponentStudy, path: Path) -> bool:
    """Writes the figure; False (and nothing written) where matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5), constrained_layout=True)
    a = res.one_minus_betas
    colors = plt.cm.viridis(np.linspace(0.0, 0.9, res.etas.size))
    for i, (eta, c) in enumerate(zip(res.etas, colors)):
        left.errorbar(a, res.errors[i], yerr=res.error_stderr[i], fmt="o", ms=3, color=c,
                      label=f"eta = {eta:.1e}")
        left.plot(a, res.expected_errors[i], "-", lw=1, color=c, alpha=0.6)
        best = res.best_one_minus_beta[i]
        at = np.exp(np.interp(np.log(best), np.log(a), np.log(res.errors[i])))
        left.plot([best], [at], "*", ms=14, color=c, mec="k")
    left.set(xscale="log", yscale="log", xlabel="1 - beta", ylabel="E[(G_hat_T - G(x_T))^2]",
             title="error vs 1 - beta (dots: measured, lines: closed form, stars: minimum)")
    left.legend(fontsize=8)

    x = np.geomspace(res.etas.min(), res.etas.max(), 50)
    right.plot(res.etas, res.best_one_minus_beta, "o", color="C0", label="measured best 1 - beta")
    right.plot(res.etas, res.expected_best_one_minus_beta, "s", mfc="none", color="C2",
               label=f"noise-free best (slope {res.expected_slope:.3f})")
    right.plot(x, np.exp(res.intercept) * x**res.slope, "-", color="C0",
               label=f"fit: slope {res.slope:.3f} +- {res.slope_stderr:.3f}")
    lead = res.predicted_one_minus_beta[0] * (x / res.etas[0]) ** PREDICTED_SLOPE
    right.plot(x, lead, "--", color="C3", label="Theorem 4.1: (4 L^2 eta^2 / Var Y)^(1/3), slope 2/3")
    right.set(xscale="log", yscale="log", xlabel="eta", ylabel="1 - beta_best",
              title="best EMA weight against the step length")
    right.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "figures",
                        help="folder for the PNG and CSV files (created; default: bench/figures)")
    parser.add_argument("--quick", action="store_true", help="the small instance of the test (about 1 s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    args = parser.parse_args(argv)

    etas, grid, replicas = QUICK if args.quick else FULL
    print(f"python {' '.join(sys.argv)}")
    print(f"{platform.node()}: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"python {platform.python_version()}, numpy {np.__version__}")
    start = time.perf_counter()
    res = beta_exponent_study(etas, grid, replicas, args.seed)
    print_report(res, time.perf_counter() - start)

    args.out.mkdir(parents=True, exist_ok=True)
    for path in write_csv(res, args.out):
        print(f"wrote {path}")
    png = args.out / "beta_exponent.png"
    print(f"wrote {png}" if plot(res, png) else "matplotlib is not installed: no figure")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
