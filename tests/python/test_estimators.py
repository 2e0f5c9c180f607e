"""saddlescape's streaming second-moment estimators against a plain float64 numpy EMA.

The reference is the textbook loop G <- beta_t G + (1 - beta_t) g g^T over float64 copies of the
gradients the library saw (for float32 estimators: the float32-rounded gradients, so that the
reference answers the question the library was asked), projected onto the diagonal or the
diagonal blocks. Preconditioners are compared with ``saddlescape.inv_sqrt`` on the library's own
``estimate()`` and, independently, with numpy's ``eigh`` of the reference EMA.

Error model behind the tolerances (u = machine epsilon of the estimator's dtype):

* Each entry of the EMA is its own scalar recurrence, in the library (BLAS syr on G = s * S, with
  the decay folded into the scale s) as in numpy. Every step rounds each entry by a few u of
  A_ij = EMA(|g_i g_j|), the EMA of the magnitudes (the sum the rounding errors scale with, which
  also covers entries that cancel to ~0), and older errors decay like the estimate itself; in
  float32 the library also rounds beta and 1 - beta to float32, which perturbs the weights by
  O(u) per step. So after n steps the error is at most about 8 u min(n, 1 / (1 - beta)) A_ij;
  a rank-k batch adds the k-term sums of syrk, 8 u k A_ij. Entries whose exact value falls into
  the subnormal range may be flushed to zero: an absolute 4 * tiny on top (``ema_tol``).
* A preconditioner f(G) computed from an estimate that is off by delta (in the Frobenius norm)
  is off by at most max |f'| ||delta||_F (Daleckii-Krein; f is convex and decreasing, so max |f'|
  is at lambda_min), relative to ||f(G)||_F >= f(lambda_min): the sensitivity
  s = |f'(lambda_min)| / f(lambda_min) (1 / (2 (lambda_min + eps)) for inv_sqrt). On top comes
  the eigensolver's own rounding, 4 u (2 s lambda_max + 2 d), the bound the matrix-function
  tests use (``precond_tol``).
* Monte Carlo checks state their standard errors and use 5 of them.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import saddlescape as ss
from support import blocks_for
from saddlescape import schedules

FLOATS = [np.float32, np.float64]
STRUCTURES = ["full", "diag", "block"]


# --------------------------------------------------------------------------------------------
# references and helpers


def make(d, structure="full", dtype=np.float64, **kw) -> ss.EMAEstimator:
    sizes = blocks_for(d) if structure == "block" else None
    return ss.EMAEstimator(d, structure=structure, block_sizes=sizes, dtype=dtype, **kw)


def ema_reference(gs, betas) -> tuple[np.ndarray, np.ndarray]:
    """The plain float64 EMA of g g^T, and the same EMA of |g g^T| (the rounding-error scale)."""
    gs = np.asarray(gs, dtype=np.float64)
    d = gs.shape[1]
    both = np.zeros((2, d, d))
    for g, b in zip(gs, betas):
        gg = np.outer(g, g)
        both = b * both + (1.0 - b) * np.stack([gg, np.abs(gg)])
    return both[0], both[1]


def project(m: np.ndarray, structure: str, d: int) -> list[np.ndarray]:
    """A full d x d matrix in the layout of estimate(), as a list of arrays."""
    if structure == "full":
        return [m]
    if structure == "diag":
        return [np.diag(m).copy()]
    out, at = [], 0
    for b in blocks_for(d):
        out.append(m[at : at + b, at : at + b])
        at += b
    return out


def as_list(x) -> list[np.ndarray]:
    return list(x) if isinstance(x, list) else [x]


def ema_tol(dtype, n: int, beta_max: float, k: int = 1) -> float:
    """Relative (to EMA(|g g^T|)) entrywise bound of the module docstring."""
    u = float(np.finfo(dtype).eps)
    n_eff = n if beta_max >= 1.0 else min(n, 1.0 / (1.0 - beta_max))
    return 8.0 * u * (n_eff + k + 2)


def correction_tol(dtype, t: int, beta_product: float) -> float:
    """Relative error of dividing by 1 - prod beta: the product carries t roundings (the
    reference's beta**t one), and 1 - P amplifies P's error by P / (1 - P)."""
    u = float(np.finfo(dtype).eps)
    return 2.0 * (t + 2) * float(np.finfo(np.float64).eps) * beta_product / (1.0 - beta_product) + 4.0 * u


def assert_matches_reference(est, ref_g, ref_a, tol, dtype) -> None:
    """Entrywise |estimate - G_ref| <= tol * A_ref + 4 tiny, in estimate()'s layout."""
    got = as_list(est.estimate())
    want = project(ref_g, est.structure, est.dim)
    scale = project(ref_a, est.structure, est.dim)
    assert len(got) == len(want)
    tiny = float(np.finfo(dtype).tiny)
    for i, (g, w, a) in enumerate(zip(got, want, scale)):
        assert g.dtype == dtype and g.shape == w.shape
        assert np.isfinite(g).all(), f"block {i}: non-finite estimate"
        err = np.abs(g.astype(np.float64) - w)
        bound = tol * a + 4.0 * tiny
        worst = float(np.max(err / bound))
        assert worst <= 1.0, f"block {i}: error {worst:.3g} x the bound (tol {tol:.3g})"


def gradients(rng, n: int, d: int, spread: float = 1e3) -> np.ndarray:
    """n gradients whose coordinates differ in scale by up to `spread`, with a random overall scale."""
    scales = np.logspace(0.0, -np.log10(spread), d) if d > 1 else np.ones(1)
    scales = rng.permutation(scales) * 10.0 ** rng.uniform(-2.0, 2.0)
    return rng.standard_normal((n, d)) * scales


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert np.asarray(a[key]).dtype == np.asarray(b[key]).dtype, key
        assert np.array_equal(a[key], b[key]), key


def f_ref(lam: np.ndarray, eps: float, form: str) -> np.ndarray:
    lam = np.maximum(lam, 0.0)
    return 1.0 / np.sqrt(lam + eps) if form == "inv_sqrt" else 1.0 / (np.sqrt(lam) + eps)


def sensitivity(lam_min: float, eps: float, form: str) -> float:
    """|f'(lambda_min)| / f(lambda_min) (module docstring)."""
    lam_min = max(lam_min, 0.0)
    if form == "inv_sqrt":
        return 1.0 / (2.0 * (lam_min + eps))
    return 1.0 / (2.0 * np.sqrt(lam_min) * (np.sqrt(lam_min) + eps))


def eigh_reference(g: np.ndarray, eps: float, form: str) -> np.ndarray:
    """f(G) = V f(Lambda) V^T from numpy's eigh (LAPACK syevd through numpy's own build)."""
    lam, v = np.linalg.eigh(g)
    return (v * f_ref(lam, eps, form)) @ v.T


def precond_tol(g: np.ndarray, eps: float, form: str, dtype, delta_f: float) -> float:
    """Relative Frobenius bound for f(G + delta) against f(G), ||delta||_F <= delta_f.

    For the adam form of a numerically singular G (eigenvalues within d u lambda_max of 0, which
    the library treats as rounding noise) f is not Lipschitz at 0: a rounding-sized eigenvalue
    delta moves 1 / (sqrt(delta) + eps) away from 1 / eps by a relative sqrt(delta) / eps, so
    that term replaces the sensitivity there (the bound the matrix-function tests use).
    """
    u = float(np.finfo(dtype).eps)
    d = g.shape[0]
    lam = np.linalg.eigvalsh(g)
    lam_max = max(lam[-1], 0.0)
    noise = d * u * lam_max
    extra = 0.0
    if form == "adam" and lam[0] <= noise:
        extra = 4.0 * np.sqrt(noise) / eps
        lam = lam[lam > noise]
        if lam.size == 0:
            return extra + 8.0 * u * d
    s = sensitivity(lam[0], eps, form)
    return extra + 4.0 * u * (2.0 * s * lam_max + 2.0 * d) + 2.0 * s * delta_f


def rel_err(a, ref) -> float:
    a = np.asarray(a, dtype=np.float64)
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))


