"""Streaming estimates of the gradient second moment G = E[g g^T] (Sec. 4.1, Theorem 4.1).

:class:`EMAEstimator` keeps the exponential moving average

    G_t = beta_t G_(t-1) + (1 - beta_t) g_t g_t^T,    G_0 = 0,

in full, diagonal or block-diagonal structure, with beta a constant or a schedule (see
:mod:`saddlescape.schedules`; step t of the schedule is the t-th update, from 0), and turns it
into the preconditioner (G_t + eps I)^(-1/2) through :mod:`saddlescape.matrix_functions`.
:class:`CovarianceEstimator` averages (g1 - g2)(g1 - g2)^T / 2 instead, an unbiased estimate of
Cov(g) from two independent gradients (Sec. 5.3). :func:`burn_in` is Algorithm 3's burn-in.

All arithmetic is native: a full update is one BLAS ``syr`` on a triangle with the decay folded
into a running scale factor, a batch is one weighted ``syrk``, the diagonal update one fused
pass. A gradient with a NaN or Inf entry, or of the wrong shape, raises ValueError and leaves
the estimate exactly as it was.

Estimator methods hold the GIL while they run, so one estimator may be shared by several Python
threads (their calls are serialised); separate estimators do not run in parallel either. The
matrix functions of :mod:`saddlescape.matrix_functions` release the GIL.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Sequence

import numpy as np
import numpy.typing as npt

from saddlescape import _core
from saddlescape._validation import choice, float_dtype, integer, real, real_array
from saddlescape.schedules import Schedule, as_schedule

Structure = Literal["full", "diag", "block"]
Form = Literal["inv_sqrt", "adam"]

__all__ = ["CovarianceEstimator", "EMAEstimator", "burn_in"]

STATE_VERSION = 1


def _beta(beta: float | Schedule) -> Schedule:
    schedule = as_schedule("beta", beta)
    if not isinstance(beta, Schedule) and not 0.0 <= float(beta) < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta!r}")
    return schedule


def _blocks(block_sizes: Sequence[int] | None) -> list[int]:
    return [] if block_sizes is None else [integer("block_sizes entry", b) for b in block_sizes]


class EMAEstimator:
    """Exponential moving average of g g^T, the second-moment estimate of RMSProp and Adam.

    Args:
        dim: the dimension d of the gradients, >= 1.
        structure: ``"full"`` (d x d), ``"diag"`` (the diagonal: RMSProp's estimate) or
            ``"block"`` (diagonal blocks of ``block_sizes``).
        beta: the EMA weight, a number in [0, 1) or a schedule of such numbers.
        block_sizes: for ``"block"``: positive sizes summing to dim.
        bias_correction: if True, :meth:`estimate` divides by 1 - prod_t beta_t (1 - beta^t for
            a constant beta), Adam's correction for the zero start.
        dtype: float32 or float64, for the stored estimate and every result.
        refresh_every: :meth:`preconditioner` and :meth:`apply` reuse the eigendecomposition of
            the estimate until this many updates have happened since it was computed (>= 1;
            1 recomputes after every update).
        max_consecutive_failures, fallback_eps: the fallback policy of the full and block
            factorisations: a block whose eigendecomposition fails numerically is retried in
            float64 (float32 estimates: the eigenpairs rounded to float32), then with
            G_b + fallback_eps I (if fallback_eps > 0), else keeps its previous factorisation
            and is refactored at the next use; the max_consecutive_failures-th kept one in a
            row, or a failure with nothing to keep, raises NumericalError naming the block.
            Counted in :meth:`fallback_statistics` (not part of :meth:`state_dict`).

    Raises:
        ValueError: dim < 1, beta outside [0, 1), block sizes that are not positive or do not
            sum to dim, block_sizes with another structure, an unknown structure or dtype,
            refresh_every < 1, max_consecutive_failures < 1, fallback_eps < 0.
    """

    def __init__(
        self,
        dim: int,
        *,
        structure: Structure = "full",
        beta: float | Schedule = 0.99,
        block_sizes: Sequence[int] | None = None,
        bias_correction: bool = False,
        dtype: npt.DTypeLike = np.float64,
        refresh_every: int = 1,
        max_consecutive_failures: int = 3,
        fallback_eps: float = 0.0,
    ) -> None:
        self._dtype = float_dtype(dtype)
        self._bias_correction = bool(bias_correction)
        cls = _core.EMAEstimator_float64 if self._dtype == np.float64 else _core.EMAEstimator_float32
        self._impl = cls(
            integer("dim", dim),
            _beta(beta),
            choice("structure", structure, ("full", "diag", "block")),
            _blocks(block_sizes),
            self._bias_correction,
            integer("refresh_every", refresh_every),
        )
        self._impl.set_fallback(integer("max_consecutive_failures", max_consecutive_failures),
                                real("fallback_eps", fallback_eps))
        self._beta_schedule = as_schedule("beta", beta)

    def fallback_statistics(self) -> dict[str, list[int]]:
        """Per block: ``failed_refreshes``, ``float64_retries`` (always 0 for float64),
        ``eps_retries``, ``kept_bases`` and ``consecutive_failures`` of the fallback policy
        (empty lists for "diag")."""
        return dict(self._impl.fallback_statistics())

    def _inject_factor_failures(self, block: int, attempts: int, stages: int = 3) -> None:
        """Test hook: the next ``attempts`` factorisations of ``block`` that commit see their
        first ``stages`` solver calls fail (1: the first; 2: also the float64 retry of a
        float32 estimate; 3: also the fallback_eps retry)."""
        self._impl.inject_factor_failures(integer("block", block), integer("attempts", attempts),
                                          integer("stages", stages))

    @classmethod
    def _wrap(cls, impl: Any, dtype: np.dtype, bias_correction: bool, beta: Schedule) -> "EMAEstimator":
        self = cls.__new__(cls)
        self._impl, self._dtype = impl, dtype
        self._bias_correction, self._beta_schedule = bias_correction, beta
        return self

    @property
    def dim(self) -> int:
        """The dimension d."""
        return self._impl.dim

    @property
    def structure(self) -> str:
        """``"full"``, ``"diag"`` or ``"block"``."""
        return self._impl.structure

    @property
    def block_sizes(self) -> list[int]:
        """The block sizes ([d] for full, [] for diag)."""
        return list(self._impl.block_sizes)

    @property
    def dtype(self) -> np.dtype:
        """The dtype of the estimate."""
        return self._dtype

    @property
    def beta(self) -> Schedule:
        """The EMA weight as a schedule (a constant one for a number)."""
        return self._beta_schedule

    @property
    def steps(self) -> int:
        """The number of updates so far."""
        return self._impl.steps

    def update(self, g: npt.ArrayLike) -> None:
        """One EMA step with the sample g g^T (diag: g * g; block: each diagonal block).

        Raises:
            ValueError: g's shape is not (dim,), g has a NaN or Inf entry (named), or the beta
                schedule leaves [0, 1) at this step. The estimate is then unchanged.
        """
        if not (type(g) is np.ndarray and g.dtype == self._dtype and g.flags.c_contiguous):
            g = real_array("g", g, self._dtype, (self.dim,))
        self._impl.update(g)  # checks the shape again

    def update_batch(self, gs: npt.ArrayLike) -> None:
        """k EMA steps with the rows of gs, shape (k, dim), as one weighted rank-k update.

        The result equals k calls of :meth:`update` up to rounding: the estimate becomes
        (prod_i beta_i) G + sum_i (1 - beta_i) prod_(j > i) beta_j g_i g_i^T, done with one BLAS
        syrk on the rows scaled by the square roots of those weights.

        Raises:
            ValueError: as :meth:`update`, for any row; the estimate is then unchanged.
        """
        self._impl.update_batch(real_array("gs", gs, self._dtype, (None, self.dim)))

    def estimate(self) -> np.ndarray | list[np.ndarray]:
        """The current estimate: a (d, d) symmetric array, a (d,) array, or a list of blocks.

        Zero before the first update. With ``bias_correction`` divided by 1 - prod_t beta_t.
        """
        return self._impl.estimate()

    def preconditioner(self, eps: float, form: Form = "inv_sqrt") -> np.ndarray | list[np.ndarray]:
        """A = (G_t + eps I)^(-1/2), or (G_t^(1/2) + eps I)^(-1) for ``form="adam"``, in the layout
        of :meth:`estimate`.

        Raises:
            ValueError: eps < 0 or not finite, an unknown form.
            NumericalError: eps = 0 and the estimate is singular (always so before the first
                update, and for a full estimate of fewer than d samples).
        """
        return self._impl.preconditioner(2, real("eps", eps), choice("form", form, ("inv_sqrt", "adam")))

    def apply(self, v: npt.ArrayLike, eps: float, form: Form = "inv_sqrt") -> np.ndarray:
        """A v for the preconditioner A of :meth:`preconditioner`, without forming A.

        Raises:
            ValueError: v's shape is not (dim,) or v has a NaN or Inf entry; as
                :meth:`preconditioner` otherwise.
            NumericalError: as :meth:`preconditioner`.
        """
        return self._impl.apply(real_array("v", v, self._dtype, (self.dim,)), 2, real("eps", eps),
                                choice("form", form, ("inv_sqrt", "adam")))

    def state_dict(self) -> dict[str, np.ndarray]:
        """The state as a versioned dict of numpy arrays.

        The estimate is stored raw (G = scale * S, only the lower triangles of S meaningful), so
        that an estimator loaded from it continues bit for bit. The beta schedule is
        configuration, not state: construct the new estimator with the same one. The cached
        factorisation is not saved, only when it was made ("factored_at"): a loaded estimator
        factors at its first use and then refreshes on the saved schedule.
        """
        steps, scale, beta_product, data, factored_at = self._impl.save()
        return {
            "version": np.array(STATE_VERSION),
            "structure": np.array(self.structure),
            "dim": np.array(self.dim),
            "block_sizes": np.array(self.block_sizes, dtype=np.int64),
            "bias_correction": np.array(self._bias_correction),
            "steps": np.array(steps, dtype=np.int64),
            "scale": np.array(scale, dtype=np.float64),
            "beta_product": np.array(beta_product, dtype=np.float64),
            "data": data,
            "factored_at": np.array(factored_at, dtype=np.int64),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a :meth:`state_dict` of an estimator of the same configuration.

        Raises:
            ValueError: a missing key, another version, structure, dim, block sizes, bias
                correction or dtype, or values out of range; the estimator is then unchanged.
        """
        missing = {"version", "structure", "dim", "block_sizes", "bias_correction", "steps", "scale",
                   "beta_product", "data"} - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}")
        if int(state["version"]) != STATE_VERSION:
            raise ValueError(f"state version must be {STATE_VERSION}, got {state['version']!r}")
        mine = {"structure": self.structure, "dim": self.dim, "block_sizes": self.block_sizes,
                "bias_correction": self._bias_correction}
        theirs = {"structure": str(state["structure"]), "dim": int(state["dim"]),
                  "block_sizes": [int(b) for b in np.asarray(state["block_sizes"]).ravel()],
                  "bias_correction": bool(state["bias_correction"])}
        for key, value in mine.items():
            if theirs[key] != value:
                raise ValueError(f"state {key} is {theirs[key]!r}, this estimator has {value!r}")
        data = np.asarray(state["data"])
        if data.dtype != self._dtype:
            raise ValueError(f"state data has dtype {data.dtype}, this estimator has {self._dtype}")
        self._impl.load(integer("steps", int(state["steps"])), real("scale", state["scale"]),
                        real("beta_product", state["beta_product"]), np.ascontiguousarray(data),
                        integer("factored_at", int(state.get("factored_at", -1))))

    def __repr__(self) -> str:
        return (f"EMAEstimator(dim={self.dim}, structure={self.structure!r}, beta={self.beta!r}, "
                f"dtype={self._dtype.name}, steps={self.steps})")


