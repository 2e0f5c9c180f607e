"""The block cost model, the LPT assignment, per-block engine states and atomic writes."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

import saddlescape
from saddlescape.sharding import (
    assign_blocks,
    atomic_write,
    block_costs,
    join_block_states,
    set_stagger,
    split_block_states,
)


def test_costs_follow_the_model():
    c = block_costs([1, 7, 256], refresh_every=16)
    assert c == [9 * B**3 + 16 * 4 * B**2 for B in (1, 7, 256)]
    m = block_costs([3, 256], cost="memory", refresh_every=8, itemsize=8)
    assert m == [2 * B * B * 8 + 2 * 8 * B * 8 for B in (3, 256)]


def test_memory_cost_matches_the_engine_state():
    sizes, R = [5, 1, 12], 4
    e = saddlescape.BlockEngine(sizes, refresh_every=R, dtype=np.float64)
    data = e._engine.save()[2]
    assert sum(block_costs(sizes, cost="memory", refresh_every=R, itemsize=8)) == data.nbytes


def _best_makespan(costs, W):
    best = float("inf")
    for owners in itertools.product(range(W), repeat=len(costs)):
        loads = [0] * W
        for c, o in zip(costs, owners):
            loads[o] += c
        best = min(best, max(loads))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_lpt_is_within_its_bound_of_the_best(seed):
    rng = np.random.default_rng(seed)
    sizes = [int(s) for s in rng.integers(1, 300, size=7)]
    W = int(rng.integers(2, 4))
    a = assign_blocks(sizes, W)
    costs = block_costs(sizes)
    # every block once, loads consistent
    assert sorted(b for bl in a.blocks for b in bl) == list(range(len(sizes)))
    assert list(a.loads) == [sum(costs[b] for b in bl) for bl in a.blocks]
    assert a.sizes == tuple(sum(sizes[b] for b in bl) for bl in a.blocks)
    best = _best_makespan(costs, W)
    assert max(a.loads) <= (4 / 3 - 1 / (3 * W)) * best + 1e-9
    assert a == assign_blocks(list(sizes), W)  # deterministic


def test_assignment_ties_and_edge_cases():
    # equal blocks: round robin in index order, ties to the lower rank
    a = assign_blocks([4] * 5, 2)
    assert a.owner == (0, 1, 0, 1, 0)
    # more ranks than blocks: some ranks own nothing
    a = assign_blocks([3, 9], 4)
    assert a.owner == (1, 0) and a.blocks[2] == () and a.sizes[3] == 0
    assert assign_blocks([1], 1).owner == (0,)
    # explicit costs override the model
    assert assign_blocks([1, 1, 1], 2, costs=[1, 5, 1]).owner == (1, 0, 1)
    assert assign_blocks([1, 1], 2, costs=lambda s: [2.0, 1.0]).owner == (0, 1)


def test_memory_balancing_differs_from_time_balancing():
    sizes = [128, 64, 64, 64, 64, 64]
    t = assign_blocks(sizes, 2, cost="time")
    m = assign_blocks(sizes, 2, cost="memory")
    assert t.blocks == ((0,), (1, 2, 3, 4, 5))  # 128^3 outweighs five 64^3
    assert m.blocks == ((0, 5), (1, 2, 3, 4))  # 128^2 is only four 64^2
    assert t.imbalance > m.imbalance >= 1


@pytest.mark.parametrize("bad, match", [
    (dict(block_sizes=[]), "must not be empty"),
    (dict(block_sizes=[3, 0]), r"block_sizes\[1\] must be >= 1, got 0"),
    (dict(world_size=0), "world_size must be >= 1, got 0"),
    (dict(costs=[1.0]), "costs has 1 entries for 2 blocks"),
    (dict(costs=[1.0, -2.0]), r"costs\[1\] must be finite and >= 0"),
    (dict(costs=[1.0, float("nan")]), r"costs\[1\]"),
    (dict(cost="flops"), "cost must be 'time' or 'memory', got 'flops'"),
    (dict(refresh_every=0), "refresh_every must be >= 1, got 0"),
    (dict(costs=[1, 1], cost="time"), "either costs or cost options"),
])
def test_bad_input_is_named(bad, match):
    args = dict(block_sizes=[2, 3], world_size=2)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        assign_blocks(**args)


def test_block_sizes_of_the_wrong_type():
    with pytest.raises(TypeError, match="block_sizes must be a sequence"):
        assign_blocks(5, 2)


def test_split_and_join_of_engine_states_continue_bit_for_bit():
    """An engine over all blocks against two engines over halves assembled from its per-block
    states, including the stagger offsets: same directions bit for bit afterwards."""
    rng = np.random.default_rng(0)
    sizes, R = [3, 1, 6, 2, 5], 3
    full = saddlescape.BlockEngine(sizes, refresh_every=R, beta=0.9, eps=1e-3)
    for _ in range(4):
        full.update_direction(rng.standard_normal(sum(sizes)))
    raw = full._engine.save()
    recs = split_block_states(raw, sizes, R)
    offs = np.cumsum([0] + sizes)
    parts = [[0, 2, 4], [1, 3]]
    engines = []
    for part in parts:
        e = saddlescape.BlockEngine([sizes[b] for b in part], refresh_every=R, beta=0.9, eps=1e-3)
        d, s = join_block_states([recs[b] for b in part], [sizes[b] for b in part], R, np.float32)
        e._engine.load(raw[0], raw[1], d, s)
        engines.append(e)
    for _ in range(5):  # crosses refreshes of every block
        g = rng.standard_normal(sum(sizes)).astype(np.float32)
        want = full.update_direction(g)
        for part, e in zip(parts, engines):
            gi = np.concatenate([g[offs[b]:offs[b + 1]] for b in part])
            got = e.update_direction(gi)
            np.testing.assert_array_equal(got, np.concatenate([want[offs[b]:offs[b + 1]]
                                                               for b in part]))


def test_set_stagger_reproduces_the_global_offsets():
    sizes, R = [2, 3, 4, 2], 3
    full = saddlescape.BlockEngine(sizes, refresh_every=R)
    recs_full = split_block_states(full._engine.save(), sizes, R)
    sub = saddlescape.BlockEngine([sizes[2], sizes[3]], refresh_every=R)
    recs = split_block_states(sub._engine.save(), [sizes[2], sizes[3]], R)
    assert not np.array_equal(recs[0]["scalars"], recs_full[2]["scalars"])  # offset 0, not 2
    for rec, b in zip(recs, (2, 3)):
        set_stagger(rec, sizes[b], R, b)
    for rec, b in zip(recs, (2, 3)):
        np.testing.assert_array_equal(rec["scalars"], recs_full[b]["scalars"])


def test_split_rejects_a_state_of_other_sizes():
    e = saddlescape.BlockEngine([3, 4], refresh_every=2)
    with pytest.raises(ValueError, match="block sizes need"):
        split_block_states(e._engine.save(), [3, 3], 2)
    recs = split_block_states(e._engine.save(), [3, 4], 2)
    with pytest.raises(ValueError, match=r"block record 1 \(B = 5\)"):
        join_block_states(recs, [3, 5], 2, np.float32)


def test_atomic_write_replaces_or_keeps_the_old_file(tmp_path):
    path = tmp_path / "ck.bin"
    atomic_write(path, lambda f: f.write(b"first"))
    assert path.read_bytes() == b"first"

    def crash(f):
        f.write(b"half of the sec")
        raise OSError("disk full (simulated)")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, crash)
    assert path.read_bytes() == b"first"  # the previous checkpoint is intact
    assert os.listdir(tmp_path) == ["ck.bin"]  # no temporary file left
    atomic_write(str(path), lambda f: f.write(b"second"))
    assert path.read_bytes() == b"second"
