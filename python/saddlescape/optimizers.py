"""The step rules of the paper (Algorithms 1-4) and Adam, computed in C++.

Every optimizer updates a float64 array in place, ``opt.step(x, g)``: x <- x - lr_t A_t g_t.

* :class:`SGD`: A = I.
* :class:`PreconditionedSGD` (Algorithm 1): A = A(x_t) from an oracle, or the idealized
  (E[g g^T](x_t) + eps I)^(-1/2) of a problem that knows E[g g^T].
* :class:`RMSProp` (Algorithms 2 and 3): G_t = beta_t G_(t-1) + (1 - beta_t) g_t g_t^T with
  G_0 = 0 and no bias correction, then A_t = (G_t + eps I)^(-1/2) (form "inv_sqrt", the paper's)
  or (G_t^(1/2) + eps I)^(-1) (form "adam", what RMSProp implementations compute); full,
  diagonal or block-diagonal; ``burn_in = W`` makes the first W steps update G only.
* :class:`Adam`: first moment and bias corrections on top of the same preconditioners.
* :class:`SaddleEscape` (Algorithm 4): step size r at the steps t with t mod t_thresh == 0.

Counters: lr_t is evaluated at t = the number of earlier steps that moved x (burn-in steps do not
count); beta_t at the number of earlier updates of the estimate (burn-in and hallucinated samples
count). A NaN/Inf gradient raises ValueError and leaves x and the optimizer unchanged.
``state_dict()`` / ``load_state_dict()`` save and restore the complete state.

An optimizer is built for one dimension; SGD and PreconditionedSGD learn it from their first use.

Threads. Separate optimizers may be stepped or run in parallel threads (``run`` releases the
GIL) and give exactly the serial results. One optimizer shared by threads is guarded by a lock
(a SaddleEscape's together with its base's): ``step``, ``state_dict``, ``load_state_dict``,
``statistics`` and ``estimate`` calls from several threads are serialised; while a ``run`` or
``run_many`` advances it, any other use of it, from any thread (its own oracle's included),
raises RuntimeError instead of waiting for the run, and so does a second run of it, and a use
from inside its own step (a callable preconditioner stepping the optimizer it belongs to).
"""

from __future__ import annotations

import abc
import copy
import threading
from typing import Any, Callable, Sequence

import numpy as np

from saddlescape import _core
from saddlescape._validation import integer as _integer
from saddlescape._validation import real as _real
from saddlescape.problems import Problem, Sampler, function_address
from saddlescape.schedules import Schedule, as_schedule

__all__ = ["SGD", "Adam", "Optimizer", "PreconditionedSGD", "RMSProp", "SaddleEscape"]

_STRUCTURES = ("full", "diag", "block")


def _choice(name: str, value: Any, options: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}, got {value!r}")
    return value


def _blocks(block_sizes: Sequence[int] | None) -> list[int]:
    return [] if block_sizes is None else [_integer("block_sizes entry", b) for b in block_sizes]


def _dim(value: Any) -> int:
    d = _integer("dim", value)
    if d < 1:
        raise ValueError(f"dim must be >= 1, got {d}")
    return d


def _native_function(fn: Any) -> int | None:
    """The address of a C function (ctypes pointer or numba cfunc), or None for anything else."""
    import ctypes

    if isinstance(fn, ctypes._CFuncPtr) or (  # type: ignore[attr-defined]
            hasattr(fn, "address") and hasattr(fn, "ctypes")):  # numba.cfunc
        return function_address(fn)
    return None


class _Guard:
    """One optimizer's lock, with who holds it and whether a run does (see the module docstring:
    serialised calls, RuntimeError instead of waiting for a run or of deadlocking)."""

    __slots__ = ("_lock", "_owner", "_run", "_name")

    def __init__(self, name: str) -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._run = False
        self._name = name

    def acquire(self, run: bool) -> None:
        me = threading.get_ident()
        if self._owner == me:
            raise RuntimeError(f"this {self._name} is already in use on this thread (a run or step "
                               f"of it is calling back into it)")
        if self._run:
            raise RuntimeError(f"this {self._name} is being advanced by a run on another thread; "
                               f"one optimizer cannot be used by two threads at once")
        self._lock.acquire()
        self._owner, self._run = me, run

    def release(self) -> None:
        self._owner, self._run = None, False
        self._lock.release()