class CovarianceEstimator:
    """EMA of (g1 - g2)(g1 - g2)^T / 2 for two independent gradients at the same point.

    Since E[(g1 - g2)(g1 - g2)^T] = 2 Cov(g), this is an unbiased estimate of the gradient
    covariance, which a plain EMA of g g^T is not (it estimates Cov(g) + grad f grad f^T). The
    arguments are those of :class:`EMAEstimator`; ``beta`` is required.
    """

    def __init__(
        self,
        dim: int,
        *,
        beta: float | Schedule,
        structure: Structure = "full",
        block_sizes: Sequence[int] | None = None,
        bias_correction: bool = False,
        dtype: npt.DTypeLike = np.float64,
        refresh_every: int = 1,
    ) -> None:
        dt = float_dtype(dtype)
        cls = _core.CovarianceEstimator_float64 if dt == np.float64 else _core.CovarianceEstimator_float32
        self._impl = cls(integer("dim", dim), _beta(beta),
                         choice("structure", structure, ("full", "diag", "block")),
                         _blocks(block_sizes), bool(bias_correction),
                         integer("refresh_every", refresh_every))
        # The EMA view shares the native object; estimate(), preconditioner() etc. come from it.
        self.ema = EMAEstimator._wrap(self._impl.ema, dt, bool(bias_correction), as_schedule("beta", beta))

    def update_pair(self, g1: npt.ArrayLike, g2: npt.ArrayLike) -> None:
        """One EMA step with (g1 - g2)(g1 - g2)^T / 2.

        Raises:
            ValueError: g1 or g2 of the wrong shape or with a NaN or Inf entry (named); the
                estimate is then unchanged.
        """
        d, dt = self.ema.dim, self.ema.dtype
        self._impl.update_pair(real_array("g1", g1, dt, (d,)), real_array("g2", g2, dt, (d,)))

    def __getattr__(self, name: str) -> Any:
        # estimate, preconditioner, apply, steps, state_dict, ... of the underlying EMA.
        if name in {"_impl", "ema"}:
            raise AttributeError(name)
        return getattr(self.ema, name)


