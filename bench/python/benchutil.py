"""Timing shared by the benchmarks in this folder.

Each library keeps a thread pool (saddlescape's and numpy's OpenBLAS, torch's OpenMP) whose
threads spin for up to a few hundred milliseconds after a call before they sleep. Timing one
library right after another therefore charges it for the other's spinning threads on a 2-core
machine (we measured a 64 x 64 eigendecomposition at 0.3 ms alone and 2 ms right after torch).
So every timed block of calls is preceded by a pause and one untimed warm-up call: each library
is measured as it runs when used alone. Rounds rotate the order and the median is reported.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable


def seconds_per_call(fn: Callable[[], object], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def compare(routes: dict[str, Callable[[], object]], rounds: int, target_s: float,
            settle_s: float = 0.25) -> dict[str, float]:
    """Median seconds per call of each route over `rounds` rounds of about `target_s` each."""
    number = {}
    for name, fn in routes.items():
        fn()
        number[name] = max(1, int(target_s / max(seconds_per_call(fn, 1), 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in routes}
    names = list(routes)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            time.sleep(settle_s)
            routes[name]()  # wakes this library's threads
            samples[name].append(seconds_per_call(routes[name], number[name]))
    return {name: statistics.median(s) for name, s in samples.items()}
