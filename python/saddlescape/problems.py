"""Gradient oracles: the paper's problems, noisy quadratics, logistic regression, callables.

Each problem is a C++ object that :func:`saddlescape.run` drives without leaving native code.
All offer ``dim``, ``stochastic_gradients(x, n, seed)`` and ``sampler(seed)``; where known also
``value(x)``, ``gradient(x)`` (exact), ``hessian(x)``, ``lambda_min(x)`` and ``second_moment(x)``
(E[g g^T] at x); ``has_value`` etc. say which. Problems are immutable and may be shared by the
threads of :func:`saddlescape.run_many`.

Randomness: a run with seed s draws from the generator documented in ``rng.hpp`` (xoshiro256**
seeded by splitmix64; Lemire's method for indices; Marsaglia's polar method for normals), so a
seed names one result bit for bit. A Python oracle instead receives a numpy Generator,
``numpy.random.Generator(numpy.random.PCG64(s))``, created once per run.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from saddlescape import _core
from saddlescape._validation import integer as _integer
from saddlescape._validation import real as _real
from saddlescape._validation import real_array as _real_array
from saddlescape._validation import seed as _seed

Problem = _core.Problem
Sampler = _core.Sampler

__all__ = [
    "LogisticRegression",
    "NativeOracle",
    "NoisyQuadratic",
    "Oracle",
    "Problem",
    "ReddiCounterexample",
    "SaddleProblem",
    "Sampler",
    "as_problem",
    "function_address",
]

_f64 = np.dtype(np.float64)


def _rebuild(cls: type, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return cls(*args, **kwargs)


class _Picklable:
    """Pickles a problem as its class and constructor arguments (rebuilt, hence validated, on
    unpickling), so that process executors (``run_many(..., executor=...)``) can ship it. Those
    arguments are kept; the C++ state is not pickled. A problem from ``from_components`` or
    ``NativeOracle`` is not picklable (TypeError)."""

    _init_args: tuple[tuple[Any, ...], dict[str, Any]] | None = None

    def _remember(self, *args: Any, **kwargs: Any) -> None:
        self._init_args = (args, kwargs)

    def __reduce__(self) -> Any:
        if self._init_args is None:
            raise TypeError(f"this {type(self).__name__} cannot be pickled")
        return (_rebuild, (type(self),) + self._init_args)


def _vector_or_matrix(name: str, value: Any, d: int) -> np.ndarray:
    a = np.asarray(value)
    shape: tuple[int | None, ...] = (d,) if a.ndim == 1 else (d, d)
    return _real_array(name, a, _f64, shape)


class SaddleProblem(_Picklable, _core.SaddleProblem):
    """The saddle problem of Sec. 6 of the paper.

    f_i(x) = x^T H x / 2 + b_i^T x + sum_j x_j^power with H = diag(h), i uniform on n components,
    so F(x) = x^T H x / 2 + sum_j x_j^power. The b_i have mean exactly zero and covariance
    exactly ``noise_cov`` (to rounding): they are n normal draws from ``seed``, centred and
    whitened. With the defaults, x = 0 is a strict saddle (escape direction e_2, curvature
    -0.1) whose noise in the escape direction is small (variance 0.01).

    Args:
        h: the Hessian's diagonal at 0 (d >= 1 entries).
        noise_cov: the noise covariance, (d, d) positive semi-definite, or its diagonal (d,).
        n: the number of components, >= d + 1.
        power: the even exponent of the confining term (>= 2).
        seed: seed of the components.

    Raises:
        ValueError: for non-finite h, a covariance that is not symmetric positive semi-definite,
            n < d + 1, or an odd power.
    """

    def __init__(self, h: Sequence[float] = (1.0, -0.1), noise_cov: Any = (1.0, 0.01),
                 n: int = 1000, power: int = 10, seed: int = 0) -> None:
        hv = _real_array("h", h, _f64, (None,))
        super().__init__(hv, _vector_or_matrix("noise_cov", noise_cov, hv.shape[0]),
                         _integer("n", n), _integer("power", power), _seed(seed))
        self._remember(h, noise_cov, n, power, seed)

    @staticmethod
    def from_components(h: Sequence[float], b: Any, power: int = 10) -> _core.SaddleProblem:
        """The saddle problem with explicit components b, shape (n, d), used as given.

        F then keeps the term mean(b)^T x if the b_i do not have mean zero, and ``noise_cov``
        is their covariance about that mean.
        """
        hv = _real_array("h", h, _f64, (None,))
        bm = _real_array("b", b, _f64, (None, hv.shape[0]))
        return _core.SaddleProblem.from_components(hv, bm, _integer("power", power))


class ReddiCounterexample(_Picklable, _core.ReddiCounterexample):
    """The counterexample of Sec. 3.2: F(x) = zeta x on [-1, 1], minimised at x = -1.

    The stochastic gradient is C with probability p = (1 + zeta) / (C + 1) and -1 otherwise, so
    E[g] = zeta and E[g^2] = p C^2 + 1 - p (``second_moment``). Iterates are projected onto
    [-1, 1] after every step.

    Raises:
        ValueError: unless C > 0 and -1 < zeta < C.
    """

    def __init__(self, C: float, zeta: float) -> None:
        super().__init__(_real("C", C), _real("zeta", zeta))
        self._remember(C, zeta)


class NoisyQuadratic(_Picklable, _core.NoisyQuadratic):
    """F(x) = x^T H x / 2 with Gaussian gradient noise: g = H x + xi, xi ~ N(0, noise_cov).

    Args:
        H: (d, d) symmetric.
        noise_cov: (d, d) symmetric positive semi-definite, or its diagonal (d,).
    """

    def __init__(self, H: Any, noise_cov: Any) -> None:
        Hm = np.asarray(H)
        if Hm.ndim != 2:
            raise ValueError(f"H must have shape (d, d), got shape {Hm.shape}")
        Hm = _real_array("H", Hm, _f64, (Hm.shape[0], Hm.shape[0]))
        super().__init__(Hm, _vector_or_matrix("noise_cov", noise_cov, Hm.shape[0]))
        self._remember(Hm, np.asarray(noise_cov))


class LogisticRegression(_Picklable, _core.LogisticRegression):
    """Softmax regression: x = [W (K x p) row-major, b (K)], dim = K (p + 1).

    F(x) = mean_i CE(softmax(W a_i + b), y_i) + l2 / 2 ||W||^2, evaluated exactly over all rows
    (for records); a stochastic gradient averages ``batch_size`` rows drawn uniformly with
    replacement by the run's generator (one epoch = n / batch_size steps).

    Args:
        X: (n, p) features. y: (n,) integer labels in [0, classes).
        batch_size: rows per stochastic gradient. l2: the weight penalty (>= 0).
        classes: K (None: one more than the largest label, at least 2).
    """

    def __init__(self, X: Any, y: Any, batch_size: int, l2: float = 0.0,
                 classes: int | None = None) -> None:
        Xm = np.asarray(X)
        if Xm.ndim != 2:
            raise ValueError(f"X must have shape (n, p), got shape {Xm.shape}")
        Xm = _real_array("X", Xm, _f64, (None, None))
        ya = np.asarray(y)
        if ya.dtype.kind not in "iu":
            raise ValueError(f"y must hold integer labels, got dtype {ya.dtype}")
        if ya.size and ya.max() >= 2**31:  # before int64 conversion could wrap a uint64
            raise ValueError(f"labels must be < 2**31, got {ya.max()}")
        if ya.shape != (Xm.shape[0],):
            raise ValueError(f"y must have shape ({Xm.shape[0]},), got shape {ya.shape}")
        super().__init__(Xm, ya.astype(np.int64), _integer("batch_size", batch_size),
                         _real("l2", l2), 0 if classes is None else _integer("classes", classes))
        self._remember(Xm, ya, batch_size, l2, classes)


class Oracle(_Picklable, _core.Oracle):
    """A problem given by Python callables.

    Args:
        oracle: ``oracle(x, rng) -> g``: a stochastic gradient at x (a copy; shape (dim,)), with
            rng a numpy Generator owned by the run.
        dim: the dimension.
        value: optional ``value(x) -> float`` (F, recorded by runs).
        gradient: optional ``gradient(x) -> array`` (grad F, recorded by runs).

    The native loop re-acquires the GIL for each call only.
    """

    def __init__(self, oracle: Callable[[np.ndarray, np.random.Generator], Any], dim: int,
                 value: Callable[[np.ndarray], float] | None = None,
                 gradient: Callable[[np.ndarray], Any] | None = None) -> None:
        for name, fn in (("oracle", oracle), ("value", value), ("gradient", gradient)):
            if fn is not None and not callable(fn):
                raise ValueError(f"{name} must be callable, got {type(fn).__name__}")
        if oracle is None:
            raise ValueError("oracle must be callable, got None")
        super().__init__(_integer("dim", dim), oracle, value, gradient)
        self._remember(oracle, dim, value, gradient)


def function_address(function: Any) -> int:
    """The address of a C function: a ctypes function pointer, an object with an ``address``
    attribute (``numba.cfunc``), or an int. Anything else is a ValueError."""
    import ctypes

    if isinstance(function, ctypes._CFuncPtr):  # type: ignore[attr-defined]
        address = ctypes.cast(function, ctypes.c_void_p).value
    elif hasattr(function, "address") and not callable(getattr(function, "address")):
        address = function.address
    elif isinstance(function, (int, np.integer)) and not isinstance(function, bool):
        address = int(function)
    else:
        raise ValueError(f"function must be a ctypes function pointer, a numba cfunc or an "
                         f"address, got {type(function).__name__}")
    if not address:
        raise ValueError("the function address is null")
    return int(address)


def NativeOracle(function: Any, dim: int) -> Problem:  # noqa: N802 (a constructor)
    """A problem whose stochastic gradient is a C function, called without the GIL:

        void oracle(int64_t dim, const double* x, double* g, uint64_t key);

    It writes a stochastic gradient at x into g. ``key`` is a fresh 64-bit number drawn from the
    run's generator for each call: derive the call's randomness from it (and nothing else) and
    runs are reproducible and safe on run_many's threads.

    Args:
        function: a ctypes function pointer (``ctypes.CFUNCTYPE(None, c_int64, POINTER(c_double),
            POINTER(c_double), c_uint64)``), a ``numba.cfunc``, or the address as an int. The
            problem keeps the object alive; code behind a bare int address is the caller's to
            keep loaded.
        dim: the dimension.
    """
    return _core.native_problem(_integer("dim", dim), function_address(function), function)


def as_problem(problem: Any, dim: int) -> Problem:
    """A problem unchanged, or a callable ``oracle(x, rng)`` as an :class:`Oracle` of dim."""
    if isinstance(problem, Problem):
        return problem
    if callable(problem):
        return Oracle(problem, dim)
    raise ValueError(f"problem must be a saddlescape problem or a callable oracle(x, rng), "
                     f"got {type(problem).__name__}")