def scale_resets(history: list[float]) -> int:
    """Renormalisations seen in a sequence of state_dict()['scale'] values (s jumps back up)."""
    return sum(1 for a, b in zip(history, history[1:]) if b > a)


# --------------------------------------------------------------------------------------------
# the EMA itself


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("d", [1, 2, 7])
@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 0.999])
def test_matches_numpy_ema(helpers, structure, dtype, d, beta):
    rng = np.random.default_rng(1000 * d + int(beta * 1000))
    gs = gradients(rng, 60, d).astype(dtype)
    est = make(d, structure, dtype, beta=beta)
    for t, g in enumerate(gs):
        with helpers.unchanged(g):
            est.update(g)
        assert est.steps == t + 1
    ref_g, ref_a = ema_reference(gs, [beta] * len(gs))
    assert_matches_reference(est, ref_g, ref_a, ema_tol(dtype, len(gs), beta), dtype)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_estimate_layout_and_zero_start(structure, dtype):
    d = 7
    est = make(d, structure, dtype)
    assert (est.dim, est.structure, est.steps, est.dtype) == (d, structure, 0, np.dtype(dtype))
    assert est.block_sizes == {"full": [d], "diag": [], "block": blocks_for(d)}[structure]
    e = est.estimate()
    if structure == "block":
        assert isinstance(e, list) and [b.shape for b in e] == [(b, b) for b in blocks_for(d)]
    else:
        assert e.shape == ((d, d) if structure == "full" else (d,))
    for b in as_list(e):
        assert b.dtype == dtype and not b.any()
    # Symmetric to the last bit after updates (one stored triangle, mirrored).
    rng = np.random.default_rng(3)
    for g in gradients(rng, 5, d):
        est.update(g)
    for b in as_list(est.estimate()):
        if b.ndim == 2:
            assert np.array_equal(b, b.T)
    # estimate() hands out a copy: writing to it does not touch the estimator.
    before = est.state_dict()
    for b in as_list(est.estimate()):
        b[...] = -1.0
    assert_same_state(before, est.state_dict())


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bias_correction", [False, True])
def test_beta_zero_keeps_exactly_the_last_outer_product(structure, dtype, bias_correction):
    d = 6
    rng = np.random.default_rng(5)
    gs = gradients(rng, 9, d).astype(dtype)
    est = make(d, structure, dtype, beta=0.0, bias_correction=bias_correction)
    for g in gs:
        est.update(g)
        # g_i g_j is one rounding in either implementation; nothing else may touch it.
        want = project(np.outer(g, g), structure, d)
        for got, w in zip(as_list(est.estimate()), want):
            assert np.array_equal(got, w)
    est.update_batch(gs[:4])
    for got, w in zip(as_list(est.estimate()), project(np.outer(gs[3], gs[3]), structure, d)):
        assert np.array_equal(got, w)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_d1(structure, dtype):
    est = make(1, structure, dtype, beta=0.75)
    vals = np.array([3.0, -0.5, 1e-3, 40.0], dtype=dtype)
    ref = 0.0
    for v in vals:
        est.update([v])
        ref = 0.75 * ref + 0.25 * float(v) ** 2
    got = float(np.ravel(as_list(est.estimate())[0])[0])
    assert abs(got - ref) <= ema_tol(dtype, 4, 0.75) * ref
    p = float(np.ravel(as_list(est.preconditioner(0.0))[0])[0])
    assert abs(p - 1.0 / np.sqrt(ref)) <= 16 * float(np.finfo(dtype).eps) / np.sqrt(ref)
    a = est.apply(np.array([2.0], dtype=dtype), 0.5, "adam")
    assert a.shape == (1,) and a.dtype == dtype
    assert abs(float(a[0]) - 2.0 / (np.sqrt(ref) + 0.5)) <= 16 * float(np.finfo(dtype).eps)


# --------------------------------------------------------------------------------------------
# update_batch


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("k", [1, 5, 64])
@pytest.mark.parametrize("beta", [0.5, 0.9, "schedule"])
def test_update_batch_equals_sequential(helpers, structure, dtype, k, beta):
    d = 7
    b = schedules.beta_from_lr_schedule(schedules.inverse_sqrt(0.3), 1.0, 0.2) if beta == "schedule" else beta
    rng = np.random.default_rng(17 + k)
    gs = gradients(rng, 3 * k + 2, d).astype(dtype)
    batched = make(d, structure, dtype, beta=b)
    sequential = make(d, structure, dtype, beta=b)
    # Batches of k rows, with single updates in between so batches start at odd steps; for
    # beta = 0.5 and k = 64 one batch decays by 2^-64, far past the renormalisation threshold.
    chunks = [gs[:1], gs[1 : k + 1], gs[k + 1 : k + 2], gs[k + 2 :]]
    for c in chunks:
        with helpers.unchanged(c):
            if len(c) == 1:
                batched.update(c[0])
            else:
                batched.update_batch(c)
        for g in c:
            sequential.update(g)
        assert batched.steps == sequential.steps
    betas = [batched.beta(t) for t in range(len(gs))]
    if beta == "schedule":
        np.testing.assert_allclose(betas, [sequential.beta(t) for t in range(len(gs))], rtol=0)
    ref_g, ref_a = ema_reference(gs, betas)
    tol = ema_tol(dtype, len(gs), max(betas), k)
    assert_matches_reference(batched, ref_g, ref_a, tol, dtype)
    assert_matches_reference(sequential, ref_g, ref_a, tol, dtype)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_update_batch_empty_and_bias(structure):
    d = 4
    est = make(d, structure, beta=0.9, bias_correction=True)
    est.update_batch(np.zeros((0, d)))
    assert est.steps == 0
    for b in as_list(est.estimate()):
        assert not b.any()
    rng = np.random.default_rng(8)
    gs = gradients(rng, 12, d)
    est.update_batch(gs)
    assert est.steps == 12
    ref_g, ref_a = ema_reference(gs, [0.9] * 12)
    c = 1.0 - 0.9**12
    tol = ema_tol(np.float64, 12, 0.9, 12) + correction_tol(np.float64, 12, 0.9**12)
    assert_matches_reference(est, ref_g / c, ref_a / c, tol, np.float64)


# --------------------------------------------------------------------------------------------
# unfriendly scales and long runs: the scaled storage G = scale * S and its renormalisation


SCALES = {
    np.float64: {"tiny": 1e-150, "huge": 1e150},
    np.float32: {"tiny": 1e-15, "huge": 1e15},
}


def scaled_gradients(rng, n, d, kind, dtype) -> np.ndarray:
    s = SCALES[dtype]
    if kind == "mixed":
        col = np.array([s["tiny"], 1.0, s["huge"]])
        col = np.resize(col, d)
    else:
        col = np.full(d, s[kind])
    return (rng.standard_normal((n, d)) * col).astype(dtype)


