"""saddlescape's optimizers against independent plain-numpy float64 implementations.

Every rule is re-implemented below from its documented semantics (optimizers.py, optimizers.hpp,
estimators.cpp) and fed the same gradients: x <- x - lr_t A_t g_t with

* SGD: A = I;
* RMSProp: G_t = beta_t G_(t-1) + (1 - beta_t) g_t g_t^T (G_0 = 0, no bias correction), projected
  onto the structure (full, diagonal, diagonal blocks), A_t = f(G_t) with
  f = (. + eps I)^(-1/2) ("inv_sqrt") or ((.)^(1/2) + eps I)^(-1) ("adam");
* Adam: m_t = beta1 m_(t-1) + (1 - beta1) g_t and x <- x - lr f(G_t / (1 - prod beta2)) m_t / (1 - beta1^t);
* PreconditionedSGD: A = A(x) from a callable, or f(E[g g^T](x)) of a problem;
* SaddleEscape: step size r at the moving steps t with t % t_thresh == 0.

Matrix functions in the references come from ``scipy.linalg.eigh`` (LAPACK through scipy's own
build), with the documented convention that eigenvalues within d u lambda_max of zero count as
zero.

Steps are compared one at a time: the library steps from x = 0 (so ``-x`` afterwards is exactly
lr_t A_t g_t as the library computed it) and the reference computes the same product.

Error model behind the 1e-10 tolerance (u = 2.2e-16). The EMAs agree to a few u per entry
(test_estimators.py). A symmetric eigensolver computes f(G) g with a relative error of about
u d kappa, kappa = (lambda_max + eps) / (lambda_min + eps) the conditioning of f on G's spectrum;
components of g in G's (numerical) null space carry an absolute error of about
u ||g|| f(0). The inputs are chosen so that both stay below ~1e-11:

* diagonal structure: no eigensolver, every coordinate is a scalar recurrence, so gradients whose
  coordinates span 1e-4 .. 1e4 are fine with eps = 1e-8;
* full and block structure with coordinates spanning 1e-4 .. 1e4 (lambda_max ~ 1e8): eps is set
  1e-4 below the top of the spectrum (1e4 for inv_sqrt, 1 for adam), which bounds kappa by 1e4;
  for d = 1 the "matrix" is a scalar and eps = 1e-8;
* rank-deficient estimates and exact zeros (unit-scale gradients): g_t lies in the range of G_t,
  so the null space, where f = f(0) is largest, only meets rounding-sized components of g;
  eps = 1e-8 (inv_sqrt) and 1e-4 (adam, whose f(0) = 1 / eps is the square of inv_sqrt's).
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

import numpy as np
import pytest
import scipy.linalg

import saddlescape as ss
from saddlescape import problems, schedules

U = float(np.finfo(np.float64).eps)
TOL = 1e-10
BELOW_ONE = float(np.nextafter(1.0, 0.0))
STRUCTURES = ["full", "diag", "block"]
FORMS = ["inv_sqrt", "adam"]
DIMS = [1, 2, 7, 60]


# --------------------------------------------------------------------------------------------
# schedules: the library's and an independent numpy version of each


def blocks_for(d: int) -> list[int]:
    """Unequal block sizes summing to d, with a 1 x 1 block where d allows."""
    if d == 1:
        return [1]
    if d == 2:
        return [1, 1]
    if d < 10:
        return [1, d - 3, 2]
    return [d // 3, 1, d - d // 3 - 1]


def lr_pair(kind: str) -> tuple[Any, Callable[[int], float]]:
    """(what the library gets, lr_t in numpy)."""
    if kind == "const":
        return 0.05, lambda t: 0.05
    eta0 = 0.3
    return schedules.inverse_sqrt(eta0), lambda t: eta0 / math.sqrt(t + 1.0)


def beta_from_lr_numpy(lr_t: float, C: float, floor: float) -> float:
    beta = 1.0 - C * float(np.power(lr_t, 2.0 / 3.0))
    return min(max(beta, floor), BELOW_ONE)


def beta_pair(kind: str, lr_kind: str = "isqrt") -> tuple[Any, Callable[[int], float]]:
    """(what the library gets, beta_t in numpy). "sched": beta_t = 1 - C lr_t^(2/3) for the
    inverse_sqrt(0.3) step size with C = 2.5 and floor 0.3: clipped to the floor for the first
    steps, then rising (0.50 at t = 10, 0.74 at t = 100)."""
    if kind == "const":
        return 0.9, lambda t: 0.9
    if kind == "zero":
        return 0.0, lambda t: 0.0
    C, floor = 2.5, 0.3
    lr_lib, lr_ref = lr_pair(lr_kind)
    return (schedules.beta_from_lr_schedule(lr_lib, C, floor),
            lambda t: beta_from_lr_numpy(lr_ref(t), C, floor))


# --------------------------------------------------------------------------------------------
# reference matrix functions and optimizers


def f_scalar(lam: np.ndarray, eps: float, form: str) -> np.ndarray:
    lam = np.asarray(lam, dtype=np.float64)
    if form == "inv_sqrt":
        return 1.0 / np.sqrt(lam + eps)
    return 1.0 / (np.sqrt(lam) + eps)


def f_sym(G: np.ndarray, eps: float, form: str) -> np.ndarray:
    """f(G) = V f(Lambda) V^T by scipy's eigh; |lambda| <= d u lambda_max counts as 0."""
    d = G.shape[0]
    lam, V = scipy.linalg.eigh(G)
    top = float(np.abs(lam).max())
    assert lam[0] >= -d * U * top - 1e-300, "the reference EMA is not positive semi-definite"
    lam = np.where(lam <= d * U * top, 0.0, lam)
    return (V * f_scalar(lam, eps, form)) @ V.T


