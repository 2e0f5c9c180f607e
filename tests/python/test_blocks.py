"""The block engine (saddlescape.BlockEngine) against an independent float64 reference.

The reference is written here with numpy: one dense EMA per block in float64 on the gradients
exactly as the engine saw them (float32 gradients are rounded first), and f(G_b) g_b from
np.linalg.eigh, negative eigenvalues clipped to zero. The engine never forms f(G_b) between
refreshes, so agreement tests its low-rank quadrature, its refresh schedule and its bookkeeping.

Tolerances: float64 directions are computed to tol = 1e-10 (relative, per block); on top of that
comes the eigensolver's rounding amplified by the sensitivity of f on the spectrum, which the
gradient scales below keep moderate. float32 estimates are rounded to float32, so their
directions are compared on well-conditioned blocks only, at 1e-3.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import saddlescape as ss


def reference(sizes, gs, beta, eps, form, bias_correction=False, clip_unit=0.0):
    """Directions A_t g_t after each update, and the final estimates, in float64. clip_unit:
    eigenvalues at most B clip_unit lambda_max are zero, as the engine resolves them (the
    unit roundoff of its dtype); 0 clips only negative ones."""
    offsets = np.cumsum([0] + list(sizes))
    G = [np.zeros((b, b)) for b in sizes]
    product = 1.0
    dirs = []
    for g in np.asarray(gs, dtype=np.float64):
        product *= beta
        c = 1.0 / (1.0 - product) if bias_correction else 1.0
        d = np.empty_like(g)
        for i, b in enumerate(sizes):
            gb = g[offsets[i] : offsets[i + 1]]
            G[i] = beta * G[i] + (1 - beta) * np.outer(gb, gb)
            w, V = np.linalg.eigh(c * G[i])
            w = np.where(w <= b * clip_unit * max(w.max(), 0.0), 0.0, np.clip(w, 0.0, None))
            f = 1 / np.sqrt(w + eps) if form == "inv_sqrt" else 1 / (np.sqrt(w) + eps)
            d[offsets[i] : offsets[i + 1]] = V @ (f * (V.T @ gb))
        dirs.append(d)
    return dirs, G


def block_errors(sizes, a, b):
    offsets = np.cumsum([0] + list(sizes))
    return max(
        np.linalg.norm(a[lo:hi] - b[lo:hi]) / max(np.linalg.norm(b[lo:hi]), 1e-300)
        for lo, hi in zip(offsets[:-1], offsets[1:])
    )


def gradients(rng, n, dim, low=-2.0, high=0.0, dtype=np.float64):
    """Anisotropic gradients: coordinate scales spread over 10^low .. 10^high."""
    return (rng.standard_normal((n, dim)) * np.logspace(low, high, dim)).astype(dtype)


@pytest.mark.parametrize("form", ["inv_sqrt", "adam"])
@pytest.mark.parametrize("refresh_every", [1, 3, 8])
def test_directions_match_reference_float64(form, refresh_every):
    rng = np.random.default_rng(1)
    sizes = [7, 1, 33, 12, 2]  # mixed, with d = 1; rank-deficient for the first 33 updates
    gs = gradients(rng, 60, sum(sizes), -3.0, 0.0)
    eng = ss.BlockEngine(sizes, beta=0.9, eps=1e-6, form=form, refresh_every=refresh_every,
                         dtype=np.float64)
    ref, G = reference(sizes, gs, 0.9, 1e-6, form)
    worst = max(block_errors(sizes, eng.update_direction(g), r) for g, r in zip(gs, ref))
    # adam's f = 1 / (sqrt(lambda) + eps) amplifies the eigensolver's rounding of near-null
    # eigenvalues by up to sqrt(lambda_max) / eps = 1e6 (it does so in the reference too).
    assert worst < (1e-8 if form == "inv_sqrt" else 1e-7)
    for e, g in zip(eng.estimate(), G):
        np.testing.assert_allclose(e, g, rtol=0, atol=1e-14 * np.abs(g).max())
    stats = eng.statistics()
    assert stats["updates"] == 60 and all(r >= 60 // refresh_every - 1 for r in stats["refreshes"])


def test_ill_conditioned_inv_sqrt():
    """Gradient scales over 6 decades give cond(G) ~ 1e12; eps = 1e-13 keeps f's range wide."""
    rng = np.random.default_rng(2)
    sizes = [24, 16]
    gs = gradients(rng, 80, 40, -6.0, 0.0)
    eng = ss.BlockEngine(sizes, beta=0.95, eps=1e-13, refresh_every=16, dtype=np.float64)
    ref, _ = reference(sizes, gs, 0.95, 1e-13, "inv_sqrt")
    errs = [block_errors(sizes, eng.update_direction(g), r) for g, r in zip(gs, ref)]
    assert max(errs[40:]) < 1e-6  # full rank by then; rounding times the sensitivity


def test_float32_well_conditioned():
    rng = np.random.default_rng(3)
    sizes = [64, 64, 20]
    gs = gradients(rng, 200, sum(sizes), -0.5, 0.0, np.float32)
    for form in ("inv_sqrt", "adam"):
        eng = ss.BlockEngine(sizes, beta=0.98, eps=1e-3, form=form, refresh_every=16,
                             dtype=np.float32)
        ref, _ = reference(sizes, gs, 0.98, 1e-3, form)
        errs = [block_errors(sizes, eng.update_direction(g).astype(np.float64), r)
                for g, r in zip(gs, ref)]
        assert max(errs) < 1e-3, form
        assert eng.update_direction(gs[0]).dtype == np.float32


