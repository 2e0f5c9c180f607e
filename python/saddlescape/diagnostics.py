"""Diagnostics of a preconditioner at a point: the rescaled noise and second-order stationarity.

Sec. 3.1 of the paper explains what the preconditioner of an adaptive method does: with
A = (E[g g^T] + eps I)^(-1/2) the stochastic gradient's noise, rescaled by A, has covariance

    Cov(A g) = A (E[g g^T] - grad f grad f^T) A                          (eq. 3)
             = I - A grad f grad f^T A                        (eps = 0),

which tends to the identity as x approaches a stationary point: near one the rescaled noise is
isotropic, whatever the shape of the noise itself, and so has a component of fixed size along
any escape direction. SGD (A = I) keeps the noise as it is. :func:`rescaled_noise_covariance`
measures Cov(A (g - grad f(x))) by sampling and evaluates the closed form next to it.

:func:`is_second_order_stationary` is the paper's target: x is a (tau, rho) second-order
stationary point when ||grad f(x)|| <= tau and lambda_min(Hessian f(x)) >= -sqrt(rho tau).

Not here: the preconditioner constants of Definition 4.2 (Lambda_1, Lambda_2, Gamma, nu,
lambda_-). Their definitions could not be checked against the paper's text, and they are left
out rather than guessed.

Everything is computed in numpy float64 from the problem's own oracles
(``stochastic_gradients``, ``gradient``, ``second_moment``, ``hessian``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Union

import numpy as np
import numpy.typing as npt

from saddlescape import problems as _problems
from saddlescape._validation import integer as _integer
from saddlescape._validation import real as _real
from saddlescape._validation import real_array as _real_array
from saddlescape._validation import seed as _seed
from saddlescape.matrix_functions import inv_sqrt

__all__ = [
    "RescaledNoiseCovariance",
    "SecondOrderStationarity",
    "adaptive_preconditioner",
    "is_second_order_stationary",
    "rescaled_noise_covariance",
    "spectral_distance_to_identity",
]

_f64 = np.dtype(np.float64)

#: What ``A`` may be: None (SGD, A = I), a (d, d) matrix, or "adaptive".
Preconditioner = Union[None, npt.ArrayLike, Literal["adaptive"]]


@dataclass(frozen=True)
class RescaledNoiseCovariance:
    """The covariance of the rescaled noise A (g - grad f(x)) at one point.

    Attributes:
        x: the point, shape (d,).
        A: the preconditioner used, shape (d, d).
        sampled: the Monte-Carlo covariance from ``n`` stochastic gradients, shape (d, d).
        closed_form: A (E[g g^T] - grad f grad f^T) A^T (eq. 3), or None where the problem has no
            exact ``second_moment`` or ``gradient``.
        sampled_distance: ||sampled - I||_2 (spectral norm).
        closed_form_distance: ||closed_form - I||_2, or None with ``closed_form``.
        n: the number of stochastic gradients sampled.
        centred_at_gradient: True when the samples were centred at the exact gradient (divided by
            n), False when at their own mean (divided by n - 1; problems without a gradient).
    """

    x: np.ndarray
    A: np.ndarray
    sampled: np.ndarray
    closed_form: np.ndarray | None
    sampled_distance: float
    closed_form_distance: float | None
    n: int
    centred_at_gradient: bool


@dataclass(frozen=True)
class SecondOrderStationarity:
    """The verdict of :func:`is_second_order_stationary`.

    Attributes:
        grad_norm: ||grad f(x)||_2.
        lambda_min: the smallest eigenvalue of the Hessian at x.
        tau: the gradient tolerance.
        curvature_threshold: -sqrt(rho * tau), the least admissible lambda_min.
        stationary: grad_norm <= tau and lambda_min >= curvature_threshold.
    """

    grad_norm: float
    lambda_min: float
    tau: float
    curvature_threshold: float
    stationary: bool

    def __bool__(self) -> bool:
        return self.stationary


def spectral_distance_to_identity(C: npt.ArrayLike) -> float:
    """||C - I||_2 for a square matrix C: its largest singular value.

    Raises:
        ValueError: C is not a finite real (d, d) matrix.
    """
    m = _square("C", C)
    return float(np.linalg.norm(m - np.eye(m.shape[0]), 2))


def adaptive_preconditioner(problem: Any, x: npt.ArrayLike, eps: float = 0.0) -> np.ndarray:
    """The idealized adaptive preconditioner A(x) = (E[g g^T](x) + eps I)^(-1/2).

    Args:
        problem: a saddlescape problem with an exact ``second_moment``.
        x: the point, shape (dim,).
        eps: the damping, a finite number >= 0.

    Returns:
        A, shape (dim, dim), computed by :func:`saddlescape.inv_sqrt`.

    Raises:
        ValueError: the problem has no exact second moment, x has the wrong shape or a
            non-finite entry, or eps is negative or not finite.
        NumericalError: E[g g^T](x) is singular and eps = 0.
    """
    p = _as_problem(problem, x)
    xv = _point(x, p.dim)
    e = _eps(eps)
    if not p.has_second_moment:
        raise ValueError(f"{p!r} has no exact second_moment; the adaptive preconditioner "
                         "(E[g g^T] + eps I)^(-1/2) needs it")
    return inv_sqrt(np.asarray(p.second_moment(xv), dtype=np.float64), e)


def rescaled_noise_covariance(problem: Any, x: npt.ArrayLike, A: Preconditioner = None,
                              eps: float = 0.0, n: int = 100_000,
                              seed: int = 0) -> RescaledNoiseCovariance:
    """The covariance of the rescaled noise A (g - grad f(x)), sampled and in closed form.

    The sampled covariance is (1/n) sum_i A (g_i - grad f(x)) (g_i - grad f(x))^T A^T over n
    stochastic gradients ``problem.stochastic_gradients(x, n, seed)``: an unbiased estimate
    whose entries have standard deviations of order ||closed form|| / sqrt(n). A problem
    without an exact gradient is centred at the sample mean instead (divided by n - 1). The
    closed form is eq. 3 of the paper, A (E[g g^T] - grad f grad f^T) A^T; for
    A = (E[g g^T] + eps I)^(-1/2) it is A E[g g^T] A - A grad f grad f^T A, which for eps = 0
    equals I - A grad f grad f^T A, with ||Cov - I||_2 = s / (1 + s), s = grad f^T Cov(g)^(-1)
    grad f, tending to 0 at a stationary point.

    Args:
        problem: a saddlescape problem (or a callable oracle(x, rng), as for :func:`run`).
        x: the point, shape (dim,).
        A: None for SGD's A = I; a (dim, dim) real matrix; or ``"adaptive"`` for
            (E[g g^T](x) + eps I)^(-1/2) (:func:`adaptive_preconditioner`).
        eps: the damping of the adaptive preconditioner (>= 0); only used with "adaptive".
        n: the number of stochastic gradients, >= 2.
        seed: the seed of the stochastic gradients, in [0, 2**64).

    Returns:
        A :class:`RescaledNoiseCovariance`.

    Raises:
        ValueError: x of the wrong shape or not finite; A not None, "adaptive" or a finite
            (dim, dim) real matrix; "adaptive" on a problem without an exact second moment;
            eps < 0 or not finite; n < 2; a bad seed.
        NumericalError: "adaptive" with eps = 0 at a point where E[g g^T] is singular.
    """
    p = _as_problem(problem, x)
    xv = _point(x, p.dim)
    e = _eps(eps)
    nn = _integer("n", n)
    if nn < 2:
        raise ValueError(f"n must be an integer >= 2, got {nn}")
    sd = _seed(seed)
    d = p.dim
    if A is None:
        Am = np.eye(d)
    elif isinstance(A, str):
        if A != "adaptive":
            raise ValueError(f"A must be None, a (d, d) matrix or 'adaptive', got {A!r}")
        Am = adaptive_preconditioner(p, xv, e)
    else:
        Am = _square("A", A, d)

    G = np.asarray(p.stochastic_gradients(xv, nn, sd), dtype=np.float64)
    grad = np.asarray(p.gradient(xv), dtype=np.float64) if p.has_gradient else None
    if grad is not None:
        D = (G - grad) @ Am.T
        sampled = D.T @ D / nn
    else:
        D = (G - G.mean(axis=0)) @ Am.T
        sampled = D.T @ D / (nn - 1)
    sampled = (sampled + sampled.T) / 2

    closed: np.ndarray | None = None
    if grad is not None and p.has_second_moment:
        cov_g = np.asarray(p.second_moment(xv), dtype=np.float64) - np.outer(grad, grad)
        closed = Am @ cov_g @ Am.T
        closed = (closed + closed.T) / 2
    return RescaledNoiseCovariance(
        x=xv, A=Am, sampled=sampled, closed_form=closed,
        sampled_distance=spectral_distance_to_identity(sampled),
        closed_form_distance=None if closed is None else spectral_distance_to_identity(closed),
        n=nn, centred_at_gradient=grad is not None)


def is_second_order_stationary(problem: Any, x: npt.ArrayLike, tau: float,
                               rho: float) -> SecondOrderStationarity:
    """Whether x is a (tau, rho) second-order stationary point of the problem's objective.

    That is ||grad f(x)||_2 <= tau and lambda_min(Hessian f(x)) >= -sqrt(rho tau), where rho is
    (in the paper) the Lipschitz constant of the Hessian. Both are evaluated exactly from the
    problem's ``gradient`` and ``hessian`` (its smallest eigenvalue by numpy's ``eigvalsh``).

    Args:
        problem: a saddlescape problem with an exact gradient and Hessian.
        x: the point, shape (dim,).
        tau: the gradient tolerance, a finite number >= 0.
        rho: the Hessian Lipschitz constant, a finite number >= 0.

    Returns:
        A :class:`SecondOrderStationarity` (true in a boolean context when stationary).

    Raises:
        ValueError: tau or rho negative or not finite; x of the wrong shape or not finite; a
            problem without an exact gradient or Hessian.
    """
    t = _nonnegative("tau", tau)
    r = _nonnegative("rho", rho)
    p = _as_problem(problem, x)
    xv = _point(x, p.dim)
    if not p.has_gradient or not p.has_hessian:
        raise ValueError(f"{p!r} needs an exact gradient and Hessian for the stationarity test")
    grad_norm = float(np.linalg.norm(np.asarray(p.gradient(xv), dtype=np.float64)))
    H = np.asarray(p.hessian(xv), dtype=np.float64)
    lam = float(np.linalg.eigvalsh((H + H.T) / 2)[0])
    threshold = -math.sqrt(r * t)
    return SecondOrderStationarity(grad_norm=grad_norm, lambda_min=lam, tau=t,
                                   curvature_threshold=threshold,
                                   stationary=grad_norm <= t and lam >= threshold)


# --- argument checks -----------------------------------------------------------------------


def _as_problem(problem: Any, x: Any) -> Any:
    size = np.asarray(x).size if np.asarray(x).ndim == 1 else 0
    return _problems.as_problem(problem, max(size, 1))


def _point(x: Any, d: int) -> np.ndarray:
    xv = _real_array("x", x, _f64, (d,)).copy()
    if not np.all(np.isfinite(xv)):
        raise ValueError(f"x must be finite, got {xv}")
    return xv


def _square(name: str, value: Any, d: int | None = None) -> np.ndarray:
    m = np.asarray(value)
    k = d if d is not None else (m.shape[0] if m.ndim == 2 else None)
    out = _real_array(name, m, _f64, (k, k))
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{name} must be finite, got {out}")
    return out


def _eps(value: Any) -> float:
    e = _real("eps", value)
    if not (math.isfinite(e) and e >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {value!r}")
    return e


def _nonnegative(name: str, value: Any) -> float:
    v = _real(name, value)
    if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return v