def structure_mask(d: int, structure: str, blocks: list[int] | None) -> np.ndarray:
    if structure == "full":
        return np.ones((d, d))
    if structure == "diag":
        return np.eye(d)
    m = np.zeros((d, d))
    at = 0
    for b in blocks:
        m[at : at + b, at : at + b] = 1.0
        at += b
    assert at == d
    return m


def f_struct(G: np.ndarray, eps: float, form: str, structure: str, blocks: list[int] | None) -> np.ndarray:
    """f of a masked estimate, as a d x d matrix."""
    d = G.shape[0]
    if structure == "diag":
        return np.diag(f_scalar(np.diag(G), eps, form))
    if structure == "full":
        return f_sym(G, eps, form)
    out = np.zeros((d, d))
    at = 0
    for b in blocks:
        out[at : at + b, at : at + b] = f_sym(G[at : at + b, at : at + b], eps, form)
        at += b
    return out


class RefRMSProp:
    """Algorithms 2 and 3 in plain numpy, with the refresh_every staleness of ema_estimator:
    the factorisation is redone when a direction is needed and k or more updates happened since
    the last one (diagonal estimates are never stale)."""

    def __init__(self, d, lr, beta, eps, structure="full", form="inv_sqrt", burn_in=0,
                 refresh_every=1, blocks=None):
        self.d, self.lr, self.beta, self.eps = d, lr, beta, eps
        self.structure, self.form, self.burn_in, self.k = structure, form, burn_in, refresh_every
        self.blocks = blocks
        self.mask = structure_mask(d, structure, blocks)
        self.G = np.zeros((d, d))
        self.updates = self.steps = self.moves = 0
        self.A: np.ndarray | None = None
        self.factored_at = -1
        self.betas_used: list[float] = []

    def observe(self, g):
        b = self.beta(self.updates)
        self.betas_used.append(b)
        self.G = b * self.G + (1.0 - b) * np.outer(g, g) * self.mask
        self.updates += 1

    def preconditioner(self) -> np.ndarray:
        if self.structure == "diag":
            return f_struct(self.G, self.eps, self.form, "diag", None)
        if self.factored_at < 0 or self.updates - self.factored_at >= self.k:
            self.A = f_struct(self.G, self.eps, self.form, self.structure, self.blocks)
            self.factored_at = self.updates
        return self.A

    def step(self, g, lr=None) -> np.ndarray | None:
        """The step lr_t A_t g (None for a burn-in step)."""
        g = np.asarray(g, dtype=np.float64)
        if self.steps - self.moves < self.burn_in:
            self.observe(g)
            self.steps += 1
            return None
        rate = self.lr(self.moves) if lr is None else lr
        self.observe(g)
        s = rate * (self.preconditioner() @ g)
        self.moves += 1
        self.steps += 1
        return s

    def estimate(self) -> np.ndarray:
        """In the layout of RMSProp.estimate()."""
        if self.structure == "full":
            return self.G
        if self.structure == "diag":
            return np.diag(self.G).copy()
        parts, at = [], 0
        for b in self.blocks:
            parts.append(self.G[at : at + b, at : at + b].ravel())
            at += b
        return np.concatenate(parts)


