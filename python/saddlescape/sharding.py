"""Sharding block preconditioners over ranks: the cost model, the block assignment, per-block
engine states and atomic checkpoint files. No torch needed here; the torch.distributed
optimizer is :mod:`saddlescape.torch.distributed`.

Cost model. A block of size B in a :class:`saddlescape.BlockEngine` (float entries of
``itemsize`` bytes) costs, per step,

    memory      2 B^2 itemsize + 2 refresh_every B itemsize   bytes (estimate S and eigenbasis V,
                                                               the gradient history and its
                                                               rotation),
    refresh     c_refresh B^3 / refresh_every                  flops (one syevd every
                                                               refresh_every updates, amortised),
    direction   c_direction B^2                                flops (the rotation V^T g, V y and
                                                               the low-rank correction).

with c_refresh = 9 (a symmetric eigendecomposition with vectors, about 9 B^3 flops) and
c_direction = 4 (two matrix-vector products), unless measured constants are passed.
:func:`block_costs` gives ``time`` = refresh + direction in flops (scaled by refresh_every so
that the arithmetic is exact in integers when the constants are integers) or ``memory`` in
bytes; :func:`assign_blocks` then places the blocks, largest cost first (ties: lower block index
first), each on the rank whose load is smallest (ties: lower rank), the classic LPT rule, which
is within 4/3 - 1/(3 W) of the best makespan. Every step is deterministic integer (or exactly
the same float) arithmetic on the same inputs, so every rank computes the same assignment
without communicating.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import numpy as np

from saddlescape._validation import integer, real

__all__ = ["Assignment", "assign_blocks", "atomic_write", "block_costs", "join_block_states",
           "split_block_states"]

# Counters per block in a BlockEngine state (see block_engine.hpp: since, k, refreshes, warm,
# fallbacks, failed, float64 retries, eps retries, kept bases, consecutive failures).
_COUNTERS = 10


def _sizes(block_sizes: Sequence[int]) -> list[int]:
    if isinstance(block_sizes, (str, bytes)) or not hasattr(block_sizes, "__iter__"):
        raise TypeError(f"block_sizes must be a sequence of ints, got {type(block_sizes).__name__}")
    sizes = [integer("block_sizes entry", b) for b in block_sizes]
    if not sizes:
        raise ValueError("block_sizes must not be empty")
    for i, b in enumerate(sizes):
        if b < 1:
            raise ValueError(f"block_sizes[{i}] must be >= 1, got {b}")
    return sizes


def block_costs(block_sizes: Sequence[int], cost: Literal["time", "memory"] = "time",
                refresh_every: int = 16, itemsize: int = 4, c_refresh: float = 9,
                c_direction: float = 4) -> list[float]:
    """The cost of each block under the model of the module docstring.

    Args:
        block_sizes: the blocks' sizes B_b.
        cost: ``"time"``: c_refresh B^3 + refresh_every c_direction B^2 (refresh_every times the
            flops per step: the same order, in exact integers); ``"memory"``: bytes of the state.
        refresh_every: updates between refreshes of a block, >= 1.
        itemsize: bytes per entry (4 for float32 engines, 8 for float64).
        c_refresh, c_direction: the flop constants (>= 0; measured ones may be passed).

    Returns:
        One cost per block (ints when the constants are ints).

    Raises:
        ValueError: an empty or non-positive block size, cost not "time"/"memory",
            refresh_every or itemsize < 1, or a negative constant.
        TypeError: block_sizes not a sequence.
    """
    sizes = _sizes(block_sizes)
    R = integer("refresh_every", refresh_every)
    if R < 1:
        raise ValueError(f"refresh_every must be >= 1, got {R}")
    item = integer("itemsize", itemsize)
    if item < 1:
        raise ValueError(f"itemsize must be >= 1, got {item}")
    cr, cd = c_refresh, c_direction
    for name, c in (("c_refresh", cr), ("c_direction", cd)):
        if real(name, c) < 0:
            raise ValueError(f"{name} must be >= 0, got {c!r}")
    if cost == "time":
        return [cr * B**3 + R * cd * B**2 for B in sizes]
    if cost == "memory":
        return [2 * B * B * item + 2 * R * B * item for B in sizes]
    raise ValueError(f"cost must be 'time' or 'memory', got {cost!r}")


@dataclass(frozen=True)
class Assignment:
    """Blocks on ranks. ``owner[b]`` is the rank of block b; ``blocks[r]`` rank r's blocks in
    increasing index; ``loads[r]`` the sum of their costs; ``sizes[r]`` the sum of their B_b."""

    owner: tuple[int, ...]
    blocks: tuple[tuple[int, ...], ...]
    loads: tuple[float, ...]
    sizes: tuple[int, ...]

    @property
    def imbalance(self) -> float:
        """max load / mean load (1 is perfect)."""
        mean = sum(self.loads) / len(self.loads)
        return max(self.loads) / mean if mean > 0 else 1.0


def assign_blocks(block_sizes: Sequence[int], world_size: int,
                  costs: Sequence[float] | Callable[[list[int]], Sequence[float]] | None = None,
                  **cost_options: Any) -> Assignment:
    """Assigns blocks to ``world_size`` ranks: largest cost first onto the least-loaded rank.

    Args:
        block_sizes: the blocks' sizes, in the order of the flat vector.
        world_size: the number of ranks, >= 1. Ranks may own no block (world_size > blocks).
        costs: per-block costs, or a function of the sizes returning them; None:
            :func:`block_costs` with ``cost_options`` (cost, refresh_every, itemsize, ...).

    Returns:
        An :class:`Assignment`; the same on every rank for the same arguments.

    Raises:
        ValueError: world_size < 1, a bad block size, or costs of the wrong length or with a
            negative or non-finite entry; as :func:`block_costs` for bad cost options.
    """
    sizes = _sizes(block_sizes)
    W = integer("world_size", world_size)
    if W < 1:
        raise ValueError(f"world_size must be >= 1, got {W}")
    if costs is None:
        c = block_costs(sizes, **cost_options)
    else:
        if cost_options:
            raise ValueError(f"pass either costs or cost options, got both ({sorted(cost_options)})")
        c = list(costs(sizes) if callable(costs) else costs)
        if len(c) != len(sizes):
            raise ValueError(f"costs has {len(c)} entries for {len(sizes)} blocks")
        for i, x in enumerate(c):
            if not np.isfinite(real(f"costs[{i}]", x)) or x < 0:
                raise ValueError(f"costs[{i}] must be finite and >= 0, got {x!r}")
    order = sorted(range(len(sizes)), key=lambda b: (-c[b], b))
    loads = [0] * W
    owner = [0] * len(sizes)
    for b in order:
        r = min(range(W), key=lambda q: (loads[q], q))
        owner[b] = r
        loads[r] += c[b]
    blocks = tuple(tuple(b for b in range(len(sizes)) if owner[b] == r) for r in range(W))
    return Assignment(owner=tuple(owner), blocks=blocks, loads=tuple(loads),
                      sizes=tuple(sum(sizes[b] for b in bl) for bl in blocks))


def split_block_states(state: tuple[int, float, np.ndarray, np.ndarray], block_sizes: Sequence[int],
                       refresh_every: int) -> list[dict[str, np.ndarray]]:
    """Cuts a raw engine state (updates, beta_product, data, scalars: ``BlockEngine._engine.save()``)
    into one ``{"data", "scalars"}`` record per block (copies), in the engine's block order.

    Raises:
        ValueError: the arrays do not have the layout of these block sizes and refresh_every.
    """
    _, _, data, scalars = state
    R = integer("refresh_every", refresh_every)
    out, ad, asc = [], 0, 0
    for B in _sizes(block_sizes):
        nd, ns = 2 * B * B + 2 * R * B, 1 + R + B + _COUNTERS
        if ad + nd > data.shape[0] or asc + ns > scalars.shape[0]:
            raise ValueError("the engine state is shorter than its block sizes need")
        out.append({"data": np.array(data[ad:ad + nd]), "scalars": np.array(scalars[asc:asc + ns])})
        ad, asc = ad + nd, asc + ns
    if ad != data.shape[0] or asc != scalars.shape[0]:
        raise ValueError(f"the engine state has {data.shape[0]} data and {scalars.shape[0]} "
                         f"scalar values, its block sizes need {ad} and {asc}")
    return out


def join_block_states(records: Sequence[dict[str, np.ndarray]], block_sizes: Sequence[int],
                      refresh_every: int, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """The (data, scalars) arrays of an engine over ``block_sizes`` from per-block records.

    Raises:
        ValueError: a record's arrays have the wrong length for its block (naming it).
    """
    R = integer("refresh_every", refresh_every)
    sizes = _sizes(block_sizes)
    if len(records) != len(sizes):
        raise ValueError(f"{len(records)} block records for {len(sizes)} blocks")
    for i, (rec, B) in enumerate(zip(records, sizes)):
        nd, ns = 2 * B * B + 2 * R * B, 1 + R + B + _COUNTERS
        if np.shape(rec["data"]) != (nd,) or np.shape(rec["scalars"]) != (ns,):
            raise ValueError(f"block record {i} (B = {B}) has data of shape "
                             f"{np.shape(rec['data'])} and scalars of shape "
                             f"{np.shape(rec['scalars'])}, expected ({nd},) and ({ns},)")
    if not records:
        return np.zeros(0, dtype=dtype), np.zeros(0, dtype=np.float64)
    data = np.concatenate([np.asarray(r["data"], dtype=dtype) for r in records])
    scalars = np.concatenate([np.asarray(r["scalars"], dtype=np.float64) for r in records])
    return data, scalars


def set_stagger(record: dict[str, np.ndarray], block_size: int, refresh_every: int,
                index: int) -> None:
    """Sets a fresh block's refresh counter to ``index mod refresh_every``: the offset that the
    block has as block ``index`` of another engine (an engine over all blocks, or its tensor's
    engine), so that a shard refreshes the block at the step that engine does. In place."""
    record["scalars"][1 + refresh_every + block_size] = float(index % refresh_every)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Any], Any]) -> None:
    """Writes a file so that a crash never leaves it half-written: ``write(f)`` fills a temporary
    file in the same directory, which is flushed, fsync'ed and renamed over ``path``
    (``os.replace``, atomic on POSIX and Windows), then the directory is fsync'ed. A previous
    file at ``path`` stays intact until the rename.

    Raises:
        Whatever ``write`` raises (the temporary file is removed; ``path`` is untouched), or
        OSError from the file system.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:  # some systems cannot open folders; the rename is done either way
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