def test_bias_correction():
    rng = np.random.default_rng(4)
    sizes = [6, 5]
    gs = gradients(rng, 12, 11)
    eng = ss.BlockEngine(sizes, beta=0.8, eps=1e-4, form="adam", refresh_every=5,
                         dtype=np.float64, bias_correction=True)
    ref, G = reference(sizes, gs, 0.8, 1e-4, "adam", bias_correction=True)
    assert max(block_errors(sizes, eng.update_direction(g), r) for g, r in zip(gs, ref)) < 1e-8
    c = 1 / (1 - 0.8**12)
    for e, g in zip(eng.estimate(), G):
        np.testing.assert_allclose(e, c * g, rtol=1e-12, atol=1e-15)


def test_direction_of_other_vectors_and_step():
    rng = np.random.default_rng(5)
    sizes = [10, 3]
    gs = gradients(rng, 7, 13)
    eng = ss.BlockEngine(sizes, beta=0.9, eps=1e-5, refresh_every=6, dtype=np.float64)
    for g in gs:
        eng.update(g)
    _, G = reference(sizes, gs, 0.9, 1e-5, "inv_sqrt")
    v = rng.standard_normal(13)
    want = np.concatenate([V @ ((np.clip(w, 0, None) + 1e-5) ** -0.5 * (V.T @ vb))
                           for (w, V), vb in zip((np.linalg.eigh(g) for g in G), np.split(v, [10]))])
    got = eng.direction(v)
    assert block_errors(sizes, got, want) < 1e-9
    assert eng.updates == 7  # direction() changes nothing
    x = np.ones(13)
    g = gs[0]
    twin = ss.BlockEngine(sizes, beta=0.9, eps=1e-5, refresh_every=6, dtype=np.float64)
    twin.load_state_dict(eng.state_dict())
    eng.step(x, g, 0.1)
    np.testing.assert_array_equal(x, 1 - 0.1 * twin.update_direction(g))


def test_update_batch_equals_updates():
    rng = np.random.default_rng(6)
    sizes = [9, 4, 1]
    gs = gradients(rng, 23, 14)
    one = ss.BlockEngine(sizes, beta=0.9, eps=1e-6, refresh_every=8, dtype=np.float64)
    batch = ss.BlockEngine(sizes, beta=0.9, eps=1e-6, refresh_every=8, dtype=np.float64)
    for g in gs:
        one.update(g)
    batch.update_batch(gs[:3])    # fits the history
    batch.update_batch(gs[3:20])  # longer than refresh_every: every block refactors
    batch.update_batch(gs[20:])
    for a, b in zip(one.estimate(), batch.estimate()):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-16)
    v = rng.standard_normal(14)
    assert block_errors(sizes, one.direction(v), batch.direction(v)) < 1e-9
    assert batch.updates == 23


def test_refreshes_are_staggered():
    sizes = [8] * 32
    R = 8
    eng = ss.BlockEngine(sizes, beta=0.9, refresh_every=R, dtype=np.float64)
    rng = np.random.default_rng(7)
    before = np.zeros(32, dtype=int)
    for t in range(3 * R):
        eng.update(rng.standard_normal(256))
        now = np.array(eng.statistics()["refreshes"])
        assert (now - before).sum() == 32 // R  # every update refactors n_blocks / R blocks
        before = now
    assert (before == 3).all()
    assert max(eng.statistics()["pending"]) <= R - 1


def test_refresh_and_warm_start_keep_directions():
    rng = np.random.default_rng(8)
    sizes = [40, 17]
    # beta close to 1: the estimate barely moves between refreshes, where warm starts pay.
    gs = gradients(rng, 300, 57, -1.0, 0.0)
    eng = ss.BlockEngine(sizes, beta=0.9995, eps=1e-6, refresh_every=4, dtype=np.float64,
                         warm_start=True)
    for g in gs[:200]:
        eng.update(g)
    eng.refresh(warm=False)
    for g in gs[200:]:
        eng.update(g)
    _, G = reference(sizes, gs, 0.9995, 1e-6, "inv_sqrt")
    v = rng.standard_normal(57)
    before = eng.direction(v)
    eng.refresh(block=0, warm=True)
    assert block_errors(sizes, eng.direction(v), before) < 1e-9
    stats = eng.statistics()
    assert stats["total_warm_refreshes"] > 0
    want = np.concatenate([
        V @ ((np.clip(w, 0, None) + 1e-6) ** -0.5 * (V.T @ vb))
        for (w, V), vb in zip((np.linalg.eigh(g) for g in G), np.split(v, [40]))])
    assert block_errors(sizes, eng.direction(v), want) < 1e-8


def assert_reload_continues_bit_for_bit(eng, fresh, gs):
    """fresh, loaded with eng's state, takes the same steps as eng on gs bit for bit."""
    fresh.load_state_dict(eng.state_dict())
    xa = np.zeros(eng.dim, gs.dtype)
    xb = np.zeros(eng.dim, gs.dtype)
    for g in gs:
        eng.step(xa, g, 0.01)
        fresh.step(xb, g, 0.01)
    np.testing.assert_array_equal(xa, xb)
    assert eng.statistics() == fresh.statistics()


