"""saddlescape.torch's optimizers against the numpy-level optimizers and float64 references.

The same gradient sequence is fed to a torch optimizer (through .grad) and to the numpy-level
optimizer on the flat concatenation of the parameters; gradients mix scales over six orders of
magnitude, lie in low-dimensional subspaces (rank-deficient estimates) or are ill-conditioned.
"""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import saddlescape  # noqa: E402
from saddlescape import schedules  # noqa: E402
from saddlescape.blocks import partition  # noqa: E402
from saddlescape.torch import Adam, RMSProp, SaddleEscape  # noqa: E402

from torch_support import (SHAPES, _assert_close, _cuda_against_cpu, _flat,  # noqa: E402
                           _gradients, _params, _reference, _run, _run_inverse_sqrt,
                           _set_grads)


# ----------------------------------------------------------------------------- equality


@pytest.mark.parametrize("form", ["inv_sqrt", "adam"])
def test_diag_rmsprop_equals_numpy_level(form):
    params = _params()
    x0 = _flat(params)
    gs = _gradients(1, x0.size, 30)
    got = _run(RMSProp(params, lr=0.01, beta=0.9, eps=1e-6, structure="diag", form=form),
               params, gs)
    want = _reference(saddlescape.RMSProp(x0.size, 0.01, 0.9, 1e-6, structure="diag", form=form),
                      x0, gs)
    _assert_close(got, want, 1e-13)


@pytest.mark.parametrize("form", ["inv_sqrt", "adam"])
def test_diag_adam_equals_numpy_level(form):
    params = _params()
    x0 = _flat(params)
    gs = _gradients(1, x0.size, 30, seed=3)
    got = _run(Adam(params, lr=0.01, betas=(0.8, 0.95), eps=1e-6, form=form), params, gs)
    want = _reference(saddlescape.Adam(x0.size, 0.01, 0.8, 0.95, 1e-6, structure="diag",
                                       form=form), x0, gs)
    _assert_close(got, want, 1e-13)


@pytest.mark.parametrize("form", ["inv_sqrt", "adam"])
def test_block_rmsprop_one_tensor_equals_numpy_level_bit_for_bit(form):
    params = _params([(7, 5)])
    x0 = _flat(params)
    gs = _gradients(1, 35, 25, seed=4, rank=4)
    opt = RMSProp(params, lr=0.003, beta=0.95, eps=1e-8, structure="block", form=form,
                  block_size=16, refresh_every=4)
    got = _run(opt, params, gs)
    want = _reference(saddlescape.RMSProp(35, 0.003, 0.95, 1e-8, structure="block", form=form,
                                          block_sizes=[16, 16, 3], solver="lowrank",
                                          refresh_every=4), x0, gs)
    np.testing.assert_array_equal(got, want)
    assert [q["block_sizes"] for q in opt.partition()] == [[16, 16, 3]]


@pytest.mark.parametrize("form", ["inv_sqrt", "adam"])
def test_block_rmsprop_several_tensors_against_exact_eigh(form):
    """Each tensor's engine staggers its own refreshes; the directions are exact either way,
    so the run equals an eigendecomposition at every step. With gradient scales 1e-3..1e3 in
    a rank-3 subspace (cond(G_b + eps I) ~ 1e18) eigh itself moves by ~1e-7 of the largest
    step between implementations, hence the tolerance. The adam form takes square roots of
    eigenvalues, so a zero eigenvalue computed as 1e-16 lambda_max counts as 1e-8
    sqrt(lambda_max): it is compared with an eps far above that."""
    params = _params()
    x0 = _flat(params)
    gs = _gradients(1, x0.size, 25, seed=5, rank=3)
    eps = 1e-6 if form == "inv_sqrt" else 1e-2
    opt = RMSProp(params, lr=0.003, beta=0.9, eps=eps, structure="block", form=form,
                  block_size=5, refresh_every=3)
    got = _run(opt, params, gs)
    sizes = [b for q in opt.partition() for b in q["block_sizes"]]
    assert sizes == [5, 5, 2, 3, 1, 5, 5]
    want = _reference(saddlescape.RMSProp(x0.size, 0.003, 0.9, eps, structure="block",
                                          form=form, block_sizes=sizes), x0, gs)
    _assert_close(got - x0, want - x0, 1e-6)


