"""The native loop: ``run`` (one seed) and ``run_many`` (many seeds on threads).

A run: x = x0; while the optimizer burns in (Algorithm 3) it is fed gradients at x0; then for
t = 0, ..., steps - 1: g_t = a stochastic gradient at x_t, x_(t+1) = step(x_t, g_t), projected
onto the problem's feasible set. Records are taken at x_0, after every ``record_every``-th step
and after the last. The whole loop runs in C++; a Python oracle re-acquires the GIL per call.

Same problem, optimizer settings, x0 and seed give the same result bit for bit (the generator is
documented in :mod:`saddlescape.problems`), whichever thread runs it.

A gradient or iterate that becomes non-finite stops the run at that step. With
``on_error="raise"`` (the default) that raises :class:`DivergenceError`, an optimizer's numerical
failure raises :class:`saddlescape.NumericalError` and its invalid-argument failure (e.g. a
schedule leaving its range) ``ValueError``; in each case the exception's ``result`` attribute holds
the records up to the stop. With ``on_error="return"`` the result is returned, its ``status``
saying what happened.

Exceptions from Python code and Ctrl-C. An exception raised by a Python oracle, a Python
callable preconditioner or a progress callback, and a problem's wrong-shaped result
(``ValueError``), stop the run at that step and are raised whatever ``on_error`` says, with the
records up to the last completed step attached as ``result`` (and the step as ``step``), the
attribute :class:`DivergenceError` uses. Ctrl-C is noticed within about 50 ms (the loop takes the
GIL to run Python's signal handlers every ``0.05`` s, between steps; a single longer step delays
it): the run stops at the next step boundary and the ``KeyboardInterrupt`` raised carries the
records the same way (``run`` adds a last record at the step where it stopped; ``run_many``
keeps every seed on the shared grid of ``record_every``). ``run_many`` then stops every seed at its next step boundary (seeds not
yet started keep only their record at x0, status ``"interrupted"``) and joins all its threads
before raising; the optimizers keep the state of their last completed step.

Progress: ``progress=True`` shows a `tqdm <https://tqdm.github.io>`_ bar of the steps done
(every seed's, burn-in included) on stderr; tqdm is an optional dependency
(``pip install saddlescape[progress]`` or ``pip install tqdm``). ``progress`` may also be a
callable ``progress(steps_done)``, called on the calling thread about every 50 ms.

Executors: ``run_many(..., executor=ex)`` runs chunks of the seeds on any
:class:`concurrent.futures.Executor` (a ``ProcessPoolExecutor``, a Dask ``client.get_executor()``,
mpi4py's ``MPIPoolExecutor``, a ``ThreadPoolExecutor``); each chunk is a local ``run_many`` with
``on_error="return"``, and the chunks' records are stacked in seed order, so the result is the
local run's bit for bit (a seed's run depends only on the problem, the optimizer, x0 and the
seed). Process-based executors pickle ``problem`` and ``make_optimizer``: the problem classes
of :mod:`saddlescape.problems` pickle as their constructor arguments, and ``make_optimizer``
must be picklable (a module-level function or a ``functools.partial`` of an optimizer class).

Threads: ``run_many`` runs seeds on ``threads`` threads; the diagonal optimizers split steps of
long vectors (>= 2^18 entries) over ``SADDLESCAPE_NUM_THREADS`` threads (default: all cores).
``run`` and ``run_many`` release the GIL, so runs of separate optimizers in parallel Python
threads proceed in parallel and give the serial results bit for bit. A run holds its
optimizers' locks: any other use of them meanwhile (another thread's step or run, the run's
own oracle) raises RuntimeError rather than racing with it (see :mod:`saddlescape.optimizers`).
Problems are immutable and may be shared.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from saddlescape import _core
from saddlescape._core import NumericalError
from saddlescape._validation import integer as _integer
from saddlescape._validation import real_array as _real_array
from saddlescape._validation import seed as _seed
from saddlescape.optimizers import Optimizer, _Exclusive
from saddlescape.problems import as_problem

__all__ = ["ChunkError", "DivergenceError", "RunManyResult", "RunResult", "run", "run_many"]


class ChunkError(RuntimeError):
    """A chunk of ``run_many(..., executor=...)`` failed in the executor (its worker raised,
    died, or could not unpickle the arguments). ``chunk`` is its index, ``seeds`` its seeds;
    the worker's exception is ``__cause__``."""

    def __init__(self, message: str, chunk: int, seeds: list[int]) -> None:
        super().__init__(message)
        self.chunk = chunk
        self.seeds = seeds


