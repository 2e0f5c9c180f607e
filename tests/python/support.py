"""Helpers shared by the test modules (on sys.path through pytest's ``pythonpath`` setting)."""

from __future__ import annotations


def blocks_for(d: int) -> list[int]:
    """Unequal block sizes summing to d, including a 1 x 1 block where d allows."""
    if d == 1:
        return [1]
    if d == 2:
        return [1, 1]
    if d < 10:
        return [1, d - 3, 2]
    return [d // 3, 1, d - d // 3 - 1]