def test_block_adam_against_numpy_level():
    params = _params()
    x0 = _flat(params)
    gs = _gradients(1, x0.size, 20, seed=6)
    opt = Adam(params, lr=0.01, betas=(0.9, 0.99), eps=1e-6, structure="block", block_size=6,
               form="inv_sqrt")
    got = _run(opt, params, gs)
    sizes = [b for q in opt.partition() for b in q["block_sizes"]]
    want = _reference(saddlescape.Adam(x0.size, 0.01, 0.9, 0.99, 1e-6, structure="block",
                                       form="inv_sqrt", block_sizes=sizes), x0, gs)
    _assert_close(got - x0, want - x0, 1e-6)  # scales 1e-3..1e3: see the test above


@pytest.mark.parametrize("cls,form,eps", [("RMSProp", "inv_sqrt", 1e-6), ("RMSProp", "adam", 1e-2),
                                           ("Adam", "inv_sqrt", 1e-6), ("Adam", "adam", 1e-2)])
def test_full_against_numpy_level_on_ill_conditioned_gradients(cls, form, eps):
    """Gradient scales 1e-3..1e3 (cond(G) ~ 1e12), G rank-deficient for the first 7 steps.
    f(0) / f(lambda_max) bounds how much a dense eigensolver's rounding off G's range is
    amplified (1e-16 |g| f(0)), so eps is chosen where float64 can answer. Even so both
    implementations are 0.5e-6 (numpy-level eigh) and 1.4e-6 (the engine) of the largest step
    away from a 40-digit mpmath run (RMSProp, inv_sqrt, measured), hence 5e-6."""
    params = _params([(3, 2), (2,)])
    x0 = _flat(params)
    gs = _gradients(1, 8, 30, seed=7)
    if cls == "RMSProp":
        opt = RMSProp(params, lr=1e-3, beta=0.9, eps=eps, structure="full", form=form)
        ref = saddlescape.RMSProp(8, 1e-3, 0.9, eps, structure="full", form=form)
    else:
        opt = Adam(params, lr=1e-3, betas=(0.9, 0.99), eps=eps, structure="full", form=form)
        ref = saddlescape.Adam(8, 1e-3, 0.9, 0.99, eps, structure="full", form=form)
    got = _run(opt, params, gs)
    _assert_close(got - x0, _reference(ref, x0, gs) - x0, 5e-6)
    assert opt.partition()[0]["block_sizes"] == [8]


@pytest.mark.parametrize("structure", ["diag", "block"])
def test_float32_parameters_against_float64_reference(structure):
    params = _params([(40,), (9, 3)], dtype=torch.float32)
    x0 = _flat(params)
    # float32 resolves cond(G) up to ~1e6: scales 0.1..10
    gs = _gradients(1, x0.size, 20, seed=8, decades=1).astype(np.float32).astype(np.float64)
    opt = RMSProp(params, lr=1e-3, beta=0.9, eps=1e-4, structure=structure, block_size=32)
    got = _run(opt, params, gs)
    sizes = [b for q in opt.partition() for b in q["block_sizes"]] or None
    ref = saddlescape.RMSProp(x0.size, 1e-3, 0.9, 1e-4, structure=structure, block_sizes=sizes)
    # float32 parameters near 1 carry 6e-8 absolute rounding per step; a float32 block resolves
    # eigenvalues only above 32 u lambda_max ~ 1e-4, as large as eps here.
    _assert_close(got - x0, _reference(ref, x0, gs) - x0, 2e-4 if structure == "diag" else 1e-3)


def test_float64_estimates_of_float32_parameters():
    params = _params([(30,)], dtype=torch.float32)
    opt = RMSProp(params, lr=1e-3, beta=0.9, eps=1e-4, structure="block", block_size=10,
                  dtype=torch.float64)
    _run(opt, params, _gradients(1, 30, 3))
    st = opt.state[params[0]]
    assert st["engine"].dtype == np.float64
    assert params[0].dtype == torch.float32