class RefAdam:
    """Adam with a full, diagonal or block second moment, in plain numpy."""

    def __init__(self, d, lr, beta1, beta2, eps, structure="diag", form="adam", refresh_every=1,
                 blocks=None):
        self.d, self.lr, self.beta1, self.beta2, self.eps = d, lr, beta1, beta2, eps
        self.structure, self.form, self.k, self.blocks = structure, form, refresh_every, blocks
        self.mask = structure_mask(d, structure, blocks)
        self.m = np.zeros(d)
        self.G = np.zeros((d, d))
        self.prod = 1.0
        self.updates = self.moves = 0
        self.A: np.ndarray | None = None
        self.factored_at = -1

    def observe(self, g):
        b = self.beta2(self.updates)
        self.G = b * self.G + (1.0 - b) * np.outer(g, g) * self.mask
        self.prod *= b
        self.updates += 1

    def step(self, g, lr=None) -> np.ndarray:
        g = np.asarray(g, dtype=np.float64)
        rate = self.lr(self.moves) if lr is None else lr
        self.m = self.beta1 * self.m + (1.0 - self.beta1) * g
        self.observe(g)
        m_hat = self.m / (1.0 - self.beta1 ** (self.moves + 1))
        G_hat = self.G / (1.0 - self.prod)
        if self.structure == "diag":
            A = f_struct(G_hat, self.eps, self.form, "diag", None)
        else:
            if self.factored_at < 0 or self.updates - self.factored_at >= self.k:
                self.A = f_struct(G_hat, self.eps, self.form, self.structure, self.blocks)
                self.factored_at = self.updates
            A = self.A
        self.moves += 1
        return rate * (A @ m_hat)


def lib_step(opt, g, d, source=None) -> np.ndarray:
    """The library's step lr_t A_t g, taken from x = 0 (exact: 0 - s = -s)."""
    x = np.zeros(d)
    opt.step(x, g, source=source)
    return -x


def assert_step_close(got: np.ndarray, want: np.ndarray | None, tol: float, what: str) -> None:
    if want is None:  # a burn-in step: x exactly unchanged
        assert np.array_equal(got, np.zeros_like(got)), f"{what}: a burn-in step moved x"
        return
    nw = float(np.linalg.norm(want))
    if nw == 0.0:
        assert np.array_equal(got, np.zeros_like(got)), f"{what}: a zero step moved x"
        return
    err = float(np.linalg.norm(got - want)) / nw
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g}"


def assert_same_state(a: dict, b: dict) -> None:
    """Two state_dicts equal to the last bit."""
    assert a["kind"] == b["kind"]
    assert a["arrays"].keys() == b["arrays"].keys()
    assert a["scalars"].keys() == b["scalars"].keys()
    for k in a["arrays"]:
        assert a["arrays"][k].dtype == b["arrays"][k].dtype, k
        assert np.array_equal(a["arrays"][k], b["arrays"][k]), k
    for k in a["scalars"]:
        assert a["scalars"][k] == b["scalars"][k], k


# --------------------------------------------------------------------------------------------
# gradient families


def ill_gradients(rng, n: int, d: int) -> np.ndarray:
    """Coordinates on scales spanning 1e-4 .. 1e4 (for d = 1: the scale varies over time in the
    same range), signs and sizes random, with a few exact zeros."""
    z = rng.standard_normal((n, d))
    if d == 1:
        z *= 10.0 ** rng.uniform(-4.0, 4.0, size=(n, 1))
    else:
        z *= rng.permutation(np.logspace(-4.0, 4.0, d))
    z[rng.random((n, d)) < 0.1] = 0.0
    return z


