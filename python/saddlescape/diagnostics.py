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

:func:`preconditioner_constants` evaluates the five constants of Definition 4.2 (Sec. 4.2.1)
at given points, :func:`prop_4_3_bounds` and :func:`prop_4_4_bounds` are the paper's bounds on
them for SGD (A = I) and idealized RMSProp (A = (G + eps I)^(-1/2)), :func:`check_bounds` says
whether measured constants satisfy claimed ones, and :func:`second_order_factor`,
:func:`first_order_term` and the ``bound_10`` ... ``bound_13`` functions are the preconditioner
dependence of the rates and the bounds (10)-(13) of Sec. 5.1 and 5.2. The paper's appendices
(C, D, E, F), where the propositions are proved, are not available here; where a statement
needs them, the docstring says so.

Everything is computed in numpy float64 from the problem's own oracles
(``stochastic_gradients``, ``gradient``, ``second_moment``, ``hessian``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, Union

import numpy as np
import numpy.typing as npt

from saddlescape import problems as _problems
from saddlescape._core import NumericalError
from saddlescape._validation import integer as _integer
from saddlescape._validation import real as _real
from saddlescape._validation import real_array as _real_array
from saddlescape._validation import seed as _seed
from saddlescape.matrix_functions import inv_sqrt

__all__ = [
    "BoundCheck",
    "Constants",
    "PreconditionerConstants",
    "RescaledNoiseCovariance",
    "SecondOrderStationarity",
    "adaptive_preconditioner",
    "aligned_rmsprop_factor",
    "bound_10",
    "bound_11",
    "bound_12",
    "bound_13",
    "check_bounds",
    "constants_at",
    "escape_noise",
    "first_order_term",
    "is_second_order_stationary",
    "preconditioner_constants",
    "prop_4_3_bounds",
    "prop_4_4_bounds",
    "rescaled_noise_covariance",
    "second_order_factor",
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


# --- the preconditioner constants of Definition 4.2 ---------------------------------------


@dataclass(frozen=True)
class Constants:
    """The five numbers of a (Lambda_1, Lambda_2, Gamma, nu, lambda_-)-preconditioner (Def. 4.2).

    Lambda_1, Lambda_2 and Gamma are upper bounds (a preconditioner with smaller values also
    satisfies the definition); nu and lambda_- are lower bounds. NaN for Lambda_1 or Lambda_2
    means "unconstrained": the inequality holds for every value (the vector it is tested on is
    zero).

    Attributes:
        Lambda1: ||A grad f||^2 <= Lambda1 ||A^(1/2) grad f||^2.
        Lambda2: ||A (grad f - grad f~)|| <= Lambda2 ||grad f - grad f~||.
        Gamma: Gamma >= E||A g||^2.
        nu: nu <= lambda_min(A E[g g^T] A^T).
        lambda_minus: lambda_- <= lambda_min(A).
    """

    Lambda1: float
    Lambda2: float
    Gamma: float
    nu: float
    lambda_minus: float


@dataclass(frozen=True)
class BoundCheck:
    """The verdict of :func:`check_bounds`: one flag per constant, true where the measured value
    satisfies the claimed one (an unconstrained, NaN, measured Lambda counts as satisfied).

    Attributes:
        Lambda1, Lambda2, Gamma: measured <= claimed (to ``rtol``).
        nu, lambda_minus: measured >= claimed (to ``rtol``).
        ok: all five.
    """

    Lambda1: bool
    Lambda2: bool
    Gamma: bool
    nu: bool
    lambda_minus: bool

    @property
    def ok(self) -> bool:
        return self.Lambda1 and self.Lambda2 and self.Gamma and self.nu and self.lambda_minus

    def __bool__(self) -> bool:
        return self.ok


@dataclass(frozen=True)
class PreconditionerConstants:
    """The constants of Definition 4.2 at each of k points, as measured by
    :func:`preconditioner_constants`: at each point the tightest value its inequality allows.

    Attributes:
        points: (k, d).
        x0: (d,) the point of the quadratic model f~ used for Lambda_2.
        A: (k, d, d) the preconditioner at each point.
        second_moments: (k, d, d) E[g g^T] at each point (exact, or the sample mean of g g^T
            where ``sampled``).
        Lambda1: (k,) ||A grad f||^2 / ||A^(1/2) grad f||^2; NaN where A^(1/2) grad f = 0.
        Lambda2: (k,) ||A r|| / ||r||, r = grad f - grad f~; NaN where r = 0 (to rounding: 64
            machine epsilons of the gradients' norms, as for a quadratic f) or the problem has
            no Hessian (f~ unknown).
        Gamma: (k,) E||A g||^2 = tr(A G A^T).
        nu: (k,) lambda_min(A G A^T).
        lambda_minus: (k,) lambda_min(A).
        lambda_max_A: (k,) lambda_max(A), the bound on Lambda_1 and Lambda_2 that holds for any
            symmetric positive semidefinite A (the remark after Def. 4.2).
        nu_escape: (k,) the footnote's reading of nu: min over unit v in the escape subspace of
            E[(v^T A g)^2] = lambda_min(Q^T A G A^T Q); NaN where there is no escape direction.
        sampled: True when G was estimated from ``n`` stochastic gradients (no exact
            ``second_moment``), False for the closed forms.
    """

    points: np.ndarray
    x0: np.ndarray
    A: np.ndarray
    second_moments: np.ndarray
    Lambda1: np.ndarray
    Lambda2: np.ndarray
    Gamma: np.ndarray
    nu: np.ndarray
    lambda_minus: np.ndarray
    lambda_max_A: np.ndarray
    nu_escape: np.ndarray
    sampled: bool

    def at(self, i: int) -> Constants:
        """The constants at point i."""
        k = _integer("i", i)
        return Constants(float(self.Lambda1[k]), float(self.Lambda2[k]), float(self.Gamma[k]),
                         float(self.nu[k]), float(self.lambda_minus[k]))

    def worst(self) -> Constants:
        """The constants valid at every point: the largest Lambda_1, Lambda_2, Gamma and the
        smallest nu, lambda_- (NaN entries, unconstrained, are skipped; NaN if all are)."""
        return Constants(_nanreduce(np.max, self.Lambda1), _nanreduce(np.max, self.Lambda2),
                         float(np.max(self.Gamma)), float(np.min(self.nu)),
                         float(np.min(self.lambda_minus)))


#: What ``A`` may be in :func:`preconditioner_constants`.
PreconditionerSpec = Any


def constants_at(A: npt.ArrayLike, G: npt.ArrayLike, grad: npt.ArrayLike | None = None,
                 residual: npt.ArrayLike | None = None) -> Constants:
    """The tightest constants of Definition 4.2 at one point, from A and E[g g^T] there.

    * Lambda_1 = ||A grad||^2 / ||A^(1/2) grad||^2, with ||A^(1/2) v||^2 = v^T A v (A symmetric
      positive semidefinite, so A^(1/2) is its symmetric square root); NaN (unconstrained)
      when v^T A v = 0 (then A v = 0 too and the inequality reads 0 <= 0).
    * Lambda_2 = ||A r|| / ||r|| for r = grad f - grad f~; NaN when r = 0 or not given.
    * Gamma = E||A g||^2 = tr(A G A^T).
    * nu = lambda_min(A G A^T).
    * lambda_- = lambda_min(A).

    Args:
        A: the preconditioner, (d, d) symmetric positive semidefinite.
        G: E[g g^T] at the point, (d, d) symmetric positive semidefinite.
        grad: grad f at the point, (d,), or None (Lambda_1 is then NaN).
        residual: grad f - grad f~ at the point, (d,), or None (Lambda_2 is then NaN).

    Returns:
        The :class:`Constants`.

    Raises:
        ValueError: A or G not a finite, symmetric positive semidefinite (d, d) matrix; grad or
            residual of the wrong shape or not finite.
    """
    Am = _psd("A", A)
    d = Am.shape[0]
    Gm = _psd("G", G, d)
    gv = None if grad is None else _vector("grad", grad, d)
    rv = None if residual is None else _vector("residual", residual, d)
    return _constants(Am, Gm, gv, rv)


def preconditioner_constants(problem: Any, A: PreconditionerSpec, points: npt.ArrayLike, *,
                             x0: npt.ArrayLike | None = None, eps: float = 0.0,
                             escape_directions: npt.ArrayLike | None = None,
                             n: int = 100_000, seed: int = 0) -> PreconditionerConstants:
    """The constants of Definition 4.2 of a preconditioner A(x), evaluated at given points.

    Definition 4.2 asks, for all x: ||A grad f||^2 <= Lambda_1 ||A^(1/2) grad f||^2;
    ||A (grad f - grad f~)|| <= Lambda_2 ||grad f - grad f~|| with f~ the quadratic model of f
    at a point x0, grad f~(x) = grad f(x0) + H(x0) (x - x0); Gamma >= E||A g||^2;
    nu <= lambda_min(A E[g g^T] A^T); lambda_- <= lambda_min(A). At each point the tightest
    value is returned (:func:`constants_at`), and :meth:`PreconditionerConstants.worst` gives
    the values that hold at all of them. E[g g^T] is the problem's exact ``second_moment``
    where it has one (closed forms), otherwise the mean of g g^T over ``n`` stochastic
    gradients at the point (Gamma is then the sample mean of ||A g||^2).

    The footnote to Sec. 4.2.1 says that where G is rank deficient, lower bounds on
    lambda_min(G) are to be read as lower bounds on E[(v^T g)^2] for escape directions v. The
    library's reading, in ``nu_escape``: the escape directions at x are the unit vectors of the
    span of ``escape_directions`` (by default the eigenvectors of the Hessian at x with a
    negative eigenvalue), and nu_escape = min over them of E[(v^T A g)^2], i.e.
    lambda_min(Q^T A G A^T Q) for an orthonormal basis Q of that span.

    Args:
        problem: a saddlescape problem with an exact gradient (or a callable oracle with
            ``gradient``; see :func:`saddlescape.problems.as_problem`).
        A: the preconditioner: None or ``"identity"`` (SGD, A = I); ``"adaptive"`` (idealized
            full-matrix RMSProp, (E[g g^T](x) + eps I)^(-1/2)); ``"diagonal"`` (idealized diagonal
            RMSProp, diag(E[g g^T](x)) + eps, to the power -1/2); a fixed (d, d) matrix; a
            callable A(x) returning a (d, d) matrix or a (d,) diagonal; an
            :class:`saddlescape.EMAEstimator` or :class:`saddlescape.CovarianceEstimator` (its
            current ``preconditioner(eps)``); an :class:`saddlescape.RMSProp` (its current
            estimate, with its own eps, form and structure). Every A(x) must be symmetric
            positive semidefinite (A^(1/2) and lambda_min(A) need it).
        points: (k, d) or (d,) the points.
        x0: the point of the quadratic model f~ (default: the first point).
        eps: the damping of ``"adaptive"``, ``"diagonal"`` and estimators, >= 0.
        escape_directions: (m, d) or (d,) vectors spanning the escape subspace used at every
            point, or None for the Hessian's negative eigenvectors at each point.
        n: stochastic gradients per point where G must be sampled, >= 2.
        seed: the seed of those samples (the same at every point).

    Returns:
        A :class:`PreconditionerConstants`.

    Raises:
        ValueError: bad points, x0, eps, n, seed or escape_directions; a problem without an
            exact gradient; ``"adaptive"``/``"diagonal"`` on a problem without an exact second
            moment; an A that is not one of the above, or an A(x) that is not a finite
            symmetric positive semidefinite matrix of the problem's dimension.
        NumericalError: eps = 0 with a singular E[g g^T] for ``"adaptive"`` (a zero diagonal
            entry for ``"diagonal"``), or an estimator's singular estimate.
    """
    pts = np.asarray(points)
    if pts.ndim == 1:
        pts = pts[None, :]
    if pts.ndim != 2 or pts.shape[0] < 1:
        raise ValueError(f"points must have shape (k, d) or (d,) with k >= 1, got shape "
                         f"{np.asarray(points).shape}")
    p = _as_problem(problem, pts[0])
    d = p.dim
    pts = _real_array("points", pts, _f64, (None, d)).copy()
    if not np.all(np.isfinite(pts)):
        raise ValueError(f"points must be finite, got {pts}")
    e = _eps(eps)
    nn = _integer("n", n)
    if nn < 2:
        raise ValueError(f"n must be an integer >= 2, got {nn}")
    sd = _seed(seed)
    if not p.has_gradient:
        raise ValueError(f"{p!r} has no exact gradient; the constants Lambda_1 and Lambda_2 "
                         "need grad f")
    x0v = pts[0].copy() if x0 is None else _point(x0, d)
    Q_fixed = None if escape_directions is None else _basis(escape_directions, d)
    precond = _resolve_preconditioner(p, A, e)
    grad0 = np.asarray(p.gradient(x0v), dtype=np.float64)
    H0 = np.asarray(p.hessian(x0v), dtype=np.float64) if p.has_hessian else None

    k = pts.shape[0]
    out = {name: np.empty(k) for name in ("Lambda1", "Lambda2", "Gamma", "nu", "lambda_minus",
                                          "lambda_max_A", "nu_escape")}
    As = np.empty((k, d, d))
    Gs = np.empty((k, d, d))
    for i, x in enumerate(pts):
        if p.has_second_moment:
            G = np.asarray(p.second_moment(x), dtype=np.float64)
        else:
            samples = np.asarray(p.stochastic_gradients(x, nn, sd), dtype=np.float64)
            G = samples.T @ samples / nn
        G = (G + G.T) / 2
        Am = precond(x)
        grad = np.asarray(p.gradient(x), dtype=np.float64)
        residual = None
        if H0 is not None:
            step = H0 @ (x - x0v)
            residual = grad - (grad0 + step)
            # A quadratic's residual is rounding only: counted as zero (Lambda_2 unconstrained)
            # rather than turned into a ratio of rounding errors.
            scale = np.linalg.norm(grad) + np.linalg.norm(grad0) + np.linalg.norm(step)
            if np.linalg.norm(residual) <= 64 * np.finfo(np.float64).eps * scale:
                residual = np.zeros(d)
        c = _constants(Am, G, grad, residual)
        As[i], Gs[i] = Am, G
        out["Lambda1"][i], out["Lambda2"][i], out["Gamma"][i] = c.Lambda1, c.Lambda2, c.Gamma
        out["nu"][i], out["lambda_minus"][i] = c.nu, c.lambda_minus
        out["lambda_max_A"][i] = float(np.linalg.eigvalsh(Am)[-1])
        if Q_fixed is not None:
            Q = Q_fixed
        elif p.has_hessian:
            H = np.asarray(p.hessian(x), dtype=np.float64)
            lam, V = np.linalg.eigh((H + H.T) / 2)
            Q = V[:, lam < 0]
        else:
            Q = np.empty((d, 0))
        out["nu_escape"][i] = _escape_min(Am @ G @ Am.T, Q)
    return PreconditionerConstants(points=pts, x0=x0v, A=As, second_moments=Gs,
                                   sampled=not p.has_second_moment, **out)


def escape_noise(G: npt.ArrayLike, directions: npt.ArrayLike) -> float:
    """min E[(v^T g)^2] = min v^T G v over unit vectors v in the span of ``directions``.

    This is the footnote's replacement, for a rank-deficient G, of lambda_min(G) in the lower
    bounds on nu (Sec. 4.2.1, footnote 1): lambda_min(Q^T G Q) for an orthonormal basis Q of
    the span (the "CNC condition" of Daneshmand et al., 2018).

    Args:
        G: (d, d) symmetric positive semidefinite.
        directions: (m, d) or (d,) nonzero vectors spanning the escape subspace.

    Returns:
        The minimum, >= 0.

    Raises:
        ValueError: G not symmetric positive semidefinite; directions of the wrong width, not
            finite, or all zero.
    """
    Gm = _psd("G", G)
    return _escape_min(Gm, _basis(directions, Gm.shape[0]))


def prop_4_3_bounds(G: npt.ArrayLike, escape_directions: npt.ArrayLike | None = None) -> Constants:
    """Proposition 4.3: A = I is a (1, 1, Gamma, nu, 1)-preconditioner with
    Gamma <= E||g||^2 <= d tr(G) and nu <= lambda_min(G).

    E||g||^2 = tr(G) exactly, so the returned Gamma is tr(G), the first and tighter of the two
    bounds the proposition states (the second, d tr(G), is d times it; bound (12) instead uses
    tr(G) <= d lambda_max(G)). nu is lambda_min(G), or with ``escape_directions`` the
    footnote's reading :func:`escape_noise`. Both are attained: for A = I the bounds are the
    exact constants (Lambda_1 = Lambda_2 = 1 wherever the gradient and the model residual are
    nonzero).

    Args:
        G: E[g g^T], (d, d) symmetric positive semidefinite (singular allowed: nu is then 0).
        escape_directions: optional (m, d) spanning the escape subspace.

    Returns:
        The :class:`Constants` the proposition gives.

    Raises:
        ValueError: G not a finite symmetric positive semidefinite matrix; bad directions.
    """
    Gm = _psd("G", G)
    lam = _eig_psd(Gm)
    nu = float(lam[0]) if escape_directions is None else _escape_min(
        Gm, _basis(escape_directions, Gm.shape[0]))
    return Constants(1.0, 1.0, float(np.trace(Gm)), nu, 1.0)


def prop_4_4_bounds(G: npt.ArrayLike, eps: float,
                    escape_directions: npt.ArrayLike | None = None) -> Constants:
    """Proposition 4.4: A = (G + eps I)^(-1/2) is a (Lambda_1, Lambda_2, Gamma, nu, lambda_-)-
    preconditioner with

        Lambda_1 = Lambda_2 = (lambda_min(G) + eps)^(-1/2),
        Gamma = d lambda_max(G) / (eps + lambda_max(G)),
        nu = lambda_min(G) / (lambda_min(G) + eps),
        lambda_- = (lambda_max(G) + eps)^(-1/2).

    For this A (which commutes with G): Lambda_1 and Lambda_2 are lambda_max(A), attained when
    the vector tested lies along G's eigenvector of lambda_min(G); Gamma bounds
    tr(G (G + eps I)^(-1)) = sum_i lambda_i / (lambda_i + eps), with equality when all
    eigenvalues are equal or eps = 0 (then Gamma = d, for positive definite G); nu and
    lambda_- are exact. The proposition takes lambda_min(G), lambda_max(G) as bounds over all
    x (Prop. 4.2 assumes lambda_min(G) I <= G(x)); passed one G, they are that G's.

    With ``escape_directions`` (the footnote's reading for rank-deficient G) lambda_min(G) in
    nu is replaced by mu = :func:`escape_noise`(G, directions), nu = mu / (mu + eps), and only
    there (Lambda_1, Lambda_2 constrain other directions). The proof is in Appendix C, which is
    not available; this substituted nu is exact when the escape subspace is spanned by
    eigenvectors of G, but not in general: v^T phi(G) v <= phi(v^T G v) for the concave
    phi(t) = t / (t + eps), so the measured nu_escape can be smaller. :func:`check_bounds`
    reports it.

    Args:
        G: (d, d) symmetric positive semidefinite.
        eps: the damping, >= 0.
        escape_directions: optional (m, d) spanning the escape subspace.

    Returns:
        The :class:`Constants`.

    Raises:
        ValueError: G not a finite symmetric positive semidefinite matrix; eps < 0 or not
            finite; bad directions.
        NumericalError: eps = 0 and G singular (A = G^(-1/2) does not exist).
    """
    Gm = _psd("G", G)
    e = _eps(eps)
    lo, hi = _extremes(Gm, e)
    d = Gm.shape[0]
    mu = lo if escape_directions is None else _escape_min(Gm, _basis(escape_directions, d))
    nu = mu / (mu + e) if mu + e > 0 else 0.0
    lam = 1.0 / math.sqrt(lo + e)
    return Constants(lam, lam, d * hi / (e + hi), nu, 1.0 / math.sqrt(hi + e))


def check_bounds(measured: Constants, claimed: Constants, rtol: float = 1e-9,
                 atol: float = 0.0) -> BoundCheck:
    """Whether measured constants satisfy claimed ones in the sense of Definition 4.2.

    Lambda_1, Lambda_2, Gamma: measured <= claimed (1 + rtol) + atol; nu, lambda_-:
    measured >= claimed (1 - rtol) - atol (or claimed <= 0). A NaN measured Lambda
    (unconstrained) satisfies any claim. ``atol`` covers a tiny nu of a nearly singular G,
    whose computed eigenvalue has an absolute error of a few machine epsilons of ||A G A||.

    Args:
        measured: e.g. :meth:`PreconditionerConstants.at` or ``worst()``.
        claimed: e.g. :func:`prop_4_4_bounds`.
        rtol: the relative slack for rounding, >= 0.
        atol: the absolute slack, >= 0.

    Returns:
        A :class:`BoundCheck`.

    Raises:
        ValueError: rtol or atol negative or not finite.
    """
    r = _nonnegative("rtol", rtol)
    a = _nonnegative("atol", atol)

    def upper(m: float, c: float) -> bool:
        return bool(math.isnan(m) or m <= c * (1 + r) + a)

    def lower(m: float, c: float) -> bool:
        return bool(c <= 0 or m >= c * (1 - r) - a)

    return BoundCheck(upper(measured.Lambda1, claimed.Lambda1),
                      upper(measured.Lambda2, claimed.Lambda2),
                      upper(measured.Gamma, claimed.Gamma),
                      lower(measured.nu, claimed.nu),
                      lower(measured.lambda_minus, claimed.lambda_minus))


# --- the rates' dependence on the preconditioner (Sec. 4.2, 5.1, 5.2) ----------------------


def second_order_factor(c: Constants) -> float:
    """Lambda_1^4 Lambda_2^4 Gamma^4 / (lambda_-^10 nu^4): the preconditioner's part of the
    second-order time (8) of Theorem 4.4 and (9) of Corollary 4.2.

    Args:
        c: the constants.

    Returns:
        The factor; inf when nu or lambda_- is 0; NaN when a constant is NaN (an unconstrained
        Lambda: take the worst over more points, or lambda_max(A)).

    Raises:
        ValueError: a negative constant.
    """
    _nonnegative_constants(c)
    if c.nu == 0 or c.lambda_minus == 0:
        return math.inf
    return float(c.Lambda1 ** 4 * c.Lambda2 ** 4 * c.Gamma ** 4
                 / (c.lambda_minus ** 10 * c.nu ** 4))


def first_order_term(c: Constants) -> float:
    """Gamma / lambda_min(A), the left-hand side of bound (10) (Sec. 5.1), as printed.

    Note that Theorem 4.2's iteration count T = 2 (f(x0) - f*) L Gamma / (tau^4 lambda_-^2)
    has Gamma / lambda_-^2; the right-hand side of (10) equals d nu / lambda_-^2 for the
    values of Prop. 4.4, which is neither that nor Gamma / lambda_- (see :func:`bound_10`).

    Raises:
        ValueError: a negative constant.
    """
    _nonnegative_constants(c)
    if c.lambda_minus == 0:
        return math.inf
    return float(c.Gamma / c.lambda_minus)


def bound_10(G: npt.ArrayLike, eps: float) -> float:
    """The right-hand side of (10): d lambda_min(G) / (eps + lambda_min(G)) * (lambda_max(G) + eps).

    Sec. 5.1 writes it as a bound on Gamma / lambda_min(A) obtained from Prop. 4.4, and
    concludes that it decreases towards d lambda_min(G) as eps -> infinity. As printed it is
    not implied by Prop. 4.4: with Prop. 4.4's Gamma and lambda_-, Gamma / lambda_- =
    d lambda_max (lambda_max + eps)^(-1/2), which exceeds (10) at eps = 0 when lambda_max < 1,
    and Gamma / lambda_-^2 = d lambda_max. The derivation is in the appendix, not available;
    this function evaluates the formula exactly as printed.

    Args:
        G: (d, d) symmetric positive semidefinite. eps: >= 0.

    Raises:
        ValueError: bad G or eps.
        NumericalError: eps = 0 and G singular.
    """
    Gm = _psd("G", G)
    e = _eps(eps)
    lo, hi = _extremes(Gm, e)
    return float(Gm.shape[0] * lo / (e + lo) * (hi + e))


def bound_11(G: npt.ArrayLike, eps: float) -> float:
    """The right-hand side of (11) (and (13)): d^4 kappa(G)^4 (lambda_max(G) + eps).

    With Prop. 4.4's values, Lambda_1^4 Lambda_2^4 Gamma^4 / (lambda_-^10 nu^4) =
    d^4 (lambda_max / lambda_min)^4 (lambda_max + eps) exactly: (11) holds with equality for
    those values, and is smallest at eps = 0. kappa(G) is infinite for a singular G with eps > 0.

    Args:
        G: (d, d) symmetric positive semidefinite. eps: >= 0.

    Raises:
        ValueError: bad G or eps.
        NumericalError: eps = 0 and G singular.
    """
    Gm = _psd("G", G)
    e = _eps(eps)
    lo, hi = _extremes(Gm, e)
    if lo == 0:
        return math.inf
    return float(Gm.shape[0] ** 4 * (hi / lo) ** 4 * (hi + e))


def bound_12(G: npt.ArrayLike) -> tuple[float, float]:
    """Bound (12) for SGD (A = I, Prop. 4.3): the middle and right-hand sides,
    E[||g||^2]^4 / lambda_min(G)^4 and d^4 kappa(G)^4.

    E||g||^2 = tr(G) <= d lambda_max(G): equality in the second inequality when G = c I.

    Args:
        G: (d, d) symmetric positive semidefinite; singular gives (inf, inf) (SGD exists, the
            bound is void).

    Returns:
        (tr(G)^4 / lambda_min(G)^4, d^4 kappa(G)^4).

    Raises:
        ValueError: bad G.
    """
    Gm = _psd("G", G)
    lam = _eig_psd(Gm)
    lo, hi = float(lam[0]), float(lam[-1])
    if _singular(lo, hi, Gm.shape[0]):
        return math.inf, math.inf
    return float((np.trace(Gm) / lo) ** 4), float(Gm.shape[0] ** 4 * (hi / lo) ** 4)


def bound_13(G: npt.ArrayLike, eps: float) -> float:
    """Bound (13) for full-matrix RMSProp, A = (G + eps I)^(-1/2): d^4 kappa(G)^4 (lambda_max(G) +
    eps), the same expression as (11) (:func:`bound_11`). Against (12) at eps = 0, RMSProp's
    bound is the smaller when lambda_max(G) <= 1 (Sec. 5.2)."""
    return bound_11(G, eps)


def aligned_rmsprop_factor(G: npt.ArrayLike, eps: float = 0.0) -> float:
    """Sec. 5.2's well-aligned regime: Gamma^4 / (lambda_-^10 nu^4) with Lambda_1 = Lambda_2 = 1
    and Prop. 4.4's Gamma, nu, lambda_-; at eps = 0 this is d^4 lambda_max(G)^5, better than
    SGD's d^4 kappa(G)^4 when lambda_max(G) <= lambda_min(G)^(-4).

    Raises:
        ValueError: bad G or eps.
        NumericalError: eps = 0 and G singular.
    """
    c = prop_4_4_bounds(G, eps)
    return second_order_factor(Constants(1.0, 1.0, c.Gamma, c.nu, c.lambda_minus))


def _constants(Am: np.ndarray, Gm: np.ndarray, grad: np.ndarray | None,
               residual: np.ndarray | None) -> Constants:
    lam1 = math.nan
    if grad is not None:
        quad = float(grad @ Am @ grad)  # ||A^(1/2) grad||^2 for the symmetric root
        if quad > 0:
            Ag = Am @ grad
            lam1 = float(Ag @ Ag) / quad
    lam2 = math.nan
    if residual is not None:
        rn = float(np.linalg.norm(residual))
        if rn > 0:
            lam2 = float(np.linalg.norm(Am @ residual)) / rn
    M = Am @ Gm @ Am.T
    M = (M + M.T) / 2
    return Constants(lam1, lam2, float(np.trace(M)), float(np.linalg.eigvalsh(M)[0]),
                     float(np.linalg.eigvalsh(Am)[0]))


def _resolve_preconditioner(p: Any, A: Any, eps: float) -> Callable[[np.ndarray], np.ndarray]:
    from saddlescape.estimators import CovarianceEstimator, EMAEstimator
    from saddlescape.matrix_functions import diag_inv_sqrt
    from saddlescape.optimizers import RMSProp

    d = p.dim
    if A is None or (isinstance(A, str) and A == "identity"):
        eye = np.eye(d)
        return lambda x: eye
    if isinstance(A, str):
        if A not in ("adaptive", "diagonal"):
            raise ValueError(f"A must be None, 'identity', 'adaptive', 'diagonal', a matrix, a "
                             f"callable A(x), an estimator or an RMSProp, got {A!r}")
        if not p.has_second_moment:
            raise ValueError(f"{p!r} has no exact second_moment; the {A} preconditioner needs it")
        if A == "adaptive":
            return lambda x: _psd("A(x)", inv_sqrt(np.asarray(p.second_moment(x), np.float64),
                                                   eps), d)
        return lambda x: np.diag(diag_inv_sqrt(
            np.ascontiguousarray(np.diag(np.asarray(p.second_moment(x), np.float64))), eps))
    if isinstance(A, (EMAEstimator, CovarianceEstimator)):
        fixed = _psd("the estimator's preconditioner",
                     _assemble(A.preconditioner(eps), A.structure, d), d)
        return lambda x: fixed
    if isinstance(A, RMSProp):
        fixed = _psd("the RMSProp preconditioner", _rmsprop_matrix(A, d), d)
        return lambda x: fixed
    if callable(A):
        def call(x: np.ndarray) -> np.ndarray:
            m = np.asarray(A(x.copy()))
            if m.ndim == 1:
                m = np.diag(_real_array("A(x)", m, _f64, (d,)))
            return _psd("A(x)", m, d)
        return call
    fixed = _psd("A", A, d)
    return lambda x: fixed


def _assemble(pre: Any, structure: str, d: int) -> np.ndarray:
    """A (d, d) matrix from an estimator's layout: full, diagonal or a list of blocks."""
    if structure == "full":
        return np.asarray(pre, dtype=np.float64)
    if structure == "diag":
        return np.diag(np.asarray(pre, dtype=np.float64))
    out = np.zeros((d, d))
    at = 0
    for block in pre:
        b = np.asarray(block, dtype=np.float64)
        out[at:at + b.shape[0], at:at + b.shape[0]] = b
        at += b.shape[0]
    return out


def _rmsprop_matrix(opt: Any, d: int) -> np.ndarray:
    from saddlescape.matrix_functions import diag_inv_sqrt

    eps, structure, form, sizes = opt._args[2], opt._args[3], opt._args[4], opt._args[7]
    est = np.asarray(opt.estimate(), dtype=np.float64)
    if structure == "full":
        return inv_sqrt(est, eps, form)
    if structure == "diag":
        return np.diag(diag_inv_sqrt(est, eps, form))
    blocks, at = [], 0
    for b in sizes:
        blocks.append(inv_sqrt(est[at:at + b * b].reshape(b, b).copy(), eps, form))
        at += b * b
    return _assemble(blocks, "block", d)


def _nanreduce(fn: Any, a: np.ndarray) -> float:
    finite = a[~np.isnan(a)]
    return float(fn(finite)) if finite.size else math.nan


def _escape_min(M: np.ndarray, Q: np.ndarray) -> float:
    if Q.shape[1] == 0:
        return math.nan
    R = Q.T @ M @ Q
    return float(np.linalg.eigvalsh((R + R.T) / 2)[0])


def _basis(directions: Any, d: int) -> np.ndarray:
    """An orthonormal basis (d, r) of the span of the rows of directions."""
    D = np.asarray(directions)
    if D.ndim == 1:
        D = D[None, :]
    D = _real_array("escape_directions", D, _f64, (None, d))
    if not np.all(np.isfinite(D)):
        raise ValueError(f"escape_directions must be finite, got {D}")
    U, s, _ = np.linalg.svd(D.T, full_matrices=False)
    if s.size == 0 or s[0] == 0:
        raise ValueError("escape_directions must contain a nonzero vector")
    return U[:, s > s[0] * max(D.shape) * np.finfo(np.float64).eps]


def _psd(name: str, value: Any, d: int | None = None) -> np.ndarray:
    """A finite, symmetric (to 1000 machine epsilons of max|M|, then averaged), positive
    semidefinite (to 100 d machine epsilons of lambda_max: a G assembled as Q diag(lam) Q^T
    with zeros in lam has eigenvalues of that size) float64 matrix, else a ValueError."""
    m = _square(name, value, d)
    scale = float(np.max(np.abs(m))) if m.size else 0.0
    asym = float(np.max(np.abs(m - m.T))) if m.size else 0.0
    if asym > 1000 * np.finfo(np.float64).eps * scale:
        raise ValueError(f"{name} must be symmetric, got max|{name} - {name}^T| = {asym:.3g}")
    m = (m + m.T) / 2
    lam = np.linalg.eigvalsh(m)
    if lam[0] < -100 * m.shape[0] * np.finfo(np.float64).eps * max(abs(lam[-1]), abs(lam[0])):
        raise ValueError(f"{name} must be positive semidefinite, got the eigenvalue {lam[0]:.6g}")
    return m


def _eig_psd(Gm: np.ndarray) -> np.ndarray:
    lam = np.linalg.eigvalsh(Gm)
    return np.maximum(lam, 0.0)  # rounding below zero, within _psd's tolerance


def _singular(lo: float, hi: float, d: int) -> bool:
    # The rule of matrix_functions: singular within d machine epsilons of lambda_max.
    return lo <= d * np.finfo(np.float64).eps * hi


def _extremes(Gm: np.ndarray, eps: float) -> tuple[float, float]:
    """(lambda_min(G), lambda_max(G)) for A = (G + eps I)^(-1/2); NumericalError if A does not
    exist (eps = 0 and G singular). A numerically singular G counts as lambda_min = 0."""
    lam = _eig_psd(Gm)
    lo, hi = float(lam[0]), float(lam[-1])
    if _singular(lo, hi, Gm.shape[0]):
        if eps == 0:
            raise NumericalError(f"G is singular (lambda_min = {lo:.3g}, lambda_max = {hi:.3g}) "
                                 "and eps = 0: (G + eps I)^(-1/2) does not exist")
        lo = 0.0
    return lo, hi


def _vector(name: str, value: Any, d: int) -> np.ndarray:
    v = _real_array(name, value, _f64, (d,))
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def _nonnegative_constants(c: Constants) -> None:
    for name in ("Lambda1", "Lambda2", "Gamma", "nu", "lambda_minus"):
        v = getattr(c, name)
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")


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