@pytest.mark.parametrize("form", ["inv_sqrt", "adam"])
@pytest.mark.parametrize("tol", [1e-3, 1e-5, 1e-8])
def test_directions_between_refreshes_meet_tol(form, tol):
    """The quadrature's own error, made visible with a loose tol: every direction between
    refreshes within tol of the dense reference, over spectra from flat to cond 1e8 (capped by
    eps) and gradient scales far from 1. The cases where the reference itself is not resolved
    to tol / 100 are skipped (u lambda_max moving f(lambda_min), see sweep_lowrank.py)."""
    rng = np.random.default_rng(23)
    n = 16
    checked = 0
    for eps in (1e-8, 1.0, 1e3):
        for decades in (0, 4, 8):
            for scale in (1e-5, 1.0, 1e5):
                basis, _ = np.linalg.qr(rng.standard_normal((n, n)))
                s = scale * np.logspace(-decades / 2, 0, n)
                eng = ss.BlockEngine([n], beta=0.95, eps=eps, form=form, refresh_every=16,
                                     dtype=np.float64, tol=tol)
                G = np.zeros((n, n))
                for t in range(n + 24):
                    g = basis @ (s * rng.standard_normal(n))
                    d = eng.update_direction(g)
                    G = 0.95 * G + 0.05 * np.outer(g, g)
                    w, V = np.linalg.eigh(G)
                    lo, hi = max(w[0], 1e-300), w[-1]
                    sens = (1.1e-16 * (hi + eps) / (lo + eps) if form == "inv_sqrt"
                            else 1.1e-16 * hi / (2 * np.sqrt(lo) * (np.sqrt(lo) + eps)))
                    if t < n or sens > 0.01 * tol:
                        continue
                    w = np.clip(w, 0.0, None)
                    f = 1 / np.sqrt(w + eps) if form == "inv_sqrt" else 1 / (np.sqrt(w) + eps)
                    ref = V @ (f * (V.T @ g))
                    assert np.linalg.norm(d - ref) <= tol * np.linalg.norm(ref), (eps, decades,
                                                                                   scale, t)
                    checked += 1
    assert checked > 300


# Not below 1e-7: g lies in G's range, where f is 1e4 times smaller than on its null space, so
# eigh's leak of g into the null space (u cond) alone is 1e-8 of the reference at scale 1e3.
@pytest.mark.parametrize("tol", [1e-3, 1e-5, 1e-7])
def test_adam_form_on_singular_blocks_meets_tol(tol):
    """The adam form's split of a singular estimate (its exact zeros handled by Householder
    reflectors and a Schur complement, lowrank.hpp) against the dense reference, with the
    engine's clip of eigenvalues below n u lambda_max to zero: gradients in a subspace of half
    the block, over eps and scales, every direction between refreshes within tol."""
    rng = np.random.default_rng(24)
    n, rank = 16, 8
    checked = 0
    for eps in (1e-4, 1e-2, 1.0):
        for scale in (1e-3, 1.0, 1e3):
            basis = rng.standard_normal((n, rank)) * np.logspace(-1, 0, rank) * scale
            eng = ss.BlockEngine([n], beta=0.95, eps=eps, form="adam", refresh_every=16,
                                 dtype=np.float64, tol=tol)
            G = np.zeros((n, n))
            for t in range(40):
                g = basis @ rng.standard_normal(rank)
                d = eng.update_direction(g)
                G = 0.95 * G + 0.05 * np.outer(g, g)
                w, V = np.linalg.eigh(G)
                w = np.where(w <= n * 2.2e-16 * w.max(), 0.0, w)
                ref = V @ ((np.sqrt(w) + eps) ** -1 * (V.T @ g))
                assert np.linalg.norm(d - ref) <= tol * np.linalg.norm(ref), (eps, scale, t)
                checked += 1
            # On schedule (2), and a few more where the border of the null space is too
            # ill-conditioned for tol (before the first refresh the 9th gradient adds nothing
            # to the 8-dimensional subspace); before the split every step refactored (40).
            assert eng.statistics()["total_refreshes"] <= 40 // 16 + 3
    assert checked == 360


def low_rank_gradients(rng, n, sizes, ranks, dtype=np.float64):
    """Each block's gradients in a fixed random subspace of the given rank (None: full), with
    scales over 3 decades: the estimate stays rank-deficient however long it runs."""
    parts = []
    for b, r in zip(sizes, ranks):
        r = b if r is None else r
        basis = rng.standard_normal((b, r)) * np.logspace(-3, 0, r)
        parts.append(rng.standard_normal((n, r)) @ basis.T)
    return np.concatenate(parts, axis=1).astype(dtype)