def test_burn_in_weight_decay_and_bias_correction_against_float64_reference():
    d = 6
    params = _params([(d,)])
    x0 = _flat(params)
    gs = _gradients(1, d, 12, seed=9, rank=2, decades=1)
    opt = RMSProp(params, lr=0.01, beta=0.8, eps=1e-6, structure="full", burn_in=3,
                  weight_decay=0.1, bias_correction=True)
    got = _run(opt, params, gs)
    x, G, prod, want = x0.copy(), np.zeros((d, d)), 1.0, []
    for t, g in enumerate(gs):
        g = g + 0.1 * x
        G = 0.8 * G + 0.2 * np.outer(g, g)
        prod *= 0.8
        if t >= 3:
            lam, V = np.linalg.eigh(G / (1 - prod))
            x = x - 0.01 * (V * (np.maximum(lam, 0) + 1e-6) ** -0.5) @ V.T @ g
        want.append(x.copy())
    _assert_close(got - x0, np.array(want) - x0, 1e-8)
    np.testing.assert_array_equal(got[2], x0)  # burn-in steps do not move


def test_beta_auto_follows_the_scheduler():
    """beta_t = 1 - C lr_t^(2/3) with lr_t = lr0 / sqrt(t + 1) from LambdaLR equals the
    numpy-level beta_from_lr_schedule(inverse_sqrt(lr0), C)."""
    params = _params()
    x0 = _flat(params)
    gs = _gradients(1, x0.size, 25, seed=10)
    opt = RMSProp(params, lr=0.05, beta="auto", C=0.5, eps=1e-6, structure="diag")
    got = _run_inverse_sqrt(opt, params, gs)
    lr = schedules.inverse_sqrt(0.05)
    ref = saddlescape.RMSProp(x0.size, lr, schedules.beta_from_lr_schedule(lr, 0.5), 1e-6,
                              structure="diag")
    _assert_close(got, _reference(ref, x0, gs), 1e-12)


@pytest.mark.parametrize("make", [
    lambda o: torch.optim.lr_scheduler.StepLR(o, 3, gamma=0.5),
    lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 10),
    lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.02, total_steps=12,
                                                 cycle_momentum=False),
])
def test_schedulers_set_the_lr_of_each_step(make):
    """A scheduler's lr reaches the step: the run equals one where the same lrs are set by
    hand (block structure, beta='auto', so beta follows too)."""
    gs = _gradients(1, 26, 12, seed=11)
    a, b = _params(), _params()
    oa = RMSProp(a, lr=0.01, beta="auto", structure="block", block_size=5)
    ob = RMSProp(b, lr=0.01, beta="auto", structure="block", block_size=5)
    sched = make(oa)
    lrs = []
    for g in gs:
        lrs.append(oa.param_groups[0]["lr"])
        _set_grads(a, g)
        oa.step()
        sched.step()
    assert len(set(lrs)) > 2
    for g, lr in zip(gs, lrs):
        ob.param_groups[0]["lr"] = lr
        _set_grads(b, g)
        ob.step()
    np.testing.assert_array_equal(_flat(a), _flat(b))


# ----------------------------------------------------------------------------- state dicts


CONFIGS = [
    (RMSProp, dict(structure="diag", form="inv_sqrt"), torch.float64),
    (RMSProp, dict(structure="block", form="adam", block_size=5, refresh_every=4), torch.float32),
    (RMSProp, dict(structure="block", block_size=7, dtype=torch.float64, burn_in=2), torch.float32),
    (RMSProp, dict(structure="full", bias_correction=True), torch.float64),
    (Adam, dict(structure="diag"), torch.float32),
    (Adam, dict(structure="block", block_size=4, betas=(0.9, "auto")), torch.float64),
]


@pytest.mark.parametrize("cls,options,dtype", CONFIGS)
def test_resume_from_torch_save_continues_bit_for_bit(cls, options, dtype):
    gs = _gradients(1, 26, 20, seed=12) * 1e-2
    a = _params(dtype=dtype)
    oa = cls(a, lr=0.01, **options)
    _run(oa, a, gs)
    b = _params(dtype=dtype)
    ob = cls(b, lr=0.01, **options)
    _run(ob, b, gs[:9])
    buf = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in b], "opt": ob.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)  # weights_only=True: the state is plain tensors and numbers
    c = [torch.nn.Parameter(t) for t in saved["params"]]
    oc = cls(c, lr=0.01, **options)
    oc.load_state_dict(saved["opt"])
    _run(oc, c, gs[9:])
    np.testing.assert_array_equal(_flat(c), _flat(a))