@pytest.mark.parametrize("kind", ["tiny", "mixed", "huge"])
@pytest.mark.parametrize(("dtype", "beta", "n"), [
    (np.float64, 0.5, 5000),
    # s = 0.999^t reaches sqrt(u) = 1.5e-8 every 18,000 updates; 40,000 cross it twice.
    (np.float64, 0.999, 40000),
    (np.float32, 0.5, 5000),
    # in float32 the threshold is sqrt(u) = 3.5e-4: every 8,000 updates.
    (np.float32, 0.999, 20000),
])
@pytest.mark.parametrize("structure", ["full", "block"])
def test_long_run_with_ill_scaled_gradients(kind, dtype, beta, n, structure):
    d = 4
    rng = np.random.default_rng(["tiny", "mixed", "huge"].index(kind) * 10 + int(beta * 1000))
    gs = scaled_gradients(rng, n, d, kind, dtype)
    est = make(d, structure, dtype, beta=beta)
    check_every = 1 if beta == 0.5 else 250
    scales = []
    for t, g in enumerate(gs):
        est.update(g)
        if t % check_every == 0:
            scales.append(float(est.state_dict()["scale"]))
    # The premise of the test: the scale was renormalised more than once.
    assert scale_resets(scales) >= 2
    ref_g, ref_a = ema_reference(gs, [beta] * n)
    assert np.isfinite(ref_g).all()
    assert_matches_reference(est, ref_g, ref_a, ema_tol(dtype, n, beta), dtype)
    data = est.state_dict()["data"]
    assert np.isfinite(data).all()
    tiny = np.finfo(dtype).tiny
    assert not ((data != 0) & (np.abs(data) < tiny)).any(), "subnormal values in the state"


@pytest.mark.parametrize("structure", ["full", "block"])
@pytest.mark.parametrize(("dtype", "beta"), [(np.float64, 0.5), (np.float64, 0.9), (np.float32, 0.5)])
def test_tiny_gradients_decaying_through_the_subnormal_range(structure, dtype, beta):
    # Tiny gradients, then zero gradients: the exact EMA decays past the smallest normal number.
    # The stored state must flush rather than keep subnormals, and still match numpy to within
    # the flushed amounts.
    d = 5
    rng = np.random.default_rng(21)
    tiny_scale = SCALES[dtype]["tiny"]
    gs = (rng.standard_normal((300, d)) * tiny_scale).astype(dtype)
    zeros = np.zeros((int(np.log(1e-30) / np.log(beta)) + 200, d), dtype=dtype)
    all_gs = np.concatenate([gs, zeros])
    est = make(d, structure, dtype, beta=beta)
    tiny = np.finfo(dtype).tiny
    saw_subnormal_reference = False
    ref = np.zeros((d, d))
    for t, g in enumerate(all_gs):
        est.update(g)
        ref = beta * ref + (1.0 - beta) * np.outer(g.astype(np.float64), g.astype(np.float64))
        data = est.state_dict()["data"]
        assert not ((data != 0) & (np.abs(data) < tiny)).any(), f"subnormal in the state at step {t}"
        saw_subnormal_reference |= bool(((ref != 0) & (np.abs(ref) < tiny)).any())
    assert saw_subnormal_reference  # the premise: the exact EMA did pass through subnormals
    ref_g, ref_a = ema_reference(all_gs, [beta] * len(all_gs))
    assert_matches_reference(est, ref_g, ref_a, ema_tol(dtype, len(all_gs), beta), dtype)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("beta", [0.5, 0.999])
def test_diag_long_run_ill_scaled(dtype, beta):
    d = 6
    rng = np.random.default_rng(31)
    gs = scaled_gradients(rng, 5000, d, "mixed", dtype)
    est = make(d, "diag", dtype, beta=beta)
    for g in gs:
        est.update(g)
    ref_g, ref_a = ema_reference(gs, [beta] * len(gs))
    assert_matches_reference(est, ref_g, ref_a, ema_tol(dtype, len(gs), beta), dtype)


@pytest.mark.parametrize("structure", ["full", "block"])
def test_long_batched_run_matches_numpy(structure):
    # 5000 updates with beta = 0.5 in batches of 50: each batch decays by 2^-50 < sqrt(u).
    d = 5
    rng = np.random.default_rng(41)
    gs = scaled_gradients(rng, 5000, d, "tiny", np.float64) * 1e140  # ~1e-10, moderate
    est = make(d, structure, beta=0.5)
    for c in np.split(gs, 100):
        est.update_batch(c)
    ref_g, ref_a = ema_reference(gs, [0.5] * len(gs))
    assert_matches_reference(est, ref_g, ref_a, ema_tol(np.float64, len(gs), 0.5, 50), np.float64)


# --------------------------------------------------------------------------------------------
# schedules and bias correction


def numpy_betas(n: int, eta0: float, C: float, floor: float) -> np.ndarray:
    """beta_t = clip(1 - C eta_t^(2/3), floor, largest double below 1), eta_t = eta0 / sqrt(t + 1)."""
    eta = eta0 / np.sqrt(np.arange(n, dtype=np.float64) + 1.0)
    beta = 1.0 - C * eta ** (2.0 / 3.0)
    return np.clip(beta, floor, np.nextafter(1.0, 0.0))


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bias_correction", [False, True])
def test_scheduled_beta_matches_numpy_loop(structure, dtype, bias_correction):
    d, n = 5, 400
    # eta_0 = 2 gives 1 - C eta^(2/3) < 0 for the first steps (clipped to the floor 0.1), then
    # beta_t grows towards 1.
    eta0, C, floor = 2.0, 1.0, 0.1
    betas = numpy_betas(n, eta0, C, floor)
    assert betas[0] == floor and betas[-1] > 0.75
    sched = schedules.beta_from_lr_schedule(schedules.inverse_sqrt(eta0), C=C, floor=floor)
    rng = np.random.default_rng(51)
    gs = gradients(rng, n, d).astype(dtype)
    est = make(d, structure, dtype, beta=sched, bias_correction=bias_correction)
    for g in gs:
        est.update(g)
    ref_g, ref_a = ema_reference(gs, betas)
    tol = ema_tol(dtype, n, betas.max())
    if bias_correction:
        c = 1.0 - np.prod(betas)
        ref_g, ref_a = ref_g / c, ref_a / c
        tol += correction_tol(dtype, n, np.prod(betas))
    assert_matches_reference(est, ref_g, ref_a, tol, dtype)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_bias_correction_scheduled_beta_divides_by_the_product(structure, dtype):
    # Over these 10 steps beta_t rises from 0.86 to 0.93: prod_t beta_t is far from 0 (so the
    # correction matters) and far from beta_0^t (so only the product is right).
    d, n = 4, 10
    betas = numpy_betas(n, 0.05, 1.0, 0.0)
    sched = schedules.beta_from_lr_schedule(schedules.inverse_sqrt(0.05))
    rng = np.random.default_rng(55)
    gs = gradients(rng, n, d).astype(dtype)
    est = make(d, structure, dtype, beta=sched, bias_correction=True)
    for t in range(1, n + 1):
        est.update(gs[t - 1])
        p = float(np.prod(betas[:t]))
        if t >= 3:
            assert abs(p - betas[0] ** t) > 0.01 * p  # the premise
        ref_g, ref_a = ema_reference(gs[:t], betas[:t])
        tol = ema_tol(dtype, t, betas[:t].max()) + correction_tol(dtype, t, p)
        assert_matches_reference(est, ref_g / (1 - p), ref_a / (1 - p), tol, dtype)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("beta", [0.5, 0.9, 0.999])
