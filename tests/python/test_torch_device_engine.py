"""saddlescape.torch's device engine (engine="device": estimates on the parameters' GPU, each
step saddlescape.cuda's batched EMA update and inverse root) and its diagonal step on a GPU.

There is no GPU in CI, so these tests swap saddlescape.cuda for the CPU stand-in of
fake_cuda.py (the optimizer's ``_device_module`` hook): they check the code that drives the
batched routines (stacks of same-size blocks, bias correction through a scaled eps, Adam's first
moment, burn-in, schedulers, the state dict, the failure policy) against the numpy-level
optimizers and float64 references. tests/gpu and bench/gpu/torch_check.py run the same
optimizers with the real module on a GPU.
"""

from __future__ import annotations

import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import saddlescape  # noqa: E402
from saddlescape import schedules  # noqa: E402
from saddlescape.blocks import partition  # noqa: E402
from saddlescape.torch import Adam, RMSProp  # noqa: E402

from fake_cuda import FakeCuda  # noqa: E402
from torch_support import (SHAPES, _assert_close, _cuda_against_cpu, _flat,  # noqa: E402
                           _gradients, _params, _reference, _run, _run_inverse_sqrt,
                           _set_grads)


# Two backward-stable float64 routes to f(G_b) g differ by up to about u kappa, kappa the
# condition number of G_b + eps I (of G_b^(1/2) + eps I in the adam form), and an eigenvalue at
# rounding level of a rank-deficient G_b moves the adam form's sqrt by sqrt(d u lambda_max).
# With gradients of at most 10, eps = 1e-3 keeps kappa <= 1e5 and that sqrt below eps / 1000,
# so the routes agree to about 1e-11 per step; RTOL leaves room for 20 steps.
EPS = 1e-3
RTOL = 1e-9


def _on_fake(opt):
    opt._device_module = FakeCuda()
    return opt


def _sizes(shapes, block_size):
    return [b for s in shapes for b in partition(int(np.prod(s, dtype=int)), block_size)]


@pytest.mark.parametrize("form", ["inv_sqrt", "adam"])
@pytest.mark.parametrize("block_size", [1, 4, 7, 26])
def test_block_equals_the_exact_numpy_level_optimizer(form, block_size):
    # Rank-deficient gradients over two decades; block sizes that leave a shorter last block
    # in most tensors (two stacks), 1 x 1 blocks, and blocks larger than any tensor.
    params = _params()
    x0 = _flat(params)
    gs = _gradients(1, x0.size, 20, seed=30, rank=3, decades=1)
    opt = _on_fake(RMSProp(params, lr=0.01, beta=0.9, eps=EPS, structure="block", form=form,
                           block_size=block_size, engine="device"))
    got = _run(opt, params, gs)
    want = _reference(saddlescape.RMSProp(x0.size, 0.01, 0.9, EPS, structure="block", form=form,
                                          block_sizes=_sizes(SHAPES, block_size)), x0, gs)
    _assert_close(got, want, RTOL)
    # per stack and step: one batched inverse root of an updated copy, the update committed
    calls = opt._device_module.calls
    stacks = sum(len({b for b in partition(p.numel(), block_size)}) for p in params)
    assert calls["ema_update_batched"] == 2 * calls["inv_root_apply:auto"] == 2 * 20 * stacks
    assert all(st["estimates"][0].device == p.device for p, st in opt.state.items())


@pytest.mark.parametrize("form", ["inv_sqrt", "adam"])
def test_full_and_adam_equal_the_numpy_level_optimizers(form):
    params = _params()
    x0 = _flat(params)
    gs = _gradients(1, x0.size, 16, seed=31, decades=1)  # 16 < 26 steps: rank-deficient
    opt = _on_fake(RMSProp(params, lr=0.02, beta=0.95, eps=EPS, structure="full", form=form,
                           engine="device"))
    want = _reference(saddlescape.RMSProp(x0.size, 0.02, 0.95, EPS, structure="full", form=form),
                      x0, gs)
    _assert_close(_run(opt, params, gs), want, RTOL)
    assert [G.shape for G in opt.state[params[0]]["estimates"]] == [(1, 26, 26)]

    params = _params()
    opt = _on_fake(Adam(params, lr=0.02, betas=(0.8, 0.97), eps=EPS, structure="block",
                        form=form, block_size=5, engine="device"))
    want = _reference(saddlescape.Adam(x0.size, 0.02, 0.8, 0.97, EPS, structure="block",
                                       form=form, block_sizes=_sizes(SHAPES, 5)), x0, gs)
    _assert_close(_run(opt, params, gs), want, RTOL)


