"""Launching torch.distributed (gloo) workers from tests, under hard time limits.

``launch(fn, world_size, *args, timeout=...)`` starts ``world_size`` spawned processes; worker r
runs ``init_process_group("gloo", init_method="file://...", rank=r, timeout=pg_timeout)`` and then
``fn(rank, world_size, *args)``; what fn returns (picklable) or raises comes back per rank. The
whole launch is bounded: processes still alive at ``timeout`` are killed and the launch reports
them as hung, so a hang fails a test instead of stalling CI. fn must be importable (a
module-level function of a module on sys.path, e.g. this folder).
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable


_SINGLE_THREADED = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                    "SADDLESCAPE_NUM_THREADS": "1"}


@dataclass
class Outcome:
    """One rank's result: ``value`` (fn's return), or ``error`` ((type name, message,
    traceback)), or ``exitcode`` without either (the process died or was killed: ``hung``)."""

    rank: int
    value: Any = None
    error: tuple[str, str, str] | None = None
    exitcode: int | None = None
    hung: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and not self.hung and self.exitcode == 0


def _worker(fn: Callable[..., Any], rank: int, world: int, init_file: str, out_dir: str,
            pg_timeout: float, args: tuple[Any, ...]) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    result: dict[str, Any]
    try:
        dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank,
                                world_size=world,
                                timeout=datetime.timedelta(seconds=pg_timeout))
        result = {"value": fn(rank, world, *args)}
    except BaseException as e:  # noqa: BLE001 - reported to the test
        result = {"error": (type(e).__name__, str(e), traceback.format_exc())}
    tmp = os.path.join(out_dir, f".rank{rank}.tmp")
    with open(tmp, "wb") as f:
        pickle.dump(result, f)
    os.replace(tmp, os.path.join(out_dir, f"rank{rank}.pkl"))
    # Skip the process group's teardown (it may wait on dead peers): exit now.
    os._exit(0)


def launch(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 60.0,
           pg_timeout: float = 20.0) -> list[Outcome]:
    """Runs fn on world_size gloo ranks; returns one Outcome per rank after at most timeout s."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="saddlescape-dist-") as tmp:
        init_file = os.path.join(tmp, "pg")
        procs = [ctx.Process(target=_worker, args=(fn, r, world_size, init_file, tmp, pg_timeout,
                                                   args), daemon=True)
                 for r in range(world_size)]
        # One thread per library in each worker (set before the children import them): the
        # workers share the machine's cores, and idle BLAS threads spinning on an oversubscribed
        # machine made steps 40x slower.
        saved = {k: os.environ.get(k) for k in _SINGLE_THREADED}
        os.environ.update(_SINGLE_THREADED)
        try:
            for p in procs:
                p.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        outcomes = []
        for r, p in enumerate(procs):
            hung = p.is_alive()
            if hung:
                p.kill()
                p.join(5)
            o = Outcome(rank=r, exitcode=p.exitcode, hung=hung)
            path = os.path.join(tmp, f"rank{r}.pkl")
            if os.path.exists(path):
                with open(path, "rb") as f:
                    d = pickle.load(f)
                o.value, o.error = d.get("value"), d.get("error")
            outcomes.append(o)
        return outcomes


def values(outcomes: list[Outcome]) -> list[Any]:
    """The ranks' return values; an AssertionError naming every rank that failed or hung."""
    bad = [o for o in outcomes if not o.ok]
    if bad:
        lines = []
        for o in bad:
            if o.hung:
                lines.append(f"rank {o.rank}: hung (killed at the time limit)")
            elif o.error is not None:
                lines.append(f"rank {o.rank}: {o.error[0]}: {o.error[1]}\n{o.error[2]}")
            else:
                lines.append(f"rank {o.rank}: died with exit code {o.exitcode}")
        raise AssertionError("distributed workers failed:\n" + "\n".join(lines))
    return [o.value for o in outcomes]