@pytest.mark.parametrize("form", ["inv_sqrt", "adam"])
@pytest.mark.parametrize("refresh_every", [1, 16])
def test_range_refresh_of_rank_deficient_blocks_matches_reference(form, refresh_every):
    """Blocks that stay rank-deficient refactor from their previous null space (the range
    refresh, counted in warm_refreshes) instead of a cold syevd; every direction of 150 steps
    against the dense float64 reference, at the tolerance of the cold route."""
    rng = np.random.default_rng(21)
    sizes = [48, 100, 1, 12]
    gs = low_rank_gradients(rng, 150, sizes, [5, 24, None, None])
    eps = 1e-6 if form == "inv_sqrt" else 1e-4
    eng = ss.BlockEngine(sizes, beta=0.99, eps=eps, form=form, refresh_every=refresh_every,
                         dtype=np.float64)
    ref, G = reference(sizes, gs, 0.99, eps, form, clip_unit=np.finfo(np.float64).eps)
    worst = max(block_errors(sizes, eng.update_direction(g), r) for g, r in zip(gs, ref))
    assert worst < (1e-8 if form == "inv_sqrt" else 1e-7)
    for e, g in zip(eng.estimate(), G):
        np.testing.assert_allclose(e, g, rtol=0, atol=1e-14 * np.abs(g).max())
    st = eng.statistics()
    # The rank-deficient blocks: all but every 16th refresh (cold, to bound the rounding
    # that the basis carries); d = 1 never (nothing to gain); the full-rank block only while
    # its first updates leave it rank-deficient.
    for b in (0, 1):
        assert st["warm_refreshes"][b] >= st["refreshes"][b] * 15 // 16 - 1 > 0
    assert st["warm_refreshes"][2] == 0
    assert st["warm_refreshes"][3] <= 9


def test_range_refresh_float32_and_resume():
    rng = np.random.default_rng(22)
    sizes = [64, 40, 7]
    gs = low_rank_gradients(rng, 120, sizes, [10, 20, None], np.float32)
    kw = dict(beta=0.99, eps=0.1, refresh_every=4, dtype=np.float32)
    for form in ("inv_sqrt", "adam"):
        eng = ss.BlockEngine(sizes, form=form, **kw)
        ref, _ = reference(sizes, gs, 0.99, 0.1, form, clip_unit=np.finfo(np.float32).eps)
        errs = [block_errors(sizes, eng.update_direction(g).astype(np.float64), r)
                for g, r in zip(gs[:80], ref)]
        # adam's f = 1 / (sqrt(lambda) + eps) turns float32's eigenvalue rounding near zero
        # (n u lambda_max = 4e-6 lambda_max) into sqrt(4e-6 lambda_max) / eps: the cold route
        # errs by 1.1e-2 on these gradients too.
        assert max(errs) < (1e-4 if form == "inv_sqrt" else 3e-2), form
        assert eng.statistics()["total_warm_refreshes"] > 0
        # A reload in the middle of the range refreshes continues bit for bit.
        assert_reload_continues_bit_for_bit(eng, ss.BlockEngine(sizes, form=form, **kw), gs[80:])


def test_state_dict_round_trip_continues_bit_for_bit():
    rng = np.random.default_rng(9)
    sizes = [12, 5, 30]
    gs = gradients(rng, 40, 47, dtype=np.float32)
    kw = dict(beta=0.95, eps=1e-6, refresh_every=7, dtype=np.float32)
    a = ss.BlockEngine(sizes, **kw)
    for g in gs[:17]:
        a.update(g)
    assert_reload_continues_bit_for_bit(a, ss.BlockEngine(sizes, **kw), gs[17:])


def test_bad_state_is_refused_and_changes_nothing():
    sizes = [3, 2]
    eng = ss.BlockEngine(sizes, refresh_every=4, dtype=np.float64)
    eng.update(np.arange(5.0))
    good = eng.state_dict()
    other = ss.BlockEngine([2, 3], refresh_every=4, dtype=np.float64)
    with pytest.raises(ValueError, match="block_sizes"):
        eng.load_state_dict(other.state_dict())
    bad = dict(good, data=good["data"].copy())
    bad["data"][0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        eng.load_state_dict(bad)
    bad = dict(good, scalars=good["scalars"].copy())
    bad["scalars"][0] = 2.0  # gamma > 1
    with pytest.raises(ValueError, match="gamma"):
        eng.load_state_dict(bad)
    after = eng.state_dict()
    np.testing.assert_array_equal(after["data"], good["data"])
    np.testing.assert_array_equal(after["scalars"], good["scalars"])


def test_bad_input_names_the_value_and_changes_nothing():
    eng = ss.BlockEngine([4, 3], beta=0.9, refresh_every=2, dtype=np.float64)
    rng = np.random.default_rng(10)
    eng.update(rng.standard_normal(7))
    state = eng.state_dict()
    g = rng.standard_normal(7)
    g[5] = np.inf
    x = np.ones(7)
    with pytest.raises(ValueError, match=r"g\[5\] = inf"):
        eng.step(x, g, 0.1)
    with pytest.raises(ValueError, match=r"shape \(7,\)"):
        eng.update(np.ones(6))
    with pytest.raises(ValueError, match=r"shape \(k, 7\)"):
        eng.update_batch(np.ones(7))
    with pytest.raises(ValueError, match="dtype float64"):
        eng.update(np.ones(7, dtype=np.complex128))
    with pytest.raises(ValueError, match="lr"):
        eng.step(x, np.ones(7), float("nan"))
    with pytest.raises(ss.NumericalError, match="too large"):
        eng.update(np.full(7, 1e160))
    with pytest.raises(ValueError, match="block must be in"):
        eng.refresh(block=2)
    np.testing.assert_array_equal(x, np.ones(7))
    np.testing.assert_array_equal(eng.state_dict()["data"], state["data"])
    np.testing.assert_array_equal(eng.state_dict()["scalars"], state["scalars"])
    assert eng.updates == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(block_sizes=[3, 0]), r"block_sizes\[1\] = 0"),
        (dict(block_sizes=[]), "must not be empty"),
        (dict(block_sizes=[4], beta=1.0), "beta must be in"),
        (dict(block_sizes=[4], eps=0.0), "eps must be finite and > 0"),
        (dict(block_sizes=[4], refresh_every=0), "refresh_every must be in"),
        (dict(block_sizes=[4], refresh_every=257), "refresh_every must be in"),
        (dict(block_sizes=[4], form="sqrt"), "form must be"),
        (dict(block_sizes=[4], dtype=np.int32), "dtype must be float32 or float64"),
        (dict(block_sizes=[4], tol=1e-20), "tol must be in"),
        (dict(block_sizes=[30000] * 2000), r"needs \d+ bytes"),
    ],
)
def test_bad_configuration(kwargs, message):
    sizes = kwargs.pop("block_sizes")
    with pytest.raises(ValueError, match=message):
        ss.BlockEngine(sizes, **kwargs)