# Options that go through the device step's own arithmetic (bias correction as a scaled eps,
# burn-in, weight decay, beta tied to a scheduled lr), against the host engine (its
# quadrature's tol is 1e-10 per direction). beta = 0.999 with bias correction divides the
# first estimates by 1e-3, eps = 1e-5 damps them as eps = 1e-3 does the others.
_AGAINST_HOST = [
    ("bias-correction", lambda p, e: RMSProp(p, lr=0.05, beta=0.999, eps=1e-5,
                                             structure="block", block_size=6,
                                             bias_correction=True, engine=e)),
    ("bias-correction-adam-form", lambda p, e: RMSProp(p, lr=0.05, beta=0.99, eps=EPS,
                                                       structure="block", form="adam",
                                                       block_size=6, bias_correction=True,
                                                       engine=e)),
    ("burn-in-weight-decay", lambda p, e: RMSProp(p, lr=0.05, eps=EPS, structure="block",
                                                  block_size=4, burn_in=3, weight_decay=0.1,
                                                  engine=e)),
    ("auto-beta", lambda p, e: RMSProp(p, lr=0.3, beta="auto", C=0.5, eps=EPS,
                                       structure="full", engine=e)),
    ("adam-full-inv-sqrt", lambda p, e: Adam(p, lr=0.05, eps=EPS, structure="full",
                                             form="inv_sqrt", weight_decay=0.01, engine=e)),
]


@pytest.mark.parametrize(("name", "make"), _AGAINST_HOST, ids=[r[0] for r in _AGAINST_HOST])
def test_device_engine_equals_the_host_engine(name, make):
    gs = _gradients(1, 26, 14, seed=32, rank=5, decades=1)
    a, b = _params(), _params()
    oa, ob = make(a, "host"), _on_fake(make(b, "device"))
    sa = torch.optim.lr_scheduler.StepLR(oa, step_size=4, gamma=0.5)
    sb = torch.optim.lr_scheduler.StepLR(ob, step_size=4, gamma=0.5)
    for g in gs:
        for params, opt, sched in ((a, oa, sa), (b, ob, sb)):
            _set_grads(params, g)
            opt.step()
            sched.step()
    _assert_close(_flat(b), _flat(a), RTOL)
    assert all("estimates" in st for st in ob.state.values())
    assert all("engine" in st for st in oa.state.values())


def test_chunked_stacks_give_the_same_bits(monkeypatch):
    # A stack larger than the chunk is stepped in several batched calls (bounded extra memory):
    # the same bits as one call, since the blocks are independent.
    gs = _gradients(1, 26, 6, seed=43, rank=4, decades=1)

    def run(chunk_blocks):
        import saddlescape.torch.optim as optim

        monkeypatch.setattr(optim, "_CHUNK_BYTES", chunk_blocks * 3 * 3 * 8)
        params = _params()
        opt = _on_fake(RMSProp(params, lr=0.02, eps=EPS, structure="block", block_size=3,
                               engine="device"))
        return _run(opt, params, gs), opt._device_module.calls["inv_root_apply:auto"]

    (one, n1), (many, n2) = run(1 << 20), run(2)
    np.testing.assert_array_equal(many, one)
    assert n2 > n1  # (4, 3) has 4 blocks of 3: two calls of 2 instead of one


def test_saddle_escape_on_the_device_engine_equals_the_host_engine():
    # Algorithm 4 with hallucinated samples: estimate-only steps between the large ones.
    from saddlescape.torch import SaddleEscape

    gen = torch.Generator().manual_seed(44)
    A = torch.randn(26, 26, generator=gen, dtype=torch.float64) / 5

    def train(engine):
        params = _params()
        base = RMSProp(params, lr=0.02, eps=EPS, structure="block", block_size=6, engine=engine)
        opt = SaddleEscape(_on_fake(base) if engine == "device" else base, r=0.1, t_thresh=3,
                           hallucinate=2)

        def closure():
            opt.zero_grad()
            x = torch.cat([p.reshape(-1) for p in params])
            loss = 0.5 * x @ (A @ x) - x.sum()
            loss.backward()
            return loss

        for _ in range(8):
            opt.step(closure)
        return _flat(params), base

    (a, _), (b, dev) = train("host"), train("device")
    _assert_close(b, a, RTOL)
    # 8 steps, 3 of them large with 2 samples each: 14 updates, 8 of them with a step
    assert all(st["steps"] == 14 and st["moves"] == 8 for st in dev.state.values())