def test_bias_correction_constant_beta(structure, dtype, beta):
    d = 4
    rng = np.random.default_rng(61)
    gs = gradients(rng, 30, d).astype(dtype)
    plain = make(d, structure, dtype, beta=beta)
    corrected = make(d, structure, dtype, beta=beta, bias_correction=True)
    for t, g in enumerate(gs, start=1):
        plain.update(g)
        corrected.update(g)
        ref_g, ref_a = ema_reference(gs[:t], [beta] * t)
        c = 1.0 - beta**t
        tol = ema_tol(dtype, t, beta) + correction_tol(dtype, t, beta**t)
        assert_matches_reference(corrected, ref_g / c, ref_a / c, tol, dtype)
        assert_matches_reference(plain, ref_g, ref_a, ema_tol(dtype, t, beta), dtype)
    # After one step a corrected EMA of a constant gradient is exactly its outer product (up to
    # rounding), whatever beta: the point of the correction.
    one = make(d, structure, dtype, beta=beta, bias_correction=True)
    one.update(gs[0])
    g64 = gs[0].astype(np.float64)
    for got, w in zip(as_list(one.estimate()), project(np.outer(g64, g64), structure, d)):
        np.testing.assert_allclose(got, w, rtol=8 * float(np.finfo(dtype).eps), atol=0)


@pytest.mark.parametrize("structure", ["full", "block", "diag"])
def test_bias_corrected_preconditioner_uses_the_corrected_estimate(helpers, structure):
    d = 6
    rng = np.random.default_rng(71)
    est = make(d, structure, beta=0.99, bias_correction=True)
    for g in gradients(rng, 3, d):
        est.update(g)
    eps = 1e-3
    # 3 updates with beta = 0.99: the plain estimate is about 3% of the corrected one, so a
    # preconditioner of the uncorrected estimate would be off by far more than the tolerance.
    p = as_list(est.preconditioner(eps))
    for got, e in zip(p, as_list(est.estimate())):
        if structure == "diag":
            np.testing.assert_allclose(got, ss.diag_inv_sqrt(e, eps), rtol=4 * helpers.EPS64, atol=0)
        else:
            tol = precond_tol(e, eps, "inv_sqrt", np.float64, 0.0)
            assert rel_err(got, ss.inv_sqrt(e, eps)) <= tol
            assert rel_err(got, eigh_reference(e, eps, "inv_sqrt")) <= tol


# --------------------------------------------------------------------------------------------
# preconditioner and apply


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize(("d", "n", "form"), [
    (1, 3, "inv_sqrt"), (1, 3, "adam"),
    (9, 4, "inv_sqrt"), (9, 4, "adam"),
    (9, 40, "inv_sqrt"), (9, 40, "adam"),
    (300, 20, "inv_sqrt"),
])
def test_preconditioner_and_apply_match_matrix_functions(helpers, structure, dtype, d, n, form):
    # n < d: a rank-deficient estimate (fewer samples than dimensions), so eps > 0 is needed.
    rng = np.random.default_rng(d * 100 + n)
    gs = gradients(rng, n, d, spread=10.0).astype(dtype)
    beta = 0.9
    est = make(d, structure, dtype, beta=beta)
    for g in gs:
        est.update(g)
    ref_g, ref_a = ema_reference(gs, [beta] * n)
    lam_max = np.linalg.eigvalsh(ref_g)[-1]
    # eps relative to the estimate's scale (the adam form adds it to G^(1/2)); float32 gets
    # more damping so that the condition number stays within its precision.
    rel = 1e-3 if dtype == np.float64 else 1e-1
    eps = float(rel * lam_max if form == "inv_sqrt" else rel * np.sqrt(lam_max))
    # The adam form of a rank-deficient estimate is compared with the library's own matrix
    # function only: sqrt is not Lipschitz at 0, so rounding-sized null-space eigenvalues delta
    # move 1 / (sqrt(delta) + eps) by a relative sqrt(delta) / eps, which the matrix-function
    # tests cover.
    independent = not (form == "adam" and n < d)
    u = float(np.finfo(dtype).eps)

    p = as_list(est.preconditioner(eps, form))
    v = rng.standard_normal(d).astype(dtype)
    with helpers.unchanged(v):
        av = est.apply(v, eps, form)
    assert av.shape == (d,) and av.dtype == dtype
    e = as_list(est.estimate())
    want_g = project(ref_g, structure, d)
    want_a = project(ref_a, structure, d)
    formed = np.empty(d)  # the formed preconditioner times v, in float64
    at = 0
    for pb, eb, gb, ab in zip(p, e, want_g, want_a):
        assert pb.dtype == dtype and pb.shape == eb.shape and np.isfinite(pb).all()
        e64 = eb.astype(np.float64)
        if structure == "diag":
            # elementwise: the library's diagonal function on the estimate, and f of the reference
            np.testing.assert_allclose(pb, ss.diag_inv_sqrt(eb, eps, form), rtol=4 * u, atol=0)
            delta = ema_tol(dtype, n, beta) * ab + u * np.abs(gb)
            s = np.array([sensitivity(x, eps, form) for x in gb])
            err = np.abs(pb - f_ref(gb, eps, form)) / f_ref(gb, eps, form)
            assert np.all(err <= 4 * u + 2 * s * delta)
            formed[:] = pb.astype(np.float64) * v
            break
        b = eb.shape[0]
        assert np.array_equal(pb, pb.T)
        # (1) saddlescape.inv_sqrt on the library's estimate: the same question, the same precision
        same = ss.inv_sqrt(eb, eps, form)
        assert rel_err(pb, same.astype(np.float64)) <= precond_tol(e64, eps, form, dtype, 0.0)
        # (2) numpy's eigh of the numpy EMA: independent of the library
        if independent:
            delta_f = ema_tol(dtype, n, beta) * np.linalg.norm(ab) + u * np.linalg.norm(gb)
            tol = precond_tol(gb, eps, form, dtype, delta_f)
            assert rel_err(pb, eigh_reference(gb, eps, form)) <= tol
        formed[at : at + b] = pb.astype(np.float64) @ v[at : at + b].astype(np.float64)
        at += b
    # apply computes A v = V (f(Lambda) (V^T v)) without forming A: it differs from the formed
    # A times v by the rounding of two length-b products through V and the reconstruction of A,
    # at most about 4 u b ||A||_2 |v| each.
    norm_a = max(float(np.abs(x).max()) if x.ndim == 1 else float(np.linalg.norm(x)) for x in p)
    bmax = max(x.shape[0] for x in p) if structure != "diag" else 1
    assert np.linalg.norm(av - formed) <= 16 * u * bmax * norm_a * np.linalg.norm(v)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_preconditioner_singular_without_eps(structure, dtype):
    d = 5
    est = make(d, structure, dtype)
    # Before any update the estimate is zero: no inverse root without damping ...
    with pytest.raises(ss.NumericalError):
        est.preconditioner(0.0)
    with pytest.raises(ss.NumericalError):
        est.apply(np.ones(d), 0.0)
    # ... and with damping the preconditioner of G = 0 is eps^(-1/2) I (inv_sqrt) or 1/eps I (adam).
    for got in as_list(est.preconditioner(0.25)):
        want = 2.0 * (np.ones_like(got) if got.ndim == 1 else np.eye(got.shape[0]))
        np.testing.assert_allclose(got, want, rtol=4 * float(np.finfo(dtype).eps))
    np.testing.assert_allclose(est.apply(np.ones(d), 0.25, "adam"), 4.0 * np.ones(d), rtol=8 * float(np.finfo(dtype).eps))
    if structure != "diag":
        # one sample in d = 5 dimensions: rank one, singular
        est.update(np.arange(1.0, d + 1.0))
        with pytest.raises(ss.NumericalError, match="singular"):
            est.preconditioner(0.0)


