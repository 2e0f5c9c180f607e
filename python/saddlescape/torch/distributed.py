"""Data-parallel training with block preconditioners sharded over a torch.distributed group.

:class:`ShardedRMSProp` is block-diagonal full-matrix RMSProp (the :class:`saddlescape.BlockEngine`
update: per block G_b <- beta G_b + (1 - beta) g_b g_b^T, x_b <- x_b - lr A_b g_b with
A_b = (G_b + eps I)^(-1/2) or (G_b^(1/2) + eps I)^(-1)) where g is the mean of the ranks'
gradients, as with DDP. Each rank keeps the state of only the blocks it owns and computes only
their directions.

What is sharded. Every parameter tensor is flattened and cut into blocks of at most
``block_size`` entries (:func:`parameter_blocks`); block b goes to a rank by
:func:`saddlescape.sharding.assign_blocks` (largest cost first onto the least-loaded rank;
cost = refresh and direction flops by default), computed identically on every rank. A rank's
estimates, eigenbases and gradient histories (2 B^2 + 2 refresh_every B floats per block) exist
only on that rank; parameters and gradients are replicated, as in DDP.

What is communicated, per step (W ranks, D parameters, L = the largest rank's share of D,
c = bytes of ``comm_dtype``):

1. a reduce-scatter of the gradients, laid out rank by rank in W equal segments of L + 1
   entries (zero-padded; the last entry of each segment is the sender's status, 0 when its
   closure and gradients were fine): rank r receives the sum over ranks of its blocks' gradients
   and of the statuses (a ring sends (W - 1)(L + 1) c bytes per rank). On gloo, whose
   reduce-scatter moves an all-reduce's bytes (measured in torch 2.13), an all-to-all sends
   each segment straight to its owner (the same (W - 1)(L + 1) c bytes), and the owner sums
   the W pieces in rank order in float32;
2. one all-gather of the updates lr A_b g_b, L + 1 entries per rank, the extra entry the rank's
   status after its blocks' step, another (W - 1)(L + 1) c bytes.

In all 2 (W - 1)(L + 1) c bytes per rank, against DDP's ring all-reduce of 2 (W - 1) D / W c;
with balanced shares (L close to D / W) the two are equal. Nothing else is sent on a step
that succeeds.

The single-process counterpart. The update is that of ``saddlescape.torch.RMSProp(params,
structure="block", ...)`` with the same options (beta or beta="auto" with C, burn_in, eps, form,
block_size, refresh_every, bias_correction, weight_decay, tol, the fallback policy) on the mean
gradient: the same blocks (:func:`parameter_blocks` is its partition), the same refresh offsets
(block j of a tensor first refreshes at step j mod refresh_every, as in that tensor's engine) and
the same arithmetic per block. Steps are counted per optimizer, not per parameter (every
parameter needs a gradient at every step).

Exactness. All ranks apply the same gathered updates to the same parameters, so parameters stay
bit-identical across ranks. With ``comm_dtype=torch.float32`` a step equals the single-process
optimizer on the mean gradient to the rounding of that mean (bit for bit when the sum over ranks
is exact; weight decay adds g + wd p in another order of operations, within a float's rounding).
``comm_dtype=torch.bfloat16`` (or float16) halves the bytes; gradients are then summed and
updates sent with 8 (11) significant bits, a relative error of about 2^-9 (2^-12) per entry and
step, and the result is no longer the single-process one to float32 rounding (ranks still agree
bit for bit).

Devices. CPU parameters with gloo; CUDA parameters with NCCL (the collectives move CUDA
tensors; call ``torch.cuda.set_device(local_rank)`` before ``init_process_group``, as NCCL
needs) or with gloo (the collectives' buffers are staged through the host). The blocks are
always the C++ engine's, on the host: each step a rank copies its share of the gradient (L
entries) to the host and its updates back, 2 L c bytes over PCIe, and the CPU cores of the rank
compute its blocks. This is a correct, not a fast, GPU route: the GPU computes the model, the
host the preconditioner.

Faults. A step either commits on every rank or on none. A rank whose closure raises or whose
gradient is missing or non-finite still takes part in the reduce-scatter, with status 1; the
summed status tells every rank, before any engine is touched, and all raise. A rank whose
blocks fail (a numerical failure, any exception) reports it in the all-gather; every rank then
restores its blocks' state and leaves the parameters as they were. Restoring needs a copy of the
state taken before the engine call, which costs as much as the step, so it is taken only on
steps where the engine can fail after changing anything: when a block has already failed
``max_consecutive_failures - 1`` refactorisations in a row, or when lr |g|_2 / sqrt(eps)
(inv_sqrt; lr |g|_2 / eps for adam), a bound on the update, comes within 1e-3 of the largest
float. Every failure raises the same :class:`DistributedStepError` on every rank, naming each
failing rank and its error. A collective that fails (a rank died; the process group's
``timeout`` passed) raises :class:`DistributedError` naming the step and the collective, after
restoring the state. Configurations that differ across ranks (parameter shapes and dtypes,
block_size, refresh_every, form, beta, eps, comm_dtype, ...) raise ValueError naming the field
at construction, on every rank.

Checkpoints. :meth:`ShardedRMSProp.state_dict` is the rank's shard, keyed by global block index
(tensors, with the replicated header: the layout ``torch.distributed.checkpoint`` expects);
:meth:`ShardedRMSProp.save_sharded_checkpoint` / :meth:`ShardedRMSProp.load_sharded_checkpoint`
write and read it with ``torch.distributed.checkpoint`` (every rank writes its own blocks, no
gather; any world size reads it; the directory is swapped in atomically);
:meth:`ShardedRMSProp.consolidated_state_dict` gathers all shards to one rank;
:meth:`ShardedRMSProp.save_checkpoint` writes that atomically (a temporary file, fsync,
``os.replace``) so that a crash while saving leaves the previous checkpoint intact; any world size
can :meth:`ShardedRMSProp.load_checkpoint` it: the blocks are re-assigned to the new ranks.
"""