def test_float32_follows_the_float64_reference():
    # float32 parameters and estimates; the reference is the float64 numpy-level optimizer.
    params = _params(dtype=torch.float32)
    x0 = _flat(params)
    gs = _gradients(1, x0.size, 12, seed=33, decades=1)
    opt = _on_fake(RMSProp(params, lr=0.01, beta=0.9, eps=1e-4, structure="block",
                           block_size=8, engine="device"))
    got = _run(opt, params, gs.astype(np.float32))
    want = _reference(saddlescape.RMSProp(x0.size, 0.01, 0.9, 1e-4, structure="block",
                                          block_sizes=_sizes(SHAPES, 8)), x0,
                      gs.astype(np.float32).astype(np.float64))
    _assert_close(got, want, 2e-5)
    assert all(G.dtype == torch.float32 for st in opt.state.values() for G in st["estimates"])


def test_float64_estimates_of_float32_parameters():
    params = _params(dtype=torch.float32)
    opt = _on_fake(RMSProp(params, lr=0.01, structure="block", block_size=8, engine="device",
                           dtype=torch.float64))
    _run(opt, params, _gradients(1, 26, 3, seed=34))
    assert all(G.dtype == torch.float64 for st in opt.state.values() for G in st["estimates"])
    assert all(p.dtype == torch.float32 for p in params)


def test_state_dict_resumes_bit_for_bit_and_converts_between_engines():
    gs = _gradients(1, 26, 12, seed=35, rank=4, decades=1)

    def make(p, engine="auto"):
        return Adam(p, lr=0.02, eps=EPS, structure="block", block_size=5, engine=engine)

    def continued(opt, params):
        return _run(opt, params, gs[6:])

    a = _params()
    oa = _on_fake(make(a))  # "auto" where the device module can run: the device engine
    _run(oa, a, gs[:6])
    buf = io.BytesIO()
    torch.save(oa.state_dict(), buf)
    saved = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    assert all(G.device.type == "cpu" for st in saved["state"].values()
               for G in st["estimates"])
    copies = [[torch.nn.Parameter(p.detach().clone()) for p in a] for _ in range(2)]
    ob = _on_fake(make(copies[0]))
    ob.load_state_dict(saved)
    assert all("estimates" in st for st in ob.state.values())
    # Where the device engine cannot run ("auto" without a GPU), the estimates become host
    # engines refreshed at them: the same estimates, and the same steps to rounding.
    oc = make(copies[1])
    oc.load_state_dict(saved)
    assert all("engine" in st for st in oc.state.values())
    for p, st in oc.state.items():
        i = next(i for i, q in enumerate(copies[1]) if q is p)
        want = [Gb.numpy() for G in saved["state"][i]["estimates"] for Gb in G]
        c = 1.0 - saved["state"][i]["beta_product"]  # estimate() is bias-corrected
        for got, ref in zip(st["engine"].estimate(), want, strict=True):
            np.testing.assert_allclose(got * c, ref, rtol=1e-12, atol=1e-15 * np.abs(ref).max())
    want = continued(oa, a)
    np.testing.assert_array_equal(continued(ob, copies[0]), want)
    _assert_close(continued(oc, copies[1]), want, RTOL)

    # And back: a host engine's state (estimate with a pending gradient history) on the
    # device engine.
    h = _params()
    oh = make(h)
    _run(oh, h, gs[:6])
    d = [torch.nn.Parameter(p.detach().clone()) for p in h]
    od = _on_fake(make(d))
    od.load_state_dict(oh.state_dict())
    assert all("estimates" in st for st in od.state.values())
    _assert_close(continued(od, d), continued(oh, h), RTOL)

    # engine="device" where it cannot run is refused with nothing changed; so are bad states.
    opt = make(_params(), "device")
    with pytest.raises(ValueError, match="engine='device' needs CUDA parameters"):
        opt.load_state_dict(saved)
    assert not opt.state and opt.param_groups[0]["engine"] == "device"
    bad = oa.state_dict()
    bad["state"][0]["estimates"][0][0, 0, 1] += 1.0
    with pytest.raises(ValueError, match="finite and symmetric"):
        _on_fake(make(_params())).load_state_dict(bad)
    bad = oa.state_dict()
    bad["state"][1]["estimates"] = [bad["state"][1]["estimates"][0].float()]
    with pytest.raises(ValueError, match=r"parameter 1's estimates must be torch.float64 tensors "
                                         r"of shapes \[\(1, 3, 3\)\]"):
        _on_fake(make(_params())).load_state_dict(bad)


