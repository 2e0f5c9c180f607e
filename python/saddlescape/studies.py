"""Numerical studies of the paper's claims, run on the library's own estimators.

:func:`beta_exponent_study` checks Theorem 4.1's choice of the EMA weight. An EMA

    G_hat_t = beta G_hat_(t-1) + (1 - beta) Y_t,    E[Y_t] = G(x_t),

that tracks a Lipschitz G along points that move by eta M per step has two errors: a lag
(bias) of about L eta M beta / (1 - beta), and noise of variance about Var(Y) (1 - beta) / 2.
The squared error (L eta M / (1 - beta))^2 + Var(Y) (1 - beta) / 2 is smallest at

    1 - beta* = (4 L^2 M^2 eta^2 / Var(Y))^(1/3),

so log(1 - beta*) against log(eta) has slope 2/3 (the paper's beta = 1 - C eta^(2/3), see
:func:`saddlescape.schedules.beta_from_lr`), and the error there is of order eta^(2/3) (the root
mean square error of order eta^(1/3)). The study measures the best beta by simulation and fits
that slope.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from saddlescape._validation import integer, real
from saddlescape.estimators import EMAEstimator

__all__ = ["PREDICTED_SLOPE", "BetaExponentStudy", "beta_exponent_study"]

#: The slope of log(1 - beta*) against log(eta) that Theorem 4.1 predicts.
PREDICTED_SLOPE = 2.0 / 3.0

# The instance (see beta_exponent_study): G(x) = G_OFFSET + tanh(x), measured at x_T = 0.
G_OFFSET = 2.0
# Var(z^2) for z uniform on [-sqrt(3), sqrt(3)]: E z^4 - (E z^2)^2 = 9/5 - 1.
Z2_VARIANCE = 0.8
# Samples held in memory at once: about 8 MiB of float64 per chunk.
CHUNK_ELEMENTS = 1 << 20


def second_moment(x: npt.ArrayLike) -> np.ndarray:
    """The study's G(x) = 2 + tanh(x): 1-Lipschitz, within [1, 3], with G'(0) = 1 and G''(0) = 0."""
    return G_OFFSET + np.tanh(np.asarray(x, dtype=np.float64))


@dataclass(frozen=True)
class BetaExponentStudy:
    """The result of :func:`beta_exponent_study`.

    Arrays indexed [i] run over ``etas``, [j] over ``one_minus_betas``; "error" is the mean
    squared error E[(G_hat_T - G(x_T))^2].

    Attributes:
        etas: the step lengths eta, shape (n_eta,).
        one_minus_betas: the swept 1 - beta, increasing, shape (n_beta,).
        errors: [i, j] the error measured over the replicas.
        error_stderr: [i, j] its standard error (sample standard deviation / sqrt(replicas)).
        expected_errors: [i, j] the exact expected error of the same truncated EMA, computed in
            closed form (sums over the weights in numpy, independent of the estimator), the
            limit of ``errors`` for infinitely many replicas.
        best_one_minus_beta: [i] the minimiser of the measured error: the grid argmin refined
            by a least-squares parabola through log(error) against log(1 - beta) at the argmin
            and up to two neighbours on each side.
        best_error: [i] the measured error at the grid argmin.
        expected_best_one_minus_beta: [i] the same refinement applied to ``expected_errors``.
        predicted_one_minus_beta: [i] the leading-order optimum (4 G'(x_T)^2 eta^2 / Var(Y_T))^(1/3).
        slope, intercept: the least-squares fit log(best 1 - beta) = slope log(eta) + intercept.
        slope_stderr: the standard error of the slope from the fit's residuals (0 for 2 etas).
        expected_slope: the slope fitted to ``expected_best_one_minus_beta``: what the study
            would find without noise; its distance to 2/3 is the instance's non-asymptotic part.
        error_slope: the slope of log(best_error) against log(eta) (predicted 2/3).
        replicas: independent noise replicas per (eta, beta).
        steps: [j] samples fed to the EMA for 1 - beta[j], ceil(horizon / (1 - beta)).
        seed: the seed of the noise.
    """

    etas: np.ndarray
    one_minus_betas: np.ndarray
    errors: np.ndarray
    error_stderr: np.ndarray
    expected_errors: np.ndarray
    best_one_minus_beta: np.ndarray
    best_error: np.ndarray
    expected_best_one_minus_beta: np.ndarray
    predicted_one_minus_beta: np.ndarray
    slope: float
    intercept: float
    slope_stderr: float
    expected_slope: float
    error_slope: float
    replicas: int
    steps: np.ndarray
    seed: int


def _positive_vector(name: str, value: Any, min_len: int) -> np.ndarray:
    try:
        a = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a 1-D array of real numbers, got {value!r}") from None
    if a.ndim != 1 or a.size < min_len:
        raise ValueError(f"{name} must be a 1-D array of at least {min_len} values, got shape {a.shape}")
    bad = ~(np.isfinite(a) & (a > 0))
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{name} must be finite and > 0, got {float(a[i])!r} at index {i}")
    return a


def _refine_argmin(a: np.ndarray, err: np.ndarray, name: str) -> float:
    """The minimiser over 1 - beta (the grid a) of err, refined by a parabola through log(err)
    against log(a) at the grid argmin and up to two neighbours on each side.

    Raises:
        ValueError: the grid argmin is the first or last grid point (the minimum is not
            bracketed).
    """
    i = int(np.argmin(err))
    if i == 0 or i == a.size - 1:
        side = "smallest" if i == 0 else "largest"
        raise ValueError(f"the error for {name} is smallest at the {side} 1 - beta of the grid, "
                         f"{float(a[i])!r}: the minimum is not bracketed, widen one_minus_betas")
    u = np.log(a)
    lo, hi = max(0, i - 2), min(u.size, i + 3)
    du = u[lo:hi] - u[i]  # centred, so that the 3-column Vandermonde system is well conditioned
    c = np.linalg.lstsq(np.stack([np.ones_like(du), du, du * du], axis=1), np.log(err[lo:hi]), rcond=None)[0]
    if not c[2] > 0:  # a flat or concave fit has no vertex: keep the grid point
        return float(a[i])
    return math.exp(float(np.clip(u[i] - c[1] / (2 * c[2]), u[lo], u[hi - 1])))


def _line_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(slope, intercept, standard error of the slope) of the least-squares line y = s x + b."""
    xc = x - x.mean()
    sxx = float(xc @ xc)
    slope = float(xc @ (y - y.mean())) / sxx
    intercept = float(y.mean() - slope * x.mean())
    resid = y - (slope * x + intercept)
    dof = x.size - 2
    stderr = math.sqrt(float(resid @ resid) / dof / sxx) if dof > 0 else 0.0
    return slope, intercept, stderr


def _expected_error(eta: float, a: float, steps: int) -> float:
    """E[(G_hat_T - G(x_T))^2] for the EMA of weight 1 - a fed `steps` samples, starting at 0."""
    k = np.arange(steps, dtype=np.float64)  # k steps before T
    w = a * np.exp(k * math.log1p(-a))  # the weight of Y_(T-k) in G_hat_T
    g = second_moment(-k * eta)
    bias = float(w @ g) - G_OFFSET
    return bias * bias + Z2_VARIANCE * float((w * w) @ (g * g))


def beta_exponent_study(
    etas: npt.ArrayLike,
    one_minus_betas: npt.ArrayLike,
    replicas: int = 1000,
    seed: int = 0,
    *,
    horizon: float = 12.0,
) -> BetaExponentStudy:
    """Measures the EMA weight beta that best tracks a moving second moment, for several eta.

    The instance, in one dimension: the point moves along a line by eta per step (M = 1),
    x_t = x_T - (T - t) eta with x_T = 0; the second moment is G(x) = 2 + tanh(x)
    (:func:`second_moment`, L = 1); the gradient samples are g_t = sqrt(G(x_t)) z_t with z_t
    uniform on [-sqrt(3), sqrt(3)], so Y_t = g_t^2 has E[Y_t] = G(x_t), bounded noise
    |Y_t - G(x_t)| <= 2 G(x_t) and Var(Y_t) = 0.8 G(x_t)^2. At x_T = 0, G' = 1 and G'' = 0,
    so the lag is linear in the drift up to a third-order term; tanh is monotone and bounded,
    so a long window has a large bias (G is not periodic, where long windows would average the
    drift away) and G stays >= 1.

    The EMA is the library's :class:`~saddlescape.EMAEstimator` with ``structure="diag"`` of
    dimension ``replicas``: each coordinate is an independent scalar EMA of g_t^2, fed by
    :meth:`~saddlescape.EMAEstimator.update_batch`. For 1 - beta = a it starts from 0 and sees the
    last ceil(horizon / a) samples, so the zero start weighs at most exp(-horizon) in G_hat_T.
    All betas of one eta see the same samples (common random numbers), which keeps each error
    curve smooth in beta and its minimiser stable; each eta has its own independent noise.

    Args:
        etas: at least 2 distinct step lengths eta > 0 (3 or more for a slope standard error).
            Theorem 4.1 is asymptotic: 1e-5 to 1e-2 keeps the best lag eta / (1 - beta) small.
        one_minus_betas: the grid of 1 - beta, strictly increasing, within (0, 1], at least 3
            values, wide enough that every eta's minimum lies strictly inside it. The
            leading-order optimum is about 1.08 eta^(2/3).
        replicas: independent replicas per (eta, beta), >= 2.
        seed: the seed of the noise, >= 0.
        horizon: the EMA of weight 1 - a is fed ceil(horizon / a) samples, horizon > 0.

    Returns:
        A :class:`BetaExponentStudy` with the error curves, the best 1 - beta per eta and the
        fitted slope (Theorem 4.1 predicts :data:`PREDICTED_SLOPE` = 2/3).

    Raises:
        ValueError: an argument out of range (named, with the value), or an error curve whose
            minimum lies at an end of ``one_minus_betas``.
    """
    eta = _positive_vector("etas", etas, 2)
    if np.unique(eta).size != eta.size:
        raise ValueError(f"etas must be distinct, got {eta.tolist()!r}")
    a = _positive_vector("one_minus_betas", one_minus_betas, 3)
    if not np.all(np.diff(a) > 0):
        raise ValueError(f"one_minus_betas must be strictly increasing, got {a.tolist()!r}")
    if a[-1] > 1:
        raise ValueError(f"one_minus_betas must be <= 1, got {float(a[-1])!r}")
    r = integer("replicas", replicas)
    if r < 2:
        raise ValueError(f"replicas must be >= 2, got {r}")
    s = integer("seed", seed)
    if s < 0:
        raise ValueError(f"seed must be >= 0, got {s}")
    h = real("horizon", horizon)
    if not (math.isfinite(h) and h > 0):
        raise ValueError(f"horizon must be finite and > 0, got {horizon!r}")

    steps = np.ceil(h / a).astype(np.int64)
    total = int(steps.max())
    rows = max(1, CHUNK_ELEMENTS // r)
    buf = np.empty((min(rows, total), r))
    target = float(second_moment(0.0))
    errors = np.empty((eta.size, a.size))
    stderr = np.empty_like(errors)
    expected = np.empty_like(errors)
    for i, (e, ss) in enumerate(zip(eta, np.random.SeedSequence(s).spawn(eta.size))):
        rng = np.random.default_rng(ss)
        ests = [EMAEstimator(r, structure="diag", beta=1.0 - float(aj)) for aj in a]
        first = total - steps  # the first sample index each EMA sees; index total - 1 is x_T
        for c0 in range(0, total, rows):
            c1 = min(total, c0 + rows)
            x = (np.arange(c0, c1, dtype=np.float64) - (total - 1)) * e
            g = rng.random(out=buf[: c1 - c0])
            g -= 0.5  # uniform on [-1/2, 1/2): times 2 sqrt(3) gives z, times sqrt(G) gives g
            g *= (2.0 * math.sqrt(3.0) * np.sqrt(second_moment(x)))[:, None]
            for est, f in zip(ests, first):
                if f < c1:
                    est.update_batch(g[max(0, int(f) - c0):])
        sq = (np.stack([est.estimate() for est in ests]) - target) ** 2
        errors[i] = sq.mean(axis=1)
        stderr[i] = sq.std(axis=1, ddof=1) / math.sqrt(r)
        expected[i] = [_expected_error(float(e), float(aj), int(n)) for aj, n in zip(a, steps)]

    best = np.array([_refine_argmin(a, errors[i], f"eta={float(e)!r}") for i, e in enumerate(eta)])
    best_exp = np.array([_refine_argmin(a, expected[i], f"eta={float(e)!r} (expected)")
                         for i, e in enumerate(eta)])
    best_err = errors.min(axis=1)
    slope, intercept, slope_se = _line_fit(np.log(eta), np.log(best))
    var_t = Z2_VARIANCE * target**2  # Var(Y_T); G'(x_T) = 1
    return BetaExponentStudy(
        etas=eta,
        one_minus_betas=a,
        errors=errors,
        error_stderr=stderr,
        expected_errors=expected,
        best_one_minus_beta=best,
        best_error=best_err,
        expected_best_one_minus_beta=best_exp,
        predicted_one_minus_beta=(4.0 * eta**2 / var_t) ** (1.0 / 3.0),
        slope=slope,
        intercept=intercept,
        slope_stderr=slope_se,
        expected_slope=_line_fit(np.log(eta), np.log(best_exp))[0],
        error_slope=_line_fit(np.log(eta), np.log(best_err))[0],
        replicas=r,
        steps=steps,
        seed=s,
    )
