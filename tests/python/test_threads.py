"""Thread-safety as documented per class.

* Separate objects (optimizers, estimators, block engines, runs, matrix functions) stepped in
  parallel Python threads give bit-identical results to the same work done serially; the core
  releases the GIL in the matrix functions, the block engine and run/run_many, so these threads
  really overlap.
* One object shared by threads: estimators hold the GIL (calls serialised), a block engine
  serialises calls with its mutex, an optimizer with its lock; a use of an optimizer while a run
  advances it raises RuntimeError. In no case a crash or a corrupted state.

Every thread joins within a hard time limit, so a deadlock fails the test instead of hanging CI.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import numpy as np
import pytest

import saddlescape as ss

JOIN_S = 60.0


def in_threads(fns: list[Callable[[], Any]]) -> list[Any]:
    """Runs each fn in its own thread, all released at once; returns results or raises the first
    exception; fails if a thread has not finished within JOIN_S."""
    barrier = threading.Barrier(len(fns))
    out: list[Any] = [None] * len(fns)
    errors: list[BaseException | None] = [None] * len(fns)

    def body(i: int) -> None:
        try:
            barrier.wait(timeout=JOIN_S)
            out[i] = fns[i]()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            errors[i] = e

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_S)
        assert not t.is_alive(), "a thread did not finish: deadlock or hang"
    for e in errors:
        if e is not None:
            raise e
    return out


def bits(a: Any) -> Any:
    if isinstance(a, dict):
        return {k: bits(v) for k, v in sorted(a.items())}
    if isinstance(a, (list, tuple)):
        return [bits(v) for v in a]
    if isinstance(a, np.ndarray):
        return (a.dtype.str, a.shape, a.tobytes())
    return a


def gradients(seed: int, n: int, d: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)) * np.logspace(0, -2, d)


MAKERS = {
    "rmsprop_full": lambda d: ss.RMSProp(d, 0.01, beta=0.9, structure="full"),
    "rmsprop_diag": lambda d: ss.RMSProp(d, 0.01, beta=0.9, structure="diag"),
    "rmsprop_lowrank": lambda d: ss.RMSProp(d, 0.01, beta=0.9, solver="lowrank", refresh_every=4),
    "rmsprop_block_lowrank": lambda d: ss.RMSProp(d, 0.01, beta=0.9, structure="block",
                                                  block_sizes=[d // 2, d - d // 2], solver="lowrank"),
    "adam_full": lambda d: ss.Adam(d, 0.01, structure="full"),
    "saddle_escape": lambda d: ss.SaddleEscape(ss.RMSProp(d, 0.01, structure="diag"), 0.1, 5),
}


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_separate_optimizers_in_threads_equal_serial(kind):
    d, n, k = 60, 25, 4
    gs = [gradients(s, n, d) for s in range(k)]

    def work(i: int) -> tuple[np.ndarray, Any]:
        opt = MAKERS[kind](d)
        x = np.linspace(-1, 1, d)
        for g in gs[i]:
            opt.step(x, g)
        return x, opt.state_dict()

    serial = [work(i) for i in range(k)]
    parallel = in_threads([lambda i=i: work(i) for i in range(k)])
    assert bits(parallel) == bits(serial)


def test_parallel_runs_of_separate_optimizers_equal_serial():
    p = ss.problems.NoisyQuadratic(np.diag(np.linspace(-0.5, 2.0, 40)), np.eye(40) * 0.1)
    x0 = np.full(40, 0.1)

    def work(i: int) -> Any:
        r = ss.run(p, MAKERS["rmsprop_full"](40), x0, 200, seed=i, record_every=50)
        m = ss.run_many(p, lambda: ss.RMSProp(40, 0.01, structure="diag"), x0, 100, seeds=3,
                        threads=2, record_every=25)
        return r.x, r.f, m.x, m.f

    serial = [work(i) for i in range(4)]
    assert bits(in_threads([lambda i=i: work(i) for i in range(4)])) == bits(serial)


def test_matrix_functions_and_engines_in_threads_equal_serial():
    rng = np.random.default_rng(0)
    mats = []
    for i in range(4):
        x = rng.standard_normal((90, 60))
        mats.append(x @ x.T)  # rank 60 of 90: singular, damped below

    def work(i: int) -> Any:
        A = ss.inv_sqrt(mats[i], eps=1e-3)
        B = ss.inv_root(np.stack([mats[i][:20, :20]] * 8).astype(np.float32), p=4, eps=1e-2)
        e = ss.BlockEngine([30, 30, 30], refresh_every=3, dtype=np.float64)
        est = ss.EMAEstimator(90, structure="block", block_sizes=[45, 45], beta=0.9)
        dirs = []
        for g in gradients(i, 12, 90):
            dirs.append(e.update_direction(g))
            est.update(g)
        return A, B, dirs, e.state_dict(), est.state_dict(), est.apply(np.ones(90), eps=1e-3)

    serial = [work(i) for i in range(4)]
    assert bits(in_threads([lambda i=i: work(i) for i in range(4)])) == bits(serial)


def test_one_block_engine_shared_by_threads_serialises_its_calls():
    # Updates commute only up to their order, so the check is: the final state equals a serial
    # application of the same updates in the order the lock let them through, which the test
    # records (each thread's update and its position are taken under the engine's mutex by
    # update_direction returning; the count of updates is exact, and the estimate is the EMA of
    # one of the orders, i.e. finite and equal to a serial replay of the logged order).
    d = 24
    e = ss.BlockEngine([8, 16], refresh_every=2, dtype=np.float64, beta=0.9)
    log: list[int] = []
    lock = threading.Lock()
    gs = gradients(7, 80, d)

    def work(t: int) -> None:
        for i in range(t, 80, 4):
            with lock:  # the log's order is the engine's order: both taken under one lock
                e.update(gs[i])
                log.append(i)
            e.direction(gs[i])  # concurrent with other threads' updates: must not corrupt

    in_threads([lambda t=t: work(t) for t in range(4)])
    assert e.updates == 80 and sorted(log) == list(range(80))
    replay = ss.BlockEngine([8, 16], refresh_every=2, dtype=np.float64, beta=0.9)
    for i in log:
        replay.update(gs[i])
    assert bits(e.state_dict()) == bits(replay.state_dict())


def test_one_block_engine_concurrent_updates_never_corrupt():
    # Without the test's own lock: the engine's mutex alone must keep it consistent.
    d = 24
    e = ss.BlockEngine([8, 16], refresh_every=3, dtype=np.float32, beta=0.9)
    gs = gradients(3, 120, d).astype(np.float32)
    in_threads([lambda t=t: [e.update_direction(gs[i]) for i in range(t, 120, 4)] for t in range(4)])
    assert e.updates == 120
    for b in e.estimate():
        assert np.all(np.isfinite(b)) and np.allclose(b, b.T)
        assert np.linalg.eigvalsh(b.astype(np.float64)).min() > -1e-5


def test_one_estimator_shared_by_threads_is_serialised():
    # Estimator calls hold the GIL, so concurrent updates interleave whole; the final estimate
    # after a commuting set of updates with beta = 0 ... is order dependent for beta > 0, so
    # check the invariants: count, symmetry, positive semidefiniteness, finite values.
    est = ss.EMAEstimator(30, beta=0.95)
    gs = gradients(1, 200, 30)
    in_threads([lambda t=t: [est.update(gs[i]) or est.apply(gs[i], eps=1e-3)
                             for i in range(t, 200, 4)] for t in range(4)])
    assert est.steps == 200
    G = est.estimate()
    np.testing.assert_array_equal(G, G.T)
    assert np.linalg.eigvalsh(G).min() > -1e-12


def test_one_optimizer_shared_by_stepping_threads_is_serialised():
    # SGD steps commute, so the serial result is known whatever the interleaving: x0 - lr sum g.
    opt = ss.SGD(0.5, dim=8)
    x = np.zeros(8)
    gs = np.arange(400 * 8, dtype=np.float64).reshape(400, 8) % 7  # exact in float64
    in_threads([lambda t=t: [opt.step(x, gs[i]) for i in range(t, 400, 4)] for t in range(4)])
    np.testing.assert_array_equal(x, -0.5 * gs.sum(axis=0))
    assert opt.steps == 400


def test_using_an_optimizer_during_its_run_raises_instead_of_racing():
    d = 50
    opt = ss.RMSProp(d, 0.01, structure="full")
    p = ss.problems.NoisyQuadratic(np.eye(d), np.eye(d))
    started, finish = threading.Event(), threading.Event()

    def oracle(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        started.set()
        finish.wait(JOIN_S)
        return x + rng.standard_normal(d)

    def long_run() -> Any:
        return ss.run(oracle, opt, np.zeros(d), 3, seed=0)

    t = threading.Thread(target=long_run, daemon=True)
    t.start()
    assert started.wait(JOIN_S)
    try:
        before = None
        for use in (lambda: opt.step(np.zeros(d), np.ones(d)), opt.state_dict,
                    lambda: ss.run(p, opt, np.zeros(d), 2)):
            with pytest.raises(RuntimeError, match="being advanced by a run"):
                use()
            before = before
    finally:
        finish.set()
        t.join(JOIN_S)
    assert not t.is_alive()
    assert opt.steps == 3  # the run went on undisturbed
    opt.step(np.zeros(d), np.ones(d))  # and the optimizer is usable again


def test_an_oracle_stepping_its_own_optimizer_raises_instead_of_deadlocking():
    d = 3
    opt = ss.SGD(0.1, dim=d)

    def oracle(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        opt.step(np.zeros(d), np.ones(d))  # the run's own optimizer, from inside the run
        return np.ones(d)

    with pytest.raises(RuntimeError, match="already in use on this thread"):
        in_threads([lambda: ss.run(oracle, opt, np.zeros(d), 5)])
    opt.step(np.zeros(d), np.ones(d))  # released after the failed run

    def many_oracle(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        made[0].step(np.zeros(d), np.ones(d))
        return np.ones(d)

    made: list[Any] = []

    def make() -> Any:
        made.append(ss.SGD(0.1, dim=d))
        return made[-1]

    with pytest.raises(RuntimeError, match="in use|being advanced"):
        in_threads([lambda: ss.run_many(many_oracle, make, np.zeros(d), 5, seeds=2, threads=2)])
