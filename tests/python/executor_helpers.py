"""Picklable (module-level) callables for test_run_many_executor.py's process executors."""

from __future__ import annotations

import numpy as np


def spiky(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """x + noise, but an infinite gradient with probability 1/40 per call: runs stop
    ("diverged") at seed-dependent steps."""
    if rng.random() < 1 / 40:
        return np.full(x.shape[0], np.inf)
    return 0.5 * x + rng.standard_normal(x.shape[0])
