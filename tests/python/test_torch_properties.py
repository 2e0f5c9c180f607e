"""Property-based tests (hypothesis) of saddlescape.torch's optimizers.

Drawn: structures, forms, dtypes, shapes (0-d and 1-entry tensors included), options, gradient
scales, which parameters have gradients, and where a bad value sits. Properties:

* a run saved with torch.save mid-way and loaded into a fresh optimizer continues bit for bit;
* a bad gradient (NaN, Inf, an overflowing square) in any parameter is a ValueError naming it,
  with every parameter and the whole state exactly as before;
* the diagonal structure agrees with the update rule written out in float64 numpy.

Profiles as in test_properties.py (conftest: "ci" small and derandomised, "long" searching).
"""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
torch = pytest.importorskip("torch")
from hypothesis import given, note  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from saddlescape.torch import Adam, RMSProp  # noqa: E402

shapes = st.lists(st.sampled_from([(), (1,), (3,), (2, 3), (7,), (4, 4), (17,)]), min_size=1,
                  max_size=4)


@st.composite
def setups(draw):
    cls = draw(st.sampled_from([RMSProp, Adam]))
    structure = draw(st.sampled_from(["diag", "block", "full"]))
    options = dict(structure=structure, form=draw(st.sampled_from(["inv_sqrt", "adam"])),
                   eps=draw(st.sampled_from([1e-8, 1e-4, 1.0])),
                   weight_decay=draw(st.sampled_from([0.0, 0.01])),
                   block_size=draw(st.integers(1, 9)), refresh_every=draw(st.integers(1, 5)),
                   dtype=draw(st.sampled_from([None, torch.float64])))
    if cls is RMSProp:
        options["beta"] = draw(st.sampled_from([0.0, 0.9, "auto"]))
        options["burn_in"] = draw(st.integers(0, 2))
        options["bias_correction"] = draw(st.booleans())
    else:
        options["betas"] = (0.9, draw(st.sampled_from([0.99, "auto"])))
    pdtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return cls, options, draw(shapes), pdtype, draw(st.integers(0, 2**31 - 1))


def _make(cls, options, shapes_, pdtype, seed):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=pdtype)) for s in shapes_]
    return params, cls(params, lr=0.01, **options)


def _grads(params, rng, t, skip=None):
    scale = 10.0 ** rng.uniform(-3, 3)
    for i, p in enumerate(params):
        if skip is not None and skip(i, t):
            p.grad = None
        else:
            p.grad = torch.from_numpy(np.asarray(rng.standard_normal(p.shape) * scale)).to(p.dtype)


def _state_bits(opt):
    def conv(v):
        if isinstance(v, torch.Tensor):
            return (str(v.dtype), tuple(v.shape), v.numpy().tobytes())
        if isinstance(v, dict):
            return {k: conv(x) for k, x in sorted(v.items(), key=lambda kv: str(kv[0]))}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, np.ndarray):
            return (v.dtype.str, v.shape, v.tobytes())
        return v
    return conv(opt.state_dict())


@given(setups(), st.integers(1, 6), st.integers(0, 6))
def test_resume_is_bit_for_bit(setup, before, after):
    cls, options, shapes_, pdtype, seed = setup
    note(f"{cls.__name__} {options} {shapes_} {pdtype}")
    full = options["structure"] == "full"
    skip = None if full else (lambda i, t: (i + t) % 3 == 2)  # parameters without .grad

    a, oa = _make(cls, options, shapes_, pdtype, seed)
    rng = np.random.default_rng(seed)
    for t in range(before + after):
        _grads(a, rng, t, skip)
        oa.step()
    b, ob = _make(cls, options, shapes_, pdtype, seed)
    rng = np.random.default_rng(seed)
    for t in range(before):
        _grads(b, rng, t, skip)
        ob.step()
    buf = io.BytesIO()
    torch.save({"x": [p.detach() for p in b], "opt": ob.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    c, oc = _make(cls, options, shapes_, pdtype, seed + 1)
    with torch.no_grad():
        for p, x in zip(c, saved["x"]):
            p.copy_(x)
    oc.load_state_dict(saved["opt"])
    for t in range(before, before + after):
        _grads(c, rng, t, skip)
        oc.step()
    for p, q in zip(a, c):
        assert torch.equal(p.detach(), q.detach())


@given(setups(), st.integers(0, 3), st.sampled_from([math.nan, math.inf, -math.inf, 1e300]),
       st.data())
def test_bad_gradient_changes_nothing(setup, steps, bad, data):
    cls, options, shapes_, pdtype, seed = setup
    if bad == 1e300 and pdtype == torch.float32:
        # its square overflows float32 estimates; float64 estimates of float32 parameters take it
        bad = 1e30 if options["dtype"] is None else math.inf
    note(f"{cls.__name__} {options} {shapes_} {pdtype}")
    params, opt = _make(cls, options, shapes_, pdtype, seed)
    rng = np.random.default_rng(seed)
    for t in range(steps):
        _grads(params, rng, t)
        opt.step()
    x = [p.detach().clone() for p in params]
    state = _state_bits(opt)
    _grads(params, rng, steps)
    i = data.draw(st.integers(0, len(params) - 1), label="parameter")
    j = data.draw(st.integers(0, params[i].numel() - 1), label="entry")
    params[i].grad.view(-1)[j] = bad
    with pytest.raises(ValueError, match=f"parameter {i} "):
        opt.step()
    for p, x0 in zip(params, x):
        assert torch.equal(p.detach(), x0)
    assert _state_bits(opt) == state


@given(st.integers(1, 40), st.sampled_from(["inv_sqrt", "adam"]), st.sampled_from([0.0, 0.5, 0.999]),
       st.sampled_from([1e-8, 1e-3]), st.integers(0, 2**31 - 1), st.booleans())
def test_diag_matches_the_rule_in_float64(d, form, beta, eps, seed, adam):
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal(d)
    p = torch.nn.Parameter(torch.from_numpy(x0.copy()))
    opt = (Adam([p], lr=0.01, betas=(0.8, beta), eps=eps, form=form) if adam else
           RMSProp([p], lr=0.01, beta=beta, eps=eps, structure="diag", form=form))
    x, v, m, prod = x0.copy(), np.zeros(d), np.zeros(d), 1.0
    for t in range(5):
        g = rng.standard_normal(d) * 10.0 ** rng.uniform(-4, 4, d)
        p.grad = torch.from_numpy(g.copy())
        opt.step()
        v = beta * v + (1 - beta) * g * g
        prod *= beta
        if adam:
            m = 0.8 * m + 0.2 * g
            s = v / (1 - prod)
            num, rate = m, 0.01 / (1 - 0.8 ** (t + 1))
        else:
            s, num, rate = v, g, 0.01
        den = np.sqrt(s + eps) if form == "inv_sqrt" else np.sqrt(s) + eps
        x = x - rate * num / den
    np.testing.assert_allclose(p.detach().numpy(), x, rtol=1e-12, atol=1e-14)