def test_load_state_dict_refuses_mismatches_and_changes_nothing():
    a = _params()
    oa = RMSProp(a, lr=0.01, structure="block", block_size=5)
    _run(oa, a, _gradients(1, 26, 3))
    good = oa.state_dict()
    other = RMSProp(_params([(4, 3), (3,)]), lr=0.01, structure="block", block_size=5)
    with pytest.raises(ValueError, match="param group 0 has 2 parameters"):
        other.load_state_dict(good)
    with pytest.raises(ValueError, match="Adam"):
        Adam(_params()).load_state_dict(good)
    b = _params()
    ob = RMSProp(b, lr=0.01, structure="block", block_size=5)
    _run(ob, b, _gradients(1, 26, 2, seed=2))
    before = ob.state_dict()
    bad = copy.deepcopy(good)
    bad["state"][3]["engine"]["block_sizes"] = [4, 6]
    with pytest.raises(ValueError):
        ob.load_state_dict(bad)
    after = ob.state_dict()
    for k in before["state"]:
        np.testing.assert_array_equal(before["state"][k]["engine"]["data"],
                                      after["state"][k]["engine"]["data"])


# ----------------------------------------------------------------------------- groups, grads


def test_param_groups_with_different_options_equal_separate_optimizers():
    gs = _gradients(1, 26, 15, seed=13)
    a = _params()
    opt = RMSProp([{"params": a[:2], "structure": "diag", "lr": 0.02},
                   {"params": a[2:], "form": "adam", "block_size": 4, "beta": 0.5}],
                  lr=0.01, structure="block")
    _run(opt, a, gs)
    b = _params()
    o1 = RMSProp(b[:2], lr=0.02, structure="diag")
    o2 = RMSProp(b[2:], lr=0.01, structure="block", form="adam", block_size=4, beta=0.5)
    for g in gs:
        _set_grads(b, g)
        o1.step()
        o2.step()
    np.testing.assert_array_equal(_flat(a), _flat(b))