class DivergenceError(NumericalError):
    """A run's gradient or iterate became non-finite. ``result`` holds the records up to the
    stop and ``step`` the step t at which it happened."""

    def __init__(self, message: str, result: Any, step: int) -> None:
        super().__init__(message)
        self.result = result
        self.step = step


@dataclass(frozen=True)
class RunResult:
    """The records of one run.

    Attributes:
        t: (R,) the step count of each record (0 is x0).
        f: (R,) F(x_t), or None if the problem has no value.
        grad_norm: (R,) ||grad F(x_t)||, or None if the problem has no exact gradient.
        lambda_min: (R,) the Hessian's smallest eigenvalue, or None if it has no Hessian.
        x: (R, d) the iterates, or None with record_x=False.
        x_final: (d,) the iterate where the run ended.
        status: "completed", "diverged", "numerical", "invalid", "interrupted" (Ctrl-C or a
            progress callback that raised) or "error" (a Python oracle or callable raised).
        stopped_at: the step at which the run stopped, -1 if it completed.
        message: why it stopped ("" if it did not).
        seed: the run's seed.
    """

    t: np.ndarray
    f: np.ndarray | None
    grad_norm: np.ndarray | None
    lambda_min: np.ndarray | None
    x: np.ndarray | None
    x_final: np.ndarray
    status: str
    stopped_at: int
    message: str
    seed: int


@dataclass(frozen=True)
class RunManyResult:
    """The records of many runs, stacked: row i is seed ``seeds[i]``. Records after a run
    stopped are NaN. Attributes as :class:`RunResult`, with a leading seed axis; ``t`` is
    shared, ``status``, ``stopped_at`` and ``message`` are per seed."""

    t: np.ndarray
    f: np.ndarray | None
    grad_norm: np.ndarray | None
    lambda_min: np.ndarray | None
    x: np.ndarray | None
    x_final: np.ndarray
    status: list[str]
    stopped_at: np.ndarray
    message: list[str]
    seeds: np.ndarray

    def run(self, i: int) -> RunResult:
        """Seed i's records as a RunResult (NaN rows after a stop included)."""
        pick = lambda a: None if a is None else a[i]  # noqa: E731
        return RunResult(self.t, pick(self.f), pick(self.grad_norm), pick(self.lambda_min),
                         pick(self.x), self.x_final[i], self.status[i], int(self.stopped_at[i]),
                         self.message[i], int(self.seeds[i]))


def _check_common(optimizer: Any, x0: Any, steps: Any, record_every: Any, on_error: str):
    x = _real_array("x0", x0, np.dtype(np.float64), (None,))
    if x.shape[0] < 1:
        raise ValueError("x0 must have at least one entry")
    n = _integer("steps", steps)
    if n < 0:
        raise ValueError(f"steps must be >= 0, got {n}")
    every = _integer("record_every", record_every)
    if every < 1:
        raise ValueError(f"record_every must be >= 1, got {every}")
    if on_error not in ("raise", "return"):
        raise ValueError(f"on_error must be 'raise' or 'return', got {on_error!r}")
    if optimizer is not None and not isinstance(optimizer, Optimizer):
        raise ValueError(f"optimizer must be a saddlescape optimizer, got {type(optimizer).__name__}")
    return x, n, every


def _error(status: str, message: str, result: Any, step: int) -> Exception:
    text = f"the run stopped at step {step}: {message}"
    if status == "diverged":
        return DivergenceError(text, result, step)
    err: Exception = NumericalError(text) if status == "numerical" else ValueError(text)
    err.result = result  # type: ignore[attr-defined]
    err.step = step  # type: ignore[attr-defined]
    return err


def _raise_with(err: BaseException, result: Any, step: int) -> None:
    """Raises an exception from Python code (or Ctrl-C) with the records attached."""
    err.result = result  # type: ignore[attr-defined]
    err.step = step  # type: ignore[attr-defined]
    raise err


def _progress_bar(progress: Any, total: int, desc: str) -> tuple[Any, Any]:
    """(callback for the native loop, bar to close) for a ``progress`` argument."""
    if progress is None or progress is False:
        return None, None
    if progress is True:
        try:
            from tqdm.auto import tqdm
        except ImportError as e:
            raise ImportError("progress=True needs tqdm: pip install tqdm "
                              "(or pip install saddlescape[progress])") from e
        bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)

        def update(done: int) -> None:
            bar.update(int(done) - bar.n)

        return update, bar
    if callable(progress):
        return progress, None
    raise ValueError(f"progress must be a bool or a callable progress(steps_done), got "
                     f"{type(progress).__name__}")


