"""Benchmark the block preconditioner engine (issue 11) against numpy, scipy and torch, in one run.

1. ``batched``: A = (G + eps I)^(-1/2) of an (n, d, d) stack, (n, d) = (4096, 16), (1024, 64),
   (64, 256), float32 and float64: ``saddlescape.inv_sqrt(G, eps)`` against numpy's route
   (``w, V = np.linalg.eigh(G)``, then ``(V * f(w)[..., None, :]) @ V^T``) and torch's
   (``torch.linalg.eigh`` and the same reconstruction on zero-copy tensors), with the largest
   relative error (Frobenius, over the stack) of each route against a float64 numpy reference.
2. ``single``: one inv_sqrt at d = 16, float64, a loop of 2000 calls per round.
3. ``warm``: the engine's warm refresh of one block of d = 256 and 1024 after 16 rank-1 EMA
   updates (beta = 0.99), against its cold refresh (syevd) and scipy's ``dsyevd``/``ssyevd`` of
   the same matrix; the accuracy of ``direction(g)`` against (G + eps I)^(-1/2) g computed from
   ``np.linalg.eigh`` of a float64 G tracked here in numpy.
4. ``mlp``: block RMSProp with exact directions (``BlockEngine.step``, default options) on the
   85,002 parameters of a 64-256-256-10 MLP, blocks of 256, float32, against the straightforward
   torch implementation (batched ``eigh`` every 10 steps, stale in between) and against the
   memory-traffic bound of the step at the bandwidth measured in the same run; once after 16
   warm-up steps (early training: every block rank-deficient, refreshed by the range refresh)
   and once after 320 (every block full rank: cold refreshes, the steady state).
5. ``range``: the range refresh of a rank-deficient block against its cold syevd and scipy's.

Each timed block starts after a pause that lets the other libraries' thread pools go idle and
one untimed call (see benchutil.py); rounds rotate the order of the routes and the tables report
medians over rounds. Ratios are baseline time / saddlescape time (above 1: saddlescape faster).
Every item runs on its own: a missing torch, saddlescape.BlockEngine or engine method prints
"not available" in that place, and an item that fails prints why and lets the others run.

    python bench/python/bench_blocks.py                          # every item, 11 rounds
    python bench/python/bench_blocks.py --only warm,mlp --rounds 7
    python bench/python/bench_blocks.py --only mlp,range --rounds 7
    python bench/python/bench_blocks.py --quick                  # tiny sizes, < 30 s
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
import traceback
from typing import Callable

import numpy as np
import scipy
import scipy.linalg.lapack as lapack

from benchutil import compare

try:
    import saddlescape as ss
except Exception as exc:  # baselines still run; our columns say why they are missing
    ss = None
    SS_REASON = f"saddlescape not importable ({type(exc).__name__}: {exc})"
else:
    SS_REASON = ""

try:
    import torch
except Exception:  # the torch columns are optional
    torch = None

EPS = 1e-8
ADAM_EPS = 1e-4
BETA = 0.99
NA = "not available"


# --------------------------------------------------------------------------------------------
# helpers


def fmt_time(t: float | None) -> str:
    if t is None or not math.isfinite(t):
        return NA
    if t < 1e-3:
        return f"{t * 1e6:.1f} us"
    return f"{t * 1e3:.3f} ms" if t < 1.0 else f"{t:.2f} s"


def fmt_ratio(num: float | None, den: float | None) -> str:
    if num is None or den is None or not (den > 0) or not math.isfinite(num):
        return NA
    return f"{num / den:.2f}x"


def fmt_err(e: float | None) -> str:
    return NA if e is None else f"{e:.1e}"


def table(cols: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    sys.stdout.flush()


def rotated(names: list[str], r: int) -> list[str]:
    k = r % len(names) if names else 0
    return names[k:] + names[:k]


def compare_fixed(routes: dict[str, Callable[[], object]], rounds: int, number: int,
                  settle_s: float) -> dict[str, float]:
    """benchutil.compare with a fixed number of calls per timed block (median s per call)."""
    samples: dict[str, list[float]] = {n: [] for n in routes}
    for r in range(rounds):
        for name in rotated(list(routes), r):
            time.sleep(settle_s)
            routes[name]()  # wakes this library's threads
            start = time.perf_counter()
            for _ in range(number):
                routes[name]()
            samples[name].append((time.perf_counter() - start) / number)
    return {n: statistics.median(s) for n, s in samples.items()}


def rel_err(x: np.ndarray, ref: np.ndarray, axes: tuple[int, ...] | None = None) -> float:
    """Largest relative Frobenius error over the leading axes (all of x if axes is None)."""
    x = np.asarray(x, dtype=np.float64)
    if axes is None:
        return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))
    num = np.sqrt(np.sum((x - ref) ** 2, axis=axes))
    den = np.sqrt(np.sum(ref**2, axis=axes))
    return float(np.max(num / den))


def has_engine() -> str:
    """'' if saddlescape.BlockEngine exists, else why not."""
    if ss is None:
        return SS_REASON
    if not hasattr(ss, "BlockEngine"):
        return "saddlescape.BlockEngine missing"
    return ""


def missing(obj: object, names: list[str]) -> list[str]:
    return [n for n in names if not hasattr(obj, n)]


def make_engine(sizes: list[int], dtype: type, refresh_every: int, warm_start: bool = True,
                form: str = "inv_sqrt", eps: float = EPS):
    return ss.BlockEngine(sizes, beta=BETA, eps=eps, form=form, refresh_every=refresh_every,
                          dtype=dtype, tol=None, bias_correction=False, warm_start=warm_start)


def stat_totals(eng) -> dict[str, int]:
    """Sums over blocks of the engine's per-block counters (those it reports)."""
    if not hasattr(eng, "statistics"):
        return {}
    st = eng.statistics()
    out = {}
    for key in ("refreshes", "warm_refreshes", "fallbacks", "pending"):
        v = st.get(key)
        if v is not None:
            out[key] = int(np.sum(v))
    return out