def test_gradients_that_require_grad_and_weight_decay_checks():
    # backward(create_graph=True) leaves gradients that require grad: the device module must
    # get them detached (a CUDA array interface refuses them).
    params = _params()
    opt = _on_fake(RMSProp(params, lr=0.01, eps=EPS, structure="block", block_size=5,
                           engine="device"))
    x = torch.cat([p.reshape(-1) for p in params])
    for p, g in zip(params, torch.autograd.grad((x ** 3).sum(), params, create_graph=True)):
        p.grad = g
    assert params[0].grad.requires_grad
    opt.step()
    diag = _on_fake(RMSProp(params, lr=0.01, structure="diag"))
    diag.step()
    assert diag._device_module.calls["rmsprop_diag_step"] == len(params)
    # With weight decay, g + wd p is what must be finite, for every parameter, before the
    # first one steps.
    params = _params()
    opt = _on_fake(RMSProp(params, lr=0.01, structure="diag", weight_decay=10.0))
    _set_grads(params, _gradients(1, 26, 1)[0])
    params[3].data[0, 0] = 1e308  # its gradient is fine; 10 p is not
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="parameter 3 .* plus weight decay 10.0 has a non-finite"):
        opt.step()
    assert not opt.state and all(torch.equal(p, q) for p, q in zip(params, before))


@pytest.mark.parametrize("structure", ["diag", "block"])
def test_gradients_whose_square_overflows_on_the_device_are_refused_first(structure):
    # The device kernels square g before weighting it by 1 - beta, so a float32 gradient of
    # 2e19 (g^2 = 4e38 > 3.4e38) is refused there, by name and before anything changes,
    # although (1 - beta) g^2 would fit.
    params = _params(dtype=torch.float32)
    opt = _on_fake(RMSProp(params, beta=0.999, structure=structure, block_size=5))
    _set_grads(params, _gradients(1, 26, 1)[0])
    params[2].grad.fill_(2e19)
    with pytest.raises(ValueError, match="parameter 2 .* whose square overflows"):
        opt.step()
    assert not opt.state
    if structure == "diag":
        RMSProp(params, beta=0.999, structure="diag").step()  # the host's arithmetic: it fits


def test_host_engine_on_gpu_parameters_keeps_the_host_bound():
    # engine="host" on parameters the device module could step: the gradient still goes to
    # the host block engine, so its 4 B c g^2 margin is what is checked before any step.
    params = _params(dtype=torch.float32)
    opt = _on_fake(RMSProp(params, structure="block", block_size=5, engine="host"))
    _set_grads(params, _gradients(1, 26, 1)[0])
    params[3].grad.fill_(5e18)
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=r"parameter 3 .* block engine's bound 4 B c g\^2"):
        opt.step()
    assert not opt.state and all(torch.equal(p, q) for p, q in zip(params, before))


def test_converted_estimates_are_symmetric_and_reload():
    # A host engine's state with a pending history (block 13, 6 of 16 updates since the
    # refresh) summed into estimates: exactly symmetric, so the device engine keeps them so
    # and its own checkpoint loads again.
    gs = _gradients(1, 26, 10, seed=46, decades=1)
    h = _params()
    host = RMSProp(h, lr=0.01, eps=EPS, structure="block", block_size=13)
    _run(host, h, gs[:6])
    d = [torch.nn.Parameter(p.detach().clone()) for p in h]
    dev = _on_fake(RMSProp(d, lr=0.01, eps=EPS, structure="block", block_size=13))
    dev.load_state_dict(host.state_dict())
    _run(dev, d, gs[6:8])
    assert all(torch.equal(G, G.mT) for st in dev.state.values() for G in st["estimates"])
    again = _on_fake(RMSProp([torch.nn.Parameter(p.detach().clone()) for p in d], lr=0.01,
                             eps=EPS, structure="block", block_size=13))
    again.load_state_dict(dev.state_dict())
    back = RMSProp([torch.nn.Parameter(p.detach().clone()) for p in d], lr=0.01, eps=EPS,
                   structure="block", block_size=13)
    back.load_state_dict(dev.state_dict())  # and to the host engine again