def _burn_in(optimizer: Optimizer) -> int:
    return int(getattr(optimizer, "burn_in_remaining", 0) or 0)


def run(problem: Any, optimizer: Optimizer, x0: Any, steps: int, seed: int = 0,
        record_every: int = 1, record_x: bool = True, on_error: str = "raise",
        progress: bool | Callable[[int], Any] = False) -> RunResult:
    """Runs ``optimizer`` on ``problem`` from x0 for ``steps`` steps, natively.

    Args:
        problem: a problem from :mod:`saddlescape.problems`, or a callable ``oracle(x, rng)``.
        optimizer: a saddlescape optimizer; it is advanced in place.
        x0: the start, shape (d,).
        steps: the number of steps (burn-in steps come on top).
        seed: the run's seed.
        record_every: record every this many steps (and always at 0 and at the end).
        record_x: keep the iterate at each record.
        on_error: "raise" or "return" (see the module docstring).
        progress: True for a tqdm bar, or a callable ``progress(steps_done)``.

    Returns:
        A :class:`RunResult`.

    Raises:
        DivergenceError, NumericalError, ValueError: a stopped run with on_error="raise".
        KeyboardInterrupt: Ctrl-C, with ``result`` holding the records so far.
        Exception: whatever a Python oracle, callable preconditioner or progress callback
            raised, with ``result`` holding the records so far.
        ImportError: progress=True without tqdm installed.
        RuntimeError: the optimizer is in use by another thread's run, or this call comes
            from inside a run or step of it (see :mod:`saddlescape.optimizers`, Threads).
    """
    if not isinstance(optimizer, Optimizer):
        raise ValueError(f"optimizer must be a saddlescape optimizer, got {type(optimizer).__name__}")
    x, n, every = _check_common(optimizer, x0, steps, record_every, on_error)
    p = as_problem(problem, x.shape[0])
    if p.dim != x.shape[0]:
        raise ValueError(f"x0 has {x.shape[0]} entries but the problem has dim {p.dim}")
    s = _seed(seed)
    native = optimizer._native(p.dim)
    callback, bar = _progress_bar(progress, n + _burn_in(optimizer), "run")
    try:
        with _Exclusive([optimizer], run=True):
            d = _core.run(p, native, x, n, s, every, bool(record_x), callback)
        if bar is not None and d["status"] == "completed":
            bar.update(bar.total - bar.n)
    finally:
        if bar is not None:
            bar.close()
    err = d.pop("error")
    if isinstance(err, KeyboardInterrupt):
        d["status"] = "interrupted"  # Ctrl-C met inside a Python oracle or callable
    result = RunResult(seed=s, **d)
    if err is not None:
        _raise_with(err, result, result.stopped_at)
    if result.status != "completed" and on_error == "raise":
        raise _error(result.status, result.message, result, result.stopped_at)
    return result


def _stack(parts: list[np.ndarray | None], rows: int, shape: tuple[int, ...]) -> np.ndarray | None:
    if any(p is None for p in parts):
        return None
    out = np.full((len(parts), rows) + shape, np.nan)
    for i, p in enumerate(parts):
        out[i, : p.shape[0]] = p
    return out