def machine_line(threads_note: str) -> None:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    blas = ""
    try:
        import threadpoolctl

        pools = threadpoolctl.threadpool_info()
        blas = ", ".join(f"{p.get('internal_api')} {p.get('version')} ({p.get('num_threads')} threads,"
                         f" {os.path.basename(p.get('filepath', ''))})" for p in pools)
    except Exception:
        blas = "threadpoolctl not installed"
    env = ", ".join(f"{k}={os.environ.get(k, 'unset')}"
                    for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "SADDLESCAPE_NUM_THREADS"))
    print(f"machine: {model or platform.processor() or platform.machine()}, {os.cpu_count()} cores "
          f"({usable} usable), {platform.system()} {platform.machine()}")
    print(f"numpy {np.__version__}, scipy {scipy.__version__}, "
          f"saddlescape {getattr(ss, '__version__', '?') if ss else 'not importable'}"
          f"{'' if not ss else (' (BlockEngine present)' if hasattr(ss, 'BlockEngine') else ' (no BlockEngine)')}, "
          f"torch {torch.__version__ + f' ({torch.get_num_threads()} threads)' if torch else 'not installed'}")
    print(f"threads: {env}; BLAS pools: {blas}")
    print(threads_note)


# --------------------------------------------------------------------------------------------
# 1 and 2: inverse square roots