def rank_gradients(rng, n: int, d: int) -> np.ndarray:
    """Unit-scale gradients (coordinates within 0.1 .. 10) with exact zeros: coordinate 0 is zero
    in the first half (d > 1), 20% of the entries are zero, gradient 3 is all zero. With n < d
    every estimate is rank-deficient, for any d the early ones are."""
    z = rng.standard_normal((n, d)) * (rng.permutation(np.logspace(-1.0, 1.0, d)) if d > 1 else 1.0)
    z[rng.random((n, d)) < 0.2] = 0.0
    if d > 1:
        z[: n // 2, 0] = 0.0
    z[3] = 0.0
    return z


def eps_for(family: str, structure: str, form: str, d: int) -> float:
    """eps by the error model of the module docstring."""
    if family == "rank":
        return 1e-8 if form == "inv_sqrt" else 1e-4
    if structure == "diag" or d == 1:
        return 1e-8
    return 1e4 if form == "inv_sqrt" else 1.0


def steps_for(d: int) -> int:
    return 30 if d >= 60 else 40


# ============================================================================================
# 1. SGD


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("lr_kind", ["const", "isqrt"])
def test_sgd_matches_numpy(helpers, d, lr_kind):
    rng = np.random.default_rng(d * 7 + len(lr_kind))
    lr_lib, lr_ref = lr_pair(lr_kind)
    opt = ss.SGD(lr_lib)
    assert opt.dim is None and opt.steps == 0
    x = rng.standard_normal(d) * 1e3
    gs = ill_gradients(rng, 25, d)
    for t, g in enumerate(gs):
        prev = x.copy()
        with helpers.unchanged(g):
            opt.step(x, g)
        want = prev - lr_ref(t) * g
        # one multiply and one subtract per entry (perhaps fused): within 1 ulp of each operand
        bound = U * (np.abs(prev) + lr_ref(t) * np.abs(g))
        assert np.all(np.abs(x - want) <= bound), t
        assert np.array_equal(x[g == 0], prev[g == 0])
        assert opt.lr(t) == pytest.approx(lr_ref(t), rel=4 * U)
    assert (opt.dim, opt.steps, opt.moves) == (d, len(gs), len(gs))


def test_sgd_accepts_integer_and_float32_gradients():
    opt = ss.SGD(0.5, dim=3)
    x = np.zeros(3)
    opt.step(x, [1, -2, 4])
    assert np.array_equal(x, [-0.5, 1.0, -2.0])
    g32 = np.array([0.1, 0.2, 0.3], dtype=np.float32)
    y = np.zeros(3)
    opt.step(y, g32)
    # the float32 values, exactly, at lr_1 = 0.5
    assert np.array_equal(y, -0.5 * g32.astype(np.float64))


# ============================================================================================
# 2. RMSProp against the numpy reference


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("family", ["ill", "rank"])
@pytest.mark.parametrize("beta_kind", ["const", "sched"])
def test_rmsprop_matches_numpy(helpers, d, structure, form, family, beta_kind):
    rng = np.random.default_rng([d, STRUCTURES.index(structure), FORMS.index(form), len(family), len(beta_kind)])
    lr_lib, lr_ref = lr_pair("isqrt" if beta_kind == "sched" else "const")
    beta_lib, beta_ref = beta_pair(beta_kind)
    eps = eps_for(family, structure, form, d)
    blocks = blocks_for(d) if structure == "block" else None
    opt = ss.RMSProp(d, lr_lib, beta=beta_lib, eps=eps, structure=structure, form=form,
                     block_sizes=blocks)
    ref = RefRMSProp(d, lr_ref, beta_ref, eps, structure, form, blocks=blocks)
    gs = rng_gradients = (ill_gradients if family == "ill" else rank_gradients)(rng, steps_for(d), d)
    for t, g in enumerate(rng_gradients):
        with helpers.unchanged(g):
            got = lib_step(opt, g, d)
        assert_step_close(got, ref.step(g), TOL, f"step {t}")
        assert (opt.steps, opt.moves, opt.updates) == (t + 1, t + 1, t + 1)
    # the estimate, in its documented layout: full (d, d), diag (d,), blocks row-major
    est = opt.estimate()
    want = ref.estimate()
    assert est.shape == want.shape
    scale = np.abs(want).max()
    np.testing.assert_allclose(est, want, rtol=0, atol=64 * U * len(gs) * scale)
    if structure == "full":
        assert np.array_equal(est, est.T)
    # the premise of the schedule variant: beta_t did vary (floor first, then rising)
    if beta_kind == "sched":
        assert ref.betas_used[0] == 0.3 and ref.betas_used[-1] > 0.45
    del gs


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("case", ["offdiag_zero", "rank_one_equal", "rank_one_skewed", "huge_ratio",
                                  "rotating", "negative_corr"])
def test_rmsprop_closed_form_2x2(case, form):
    """d = 2, structure full, refresh_every 1 takes the closed-form (Jacobi rotation) path: the
    special cases of the rotation against eigh."""
    seqs = {
        "offdiag_zero": [[1.0, 0.0], [0.0, 3.0], [2.0, 0.0]],       # b = 0 throughout
        "rank_one_equal": [[1.0, 1.0], [2.0, 2.0], [-3.0, -3.0]],  # a = c, tau = 0, rank 1
        "rank_one_skewed": [[1e-3, 5.0], [-2e-3, -10.0]],          # rank 1, eigenvector ~ e2
        "huge_ratio": [[1e4, 1e-4], [-1e4, 2e-4], [1e4, 0.0]],
        "rotating": [[np.cos(a), np.sin(a)] for a in np.linspace(0, 3, 12)],
        "negative_corr": [[1.0, -1.0], [1.0, -1.0 + 1e-6], [2.0, -2.0]],
    }
    gs = np.array(seqs[case])
    eps = 1e-8 if form == "inv_sqrt" else 1e-4
    if case == "huge_ratio":  # lambda_max ~ 1e8: eps 1e-4 below the top (module docstring)
        eps = 1e4 if form == "inv_sqrt" else 1.0
    opt = ss.RMSProp(2, 0.1, beta=0.75, eps=eps, form=form)
    ref = RefRMSProp(2, lambda t: 0.1, lambda t: 0.75, eps, "full", form)
    for t, g in enumerate(gs):
        assert_step_close(lib_step(opt, g, 2), ref.step(g), TOL, f"{case} step {t}")
    np.testing.assert_allclose(opt.estimate(), ref.G, rtol=0, atol=16 * U * np.abs(ref.G).max())


@pytest.mark.parametrize("structure", STRUCTURES)
def test_rmsprop_beta_zero_uses_only_the_last_gradient(structure):
    # beta = 0: G_t = g_t g_t^T, so (inv_sqrt, eps -> 0) A g = g / |g| on the full structure and
    # sign(g) on the diagonal; with eps = 1e-8 and |g| ~ 1 exact to ~1e-8 (a closed form, not
    # the reference class)
    d = 7
    rng = np.random.default_rng(3)
    beta_lib, _ = beta_pair("zero")
    blocks = blocks_for(d) if structure == "block" else None
    opt = ss.RMSProp(d, 1.0, beta=beta_lib, eps=1e-12, structure=structure, block_sizes=blocks)
    for _ in range(5):
        g = rng.standard_normal(d)
        got = lib_step(opt, g, d)
        if structure == "diag":
            want = np.sign(g)
        elif structure == "full":
            want = g / np.linalg.norm(g)
        else:
            want = np.concatenate([c / np.linalg.norm(c) for c in np.split(g, np.cumsum(blocks)[:-1])])
        np.testing.assert_allclose(got, want, rtol=1e-5)


# ============================================================================================
# 3. burn-in


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("d", [1, 2, 7])
def test_rmsprop_burn_in(helpers, structure, d):
    W = 4
    rng = np.random.default_rng(100 + d)
    lr_lib, lr_ref = lr_pair("isqrt")
    beta_lib, beta_ref = beta_pair("sched")
    blocks = blocks_for(d) if structure == "block" else None
    eps = 1e-3
    opt = ss.RMSProp(d, lr_lib, beta=beta_lib, eps=eps, structure=structure, burn_in=W,
                     block_sizes=blocks)
    ref = RefRMSProp(d, lr_ref, beta_ref, eps, structure, burn_in=W, blocks=blocks)
    gs = rng.standard_normal((W + 12, d)) * 3.0
    x = rng.standard_normal(d)
    for t, g in enumerate(gs):
        assert opt.burn_in_remaining == max(0, W - t)
        if t < W:
            # x exactly unchanged, the estimate updated
            with helpers.unchanged(x):
                opt.step(x, g)
            assert ref.step(g) is None
            assert opt.moves == 0 and opt.steps == t + 1 and opt.updates == t + 1
            np.testing.assert_allclose(opt.estimate(), ref.estimate(), rtol=1e-13, atol=0)
        else:
            assert_step_close(lib_step(opt, g, d), ref.step(g), TOL, f"step {t}")
            assert opt.moves == t + 1 - W and opt.updates == t + 1
    # the premise: the counters differ (beta counts all updates, lr only moves) and it matters
    assert beta_ref(W) != beta_ref(0) and lr_ref(0) != lr_ref(W)


def test_rmsprop_burn_in_counts_lr_from_the_first_move_and_beta_from_the_first_update():
    # d = 1 with a constant gradient makes both counters visible in closed form: after n updates
    # G = 1 - prod beta_t, and the k-th move has lr_k.
    W = 3
    eta0 = 0.3
    lr_lib, lr_ref = lr_pair("isqrt")
    beta_lib, beta_ref = beta_pair("sched")
    opt = ss.RMSProp(1, lr_lib, beta=beta_lib, eps=1e-12, structure="diag", burn_in=W)
    prod = 1.0
    for n in range(1, W + 6):
        prod *= beta_ref(n - 1)
        s = lib_step(opt, [1.0], 1)
        if n <= W:
            assert s[0] == 0.0
            continue
        k = n - W - 1
        want = eta0 / math.sqrt(k + 1) / math.sqrt(1.0 - prod + 1e-12)
        assert s[0] == pytest.approx(want, rel=1e-13), n


# ============================================================================================
# 4. refresh_every (eigh): the factorisation is reused for k updates


@pytest.mark.parametrize(("structure", "d"), [("full", 2), ("full", 7), ("block", 7), ("full", 60)])
@pytest.mark.parametrize("k", [2, 5])
@pytest.mark.parametrize("burn_in", [0, 3])
def test_rmsprop_refresh_every(structure, d, k, burn_in):
    """ema_estimator refactors when a direction is needed and the estimate has had k or more
    updates since the last factorisation: with one update per step, at the first move and then
    every k moves; in between A is f of the estimate of the last refresh (stale)."""
    rng = np.random.default_rng(200 + d + 10 * k + burn_in)
    lr_lib, lr_ref = lr_pair("isqrt")
    beta_lib, beta_ref = beta_pair("sched")
    eps = 1e-3
    blocks = blocks_for(d) if structure == "block" else None
    opt = ss.RMSProp(d, lr_lib, beta=beta_lib, eps=eps, structure=structure, burn_in=burn_in,
                     refresh_every=k, block_sizes=blocks)
    ref = RefRMSProp(d, lr_ref, beta_ref, eps, structure, burn_in=burn_in, refresh_every=k, blocks=blocks)
    fresh = RefRMSProp(d, lr_ref, beta_ref, eps, structure, burn_in=burn_in, blocks=blocks)
    n = 4 * k + burn_in + 3
    stale_steps = 0
    for t, g in enumerate(rng.standard_normal((n, d))):
        got = lib_step(opt, g, d)
        want = ref.step(g)
        exact = fresh.step(g)
        assert_step_close(got, want, TOL, f"step {t}")
        if want is not None and ref.factored_at != ref.updates:
            # a stale step: the exact direction is clearly different (the test can tell)
            assert np.linalg.norm(exact - want) > 1e-3 * np.linalg.norm(want)
            stale_steps += 1
    assert stale_steps >= 3 * (k - 1)


@pytest.mark.parametrize("structure", ["full", "block"])
def test_adam_refresh_every(structure):
    d, k = 7, 3
    rng = np.random.default_rng(250)
    blocks = blocks_for(d) if structure == "block" else None
    opt = ss.Adam(d, 0.01, beta1=0.8, beta2=0.95, eps=1e-3, structure=structure, form="inv_sqrt",
                  refresh_every=k, block_sizes=blocks)
    ref = RefAdam(d, lambda t: 0.01, 0.8, lambda t: 0.95, 1e-3, structure, "inv_sqrt",
                  refresh_every=k, blocks=blocks)
    for t, g in enumerate(rng.standard_normal((12, d))):
        assert_step_close(lib_step(opt, g, d), ref.step(g), TOL, f"step {t}")


# ============================================================================================
# 5. the lowrank solver


@pytest.mark.parametrize("burn_in", [0, 5])
def test_rmsprop_lowrank_matches_the_exact_direction(burn_in):
    d, n, k = 40, 120, 8
    rng = np.random.default_rng(300 + burn_in)
    lr_lib, lr_ref = lr_pair("isqrt")
    beta_lib, beta_ref = beta_pair("sched")
    eps = 1e-6
    opt = ss.RMSProp(d, lr_lib, beta=beta_lib, eps=eps, solver="lowrank", refresh_every=k,
                     burn_in=burn_in)
    ref = RefRMSProp(d, lr_ref, beta_ref, eps, "full", burn_in=burn_in)
    # scales 0.1 .. 10 across coordinates, and a few exact zeros
    gs = rng.standard_normal((n, d)) * rng.permutation(np.logspace(-1, 1, d))
    gs[rng.random((n, d)) < 0.05] = 0.0
    worst = 0.0
    for t, g in enumerate(gs):
        got = lib_step(opt, g, d)
        want = ref.step(g)
        assert_step_close(got, want, 1e-8, f"step {t}")
        if want is not None:
            worst = max(worst, float(np.linalg.norm(got - want) / np.linalg.norm(want)))
    assert opt.updates == n
    # the estimate itself is kept exactly as with eigh
    np.testing.assert_allclose(opt.estimate(), ref.G, rtol=0, atol=64 * U * n * np.abs(ref.G).max())
    assert worst > 0.0  # not trivially the same code path bit for bit


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"structure": "diag"}, "solver 'lowrank' needs structure 'full', got 'diag'"),
    ({"structure": "block", "block_sizes": [2, 3]}, "needs structure 'full', got 'block'"),
    ({"form": "adam"}, "solver 'lowrank' computes the inv_sqrt form only, got form 'adam'"),
    ({"tol": 0.0}, "tol must be in (0, 1), got 0"),
    ({"tol": 1.0}, "tol must be in (0, 1), got 1"),
])
def test_rmsprop_lowrank_rejects(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ss.RMSProp(5, 0.1, solver="lowrank", **kwargs)


# ============================================================================================
# 6. Adam


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("family", ["ill", "rank"])
def test_adam_matches_numpy(helpers, d, structure, form, family):
    rng = np.random.default_rng([400, d, STRUCTURES.index(structure), FORMS.index(form), len(family)])
    # beta2 from a schedule: 1 - prod beta2_t is not 1 - beta2^t
    lr_lib, lr_ref = lr_pair("isqrt")
    beta_lib, beta_ref = beta_pair("sched")
    eps = eps_for(family, structure, form, d)
    blocks = blocks_for(d) if structure == "block" else None
    opt = ss.Adam(d, lr_lib, beta1=0.85, beta2=beta_lib, eps=eps, structure=structure, form=form,
                  block_sizes=blocks)
    ref = RefAdam(d, lr_ref, 0.85, beta_ref, eps, structure, form, blocks=blocks)
    gs = (ill_gradients if family == "ill" else rank_gradients)(rng, steps_for(d), d)
    for t, g in enumerate(gs):
        with helpers.unchanged(g):
            got = lib_step(opt, g, d)
        assert_step_close(got, ref.step(g), TOL, f"step {t}")
    assert (opt.steps, opt.moves) == (len(gs), len(gs))


def test_adam_bias_corrections_in_closed_form():
    # d = 1, constant gradient c: m_t = (1 - beta1^t) c and G_t = (1 - prod beta2) c^2 exactly
    # corrected, so every step is lr_t c / (|c| + eps) (adam form) whatever the betas.
    c, eps = -3.0, 1e-3
    opt = ss.Adam(1, 0.1, beta1=0.9, beta2=beta_pair("sched")[0], eps=eps, structure="diag")
    for _ in range(20):
        s = lib_step(opt, [c], 1)
        assert s[0] == pytest.approx(0.1 * c / (abs(c) + eps), rel=1e-13)


def test_adam_bias_correction_is_not_the_constant_beta_power():
    # The premise of test_adam_matches_numpy: with the scheduled beta2 a reference that divided
    # by 1 - beta2_0^t instead of 1 - prod beta2_t would be far off.
    _, beta_ref = beta_pair("sched")
    t = 20
    prod = np.prod([beta_ref(i) for i in range(t)])
    assert abs((1 - prod) - (1 - beta_ref(0) ** t)) > 1e-4


# ============================================================================================
# 7. PreconditionedSGD


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("shape", ["matrix", "diagonal", "fortran", "float32"])
def test_preconditioned_sgd_with_a_callable(d, shape):
    rng = np.random.default_rng(500 + d)
    M = rng.standard_normal((d, d))  # not symmetric: a transposed product would show
    seen: list[np.ndarray] = []

    def A(x):
        seen.append(x.copy())
        assert x.dtype == np.float64 and x.shape == (d,)
        if shape == "diagonal":
            return 1.0 + x**2
        B = M + np.diag(np.tanh(x))
        if shape == "fortran":
            return np.asfortranarray(B)
        if shape == "float32":
            return B.astype(np.float32)
        return B

    def A_ref(x):
        if shape == "diagonal":
            return np.diag(1.0 + x**2)
        B = M + np.diag(np.tanh(x))
        return B.astype(np.float32).astype(np.float64) if shape == "float32" else B

    lr_lib, lr_ref = lr_pair("isqrt")
    opt = ss.PreconditionedSGD(lr_lib, A)
    x = rng.standard_normal(d)
    for t in range(6):
        g = rng.standard_normal(d) * 10.0 ** rng.uniform(-4, 4)
        prev = x.copy()
        opt.step(x, g)
        assert np.array_equal(seen[-1], prev)  # A is evaluated at x_t
        Ag = A_ref(prev) @ g
        want = prev - lr_ref(t) * Ag
        # the library sums the product row by row: d u |A| |g| per entry
        bound = 2 * d * U * (np.abs(prev) + lr_ref(t) * (np.abs(A_ref(prev)) @ np.abs(g)))
        assert np.all(np.abs(x - want) <= bound), t
    assert len(seen) == 6 and opt.dim == d


@pytest.mark.parametrize("bad", ["shape", "nan", "string", "int"])
def test_preconditioned_sgd_callable_bad_result_leaves_x_unchanged(helpers, bad):
    d = 3
    out = {"shape": np.ones((d, d + 1)), "nan": np.full(d, np.nan), "string": "no",
           "int": np.ones(d, dtype=np.int64)}[bad]
    opt = ss.PreconditionedSGD(0.1, lambda x: out, dim=d)
    x = np.arange(d, dtype=np.float64)
    before = opt.state_dict()
    with helpers.unchanged(x):
        with pytest.raises((ValueError, ss.NumericalError)):
            opt.step(x, np.ones(d))
    assert_same_state(before, opt.state_dict())


@pytest.mark.parametrize("d", [1, 2, 7, 60])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("cov", ["full", "diag_rank_deficient"])
def test_preconditioned_sgd_idealized(d, form, cov):
    rng = np.random.default_rng(600 + d)
    H = helpers_sym(rng, d)
    if cov == "full":
        Q = np.linalg.qr(rng.standard_normal((d, d)))[0]
        S = (Q * np.logspace(-2, 2, d)) @ Q.T
        S = (S + S.T) / 2
        eps = 1e-8 if form == "inv_sqrt" else 1e-4
    else:
        S = np.where(np.arange(d) % 3 == 0, 0.0, np.logspace(-1, 1, d))  # zeros on the diagonal
        eps = 1e-3 if form == "inv_sqrt" else 1e-2
    prob = problems.NoisyQuadratic(H, S)
    lr_lib, lr_ref = lr_pair("isqrt")
    opt = ss.PreconditionedSGD(lr_lib, prob, eps=eps, form=form)
    assert opt.dim == d
    x = rng.standard_normal(d)
    Sm = S if S.ndim == 2 else np.diag(S)
    for t in range(5):
        g = rng.standard_normal(d)
        prev = x.copy()
        opt.step(x, g)
        Hx = H @ prev
        A = f_sym(np.outer(Hx, Hx) + Sm, eps, form)  # E[g g^T](x) = Hx (Hx)^T + Sigma
        want = lr_ref(t) * (A @ g)
        # prev - x carries the rounding of x itself: 2 u |x| on top
        err = float(np.linalg.norm((prev - x) - want))
        assert err <= TOL * np.linalg.norm(want) + 4 * U * np.linalg.norm(prev), f"step {t}"


def helpers_sym(rng, d):
    B = rng.standard_normal((d, d))
    return (B + B.T) / 2


def test_preconditioned_sgd_idealized_rejects():
    with pytest.raises(ValueError, match=re.escape("does not know E[g g^T]")):
        ss.PreconditionedSGD(0.1, problems.Oracle(lambda x, r: x, 2))
    prob = problems.NoisyQuadratic(np.eye(2), [1.0, 1.0])
    with pytest.raises(ValueError, match="eps must be a finite number >= 0, got -1"):
        ss.PreconditionedSGD(0.1, prob, eps=-1.0)
    with pytest.raises(ValueError, match="form must be one of"):
        ss.PreconditionedSGD(0.1, prob, form="sqrt")
    with pytest.raises(ValueError, match="dim = 3 does not match the problem's dim 2"):
        ss.PreconditionedSGD(0.1, prob, dim=3)
    with pytest.raises(ValueError, match="preconditioner must be a callable"):
        ss.PreconditionedSGD(0.1, np.eye(2))