def run_many(problem: Any, make_optimizer: Callable[[], Optimizer], x0: Any, steps: int,
             seeds: int | Sequence[int], threads: int | None = None, record_every: int = 1,
             record_x: bool = True, on_error: str = "raise",
             progress: bool | Callable[[int], Any] = False,
             executor: concurrent.futures.Executor | None = None, chunk_size: int | None = None,
             timeout: float | None = None) -> RunManyResult:
    """Runs one seed per optimizer from ``make_optimizer()``, in parallel native threads, or in
    chunks on an executor.

    Args:
        problem: as :func:`run`; shared by all threads (problems are immutable).
        make_optimizer: called once per seed, returning a fresh optimizer.
        x0, steps, record_every, record_x, on_error: as :func:`run`.
        seeds: a count n (seeds 0..n-1) or a sequence of seeds.
        threads: worker threads (default: the machine's CPU count; with an executor, 1 per
            chunk).
        progress: True for a tqdm bar of all seeds' steps, or a callable
            ``progress(steps_done)``; not with an executor.
        executor: a :class:`concurrent.futures.Executor` running the chunks (see the module
            docstring); None runs here.
        chunk_size: seeds per chunk (default: the seeds cut into about 4 chunks per worker
            where the executor says its worker count, else into 32 chunks).
        timeout: with an executor, seconds to wait for all chunks (None: no limit).

    Returns:
        A :class:`RunManyResult`; seed i's records equal ``run(..., seed=seeds[i])``'s.
        With on_error="raise", the first seed that stopped raises, with the stacked result.

    Raises:
        As :func:`run` (RuntimeError for an optimizer in use elsewhere); a KeyboardInterrupt
        or an exception from Python code carries the stacked result (every seed's records up
        to where it stopped) as ``result``.
        ChunkError: with an executor, a chunk failed (an exception in its worker, including
            one from Python code, is its ``__cause__``); the other chunks are cancelled.
        TimeoutError: the chunks did not finish within ``timeout``, naming those pending.
        TypeError: executor is not a concurrent.futures.Executor.
    """
    x, n, every = _check_common(None, x0, steps, record_every, on_error)
    p = as_problem(problem, x.shape[0])
    if p.dim != x.shape[0]:
        raise ValueError(f"x0 has {x.shape[0]} entries but the problem has dim {p.dim}")
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        count = _integer("seeds", seeds)
        if count < 1:
            raise ValueError(f"seeds must be >= 1 (a count) or a sequence of seeds, got {count}")
        seed_list = list(range(count))
    else:
        seed_list = [_seed(s) for s in seeds]
        if not seed_list:
            raise ValueError("seeds must not be empty")
    if executor is not None and threads is None:
        threads = 1
    nthreads = (os.cpu_count() or 1) if threads is None else _integer("threads", threads)
    if nthreads < 1:
        raise ValueError(f"threads must be >= 1, got {nthreads}")
    if not callable(make_optimizer):
        raise ValueError("make_optimizer must be a callable returning a fresh optimizer")
    if executor is not None:
        return _run_many_executor(problem, make_optimizer, x, n, seed_list, nthreads, every,
                                  bool(record_x), on_error, progress, executor, chunk_size,
                                  timeout)
    if chunk_size is not None or timeout is not None:
        raise ValueError("chunk_size and timeout apply only with an executor")
    # `made` keeps the Python optimizers (and whatever they own) alive for the whole run.
    opts, parts, made = [], [], []
    for _ in seed_list:
        o = make_optimizer()
        made.append(o)
        if not isinstance(o, Optimizer):
            raise ValueError(f"make_optimizer must return a saddlescape optimizer, got {type(o).__name__}")
        opts.append(o._native(p.dim))
        parts += o._parts()
    if len({id(o) for o in opts}) != len(opts):
        raise ValueError("make_optimizer returned the same optimizer twice; each seed needs its own")
    if len({id(o) for o in parts}) != len(parts):
        raise ValueError("make_optimizer returned optimizers that share state (SaddleEscapes over "
                         "one base); each seed needs its own")
    total = sum(n + _burn_in(o) for o in made)
    callback, bar = _progress_bar(progress, total, f"run_many ({len(seed_list)} seeds)")
    try:
        with _Exclusive(made, run=True):
            outs, interrupt = _core.run_many(p, opts, x, n, seed_list, every, bool(record_x),
                                             nthreads, callback)
        if bar is not None and all(o["status"] == "completed" for o in outs):
            bar.update(bar.total - bar.n)
    finally:
        if bar is not None:
            bar.close()
    del made
    errors = [o.pop("error") for o in outs]
    for e, o in zip(errors, outs):
        if isinstance(e, KeyboardInterrupt):
            o["status"] = "interrupted"  # Ctrl-C met inside a Python oracle or callable
    # Every run records on the same grid (0, every, 2 every, ..., n); a stopped run's records
    # are a prefix of it, so the longest one is the grid as far as any run got.
    t = max((o["t"] for o in outs), key=len).astype(np.int64)
    R, dim = t.shape[0], p.dim
    result = RunManyResult(
        t=t,
        f=_stack([o["f"] for o in outs], R, ()),
        grad_norm=_stack([o["grad_norm"] for o in outs], R, ()),
        lambda_min=_stack([o["lambda_min"] for o in outs], R, ()),
        x=_stack([o["x"] for o in outs], R, (dim,)),
        x_final=np.stack([o["x_final"] for o in outs]),
        status=[o["status"] for o in outs],
        stopped_at=np.array([o["stopped_at"] for o in outs], dtype=np.int64),
        message=[o["message"] for o in outs],
        seeds=np.array(seed_list, dtype=np.uint64),
    )
    if interrupt is not None:
        _raise_with(interrupt, result, max(int(o["stopped_at"]) for o in outs))
    for e, o in zip(errors, outs):
        if e is not None:
            _raise_with(e, result, int(o["stopped_at"]))
    if on_error == "raise":
        for i, o in enumerate(outs):
            if o["status"] != "completed":
                raise _error(o["status"], f"seed {seed_list[i]}: {o['message']}", result,
                             o["stopped_at"])
    return result


