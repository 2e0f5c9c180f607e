"""run_many(..., executor=...): chunks of seeds on concurrent.futures executors, equal to the
local run bit for bit; a failing chunk, a timeout and bad arguments. Every wait is bounded."""

from __future__ import annotations

import concurrent.futures as cf
import functools
import multiprocessing as mp
import pickle
import time

import executor_helpers
import numpy as np
import pytest

import saddlescape as ss
from saddlescape.runner import ChunkError

LIMIT = 60.0


def _assert_same(a: ss.RunManyResult, b: ss.RunManyResult) -> None:
    np.testing.assert_array_equal(a.t, b.t)
    for name in ("f", "grad_norm", "lambda_min", "x", "x_final"):
        u, v = getattr(a, name), getattr(b, name)
        assert (u is None) == (v is None), name
        if u is not None:
            assert u.shape == v.shape, name
            assert np.array_equal(u, v, equal_nan=True), name
    assert a.status == b.status and a.message == b.message
    np.testing.assert_array_equal(a.stopped_at, b.stopped_at)
    np.testing.assert_array_equal(a.seeds, b.seeds)


def _saddle():
    return ss.problems.SaddleProblem(h=(1.0, -0.1, 0.5), noise_cov=(1.0, 0.01, 0.3), n=40)


MAKE = functools.partial(ss.RMSProp, 3, 0.05, beta=0.9, eps=1e-4, structure="full")


@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_thread_executor_equals_the_local_run(chunk_size):
    P, x0, seeds = _saddle(), np.array([0.1, 0.0, -0.2]), [5, 0, 17, 3, 3, 9, 2]
    local = ss.run_many(P, MAKE, x0, 60, seeds, threads=2, record_every=7)
    with cf.ThreadPoolExecutor(3) as ex:
        remote = ss.run_many(P, MAKE, x0, 60, seeds, record_every=7, executor=ex,
                             chunk_size=chunk_size, timeout=LIMIT)
    _assert_same(local, remote)


def test_process_executor_equals_the_local_run_with_stopped_seeds():
    P = ss.problems.Oracle(executor_helpers.spiky, 3)
    x0, seeds = np.array([1.0, 0.5, -0.3]), list(range(9))
    local = ss.run_many(P, MAKE, x0, 60, seeds, threads=2, record_every=4, on_error="return")
    # seeds stop at different steps: chunks with grids of different lengths to stack
    assert "diverged" in local.status and "completed" in local.status
    with cf.ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as ex:
        remote = ss.run_many(P, MAKE, x0, 60, seeds, record_every=4, on_error="return",
                             executor=ex, chunk_size=2, timeout=LIMIT)
        with pytest.raises(ss.DivergenceError, match="seed"):
            ss.run_many(P, MAKE, x0, 60, seeds, executor=ex, timeout=LIMIT)
    _assert_same(local, remote)


def test_problems_pickle_as_their_arguments():
    X = np.random.default_rng(0).standard_normal((20, 3))
    y = np.arange(20) % 3
    for P in (_saddle(), ss.problems.ReddiCounterexample(3.0, 0.5),
              ss.problems.NoisyQuadratic(np.eye(2) * 2.0, [1.0, 0.5]),
              ss.problems.LogisticRegression(X, y, batch_size=4, l2=0.1)):
        Q = pickle.loads(pickle.dumps(P))
        assert type(Q) is type(P)
        x = np.linspace(-0.5, 0.5, P.dim)
        np.testing.assert_array_equal(P.stochastic_gradients(x, 4, 11),
                                      Q.stochastic_gradients(x, 4, 11))
    with pytest.raises(TypeError, match="pickle"):
        pickle.dumps(ss.problems.SaddleProblem.from_components([1.0, -1.0], np.ones((3, 2))))


def test_a_failing_chunk_is_named():
    def oracle(x, rng):
        if rng.random() < 0.2:
            raise KeyError("oracle failed")
        return x + rng.standard_normal(x.shape[0])

    with cf.ThreadPoolExecutor(2) as ex:
        with pytest.raises(ChunkError, match=r"chunk \d+ of 4 \(seeds \d+\.\.\d+\) failed in the "
                           r"executor: KeyError") as info:
            ss.run_many(oracle, lambda: ss.SGD(0.01), np.ones(2), 50, seeds=8, executor=ex,
                        chunk_size=2, timeout=LIMIT)
    assert isinstance(info.value.__cause__, KeyError)
    assert len(info.value.seeds) == 2


def test_a_chunk_that_cannot_be_pickled_is_named():
    with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
        with pytest.raises(ChunkError, match=r"chunk 0 of 2 \(seed 0\) failed .*pickle"):
            ss.run_many(_saddle(), lambda: ss.SGD(0.01), np.zeros(3), 5, seeds=2, executor=ex,
                        timeout=LIMIT)


def test_timeout_names_the_pending_chunks():
    def slow(x, rng):
        time.sleep(0.05)
        return x

    with cf.ThreadPoolExecutor(1) as ex:
        with pytest.raises(TimeoutError, match=r"did not finish within timeout = 0.2 s: chunk"):
            ss.run_many(slow, lambda: ss.SGD(0.01), np.ones(2), 20, seeds=2, executor=ex,
                        chunk_size=1, timeout=0.2)


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(executor=object()), TypeError, "concurrent.futures.Executor, got object"),
    (dict(chunk_size=0), ValueError, "chunk_size must be >= 1, got 0"),
    (dict(timeout=-1), ValueError, "timeout must be a number > 0"),
    (dict(progress=True), ValueError, "progress is not supported with an executor"),
])
def test_bad_executor_arguments(kwargs, err, match):
    with cf.ThreadPoolExecutor(1) as ex:
        args = dict(executor=ex)
        args.update(kwargs)
        with pytest.raises(err, match=match):
            ss.run_many(_saddle(), MAKE, np.zeros(3), 5, seeds=2, **args)


def test_chunk_options_need_an_executor():
    with pytest.raises(ValueError, match="only with an executor"):
        ss.run_many(_saddle(), MAKE, np.zeros(3), 5, seeds=2, chunk_size=1)
