"""The multi-tensor diagonal kernels (saddlescape/diag_step.hpp, _core.diag_rmsprop_step and
_core.diag_adam_step) against the rule written out in float64 numpy, and the numpy-level
optimizers bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import saddlescape as ss
from saddlescape import _core

LENGTHS = [1, 7, 64, 1000, 3]


def _tensors(dtype, seed=0, lengths=LENGTHS, spread=4):
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal(n).astype(dtype) for n in lengths]
    gs = [(rng.standard_normal(n) * 10.0 ** rng.uniform(-spread, spread, n)).astype(dtype)
          for n in lengths]
    gs[0][:] = 0.0  # a zero gradient: v decays, x stays
    vs = [np.abs(rng.standard_normal(n)).astype(dtype) * 1e-3 for n in lengths]
    ms = [rng.standard_normal(n).astype(dtype) * 1e-2 for n in lengths]
    return xs, gs, vs, ms


def _rmsprop_ref(x, g, v, lr, beta, eps, form, wd, c, move):
    x, g, v = (a.astype(np.float64) for a in (x, g, v))
    g = g + wd * x
    v = beta * v + (1 - beta) * g * g
    if move:
        s = c * v
        x = x - lr * g / (np.sqrt(s + eps) if form == "inv_sqrt" else np.sqrt(s) + eps)
    return x, v


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-14), (np.float32, 2e-6)])
@pytest.mark.parametrize("form", ["inv_sqrt", "adam"])
@pytest.mark.parametrize("wd,c,move", [(0.0, 1.0, True), (0.1, 1.0, True), (0.0, 7.5, True),
                                       (0.01, 2.0, False)])
def test_rmsprop_against_float64_rule(dtype, rtol, form, wd, c, move):
    xs, gs, vs, _ = _tensors(dtype)
    want = [_rmsprop_ref(x, g, v, 0.01, 0.9, 1e-8, form, wd, c, move) for x, g, v in zip(xs, gs, vs)]
    _core.diag_rmsprop_step(xs, gs, vs, 0.01, 0.9, 1e-8, form, wd, c, move)
    for x, v, (wx, wv) in zip(xs, vs, want):
        assert x.dtype == dtype and v.dtype == dtype
        np.testing.assert_allclose(v, wv, rtol=rtol, atol=np.finfo(dtype).tiny * 4)
        np.testing.assert_allclose(x, wx, rtol=rtol, atol=rtol * np.abs(wx).max())


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-14), (np.float32, 2e-6)])
@pytest.mark.parametrize("form", ["inv_sqrt", "adam"])
def test_adam_against_float64_rule(dtype, rtol, form):
    xs, gs, vs, ms = _tensors(dtype, seed=1)
    want = []
    for x, g, v, m in zip(xs, gs, vs, ms):
        x, g, v, m = (a.astype(np.float64) for a in (x, g, v, m))
        g = g + 0.05 * x
        m = 0.8 * m + 0.2 * g
        v = 0.99 * v + 0.01 * g * g
        s = 3.0 * v
        den = np.sqrt(s + 1e-6) if form == "inv_sqrt" else np.sqrt(s) + 1e-6
        want.append(x - 0.02 * m / den)
    _core.diag_adam_step(xs, gs, ms, vs, 0.02, 0.8, 0.99, 1e-6, form, 0.05, 3.0)
    for x, w in zip(xs, want):
        np.testing.assert_allclose(x, w, rtol=rtol, atol=rtol * np.abs(w).max())


@pytest.mark.parametrize("form", ["inv_sqrt", "adam"])
@pytest.mark.parametrize("adam", [False, True])
def test_float64_equals_numpy_level_optimizers_bit_for_bit(form, adam):
    rng = np.random.default_rng(2)
    d = 300
    x_ref = rng.standard_normal(d)
    opt = (ss.Adam(d, 0.01, 0.9, 0.99, 1e-7, structure="diag", form=form) if adam else
           ss.RMSProp(d, 0.01, 0.95, 1e-7, structure="diag", form=form))
    cut = [0, 1, 50, 299, 300]
    xs = [x_ref[a:b].copy() for a, b in zip(cut, cut[1:])]
    vs = [np.zeros(b - a) for a, b in zip(cut, cut[1:])]
    ms = [np.zeros(b - a) for a, b in zip(cut, cut[1:])]
    prod = 1.0
    for t in range(12):
        g = rng.standard_normal(d) * 10.0 ** rng.uniform(-5, 5, d)
        opt.step(x_ref, g)
        gs = [g[a:b].copy() for a, b in zip(cut, cut[1:])]
        if adam:
            prod *= 0.99
            _core.diag_adam_step(xs, gs, ms, vs, 0.01 / (1 - 0.9 ** (t + 1)), 0.9, 0.99, 1e-7,
                                 form, 0.0, 1.0 / (1.0 - prod))
        else:
            _core.diag_rmsprop_step(xs, gs, vs, 0.01, 0.95, 1e-7, form, 0.0, 1.0, True)
    np.testing.assert_array_equal(np.concatenate(xs), x_ref)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("where", [0, 2, 4])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, "overflow"])
def test_bad_gradient_anywhere_changes_no_tensor(dtype, where, bad):
    xs, gs, vs, ms = _tensors(dtype, seed=3)
    if bad == "overflow":
        bad = 1e30 if dtype == np.float32 else 1e300
    gs[where][len(gs[where]) // 2] = bad
    before = [a.copy() for a in xs + vs + ms]
    with pytest.raises(ValueError, match=f"gradient {where} "):
        _core.diag_rmsprop_step(xs, gs, vs, 0.01, 0.9, 1e-8, "inv_sqrt", 0.0, 1.0, True)
    with pytest.raises(ValueError, match=f"gradient {where} "):
        _core.diag_adam_step(xs, gs, ms, vs, 0.01, 0.9, 0.99, 1e-8, "adam", 0.0, 1.0)
    for a, b in zip(xs + vs + ms, before):
        np.testing.assert_array_equal(a, b)


def test_weight_decay_overflow_is_caught():
    xs = [np.array([1e300, 1.0])]
    gs = [np.array([1.0, 1.0])]
    vs = [np.zeros(2)]
    with pytest.raises(ValueError, match="gradient 0 has a non-finite entry g \\+ weight_decay x"):
        _core.diag_rmsprop_step(xs, gs, vs, 0.01, 0.9, 1e-8, "inv_sqrt", 1e10, 1.0, True)
    np.testing.assert_array_equal(vs[0], 0.0)


@pytest.mark.parametrize("call,match", [
    (lambda x, g, v: _core.diag_rmsprop_step([x], [g], [v], -1.0, 0.9, 1e-8, "inv_sqrt", 0.0, 1.0, True), "lr"),
    (lambda x, g, v: _core.diag_rmsprop_step([x], [g], [v], 0.1, 1.0, 1e-8, "inv_sqrt", 0.0, 1.0, True), "beta"),
    (lambda x, g, v: _core.diag_rmsprop_step([x], [g], [v], 0.1, 0.9, 0.0, "inv_sqrt", 0.0, 1.0, True), "eps"),
    (lambda x, g, v: _core.diag_rmsprop_step([x], [g], [v], 0.1, 0.9, 1e-8, "pth", 0.0, 1.0, True), "form"),
    (lambda x, g, v: _core.diag_rmsprop_step([x], [g], [v], 0.1, 0.9, 1e-8, "adam", -1.0, 1.0, True), "weight_decay"),
    (lambda x, g, v: _core.diag_rmsprop_step([x], [g], [v], 0.1, 0.9, 1e-8, "adam", 0.0, 0.5, True), "bias correction"),
    (lambda x, g, v: _core.diag_rmsprop_step([x], [g.astype(np.float32)], [v], 0.1, 0.9, 1e-8, "adam", 0.0, 1.0, True), "gs\\[0\\] must have dtype float64"),
    (lambda x, g, v: _core.diag_rmsprop_step([x], [g[:3]], [v], 0.1, 0.9, 1e-8, "adam", 0.0, 1.0, True), "gs\\[0\\] has 3 entries"),
    (lambda x, g, v: _core.diag_rmsprop_step([x[::2]], [g[::2]], [v[::2]], 0.1, 0.9, 1e-8, "adam", 0.0, 1.0, True), "C-contiguous"),
    (lambda x, g, v: _core.diag_rmsprop_step([x], [g], [v, v], 0.1, 0.9, 1e-8, "adam", 0.0, 1.0, True), "equal lengths"),
    (lambda x, g, v: _core.diag_rmsprop_step([x], [list(g)], [v], 0.1, 0.9, 1e-8, "adam", 0.0, 1.0, True), "numpy array"),
    (lambda x, g, v: _core.diag_rmsprop_step([x.reshape(2, 4)], [g.reshape(2, 4)], [v.reshape(2, 4)], 0.1, 0.9, 1e-8, "adam", 0.0, 1.0, True), "1-D"),
])
def test_bad_arguments_name_themselves_and_change_nothing(call, match):
    x, g, v = np.ones(8), np.full(8, 0.5), np.full(8, 0.25)
    with pytest.raises(ValueError, match=match):
        call(x, g, v)
    np.testing.assert_array_equal(x, 1.0)
    np.testing.assert_array_equal(v, 0.25)


def test_read_only_estimate_is_refused():
    x, g, v = np.ones(4), np.ones(4), np.zeros(4)
    v.flags.writeable = False
    with pytest.raises(ValueError, match="vs\\[0\\] is read-only"):
        _core.diag_rmsprop_step([x], [g], [v], 0.1, 0.9, 1e-8, "adam", 0.0, 1.0, True)
    np.testing.assert_array_equal(x, 1.0)


def test_results_do_not_depend_on_the_thread_count():
    """A tensor long enough to be split (2^20 entries) gives the same bits on 1 and 2 threads."""
    code = textwrap.dedent("""
        import hashlib, numpy as np, sys
        from saddlescape import _core
        rng = np.random.default_rng(5)
        for dtype in (np.float32, np.float64):
            x = rng.standard_normal(1 << 20).astype(dtype)
            g = rng.standard_normal(1 << 20).astype(dtype)
            v = np.zeros(1 << 20, dtype)
            m = np.zeros(1 << 20, dtype)
            _core.diag_rmsprop_step([x], [g], [v], 0.01, 0.9, 1e-8, "inv_sqrt", 0.01, 1.0, True)
            _core.diag_adam_step([x], [g], [m], [v], 0.01, 0.9, 0.99, 1e-8, "adam", 0.0, 2.0)
            sys.stdout.write(hashlib.sha256(x.tobytes() + v.tobytes() + m.tobytes()).hexdigest())
    """)
    outs = []
    for threads in ("1", "2"):
        env = dict(os.environ, SADDLESCAPE_NUM_THREADS=threads)
        outs.append(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                   text=True, check=True, timeout=120).stdout)
    assert outs[0] == outs[1] and outs[0]