def _run_chunk(problem: Any, make_optimizer: Callable[[], Optimizer], x0: np.ndarray, steps: int,
               seeds: list[int], threads: int, record_every: int,
               record_x: bool) -> RunManyResult:
    """One chunk of run_many on an executor's worker."""
    return run_many(problem, make_optimizer, x0, steps, seeds, threads=threads,
                    record_every=record_every, record_x=record_x, on_error="return")


def _run_many_executor(problem: Any, make_optimizer: Callable[[], Optimizer], x: np.ndarray,
                       n: int, seed_list: list[int], nthreads: int, every: int, record_x: bool,
                       on_error: str, progress: Any, executor: Any, chunk_size: Any,
                       timeout: Any) -> RunManyResult:
    if not isinstance(executor, concurrent.futures.Executor):
        raise TypeError(f"executor must be a concurrent.futures.Executor, got "
                        f"{type(executor).__name__}")
    if progress is not None and progress is not False:
        raise ValueError("progress is not supported with an executor")
    if chunk_size is None:
        workers = getattr(executor, "_max_workers", None)
        chunks = 4 * workers if isinstance(workers, int) and workers > 0 else 32
        size = max(1, math.ceil(len(seed_list) / chunks))
    else:
        size = _integer("chunk_size", chunk_size)
        if size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {size}")
    if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout must be a number > 0 or None, got {timeout!r}")
    pieces = [seed_list[i:i + size] for i in range(0, len(seed_list), size)]
    futures = [executor.submit(_run_chunk, problem, make_optimizer, x, n, piece, nthreads, every,
                               record_x) for piece in pieces]

    def describe(i: int) -> str:
        piece = pieces[i]
        return (f"chunk {i} of {len(pieces)} (seeds {piece[0]}..{piece[-1]})" if len(piece) > 1
                else f"chunk {i} of {len(pieces)} (seed {piece[0]})")

    done, pending = concurrent.futures.wait(futures, timeout=timeout,
                                            return_when=concurrent.futures.FIRST_EXCEPTION)
    failed = [i for i, f in enumerate(futures) if f in done and f.exception() is not None]
    if failed:
        for f in pending:
            f.cancel()
        i = failed[0]
        e = futures[i].exception()
        raise ChunkError(f"run_many: {describe(i)} failed in the executor: "
                         f"{type(e).__name__}: {e}", i, pieces[i]) from e
    if pending:
        for f in pending:
            f.cancel()
        names = [describe(i) for i, f in enumerate(futures) if f in pending]
        raise TimeoutError(f"run_many: {len(names)} of {len(pieces)} chunks did not finish "
                           f"within timeout = {timeout} s: " + ", ".join(names[:5])
                           + (" ..." if len(names) > 5 else ""))
    parts = [f.result() for f in futures]
    t = max((p.t for p in parts), key=len)
    R = t.shape[0]
    rows = lambda name: [row for p in parts for row in (getattr(p, name) if getattr(p, name)  # noqa: E731
                                                         is not None else [None] * len(p.seeds))]
    dim = x.shape[0]
    result = RunManyResult(
        t=t,
        f=_stack(rows("f"), R, ()),
        grad_norm=_stack(rows("grad_norm"), R, ()),
        lambda_min=_stack(rows("lambda_min"), R, ()),
        x=_stack(rows("x"), R, (dim,)),
        x_final=np.concatenate([p.x_final for p in parts]),
        status=[s for p in parts for s in p.status],
        stopped_at=np.concatenate([p.stopped_at for p in parts]),
        message=[m for p in parts for m in p.message],
        seeds=np.array(seed_list, dtype=np.uint64),
    )
    if on_error == "raise":
        for i, st in enumerate(result.status):
            if st != "completed":
                raise _error(st, f"seed {seed_list[i]}: {result.message[i]}", result,
                             int(result.stopped_at[i]))
    return result