def test_beta_schedule_checked_when_used():
    sched = ss.schedules.beta_from_lr_schedule(ss.schedules.inverse_sqrt(0.01), C=1.0)
    eng = ss.BlockEngine([3], beta=sched, dtype=np.float64)
    eng.update(np.ones(3))
    assert eng.updates == 1


def test_results_do_not_depend_on_thread_count():
    script = textwrap.dedent(
        """
        import numpy as np, saddlescape as ss
        rng = np.random.default_rng(11)
        sizes = [64] * 12 + [7]
        eng = ss.BlockEngine(sizes, beta=0.95, eps=1e-6, refresh_every=5, dtype=np.float64)
        x = np.zeros(sum(sizes))
        for _ in range(12):
            eng.step(x, rng.standard_normal(sum(sizes)), 0.01)
        print(x.tobytes().hex())
        """
    )
    outs = []
    for threads in ("1", "2", "3"):
        env = dict(os.environ, SADDLESCAPE_NUM_THREADS=threads)
        outs.append(subprocess.run([sys.executable, "-c", script], env=env, check=True,
                                   capture_output=True, text=True, timeout=120).stdout)
    assert outs[0] == outs[1] == outs[2]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_blocks_results_do_not_depend_on_the_other_blocks(dtype):
    # Blocks are independent: block 0 of an engine with eight 256 blocks beside it must equal
    # an engine of that block alone, bit for bit (same index, so the same refresh schedule).
    # LAPACK's syevd picks its block sizes from the workspace it is told about; handing it a
    # thread's buffer, grown by the larger blocks' range refreshes, changed the rounding of
    # the small block's (and results depended on which thread had taken which block before:
    # a training run differed from run to run). Before the fix this failed at step 35
    # (float32) and 15 (float64).
    rng = np.random.default_rng(48)
    alone = ss.BlockEngine([48], beta=0.95, eps=1e-6, refresh_every=4, dtype=dtype)
    mixed = ss.BlockEngine([48] + [256] * 8, beta=0.95, eps=1e-6, refresh_every=4, dtype=dtype)
    for _ in range(40):
        g = rng.standard_normal(48 + 2048).astype(dtype)
        want = alone.update_direction(g[:48])
        np.testing.assert_array_equal(mixed.update_direction(g)[:48], want)


def test_partition():
    assert ss.blocks.partition(10, 4) == [4, 4, 2]
    assert ss.blocks.partition(8, 4) == [4, 4]
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        ss.blocks.partition(8, 0)


@pytest.mark.parametrize("form", ["inv_sqrt", "adam"])
def test_rmsprop_block_lowrank_is_exact_and_resumes(form):
    rng = np.random.default_rng(12)
    sizes = [6, 1, 10]
    kw = dict(beta=0.9, eps=1e-6, structure="block", block_sizes=sizes, form=form)
    lowrank = ss.RMSProp(17, 0.01, solver="lowrank", refresh_every=5, **kw)
    exact = ss.RMSProp(17, 0.01, solver="eigh", refresh_every=1, **kw)
    xa, xb = np.zeros(17), np.zeros(17)
    for _ in range(25):
        g = rng.standard_normal(17) * np.logspace(-2, 0, 17)
        lowrank.step(xa, g)
        exact.step(xb, g)
    np.testing.assert_allclose(xa, xb, rtol=1e-7, atol=1e-12)
    resumed = ss.RMSProp(17, 0.01, solver="lowrank", refresh_every=5, **kw)
    resumed.load_state_dict(lowrank.state_dict())
    xc = xa.copy()
    for _ in range(8):
        g = rng.standard_normal(17)
        lowrank.step(xa, g)
        resumed.step(xc, g)
    np.testing.assert_array_equal(xa, xc)


# --------------------------------------------------------------------------------------------
# The fallback policy of a refresh (issue 15), driven by the engine's failure-injection hook.

FALLBACK_SIZES = [6, 5, 7]


def fallback_pair(dtype, **kw):
    """Two engines fed the same gradients; the first gets the injected failures."""
    opts = dict(beta=0.9, eps=1e-6, refresh_every=3, dtype=dtype, **kw)
    return ss.BlockEngine(FALLBACK_SIZES, **opts), ss.BlockEngine(FALLBACK_SIZES, **opts)


def block_slices():
    offsets = np.cumsum([0] + FALLBACK_SIZES)
    return [slice(lo, hi) for lo, hi in zip(offsets[:-1], offsets[1:])]