class _Exclusive:
    """Holds the guards of an optimizer's parts (ordered by id, so two holders cannot deadlock)."""

    __slots__ = ("_guards", "_run", "_taken")

    def __init__(self, optimizers: Sequence["Optimizer"], run: bool = False) -> None:
        guards = {id(g): g for o in optimizers for g in o._guards()}
        self._guards = [guards[k] for k in sorted(guards)]
        self._run = run
        self._taken: list[_Guard] = []

    def __enter__(self) -> None:
        try:
            for g in self._guards:
                g.acquire(self._run)
                self._taken.append(g)
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc: Any) -> None:
        while self._taken:
            self._taken.pop().release()


class Optimizer(abc.ABC):
    """Base class: the native object behind an optimizer, built once its dimension is known.

    Thread-safety: see the module docstring (one optimizer's calls are serialised by a lock;
    a use during a run of it raises RuntimeError)."""

    _native_obj: _core.Optimizer | None = None

    def _guards(self) -> list[_Guard]:
        """The locks of the native objects this optimizer steps (a SaddleEscape's and its
        base's), made at first use; dict.setdefault is atomic under the GIL."""
        g = self.__dict__.get("_guard") or self.__dict__.setdefault("_guard", _Guard(type(self).__name__))
        return [g]

    @abc.abstractmethod
    def _make(self, dim: int) -> _core.Optimizer:
        """The native optimizer for dimension dim (validated arguments, so errors name them)."""

    def _parts(self) -> list[Any]:
        """The native objects this optimizer steps (itself, and a SaddleEscape's base)."""
        return [self._native_obj]

    def _native(self, dim: int) -> _core.Optimizer:
        if self._native_obj is None:
            self._native_obj = self._make(_dim(dim))
        elif self._native_obj.dim != dim:
            raise ValueError(f"this optimizer works in dimension {self._native_obj.dim}, got {dim}")
        return self._native_obj

    @property
    def dim(self) -> int | None:
        """The dimension, or None before the first use of SGD / PreconditionedSGD."""
        return None if self._native_obj is None else self._native_obj.dim

    @property
    def steps(self) -> int:
        """Calls of step() so far, burn-in included."""
        return 0 if self._native_obj is None else self._native_obj.steps

    @property
    def moves(self) -> int:
        """Steps that moved x so far (the t of the next lr_t)."""
        return 0 if self._native_obj is None else self._native_obj.moves

    def lr(self, t: int) -> float:
        """The step size of the t-th moving step."""
        return self._native(self._require_dim()).lr(_integer("t", t))

    def _require_dim(self) -> int:
        if self._native_obj is None:
            raise ValueError(f"{type(self).__name__} learns its dimension from its first step")
        return self._native_obj.dim

    def step(self, x: np.ndarray, g: Any, source: Sampler | None = None) -> None:
        """x <- x - lr_t A_t g, in place.

        Args:
            x: a writable, C-contiguous float64 array of shape (dim,).
            g: the gradient at x, shape (dim,).
            source: a ``problem.sampler(seed)``, needed by SaddleEscape with hallucinate > 0.

        Raises:
            ValueError: for a wrong x or g, a NaN/Inf in g (x and state are then unchanged).
            NumericalError: when the direction cannot be computed.
            RuntimeError: a run of this optimizer is in progress (on any thread), or the call
                comes from inside this optimizer's own step (a callable preconditioner).
        """
        if not isinstance(x, np.ndarray):
            raise ValueError(f"x must be a numpy float64 array updated in place, got {type(x).__name__}")
        if x.ndim != 1:
            raise ValueError(f"x must have shape (d,), got shape {x.shape}")
        ga = np.asarray(g)
        if ga.dtype.kind in "iu":
            ga = ga.astype(np.float64)
        if source is not None and not isinstance(source, Sampler):
            raise ValueError(f"source must be a problem's sampler(seed), got {type(source).__name__}")
        guards = self._guards()
        if len(guards) != 1:
            with _Exclusive([self]):
                self._native(x.shape[0]).step(x, ga, source)
            return
        guard = guards[0]  # the common case without _Exclusive's bookkeeping: ~1 us, not ~5
        guard.acquire(False)
        try:
            self._native(x.shape[0]).step(x, ga, source)
        finally:
            guard.release()

    def state_dict(self) -> dict[str, Any]:
        """The state: ``{"kind", "arrays": {name: array}, "scalars": {name: float}}``.

        Loading it continues the run bit for bit, except that a cached factorisation is not
        saved, only when it was made: with refresh_every > 1 a loaded optimizer factors the
        loaded estimate at its next step, then refreshes on the saved schedule, so its
        directions agree with the uninterrupted run's again from that run's next refresh
        (solver "lowrank": they differ only by rounding).
        """
        with _Exclusive([self]):
            return self._native(self._require_dim()).state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a state_dict() of the same kind and shape; on a ValueError nothing changes."""
        if not isinstance(state, dict):
            raise ValueError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        if not isinstance(state.get("kind"), str):
            raise ValueError("the state's 'kind' must be a string")
        state = copy.deepcopy(state)
        with _Exclusive([self]):
            self._native(self._require_dim()).load_state_dict(state)

    def __repr__(self) -> str:
        return repr(self._native_obj) if self._native_obj is not None else f"{type(self).__name__}(unbuilt)"


class SGD(Optimizer):
    """x <- x - lr_t g. ``lr`` is a number or a schedule; ``dim`` is learnt from the first use."""

    def __init__(self, lr: float | Schedule, dim: int | None = None) -> None:
        self._lr = as_schedule("lr", lr)
        if dim is not None:
            self._native(dim)

    def _make(self, dim: int) -> _core.Optimizer:
        return _core.SGD(dim, self._lr)


class PreconditionedSGD(Optimizer):
    """Algorithm 1: x <- x - lr_t A(x_t) g_t.

    Args:
        lr: a number or a schedule.
        preconditioner: a callable ``A(x)`` returning a (d, d) matrix or a (d,) diagonal; or a
            problem that knows E[g g^T], for the idealized A(x) = f(E[g g^T](x)) with f of
            ``eps`` and ``form`` (the paper's idealized adaptive method); or a C function
            (ctypes function pointer or numba cfunc) computing the direction itself, called
            without the GIL: ``void A(int64_t dim, const double* x, const double* g,
            double* out)`` writes out = A(x) g (the optimizer keeps the object alive).
        eps, form: for the idealized preconditioner only.
        dim: the dimension (default: the problem's, or learnt from the first use).
    """

    def __init__(self, lr: float | Schedule, preconditioner: Problem | Callable[[np.ndarray], Any],
                 eps: float = 1e-8, form: str = "inv_sqrt", dim: int | None = None) -> None:
        self._lr = as_schedule("lr", lr)
        self._pre = preconditioner
        self._eps = _real("eps", eps)
        self._form = _choice("form", form, ("inv_sqrt", "adam"))
        self._native_fn = _native_function(preconditioner)
        if self._native_fn is not None:
            if dim is not None:
                self._native(dim)
        elif isinstance(preconditioner, Problem):
            if not preconditioner.has_second_moment:
                raise ValueError(f"{preconditioner!r} does not know E[g g^T]; pass a callable A(x)")
            self._native(preconditioner.dim if dim is None else dim)
        elif not callable(preconditioner):
            raise ValueError(f"preconditioner must be a callable A(x) or a problem, got "
                             f"{type(preconditioner).__name__}")
        elif dim is not None:
            self._native(dim)

    def _make(self, dim: int) -> _core.Optimizer:
        if self._native_fn is not None:
            return _core.PreconditionedSGD.native(dim, self._lr, self._native_fn, self._pre)
        if isinstance(self._pre, Problem):
            if dim != self._pre.dim:
                raise ValueError(f"dim = {dim} does not match the problem's dim {self._pre.dim}")
            return _core.PreconditionedSGD.idealized(self._pre, self._lr, self._eps, self._form)
        return _core.PreconditionedSGD(dim, self._lr, self._pre)


class RMSProp(Optimizer):
    """Algorithms 2 and 3 (full-matrix, block or diagonal RMSProp).

    Args:
        dim: the dimension.
        lr: step size, a number or a schedule (e.g. ``schedules.inverse_sqrt(0.001)``).
        beta: EMA weight, a number or a schedule (e.g. ``schedules.beta_from_lr_schedule(lr, C)``
            for beta_t = 1 - C lr_t^(2/3)).
        eps: > 0.
        structure: "full", "diag" or "block" (with ``block_sizes`` summing to dim).
        form: "inv_sqrt" ((G + eps I)^(-1/2), the paper's) or "adam" ((G^(1/2) + eps I)^(-1)).
        burn_in: W >= 0 steps that only update G (Algorithm 3).
        refresh_every: with solver "eigh", refactor G every k updates (1: exact; k > 1: A is up to
            k - 1 updates stale). With solver "lowrank", the period of its eigendecomposition.
        solver: "eigh" (default: an eigendecomposition per refresh) or "lowrank" (structure
            "full" with form inv_sqrt, or "block" with either form): exact at every step to ``tol`` at a fraction of the cost. Between
            eigendecompositions G_t + eps I = B + U W U^T, B known in its eigenbasis and U the
            gradients since, and A g = (2/pi) int_0^inf (G_t + eps I + s^2 I)^(-1) g ds by the
            trapezoidal rule in log s with Woodbury solves: O(d^2 + d k^2 n) per step (k <=
            refresh_every gradients since the last eigendecomposition, n ~ 100 quadrature
            nodes) plus an O(d^3) eigendecomposition every ``refresh_every`` updates (at most
            256; 16 to 32 is best at d = 1024). With structure "block" (either form) the
            solver is :class:`saddlescape.BlockEngine` in float64: every block exact at every
            step, its refreshes staggered across steps.
        tol: the lowrank solver's relative accuracy (quadrature), default 1e-10.
        max_consecutive_failures, fallback_eps: the fallback policy for a failed or non-finite
            refactorisation of a block (structure "full" is one block): retry with
            G_b + fallback_eps I if fallback_eps > 0, else keep the block's previous
            factorisation (the block engine of structure "block" with solver "lowrank": its
            previous eigenbasis, see :mod:`saddlescape.blocks`) and retry at the next step;
            raise NumericalError naming the block after max_consecutive_failures kept ones in a
            row (or when there is no previous one). Every fallback is counted in
            :meth:`statistics`. The estimate is float64, so there is no float64 retry.
            Structure "full"'s exact routes first fall back to another exact solver: a failed
            refresh of solver "lowrank" hands its step to the tridiagonal route (and is retried
            at the next step), a failed tridiagonal solve (solver "eigh", refresh_every=1,
            dim > 48) to the eigendecomposition and its policy above; each such failure is
            counted in ``failed_refreshes``.

    With d = 2 and structure "full" the inverse square root is computed in closed form.
    """

    def __init__(self, dim: int, lr: float | Schedule, beta: float | Schedule = 0.99,
                 eps: float = 1e-8, structure: str = "full", form: str = "inv_sqrt",
                 burn_in: int = 0, refresh_every: int = 1,
                 block_sizes: Sequence[int] | None = None, solver: str = "eigh",
                 tol: float = 1e-10, max_consecutive_failures: int = 3,
                 fallback_eps: float = 0.0) -> None:
        self._args = (
            as_schedule("lr", lr), as_schedule("beta", beta), _real("eps", eps),
            _choice("structure", structure, _STRUCTURES), _choice("form", form, ("inv_sqrt", "adam")),
            _integer("burn_in", burn_in), _integer("refresh_every", refresh_every),
            _blocks(block_sizes), _choice("solver", solver, ("eigh", "lowrank")), _real("tol", tol),
            _integer("max_consecutive_failures", max_consecutive_failures),
            _real("fallback_eps", fallback_eps))
        self._native(dim)  # built now: its dimension is known, and bad arguments fail here

    def _make(self, dim: int) -> _core.Optimizer:
        return _core.RMSProp(dim, *self._args)

    @property
    def burn_in_remaining(self) -> int:
        """Burn-in steps still to come."""
        return self._native_obj.burn_in_remaining

    @property
    def updates(self) -> int:
        """Updates of the estimate so far."""
        return self._native_obj.updates

    def statistics(self) -> dict[str, Any]:
        """Per-block figures of the factorised estimate, fallbacks included: the block
        engine's (structure "block", solver "lowrank"; see
        :meth:`saddlescape.BlockEngine.statistics`), else the estimator's fallback counters
        ``failed_refreshes``, ``eps_retries``, ``kept_bases``, ``consecutive_failures``; totals
        under ``total_*``.

        Raises:
            ValueError: for structure "diag" and the closed form of dim 2.
        """
        with _Exclusive([self]):
            return _statistics(self._native_obj)

    def _inject_refresh_failures(self, block: int, attempts: int, stages: int = 3) -> None:
        """Test hook: the next ``attempts`` refactorisations of ``block`` that commit see
        their first ``stages`` solver calls fail (as
        :meth:`saddlescape.BlockEngine._inject_refresh_failures`)."""
        _inject(self._native_obj, block, attempts, stages)

    def estimate(self) -> np.ndarray:
        """G_t: (d, d) for full, (d,) for diag, the blocks (row-major) back to back for block."""
        with _Exclusive([self]):
            e = self._native_obj.estimate()
        d = self._native_obj.dim
        return e.reshape(d, d) if self._native_obj.structure == "full" else e


def _statistics(native: Any) -> dict[str, Any]:
    s = dict(native.statistics())
    for key in ("refreshes", "failed_refreshes", "float64_retries", "eps_retries", "kept_bases"):
        if key in s:
            s[f"total_{key}"] = int(sum(s[key]))
    return s


def _inject(native: Any, block: int, attempts: int, stages: int) -> None:
    native.inject_refresh_failures(_integer("block", block), _integer("attempts", attempts),
                                   _integer("stages", stages))


class Adam(Optimizer):
    """Adam with a full, diagonal or block second moment.

    m_t = beta1 m_(t-1) + (1 - beta1) g_t, G_t the EMA of g g^T with beta2, and
    x <- x - lr_t f(G_t / (1 - prod beta2)) m_t / (1 - beta1^t), f of ``form`` ("adam":
    (G^(1/2) + eps I)^(-1), Adam's own; "inv_sqrt": (G + eps I)^(-1/2)).

    ``max_consecutive_failures`` and ``fallback_eps``: the fallback policy of the full and block
    structures' factorisations, as :class:`RMSProp`'s; :meth:`statistics` counts the fallbacks.
    """

    def __init__(self, dim: int, lr: float | Schedule = 0.001, beta1: float = 0.9,
                 beta2: float | Schedule = 0.999, eps: float = 1e-8, structure: str = "diag",
                 form: str = "adam", refresh_every: int = 1,
                 block_sizes: Sequence[int] | None = None, max_consecutive_failures: int = 3,
                 fallback_eps: float = 0.0) -> None:
        self._args = (
            as_schedule("lr", lr), _real("beta1", beta1), as_schedule("beta2", beta2),
            _real("eps", eps), _choice("structure", structure, _STRUCTURES),
            _choice("form", form, ("inv_sqrt", "adam")), _integer("refresh_every", refresh_every),
            _blocks(block_sizes), _integer("max_consecutive_failures", max_consecutive_failures),
            _real("fallback_eps", fallback_eps))
        self._native(dim)  # built now: its dimension is known, and bad arguments fail here

    def _make(self, dim: int) -> _core.Optimizer:
        return _core.Adam(dim, *self._args)

    def statistics(self) -> dict[str, Any]:
        """Structures "full" and "block": the fallback counters per block (as
        :meth:`RMSProp.statistics`). Raises ValueError for "diag"."""
        with _Exclusive([self]):
            return _statistics(self._native_obj)

    def _inject_refresh_failures(self, block: int, attempts: int, stages: int = 3) -> None:
        """Test hook, as :meth:`RMSProp._inject_refresh_failures`."""
        _inject(self._native_obj, block, attempts, stages)


class SaddleEscape(Optimizer):
    """Algorithm 4 over a base optimizer: step size r at the steps t with t mod t_thresh == 0
    (t counted from 0 over the steps that move x), the base's lr_t otherwise.

    With ``hallucinate = S > 0`` (an RMSProp or Adam base): after each large step from x_t to
    x_(t+1) (projected), the base's estimate is fed S stochastic gradients at
    x_t + (k / S)(x_(t+1) - x_t), k = 1..S, so that as far as the estimator sees no step is
    longer than max(lr, r / S). This is the library's reading of the paper's Appendix B, not a
    reproduction of it. ``step`` then needs ``source=problem.sampler(seed)``; ``run`` passes it.

    The base is used, not copied: do not step it separately.
    """

    def __init__(self, base: Optimizer, r: float, t_thresh: int, hallucinate: int = 0) -> None:
        if not isinstance(base, Optimizer):
            raise ValueError(f"base must be a saddlescape optimizer, got {type(base).__name__}")
        self._base = base
        self._r = _real("r", r)
        self._t_thresh = _integer("t_thresh", t_thresh)
        self._hallucinate = _integer("hallucinate", hallucinate)
        if not (np.isfinite(self._r) and self._r > 0):
            raise ValueError(f"r must be finite and > 0, got {self._r}")
        if self._t_thresh < 1:
            raise ValueError(f"t_thresh must be >= 1, got {self._t_thresh}")
        if self._hallucinate < 0:
            raise ValueError(f"hallucinate must be >= 0, got {self._hallucinate}")
        if base.dim is not None:
            self._native(base.dim)

    def _make(self, dim: int) -> _core.Optimizer:
        return _core.SaddleEscape(self._base._native(dim), self._r, self._t_thresh, self._hallucinate)

    def _parts(self) -> list[Any]:
        return [self._native_obj] + self._base._parts()

    def _guards(self) -> list[_Guard]:
        return super()._guards() + self._base._guards()

    @property
    def burn_in_remaining(self) -> int:
        return 0 if self._native_obj is None else self._native_obj.burn_in_remaining
