"""Block-diagonal full-matrix RMSProp over one flat parameter vector: the block engine.

Real models have 10^4 to 10^8 parameters, so full-matrix preconditioning is only usable
block-diagonally. :class:`BlockEngine` cuts a flat vector of ``dim`` entries into consecutive
blocks of the given sizes; block b keeps its own EMA estimate

    G_b,t = beta_t G_b,(t-1) + (1 - beta_t) g_b,t g_b,t^T,    G_b,0 = 0,

and gives the exact direction A_b g_b, A_b = (G_b + eps I)^(-1/2) (``form="inv_sqrt"``, the
paper's) or (G_b^(1/2) + eps I)^(-1) (``form="adam"``), at every step.

How it stays exact and fast. At a refresh a block eigendecomposes its estimate,
G_ref = V diag(lambda) V^T; until the next one it keeps the k gradients that arrived since, so
that G_t = gamma G_ref + sum_i w_i h_i h_i^T exactly, which in V's basis is diagonal plus rank k.
The direction is then f(G_t) g = V f(gamma Lambda + Q Q^T) V^T g, evaluated to ``tol`` (relative)
through the Stieltjes integral f(M) = int_0^inf rho(t) (M + t I)^(-1) dt by the trapezoidal rule
in log t with Woodbury solves: O(B^2 + N k^2 B) per block instead of an O(B^3) factorisation.
Refreshes are staggered: block b refactors ``refresh_every`` updates after its previous refresh,
counted from an offset of b mod refresh_every, so each step refactors about
n_blocks / refresh_every blocks; the worst step costs that many factorisations of the largest
blocks (over the threads) on top of every block's direction. A refresh of a rank-deficient
block (early in training, or gradients confined to a subspace) is a range refresh: the new
gradients' components in the previous null space are split off by Householder reflectors, and
Rayleigh-Ritz with the estimate on the m <= rank + k columns that can carry it gives the new
eigenpairs, O(B^2 m) instead of O(B^3) (taken when m <= 0.6 B in float32, 0.7 B in float64; every
16th refresh of a block is cold, so that the basis's rounding does not accumulate). Otherwise a
refresh is LAPACK ``syevd``, or with ``warm_start=True`` Jacobi sweeps on V^T G V from the previous basis when at most B of its
off-diagonal entries are above rounding (else syevd after that O(B^2) check). The warm start
pays only when the estimate barely moved between refreshes (beta very close to 1, or a refresh
soon after the last); for a typical beta = 0.99 over 16 updates it falls back every time
(bench/RESULTS.md), so it is off by default.

Threads: blocks are spread over ``SADDLESCAPE_NUM_THREADS`` threads (default: all cores) and the
GIL is released; results do not depend on the thread count. One engine serialises calls from
several Python threads; separate engines run in parallel.

Errors: a gradient of the wrong shape or dtype, or with a NaN/Inf entry, is a ValueError naming
it; a result that overflows is a :class:`saddlescape.NumericalError` naming the block. In every
case no block has changed.

Fallback policy of a refresh, per block (a failure in one block never changes another, and the
results stay independent of the thread count). A refactorisation fails when the eigensolver
reports failure or returns a non-finite eigenvalue; the block then retries

1. in float64 (float32 engines): the estimate promoted, eigendecomposed in double;
2. with ``fallback_eps > 0``: in float64, of G_b + fallback_eps I, so that until its next refresh
   the block's direction has a damping larger by (a decaying) fallback_eps;
3. else it keeps its previous eigenbasis V (the last good factorisation) with eigenvalue
   estimates diag(V^T G_b V), folds its gradient history into the estimate (which stays exact:
   :meth:`BlockEngine.estimate` is unaffected) and retries at its next update.

Each fallback is counted in :meth:`BlockEngine.statistics` (``failed_refreshes``,
``float64_retries``, ``eps_retries``, ``kept_bases``, ``consecutive_failures``). Reaching step 3
``max_consecutive_failures`` times in a row (default 3) raises :class:`saddlescape.NumericalError`
naming the block, with nothing changed; any successful refactorisation resets the count. The
test hook :meth:`BlockEngine._inject_refresh_failures` makes chosen solver calls of a chosen
block fail, so that the policy can be tested.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import numpy as np
import numpy.typing as npt

from saddlescape import _core
from saddlescape._validation import choice, float_dtype, integer, real
from saddlescape.schedules import Schedule, as_schedule

Form = Literal["inv_sqrt", "adam"]

__all__ = ["BlockEngine", "partition"]

# 2: the fallback counters in the per-block scalars; version 1 states still load (counters 0).
STATE_VERSION = 2
_LOADABLE_VERSIONS = (1, 2)


def partition(dim: int, block_size: int) -> list[int]:
    """Block sizes that cut ``dim`` entries into blocks of ``block_size``, the last one shorter.

    Raises:
        ValueError: dim < 1 or block_size < 1.
    """
    dim = integer("dim", dim)
    block_size = integer("block_size", block_size)
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    full, rest = divmod(dim, block_size)
    return [block_size] * full + ([rest] if rest else [])


class BlockEngine:
    """Block-diagonal full-matrix RMSProp with exact directions and staggered refreshes.

    Args:
        block_sizes: positive block sizes; the engine's dimension is their sum.
        beta: the EMA weight, a number in [0, 1) or a schedule (step t = the t-th update).
        eps: damping, > 0.
        form: ``"inv_sqrt"`` for (G + eps I)^(-1/2), ``"adam"`` for (G^(1/2) + eps I)^(-1).
        refresh_every: a block refactors once this many updates have passed since its last
            refresh (1 to 256; 1 refactors every block at every update).
        dtype: float32 or float64: the stored estimates, eigenbases and every input and result.
        tol: relative accuracy of the directions between refreshes; None: 1e-10 for float64,
            1e-6 for float32.
        bias_correction: divide the estimate by 1 - prod_t beta_t (Adam's correction).
        warm_start: refactor from the previous eigenbasis when only a few entries need
            rotating (see above); off by default.
        max_consecutive_failures: a block that keeps its previous basis (every retry of its
            refactorisation failed) this many times in a row raises NumericalError; >= 1.
        fallback_eps: > 0 enables the retry with G_b + fallback_eps I (see above); 0 skips it.

    Raises:
        ValueError: bad block sizes, beta, eps, form, refresh_every, tol or dtype, or buffers
            larger than the machine's memory (the message names the bytes needed).
    """

    def __init__(
        self,
        block_sizes: Sequence[int],
        *,
        beta: float | Schedule = 0.99,
        eps: float = 1e-8,
        form: Form = "inv_sqrt",
        refresh_every: int = 16,
        dtype: npt.DTypeLike = np.float32,
        tol: float | None = None,
        bias_correction: bool = False,
        warm_start: bool = False,
        max_consecutive_failures: int = 3,
        fallback_eps: float = 0.0,
    ) -> None:
        sizes = [integer("block_sizes entry", b) for b in block_sizes]
        schedule = as_schedule("beta", beta)
        if not isinstance(beta, Schedule) and not 0.0 <= float(beta) < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta!r}")
        self.dtype = float_dtype(dtype)
        t = 0.0 if tol is None else real("tol", tol)
        if tol is not None and not 1e-15 <= t < 1.0:
            raise ValueError(f"tol must be in [1e-15, 1), got {tol!r}")
        cls = _core.BlockEngine_float64 if self.dtype == np.float64 else _core.BlockEngine_float32
        self._engine = cls(
            sizes,
            schedule,
            real("eps", eps),
            choice("form", form, ("inv_sqrt", "adam")),
            integer("refresh_every", refresh_every),
            t,
            bool(bias_correction),
            bool(warm_start),
            integer("max_consecutive_failures", max_consecutive_failures),
            real("fallback_eps", fallback_eps),
        )
        self.beta = schedule
        self.eps = float(eps)
        self.form = form
        self.refresh_every = int(refresh_every)
        self.bias_correction = bool(bias_correction)
        self.warm_start = bool(warm_start)
        self.max_consecutive_failures = int(max_consecutive_failures)
        self.fallback_eps = float(fallback_eps)

    @property
    def dim(self) -> int:
        """The length of the flat vector."""
        return int(self._engine.dim)

    @property
    def block_sizes(self) -> list[int]:
        return list(self._engine.block_sizes)

    @property
    def block_offsets(self) -> list[int]:
        """Where each block starts in the flat vector."""
        return list(self._engine.block_offsets)

    @property
    def updates(self) -> int:
        """EMA updates so far (a batch of k counts k)."""
        return int(self._engine.updates)

    @property
    def memory_bytes(self) -> int:
        """Bytes of the engine's buffers: 2 B^2 per block (estimate and eigenbasis), the
        gradient history (2 refresh_every B per block) and the refresh buffers."""
        return int(self._engine.memory_bytes)

    def _vector(self, name: str, v: npt.ArrayLike) -> np.ndarray:
        a = np.asarray(v)
        if a.dtype != self.dtype and a.dtype.kind in "fiu":
            a = a.astype(self.dtype)
        return np.ascontiguousarray(a)

    def update(self, g: npt.ArrayLike) -> None:
        """One EMA update of every block with the gradient g (shape (dim,))."""
        self._engine.update(self._vector("g", g))

    def update_batch(self, gs: npt.ArrayLike) -> None:
        """len(gs) EMA updates with the rows of gs (shape (k, dim)) as one rank-k step per block.

        A block whose history would exceed refresh_every gradients refactors instead."""
        self._engine.update_batch(self._vector("gs", gs))

    def direction(self, v: npt.ArrayLike) -> np.ndarray:
        """A v for the current estimate, without changing it."""
        a = self._vector("v", v)
        out = np.empty(a.shape, dtype=self.dtype)
        self._engine.direction(a, out)
        return out

    def update_direction(self, g: npt.ArrayLike, v: npt.ArrayLike | None = None) -> np.ndarray:
        """:meth:`update` with g, then A g (RMSProp's direction), or A v for the updated
        estimate when v is given (Adam's: v the bias-corrected first moment), in the same pass.
        With v, a block whose low-rank update is unstable (the adam form where new gradients
        reach eigenvalues of G_b near rounding, or its null space in too few directions)
        refactors once and keeps it, where :meth:`update` then :meth:`direction` would
        refactor it again at every call."""
        a = self._vector("g", g)
        out = np.empty(a.shape, dtype=self.dtype)
        if v is None:
            self._engine.update_direction(a, out)
        else:
            self._engine.update_and_direction(a, self._vector("v", v), out)
        return out

    def step(self, x: np.ndarray, g: npt.ArrayLike, lr: float) -> None:
        """:meth:`update` with g, then x <- x - lr A g in place.

        x must be a C-contiguous, writeable array of the engine's dtype (it is not copied).
        On any error x and the estimates are unchanged."""
        if not isinstance(x, np.ndarray):
            raise ValueError(f"x must be a numpy array (updated in place), got {type(x).__name__}")
        self._engine.step(x, self._vector("g", g), real("lr", lr))

    def set_beta(self, beta: float | Schedule) -> None:
        """Use ``beta`` (a number in [0, 1) or a schedule of the update count) for the updates
        to come, e.g. each step's 1 - C lr_t^(2/3) under a changing step size. The beta is
        configuration, not state: :meth:`state_dict` does not save it."""
        schedule = as_schedule("beta", beta)
        if not isinstance(beta, Schedule) and not 0.0 <= float(beta) < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta!r}")
        self._engine.set_beta(schedule)
        self.beta = schedule

    def refresh(self, block: int | None = None, warm: bool = True) -> None:
        """Refactor one block (or all, block=None) now; the estimate itself does not change."""
        self._engine.refresh(-1 if block is None else integer("block", block), bool(warm))

    def estimate(self) -> list[np.ndarray]:
        """The estimates G_b (bias-corrected if requested), one (B, B) array per block."""
        return list(self._engine.estimate())

    def statistics(self) -> dict[str, Any]:
        """Per-block figures for logging, as plain numbers: ``refreshes``, ``warm_refreshes``
        (refreshes started from the previous basis: range refreshes of rank-deficient blocks
        and converged Jacobi warm starts), ``fallbacks`` (warm starts that fell back to syevd), ``lambda_min``/``lambda_max`` of G_b
        at its last refresh, ``condition`` ((lambda_max + eps) / (lambda_min + eps)) and
        ``pending`` (gradients held since the refresh), and the fallback policy's
        ``failed_refreshes``, ``float64_retries``, ``eps_retries``, ``kept_bases`` and
        ``consecutive_failures``; totals under ``total_*``."""
        s = dict(self._engine.statistics())
        s["condition"] = [
            (hi + self.eps) / (lo + self.eps) for lo, hi in zip(s["lambda_min"], s["lambda_max"])
        ]
        for key in ("refreshes", "warm_refreshes", "fallbacks", "failed_refreshes",
                    "float64_retries", "eps_retries", "kept_bases"):
            s[f"total_{key}"] = int(sum(s[key]))
        s["updates"] = self.updates
        return s

    def state_dict(self) -> dict[str, Any]:
        """The complete state (numpy arrays and numbers); loading it continues bit for bit."""
        updates, product, data, scalars = self._engine.save()
        return {
            "version": STATE_VERSION,
            "kind": "BlockEngine",
            "block_sizes": self.block_sizes,
            "refresh_every": self.refresh_every,
            "dtype": str(self.dtype),
            "updates": int(updates),
            "beta_product": float(product),
            "data": data,
            "scalars": scalars,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` of an engine of the same configuration.

        Raises:
            ValueError: naming the field, for a state of another configuration or with bad
                entries; the engine is then unchanged.
        """
        if not isinstance(state, dict) or state.get("kind") != "BlockEngine":
            raise ValueError("the state is not a BlockEngine state_dict")
        if state.get("version") not in _LOADABLE_VERSIONS:
            raise ValueError(f"unsupported state version {state.get('version')!r} (this "
                             f"saddlescape loads versions {_LOADABLE_VERSIONS})")
        for key, mine in (
            ("block_sizes", self.block_sizes),
            ("refresh_every", self.refresh_every),
            ("dtype", str(self.dtype)),
        ):
            theirs = state.get(key)
            if (list(theirs) if key == "block_sizes" and theirs is not None else theirs) != mine:
                raise ValueError(f"the state's {key} is {theirs!r}, this engine's is {mine!r}")
        missing = sorted({"updates", "beta_product", "data", "scalars"} - set(state))
        if missing:
            raise ValueError(f"the state is missing {missing}")
        data = np.ascontiguousarray(state["data"], dtype=self.dtype)
        scalars = np.ascontiguousarray(state["scalars"], dtype=np.float64)
        self._engine.load(integer("updates", state["updates"]), real("beta_product",
                          state["beta_product"]), data, scalars)

    def _inject_refresh_failures(self, block: int, attempts: int, stages: int = 3) -> None:
        """Test hook for the fallback policy: the next ``attempts`` refreshes of ``block`` that
        commit see their first ``stages`` eigensolver calls fail (1: the first; 2: also the
        float64 retry, which float64 engines skip; 3: also the retry with fallback_eps). A call
        that raises consumes nothing. Not saved in the state."""
        self._engine.inject_refresh_failures(integer("block", block), integer("attempts", attempts),
                                             integer("stages", stages))