from __future__ import annotations

import io
import math
import os
import shutil
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist

from saddlescape import _core
from saddlescape._validation import integer, real
from saddlescape.blocks import BlockEngine, partition
from saddlescape.sharding import (
    Assignment,
    assign_blocks,
    atomic_write,
    join_block_states,
    set_stagger,
    split_block_states,
)
from saddlescape.torch.optim import _beta_value, _check_beta, _nonneg

__all__ = ["DistributedError", "DistributedStepError", "ShardedRMSProp", "parameter_blocks"]

STATE_VERSION = 1

_NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
_COMM_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class DistributedError(RuntimeError):
    """A collective failed: a rank died or did not answer within the process group's timeout.
    ``step`` is the step and ``collective`` the operation that failed."""

    def __init__(self, message: str, step: int, collective: str) -> None:
        super().__init__(message)
        self.step = step
        self.collective = collective


class DistributedStepError(RuntimeError):
    """A step failed on at least one rank; raised on every rank, with parameters and optimizer
    state unchanged on all. ``failures`` lists (rank, exception type name, message)."""

    def __init__(self, message: str, failures: list[tuple[int, str, str]]) -> None:
        super().__init__(message)
        self.failures = failures


def parameter_blocks(shapes: Iterable[tuple[int, ...]], block_size: int) -> list[tuple[int, int, int]]:
    """How parameters map to blocks: each tensor (in order) flattened (row-major) and cut into
    consecutive blocks of ``block_size`` entries, its last block shorter; no block spans two
    tensors. Returns (parameter index, offset in the flat vector of all parameters, size) per
    block.

    Raises:
        ValueError: block_size < 1, or an empty tensor.
    """
    out, offset = [], 0
    for i, shape in enumerate(shapes):
        n = int(np.prod(shape, dtype=np.int64))
        if n < 1:
            raise ValueError(f"parameter {i} has no entries (shape {tuple(shape)})")
        for B in partition(n, block_size):
            out.append((i, offset, B))
            offset += B
    return out


def _group_rank_size(group: Any) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


