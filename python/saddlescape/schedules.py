"""Step-size and EMA-weight schedules, evaluated in C++ so that loops stay native.

A schedule maps the step counter t = 0, 1, 2, ... (the t-th update, counted from 0) to a value;
call it as ``schedule(t)``.

* :func:`constant`: v_t = value.
* :func:`inverse_sqrt`: eta_t = eta0 / sqrt(t + 1).
* :func:`beta_from_lr_schedule`: beta_t = 1 - C * lr_t^(2/3) (Theorem 4.1, Sec. 5.4), clipped
  into [floor, 1): below by ``floor`` (default 0), and above by the largest double below 1,
  so that a tiny step size never freezes the estimate at beta = 1.
"""

from __future__ import annotations

from saddlescape import _core
from saddlescape._validation import real as _real

Schedule = _core.Schedule
ConstantSchedule = _core.ConstantSchedule
InverseSqrtSchedule = _core.InverseSqrtSchedule
BetaFromLrSchedule = _core.BetaFromLrSchedule

__all__ = [
    "BetaFromLrSchedule",
    "ConstantSchedule",
    "InverseSqrtSchedule",
    "Schedule",
    "beta_from_lr",
    "beta_from_lr_schedule",
    "constant",
    "inverse_sqrt",
]


def constant(value: float) -> ConstantSchedule:
    """The schedule v_t = value. Raises ValueError for a non-finite value."""
    return ConstantSchedule(_real("value", value))


def inverse_sqrt(eta0: float) -> InverseSqrtSchedule:
    """The step size eta_t = eta0 / sqrt(t + 1). Raises ValueError unless eta0 > 0 is finite."""
    return InverseSqrtSchedule(_real("eta0", eta0))


def as_schedule(name: str, value: float | Schedule) -> Schedule:
    """A schedule unchanged, or a number as a constant schedule."""
    return value if isinstance(value, Schedule) else constant(_real(name, value))


def beta_from_lr(lr: float, C: float = 1.0, floor: float = 0.0) -> float:
    """beta = 1 - C * lr^(2/3), the EMA weight Theorem 4.1 pairs with step size lr.

    Args:
        lr: the step size, finite and > 0.
        C: the constant, finite and > 0.
        floor: the smallest beta returned, in [0, 1).

    Returns:
        beta clipped into [floor, 1).

    Raises:
        ValueError: lr or C not finite and > 0, floor outside [0, 1).
    """
    return _core.beta_from_lr(_real("lr", lr), _real("C", C), _real("floor", floor))


def beta_from_lr_schedule(lr: float | Schedule, C: float = 1.0, floor: float = 0.0) -> BetaFromLrSchedule:
    """The schedule beta_t = beta_from_lr(lr_t, C, floor) for a step-size schedule (or constant) lr.

    Raises:
        ValueError: as :func:`beta_from_lr`; a step size that is not > 0 at some step raises
            when that step is reached.
    """
    return BetaFromLrSchedule(as_schedule("lr", lr), _real("C", C), _real("floor", floor))
