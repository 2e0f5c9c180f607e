"""Regression tests for defects found in review; each names what once went wrong."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import saddlescape as ss


def test_huge_block_sizes_cannot_wrap_their_sum_around_to_dim():
    # [2^62] * 4 + [3] summed to 3 in 64-bit arithmetic and was accepted.
    with pytest.raises(ValueError, match="block sizes must be <= dim = 3"):
        ss.EMAEstimator(3, structure="block", block_sizes=[2**62] * 4 + [3])


def test_symmetrising_huge_entries_does_not_overflow():
    # (a + b) / 2 overflowed for entries above max / 2, and NaN eigenvalues passed the checks.
    a = ss.inv_sqrt(np.eye(2) * 1e308)
    np.testing.assert_allclose(a, np.eye(2) / np.sqrt(1e308), rtol=1e-14)


def test_newton_scales_tiny_float32_matrices_in_double():
    # 1 / c was formed in float32 and became inf for G = 1e-39 I.
    g = (np.eye(3) * 1e-39).astype(np.float32)
    a = ss.inv_sqrt(g, method="newton")
    np.testing.assert_allclose(a, np.eye(3) / np.sqrt(np.float32(1e-39)), rtol=1e-5)


def test_messages_name_the_rejected_value_exactly():
    # Six significant digits printed beta = 1 + 1e-12 as "1".
    with pytest.raises(ValueError, match=r"got 1\.000000000001"):
        ss.EMAEstimator(3, beta=ss.schedules.constant(1 + 1e-12)).update(np.ones(3))


@pytest.mark.parametrize(("key", "value", "message"), [
    ("beta_product", 1.0, "beta_product must be 1 before any step and < 1 after"),
    ("data", np.array([-1.0, 2.0]), r"a diagonal state must be >= 0, got data\[0\] = -1"),
])
def test_load_rejects_states_that_break_the_invariants(key, value, message):
    # beta_product = 1 after a step made the bias correction divide by zero; a negative diagonal
    # was accepted and blamed on "v" later.
    est = ss.EMAEstimator(2, structure="diag", beta=0.5, bias_correction=True)
    est.update(np.array([1.0, 2.0]))
    state = est.state_dict()
    before = {k: v.copy() for k, v in state.items()}
    bad = dict(state, **{key: np.asarray(value)})
    with pytest.raises(ValueError, match=message):
        est.load_state_dict(bad)
    after = est.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_one_estimator_shared_by_threads_stays_consistent():
    # With the GIL released, concurrent update_batch and preconditioner calls on one block
    # estimator raced on its factor cache and reported false errors.
    rng = np.random.default_rng(0)
    est = ss.EMAEstimator(40, structure="block", block_sizes=[10, 30], beta=0.9)
    est.update_batch(rng.standard_normal((50, 40)))
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        r = np.random.default_rng(seed)
        try:
            for _ in range(30):
                est.update_batch(r.standard_normal((5, 40)))
                est.preconditioner(1e-3)
        except BaseException as e:  # collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert est.steps == 50 + 4 * 30 * 5


def test_newton_refuses_an_eps_that_float32_cannot_hold():
    # eps = 1e39 was cast to float32 (undefined behaviour) and reported as "could not be scaled".
    with pytest.raises(ss.NumericalError, match="eps = 1e\\+39 is not representable in float32"):
        ss.inv_sqrt(np.eye(2, dtype=np.float32), 1e39, method="newton")
    np.testing.assert_allclose(ss.inv_sqrt(np.eye(2, dtype=np.float32), 1e39),
                               np.eye(2) / np.sqrt(1e39), rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Issue 4 review: optimizers, problems and runs


def test_native_callbacks_are_kept_alive_by_their_users():
    import ctypes
    import gc

    dp = ctypes.POINTER(ctypes.c_double)
    proto = ctypes.CFUNCTYPE(None, ctypes.c_int64, dp, dp, ctypes.c_uint64)

    def make(scale):
        def f(dim, x, g, key):
            for i in range(dim):
                g[i] = scale * x[i]
        return proto(f)

    p = ss.problems.NativeOracle(make(1.0), 1)  # the callback object has no other reference
    gc.collect()
    decoys = [make(-50.0) for _ in range(20)]  # noqa: F841 (would reuse the freed memory)
    r = ss.run(p, ss.SGD(0.1), [1.0], 10, record_every=10)
    np.testing.assert_allclose(r.x_final, [0.9**10], rtol=1e-14)

    pre = ctypes.CFUNCTYPE(None, ctypes.c_int64, dp, dp, dp)

    def make_opt(s):
        def a(dim, x, g, out):
            out[0] = s * g[0]
        return ss.PreconditionedSGD(0.1, pre(a), dim=1)

    q = ss.problems.Oracle(lambda x, rng: x.copy(), 1)
    many = ss.run_many(q, lambda it=iter([1.0, 2.0, 3.0]): make_opt(next(it)), [1.0], 5,
                       seeds=3, threads=2, record_every=5)
    gc.collect()
    np.testing.assert_allclose(many.x_final[:, 0], [(1 - 0.1 * s) ** 5 for s in (1, 2, 3)],
                               rtol=1e-14)


def test_saddle_escape_checks_the_base_step_size():
    opt = ss.SaddleEscape(ss.SGD(-0.1, dim=1), 1.0, 5)
    x = np.array([-1.0])
    opt.step(x, np.array([1.0]))  # t = 0: the large step r
    with pytest.raises(ValueError, match="lr must be finite and >= 0, got lr_t = -0.1"):
        opt.step(x, np.array([1.0]))


def test_lowrank_period_is_bounded():
    with pytest.raises(ValueError, match="refresh_every <= 256"):
        ss.RMSProp(8, 0.1, solver="lowrank", refresh_every=257)


@pytest.mark.parametrize("make", [
    lambda: ss.RMSProp(10, 0.1, beta=0.5),
    lambda: ss.RMSProp(64, 0.1, beta=0.5),
    lambda: ss.RMSProp(64, 0.1, beta=0.5, solver="lowrank", refresh_every=1),
    lambda: ss.Adam(10, 0.1, beta2=0.5, structure="full"),
])
def test_a_gradient_whose_estimate_would_overflow_changes_nothing(make):
    opt = make()
    d = opt.dim
    x = np.linspace(-1, 1, d)
    opt.step(x, np.ones(d))
    before, x_before = opt.state_dict(), x.copy()
    with pytest.raises(ss.NumericalError, match="would overflow"):
        opt.step(x, np.full(d, 3e153))
    np.testing.assert_array_equal(x, x_before)
    after = opt.state_dict()
    assert after["scalars"] == before["scalars"]
    for k in before["arrays"]:
        np.testing.assert_array_equal(after["arrays"][k], before["arrays"][k])


@pytest.mark.parametrize("bad", [{"steps": "3"}, {"steps": True}])
def test_state_scalars_must_be_numbers(bad):
    opt = ss.RMSProp(3, 0.1, structure="diag")
    state = opt.state_dict()
    state["scalars"].update(bad)
    with pytest.raises(ValueError, match="must be a real number"):
        opt.load_state_dict(state)


def test_run_many_with_more_threads_than_seeds_and_many_threads():
    p = ss.problems.SaddleProblem()
    a = ss.run_many(p, lambda: ss.SGD(0.01), np.zeros(2), 50, seeds=5, threads=64, record_every=50)
    b = ss.run_many(p, lambda: ss.SGD(0.01), np.zeros(2), 50, seeds=5, threads=1, record_every=50)
    np.testing.assert_array_equal(a.x_final, b.x_final)


def test_run_requires_an_optimizer():
    with pytest.raises(ValueError, match="optimizer must be a saddlescape optimizer, got NoneType"):
        ss.run(ss.problems.SaddleProblem(), None, np.zeros(2), 3)