@pytest.mark.parametrize(("eps", "form", "message"), [
    (-1e-3, "inv_sqrt", "got -0.001"),
    (float("nan"), "inv_sqrt", "nan"),
    (1e-3, "sqrt", "'sqrt'"),
])
def test_preconditioner_bad_arguments(eps, form, message):
    est = make(3)
    est.update([1.0, 2.0, 3.0])
    before = est.state_dict()
    with pytest.raises(ValueError, match=re.escape(message)):
        est.preconditioner(eps, form)
    with pytest.raises(ValueError, match=re.escape(message)):
        est.apply(np.ones(3), eps, form)
    assert_same_state(before, est.state_dict())


@pytest.mark.parametrize(("v", "message"), [
    (np.ones(4), "v must have shape (3,), got shape (4,)"),
    (np.ones((3, 1)), "v must have shape (3,), got shape (3, 1)"),
    (np.array([1.0, np.nan, 0.0]), "v[1] = nan"),
    (np.array([1.0, 0.0, -np.inf]), "v[2] = -inf"),
])
def test_apply_bad_v(v, message):
    est = make(3)
    est.update([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=re.escape(message)):
        est.apply(v, 1e-3)


# --------------------------------------------------------------------------------------------
# refresh_every: the decomposition is reused for k updates


@pytest.mark.parametrize("structure", ["full", "block"])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("k", [2, 3])
def test_refresh_every_reuses_the_decomposition(structure, dtype, k):
    d = 6
    eps = 1e-2
    rng = np.random.default_rng(81 + k)
    gs = gradients(rng, 40, d, spread=3.0).astype(dtype)
    v = rng.standard_normal(d).astype(dtype)
    est = make(d, structure, dtype, beta=0.8, refresh_every=k)

    def fresh() -> ss.EMAEstimator:
        # an estimator with the current state and no cached factorisation
        f = make(d, structure, dtype, beta=0.8)
        f.load_state_dict(est.state_dict())
        return f

    for g in gs[:5]:
        est.update(g)
    old_p = as_list(est.preconditioner(eps))  # factors at step 5
    old_apply = est.apply(v, eps)
    for j in range(1, k):
        est.update(gs[4 + j])
        # j < k updates later: still the OLD estimate's preconditioner, for any eps and form
        for got, want in zip(as_list(est.preconditioner(eps)), old_p):
            assert np.array_equal(got, want)
        assert np.array_equal(est.apply(v, eps), old_apply)
        stale = as_list(fresh().preconditioner(eps))
        assert any(not np.array_equal(a, b) for a, b in zip(stale, old_p))
    est.update(gs[4 + k])
    # k updates later: the new estimate's preconditioner
    new_p = as_list(est.preconditioner(eps))
    for got, want in zip(new_p, as_list(fresh().preconditioner(eps))):
        assert np.array_equal(got, want)
    assert np.array_equal(est.apply(v, eps), fresh().apply(v, eps))
    assert any(not np.array_equal(a, b) for a, b in zip(new_p, old_p))
    # The cached factorisation serves other eps and forms too (it is of G, not of G + eps I).
    for got, want in zip(as_list(est.preconditioner(0.5, "adam")), as_list(fresh().preconditioner(0.5, "adam"))):
        assert np.array_equal(got, want)


def test_refresh_every_loading_a_state_drops_the_cached_factorisation():
    d = 5
    rng = np.random.default_rng(91)
    a = make(d, beta=0.9, refresh_every=1000)
    b = make(d, beta=0.9)
    for g in gradients(rng, 8, d):
        a.update(g)
    for g in gradients(rng, 8, d):
        b.update(g)
    a.preconditioner(1e-3)  # cached
    a.load_state_dict(b.state_dict())
    assert np.array_equal(a.preconditioner(1e-3), b.preconditioner(1e-3))


def test_refresh_every_one_is_always_current():
    d = 4
    rng = np.random.default_rng(92)
    est = make(d, beta=0.7)
    for g in gradients(rng, 6, d):
        est.update(g)
        np.testing.assert_allclose(est.preconditioner(1e-2), ss.inv_sqrt(est.estimate(), 1e-2), rtol=1e-12)


# --------------------------------------------------------------------------------------------
# state_dict / load_state_dict


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("beta", [0.5, "schedule"])
@pytest.mark.parametrize("bias_correction", [False, True])
def test_state_round_trip_continues_bit_identically(structure, dtype, beta, bias_correction):
    d = 7

    def beta_arg():
        if beta == "schedule":
            return schedules.beta_from_lr_schedule(schedules.inverse_sqrt(0.5), C=1.0, floor=0.05)
        return beta

    rng = np.random.default_rng(101)
    # 60 steps of beta = 0.5 renormalise twice before the save; the continuation again.
    gs = gradients(rng, 120, d).astype(dtype)
    a = make(d, structure, dtype, beta=beta_arg(), bias_correction=bias_correction)
    for g in gs[:60]:
        a.update(g)
    state = a.state_dict()
    assert set(state) == {"version", "structure", "dim", "block_sizes", "bias_correction", "steps",
                          "scale", "beta_product", "data", "factored_at"}
    assert all(isinstance(v, np.ndarray) for v in state.values())
    assert int(state["version"]) == 1 and str(state["structure"]) == structure
    assert int(state["dim"]) == d and int(state["steps"]) == 60
    assert state["data"].dtype == dtype and state["data"].ndim == 1
    b = make(d, structure, dtype, beta=beta_arg(), bias_correction=bias_correction)
    b.load_state_dict(state)
    assert b.steps == 60
    assert_same_state(a.state_dict(), b.state_dict())
    for x, y in zip(as_list(a.estimate()), as_list(b.estimate())):
        assert np.array_equal(x, y)
    # the state dict is a copy: changing it afterwards does not reach either estimator
    state["data"][...] = 0.0
    for g in gs[60:90]:
        a.update(g)
        b.update(g)
    a.update_batch(gs[90:])
    b.update_batch(gs[90:])
    assert_same_state(a.state_dict(), b.state_dict())
    for x, y in zip(as_list(a.estimate()), as_list(b.estimate())):
        assert np.array_equal(x, y)
    for x, y in zip(as_list(a.preconditioner(1e-3)), as_list(b.preconditioner(1e-3))):
        assert np.array_equal(x, y)


def _garble(key, value):
    def f(state):
        state = dict(state)
        if value is KeyError:
            del state[key]
        elif callable(value):
            state[key] = value(state[key])
        else:
            state[key] = value
        return state
    return f


GARBLED = [
    ("wrong version", _garble("version", np.array(2)), "version must be 1, got"),
    ("other structure", _garble("structure", np.array("diag")), "state structure is 'diag'"),
    ("other dim", _garble("dim", np.array(8)), "state dim is 8, this estimator has 7"),
    ("other blocks", _garble("block_sizes", np.array([3, 4])), "state block_sizes is [3, 4]"),
    ("other bias correction", _garble("bias_correction", np.array(True)), "state bias_correction is True"),
    ("other dtype", _garble("data", lambda x: x.astype(np.float32)), "dtype float32"),
    ("NaN data", _garble("data", lambda x: np.where(np.arange(x.size) == 3, np.nan, x)), "nan"),
    ("Inf data", _garble("data", lambda x: np.where(np.arange(x.size) == 0, np.inf, x)), "inf"),
    ("short data", _garble("data", lambda x: x[:-1]), "got 48"),
    ("2-D data", _garble("data", lambda x: x.reshape(7, 7)), "1-D, got shape (7, 7)"),
    ("missing data", _garble("data", KeyError), "missing ['data']"),
    ("missing version", _garble("version", KeyError), "missing ['version']"),
    ("zero scale", _garble("scale", np.array(0.0)), "scale must be in (0, 1], got 0"),
    ("scale above 1", _garble("scale", np.array(2.0)), "scale must be in (0, 1], got 2"),
    ("NaN scale", _garble("scale", np.array(np.nan)), "got nan"),
    ("NaN beta_product", _garble("beta_product", np.array(np.nan)), "beta_product must be in [0, 1], got nan"),
    ("beta_product above 1", _garble("beta_product", np.array(1.5)), "got 1.5"),
    ("negative steps", _garble("steps", np.array(-4)), "steps must be >= 0, got -4"),
]


@pytest.mark.parametrize(("why", "garble", "message"), GARBLED, ids=[g[0] for g in GARBLED])
def test_load_state_dict_rejects_a_garbled_state(why, garble, message):
    d = 7
    rng = np.random.default_rng(111)
    src = make(d, beta=0.9)
    for g in gradients(rng, 10, d):
        src.update(g)
    dst = make(d, beta=0.9)
    for g in gradients(rng, 3, d):
        dst.update(g)
    dst.preconditioner(1e-3)
    before = dst.state_dict()
    before_p = dst.preconditioner(1e-3)
    with pytest.raises(ValueError, match=re.escape(message)):
        dst.load_state_dict(garble(src.state_dict()))
    assert_same_state(before, dst.state_dict())
    assert dst.steps == 3
    assert np.array_equal(dst.preconditioner(1e-3), before_p)


def test_load_state_dict_across_dtypes_and_structures_is_rejected():
    d = 6
    a = make(d, "diag", np.float32)
    a.update(np.ones(d))
    for other in [make(d, "diag", np.float64), make(d, "full", np.float32), make(d, "block", np.float32)]:
        before = other.state_dict()
        with pytest.raises(ValueError, match="state"):
            other.load_state_dict(a.state_dict())
        assert_same_state(before, other.state_dict())


# --------------------------------------------------------------------------------------------
# bad input leaves the estimate exactly as it was


def _trained(structure, dtype, d=5):
    est = make(d, structure, dtype, beta=0.9)
    rng = np.random.default_rng(121)
    for g in gradients(rng, 7, d):
        est.update(g)
    return est


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize(("g", "message"), [
    (np.array([1.0, 2.0, np.nan, 4.0, 5.0]), "g has a non-finite entry g[2] = nan"),
    (np.array([np.inf, 2.0, 3.0, 4.0, 5.0]), "g[0] = inf"),
    (np.array([1.0, 2.0, 3.0, 4.0, -np.inf]), "g[4] = -inf"),
    (np.ones(4), "g must have shape (5,), got shape (4,)"),
    (np.ones(6), "got shape (6,)"),
    (np.ones((5, 1)), "got shape (5, 1)"),
    (np.ones((1, 5)), "got shape (1, 5)"),
    (np.float64(1.0), "got shape ()"),
    (np.ones(5, dtype=complex), "real-valued"),
    (np.ones(5, dtype=bool), "real-valued"),
])
def test_bad_gradient_leaves_the_estimate_unchanged(helpers, structure, dtype, g, message):
    est = _trained(structure, dtype)
    before = est.state_dict()
    with helpers.unchanged(np.atleast_1d(g)), pytest.raises(ValueError, match=re.escape(message)):
        est.update(g)
    assert_same_state(before, est.state_dict())
    assert est.steps == 7
    # still usable, and the failed call did not count as a step
    est.update(np.ones(5))
    assert est.steps == 8


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize(("row", "col", "bad"), [(3, 1, np.nan), (0, 4, np.inf), (6, 0, -np.inf)])
def test_update_batch_with_one_bad_row_leaves_the_estimate_unchanged(helpers, structure, dtype, row, col, bad):
    est = _trained(structure, dtype)
    rng = np.random.default_rng(131)
    gs = gradients(rng, 7, 5).astype(dtype)
    gs[row, col] = bad
    before = est.state_dict()
    with helpers.unchanged(gs), pytest.raises(ValueError, match=re.escape(f"gs[{row}, {col}] = {bad}")):
        est.update_batch(gs)
    assert_same_state(before, est.state_dict())
    assert est.steps == 7


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize(("gs", "message"), [
    (np.ones((3, 4)), "gs must have shape (k, 5), got shape (3, 4)"),
    (np.ones(5), "got shape (5,)"),
    (np.ones((2, 5, 1)), "got shape (2, 5, 1)"),
    (np.ones((2, 5), dtype=complex), "real-valued"),
])
def test_update_batch_bad_shape(structure, gs, message):
    est = _trained(structure, np.float64)
    before = est.state_dict()
    with pytest.raises(ValueError, match=re.escape(message)):
        est.update_batch(gs)
    assert_same_state(before, est.state_dict())


@pytest.mark.parametrize("structure", STRUCTURES)
def test_beta_schedule_out_of_range_at_an_update(structure):
    # inverse_sqrt(1.5) used directly as beta: beta_0 = 1.5 is outside [0, 1)
    est = make(4, structure, beta=schedules.inverse_sqrt(1.5))
    before = est.state_dict()
    with pytest.raises(ValueError, match=re.escape("beta_0 = 1.5")):
        est.update(np.ones(4))
    with pytest.raises(ValueError, match=re.escape("beta_0 = 1.5")):
        est.update_batch(np.ones((3, 4)))
    assert_same_state(before, est.state_dict())
    # a step size that is not > 0 cannot define beta: rejected when the schedule is built
    with pytest.raises(ValueError, match=re.escape("lr must be finite and > 0, got -0.1")):
        schedules.beta_from_lr_schedule(schedules.constant(-0.1))


# --------------------------------------------------------------------------------------------
# constructor errors name the value


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"dim": 0}, "dim must be >= 1, got 0"),
    ({"dim": -3}, "got -3"),
    ({"dim": 2.0}, "dim must be an integer, got 2.0"),
    ({"dim": 4, "beta": 1.0}, "beta must be in [0, 1), got 1.0"),
    ({"dim": 4, "beta": 1}, "got 1"),
    ({"dim": 4, "beta": -0.1}, "got -0.1"),
    ({"dim": 4, "beta": 1.5}, "got 1.5"),
    ({"dim": 4, "beta": float("nan")}, "nan"),
    ({"dim": 4, "beta": float("inf")}, "inf"),
    ({"dim": 4, "beta": "0.9x"}, "0.9x"),
    ({"dim": 4, "beta": schedules.constant(1.0)}, "got 1"),
    ({"dim": 4, "structure": "block", "block_sizes": [1, 2]}, "block_sizes must sum to dim = 4, they sum to 3"),
    ({"dim": 4, "structure": "block", "block_sizes": [2, 3]}, "they sum to 5"),
    ({"dim": 4, "structure": "block", "block_sizes": [4, 0]}, "block_sizes[1] = 0"),
    ({"dim": 4, "structure": "block", "block_sizes": [5, -1]}, "block_sizes[1] = -1"),
    ({"dim": 4, "structure": "block"}, "needs block_sizes"),
    ({"dim": 4, "structure": "block", "block_sizes": [2.0, 2.0]}, "got 2.0"),
    ({"dim": 4, "structure": "full", "block_sizes": [2, 2]}, "only for structure 'block'"),
    ({"dim": 4, "structure": "dense"}, "'dense'"),
    ({"dim": 4, "dtype": np.int32}, "int32"),
    ({"dim": 4, "dtype": np.float16}, "float16"),
    ({"dim": 4, "refresh_every": 0}, "refresh_every must be >= 1, got 0"),
])
def test_constructor_errors(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ss.EMAEstimator(**kwargs)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"dim": 0, "beta": 0.9}, "got 0"),
    ({"dim": 3, "beta": 1.0}, "got 1.0"),
    ({"dim": 3, "beta": 0.9, "structure": "block", "block_sizes": [2]}, "they sum to 2"),
])
def test_covariance_constructor_errors(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ss.CovarianceEstimator(**kwargs)


# --------------------------------------------------------------------------------------------
# CovarianceEstimator


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("d", [1, 7])
def test_covariance_matches_numpy(helpers, structure, dtype, d):
    rng = np.random.default_rng(141 + d)
    g1 = gradients(rng, 50, d).astype(dtype)
    g2 = (g1 + gradients(rng, 50, d)).astype(dtype)
    sizes = blocks_for(d) if structure == "block" else None
    est = ss.CovarianceEstimator(d, beta=0.95, structure=structure, block_sizes=sizes, dtype=dtype)
    for a, b in zip(g1, g2):
        with helpers.unchanged(a, b):
            est.update_pair(a, b)
    assert est.steps == 50
    # (g1 - g2)(g1 - g2)^T / 2 is the outer product of (g1 - g2) / sqrt(2); the library forms
    # the difference in the estimator's dtype, one more rounding of u per entry.
    diff = (g1.astype(np.float64) - g2.astype(np.float64)) / np.sqrt(2.0)
    ref_g, ref_a = ema_reference(diff, [0.95] * 50)
    assert_matches_reference(est, ref_g, ref_a, ema_tol(dtype, 50, 0.95) + 8 * float(np.finfo(dtype).eps), dtype)
    # The estimator view behaves as an EMAEstimator (state, preconditioner).
    est2 = ss.CovarianceEstimator(d, beta=0.95, structure=structure, block_sizes=sizes, dtype=dtype)
    est2.load_state_dict(est.state_dict())
    est.update_pair(g1[0], g2[0])
    est2.update_pair(g1[0], g2[0])
    assert_same_state(est.state_dict(), est2.state_dict())


@pytest.mark.parametrize("dtype", FLOATS)
def test_covariance_is_unbiased_where_the_plain_ema_is_not(dtype):
    # g = mu + L z, Cov(g) = Sigma = L L^T. A bias-corrected EMA is a weighted mean with weights
    # w_t summing to 1, so E[estimate] = Sigma for the covariance variant and Sigma + mu mu^T for
    # the plain EMA of g g^T. For Gaussian x ~ N(0, Sigma), Var(x_i x_j) = S_ii S_jj + S_ij^2, so an
    # entry's standard error is sqrt(sum w_t^2 (S_ii S_jj + S_ij^2)) (the covariance variant's
    # (g1 - g2) / sqrt(2) is exactly N(0, Sigma)); allowed: 5 standard errors per entry.
    d, n, beta = 3, 20000, 0.999
    rng = np.random.default_rng(151)
    mu = np.array([2.0, -1.0, 3.0])
    L = np.array([[1.0, 0.0, 0.0], [0.5, 0.8, 0.0], [-0.3, 0.2, 0.4]])
    sigma = L @ L.T
    cov = ss.CovarianceEstimator(d, beta=beta, bias_correction=True, dtype=dtype)
    plain = ss.EMAEstimator(d, beta=beta, bias_correction=True, dtype=dtype)
    z = rng.standard_normal((n, 2, d))
    g = mu + z @ L.T
    for g1, g2 in g:
        cov.update_pair(g1, g2)
        plain.update(g1)
    w = (1 - beta) * beta ** np.arange(n - 1, -1, -1.0) / (1 - beta**n)
    var = np.outer(np.diag(sigma), np.diag(sigma)) + sigma**2
    se = np.sqrt(np.sum(w**2) * var)
    est_cov = cov.estimate().astype(np.float64)
    est_plain = plain.estimate().astype(np.float64)
    assert np.all(np.abs(est_cov - sigma) <= 5 * se)
    # The plain EMA is centred on Sigma + mu mu^T, far outside the covariance's band. (Its own
    # noise is larger: x_i x_j with a non-zero mean has variance
    # S_ii S_jj + S_ij^2 + mu_i^2 S_jj + mu_j^2 S_ii + 2 mu_i mu_j S_ij.)
    var_plain = var + np.outer(mu**2, np.diag(sigma)) + np.outer(np.diag(sigma), mu**2) + 2 * np.outer(mu, mu) * sigma
    se_plain = np.sqrt(np.sum(w**2) * var_plain)
    assert np.all(np.abs(est_plain - (sigma + np.outer(mu, mu))) <= 5 * se_plain)
    assert np.all(np.abs(est_plain - sigma) > 5 * se_plain)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize(("which", "message"), [("g1", "g1[1] = nan"), ("g2", "g2[1] = nan")])
def test_covariance_bad_input_leaves_the_estimate_unchanged(structure, which, message):
    d = 4
    sizes = blocks_for(d) if structure == "block" else None
    est = ss.CovarianceEstimator(d, beta=0.9, structure=structure, block_sizes=sizes)
    est.update_pair(np.arange(4.0), np.ones(4))
    before = est.state_dict()
    bad = np.array([1.0, np.nan, 0.0, 2.0])
    args = (bad, np.ones(d)) if which == "g1" else (np.ones(d), bad)
    with pytest.raises(ValueError, match=re.escape(message)):
        est.update_pair(*args)
    short = (np.ones(3), np.ones(d)) if which == "g1" else (np.ones(d), np.ones(3))
    with pytest.raises(ValueError, match=re.escape(f"{which} must have shape (4,), got shape (3,)")):
        est.update_pair(*short)
    assert_same_state(before, est.state_dict())
    assert est.steps == 1


# --------------------------------------------------------------------------------------------
# burn_in


class RecordingOracle:
    """g = A x + noise; records a copy of every x it sees and checks it cannot write to x."""

    def __init__(self, d: int):
        self.a = np.random.default_rng(0).standard_normal((d, d))
        self.seen: list[np.ndarray] = []
        self.ids: set[int] = set()

    def __call__(self, x, rng):
        assert isinstance(rng, np.random.Generator)
        assert isinstance(x, np.ndarray) and x.dtype == np.float64
        self.seen.append(x.copy())
        self.ids.add(id(x))
        with pytest.raises(ValueError, match="read-only"):
            x[0] = 123.0
        with pytest.raises(ValueError, match="read-only"):
            x += 1.0
        return self.a @ x + rng.standard_normal(x.shape)


@pytest.mark.parametrize("kind", ["ema", "covariance"])
def test_burn_in_keeps_x0_and_is_reproducible(helpers, kind):
    d, steps = 4, 25
    x0 = np.array([0.5, -1.0, 2.0, 0.25])

    def new():
        if kind == "ema":
            return ss.EMAEstimator(d, beta=0.9)
        return ss.CovarianceEstimator(d, beta=0.9)

    oracle = RecordingOracle(d)
    est = new()
    with helpers.unchanged(x0):
        ss.burn_in(est, oracle, x0, steps, seed=7)
    calls = steps if kind == "ema" else 2 * steps
    assert len(oracle.seen) == calls and est.steps == steps
    for x in oracle.seen:
        assert np.array_equal(x, x0)
    assert all(not np.shares_memory(x0, x) for x in oracle.seen)

    # same seed, same estimate; an equal Generator, the same; the manual loop, the same
    again = new()
    ss.burn_in(again, RecordingOracle(d), x0, steps, seed=7)
    assert_same_state(est.state_dict(), again.state_dict())
    gen = new()
    ss.burn_in(gen, RecordingOracle(d), x0, steps, seed=np.random.default_rng(7))
    assert_same_state(est.state_dict(), gen.state_dict())
    manual = new()
    rng = np.random.default_rng(7)
    o = RecordingOracle(d)
    x = x0.copy()
    x.setflags(write=False)
    for _ in range(steps):
        if kind == "ema":
            manual.update(o(x, rng))
        else:
            manual.update_pair(o(x, rng), o(x, rng))
    assert_same_state(est.state_dict(), manual.state_dict())
    # another seed, another estimate
    other = new()
    ss.burn_in(other, RecordingOracle(d), x0, steps, seed=8)
    assert not np.array_equal(other.estimate(), est.estimate())


def test_burn_in_with_list_x0_and_zero_steps():
    est = ss.EMAEstimator(2, beta=0.5)
    seen = []

    def oracle(x, rng):
        seen.append(x.copy())
        return x * 2.0

    ss.burn_in(est, oracle, [1, 2], 0)
    assert est.steps == 0 and not seen
    ss.burn_in(est, oracle, [1, 2], 3)
    assert est.steps == 3 and all(np.array_equal(x, [1.0, 2.0]) for x in seen)
    np.testing.assert_allclose(est.estimate(), (1 - 0.5**3) * np.outer([2.0, 4.0], [2.0, 4.0]), rtol=1e-15)


@pytest.mark.parametrize(("steps", "seed", "message"), [
    (-1, 0, "steps must be >= 0, got -1"),
    (2.5, 0, "steps must be an integer, got 2.5"),
    (3, 1.5, "seed must be an integer, got 1.5"),
])
def test_burn_in_bad_arguments(steps, seed, message):
    est = ss.EMAEstimator(2, beta=0.5)
    with pytest.raises(ValueError, match=re.escape(message)):
        ss.burn_in(est, lambda x, rng: x, np.zeros(2), steps, seed=seed)
    assert est.steps == 0


def test_burn_in_rejects_a_bad_sample():
    est = ss.EMAEstimator(3, beta=0.5)
    calls = []

    def oracle(x, rng):
        calls.append(1)
        return np.array([1.0, np.nan, 0.0]) if len(calls) == 3 else np.ones(3)

    with pytest.raises(ValueError, match=re.escape("g[1] = nan")):
        ss.burn_in(est, oracle, np.zeros(3), 5)
    assert est.steps == 2  # the samples before the bad one were applied


def test_fallback_policy_of_the_factorisations():
    # Injected eigensolver failures (the test hook): the previous factorisation is kept, a
    # retry with fallback_eps is counted, and the limit raises naming the block.
    rng = np.random.default_rng(77)
    est = ss.EMAEstimator(5, structure="block", block_sizes=[2, 3], beta=0.9,
                          max_consecutive_failures=2, fallback_eps=1e-2)
    ref = ss.EMAEstimator(5, structure="block", block_sizes=[2, 3], beta=0.9)
    g = rng.standard_normal(5)
    est.update(g), ref.update(g)
    first = est.preconditioner(eps=1e-3)
    est._inject_factor_failures(1, attempts=1, stages=3)  # every retry fails: kept
    g = rng.standard_normal(5)
    est.update(g), ref.update(g)
    kept, now = est.preconditioner(eps=1e-3), ref.preconditioner(eps=1e-3)
    np.testing.assert_array_equal(kept[1], first[1])
    np.testing.assert_array_equal(kept[0], now[0])
    assert est.fallback_statistics()["kept_bases"] == [0, 1]
    est._inject_factor_failures(0, attempts=1, stages=2)  # the fallback_eps retry works
    est.update(g)
    est.preconditioner(eps=1e-3)
    st = est.fallback_statistics()
    assert st["eps_retries"] == [1, 0] and st["consecutive_failures"] == [0, 0]
    est._inject_factor_failures(1, attempts=9, stages=3)
    est.update(g)
    est.preconditioner(eps=1e-3)  # kept (1 in a row)
    est.update(g)
    with pytest.raises(ss.NumericalError, match="block 1 of the estimate failed 2 times in a row"):
        est.preconditioner(eps=1e-3)
    with pytest.raises(ValueError, match="max_consecutive_failures must be >= 1, got 0"):
        ss.EMAEstimator(3, max_consecutive_failures=0)


def _inv_sqrt_f64(G, eps):
    w, V = np.linalg.eigh(np.asarray(G, dtype=np.float64))
    w = np.where(np.abs(w) <= G.shape[0] * np.finfo(np.float32).eps * np.abs(w).max(), 0.0, w)
    return (V / np.sqrt(w + eps)) @ V.T


def test_float32_factorisation_is_retried_in_float64():
    # A rank-deficient (5 samples, d = 40) float32 block: its float32-rounded S has null-space
    # eigenvalues of order -1e-7 * max, which a float64 solver resolves. They must be clipped at
    # float32's tolerance (not called clearly negative at float64's), and the retry's roots
    # agree with a float64 reference of the same estimate.
    rng = np.random.default_rng(15)
    sizes = [3, 40, 1]
    est = ss.EMAEstimator(44, structure="block", block_sizes=sizes, beta=0.9,
                          dtype=np.float32, fallback_eps=1e-2)
    scales = np.logspace(0, -6, 44)  # ill-conditioned blocks
    for _ in range(5):
        est.update((rng.standard_normal(44) * scales).astype(np.float32))
    eps = 1e-6
    est._inject_factor_failures(1, attempts=1, stages=1)
    roots = est.preconditioner(eps=eps)
    st = est.fallback_statistics()
    assert st["failed_refreshes"] == [0, 1, 0]
    assert st["float64_retries"] == [0, 1, 0] and st["eps_retries"] == [0, 0, 0]
    assert st["kept_bases"] == [0, 0, 0]
    for got, G in zip(roots, est.estimate()):
        want = _inv_sqrt_f64(G, eps)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-4 * np.abs(want).max())
    # The same direction as an uninjected float32 factorisation, to float32 accuracy.
    v = rng.standard_normal(44).astype(np.float32)
    with_retry = est.apply(v, eps=eps).astype(np.float64)
    want = np.concatenate([_inv_sqrt_f64(G, eps) @ v[o:o + n].astype(np.float64)
                           for G, o, n in zip(est.estimate(), np.cumsum([0] + sizes), sizes)])
    assert np.linalg.norm(with_retry - want) <= 2e-4 * np.linalg.norm(want)
    # stages=2 also fails the float64 retry: the fallback_eps retry is taken instead.
    est.update((rng.standard_normal(44) * scales).astype(np.float32))
    est._inject_factor_failures(1, attempts=1, stages=2)
    est.preconditioner(eps=eps)
    st = est.fallback_statistics()
    assert st["float64_retries"] == [0, 1, 0] and st["eps_retries"] == [0, 1, 0]
    # A float64 estimate has no float64 retry: stages=1 goes to fallback_eps.
    est64 = ss.EMAEstimator(4, structure="full", beta=0.9, fallback_eps=1e-2)
    est64.update(rng.standard_normal(4))
    est64._inject_factor_failures(0, attempts=1, stages=1)
    est64.preconditioner(eps=eps)
    assert est64.fallback_statistics()["float64_retries"] == [0]
    assert est64.fallback_statistics()["eps_retries"] == [1]
