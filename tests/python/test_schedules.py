"""saddlescape.schedules against the formulas, evaluated in float64 numpy.

* constant: v_t = value.
* inverse_sqrt: eta_t = eta0 / sqrt(t + 1); both sides are one division and one correctly rounded
  sqrt of the same double, so they agree to 1 ulp (t + 1 is exact below 2^53).
* beta_from_lr: beta = 1 - C lr^(2/3), clipped into [floor, largest double below 1]. lr^(2/3)
  is computed by the reference as np.cbrt(lr) ** 2 (a few ulp), so 1 - C lr^(2/3) agrees to a
  few ulp of max(1, C lr^(2/3)) where it is not clipped.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import saddlescape as ss
from saddlescape import schedules

ONE_MINUS = np.nextafter(1.0, 0.0)
U = float(np.finfo(np.float64).eps)


def ref_beta(lr, C=1.0, floor=0.0):
    lr = np.asarray(lr, dtype=np.float64)
    beta = 1.0 - C * np.cbrt(lr) ** 2
    return np.clip(beta, floor, ONE_MINUS)


def beta_tol(lr, C) -> np.ndarray:
    """8 ulp of the larger of the two terms of 1 - C lr^(2/3)."""
    return 8.0 * U * np.maximum(1.0, C * np.cbrt(np.asarray(lr, dtype=np.float64)) ** 2)


T_GRID = [0, 1, 2, 3, 10, 99, 1000, 12345, 10**6, 2**40, 2**52]


@pytest.mark.parametrize("value", [0.0, 0.9, -2.5, 1e300, 5e-324])
def test_constant(value):
    s = schedules.constant(value)
    assert isinstance(s, schedules.Schedule) and isinstance(s, schedules.ConstantSchedule)
    assert s.value == value
    assert all(s(t) == value for t in T_GRID)
    assert repr(s).startswith("constant(")


@pytest.mark.parametrize("eta0", [1.0, 0.1, 3e-7, 2.0, 1e200])
def test_inverse_sqrt(eta0):
    s = schedules.inverse_sqrt(eta0)
    assert s.eta0 == eta0
    for t in T_GRID:
        want = eta0 / np.sqrt(np.float64(t) + 1.0)
        assert abs(s(t) - want) <= U * want, t
    assert s(0) == eta0
    assert s(3) == eta0 / 2.0  # sqrt(4) = 2 exactly
    assert "inverse_sqrt" in repr(s)
    # decreasing
    vals = [s(t) for t in range(200)]
    assert all(a > b for a, b in zip(vals, vals[1:]))


@pytest.mark.parametrize("C", [1.0, 0.5, 3.0])
@pytest.mark.parametrize("floor", [0.0, 0.3])
def test_beta_from_lr_matches_formula(C, floor):
    lrs = np.logspace(-12, 1, 131)
    got = np.array([ss.beta_from_lr(lr, C, floor) for lr in lrs])
    want = ref_beta(lrs, C, floor)
    assert np.all(np.abs(got - want) <= beta_tol(lrs, C))
    assert np.all((got >= floor) & (got < 1.0))
    # the same function through the schedules module, with its defaults C = 1, floor = 0
    assert schedules.beta_from_lr(0.01) == ss.beta_from_lr(0.01, 1.0, 0.0)
    # monotone: a smaller step size, a longer memory
    assert np.all(np.diff(got) <= 0)


def test_beta_from_lr_clips():
    # Upper: C lr^(2/3) below rounding would give beta = 1, which would freeze the estimate.
    for lr in [1e-30, 1e-100, 5e-324]:
        assert ss.beta_from_lr(lr) == ONE_MINUS
    # Lower: C lr^(2/3) >= 1 would give a negative weight; the floor (default 0) applies.
    assert ss.beta_from_lr(1.0) == 0.0  # 1 - 1 = 0, exactly the default floor
    assert ss.beta_from_lr(8.0) == 0.0  # 1 - 4 < 0
    assert ss.beta_from_lr(8.0, floor=0.25) == 0.25
    assert ss.beta_from_lr(1e300, C=7.0, floor=0.5) == 0.5
    # exact cases: lr = 1/8 -> lr^(2/3) = 1/4
    assert abs(ss.beta_from_lr(0.125) - 0.75) <= 2 * U
    assert abs(ss.beta_from_lr(0.125, C=2.0) - 0.5) <= 2 * U


@pytest.mark.parametrize(("lr", "C"), [
    # beta = 1 - C lr^(2/3) well inside (0, 1), with lr far from 1 and C compensating: nothing
    # here overflows or underflows in the formula, only in an intermediate like lr^2.
    (1e-170, 1e112),  # 1 - 1e112 * 1e-113.33 = 0.954
    (1e-200, 1e133),  # 1 - 1e133 * 1e-133.33 = 0.536
    (1e160, 1e-110),  # 1 - 1e-110 * 1e106.67 = 0.9995
    (1e200, 1e-134),  # 1 - 1e-134 * 1e133.33 = 0.785
    (1e200, 1e-133),  # 1 - 1e-133 * 1e133.33 = -1.15: the floor, 0
    (1e-150, 4e99),  # 1 - 4e99 * 1e-100 = 0.6; lr^2 = 1e-300 is still normal
])
def test_beta_from_lr_extreme_step_sizes(lr, C):
    want = float(ref_beta(lr, C))
    got = ss.beta_from_lr(lr, C)
    assert abs(got - want) <= float(beta_tol(lr, C)), f"beta_from_lr({lr}, C={C}) = {got}, want {want}"


@pytest.mark.parametrize(("eta0", "C", "floor"), [(2.0, 1.0, 0.1), (0.05, 1.0, 0.0), (1.0, 0.7, 0.0), (0.3, 2.0, 0.5)])
def test_beta_from_lr_schedule_matches_numpy_loop(eta0, C, floor):
    s = schedules.beta_from_lr_schedule(schedules.inverse_sqrt(eta0), C=C, floor=floor)
    assert isinstance(s, schedules.BetaFromLrSchedule)
    assert (s.C, s.floor) == (C, floor)
    for t in list(range(2000)) + T_GRID:
        eta_t = eta0 / np.sqrt(np.float64(t) + 1.0)  # the numpy loop: one beta_t per step
        want = float(ref_beta(eta_t, C, floor))
        assert abs(s(t) - want) <= float(beta_tol(eta_t, C)), t
    assert "beta_from_lr" in repr(s) and "inverse_sqrt" in repr(s)


def test_beta_from_lr_schedule_of_a_number_is_constant():
    s = schedules.beta_from_lr_schedule(0.001, C=2.0)
    want = ss.beta_from_lr(0.001, 2.0)
    assert all(s(t) == want for t in T_GRID)
    assert abs(want - (1 - 2.0 * 0.01)) <= 4 * U


@pytest.mark.parametrize(("call", "message"), [
    (lambda: ss.beta_from_lr(0.0), "lr must be finite and > 0, got 0"),
    (lambda: ss.beta_from_lr(-0.5), "got -0.5"),
    (lambda: ss.beta_from_lr(float("nan")), "got nan"),
    (lambda: ss.beta_from_lr(float("inf")), "got inf"),
    (lambda: ss.beta_from_lr(0.1, C=0.0), "C must be finite and > 0, got 0"),
    (lambda: ss.beta_from_lr(0.1, C=-2.0), "got -2"),
    (lambda: ss.beta_from_lr(0.1, C=float("inf")), "got inf"),
    (lambda: ss.beta_from_lr(0.1, floor=1.0), "floor must be in [0, 1), got 1"),
    (lambda: ss.beta_from_lr(0.1, floor=-0.1), "got -0.1"),
    (lambda: ss.beta_from_lr(0.1, floor=float("nan")), "got nan"),
    (lambda: ss.beta_from_lr("fast"), "lr must be a real number, got 'fast'"),
    (lambda: ss.beta_from_lr(True), "got True"),
    (lambda: schedules.constant(float("nan")), "finite value, got nan"),
    (lambda: schedules.constant(float("-inf")), "got -inf"),
    (lambda: schedules.constant(None), "value must be a real number, got None"),
    (lambda: schedules.inverse_sqrt(0.0), "eta0 must be finite and > 0, got 0"),
    (lambda: schedules.inverse_sqrt(-1.0), "got -1"),
    (lambda: schedules.inverse_sqrt(float("inf")), "got inf"),
    (lambda: schedules.beta_from_lr_schedule(schedules.inverse_sqrt(1.0), C=0.0), "C must be finite and > 0, got 0"),
    (lambda: schedules.beta_from_lr_schedule(schedules.inverse_sqrt(1.0), floor=1.5), "got 1.5"),
])
def test_bad_arguments_name_the_value(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def test_a_constant_step_size_that_is_not_positive_is_rejected_when_built():
    # Every step-size schedule Python can build is > 0 wherever it is defined, so a bad constant
    # is the one case to catch, and it is caught at construction.
    for lr in (-0.25, 0.0):
        with pytest.raises(ValueError, match=re.escape(f"lr must be finite and > 0, got {lr:g}")):
            schedules.beta_from_lr_schedule(schedules.constant(lr))
    with pytest.raises(ValueError, match="finite value, got nan"):
        schedules.beta_from_lr_schedule(float("nan"))


def test_schedules_are_shared_between_estimators():
    # A schedule is immutable: two estimators on one schedule see the same beta_t.
    s = schedules.beta_from_lr_schedule(schedules.inverse_sqrt(0.5), floor=0.2)
    a = ss.EMAEstimator(3, beta=s)
    b = ss.EMAEstimator(3, beta=s, structure="diag")
    g = np.array([1.0, -2.0, 0.5])
    for _ in range(5):
        a.update(g)
        b.update(g)
    np.testing.assert_allclose(np.diag(a.estimate()), b.estimate(), rtol=64 * U, atol=0)
    assert a.beta is s and b.beta is s