def spd_stack(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """n random SPD matrices X X^T / d + 0.1 I (X d x d Gaussian): condition about 10-40."""
    x = rng.standard_normal((n, d, d))
    g = x @ x.swapaxes(-1, -2) / d + 0.1 * np.eye(d)
    return np.ascontiguousarray((g + g.swapaxes(-1, -2)) / 2)


def numpy_route(g: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(g)
    f = 1.0 / np.sqrt(np.maximum(w, 0) + EPS)
    return (v * f[..., None, :]) @ v.swapaxes(-1, -2)


def torch_route(g: "torch.Tensor") -> "torch.Tensor":
    w, v = torch.linalg.eigh(g)
    return (v * (w.clamp_min(0) + EPS).rsqrt().unsqueeze(-2)) @ v.transpose(-1, -2)


def inv_sqrt_routes(g: np.ndarray) -> tuple[dict[str, Callable[[], object]], dict[str, float]]:
    """The routes on g and each one's largest relative error against the float64 reference."""
    routes: dict[str, Callable[[], object]] = {"numpy": lambda: numpy_route(g)}
    if ss is not None:
        routes["saddlescape"] = lambda: ss.inv_sqrt(g, EPS)
    if torch is not None:
        gt = torch.from_numpy(g)
        routes["torch"] = lambda: torch_route(gt)
    ref = numpy_route(g.astype(np.float64))
    axes = (-2, -1) if g.ndim == 3 else None
    errs = {}
    for name, fn in routes.items():
        out = fn()
        if torch is not None and isinstance(out, torch.Tensor):
            out = out.numpy()
        errs[name] = rel_err(out, ref, axes)
    return routes, errs


def item_batched(sizes: list[tuple[int, int]], rounds: int, target_s: float, settle: float) -> None:
    print(f"\n### 1. Batched (G + eps I)^(-1/2), eps = {EPS:g} (median of {rounds} rounds)\n")
    if ss is None:
        print(f"saddlescape columns: {NA} ({SS_REASON})\n")
    rows = []
    for n, d in sizes:
        g64 = spd_stack(n, d, np.random.default_rng(1000 * n + d))
        for dtype in (np.float32, np.float64):
            g = np.ascontiguousarray(g64.astype(dtype))
            routes, errs = inv_sqrt_routes(g)
            t = compare(routes, rounds, target_s, settle_s=settle)
            ours = t.get("saddlescape")
            rows.append([str(n), str(d), np.dtype(dtype).name, fmt_time(ours),
                         fmt_time(t["numpy"]), fmt_ratio(t["numpy"], ours),
                         fmt_time(t.get("torch")), fmt_ratio(t.get("torch"), ours),
                         fmt_err(errs.get("saddlescape")),
                         "0 (ref)" if dtype is np.float64 else fmt_err(errs["numpy"]),
                         fmt_err(errs.get("torch"))])
            print(f"  done n={n} d={d} {np.dtype(dtype).name}", file=sys.stderr, flush=True)
    table(["n", "d", "dtype", "saddlescape", "numpy", "vs numpy", "torch", "vs torch",
           "err saddlescape", "err numpy", "err torch"], rows)
    print("\nerr: largest ||A - A_ref||_F / ||A_ref||_F over the stack, A_ref from numpy's float64 "
          "eigh of the same (rounded) G; target: >= 3x numpy and torch.")


def item_single(d: int, calls: int, rounds: int, settle: float) -> None:
    print(f"\n### 2. One (G + eps I)^(-1/2) at d = {d}, float64 ({calls} calls per round, "
          f"median of {rounds} rounds)\n")
    g = spd_stack(1, d, np.random.default_rng(d))[0]
    routes, errs = inv_sqrt_routes(g)
    t = compare_fixed(routes, rounds, calls, settle)
    ours = t.get("saddlescape")
    table(["d", "saddlescape", "numpy", "vs numpy", "torch", "vs torch", "err saddlescape"],
          [[str(d), fmt_time(ours), fmt_time(t["numpy"]), fmt_ratio(t["numpy"], ours),
            fmt_time(t.get("torch")), fmt_ratio(t.get("torch"), ours),
            fmt_err(errs.get("saddlescape")) if ss else f"{NA} ({SS_REASON})"]])
    print("\ntarget: >= 3x numpy.")


# --------------------------------------------------------------------------------------------
# 3: warm refactorisation of one block


def warm_block(d: int, dtype: type, rounds: int, settle: float, refresh_every: int,
               updates: int, budget_s: float = math.inf) -> list[str]:
    """One row of item 3: times of the warm and cold refresh and of scipy's syevd, errors."""
    name = np.dtype(dtype).name
    rng = np.random.default_rng(d + (1 if dtype is np.float32 else 0))
    syevd = lapack.ssyevd if dtype is np.float32 else lapack.dsyevd

    # A well-conditioned SPD start: d orthogonal gradients g_i = s_i q_i whose EMA weights
    # w_i = (1 - beta) beta^(d-1-i) are undone by s_i^2 = lambda_i / w_i, so that after d updates
    # G = Q diag(lambda) Q^T with lambda in [10^-1.5, 1] (condition about 30); then gradients drawn
    # from that covariance. G is tracked here in float64 from the (rounded) gradients themselves.
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    lam = rng.permutation(np.logspace(0, -1.5, d))
    w = (1 - BETA) * BETA ** np.arange(d - 1, -1, -1, dtype=np.float64)
    build = np.ascontiguousarray((q * np.sqrt(lam / w)).T.astype(dtype))  # rows are gradients
    b64 = build.astype(np.float64)
    G = (b64.T * w) @ b64
    root = q * np.sqrt(lam)
    n_batches = rounds + 1  # the first is an untimed warm-up
    grads = [np.ascontiguousarray((rng.standard_normal((updates, d)) @ root.T).astype(dtype))
             for _ in range(n_batches)]
    probes = [np.ascontiguousarray((root @ rng.standard_normal(d)).astype(dtype))
              for _ in range(n_batches)]

    def ref_direction(g: np.ndarray) -> np.ndarray:
        lw, v = np.linalg.eigh(G)
        return v @ ((v.T @ g.astype(np.float64)) / np.sqrt(np.maximum(lw, 0) + EPS))

    why = has_engine()
    engines = {}
    if not why:
        try:
            engines = {"warm": make_engine([d], dtype, refresh_every),
                       "cold": make_engine([d], dtype, refresh_every)}
            lack = missing(engines["warm"], ["update_batch", "update", "refresh", "direction"])
            if lack:
                why, engines = "BlockEngine lacks " + ", ".join(lack), {}
            else:
                for e in engines.values():
                    e.update_batch(build)
        except Exception as exc:
            why, engines = f"{type(exc).__name__}: {exc}", {}

    times: dict[str, list[float]] = {k: [] for k in ("warm", "cold", "scipy")}
    errs: dict[str, list[float]] = {k: [] for k in ("warm", "cold", "scipy", "start")}
    counts = {"warm_refreshes": 0, "fallbacks": 0, "refreshes": 0}
    pending_seen: set[int] = set()
    wake = np.ascontiguousarray(np.eye(64, dtype=dtype) * 2.0)
    row_start = time.perf_counter()
    for r in range(n_batches):
        if r >= 3 and time.perf_counter() - row_start > budget_s:
            break  # at least two timed rounds; the note says how many were taken
        if r == 0 and engines and hasattr(engines["warm"], "direction"):
            # the engine's estimate after the build, before any timing
            errs["start"].append(rel_err(engines["warm"].direction(probes[0]), ref_direction(probes[0])))
        for g in grads[r]:
            for e in engines.values():
                e.update(g)
            g64 = g.astype(np.float64)
            G *= BETA
            G += (1 - BETA) * np.outer(g64, g64)
        before = {k: stat_totals(e) for k, e in engines.items()}
        for k, st in before.items():
            if "pending" in st:
                pending_seen.add(st["pending"])
        a_f = np.asfortranarray(G.astype(dtype))
        sample: dict[str, float] = {}
        for route in rotated(["warm", "cold", "scipy"], r):
            if route != "scipy" and not engines:
                continue
            time.sleep(settle)
            if route == "scipy":
                syevd(wake)  # wakes scipy's BLAS threads; then only the factorisation is timed
                start = time.perf_counter()
                lw, v, info = syevd(a_f, compute_v=1, lower=1, overwrite_a=1)
                sample[route] = time.perf_counter() - start
                if info != 0:
                    raise RuntimeError(f"{syevd.__name__} info = {info}")
                v64 = v.astype(np.float64)
                sc = (v64.T @ probes[r].astype(np.float64)) / np.sqrt(np.maximum(lw, 0) + EPS)
                scipy_dir = v64 @ sc
            else:
                e = engines[route]
                e.direction(probes[r])  # wakes the engine's threads; changes nothing
                start = time.perf_counter()
                e.refresh(warm=(route == "warm"))
                sample[route] = time.perf_counter() - start
        ref = ref_direction(probes[r])
        if r == 0:
            continue
        for k, t in sample.items():
            times[k].append(t)
        errs["scipy"].append(rel_err(scipy_dir, ref))
        for k, e in engines.items():
            errs[k].append(rel_err(e.direction(probes[r]), ref))
        if "warm" in engines:
            after = stat_totals(engines["warm"])
            for key in counts:
                if key in after and key in before["warm"]:
                    counts[key] += after[key] - before["warm"][key]

    med = {k: statistics.median(v) if v else None for k, v in times.items()}
    mx = {k: max(v) if v else None for k, v in errs.items()}
    if engines and hasattr(engines["warm"], "statistics"):
        st = stat_totals(engines["warm"])
        note = (f"{counts['warm_refreshes']} warm / {counts['fallbacks']} fallbacks of "
                f"{counts['refreshes']} timed" if "refreshes" in st else "statistics() incomplete")
        if pending_seen and pending_seen != {updates}:
            note += f"; pending before refresh {sorted(pending_seen)} (expected {updates})"
    else:
        note = why or NA
    if len(times["scipy"]) < rounds:
        note += f"; {len(times['scipy'])} of {rounds} rounds (time budget)"
    return [str(d), name, fmt_time(med["warm"]), fmt_time(med["cold"]), fmt_time(med["scipy"]),
            fmt_ratio(med["scipy"], med["warm"]), fmt_ratio(med["cold"], med["warm"]),
            fmt_err(mx["warm"]), fmt_err(mx["cold"]), fmt_err(mx["scipy"]), fmt_err(mx["start"]),
            note]


def item_warm(dims: list[int], rounds: int, settle: float, refresh_every: int, updates: int,
              budget_s: float = math.inf) -> None:
    print(f"\n### 3. Warm refactorisation of one block after {updates} rank-1 EMA updates "
          f"(beta = {BETA}, eps = {EPS:g}; median of {rounds} rounds)\n")
    why = has_engine()
    if why:
        print(f"engine columns: {NA} ({why}); scipy's syevd is timed alone.\n")
    rows = []
    for d in dims:
        for dtype in (np.float32, np.float64):
            try:
                rows.append(warm_block(d, dtype, rounds, settle, refresh_every, updates, budget_s))
            except Exception as exc:
                traceback.print_exc()
                rows.append([str(d), np.dtype(dtype).name] + [NA] * 9 +
                            [f"failed: {type(exc).__name__}: {exc}"])
            print(f"  done d={d} {np.dtype(dtype).name}", file=sys.stderr, flush=True)
    table(["d", "dtype", "warm refresh", "cold refresh", "scipy syevd", "syevd / warm",
           "cold / warm", "err warm", "err cold", "err syevd", "err before timing",
           "warm refreshes"], rows)
    print(f"\nEach timed refresh follows {updates} fresh update() calls (untimed); the engines have "
          f"refresh_every = {refresh_every} so that no automatic refresh happens in between. "
          "scipy's syevd is timed on a Fortran-ordered copy of the same matrix (overwrite_a, so "
          "the call is the factorisation alone). err: largest ||A g - ref|| / ||ref|| over the "
          "rounds, ref = (G + eps I)^(-1/2) g from np.linalg.eigh of the float64 G tracked in "
          "numpy; err syevd is V f(w) V^T g from syevd's eigenpairs in the dtype. Targets: err "
          "<= 1e-10 (float64), <= 1e-5 (float32).")


# --------------------------------------------------------------------------------------------
# 4: block RMSProp on an MLP-sized vector


def mlp_dim(layers: list[int]) -> int:
    return sum(a * b + b for a, b in zip(layers[:-1], layers[1:]))


def bandwidth(nbytes: int, rounds: int, settle: float) -> dict[str, float]:
    """Streaming bandwidth (bytes/s) of c = a + b (3 streams of nbytes each)."""
    n = nbytes // 8
    rng = np.random.default_rng(7)
    a, b, c = rng.standard_normal(n), rng.standard_normal(n), np.empty(n)
    routes: dict[str, Callable[[], object]] = {"numpy": lambda: np.add(a, b, out=c)}
    if torch is not None:
        ta, tb, tc = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(c)
        routes["torch"] = lambda: torch.add(ta, tb, out=tc)
    t = compare(routes, rounds, 0.3, settle_s=settle)
    return {k: 3 * n * 8 / v for k, v in t.items()}


def item_mlp(layers: list[int], block: int, warmup: int, steps: int, rounds: int, settle: float,
             refresh_every: int, bw_bytes: int, lr: float = 1e-3,
             budget_s: float = math.inf, form: str = "inv_sqrt") -> None:
    # The adam form with float32 estimates takes eps = 1e-4, as the README advises (float32
    # resolves eigenvalues only to about B u lambda_max; below that 1 / eps applies).
    eps = EPS if form == "inv_sqrt" else ADAM_EPS
    dim = mlp_dim(layers)
    sizes = [block] * (dim // block) + ([dim % block] if dim % block else [])
    nb = len(sizes)
    pad = nb * block
    print(f"\n### 4. Block RMSProp ({form} form), exact directions: {'-'.join(map(str, layers))} "
          f"MLP, dim = {dim}, "
          f"{nb} blocks of {block} (last {sizes[-1]}), float32, beta = {BETA}, eps = {eps:g}, "
          f"lr = {lr:g}; {warmup} warm-up steps, then {steps} timed (median of {rounds} rounds)\n")

    # Gradients g_t = L z_t, L block-diagonal with L_b = c_b Q_b diag(s_b): a random rotation,
    # per-coordinate scales s in [0.1, 1] and a per-block scale c_b in [0.01, 1], so that every
    # block's estimate is anisotropic with a dense eigenbasis. Generated once, outside the timing.
    rng = np.random.default_rng(11)
    total = warmup + steps
    q, _ = np.linalg.qr(rng.standard_normal((nb, block, block)))
    s = 10 ** rng.uniform(-1, 0, (nb, 1, block))
    c = 10 ** rng.uniform(-2, 0, (nb, 1, 1))
    z = rng.standard_normal((nb, block, total))
    gp = ((q * (s * c)) @ z).transpose(2, 0, 1).reshape(total, pad).astype(np.float32)
    gp[:, dim:] = 0.0
    grads = np.ascontiguousarray(gp[:, :dim])
    x0 = (1e-2 * rng.standard_normal(dim)).astype(np.float32)
    del q, z

    res: dict[str, dict[str, float]] = {}
    samples: dict[str, list[list[float]]] = {}
    routes: dict[str, Callable[[], list[float]]] = {}
    why = has_engine()
    eng_info: dict[str, object] = {}
    if not why:
        try:
            probe = make_engine(sizes, np.float32, refresh_every, False, form, eps)
            lack = missing(probe, ["step"])
            if lack:
                why = "BlockEngine lacks " + ", ".join(lack)
            else:
                eng_info["memory"] = getattr(probe, "memory_bytes", None)
            del probe
        except Exception as exc:
            why = f"{type(exc).__name__}: {exc}"

    if not why:
        def engine_run() -> list[float]:
            eng = make_engine(sizes, np.float32, refresh_every, False, form, eps)
            x = x0.copy()
            for t in range(warmup):
                eng.step(x, grads[t], lr)
            before = stat_totals(eng)
            out = []
            for t in range(warmup, total):
                start = time.perf_counter()
                eng.step(x, grads[t], lr)
                out.append(time.perf_counter() - start)
            after = stat_totals(eng)
            eng_info["stats"] = {k: after[k] - before.get(k, 0) for k in after if k != "pending"}
            eng_info["finite"] = bool(np.isfinite(x).all())
            return out

        routes["saddlescape"] = engine_run

    if torch is not None:
        tgrads = torch.from_numpy(gp)
        tx0 = torch.from_numpy(np.concatenate([x0, np.zeros(pad - dim, np.float32)]))

        def torch_run() -> list[float]:
            # The straightforward implementation: G as an (nb, B, B) tensor (last block padded
            # with zeros), EMA by one baddbmm, batched eigh every 10 steps, stale in between.
            G = torch.zeros(nb, block, block, dtype=torch.float32)
            A = None
            x = tx0.clone()
            xb = x.view(nb, block)
            out = []
            for t in range(total):
                start = time.perf_counter()
                gb = tgrads[t].view(nb, block)
                G.baddbmm_(gb.unsqueeze(2), gb.unsqueeze(1), beta=BETA, alpha=1 - BETA)
                if t % 10 == 0:
                    w, v = torch.linalg.eigh(G)
                    A = (v * (w.clamp_min(0) + EPS).rsqrt().unsqueeze(1)) @ v.transpose(1, 2)
                d = torch.bmm(A, gb.unsqueeze(2)).squeeze(2)
                xb.sub_(d, alpha=lr)
                if t >= warmup:
                    out.append(time.perf_counter() - start)
            return out

        routes["torch"] = torch_run

    for name in routes:
        samples[name] = []
    item_start = time.perf_counter()
    taken = 0
    for r in range(rounds):
        if r >= 1 and time.perf_counter() - item_start > budget_s:
            break
        for name in rotated(list(routes), r):
            time.sleep(settle)  # the warm-up steps inside each run wake its threads
            samples[name].append(routes[name]())
        taken += 1
    for name, runs in samples.items():
        res[name] = {"mean": statistics.median(statistics.fmean(s) for s in runs),
                     "worst": statistics.median(max(s) for s in runs),
                     "worst_any": max(max(s) for s in runs)}

    bw = bandwidth(bw_bytes, max(3, rounds), settle)
    item = 4
    traffic = sum(b * b * item for b in sizes) * (1 + 3 / refresh_every)
    bound = {k: traffic / v for k, v in bw.items()}

    rows = []
    ours = res.get("saddlescape", {}).get("mean")
    for name, label in (("saddlescape", f"saddlescape BlockEngine.step (refresh_every = {refresh_every})"),
                        ("torch", "torch: baddbmm EMA, batched eigh every 10 steps")):
        if name in res:
            rr = res[name]
            rows.append([label, f"{rr['mean'] * 1e3:.2f}", f"{rr['worst'] * 1e3:.2f}",
                         f"{rr['worst_any'] * 1e3:.2f}",
                         fmt_ratio(res["torch"]["mean"], rr["mean"]) if "torch" in res else NA])
        else:
            rows.append([label, NA, NA, NA,
                         NA + (f" ({why})" if name == "saddlescape" else " (torch not installed)")])
    table(["route", "ms/step (mean)", "worst step (median of rounds)", "worst step (any round)",
           "torch / route"], rows)
    if taken < rounds:
        print(f"\n({taken} of {rounds} rounds: the time budget of {budget_s:g} s ran out)")

    print(f"\nMemory-traffic bound: {traffic / 1e6:.1f} MB per step (sum of B^2 x 4 bytes for the "
          f"eigenbasis read each step, plus 3 B^2 x 4 / {refresh_every} for refreshes), at the "
          "bandwidth of np.add(a, b, out=c) (3 streams) measured in this run:\n")
    brow = []
    for k, label in (("numpy", "numpy add (one core)"), ("torch", "torch add (all cores)")):
        if k in bw:
            brow.append([label, f"{bw_bytes / 1e6:.0f} MB x 3", f"{bw[k] / 1e9:.2f} GB/s",
                         f"{bound[k] * 1e3:.2f} ms",
                         f"{ours / bound[k]:.2f}" if ours else NA])
    table(["bandwidth", "arrays", "GB/s", "bound time", "step / bound"], brow)
    if bw_bytes < 64 * 10**6:
        print(f"\n(arrays of {bw_bytes / 1e6:.0f} MB fit in a large L3 cache: this bandwidth, and "
              "the bound, are not the memory's; the full run uses 100 MB.)")
    if "stats" in eng_info:
        st = eng_info["stats"]
        print(f"\nengine during the {steps} timed steps (last round): "
              + ", ".join(f"{k} {v}" for k, v in st.items())
              + f"; x finite: {eng_info.get('finite')}; memory_bytes: {eng_info.get('memory')}")
    print("\ntargets: engine <= 10 ms/step, >= 10x the torch baseline, step / bound (numpy) <= 2.")


# --------------------------------------------------------------------------------------------
# 5: the range refresh of a rank-deficient block


# float32 resolves a block's eigenvalues only to about n u lambda_max (1.5e-5 lambda_max at
# n = 256): with eps = 1e-8 every route's null-space share would be off by up to 30% (both the
# range and the cold refresh, in any library), which says nothing about the refresh.
RANGE_EPS = 1e-3


def range_row(n: int, m: int, dtype: type, rounds: int, settle: float) -> list[str]:
    """One row of item 5: a block of n whose estimate has rank m - 16, refreshed after 16 more
    updates (rank <= m): the range refresh (refresh(warm=True)) against the cold syevd
    (refresh(warm=False)) and scipy's syevd of the same matrix; errors against float64."""
    name = np.dtype(dtype).name
    rng = np.random.default_rng(n * 1000 + m)
    r = m - 16
    basis = rng.standard_normal((n, r)) * np.logspace(-2, 0, r) / np.sqrt(n)  # lambda_max ~ 1
    eng = ss.BlockEngine([n], beta=BETA, eps=RANGE_EPS, refresh_every=256, dtype=dtype)
    G = np.zeros((n, n))
    for t in range(r + 16):
        g = (basis @ rng.standard_normal(r)).astype(dtype)
        eng.update(g)
        G = BETA * G + (1 - BETA) * np.outer(g.astype(np.float64), g.astype(np.float64))
        if t == r - 1:
            eng.refresh(0, False)  # the previous factorisation, of rank r
    state = eng.state_dict()
    syevd = lapack.ssyevd if dtype is np.float32 else lapack.dsyevd
    Gd = np.asfortranarray(G.astype(dtype))
    v = rng.standard_normal(n).astype(dtype)
    w, V = np.linalg.eigh(G)
    ref = V @ ((np.clip(w, 0, None) + RANGE_EPS) ** -0.5 * (V.T @ v.astype(np.float64)))

    times: dict[str, list[float]] = {"range": [], "cold": [], "scipy": []}
    errs: dict[str, float] = {}
    for rd in range(rounds + 1):  # the first is untimed
        for route in rotated(list(times), rd):
            time.sleep(settle)
            if route == "scipy":
                a = Gd.copy(order="F")
                start = time.perf_counter()
                syevd(a, compute_v=1, lower=1, overwrite_a=1)
                elapsed = time.perf_counter() - start
            else:
                eng.load_state_dict(state)
                start = time.perf_counter()
                eng.refresh(0, route == "range")
                elapsed = time.perf_counter() - start
                d = eng.direction(v).astype(np.float64)
                errs[route] = max(errs.get(route, 0.0),
                                  float(np.linalg.norm(d - ref) / np.linalg.norm(ref)))
            if rd:
                times[route].append(elapsed)
    med = {k: statistics.median(t) for k, t in times.items()}
    eng.load_state_dict(state)
    eng.refresh(0, True)
    took = eng.statistics()["warm_refreshes"][0] > 0
    return [str(n), str(m), name, fmt_time(med["range"]), fmt_time(med["cold"]),
            fmt_time(med["scipy"]), fmt_ratio(med["cold"], med["range"]),
            fmt_ratio(med["scipy"], med["range"]), fmt_err(errs.get("range")),
            fmt_err(errs.get("cold")), "range" if took else "cold (m above the threshold)"]


def item_range(dims: list[int], rounds: int, settle: float) -> None:
    print(f"\n### 5. Range refresh of a rank-deficient block (16 updates since a refresh of rank "
          f"m - 16; beta = {BETA}, eps = {RANGE_EPS:g}; median of {rounds} rounds)\n")
    why = has_engine()
    if why:
        print(f"{NA} ({why})")
        return
    rows = []
    for n in dims:
        for m in sorted({max(int(frac * n), 17) for frac in (0.125, 0.25, 0.5, 0.6)}):
            for dtype in (np.float32, np.float64):
                rows.append(range_row(n, m, dtype, rounds, settle))
        print(f"  done n={n}", file=sys.stderr, flush=True)
    table(["n", "m (rank + 16)", "dtype", "range refresh", "cold (syevd)", "scipy syevd",
           "cold / range", "scipy / range", "err range", "err cold", "route taken"], rows)
    print("\nerr: ||A v - ref|| / ||ref|| for a random v after the refresh, ref from "
          "np.linalg.eigh of the float64 estimate tracked in numpy. The engine takes the range "
          "refresh when m <= 0.6 n (float32) or 0.7 n (float64), where it was faster than the "
          "cold route in a build that took it at every m (bench/RESULTS.md).")


# --------------------------------------------------------------------------------------------


ITEMS = ("batched", "single", "warm", "mlp", "range")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", action="extend", default=None,
                        help="items, comma- or space-separated (default all): " + ",".join(ITEMS))
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed rounds, median taken (default 11; item 4 uses max(3, rounds // 2))")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a smoke run (< 30 s)")
    parser.add_argument("--settle", type=float, default=None,
                        help="idle seconds before each timed block (default 0.25; quick 0.05)")
    parser.add_argument("--single-calls", type=int, default=None, help="item 2: calls per round")
    parser.add_argument("--warm-dims", type=int, nargs="+", default=None, help="item 3: block sizes")
    parser.add_argument("--warm-refresh-every", type=int, default=64,
                        help="item 3: the engines' refresh_every (> the 16 updates between refreshes)")
    parser.add_argument("--budget", type=float, default=300,
                        help="items 3 and 4: stop adding rounds to a row after this many seconds "
                             "(at least 2 rounds for item 3, 1 for item 4; the output says so)")
    parser.add_argument("--mlp-warmup", type=int, nargs="+", default=[16, 320],
                        help="item 4: untimed steps first, one table each (default 16: early "
                             "training, every block rank-deficient; 320: every block full rank)")
    parser.add_argument("--mlp-steps", type=int, default=None, help="item 4: timed steps (default 64)")
    parser.add_argument("--mlp-forms", nargs="+", default=["inv_sqrt"], choices=["inv_sqrt", "adam"],
                        help="item 4: the engine's forms, one table each (default inv_sqrt)")
    args = parser.parse_args()

    only = {s for part in (args.only or ITEMS) for s in part.split(",") if s}
    bad = only - set(ITEMS)
    if bad:
        parser.error(f"unknown item(s) {sorted(bad)}; choose from {','.join(ITEMS)}")
    q = args.quick
    rounds = args.rounds or (3 if q else 11)
    settle = args.settle if args.settle is not None else (0.05 if q else 0.25)
    batched_sizes = [(256, 16), (64, 64), (4, 256)] if q else [(4096, 16), (1024, 64), (64, 256)]
    single_calls = args.single_calls or (200 if q else 2000)
    warm_dims = args.warm_dims or ([128] if q else [256, 1024])
    layers = [16, 64, 64, 10] if q else [64, 256, 256, 10]
    block = 64 if q else 256
    mlp_steps = args.mlp_steps or (32 if q else 64)
    bw_bytes = (8 if q else 100) * 10**6

    machine_line(f"{'quick smoke run; ' if q else ''}median of {rounds} rounds, {settle:g} s idle "
                 "before each timed block; ratio = baseline time / saddlescape time")
    started = time.perf_counter()
    jobs: list[tuple[str, Callable[[], None]]] = [
        ("batched", lambda: item_batched(batched_sizes, rounds, 0.02 if q else 0.1, settle)),
        ("single", lambda: item_single(16, single_calls, rounds, settle)),
        ("warm", lambda: item_warm(warm_dims, rounds, settle, args.warm_refresh_every, 16,
                                          args.budget)),
        ("mlp", lambda: [item_mlp(layers, block, w, mlp_steps,
                                  max(3, rounds // 2) if not q else rounds, settle, 16, bw_bytes,
                                  budget_s=args.budget, form=f)
                         for f in args.mlp_forms for w in args.mlp_warmup]),
        ("range", lambda: item_range([64] if q else [64, 256, 512], rounds, settle)),
    ]
    for name, job in jobs:
        if name not in only:
            continue
        try:
            job()
        except Exception as exc:  # one item failing must not stop the others
            traceback.print_exc()
            print(f"\n(item {name} failed: {type(exc).__name__}: {exc})")
    print(f"\ntotal {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