def test_float32_failure_is_retried_in_float64_and_touches_no_other_block():
    rng = np.random.default_rng(21)
    gs = gradients(rng, 30, sum(FALLBACK_SIZES), dtype=np.float32)
    a, b = fallback_pair(np.float32)
    for g in gs[:4]:
        a.update_direction(g), b.update_direction(g)
    a._inject_refresh_failures(1, attempts=3, stages=1)  # the float32 solver fails
    for g in gs[4:]:
        da, db = a.update_direction(g), b.update_direction(g)
        s0, s1, s2 = block_slices()
        np.testing.assert_array_equal(da[s0], db[s0])
        np.testing.assert_array_equal(da[s2], db[s2])
        # float64's basis rounded to float32 against float32's own: both within float32 rounding
        np.testing.assert_allclose(da[s1], db[s1], rtol=2e-3, atol=1e-6)
    st = a.statistics()
    assert st["failed_refreshes"] == [0, 3, 0] and st["float64_retries"] == [0, 3, 0]
    assert st["kept_bases"] == [0, 0, 0] and st["refreshes"] == b.statistics()["refreshes"]


def test_fallback_eps_retry_is_counted_and_optional():
    rng = np.random.default_rng(22)
    gs = gradients(rng, 12, sum(FALLBACK_SIZES))
    a, b = fallback_pair(np.float64, fallback_eps=1e-3)
    for g in gs[:3]:
        a.update(g), b.update(g)
    a._inject_refresh_failures(2, attempts=1, stages=2)  # first solver (and float64) fail
    for g in gs[3:]:
        da, db = a.update_direction(g), b.update_direction(g)
        assert np.isfinite(da).all()
        for s in block_slices()[:2]:
            np.testing.assert_array_equal(da[s], db[s])
    st = a.statistics()
    assert st["eps_retries"] == [0, 0, 1] and st["failed_refreshes"] == [0, 0, 1]
    assert st["kept_bases"] == [0, 0, 0]
    # The estimate itself never sees the fallback (beyond rounding: the changed eigenvalues may
    # move the block's next refresh, which folds its history into the estimate).
    for ea, eb in zip(a.estimate(), b.estimate()):
        np.testing.assert_allclose(ea, eb, rtol=1e-13, atol=1e-16)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kept_basis_then_recovery(dtype):
    rng = np.random.default_rng(23)
    gs = gradients(rng, 20, sum(FALLBACK_SIZES), dtype=dtype)
    a, b = fallback_pair(dtype)
    for g in gs[:3]:
        a.update(g), b.update(g)
    a._inject_refresh_failures(0, attempts=2, stages=3)  # every retry fails, twice
    kept = []
    for g in gs[3:]:
        da, db = a.update_direction(g), b.update_direction(g)
        assert np.isfinite(da).all()
        for s in block_slices()[1:]:
            np.testing.assert_array_equal(da[s], db[s])
        kept.append(a.statistics()["consecutive_failures"][0])
    # It retried at the next update after each failure, then recovered and reset the count.
    first = kept.index(1)
    assert kept[first : first + 3] == [1, 2, 0] and set(kept[:first]) <= {0}
    st = a.statistics()
    assert st["kept_bases"] == [2, 0, 0] and st["failed_refreshes"] == [2, 0, 0]
    # The estimate stays exact through the fallbacks (it only folds the history earlier).
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    for ea, eb in zip(a.estimate(), b.estimate()):
        np.testing.assert_allclose(ea, eb, rtol=rtol, atol=rtol * np.abs(eb).max())
    # Once the block has refactored, its directions are exact again.
    exact = reference(FALLBACK_SIZES, gs, 0.9, 1e-6, "inv_sqrt")[0][-1]
    assert block_errors(FALLBACK_SIZES, da, exact) < (1e-3 if dtype == np.float32 else 1e-8)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_too_many_consecutive_failures_raise_naming_the_block_and_change_nothing(dtype):
    rng = np.random.default_rng(24)
    gs = gradients(rng, 12, sum(FALLBACK_SIZES), dtype=dtype)
    eng = ss.BlockEngine(FALLBACK_SIZES, beta=0.9, refresh_every=3, dtype=dtype,
                         max_consecutive_failures=2)
    for g in gs[:3]:
        eng.update(g)
    eng._inject_refresh_failures(1, attempts=100, stages=3)
    raised_at = None
    for i, g in enumerate(gs[3:]):
        before = eng.state_dict()
        try:
            eng.update_direction(g)
        except ss.NumericalError as e:
            assert "block 1" in str(e) and "2 times in a row" in str(e)
            after = eng.state_dict()
            np.testing.assert_array_equal(after["data"], before["data"])
            np.testing.assert_array_equal(after["scalars"], before["scalars"])
            assert after["updates"] == before["updates"]
            raised_at = i
            break
    assert raised_at is not None
    assert eng.statistics()["consecutive_failures"] == [0, 1, 0]
    # It keeps raising (the state is unchanged) until the solver works again.
    with pytest.raises(ss.NumericalError, match="block 1"):
        eng.update(gs[-1])
    eng._inject_refresh_failures(1, attempts=0, stages=0)
    eng.update(gs[-1])
    assert eng.statistics()["consecutive_failures"] == [0, 0, 0]


