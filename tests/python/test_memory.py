"""Constructions and calls whose buffers cannot be allocated fail up front, naming the bytes.

Each case runs in a subprocess with an address-space limit (RLIMIT_AS) and a hard timeout, so
that a failure (an abort, a segfault, a process killed for memory) fails the test and cannot
take the test machine down. Two sizes per case:

* far beyond any machine's memory (terabytes): a ValueError "... needs N bytes (G GiB), more
  than this machine's M bytes of memory", before anything is allocated;
* beyond the limit but possibly within the machine (gigabytes under a 1.5 GiB limit): a
  MemoryError naming the bytes (or the ValueError, on a machine with less memory than that).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import pytest

LIMIT = 1536 << 20  # the child's address space; the interpreter and numpy need ~0.5 GiB

CHILD = textwrap.dedent("""
    import json, resource, sys
    resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
    import numpy as np
    import saddlescape as ss
    try:
        {code}
        print(json.dumps({{"type": None, "message": ""}}))
    except BaseException as e:
        print(json.dumps({{"type": type(e).__name__, "message": str(e)}}))
""")

HUGE = {  # terabytes: larger than any machine
    "EMAEstimator full": "ss.EMAEstimator(10**6)",
    "EMAEstimator full float32": "ss.EMAEstimator(10**6, dtype=np.float32)",
    "EMAEstimator block": "ss.EMAEstimator(2 * 10**6, structure='block', block_sizes=[10**6] * 2)",
    "CovarianceEstimator full": "ss.CovarianceEstimator(10**6, beta=0.9)",
    "RMSProp full": "ss.RMSProp(10**6, 0.1)",
    "RMSProp full lowrank": "ss.RMSProp(10**6, 0.1, solver='lowrank')",
    "RMSProp diag": "ss.RMSProp(10**12, 0.1, structure='diag')",
    "RMSProp block": "ss.RMSProp(2 * 10**6, 0.1, structure='block', block_sizes=[10**6] * 2)",
    "Adam full": "ss.Adam(10**6, structure='full')",
    "Adam diag": "ss.Adam(10**12, structure='diag')",
    "BlockEngine": "ss.BlockEngine([30000] * 1000)",
}

LARGE = {  # a few GiB: over the child's limit, maybe within the machine
    "EMAEstimator full": "ss.EMAEstimator(30000)",
    "RMSProp full": "ss.RMSProp(30000, 0.1)",
    "RMSProp diag": "ss.RMSProp(4 * 10**8, 0.1, structure='diag')",
    "Adam diag": "ss.Adam(3 * 10**8, structure='diag')",
    "BlockEngine": "ss.BlockEngine([20000], dtype=np.float64)",
    # A broadcast (non-contiguous) batch must be copied to C order: 4 GiB that cannot exist
    # here. Before the fix the failed copy was used anyway: a segfault.
    "inv_sqrt batch copy": "ss.inv_sqrt(np.broadcast_to(np.eye(16), (2 * 10**6, 16, 16)))",
    "inv_sqrt_apply copy": "ss.inv_sqrt_apply(np.broadcast_to(np.eye(1), (25000, 25000)), np.ones(25000))",
    "diag_inv_sqrt copy": "ss.diag_inv_sqrt(np.broadcast_to(np.float64(1), (6 * 10**8,)))",
    "estimator update_batch": "ss.EMAEstimator(10, structure='diag').update_batch(np.broadcast_to(np.ones(10), (10**8, 10)))",
}

BYTES = re.compile(r"\d+(\.\d+)?(e\+\d+)? bytes|\d+(\.\d+)? GiB")


def child(code: str) -> dict:
    src = CHILD.format(limit=LIMIT, code=code)
    p = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"the child died (rc {p.returncode}): {p.stderr[-2000:]}"
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", sorted(HUGE))
def test_buffers_beyond_the_machine_are_a_value_error_naming_the_bytes(name):
    r = child(HUGE[name])
    assert r["type"] == "ValueError", r
    assert BYTES.search(r["message"]) and "memory" in r["message"], r


@pytest.mark.parametrize("name", sorted(LARGE))
def test_buffers_beyond_a_memory_limit_are_a_memory_error_naming_the_bytes(name):
    r = child(LARGE[name])
    assert r["type"] in ("MemoryError", "ValueError"), r
    assert BYTES.search(r["message"]) or "Unable to allocate" in r["message"], r


def test_a_failed_construction_leaves_the_process_usable():
    code = ("import contextlib\n"
            "    with contextlib.suppress(ValueError, MemoryError):\n"
            "        ss.RMSProp(30000, 0.1)\n"
            "    e = ss.EMAEstimator(50); e.update(np.ones(50)); assert e.steps == 1")
    r = child(code)
    assert r["type"] is None, r


def test_block_engine_memory_stays_flat_when_blocks_refactor_every_step():
    # Regression: a refresh decided inside a step (the adam form's low-rank update refused
    # where new gradients reach an eigenvalue of 1e-12 lambda_max, here a new such direction
    # of every block at every step) gave its buffers to the spare pool, which grew by a pair
    # per such refresh: 150 MB per step on the 85,000-parameter MLP, an out-of-memory kill
    # within minutes.
    code = ("e = ss.BlockEngine([64] * 50, eps=1e-3, form='adam', dtype=np.float64)\n"
            "    rng = np.random.default_rng(0)\n"
            "    scales = np.tile(np.logspace(0, -6, 64), 50)\n"
            "    def rss():\n"
            "        return int(open('/proc/self/statm').read().split()[1]) * 4096\n"
            "    for t in range(120):\n"
            "        if t == 70: before, refreshes = rss(), e.statistics()['total_refreshes']\n"
            "        g = scales * rng.standard_normal(3200) * (1.0 if t < 70 else 1e-3)\n"
            "        if t >= 70: g[63 - t % 40::64] += 1.0\n"
            "        e.update_direction(g)\n"
            "    grown = rss() - before\n"
            "    extra = e.statistics()['total_refreshes'] - refreshes\n"
            "    assert extra >= 30 * 50, f'only {extra} refreshes: the case lost its point'\n"
            "    assert grown < 16 << 20, f'the resident set grew by {grown} bytes in 50 steps'")
    r = child(code)
    assert r["type"] is None, r
