"""saddlescape.torch.distributed on 1, 2 and 3 gloo processes, every launch under a time limit.

References are computed here, in one process: the single-process saddlescape.torch.RMSProp
(structure="block") fed the exact mean gradient (see dist_workers), and for the MLP a BlockEngine
on the full batch's gradient.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import dist_harness as harness  # noqa: E402
import dist_workers as w  # noqa: E402

import saddlescape  # noqa: E402
import saddlescape.torch  # noqa: E402
from saddlescape.torch.distributed import parameter_blocks  # noqa: E402

LIMIT = 60.0  # seconds per launch: a hang fails the test


def _single_process(steps: int, params, groups, options=None, schedule=None):
    """The single-process saddlescape.torch.RMSProp(structure="block") on the exact mean
    gradients, with the options of dist_workers.make_optimizer (overridden by ``options``) and
    an optional LambdaLR factor. Returns the parameters after each step and the optimizer."""
    kw = {**dict(beta=0.9, eps=1e-3, block_size=w.BLOCK_SIZE, refresh_every=w.REFRESH_EVERY),
          **(options or {})}
    opt = saddlescape.torch.RMSProp(groups, structure="block", **kw)
    sched = None if schedule is None else torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    out = []
    for t in range(steps):
        for p, g in zip(params, w.mean_gradient(t)):
            p.grad = torch.from_numpy(g.copy())
        opt.step()
        if sched is not None:
            sched.step()
        out.append(np.concatenate([p.detach().numpy().reshape(-1) for p in params]))
    return np.array(out), opt


def _reference(steps: int) -> np.ndarray:
    return _single_process(steps, *w.make_params())[0]


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """2 ranks for 4 steps, checkpoint; 3 ranks resume for 3 steps, checkpoint; 1 rank resumes
    for 2 steps."""
    d = tmp_path_factory.mktemp("dist")
    a, b = str(d / "after2.pt"), str(d / "after3.pt")
    two = harness.values(harness.launch(w.exact_run, 2, 0, 4, None, a, timeout=LIMIT))
    three = harness.values(harness.launch(w.exact_run, 3, 4, 3, a, b, timeout=LIMIT))
    one = harness.values(harness.launch(w.exact_run, 1, 7, 2, b, None, timeout=LIMIT))
    return two, three, one


def test_equals_the_single_process_optimizer_bit_for_bit_and_ranks_agree(resumed):
    ref = _reference(9)
    two, three, one = resumed
    for ranks in (two, three):
        for r in ranks[1:]:
            np.testing.assert_array_equal(r["x"], ranks[0]["x"])
    np.testing.assert_array_equal(two[0]["x"], ref[3])
    assert not np.array_equal(ref[3], ref[2])  # the steps move the parameters


def test_resume_across_world_sizes(resumed):
    ref = _reference(9)
    _, three, one = resumed
    np.testing.assert_array_equal(three[0]["x"], ref[6])  # 2 -> 3
    np.testing.assert_array_equal(one[0]["x"], ref[8])  # 3 -> 1


def test_each_block_has_one_owner_and_state_is_sharded(resumed):
    two, three, one = resumed
    n = two[0]["n_blocks"]
    for ranks in (two, three, one):
        owned = sorted(b for r in ranks for b in r["owned"])
        assert owned == list(range(n))
    # Each shard holds about its part of the single rank's state (the engines' refresh
    # buffers are per engine, so the shards' sum is a little larger).
    assert one[0]["memory"] < sum(r["memory"] for r in two) < 1.25 * one[0]["memory"]
    assert max(r["memory"] for r in two) < 0.7 * one[0]["memory"]
    assert max(r["memory"] for r in three) < one[0]["memory"]


def test_bytes_per_step_match_ddp(resumed):
    two, three, one = resumed
    for ranks in (two, three):
        b = ranks[0]["bytes"]
        # padding to the largest share and the status entry: within a few percent of DDP
        assert b["ddp_allreduce"] <= b["total"] <= 1.1 * b["ddp_allreduce"] + 16
    assert one[0]["bytes"]["total"] == 0


@pytest.mark.parametrize("case", ["decay", "auto"])
def test_options_equal_the_single_process_optimizer(case):
    """burn_in, bias correction and weight decay per group; beta="auto" following a scheduler:
    the same as saddlescape.torch.RMSProp on the mean gradients, at 2 and 3 ranks."""
    steps = 7
    params, groups, kw, schedule = w.make_case(case)
    ref, opt = _single_process(steps, params, groups, kw, schedule)
    single = opt.statistics()
    x0 = np.concatenate([a.reshape(-1) for a in w.initial_parameters()])
    np.testing.assert_array_equal(ref[0], x0)  # burn-in: the first step moves nothing
    assert np.abs(ref[-1] - ref[1]).max() > 1e-3
    for world in (2, 3):
        runs = harness.values(harness.launch(w.options_run, world, case, steps, timeout=LIMIT))
        for r in runs[1:]:
            np.testing.assert_array_equal(r["x"], runs[0]["x"])
        if case == "decay":  # g + wd p is added in another order of operations
            np.testing.assert_allclose(runs[0]["x"], ref, rtol=0, atol=2e-6)
        else:
            np.testing.assert_array_equal(runs[0]["x"], ref)
        stats = runs[0]["stats"]
        assert stats["blocks"] == single["blocks"] == sum(r["local_stats"]["blocks"] for r in runs)
        assert stats["refreshes"] == single["refreshes"]
        np.testing.assert_allclose(stats["lambda_max"], single["lambda_max"], rtol=1e-5)
        assert stats == runs[-1]["stats"]
        part = runs[0]["partition"]
        assert [q["block_sizes"] for q in part] == [q["block_sizes"] for q in opt.partition()]
        owners = [o for q in part for o in q["owners"]]
        for r, run in enumerate(runs):
            assert sorted(b for b, o in enumerate(owners) if o == r) == sorted(
                run["local_stats"]["per_block"])
        if case == "auto":
            for r in runs:
                t, m, unchanged = r["two_lrs"]
                assert t == "DistributedStepError" and "beta='auto' needs one lr" in m
                assert unchanged


def test_torch_distributed_checkpoint_resumes_across_world_sizes(tmp_path):
    """save_sharded_checkpoint / load_sharded_checkpoint (DCP): 2 ranks write, 3 ranks resume
    and overwrite the same path, 1 rank resumes; equal to the uninterrupted single-process run
    bit for bit. Each rank writes its own file; a checkpoint of another block size is named."""
    ref = _reference(9)
    path = str(tmp_path / "ckpt")
    two = harness.values(harness.launch(w.dcp_run, 2, 0, 4, None, path, timeout=LIMIT))
    files = sorted(os.listdir(path))
    assert ".metadata" in files and sum(f.endswith(".distcp") for f in files) == 2
    np.testing.assert_array_equal(two[0]["x"], ref[3])
    three = harness.values(harness.launch(w.dcp_run, 3, 4, 3, path, path, timeout=LIMIT))
    for r in three:
        np.testing.assert_array_equal(r["x"], ref[6])  # 2 -> 3
        t, m = r["mismatch"]
        assert t == "ValueError" and "block_sizes" in m
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no .partial / .previous left
    # A crash between rank 0's two renames leaves only ckpt.previous: it is read.
    os.rename(path, path + ".previous")
    one = harness.values(harness.launch(w.dcp_run, 1, 7, 2, path, None, timeout=LIMIT))
    np.testing.assert_array_equal(one[0]["x"], ref[8])  # 3 -> 1


def _mlp_reference(steps: int) -> np.ndarray:
    model = w.make_mlp()
    X, y = w.mlp_data()
    params = list(model.parameters())
    blocks = parameter_blocks([tuple(p.shape) for p in params], 5)
    engine = saddlescape.BlockEngine([B for _, _, B in blocks], beta=0.95, eps=1e-4,
                                     refresh_every=4, dtype=np.float64)
    x = np.concatenate([p.detach().numpy().reshape(-1) for p in params]).astype(np.float64)
    for _ in range(steps):
        with torch.no_grad():
            for p, piece in zip(params, np.split(x, np.cumsum([p.numel() for p in params])[:-1])):
                p.copy_(torch.from_numpy(piece.reshape(p.shape)))
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(X), y).backward()
        g = np.concatenate([p.grad.numpy().reshape(-1) for p in params]).astype(np.float64)
        x = x - 0.02 * engine.update_direction(g)
    return x


def test_mlp_equals_single_process_full_batch_to_rounding():
    steps = 8
    ref = _mlp_reference(steps)
    for world in (2,):  # 3 ranks are covered by the exact runs
        runs = harness.values(harness.launch(w.model_run, world, steps, timeout=LIMIT))
        for name in ("float32", "bfloat16", "native"):
            for r in runs[1:]:
                np.testing.assert_array_equal(r[name]["x"], runs[0][name]["x"])
        x32 = runs[0]["float32"]["x"]
        x0 = np.concatenate([p.detach().numpy().reshape(-1) for p in w.make_mlp().parameters()])
        assert np.abs(ref - x0).max() > 1e-2  # training moved the parameters
        # float32 engine and gradients against a float64 reference: rounding only
        np.testing.assert_allclose(x32, ref, rtol=0, atol=2e-4)
        # torch's own reduce-scatter (summing in comm_dtype) instead of the all-to-all
        np.testing.assert_allclose(runs[0]["native"]["x"], ref, rtol=0, atol=2e-4)
        # bfloat16 communication: close, but not to float32 rounding
        xb = runs[0]["bfloat16"]["x"]
        np.testing.assert_allclose(xb, ref, rtol=0, atol=5e-2)
        assert np.abs(xb - ref).max() > np.abs(x32 - ref).max()


@pytest.fixture(scope="module")
def fault_results():
    return harness.values(harness.launch(w.faults, 3, timeout=LIMIT))


def test_mismatched_configuration_is_named_on_every_rank(fault_results):
    for r in fault_results:
        t, m = r["config_block_size"]
        assert t == "ValueError" and "block_size" in m and "rank 1: 5" in m
        t, m = r["config_shape"]
        assert t == "ValueError" and "parameter shapes" in m


@pytest.mark.parametrize("case, rank, words", [
    ("nan", 1, ("ValueError", "non-finite", "parameter 2")),
    ("closure", 0, ("KeyError", "boom on rank 0")),
    ("missing", 2, ("ValueError", "parameter 0", "no gradient")),
    ("refresh", 0, ("NumericalError",)),
])
def test_a_fault_on_one_rank_is_the_same_error_everywhere_and_changes_nothing(
        fault_results, case, rank, words):
    first = fault_results[0][case]
    for r in fault_results:
        t, m, same_x, same_state = r[case]
        assert t == "DistributedStepError"
        assert m == first[1]  # the same message on every rank
        assert f"rank {rank}:" in m
        for word in words:
            assert word in m
        assert same_x and same_state
    for r in fault_results[1:]:
        np.testing.assert_array_equal(r["after"], fault_results[0]["after"])


def test_a_killed_rank_fails_the_others_within_the_timeout(tmp_path):
    path = str(tmp_path / "ck.pt")
    outs = harness.launch(w.killed, 3, path, timeout=LIMIT, pg_timeout=10.0)
    assert outs[1].exitcode == 7 and outs[1].value is None
    for o in (outs[0], outs[2]):
        assert o.ok, o
        t, m = o.value["error"]
        assert t == "DistributedError" and "a rank has died" in m
        assert o.value["elapsed"] < 15.0
    # The checkpoint written before the death is intact and loads.
    payload = torch.load(path, weights_only=True)
    assert payload["optimizer"]["steps"] == 2
    assert sorted(payload["optimizer"]["blocks"]) == list(range(len(
        parameter_blocks(w.SHAPES, w.BLOCK_SIZE))))
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_needs_a_process_group():
    from saddlescape.torch.distributed import ShardedRMSProp

    if torch.distributed.is_initialized():
        pytest.skip("a process group exists in this process")
    with pytest.raises(ValueError, match="init_process_group"):
        ShardedRMSProp([torch.nn.Parameter(torch.zeros(3))])