def test_engine_does_not_concern_diag():
    params = _params()
    opt = RMSProp(params, structure="diag", engine="device")  # CPU parameters, no GPU: fine
    _run(opt, params, _gradients(1, 26, 2))
    assert all("exp_avg_sq" in st for st in opt.state.values())


def test_a_failed_eigendecomposition_is_retried_then_refused_with_nothing_changed():
    gs = _gradients(1, 26, 6, seed=36, rank=4)
    params = _params()
    opt = _on_fake(RMSProp(params, lr=0.02, structure="block", block_size=5, engine="device"))
    fake = opt._device_module
    _run(opt, params, gs[:2])
    ref = [p.detach().clone() for p in _params()]
    ref_opt = _on_fake(RMSProp(ref, lr=0.02, structure="block", block_size=5, engine="device"))
    _run(ref_opt, ref, gs[:3])

    fake.fail_next = 1  # the float64 divide-and-conquer retry succeeds
    _run(opt, params, gs[2:3])
    _assert_close(_flat(params), _flat(ref), 1e-12)
    s = opt.statistics()
    assert (s["failed_refreshes"], s["float64_retries"], s["eps_retries"]) == (1, 1, 0)
    assert fake.calls["inv_root_apply:divide_conquer"] == 1

    before = [p.detach().clone() for p in params]
    state = {p: [G.clone() for G in st["estimates"]] for p, st in opt.state.items()}
    fake.fail_next = 2  # the retry fails as well: refused
    _set_grads(params, gs[3])
    with pytest.raises(saddlescape.NumericalError, match="parameter 0 .* also in float64"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    assert all(torch.equal(G, H) for p, st in opt.state.items()
               for G, H in zip(st["estimates"], state[p]))
    assert opt.statistics()["failed_refreshes"] == 1

    # With fallback_eps the third try, in float64 with eps + fallback_eps, takes the step.
    opt = _on_fake(RMSProp(params, lr=0.02, structure="block", block_size=5, engine="device",
                           fallback_eps=1e-3))
    _run(opt, params, gs[:1])
    opt._device_module.fail_next = 2
    _run(opt, params, gs[1:2])
    s = opt.statistics()
    assert (s["failed_refreshes"], s["float64_retries"], s["eps_retries"]) == (1, 1, 1)
    assert opt._device_module.calls["inv_root_apply:divide_conquer"] == 2
    assert all(bool(torch.isfinite(p).all()) for p in params)


def test_statistics_are_the_estimates_spectra():
    params = _params()
    gs = _gradients(1, 26, 9, seed=37, rank=3)
    opt = _on_fake(RMSProp(params, lr=0.01, beta=0.9, structure="block", block_size=6,
                           bias_correction=True, engine="device"))
    _run(opt, params, gs)
    s = opt.statistics()
    sizes = _sizes(SHAPES, 6)
    assert s["blocks"] == len(sizes) and s["refreshes"] == 9 * len(sizes)
    # float64 reference: the bias-corrected EMA of each block's gradients
    ref_lo, ref_hi, offset = [], [], 0
    for b in sizes:
        G = np.zeros((b, b))
        for g in gs:
            G = 0.9 * G + 0.1 * np.outer(g[offset:offset + b], g[offset:offset + b])
        ev = np.linalg.eigvalsh(G / (1 - 0.9 ** len(gs)))
        ref_lo.append(max(ev[0], 0.0))
        ref_hi.append(ev[-1])
        offset += b
    got_lo = [x for q in s["per_parameter"] for x in q["lambda_min"]]
    got_hi = [x for q in s["per_parameter"] for x in q["lambda_max"]]
    np.testing.assert_allclose(got_hi, ref_hi, rtol=1e-10)
    np.testing.assert_allclose(got_lo, ref_lo, rtol=1e-10, atol=1e-12 * max(ref_hi))
    assert s["lambda_max"] == pytest.approx(max(ref_hi), rel=1e-12)


def test_engine_device_without_a_gpu_is_refused_before_anything_changes():
    params = _params()
    opt = RMSProp(params, structure="block", engine="device")
    _set_grads(params, _gradients(1, 26, 1)[0])
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="parameter 0 of param group 0 .* engine='device' needs "
                                         "CUDA parameters, this one is on cpu"):
        opt.step()
    assert not opt.state and all(torch.equal(p, q) for p, q in zip(params, before))
    with pytest.raises(ValueError, match="engine .* 'auto', 'host' or 'device', got 'gpu'"):
        RMSProp(params, engine="gpu")
    # "auto" on CPU parameters is the host engine, and diag ignores the option.
    opt = RMSProp(params, structure="block", engine="auto")
    opt.step()
    assert all("engine" in st for st in opt.state.values())