@pytest.mark.parametrize("structure", ["diag", "block", "full"])
def test_non_contiguous_parameters(structure):
    """A transposed parameter (non-contiguous) steps like its contiguous copy."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    a = torch.nn.Parameter(base.t())
    b = torch.nn.Parameter(base.t().contiguous())
    assert not a.is_contiguous()
    oa = RMSProp([a], lr=0.01, structure=structure, block_size=6)
    ob = RMSProp([b], lr=0.01, structure=structure, block_size=6)
    for g in _gradients(1, 20, 6, seed=4, decades=1):
        gt = torch.from_numpy(g).reshape(4, 5)
        a.grad, b.grad = gt.clone(), gt.clone()
        oa.step()
        ob.step()
    _assert_close(a.detach().numpy(), b.detach().numpy(), 1e-12)


def test_parameters_without_grad_are_skipped():
    a = _params()
    opt = RMSProp(a, lr=0.01, structure="block", block_size=5)
    _set_grads(a, _gradients(1, 26, 1)[0])
    a[1].grad = None
    x1 = a[1].detach().clone()
    opt.step()
    assert a[1] not in opt.state and torch.equal(a[1].detach(), x1)
    assert all(p in opt.state for p in (a[0], a[2], a[3]))


def test_full_structure_needs_every_gradient():
    a = _params()
    opt = RMSProp(a, structure="full")
    _set_grads(a, _gradients(1, 26, 1)[0])
    a[2].grad = None
    with pytest.raises(ValueError, match="parameter 2 has no gradient"):
        opt.step()


def test_closure_returns_the_loss():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 2).double()
    x, y = torch.randn(20, 5, dtype=torch.float64), torch.randn(20, 2, dtype=torch.float64)
    opt = RMSProp(model.parameters(), lr=0.01, structure="block")

    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    losses = [opt.step(closure).item() for _ in range(30)]
    assert losses[-1] < 0.9 * losses[0]


# ----------------------------------------------------------------------------- bad input


def _snapshot(opt, params):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


def _assert_unchanged(opt, params, snap):
    xs, sd = snap
    for p, x in zip(params, xs):
        assert torch.equal(p.detach(), x)
    now = opt.state_dict()
    assert now["state"].keys() == sd["state"].keys()
    for k, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                assert torch.equal(now["state"][k][key], val)
            elif key == "engine":
                np.testing.assert_array_equal(now["state"][k][key]["data"], val["data"])


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 1e200])
@pytest.mark.parametrize("structure", ["diag", "block", "full"])
def test_bad_gradient_in_any_group_changes_nothing(bad, structure):
    a = _params()
    groups = [{"params": a[:2]}, {"params": a[2:]}] if structure != "full" else [{"params": a}]
    opt = RMSProp(groups, lr=0.01, structure=structure, block_size=5)
    _run(opt, a, _gradients(1, 26, 2))
    snap = _snapshot(opt, a)
    g = _gradients(1, 26, 1, seed=5)[0]
    g[20] = bad
    _set_grads(a, g)
    with pytest.raises(ValueError, match="parameter 1 of param group 1|parameter 3 of param group 0"):
        opt.step()
    _assert_unchanged(opt, a, snap)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.complex64, torch.int32])
def test_unsupported_parameter_dtypes(dtype):
    p = torch.zeros(3, dtype=dtype)
    with pytest.raises(TypeError, match=str(dtype).replace("torch.", "")):
        RMSProp([p])


def test_parameters_on_two_devices():
    with pytest.raises(ValueError, match="different devices"):
        RMSProp([torch.zeros(3), torch.zeros(3, device="meta")], structure="diag")


def test_sparse_gradient():
    p = torch.nn.Parameter(torch.zeros(4, 3))
    p.grad = torch.zeros(4, 3).to_sparse()
    with pytest.raises(TypeError, match="sparse"):
        RMSProp([p], structure="diag").step()


@pytest.mark.parametrize("options,match", [
    (dict(lr=-1.0), "lr"), (dict(beta=1.0), "beta"), (dict(beta="sometimes"), "beta"),
    (dict(eps=0.0), "eps"), (dict(structure="kron"), "structure"), (dict(form="pth"), "form"),
    (dict(block_size=0), "block_size"), (dict(refresh_every=0), "refresh_every"),
    (dict(burn_in=-1), "burn_in"), (dict(weight_decay=-0.1), "weight_decay"),
    (dict(dtype=torch.float16), "dtype"), (dict(C=0.0), "C"), (dict(solver="svd"), "solver"),
])
def test_bad_options_name_themselves(options, match):
    with pytest.raises(ValueError, match=match):
        RMSProp(_params(), **options)
    with pytest.raises(ValueError, match=match):
        RMSProp([{"params": _params()[:1], **options}])


def test_auto_beta_out_of_range_and_changed_structure_change_nothing():
    a = _params()
    opt = RMSProp(a, lr=0.01, beta="auto", C=1.0, structure="block", block_size=5)
    _run(opt, a, _gradients(1, 26, 2))
    snap = _snapshot(opt, a)
    opt.param_groups[0]["lr"] = 2.0  # 1 - 2^(2/3) < 0
    _set_grads(a, _gradients(1, 26, 1, seed=9)[0])
    with pytest.raises(ValueError, match="auto"):
        opt.step()
    _assert_unchanged(opt, a, snap)
    opt.param_groups[0]["lr"] = 0.01
    opt.param_groups[0]["block_size"] = 6
    with pytest.raises(ValueError, match="block_size changed"):
        opt.step()
    _assert_unchanged(opt, a, snap)


# ----------------------------------------------------------------------------- statistics


def test_statistics_against_numpy_eigenvalues():
    a = _params([(6,)])
    opt = RMSProp(a, lr=0.0, beta=0.9, eps=1e-6, structure="block", block_size=6,
                  refresh_every=1)
    gs = _gradients(1, 6, 5, seed=14, rank=2)
    _run(opt, a, gs)
    G = np.zeros((6, 6))
    for g in gs:
        G = 0.9 * G + 0.1 * np.outer(g, g)
    lam = np.linalg.eigvalsh(G)
    s = opt.statistics()
    assert s["blocks"] == 1 and s["refreshes"] >= 5 and s["kept_bases"] == 0
    assert s["lambda_max"] == pytest.approx(lam[-1], rel=1e-10)
    assert abs(s["lambda_min"]) <= 1e-10 * lam[-1]  # rank 2 of 6
    assert s["condition_max"] == pytest.approx((lam[-1] + 1e-6) / (s["lambda_min"] + 1e-6), rel=1e-6)
    assert all(isinstance(v, (int, float)) for k, v in s.items() if k != "per_parameter")


def test_fallback_policy_counts_and_names_the_parameter():
    a = _params([(8,), (5,)])
    opt = RMSProp(a, lr=0.01, structure="block", block_size=8, refresh_every=1,
                  max_consecutive_failures=2)
    gs = _gradients(1, 13, 6, seed=15)
    _run(opt, a, gs[:1])
    opt._inject_refresh_failures(a[1], 0, attempts=5)
    _set_grads(a, gs[1])
    opt.step()
    assert opt.statistics()["kept_bases"] == 1
    _set_grads(a, gs[2])
    with pytest.raises(saddlescape.NumericalError, match="parameter 1 of param group 0"):
        opt.step()


# ----------------------------------------------------------------------------- SaddleEscape


def test_saddle_escape_without_hallucination_equals_numpy_level():
    params = _params()
    x0 = _flat(params)
    gs = _gradients(1, x0.size, 20, seed=16) * 1e-2
    opt = SaddleEscape(RMSProp(params, lr=0.01, beta=0.9, eps=1e-4, structure="diag",
                               burn_in=2), r=0.1, t_thresh=5)
    got = _run(opt, params, gs)
    base = saddlescape.RMSProp(x0.size, 0.01, 0.9, 1e-4, structure="diag", burn_in=2)
    want = _reference(saddlescape.SaddleEscape(base, 0.1, 5), x0, gs)
    _assert_close(got, want, 1e-13)


def test_saddle_escape_hallucinates_along_the_large_step():
    """On f(x) = x^T H x / 2 with an indefinite H, against a float64 loop of Algorithm 4 with
    full-matrix RMSProp and S hallucinated gradients after each large step."""
    d, S, r, lr, T = 5, 3, 0.5, 0.02, 12
    rng = np.random.default_rng(17)
    Q = np.linalg.qr(rng.standard_normal((d, d)))[0]
    H = Q @ np.diag([-1.0, 0.5, 2.0, 3.0, 1e-3]) @ Q.T
    x0 = rng.standard_normal(d)
    p = torch.nn.Parameter(torch.from_numpy(x0.copy()))
    opt = SaddleEscape(RMSProp([p], lr=lr, beta=0.7, eps=1e-6, structure="full"), r, 4,
                       hallucinate=S)
    Ht = torch.from_numpy(H)

    def closure():
        opt.zero_grad()
        loss = 0.5 * p @ Ht @ p
        loss.backward()
        return loss

    xs = []
    for _ in range(T):
        opt.step(closure)
        xs.append(p.detach().numpy().copy())
    x, G, want = x0.copy(), np.zeros((d, d)), []

    def A(G):
        lam, V = np.linalg.eigh(G)
        return (V * (np.maximum(lam, 0) + 1e-6) ** -0.5) @ V.T

    for t in range(T):
        g = H @ x
        G = 0.7 * G + 0.3 * np.outer(g, g)
        big = t % 4 == 0
        x_new = x - (r if big else lr) * A(G) @ g
        if big:
            for k in range(1, S + 1):
                h = H @ (x + k / S * (x_new - x))
                G = 0.7 * G + 0.3 * np.outer(h, h)
        x = x_new
        want.append(x.copy())
    _assert_close(np.array(xs), np.array(want), 1e-8)


def test_saddle_escape_needs_a_closure_to_hallucinate():
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = SaddleEscape(RMSProp([p], structure="diag"), r=0.1, t_thresh=2, hallucinate=2)
    p.grad = torch.ones(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="needs step\\(closure\\)"):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(3, dtype=torch.float64)) and not opt.state
    with pytest.raises(ValueError, match="RMSProp or Adam"):
        SaddleEscape(torch.optim.SGD([p], lr=0.1), r=0.1, t_thresh=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_diag_equals_cpu():
    _cuda_against_cpu(lambda p: RMSProp(p, structure="diag"), _gradients(1, 26, 10, seed=18),
                      1e-12)


_HOST_ROUTES = [
    ("rmsprop-block", lambda p: RMSProp(p, lr=0.05, structure="block", block_size=5,
                                        refresh_every=3, weight_decay=0.01)),
    ("rmsprop-block-adam-float32", lambda p: RMSProp(p, lr=0.05, structure="block", block_size=4,
                                                     form="adam", dtype=torch.float32)),
    ("rmsprop-full", lambda p: RMSProp(p, lr=0.05, structure="full", beta="auto", C=0.5)),
    ("adam-block", lambda p: Adam(p, lr=0.05, structure="block", block_size=6)),
    ("adam-full", lambda p: Adam(p, lr=0.05, structure="full", weight_decay=0.1)),
]


@pytest.mark.parametrize(("name", "make"), _HOST_ROUTES, ids=[r[0] for r in _HOST_ROUTES])
def test_block_and_full_staged_through_the_host_equal_the_direct_path(name, make):
    # Parameters on a GPU take the staged path (gradient to the host engine, direction back);
    # here CPU parameters are forced onto it. Rank-deficient, six-decade gradients; a
    # state_dict saved from the staged optimizer continues on the direct one and vice versa.
    gs = _gradients(1, 26, 12, seed=19, rank=4)
    a, b = _params(), _params()
    oa, ob = make(a), make(b)
    ob._host_staging = True
    ra, rb = _run(oa, a, gs[:8]), _run(ob, b, gs[:8])
    _assert_close(rb, ra, 1e-13)
    assert all(st["exp_avg"].device.type == "cpu" for st in ob.state.values() if "exp_avg" in st)
    c = _params()
    for q, src in zip(c, b):
        q.data.copy_(src.detach())
    oc = make(c)
    oc.load_state_dict(ob.state_dict())
    _assert_close(_run(oc, c, gs[8:]), _run(ob, b, gs[8:]), 1e-13)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("name", "make"), _HOST_ROUTES, ids=[r[0] for r in _HOST_ROUTES])
def test_cuda_block_and_full_equal_cpu(name, make):
    # The host engine on CUDA parameters (test_torch_device_engine.py has the device engine's).
    def on_host(params):
        opt = make(params)
        for group in opt.param_groups:
            group["engine"] = "host"  # before the first step: no state is built yet
        return opt

    oa, ob, b = _cuda_against_cpu(on_host, _gradients(1, 26, 10, seed=20, rank=4), 1e-10)
    assert ob.statistics()["blocks"] == oa.statistics()["blocks"]
    oc = on_host([torch.nn.Parameter(q.detach().clone()) for q in b])
    oc.load_state_dict(ob.state_dict())  # the engines' companions stay on the host
    assert all(st["exp_avg"].device.type == "cpu" for st in oc.state.values() if "exp_avg" in st)


def test_a_version_1_state_without_the_engine_option_still_loads():
    # States saved before the engine option (version 1) load as engine="auto" and continue.
    gs = _gradients(1, 26, 8, seed=42, rank=4)
    a = _params()
    oa = RMSProp(a, lr=0.02, structure="block", block_size=5)
    _run(oa, a, gs[:4])
    old = oa.state_dict()
    old["saddlescape"] = 1
    for g in old["param_groups"]:
        del g["engine"]
    for st in old["state"].values():
        del st["options"]["engine"]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    ob = RMSProp(b, lr=0.02, structure="block", block_size=5)
    ob.load_state_dict(old)
    assert ob.param_groups[0]["engine"] == "auto"
    np.testing.assert_array_equal(_run(ob, b, gs[4:]), _run(oa, a, gs[4:]))


@pytest.mark.parametrize("structure", ["block", "full"])
def test_a_gradient_too_large_for_the_block_engine_is_refused_before_any_step(structure):
    # The host engine keeps a margin for sums over a block (4 B c g^2 <= max); a float32
    # gradient of 1e19 passes (1 - beta) g^2 <= max but not that. It used to be refused by the
    # engine of its own parameter, after the parameters before it had stepped.
    params = _params(dtype=torch.float32)
    opt = RMSProp(params, lr=0.01, structure=structure, block_size=5)
    _set_grads(params, _gradients(1, 26, 1)[0])
    opt.step()
    before = [p.detach().clone() for p in params]
    _set_grads(params, _gradients(1, 26, 1, seed=2)[0])
    params[3].grad[0, 0] = 1e19
    with pytest.raises(ValueError, match=r"parameter 3 .*e\+18 whose square overflows in the "
                                         r"block engine's bound 4 B c g\^2 \(B = (5|26), c = 1\)"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    assert all(st["steps"] == 1 for st in opt.state.values())