def test_fallback_counters_are_saved_and_old_states_load():
    rng = np.random.default_rng(25)
    gs = gradients(rng, 14, sum(FALLBACK_SIZES), dtype=np.float32)
    a, _ = fallback_pair(np.float32)
    for g in gs[:4]:
        a.update(g)
    a._inject_refresh_failures(1, attempts=2, stages=1)
    for g in gs[4:9]:
        a.update(g)
    st = a.state_dict()
    assert st["version"] == 2
    b, c = fallback_pair(np.float32)
    b.load_state_dict(st)
    assert b.statistics() == a.statistics() and a.statistics()["float64_retries"][1] == 2
    xa = np.zeros(sum(FALLBACK_SIZES), np.float32)
    xb = xa.copy()
    for g in gs[9:]:
        a.step(xa, g, 0.01), b.step(xb, g, 0.01)
    np.testing.assert_array_equal(xa, xb)
    # A version 1 state (5 counters per block) loads, with the fallback counters at 0.
    old = c.state_dict()
    for g in gs[:5]:
        c.update(g)
    new = c.state_dict()
    scalars, at = [], 0
    R = 3
    for n in FALLBACK_SIZES:
        width = 1 + R + n
        scalars += list(new["scalars"][at : at + width + 5])
        at += width + 10
    v1 = dict(new, version=1, scalars=np.array(scalars))
    d = ss.BlockEngine(FALLBACK_SIZES, beta=0.9, eps=1e-6, refresh_every=3, dtype=np.float32)
    d.load_state_dict(v1)
    np.testing.assert_array_equal(d.state_dict()["scalars"], new["scalars"])
    with pytest.raises(ValueError, match="unsupported state version 3"):
        d.load_state_dict(dict(new, version=3))
    assert old["version"] == 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_consecutive_failures=0), "max_consecutive_failures must be >= 1, got 0"),
    (dict(fallback_eps=-1.0), "fallback_eps must be finite and >= 0, got -1"),
    (dict(fallback_eps=float("nan")), "fallback_eps must be finite and >= 0, got nan"),
])
def test_bad_fallback_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ss.BlockEngine([2, 3], **kwargs)


def test_fallback_results_do_not_depend_on_thread_count():
    script = textwrap.dedent(
        """
        import numpy as np, saddlescape as ss
        rng = np.random.default_rng(26)
        sizes = [48] * 10 + [7]
        eng = ss.BlockEngine(sizes, beta=0.95, eps=1e-6, refresh_every=2, dtype=np.float32,
                             fallback_eps=1e-4)
        eng._inject_refresh_failures(3, attempts=2, stages=1)
        eng._inject_refresh_failures(5, attempts=1, stages=2)
        eng._inject_refresh_failures(7, attempts=2, stages=3)
        x = np.zeros(sum(sizes), np.float32)
        for _ in range(10):
            eng.step(x, rng.standard_normal(sum(sizes)).astype(np.float32), 0.01)
        s = eng.statistics()
        print(x.tobytes().hex(), s["float64_retries"], s["eps_retries"], s["kept_bases"])
        """
    )
    outs = []
    for threads in ("1", "3"):
        env = dict(os.environ, SADDLESCAPE_NUM_THREADS=threads)
        outs.append(subprocess.run([sys.executable, "-c", script], env=env, check=True,
                                   capture_output=True, text=True, timeout=120).stdout)
    assert outs[0] == outs[1]
    assert "[0, 0, 0, 2," in outs[0]


def test_set_beta_applies_to_later_updates_only():
    """A beta changed between updates (beta following a scheduled lr) weights only the updates
    after it, against the float64 recursion; a bad beta is refused and changes nothing."""
    rng = np.random.default_rng(7)
    gs = rng.standard_normal((4, 5)) * np.array([1e3, 1.0, 1e-3, 2.0, 0.5])
    engine = ss.BlockEngine([3, 2], beta=0.9, dtype=np.float64, refresh_every=2)
    reference = [np.zeros((3, 3)), np.zeros((2, 2))]
    for g, beta in zip(gs, (0.9, 0.5, 0.99, 0.0)):
        engine.set_beta(beta)
        engine.update(g)
        for b, (lo, hi) in enumerate(((0, 3), (3, 5))):
            reference[b] = beta * reference[b] + (1 - beta) * np.outer(g[lo:hi], g[lo:hi])
    for got, want in zip(engine.estimate(), reference):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())
    before = engine.state_dict()
    with pytest.raises(ValueError, match="1.5"):
        engine.set_beta(1.5)
    engine.update(gs[0])
    after = ss.BlockEngine([3, 2], beta=0.0, dtype=np.float64, refresh_every=2)
    after.load_state_dict(before)
    after.update(gs[0])  # the engine still uses beta = 0.0, not the refused 1.5
    for x, y in zip(engine.estimate(), after.estimate()):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("form", ["inv_sqrt", "adam"])