class ShardedRMSProp(torch.optim.Optimizer):
    """Block-diagonal full-matrix RMSProp, data-parallel, with the blocks sharded over the ranks.

    Use it in place of DDP + an optimizer: every rank computes the gradients of its own batch
    on the plain (unwrapped) model, then ``opt.step()`` averages them over the ranks and updates
    the parameters (see the module docstring for the math, the communication and the faults).

    Args:
        params: the parameters (all float32 or all float64, all on the CPU or all on one CUDA
            device; see the module docstring for CUDA), or param groups; groups
            may differ in ``lr`` and ``weight_decay``.
        lr: the step size (read from each group at every step, so LR schedulers work).
        beta: EMA weight in [0, 1), or "auto" for beta_t = 1 - C lr_t^(2/3) at each step (as
            :class:`saddlescape.torch.RMSProp`'s; all groups must then have the same lr).
        C: the constant of beta="auto".
        burn_in: the first ``burn_in`` steps update the estimates only (Algorithm 3).
        weight_decay: L2 penalty added to the mean gradient (g + wd p), as torch.optim's.
        eps, form, refresh_every, tol, bias_correction, max_consecutive_failures,
            fallback_eps: as :class:`saddlescape.BlockEngine`.
        block_size: the largest block (see :func:`parameter_blocks`).
        process_group: the group to shard over (None: the default group, which must exist).
        comm_dtype: dtype of both collectives: torch.float32 (default), float64, bfloat16, float16.
        cost: ``"time"`` or ``"memory"``, the block cost of :func:`saddlescape.sharding.block_costs`.
        sync_parameters: broadcast rank 0's parameters to all ranks at construction (as DDP
            does), so that all start bit-identical.
        reduce_scatter: how gradients reach their owners: ``"native"`` (torch's
            reduce-scatter, a ring on NCCL; summed in comm_dtype), ``"all_to_all"`` (each
            segment sent to its owner, who sums the W pieces in rank order in float32: the same
            bytes as a ring reduce-scatter), or ``"auto"``: all_to_all on gloo, whose
            reduce-scatter moves as many bytes as an all-reduce, native otherwise.

    Raises:
        ValueError: bad options; parameters not on one CPU or CUDA device (or CPU parameters
            with NCCL), not float32/float64, of mixed dtypes
            or without entries; configuration differing across ranks (naming the field and the
            ranks); no initialised process group.
        TypeError: process_group is not a process group.
        DistributedError: a collective at construction failed.
    """

    def __init__(self, params: Any, lr: float = 1e-3, *, beta: float | str = 0.99,
                 eps: float = 1e-8, C: float = 1.0, form: str = "inv_sqrt", block_size: int = 256,
                 refresh_every: int = 16, burn_in: int = 0, weight_decay: float = 0.0,
                 tol: float | None = None, bias_correction: bool = False,
                 max_consecutive_failures: int = 3, fallback_eps: float = 0.0,
                 process_group: Any = None, comm_dtype: torch.dtype = torch.float32,
                 cost: str = "time", sync_parameters: bool = True,
                 reduce_scatter: str = "auto") -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("ShardedRMSProp needs an initialised process group: call "
                             "torch.distributed.init_process_group(...) first (torchrun sets "
                             "the environment for init_method='env://')")
        if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(f"process_group must be a torch.distributed.ProcessGroup or None, "
                            f"got {type(process_group).__name__}")
        if comm_dtype not in _COMM_DTYPES:
            raise ValueError(f"comm_dtype must be one of {_COMM_DTYPES}, got {comm_dtype!r}")
        beta = _check_beta("beta", beta)
        C = real("C", C)
        if not (math.isfinite(C) and C > 0):
            raise ValueError(f"C must be finite and > 0, got {C!r}")
        burn_in = integer("burn_in", burn_in)
        if burn_in < 0:
            raise ValueError(f"burn_in must be >= 0, got {burn_in}")
        defaults = dict(lr=_nonneg("lr", lr), weight_decay=_nonneg("weight_decay", weight_decay))
        super().__init__(params, defaults)
        for i, g in enumerate(self.param_groups):
            extra = sorted(set(g) - {"params", "lr", "weight_decay"})
            if extra:
                raise ValueError(f"param group {i} sets {extra}; groups of ShardedRMSProp may "
                                 f"differ only in lr and weight_decay")
            g["lr"] = _nonneg(f"lr (param group {i})", g["lr"])
            g["weight_decay"] = _nonneg(f"weight_decay (param group {i})", g["weight_decay"])
        self._beta, self._C, self._burn_in = beta, C, burn_in
        self._params: list[torch.Tensor] = [p for g in self.param_groups for p in g["params"]]
        group_of = [gi for gi, g in enumerate(self.param_groups) for _ in g["params"]]
        if not self._params:
            raise ValueError("ShardedRMSProp got no parameters")
        dtypes = {p.dtype for p in self._params}
        devices = {p.device for p in self._params}
        if len(devices) != 1:
            raise ValueError(f"all parameters must be on one device, got "
                             f"{sorted(map(str, devices))}")
        self._device = next(iter(devices))
        if self._device.type not in ("cpu", "cuda"):
            raise ValueError(f"the parameters are on {self._device}; ShardedRMSProp takes CPU or "
                             f"CUDA parameters")
        for i, p in enumerate(self._params):
            if p.dtype not in _NP_DTYPES:
                raise ValueError(f"parameter {i} has dtype {p.dtype}; float32 or float64 needed")
            if p.is_sparse or p.is_complex():
                raise ValueError(f"parameter {i} is sparse or complex; not supported")
        if len(dtypes) != 1:
            raise ValueError(f"all parameters must have one dtype, got {sorted(map(str, dtypes))}")
        self._dtype = next(iter(dtypes))
        self._np_dtype = _NP_DTYPES[self._dtype]
        self._group = process_group
        if reduce_scatter not in ("auto", "native", "all_to_all"):
            raise ValueError(f"reduce_scatter must be 'auto', 'native' or 'all_to_all', got "
                             f"{reduce_scatter!r}")
        backend = str(dist.get_backend(process_group))
        # Where the collectives run: NCCL moves CUDA tensors only, gloo is used here with CPU
        # tensors (CUDA parameters are staged through the host).
        self._comm_device = torch.device("cuda", torch.cuda.current_device()) \
            if "nccl" in backend else torch.device("cpu")
        if self._comm_device.type == "cuda" and self._device.type != "cuda":
            raise ValueError(f"the {backend} backend needs CUDA parameters, the parameters are on "
                             f"{self._device} (use gloo for CPU parameters)")
        self._all_to_all = (reduce_scatter == "all_to_all"
                            or (reduce_scatter == "auto" and backend == "gloo"))
        self._rank, self._world = _group_rank_size(process_group)
        self._comm_dtype = comm_dtype
        self._steps = 0
        # The engine's update count and product of betas, kept here too so that a rank that owns
        # no block still writes them into its state (torch.distributed.checkpoint dedups them).
        self._updates, self._beta_product = 0, 1.0
        self._block_size = int(block_size)
        self._refresh_every = int(refresh_every)
        self._max_failures = int(max_consecutive_failures)
        # With beta="auto" the engine starts at any valid beta; step() sets the step's own.
        options = dict(beta=0.5 if isinstance(beta, str) else beta, eps=eps, form=form,
                       refresh_every=refresh_every,
                       dtype=self._np_dtype, tol=tol, bias_correction=bias_correction,
                       max_consecutive_failures=max_consecutive_failures,
                       fallback_eps=fallback_eps)
        # Validates the options the way BlockEngine does, before anything is communicated.
        BlockEngine([1], **options)
        self._blocks = parameter_blocks([tuple(p.shape) for p in self._params], block_size)
        sizes = [B for _, _, B in self._blocks]
        self._sizes = sizes
        self._config = {
            "world_size": self._world,
            "parameter shapes": [tuple(p.shape) for p in self._params],
            "parameter dtype": str(self._dtype),
            "parameter device type": self._device.type,
            "block_size": self._block_size,
            "refresh_every": self._refresh_every,
            "form": form,
            "beta": repr(beta),
            "C": C,
            "burn_in": burn_in,
            "eps": float(eps),
            "tol": tol,
            "bias_correction": bool(bias_correction),
            "max_consecutive_failures": int(max_consecutive_failures),
            "fallback_eps": float(fallback_eps),
            "comm_dtype": str(comm_dtype),
            "cost": cost,
            "reduce_scatter": "all_to_all" if self._all_to_all else "native",
        }
        self._check_same_config()
        self.assignment: Assignment = assign_blocks(
            sizes, self._world, cost=cost, refresh_every=self._refresh_every,
            itemsize=np.dtype(self._np_dtype).itemsize)
        self._owned = list(self.assignment.blocks[self._rank])
        self._own_sizes = [sizes[b] for b in self._owned]
        self._n_own = sum(self._own_sizes)
        self._L = max(max(self.assignment.sizes), 1)
        self._engine: BlockEngine | None = None
        if self._owned:
            self._engine = BlockEngine(self._own_sizes, **options)
            self._stagger_like_single_process()
        # Where each entry of the flat parameter vector sits in the two communication buffers.
        L, W = self._L, self._world
        rs = np.empty(sum(sizes), dtype=np.int64)
        ag = np.empty(sum(sizes), dtype=np.int64)
        own_lr_group = []
        starts = np.cumsum([0] + [p.numel() for p in self._params])
        runs: list[list[int]] = []  # (parameter, start, stop) of this rank's blocks, in order
        for r in range(W):
            local = 0
            for b in self.assignment.blocks[r]:
                i, off, B = self._blocks[b]
                rs[off:off + B] = r * (L + 1) + local + np.arange(B)
                ag[off:off + B] = r * (L + 1) + local + np.arange(B)
                local += B
                if r == self._rank:
                    own_lr_group.append(np.full(B, group_of[i], dtype=np.int64))
                    lo = off - int(starts[i])
                    if runs and runs[-1][0] == i and runs[-1][2] == lo:
                        runs[-1][2] = lo + B  # consecutive blocks of one tensor: one slice
                    else:
                        runs.append([i, lo, lo + B])
        self._pos_rs = torch.from_numpy(rs).to(self._comm_device)
        self._pos_ag = torch.from_numpy(ag).to(self._comm_device)
        self._own_group = (np.concatenate(own_lr_group) if own_lr_group
                           else np.zeros(0, dtype=np.int64))
        self._own_runs = [tuple(r) for r in runs]
        self._wd_cache: tuple[tuple[float, ...], torch.Tensor] | None = None
        self._numels = [p.numel() for p in self._params]
        if sync_parameters and self._world > 1:
            self._broadcast_parameters()

    # ---------------------------------------------------------------- construction helpers
    def _collective(self, name: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as e:  # gloo raises RuntimeError subclasses; name what failed
            raise DistributedError(
                f"rank {self._rank}: the {name} at step {self._steps} failed; a rank has died, "
                f"was not reached or did not answer within the process group's timeout "
                f"({type(e).__name__}: {e})", self._steps, name) from e

    def _check_same_config(self) -> None:
        configs: list[Any] = [None] * self._world
        self._collective("configuration check (all_gather_object)",
                         lambda: dist.all_gather_object(configs, self._config, group=self._group))
        for key in self._config:
            values = [c.get(key) if isinstance(c, dict) else None for c in configs]
            if any(v != values[0] for v in values):
                where = "; ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
                raise ValueError(f"the ranks' configurations differ in {key}: {where}")

    def _stagger_like_single_process(self) -> None:
        """Block j of a tensor first refreshes at offset j mod refresh_every, as in the tensor's
        own engine in :class:`saddlescape.torch.RMSProp`, so that a shard refreshes every block
        at the step the single-process optimizer does."""
        eng = self._engine._engine
        updates, product, data, scalars = eng.save()
        recs = split_block_states((updates, product, data, scalars), self._own_sizes,
                                  self._refresh_every)
        local, seen = [], {}
        for i, _, _ in self._blocks:
            local.append(seen.get(i, 0))
            seen[i] = local[-1] + 1
        for rec, b, B in zip(recs, self._owned, self._own_sizes):
            set_stagger(rec, B, self._refresh_every, local[b])
        d, s = join_block_states(recs, self._own_sizes, self._refresh_every, self._np_dtype)
        eng.load(updates, product, d, s)

    def _broadcast_parameters(self) -> None:
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1) for p in self._params]).to(self._comm_device)
            self._collective("parameter broadcast",
                             lambda: dist.broadcast(flat, src=dist.get_global_rank(
                                 self._group, 0) if self._group is not None else 0,
                                 group=self._group))
            self._unflatten_into(flat, assign=True)

    def _unflatten_into(self, flat: torch.Tensor, assign: bool) -> None:
        flat = flat.to(self._device)
        for p, piece in zip(self._params, torch.split(flat, self._numels)):
            if assign:
                p.copy_(piece.view_as(p))
            else:
                p.sub_(piece.view_as(p))

    # ---------------------------------------------------------------- properties
    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world

    @property
    def owned_blocks(self) -> list[int]:
        """The global indices of the blocks this rank owns."""
        return list(self._owned)

    @property
    def blocks(self) -> list[tuple[int, int, int]]:
        """(parameter index, flat offset, size) of every block, as :func:`parameter_blocks`."""
        return list(self._blocks)

    @property
    def memory_bytes(self) -> int:
        """Bytes of this rank's block state (its engine), without parameters and gradients."""
        return 0 if self._engine is None else self._engine.memory_bytes

    def communication_bytes(self) -> dict[str, int]:
        """Bytes one rank sends per step in ring collectives: ``reduce_scatter`` and
        ``all_gather`` (W - 1)(L + 1) c each, their ``total``, and ``ddp_allreduce``, the
        2 (W - 1) D / W c of DDP's ring all-reduce of the same gradients, for comparison."""
        W, L = self._world, self._L
        c = torch.empty(0, dtype=self._comm_dtype).element_size()
        D = sum(self._sizes)
        rs, ag = (W - 1) * (L + 1) * c, (W - 1) * (L + 1) * c
        return {"reduce_scatter": rs, "all_gather": ag, "total": rs + ag,
                "ddp_allreduce": int(round(2 * (W - 1) * D / W * c))}

    def partition(self) -> list[dict[str, Any]]:
        """How the parameters map to blocks and ranks, in the format of
        :meth:`saddlescape.torch.RMSProp.partition` (``group``, ``index``, ``shape``, ``numel``,
        ``structure`` "block", ``block_sizes``) plus ``owners``, the rank of each block."""
        out, b = [], 0
        for gi, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                sizes = partition(p.numel(), self._block_size)
                owners = [int(self.assignment.owner[b + j]) for j in range(len(sizes))]
                b += len(sizes)
                out.append({"group": gi, "index": i, "shape": tuple(p.shape), "numel": p.numel(),
                            "structure": "block", "block_sizes": sizes, "owners": owners})
        return out

    def statistics(self, all_ranks: bool = False) -> dict[str, Any]:
        """Figures worth logging, as :meth:`saddlescape.torch.RMSProp.statistics`' (``blocks``,
        ``lambda_min``, ``lambda_max``, ``condition_max``, ``condition_median``, the totals
        ``refreshes``, ``failed_refreshes``, ``float64_retries``, ``eps_retries``,
        ``kept_bases``), over this rank's blocks, or with ``all_ranks=True`` over every rank's
        (a collective: every rank must call it then). ``per_block`` maps global block index to
        that block's lambda_min, lambda_max, condition and refreshes.

        Raises:
            DistributedError: all_ranks=True and the gather failed.
        """
        per: dict[int, dict[str, float]] = {}
        totals = dict.fromkeys(("refreshes", "failed_refreshes", "float64_retries", "eps_retries",
                                "kept_bases"), 0)
        if self._engine is not None:
            st = self._engine.statistics()
            for j, b in enumerate(self._owned):
                per[b] = {"lambda_min": float(st["lambda_min"][j]),
                          "lambda_max": float(st["lambda_max"][j]),
                          "condition": float(st["condition"][j]),
                          "refreshes": int(st["refreshes"][j])}
            for k in totals:
                totals[k] = int(st[f"total_{k}"])
        if all_ranks:
            mine = (per, totals)
            every: list[Any] = [None] * self._world
            self._collective("statistics (all_gather_object)",
                             lambda: dist.all_gather_object(every, mine, group=self._group))
            per, totals = {}, dict.fromkeys(totals, 0)
            for their_per, their_totals in every:
                per.update(their_per)
                for k in totals:
                    totals[k] += their_totals[k]
        vals = [per[b] for b in sorted(per)]
        cond = [v["condition"] for v in vals]
        nan = float("nan")
        out: dict[str, Any] = {
            "blocks": len(vals),
            "lambda_min": min((v["lambda_min"] for v in vals), default=nan),
            "lambda_max": max((v["lambda_max"] for v in vals), default=nan),
            "condition_max": max(cond, default=nan),
            "condition_median": float(np.median(cond)) if cond else nan,
        }
        out.update(totals)
        out["per_block"] = {b: per[b] for b in sorted(per)}
        return out

    # ---------------------------------------------------------------- the step
    def _flat_gradients(self) -> torch.Tensor:
        pieces = []
        for i, p in enumerate(self._params):
            if p.grad is None:
                raise ValueError(f"parameter {i} (shape {tuple(p.shape)}) has no gradient on "
                                 f"rank {self._rank}; every rank needs a gradient for every "
                                 f"parameter of ShardedRMSProp")
            if p.grad.is_sparse:
                raise ValueError(f"parameter {i} has a sparse gradient; not supported")
            g = p.grad.detach().reshape(-1)
            if not bool(torch.isfinite(g).all()):
                bad = int(torch.nonzero(~torch.isfinite(g))[0, 0])
                raise ValueError(f"rank {self._rank}: the gradient of parameter {i} (shape "
                                 f"{tuple(p.shape)}) is non-finite at flat entry {bad} "
                                 f"({float(g[bad])})")
            pieces.append(g)
        return torch.cat(pieces)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step on every rank (collective: all ranks must call it).

        Returns:
            The closure's loss on this rank (None without a closure).

        Raises:
            DistributedStepError: the step failed on some rank (same error on every rank;
                nothing changed anywhere).
            DistributedError: a collective failed (a rank died or timed out); nothing changed
                on this rank.
        """
        loss, failure, beta = None, None, 0.0
        W, L, comm = self._world, self._L, self._comm_dtype
        burn = self._steps < self._burn_in
        # Both buffers carry one status entry per rank segment after the L payload entries.
        dev = self._comm_device
        send = torch.zeros(W * (L + 1), dtype=comm, device=dev)
        try:
            beta = self._step_beta()
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            flat = self._flat_gradients()
            send[self._pos_rs] = flat.to(device=dev, dtype=comm)
        except Exception as e:
            failure = e
            send.zero_()
            send.view(W, L + 1)[:, L] = 1
        if self._all_to_all:
            # gloo's reduce-scatter moves an all-reduce's bytes (measured); an all-to-all sends
            # each segment to its owner only, (W - 1)(L + 1) c bytes per rank like a ring
            # reduce-scatter, and the owner sums the W pieces in rank order, in float32 or wider.
            pieces = torch.empty(W * (L + 1), dtype=comm, device=dev)
            self._collective("gradient all-to-all (reduce-scatter)",
                             lambda: dist.all_to_all_single(pieces, send, group=self._group))
            rows = pieces.view(W, L + 1)
            acc_dtype = torch.float64 if comm == torch.float64 else torch.float32
            recv = rows[0].to(acc_dtype)
            for r in range(1, W):
                recv = recv + rows[r].to(acc_dtype)
        else:
            recv = torch.empty(L + 1, dtype=comm, device=dev)
            rs_fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
            self._collective("gradient reduce-scatter",
                             lambda: rs_fn(recv, send, group=self._group))
        # recv[L] sums every rank's status: all ranks know alike whether one failed before
        # the reduce-scatter, and then none of them touches its engine.
        early = bool(recv[L] != 0)
        update = torch.zeros(L + 1, dtype=comm, device=dev)
        saved = None
        if not early and self._engine is not None:
            try:
                # The blocks are the C++ engine's, on the host: CUDA parameters send this
                # rank's share of the gradient there and its update back.
                gt = (recv[:self._n_own].to(self._dtype) / W).cpu()
                wds = [float(grp["weight_decay"]) for grp in self.param_groups]
                if any(wds):
                    # Only this rank's entries are read, and the per-entry wd is remade only
                    # when a group's weight_decay changes.
                    if self._wd_cache is None or self._wd_cache[0] != tuple(wds):
                        self._wd_cache = (tuple(wds), torch.tensor(wds, dtype=self._dtype)[
                            torch.from_numpy(self._own_group)])
                    with torch.no_grad():
                        p_own = torch.cat([self._params[i].detach().reshape(-1)[lo:hi]
                                           for i, lo, hi in self._own_runs]) \
                            if self._own_runs else torch.zeros(0, dtype=self._dtype)
                        gt = gt + self._wd_cache[1] * p_own.cpu()
                g = gt.numpy()
                lrs = np.array([grp["lr"] for grp in self.param_groups], dtype=self._np_dtype)
                if self._risky(g, lrs):
                    saved = self._engine._engine.save()
                self._engine.set_beta(beta)
                if burn:  # the estimates only (Algorithm 3): no update to gather
                    self._engine.update(g)
                    d = np.zeros_like(g)
                else:
                    d = self._engine.update_direction(g)
                u = torch.from_numpy(d * lrs[self._own_group])
                if not bool(torch.isfinite(u).all()):
                    raise _core.NumericalError(f"rank {self._rank}: the update of its blocks is "
                                               f"non-finite")
                update[:self._n_own] = u.to(device=dev, dtype=comm)
                if not bool(torch.isfinite(update[:self._n_own]).all()):
                    raise _core.NumericalError(f"rank {self._rank}: the update overflows "
                                               f"comm_dtype {comm}")
            except Exception as e:
                failure = e
        if early:
            self._fail(failure, None)
        if burn:
            # Nothing moves during burn-in: the ranks need only agree that every engine
            # updated, one status entry instead of the updates' all-gather.
            status_sum = torch.tensor([0.0 if failure is None else 1.0], device=dev)
            try:
                self._collective("burn-in status all-reduce",
                                 lambda: dist.all_reduce(status_sum, group=self._group))
            except DistributedError:
                self._restore(saved)
                raise
            if bool(status_sum[0] != 0):
                self._fail(failure, saved)
            self._commit_step(beta)
            return loss
        update[L] = 0 if failure is None else 1
        gathered = torch.empty(W * (L + 1), dtype=comm, device=dev)
        ag_fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        try:
            self._collective("update all-gather", lambda: ag_fn(gathered, update, group=self._group))
        except DistributedError:
            self._restore(saved)
            raise
        status = gathered.view(W, L + 1)[:, L]
        if bool((status != 0).any()):
            self._fail(failure, saved)
        with torch.no_grad():
            self._unflatten_into(gathered[self._pos_ag].to(device=self._device, dtype=self._dtype),
                                 assign=False)
        self._commit_step(beta)
        return loss

    def _commit_step(self, beta: float) -> None:
        self._steps += 1
        self._updates += 1
        self._beta_product *= beta

    def _step_beta(self) -> float:
        """The step's beta: the constant, or 1 - C lr^(2/3) from the groups' common lr."""
        if not isinstance(self._beta, str):
            return float(self._beta)
        lrs = sorted({float(g["lr"]) for g in self.param_groups})
        if len(lrs) != 1:
            raise ValueError(f"beta='auto' needs one lr in all param groups (one beta_t = 1 - C "
                             f"lr_t^(2/3) for the step); the groups have lr {lrs}")
        return _beta_value("beta", "auto", self._C, lrs[0])

    def _risky(self, g: np.ndarray, lrs: np.ndarray) -> bool:
        """Whether the engine call of this step could fail after committing on another rank,
        so that this rank must be able to restore its state. The call fails only (a) when a
        block that already failed max_consecutive_failures - 1 refactorisations in a row fails
        again, or (b) by overflow, impossible when |lr A g| <= lr |g|_2 / sqrt(eps) (inv_sqrt)
        or lr |g|_2 / eps (adam) is far below the largest float of the engine and comm_dtype.
        Copying the state every step would cost as much as the step; this keeps it to steps at
        risk."""
        stats = self._engine._engine.statistics()
        if max(stats["consecutive_failures"], default=0) >= self._max_failures - 1:
            return True
        eps = self._config["eps"]
        gain = eps ** -0.5 if self._config["form"] == "inv_sqrt" else 1.0 / eps
        bound = float(np.linalg.norm(g.astype(np.float64))) * gain * float(lrs.max(initial=0.0))
        limit = min(float(torch.finfo(self._comm_dtype).max), float(np.finfo(self._np_dtype).max))
        return not bound < 1e-3 * limit

    def _fail(self, failure: BaseException | None, saved: Any) -> None:
        """Restores this rank's state and raises the same DistributedStepError on every rank."""
        self._restore(saved)
        W = self._world
        mine = None if failure is None else (type(failure).__name__, str(failure))
        everyone: list[Any] = [None] * W
        self._collective("failure report (all_gather_object)",
                         lambda: dist.all_gather_object(everyone, mine, group=self._group))
        failures = [(r, f[0], f[1]) for r, f in enumerate(everyone) if f is not None]
        text = "; ".join(f"rank {r}: {t}: {m}" for r, t, m in failures)
        raise DistributedStepError(
            f"step {self._steps} failed on {len(failures)} of {W} ranks, no rank changed its "
            f"parameters or optimizer state: {text}", failures) from failure

    def _restore(self, saved: Any) -> None:
        if saved is not None and self._engine is not None:
            self._engine._engine.load(*saved)

    # ---------------------------------------------------------------- state
    def _header(self) -> dict[str, Any]:
        return {
            "kind": "ShardedRMSProp",
            "version": STATE_VERSION,
            "block_sizes": list(self._sizes),
            "parameter shapes": [tuple(p.shape) for p in self._params],
            "refresh_every": self._refresh_every,
            "dtype": str(self._dtype),
            "form": self._config["form"],
            "eps": self._config["eps"],
            "beta": self._config["beta"],
            "steps": self._steps,
            "lr": [g["lr"] for g in self.param_groups],
            "weight_decay": [g["weight_decay"] for g in self.param_groups],
            "world_size": self._world,
        }

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """This rank's shard: the header (configuration, steps, lrs, the saving world size) and
        ``blocks``, {global block index: {"data", "scalars"} tensors} for the blocks it owns,
        with ``updates`` and ``beta_product`` (the same on every rank that owns a block)."""
        out = self._header()
        out["blocks"] = {}
        out["updates"], out["beta_product"] = self._updates, self._beta_product
        if self._engine is not None:
            raw = self._engine._engine.save()
            out["updates"], out["beta_product"] = int(raw[0]), float(raw[1])
            recs = split_block_states(raw, self._own_sizes, self._refresh_every)
            out["blocks"] = {b: {k: torch.from_numpy(v) for k, v in r.items()}
                             for b, r in zip(self._owned, recs)}
        return out

    def consolidated_state_dict(self, to: int = 0) -> dict[str, Any] | None:
        """All shards merged on rank ``to`` of the group (None on the others); collective.

        Raises:
            DistributedError: the gather failed.
        """
        mine = self.state_dict()
        shards: list[Any] | None = [None] * self._world if self._rank == to else None
        dst = dist.get_global_rank(self._group, to) if self._group is not None else to
        self._collective("state gather (gather_object)",
                         lambda: dist.gather_object(mine, shards, dst=dst, group=self._group))
        if shards is None:
            return None
        full = dict(mine)
        full["blocks"] = {}
        for s in shards:
            full["blocks"].update(s["blocks"])
            if s["updates"] is not None:
                full["updates"], full["beta_product"] = s["updates"], s["beta_product"]
        return full

    def load_state_dict(self, state: dict[str, Any]) -> None:  # type: ignore[override]
        """Loads a consolidated state, or any state holding at least this rank's blocks, saved
        at any world size; collective (the ranks agree that every one of them loaded).

        Raises:
            ValueError: on every rank, naming the field and the rank, for a state of another
                configuration (block sizes, parameter shapes, refresh_every, dtype, form, eps,
                beta) or missing blocks; nothing is loaded on any rank.
        """
        error = None
        try:
            self._load_local(state)
        except Exception as e:
            error = f"rank {self._rank}: {type(e).__name__}: {e}"
        bad = self._gather_errors("load agreement", error)
        if bad:
            self._pending = None
            raise ValueError("load_state_dict failed, nothing loaded: " + bad)
        if self._pending is not None:
            self._pending()
        self._pending = None

    _pending: Callable[[], None] | None = None

    def _check_header(self, state: Any) -> None:
        """Raises ValueError naming the first field of ``state``'s header that does not fit."""
        if not isinstance(state, dict) or state.get("kind") != "ShardedRMSProp":
            raise ValueError("the state is not a ShardedRMSProp state_dict")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported state version {state.get('version')!r}")
        mine = self._header()
        for key in ("block_sizes", "parameter shapes", "refresh_every", "dtype", "form", "eps",
                    "beta"):
            theirs = state.get(key)
            if key in ("block_sizes", "parameter shapes") and theirs is not None:
                theirs = [tuple(x) if isinstance(x, (list, tuple)) else x for x in theirs]
                ours = [tuple(x) if isinstance(x, (list, tuple)) else x for x in mine[key]]
            else:
                ours = mine[key]
            if theirs != ours:
                raise ValueError(f"the state's {key} is {state.get(key)!r}, this optimizer's "
                                 f"is {mine[key]!r}")
        if len(state.get("lr", [])) != len(self.param_groups):
            raise ValueError(f"the state has {len(state.get('lr', []))} param groups, this "
                             f"optimizer {len(self.param_groups)}")

    def _load_local(self, state: dict[str, Any]) -> None:
        """Checks a state against this rank and prepares (in ``_pending``) the commit."""
        self._pending = None
        self._check_header(state)
        blocks = state.get("blocks", {})
        missing = [b for b in self._owned if b not in blocks]
        if missing:
            raise ValueError(f"the state lacks blocks {missing[:8]} owned by rank {self._rank} "
                             f"(a shard of another rank? load the consolidated state)")
        loaded = None
        if self._engine is not None:
            recs = [{k: np.asarray(v.numpy() if isinstance(v, torch.Tensor) else v)
                     for k, v in blocks[b].items()} for b in self._owned]
            data, scalars = join_block_states(recs, self._own_sizes, self._refresh_every,
                                              self._np_dtype)
            updates, product = int(state["updates"]), float(state["beta_product"])
            # Check in a scratch engine so that a bad state leaves ours untouched.
            probe = self._engine._engine.save()
            self._engine._engine.load(updates, product, data, scalars)
            loaded = self._engine._engine.save()
            self._engine._engine.load(*probe)
        lrs, steps = list(state["lr"]), int(state["steps"])
        wds = list(state.get("weight_decay", [g["weight_decay"] for g in self.param_groups]))
        counters = (int(state["updates"]), float(state["beta_product"]))

        def commit() -> None:
            if loaded is not None:
                self._engine._engine.load(*loaded)
            for g, lr, wd in zip(self.param_groups, lrs, wds):
                g["lr"], g["weight_decay"] = lr, wd
            self._steps = steps
            self._updates, self._beta_product = counters

        self._pending = commit

    def _gather_errors(self, what: str, error: str | None) -> str:
        """Every rank's error message (None where it succeeded), so that all ranks raise the same
        error together; collective. Returns them joined, or "" when every rank succeeded."""
        errors: list[Any] = [None] * self._world
        self._collective(f"{what} (all_gather_object)",
                         lambda: dist.all_gather_object(errors, error, group=self._group))
        return "; ".join(e for e in errors if e is not None)

    def save_checkpoint(self, path: str | os.PathLike[str], extra: dict[str, Any] | None = None,
                        to: int = 0) -> None:
        """Gathers the state to rank ``to``, which writes ``{"optimizer": state, **extra}`` with
        torch.save atomically (:func:`saddlescape.sharding.atomic_write`); collective, and every
        rank raises if the write failed. ``extra`` (e.g. ``{"model": model.state_dict()}``) is
        taken from rank ``to``.

        Raises:
            RuntimeError: on every rank, if rank ``to`` could not write (naming the error); the
                previous file at ``path`` is then intact.
            DistributedError: a collective failed.
        """
        full = self.consolidated_state_dict(to)
        error = None
        if full is not None:
            payload = {"optimizer": full, **(extra or {})}
            try:
                atomic_write(path, lambda f: torch.save(payload, f))
            except Exception as e:
                error = f"rank {self._rank} could not write {os.fspath(path)!r}: {type(e).__name__}: {e}"
        bad = self._gather_errors("checkpoint agreement", error)
        if bad:
            raise RuntimeError(bad)

    def load_checkpoint(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Loads a file of :meth:`save_checkpoint` (any saving world size) on every rank and
        returns its payload (e.g. ``payload["model"]``); collective.

        Raises:
            ValueError: as :meth:`load_state_dict`, or the file cannot be read (on every rank).
        """
        error, payload = None, None
        try:
            with open(path, "rb") as f:
                payload = torch.load(io.BytesIO(f.read()), weights_only=True)
        except Exception as e:
            error = f"rank {self._rank} could not read {os.fspath(path)!r}: {type(e).__name__}: {e}"
        bad = self._gather_errors("checkpoint read agreement", error)
        if bad:
            raise ValueError(bad)
        self.load_state_dict(payload["optimizer"])
        return payload


    # ---------------------------------------------------------------- torch.distributed.checkpoint
    def _dcp_paths(self, path: str | os.PathLike[str]) -> tuple[str, str, str]:
        final = os.path.abspath(os.fspath(path))
        return final, final + ".partial", final + ".previous"

    def save_sharded_checkpoint(self, path: str | os.PathLike[str],
                                extra: dict[str, Any] | None = None) -> None:
        """Writes a ``torch.distributed.checkpoint`` (DCP) directory at ``path``: each rank
        writes its own blocks (nothing is gathered: a rank writes and holds only its shard) and
        the replicated rest (the header; ``extra``, e.g. ``{"model": model.state_dict()}``,
        identical on every rank) is written once. Collective. ``path`` must be on a file system
        that every rank sees, as DCP requires.

        Atomic: DCP writes ``path + ".partial"``; when every rank has finished, rank 0 moves the
        old ``path`` to ``path + ".previous"``, the new one to ``path``, and removes the previous
        one. A crash at any moment leaves a complete checkpoint at ``path``, or (between the two
        renames) at ``path + ".previous"``, which :meth:`load_sharded_checkpoint` then reads.

        Raises:
            RuntimeError: on every rank, naming the rank and error, when a rank could not write;
                the previous checkpoint is then intact.
            DistributedError: a collective failed.
        """
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        final, tmp, prev = self._dcp_paths(path)
        error = None
        if self._rank == 0:
            try:
                if os.path.exists(tmp):  # left by a save that crashed
                    shutil.rmtree(tmp)
            except OSError as e:
                error = f"rank 0 could not remove {tmp!r}: {e}"
        bad = self._gather_errors("sharded checkpoint preparation", error)
        if bad:
            raise RuntimeError(bad)
        payload = {"optimizer": self.state_dict(), **(extra or {})}
        try:
            dcp.save(payload, storage_writer=dcp.FileSystemWriter(tmp), process_group=self._group)
        except (Exception, CheckpointException) as e:
            error = f"rank {self._rank}: torch.distributed.checkpoint.save: {type(e).__name__}: {e}"
        bad = self._gather_errors("sharded checkpoint write", error)
        if bad:
            raise RuntimeError(bad)
        if self._rank == 0:
            try:
                if os.path.exists(final):
                    if os.path.exists(prev):
                        shutil.rmtree(prev)
                    os.rename(final, prev)
                os.rename(tmp, final)
                shutil.rmtree(prev, ignore_errors=True)
            except OSError as e:
                error = f"rank 0 could not move {tmp!r} to {final!r}: {e}"
        bad = self._gather_errors("sharded checkpoint commit", error)
        if bad:
            raise RuntimeError(bad)

    def load_sharded_checkpoint(self, path: str | os.PathLike[str],
                                extra: dict[str, Any] | None = None) -> None:
        """Loads a directory of :meth:`save_sharded_checkpoint`, saved at any world size: each
        rank reads only the blocks it owns now (DCP finds them by global block index in any
        saving rank's file). ``extra`` is filled in place, as DCP does (pass
        ``{"model": model.state_dict()}``: its tensors are the model's, so the model is loaded).
        Collective; the optimizer commits on every rank or on none.

        Raises:
            ValueError: on every rank: no checkpoint at ``path`` (nor ``path.previous``), or one
                of another configuration (naming the field: block sizes, parameter shapes,
                refresh_every, dtype, form, eps, beta, the number of groups), or DCP could not
                read it; the optimizer is then unchanged.
            DistributedError: a collective failed.
        """
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        final, _, prev = self._dcp_paths(path)
        where = next((p for p in (final, prev) if os.path.isfile(os.path.join(p, ".metadata"))),
                     None)
        error = None if where is not None else (f"rank {self._rank}: no checkpoint at {final!r} "
                                                f"(nor at {prev!r})")
        header: dict[str, Any] = {"optimizer": {k: None for k in self._header()}}
        if where is not None:
            # The header first, so that a checkpoint of another configuration is named as such
            # before DCP meets blocks of other shapes.
            try:
                dcp.load(header, storage_reader=dcp.FileSystemReader(where),
                         process_group=self._group)
                self._check_header(header["optimizer"])
            except (Exception, CheckpointException) as e:
                error = f"rank {self._rank}: {type(e).__name__}: {e}"
        bad = self._gather_errors("sharded checkpoint header", error)
        if bad:
            raise ValueError("load_sharded_checkpoint failed, nothing loaded: " + bad)
        template = self.state_dict()  # this rank's blocks: the keys and shapes to read
        payload = {"optimizer": template, **(extra or {})}
        try:
            dcp.load(payload, storage_reader=dcp.FileSystemReader(where), process_group=self._group)
        except (Exception, CheckpointException) as e:
            error = f"rank {self._rank}: {type(e).__name__}: {e}"
        bad = self._gather_errors("sharded checkpoint read", error)
        if bad:
            raise ValueError("load_sharded_checkpoint failed, nothing loaded: " + bad)
        self.load_state_dict(payload["optimizer"])