@pytest.mark.parametrize("form", ["inv_sqrt", "adam"])
def test_diag_rmsprop_takes_the_fused_device_step(form):
    params = _params()
    x0 = _flat(params)
    gs = _gradients(1, x0.size, 10, seed=38)
    opt = _on_fake(RMSProp(params, lr=0.01, beta=0.9, eps=1e-6, structure="diag", form=form,
                           weight_decay=0.0))
    want = _reference(saddlescape.RMSProp(x0.size, 0.01, 0.9, 1e-6, structure="diag", form=form),
                      x0, gs)
    _assert_close(_run(opt, params, gs), want, 1e-13)
    assert opt._device_module.calls["rmsprop_diag_step"] == 10 * len(params)
    # Adam's and the bias-corrected steps are torch operations (the kernel has neither).
    opt = _on_fake(Adam(_params(), structure="diag"))
    _run(opt, list(opt.param_groups[0]["params"]), gs[:2])
    assert opt._device_module.calls["rmsprop_diag_step"] == 0


def test_schedules_auto_beta_matches_numpy_level_on_the_device_engine():
    # beta="auto" under a scheduler: beta_t = 1 - C lr_t^(2/3) from each step's lr.
    params = _params()
    x0 = _flat(params)
    gs = _gradients(1, x0.size, 12, seed=39, rank=6, decades=1)
    opt = _on_fake(RMSProp(params, lr=0.1, beta="auto", C=0.5, eps=EPS, structure="block",
                           block_size=9, engine="device"))
    got = _run_inverse_sqrt(opt, params, gs)
    lr = schedules.inverse_sqrt(0.1)
    want = _reference(saddlescape.RMSProp(x0.size, lr, schedules.beta_from_lr_schedule(lr, 0.5),
                                          EPS, structure="block", block_sizes=_sizes(SHAPES, 9)),
                      x0, gs)
    _assert_close(got, want, RTOL)


# ----------------------------------------------------------------------------- on a GPU

def _gpu() -> bool:
    if not torch.cuda.is_available():
        return False
    from saddlescape import cuda

    return cuda.is_available()


needs_cuda = pytest.mark.skipif(not _gpu(), reason="needs a CUDA GPU and saddlescape.cuda")


@needs_cuda
@pytest.mark.parametrize(("name", "make"), _AGAINST_HOST, ids=[r[0] for r in _AGAINST_HOST])
def test_cuda_device_engine_equals_the_cpu_host_engine(name, make):
    # "auto" on CUDA parameters is the device engine, on CPU ones the host engine
    oa, ob, b = _cuda_against_cpu(lambda p: make(p, "auto"),
                                  _gradients(1, 26, 14, seed=40, rank=5, decades=1), RTOL)
    assert all(G.is_cuda for st in ob.state.values() for G in st["estimates"])
    assert all("engine" in st for st in oa.state.values())
    assert ob.statistics()["blocks"] == oa.statistics()["blocks"]
    gs = _gradients(1, 26, 3, seed=45, rank=5, decades=1)
    # a checkpoint continues on a fresh optimizer (the same kernels on the same input)
    c = [torch.nn.Parameter(q.detach().clone()) for q in b]
    oc = make(c, "auto")
    oc.load_state_dict(ob.state_dict())
    _assert_close(_run(oc, c, gs), _run(ob, b, gs), 1e-14)


@needs_cuda
@pytest.mark.parametrize("form", ["inv_sqrt", "adam"])
def test_cuda_device_engine_float32_follows_the_float64_reference(form):
    shapes = [(40, 30), (30,), (7, 3)]
    params = [torch.nn.Parameter(p.detach().cuda()) for p in _params(shapes, torch.float32)]
    x0 = _flat(params)
    gs = _gradients(1, x0.size, 12, seed=41, decades=1, rank=20).astype(np.float32)
    opt = RMSProp(params, lr=0.01, beta=0.9, eps=EPS, structure="block", form=form,
                  block_size=64, engine="device")
    got = _run(opt, params, gs)
    want = _reference(saddlescape.RMSProp(x0.size, 0.01, 0.9, EPS, structure="block", form=form,
                                          block_sizes=_sizes(shapes, 64)), x0,
                      gs.astype(np.float64))
    _assert_close(got, want, 2e-5)