@pytest.mark.parametrize("refresh_every", [1, 16])
@pytest.mark.parametrize("eps", [1e-8, 1e-6, 1e-3])
def test_rank_deficient_estimate_against_an_exact_low_rank_reference(form, refresh_every, eps):
    """G = sum_i w_i h_i h_i^T of rank 2 in 8 dimensions, entries of scales 1..1e3. The
    reference is exact in float64 (QR of [h_1 h_2], a 2 x 2 eigenproblem, f(0) on the
    complement). A dense eigensolver returns G's zero eigenvalues as about 1e-16 lambda_max;
    unclipped, the adam form took their square roots (1e-8 sqrt(lambda_max), above eps) and
    the direction of a vector off G's range was wrong by 30-100%."""
    rng = np.random.default_rng(23)
    h1 = rng.standard_normal(8)
    h2 = rng.standard_normal(8) * np.logspace(0, 3, 8)
    engine = ss.BlockEngine([8], beta=0.0, eps=eps, form=form, dtype=np.float64,
                            refresh_every=refresh_every)
    engine.update(h1)
    engine.set_beta(0.5)
    engine.update(h2)
    Q, R = np.linalg.qr(np.stack([h1, h2], 1))
    lam, S = np.linalg.eigh(R @ np.diag([0.5, 0.5]) @ R.T)

    def f(x):
        x = np.maximum(x, 0.0)
        return 1.0 / (np.sqrt(x) + eps) if form == "adam" else (x + eps) ** -0.5

    for v in (rng.standard_normal(8), h2):
        want = Q @ S @ (f(lam) * (S.T @ (Q.T @ v))) + f(0.0) * (v - Q @ (Q.T @ v))
        got = engine.direction(v)
        # The rounding of v's (tiny, for v = h2) component off G's range is amplified by f(0).
        slack = 8 * np.finfo(np.float64).eps * np.linalg.norm(v) * f(0.0)
        assert np.abs(got - want).max() <= 1e-9 * np.abs(want).max() + slack


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_update_direction_of_another_vector_on_singular_blocks(dtype):
    # update_direction(g, v): update with g, then A v (Adam's step). The adam form on singular
    # blocks (fewer gradients than the block size), whose new gradients reach the null space:
    # the exact zeros are split off (Householder, then a Schur complement at each node), so
    # these blocks refactor only on schedule. Against float64 eigh on ill-scaled,
    # rank-deficient estimates, a block of size 1 included.
    rng = np.random.default_rng(21)
    sizes = [12, 1, 7]
    eps = 1e-3
    gs = gradients(rng, 6, 20, low=-3.0, high=0.0, dtype=dtype)
    eng = ss.BlockEngine(sizes, beta=0.9, eps=eps, form="adam", refresh_every=4, dtype=dtype)
    twin = ss.BlockEngine(sizes, beta=0.9, eps=eps, form="adam", refresh_every=4, dtype=dtype)
    tol = 2e-4 if dtype == np.float32 else 1e-8
    for t, g in enumerate(gs):
        v = rng.standard_normal(20).astype(dtype)
        got = eng.update_direction(g, v)
        twin.update(g)
        _, G = reference(sizes, gs[:t + 1], 0.9, eps, "adam")
        # The engine's clip (n u lambda_max): the adam form's sqrt turns eigh's null-space
        # rounding (1e-17) into 3e-9, three digits of 1 / eps = 1e3.
        u = np.finfo(dtype).eps
        eig = [(np.where(w <= len(w) * u * w.max(), 0.0, w), V)
               for w, V in (np.linalg.eigh(x) for x in G)]
        want = np.concatenate([V @ ((np.sqrt(w) + eps) ** -1 * (V.T @ vb))
                               for (w, V), vb in zip(eig, np.split(v.astype(np.float64), [12, 13]))])
        assert got.dtype == dtype
        assert block_errors(sizes, got.astype(np.float64), want) < tol, t
        assert block_errors(sizes, twin.direction(v).astype(np.float64), want) < tol, t
    kept = eng.statistics()["total_refreshes"]
    assert kept == twin.statistics()["total_refreshes"] == 3 * 6 // 4  # the stagger only
    eng.direction(v)
    assert eng.statistics()["total_refreshes"] == kept
    with pytest.raises(ValueError, match="v"):
        eng.update_direction(gs[0], np.full(20, np.nan, dtype=dtype))
    assert eng.updates == 6 and eng.statistics()["total_refreshes"] == kept


def test_update_direction_keeps_the_refactorisations_of_unstable_blocks():
    # Where the low-rank update is unstable (the adam form, new gradients along an eigenvalue
    # of 1e-12 lambda_max: Woodbury's rounding would be amplified 1e12x), a block refactors;
    # update_direction(g, v) keeps that refactorisation (counted), update() then direction(v)
    # discards it, and both give the reference's directions.
    rng = np.random.default_rng(3)
    n = 12
    basis, _ = np.linalg.qr(rng.standard_normal((n, n)))
    scales = np.logspace(0, -6, n)
    gs = [basis @ (scales * rng.standard_normal(n)) for _ in range(40)]
    gs += [basis[:, -1] + 1e-3 * rng.standard_normal(n) for _ in range(6)]
    gs = np.array(gs)
    kw = dict(beta=0.9, eps=1e-3, form="adam", refresh_every=16, dtype=np.float64)
    eng, twin = ss.BlockEngine([n], **kw), ss.BlockEngine([n], **kw)
    for t, g in enumerate(gs):
        v = rng.standard_normal(n)
        got = eng.update_direction(g, v)
        twin.update(g)
        _, (G,) = reference([n], gs[:t + 1], 0.9, 1e-3, "adam")
        w, V = np.linalg.eigh(G)
        w = np.where(w <= n * 2.2e-16 * w.max(), 0.0, w)
        want = V @ ((np.sqrt(w) + 1e-3) ** -1 * (V.T @ v))
        # Eigenvalues of 1e-13: eigh's rounding moves sqrt(lambda) + eps by 1e-8 here.
        assert block_errors([n], got, want) < 1e-7, t
        assert block_errors([n], twin.direction(v), want) < 1e-7, t
    assert eng.statistics()["total_refreshes"] > twin.statistics()["total_refreshes"]
