"""Argument conversion shared by the public modules: clear ValueErrors naming the value."""

from __future__ import annotations

import operator
from typing import Any

import numpy as np


def real(name: str, value: Any) -> float:
    """value as a Python float; bools, strings and other non-numbers are a ValueError."""
    if isinstance(value, (bool, np.bool_, str, bytes)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None


def integer(name: str, value: Any) -> int:
    """value as a Python int; floats (even 2.0) and bools are a ValueError."""
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def int32(name: str, value: Any) -> int:
    """value as an int that fits the C++ core's int, else a ValueError (the core checks the
    lower bounds itself, with the same kind of message)."""
    n = integer(name, value)
    if not -(2**31) <= n <= 2**31 - 1:
        raise ValueError(f"{name} must be an integer in the 32-bit range, got {n}")
    return n


def seed(value: Any) -> int:
    """A seed of the native generator: an integer in [0, 2**64), else a ValueError."""
    s = integer("seed", value)
    if not 0 <= s < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {s}")
    return s


def choice(name: str, value: Any, options: tuple[str, ...]) -> str:
    """value if it is one of the strings in options, else a ValueError naming it (a non-string
    would otherwise reach the core as a pybind11 TypeError listing signatures)."""
    if not isinstance(value, str) or value not in options:
        names = [repr(o) for o in options]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
        raise ValueError(f"{name} must be {listed}, got {value!r}")
    return value


def float_dtype(dtype: Any) -> np.dtype:
    """float32 or float64 as a numpy dtype; anything else is a ValueError."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}") from None
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"dtype must be float32 or float64, got {dt}")
    return dt


def real_array(name: str, value: Any, dtype: np.dtype, shape: tuple[int | None, ...]) -> np.ndarray:
    """A C-contiguous array of dtype and shape (None: any length) from real-valued input.

    Integer and float input is converted; bool, complex and object input is a ValueError, as is
    a shape mismatch, named in the message. Arrays already right are passed without a copy.
    """
    a = np.asarray(value)
    if a.dtype.kind not in "fiu":
        raise ValueError(f"{name} must be a real-valued array, got dtype {a.dtype}")
    if a.ndim != len(shape) or any(s is not None and s != n for s, n in zip(shape, a.shape)):
        want = "(" + ", ".join("k" if s is None else str(s) for s in shape) + (",)" if len(shape) == 1 else ")")
        raise ValueError(f"{name} must have shape {want}, got shape {a.shape}")
    return np.ascontiguousarray(a, dtype=dtype)
