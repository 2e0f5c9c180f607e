"""Worker functions for test_distributed.py (run in spawned gloo processes by dist_harness).

The exact scenarios feed gradients that are small dyadic numbers (k / 64, |k| <= 64) whose
rank-to-rank differences cancel: every partial sum over ranks is exact in float32, and so is
the division by the world size, so the mean gradient is known exactly and the sharded run must
equal an unsharded BlockEngine bit for bit.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

SHAPES = [(7, 5), (5,), (3, 7), (1,), (9,)]
LRS = (0.01, 0.003)  # group 0: the first two tensors, group 1: the rest
BLOCK_SIZE = 4
REFRESH_EVERY = 3


def initial_parameters() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


def mean_gradient(step: int) -> list[np.ndarray]:
    rng = np.random.default_rng(1000 + step)
    return [(rng.integers(-32, 33, size=s) / 64).astype(np.float32) for s in SHAPES]


def rank_gradient(step: int, rank: int, world: int) -> list[np.ndarray]:
    """g_r = G + (r - (W - 1) / 2) E with E integer multiples of 1/64 (W odd), or of 1/32 with
    offsets +-1/2 (W even): sum_r g_r = W G exactly."""
    rng = np.random.default_rng(5000 + step)
    G = mean_gradient(step)
    out = []
    for g, s in zip(G, SHAPES):
        E = (rng.integers(-8, 9, size=s) / 32).astype(np.float32)
        out.append((g + np.float32(rank - (world - 1) / 2) * E).astype(np.float32))
    return out


def make_params() -> tuple[list[torch.nn.Parameter], list[dict]]:
    params = [torch.nn.Parameter(torch.from_numpy(a.copy())) for a in initial_parameters()]
    groups = [{"params": params[:2], "lr": LRS[0]}, {"params": params[2:], "lr": LRS[1]}]
    return params, groups


def make_optimizer(groups, **kw):
    from saddlescape.torch.distributed import ShardedRMSProp

    options = dict(beta=0.9, eps=1e-3, block_size=BLOCK_SIZE, refresh_every=REFRESH_EVERY)
    options.update(kw)
    return ShardedRMSProp(groups, **options)


def _flat(params) -> np.ndarray:
    return np.concatenate([p.detach().numpy().reshape(-1) for p in params]).copy()


def _set_grads(params, step, rank, world):
    for p, g in zip(params, rank_gradient(step, rank, world)):
        p.grad = torch.from_numpy(g.copy())


def exact_run(rank: int, world: int, start: int, steps: int, load: str | None,
              save: str | None) -> dict:
    """Steps start .. start + steps - 1 of the exact scenario, optionally resumed from and saved
    to a checkpoint. Returns the parameters, owned blocks and bytes."""
    params, groups = make_params()
    opt = make_optimizer(groups)
    if load is not None:
        payload = opt.load_checkpoint(load)
        with torch.no_grad():
            for p, a in zip(params, payload["params"]):
                p.copy_(a)
    for t in range(start, start + steps):
        _set_grads(params, t, rank, world)
        opt.step()
    if save is not None:
        opt.save_checkpoint(save, extra={"params": [p.detach().clone() for p in params]})
    return {"x": _flat(params), "owned": opt.owned_blocks, "memory": opt.memory_bytes,
            "bytes": opt.communication_bytes(), "n_blocks": len(opt.blocks)}


def make_case(case: str):
    """Parameters, groups, ShardedRMSProp/RMSProp options and an LR schedule (a LambdaLR factor,
    or None) of the option scenarios, shared by the workers and the single-process reference."""
    params, groups = make_params()
    if case == "decay":
        groups[0]["weight_decay"], groups[1]["weight_decay"] = 0.1, 0.02
        return params, groups, dict(burn_in=2, bias_correction=True), None
    if case == "auto":
        return params, [{"params": params, "lr": 0.02}], dict(beta="auto", C=0.5, burn_in=1), \
            _halving
    raise ValueError(case)


def _halving(t: int) -> float:
    return 0.5 ** (t // 2)


def options_run(rank: int, world: int, case: str, steps: int) -> dict:
    """The exact scenario with the options of ``case`` (make_case); the parameters after every
    step, statistics over all ranks, the partition."""
    params, groups, kw, schedule = make_case(case)
    opt = make_optimizer(groups, **kw)
    sched = None if schedule is None else torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    xs = []
    for t in range(steps):
        _set_grads(params, t, rank, world)
        opt.step()
        if sched is not None:
            sched.step()
        xs.append(_flat(params))
    out = {"x": np.array(xs), "stats": opt.statistics(all_ranks=True),
           "local_stats": opt.statistics(), "partition": opt.partition()}
    if case == "auto":  # beta="auto" with groups of different lr: the same error everywhere
        params2, groups2 = make_params()
        opt2 = make_optimizer(groups2, beta="auto")
        _set_grads(params2, 0, rank, world)
        x0 = _flat(params2)
        try:
            opt2.step()
            out["two_lrs"] = ("no error", "", True)
        except Exception as e:  # noqa: BLE001
            out["two_lrs"] = (type(e).__name__, str(e), np.array_equal(x0, _flat(params2)))
    return out


def dcp_run(rank: int, world: int, start: int, steps: int, load: str | None,
            save: str | None) -> dict:
    """exact_run with torch.distributed.checkpoint (save_sharded_checkpoint) instead of the
    gathered file; the parameters travel in ``extra``."""
    params, groups = make_params()
    opt = make_optimizer(groups)
    extra = {"params": {f"p{i}": p.detach() for i, p in enumerate(params)}}
    if load is not None:
        opt.load_sharded_checkpoint(load, extra)  # fills the parameters in place
    for t in range(start, start + steps):
        _set_grads(params, t, rank, world)
        opt.step()
    if save is not None:
        opt.save_sharded_checkpoint(save, extra)
    out = {"x": _flat(params), "owned": opt.owned_blocks}
    if load is not None:  # a checkpoint of another block size is named, on every rank
        _, groups2 = make_params()
        other = make_optimizer(groups2, block_size=BLOCK_SIZE + 1, sync_parameters=False)
        try:
            other.load_sharded_checkpoint(load)
            out["mismatch"] = ("no error", "")
        except Exception as e:  # noqa: BLE001
            out["mismatch"] = (type(e).__name__, str(e))
    return out


# ------------------------------------------------------------------ a real model
def mlp_data():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((12, 6)).astype(np.float32)
    y = rng.integers(0, 3, size=12)
    return torch.from_numpy(X), torch.from_numpy(y)


def make_mlp():
    torch.manual_seed(11)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def model_run(rank: int, world: int, steps: int) -> dict:
    """The MLP trained on the global batch of 12 split evenly over the ranks (each rank's loss
    the mean over its rows), with comm_dtype float32 and bfloat16."""
    from saddlescape.torch.distributed import ShardedRMSProp

    X, y = mlp_data()
    rows = slice(rank * 12 // world, (rank + 1) * 12 // world)
    out = {}
    for name, dt, how in (("float32", torch.float32, "auto"), ("bfloat16", torch.bfloat16, "auto"),
                          ("native", torch.float32, "native")):
        model = make_mlp()
        opt = ShardedRMSProp(model.parameters(), lr=0.02, beta=0.95, eps=1e-4, block_size=5,
                             refresh_every=4, comm_dtype=dt, reduce_scatter=how)
        losses = []
        for _ in range(steps):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(X[rows]), y[rows])
            loss.backward()
            opt.step()
            losses.append(float(loss))
        out[name] = {"x": _flat(model.parameters()), "losses": losses}
    return out


# ------------------------------------------------------------------ faults
def _engine_state(opt) -> list[np.ndarray]:
    s = opt.state_dict()
    return [s["blocks"][b][k].numpy().copy() for b in sorted(s["blocks"]) for k in ("data", "scalars")]


def _attempt(opt, params, step, fn):
    """Runs one failing step; returns (error type, message, params unchanged, state unchanged)."""
    x0, s0 = _flat(params), _engine_state(opt)
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - reported to the test
        same_x = np.array_equal(x0, _flat(params))
        s1 = _engine_state(opt)
        same_s = len(s0) == len(s1) and all(np.array_equal(a, b) for a, b in zip(s0, s1))
        return (type(e).__name__, str(e), same_x, same_s)
    return ("no error", "", True, True)


def faults(rank: int, world: int) -> dict:
    from saddlescape.torch.distributed import ShardedRMSProp

    out: dict = {}
    # Mismatched configuration: block_size, then a parameter shape.
    params, groups = make_params()
    try:
        make_optimizer(groups, block_size=BLOCK_SIZE + rank)
        out["config_block_size"] = ("no error", "")
    except Exception as e:  # noqa: BLE001
        out["config_block_size"] = (type(e).__name__, str(e))
    try:
        shapes = [(3, 4)] if rank == 0 else [(4, 3)]
        ShardedRMSProp([torch.nn.Parameter(torch.zeros(s)) for s in shapes])
        out["config_shape"] = ("no error", "")
    except Exception as e:  # noqa: BLE001
        out["config_shape"] = (type(e).__name__, str(e))

    params, groups = make_params()
    opt = make_optimizer(groups, refresh_every=1, max_consecutive_failures=1)
    for t in range(2):
        _set_grads(params, t, rank, world)
        opt.step()

    # A non-finite gradient on rank 1 only.
    def nan_step():
        _set_grads(params, 2, rank, world)
        if rank == 1:
            params[2].grad[1, 3] = float("nan")
        opt.step()

    out["nan"] = _attempt(opt, params, 2, nan_step)

    # A closure that raises on rank 0 only.
    def closure_step():
        def closure():
            _set_grads(params, 2, rank, world)
            if rank == 0:
                raise KeyError("boom on rank 0")
            return 1.0

        opt.step(closure)

    out["closure"] = _attempt(opt, params, 2, closure_step)

    # A missing gradient on the last rank.
    def missing_step():
        _set_grads(params, 2, rank, world)
        if rank == world - 1:
            params[0].grad = None
        opt.step()

    out["missing"] = _attempt(opt, params, 2, missing_step)

    # A failed refactorisation in a block of rank 0 (every retry fails; with
    # max_consecutive_failures=1 the engine raises NumericalError).
    def refresh_step():
        _set_grads(params, 2, rank, world)
        if rank == 0:
            opt._engine._inject_refresh_failures(0, 1, 3)
        opt.step()

    out["refresh"] = _attempt(opt, params, 2, refresh_step)
    if rank == 0:  # a call that raises consumes no injected failure: clear it
        opt._engine._inject_refresh_failures(0, 0, 3)
    # After all that, a good step still works and gives the same on every rank.
    _set_grads(params, 2, rank, world)
    opt.step()
    out["after"] = _flat(params)
    return out


def killed(rank: int, world: int, path: str) -> dict:
    """Rank 1 dies (os._exit) after a checkpoint at step 2; the others keep stepping."""
    params, groups = make_params()
    opt = make_optimizer(groups)
    for t in range(2):
        _set_grads(params, t, rank, world)
        opt.step()
    opt.save_checkpoint(path, extra={"params": [p.detach().clone() for p in params]})
    if rank == 1:
        os._exit(7)
    start = time.monotonic()
    try:
        for t in range(2, 50):
            _set_grads(params, t, rank, world)
            opt.step()
        return {"error": None}
    except Exception as e:  # noqa: BLE001
        return {"error": (type(e).__name__, str(e)), "elapsed": time.monotonic() - start,
                "x": _flat(params)}