def burn_in(
    estimator: EMAEstimator | CovarianceEstimator,
    oracle: Callable[[np.ndarray, np.random.Generator], npt.ArrayLike],
    x0: npt.ArrayLike,
    steps: int,
    seed: int | np.random.Generator = 0,
) -> None:
    """Algorithm 3's burn-in: ``steps`` samples of ``oracle(x0, rng)`` fed to the estimator while
    x stays at x0.

    For a :class:`CovarianceEstimator` each step draws two independent samples and calls
    :meth:`CovarianceEstimator.update_pair`.

    Args:
        estimator: the estimator to update in place.
        oracle: a stochastic gradient oracle ``oracle(x, rng) -> g``; rng is a numpy Generator.
        x0: the point; the oracle receives a read-only copy, so x0 cannot change.
        steps: the number of samples, >= 0.
        seed: an int seed or a numpy Generator.

    Raises:
        ValueError: steps < 0, or a sample that the estimator rejects (wrong shape, NaN, Inf);
            the samples before it have been applied.
    """
    n = integer("steps", steps)
    if n < 0:
        raise ValueError(f"steps must be >= 0, got {n}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(integer("seed", seed))
    x = np.array(x0, dtype=np.float64)
    x.setflags(write=False)
    for _ in range(n):
        if isinstance(estimator, CovarianceEstimator):
            estimator.update_pair(oracle(x, rng), oracle(x, rng))
        else:
            estimator.update(oracle(x, rng))
