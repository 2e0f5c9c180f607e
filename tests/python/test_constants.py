"""Definition 4.2 constants, Propositions 4.3/4.4 and the bounds (10)-(13) (saddlescape.diagnostics).

References: A = (G + eps I)^(-1/2) by scipy's Schur-Pade ``fractional_matrix_power``; the
spectra of G are prescribed (G = Q diag(lam) Q^T), so Gamma = sum lam / (lam + eps),
nu = min lam / (lam + eps), lambda_- = (max lam + eps)^(-1/2) and the equality cases of
Prop. 4.4 (a gradient along G's eigenvector of lambda_min) are known in closed form.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg

import saddlescape as ss
from saddlescape import diagnostics as dg


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def spectral(lam: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    q, r = np.linalg.qr(rng(seed).standard_normal((lam.size, lam.size)))
    q = q * np.sign(np.diag(r))
    G = (q * lam) @ q.T
    return (G + G.T) / 2, q


def ref_A(G: np.ndarray, eps: float) -> np.ndarray:
    A = np.real(scipy.linalg.fractional_matrix_power(G + eps * np.eye(G.shape[0]), -0.5))
    return (A + A.T) / 2


SPECTRA = {
    "d1": np.array([0.3]),
    "pd": np.array([2.0, 0.7, 0.1]),
    "ill": np.logspace(0, -8, 5),
    "rank2of4": np.array([3.0, 0.5, 0.0, 0.0]),
}


@pytest.mark.parametrize("name", SPECTRA)
@pytest.mark.parametrize("eps", [0.0, 1e-3, 0.5])
def test_constants_at_match_closed_forms_and_prop_4_4(name: str, eps: float) -> None:
    lam = SPECTRA[name]
    if eps == 0 and lam.min() == 0:
        pytest.skip("no preconditioner: checked in test_eps_zero_with_singular_G_is_rejected")
    G, Q = spectral(lam, 1)
    A = (Q * (lam + eps) ** -0.5) @ Q.T  # from the prescribed spectrum: exact to rounding
    A = (A + A.T) / 2
    lo, hi, d = lam.min(), lam.max(), lam.size
    u_min, u_max = Q[:, np.argmin(lam)], Q[:, np.argmax(lam)]
    # The equality case of Lambda_1 and Lambda_2: vectors along the eigenvector of lambda_min.
    c = dg.constants_at(A, G, grad=3.0 * u_min, residual=-0.5 * u_min)
    # (rounding: up to kappa(A)^2 machine epsilons, 1e-8 relative for the "ill" spectrum)
    assert c.Lambda1 == pytest.approx((lo + eps) ** -0.5, rel=1e-7)
    assert c.Lambda2 == pytest.approx((lo + eps) ** -0.5, rel=1e-7)
    assert c.Gamma == pytest.approx(np.sum(lam / (lam + eps)), rel=1e-9)
    assert c.nu == pytest.approx(lo / (lo + eps), rel=1e-6, abs=1e-12)
    assert c.lambda_minus == pytest.approx((hi + eps) ** -0.5, rel=1e-9)
    b = dg.prop_4_4_bounds(G, eps)
    assert (b.Lambda1, b.Lambda2) == pytest.approx(((lo + eps) ** -0.5,) * 2, rel=1e-7)
    assert b.Gamma == pytest.approx(d * hi / (eps + hi), rel=1e-12)
    assert b.nu == pytest.approx(lo / (lo + eps), rel=1e-6, abs=1e-15)
    assert b.lambda_minus == pytest.approx((hi + eps) ** -0.5, rel=1e-12)
    assert dg.check_bounds(c, b, rtol=1e-7, atol=1e-12)
    # Along the other end of the spectrum Lambda_1 is the smallest it can be, lambda_max(A)
    # becomes lambda_min(A): the bound is not attained there.
    c2 = dg.constants_at(A, G, grad=u_max, residual=u_max)
    assert c2.Lambda1 == pytest.approx((hi + eps) ** -0.5, rel=1e-8)
    if d > 1:
        assert c2.Lambda1 < b.Lambda1 * (1 - 1e-3)
    # Gamma's bound is attained when eps = 0 (full rank) or d = 1, and strict otherwise.
    if eps == 0 or d == 1:
        assert c.Gamma == pytest.approx(b.Gamma, rel=1e-9)
    else:
        assert c.Gamma < b.Gamma * (1 - 1e-3)


def test_prop_4_4_on_random_positive_definite_and_rank_deficient_G() -> None:
    r = rng(7)
    for trial in range(40):
        d = int(r.integers(1, 7))
        rank = int(r.integers(0 if trial % 3 == 0 else d, d + 1))
        X = r.standard_normal((d, max(rank, 0))) * np.logspace(0, -3, max(rank, 0))
        G = X @ X.T
        eps = float(10 ** r.uniform(-4, 1)) if rank < d or trial % 2 else 0.0
        A = ref_A(G, eps)
        for _ in range(3):
            c = dg.constants_at(A, G, r.standard_normal(d), r.standard_normal(d))
            # rtol 1e-6: with eps = 0 and cond(G) up to 1e6, nu = lambda_min(A G A) = 1 is met
            # only to the rounding of A (1.2e-7 off with one OpenBLAS build).
            assert dg.check_bounds(c, dg.prop_4_4_bounds(G, eps), rtol=1e-6,
                                   atol=1e-12), (trial, c)
        # Independent: the constants are those of the formulas on A G A = G (G + eps I)^(-1).
        M = A @ G @ A
        assert c.Gamma == pytest.approx(np.trace(np.linalg.solve(G + eps * np.eye(d), G)),
                                        rel=1e-7, abs=1e-12)
        assert c.nu == pytest.approx(np.linalg.eigvalsh(M)[0], abs=1e-8)  # (cond 1e6, above)


def test_prop_4_3_is_exact_for_sgd_including_rank_deficient_G() -> None:
    G, _ = spectral(np.array([4.0, 1.0, 0.0]), 3)
    grad, res = rng(2).standard_normal(3), rng(3).standard_normal(3)
    c = dg.constants_at(np.eye(3), G, grad, res)
    b = dg.prop_4_3_bounds(G)
    assert (c.Lambda1, c.Lambda2, c.lambda_minus) == pytest.approx((1.0, 1.0, 1.0), rel=1e-14)
    assert b.Gamma == pytest.approx(5.0, rel=1e-12) and c.Gamma == pytest.approx(5.0, rel=1e-12)
    assert b.nu == pytest.approx(0.0, abs=1e-12) and c.nu == pytest.approx(0.0, abs=1e-12)
    assert dg.check_bounds(c, b, rtol=1e-9)
    # The footnote's reading: along escape directions in the range of G, nu is positive.
    v = np.array([1.0, 2.0, 0.0])
    assert dg.escape_noise(G, v) == pytest.approx(v @ G @ v / (v @ v), rel=1e-12)
    assert dg.prop_4_3_bounds(G, escape_directions=v).nu == pytest.approx(v @ G @ v / 5)


def test_footnote_reading_of_prop_4_4_holds_on_eigenvectors_only() -> None:
    lam = np.array([1.0, 0.04, 0.0])
    G, Q = spectral(lam, 5)
    eps = 1e-2
    A = ref_A(G, eps)
    M = A @ G @ A
    on = Q[:, 1]  # an eigenvector of G: the substituted nu mu / (mu + eps) is exact
    mu = 0.04
    assert dg.prop_4_4_bounds(G, eps, escape_directions=on).nu == pytest.approx(mu / (mu + eps))
    assert dg.escape_noise(M, on) == pytest.approx(mu / (mu + eps), rel=1e-9)
    # A mixture of two eigenvectors: v^T phi(G) v < phi(v^T G v) (phi concave), as documented.
    off = (Q[:, 0] + Q[:, 2]) / math.sqrt(2)
    mu = dg.escape_noise(G, off)
    assert mu == pytest.approx(0.5, rel=1e-9)
    measured = dg.escape_noise(M, off)
    assert measured == pytest.approx(0.5 * 1.0 / 1.01, rel=1e-9)
    assert measured < dg.prop_4_4_bounds(G, eps, escape_directions=off).nu


def test_eps_zero_with_singular_G_is_rejected() -> None:
    G = np.diag([1.0, 0.0])
    for fn in (lambda: dg.prop_4_4_bounds(G, 0.0), lambda: dg.bound_10(G, 0.0),
               lambda: dg.bound_11(G, 0.0), lambda: dg.bound_13(G, 0.0),
               lambda: dg.aligned_rmsprop_factor(G)):
        with pytest.raises(ss.NumericalError, match="singular"):
            fn()
    p = ss.problems.NoisyQuadratic(np.eye(2), [1.0, 0.0])
    with pytest.raises(ss.NumericalError):
        dg.preconditioner_constants(p, "adaptive", np.zeros(2))
    with pytest.raises(ss.NumericalError):
        dg.preconditioner_constants(p, "diagonal", np.zeros(2))
    # With eps > 0 the bounds exist: kappa is infinite, nu is 0.
    assert dg.bound_11(G, 0.1) == math.inf and dg.prop_4_4_bounds(G, 0.1).nu == 0.0
    assert dg.bound_12(G) == (math.inf, math.inf)


@pytest.mark.parametrize("eps", [0.0, 0.01, 3.0])
def test_bounds_10_to_13(eps: float) -> None:
    lam = np.array([0.5, 0.02, 0.1])
    G, _ = spectral(lam, 11)
    d, lo, hi = 3, 0.02, 0.5
    assert dg.bound_10(G, eps) == pytest.approx(d * lo / (eps + lo) * (hi + eps), rel=1e-9)
    assert dg.bound_11(G, eps) == pytest.approx(d ** 4 * (hi / lo) ** 4 * (hi + eps), rel=1e-8)
    assert dg.bound_13(G, eps) == dg.bound_11(G, eps)
    mid, right = dg.bound_12(G)
    assert mid == pytest.approx((0.62 / lo) ** 4, rel=1e-8)
    assert right == pytest.approx(d ** 4 * (hi / lo) ** 4, rel=1e-8) and mid <= right
    # (11) holds with equality for Prop. 4.4's values.
    b = dg.prop_4_4_bounds(G, eps)
    assert dg.second_order_factor(b) == pytest.approx(dg.bound_11(G, eps), rel=1e-8)
    # Sec. 5.2: the aligned regime at eps = 0 is d^4 lambda_max^5.
    assert dg.aligned_rmsprop_factor(G) == pytest.approx(d ** 4 * hi ** 5, rel=1e-8)
    assert dg.first_order_term(b) == pytest.approx(b.Gamma / b.lambda_minus, rel=1e-14)
    # As documented: with lambda_max < 1 and eps = 0, Prop. 4.4's Gamma / lambda_- exceeds (10).
    if eps == 0:
        assert dg.first_order_term(b) == pytest.approx(d * hi ** 0.5, rel=1e-9)
        assert dg.first_order_term(b) > dg.bound_10(G, 0.0)


def test_second_order_factor_formula() -> None:
    c = dg.Constants(2.0, 3.0, 5.0, 0.5, 0.25)
    assert dg.second_order_factor(c) == pytest.approx(2 ** 4 * 3 ** 4 * 5 ** 4 / (0.25 ** 10 * 0.5 ** 4))
    assert dg.second_order_factor(dg.Constants(1, 1, 1, 0.0, 1)) == math.inf
    assert dg.first_order_term(c) == 20.0
    with pytest.raises(ValueError, match="nu must be >= 0, got -1"):
        dg.second_order_factor(dg.Constants(1, 1, 1, -1, 1))


def test_preconditioner_constants_on_the_saddle_problem() -> None:
    p = ss.problems.SaddleProblem()
    t = np.array([0.05, 0.2, 0.5])
    pts = np.stack([np.zeros(3), t], axis=1)  # along the escape direction e_2
    eps = 1e-3
    r = dg.preconditioner_constants(p, "adaptive", pts, x0=np.zeros(2), eps=eps)
    assert not r.sampled
    g2 = -0.1 * t + 10 * t ** 9  # grad F along e_2; G = diag(1, 0.01 + g2^2)
    G22 = 0.01 + g2 ** 2
    np.testing.assert_allclose(r.second_moments[:, 1, 1], G22, rtol=1e-9)
    # grad and the model residual 10 x^9 lie along e_2: both Lambdas attain lambda_max(A).
    np.testing.assert_allclose(r.Lambda1, (G22 + eps) ** -0.5, rtol=1e-8)
    np.testing.assert_allclose(r.Lambda2, (G22 + eps) ** -0.5, rtol=1e-8)
    np.testing.assert_allclose(r.lambda_max_A, (G22 + eps) ** -0.5, rtol=1e-9)
    np.testing.assert_allclose(r.Gamma, 1 / (1 + eps) + G22 / (G22 + eps), rtol=1e-9)
    np.testing.assert_allclose(r.nu, G22 / (G22 + eps), rtol=1e-8)
    np.testing.assert_allclose(r.lambda_minus, (1 + eps) ** -0.5, rtol=1e-9)
    # Escape directions: the Hessian diag(1, -0.1 + 90 x_2^8) is negative along e_2 for the
    # first two points only.
    np.testing.assert_allclose(r.nu_escape[:2], (G22 / (G22 + eps))[:2], rtol=1e-8)
    assert math.isnan(r.nu_escape[2])
    w = r.worst()
    assert w.Lambda1 == pytest.approx(r.Lambda1.max()) and w.nu == pytest.approx(r.nu.min())
    for i in range(3):
        assert dg.check_bounds(r.at(i), dg.prop_4_4_bounds(r.second_moments[i], eps), rtol=1e-8)
    # SGD: A = I, Gamma = tr(G), nu = lambda_min(G).
    s = dg.preconditioner_constants(p, None, pts, x0=np.zeros(2))
    np.testing.assert_allclose(s.Gamma, 1 + G22, rtol=1e-9)
    np.testing.assert_allclose(s.nu, G22, rtol=1e-8)
    np.testing.assert_allclose(s.Lambda1, 1.0, rtol=1e-12)


def test_quadratic_model_residual_and_sampled_G() -> None:
    H = np.array([[2.0, 0.5], [0.5, -1.0]])
    Sigma = np.diag([1.0, 0.04])
    p = ss.problems.NoisyQuadratic(H, Sigma)
    pts = rng(4).standard_normal((5, 2))
    r = dg.preconditioner_constants(p, np.diag([1.0, 5.0]), pts, x0=pts[2])
    assert np.all(np.isnan(r.Lambda2))  # f is its own quadratic model: unconstrained
    A = np.diag([1.0, 5.0])
    for i, x in enumerate(pts):
        g = H @ x
        G = Sigma + np.outer(g, g)
        assert r.Lambda1[i] == pytest.approx((A @ g) @ (A @ g) / (g @ A @ g), rel=1e-10)
        assert r.Gamma[i] == pytest.approx(np.trace(A @ G @ A), rel=1e-10)
    # Without an exact second moment, G is sampled: an oracle with the same law.
    L = np.linalg.cholesky(Sigma)
    o = ss.problems.Oracle(lambda x, g: H @ x + L @ g.standard_normal(2), 2,
                           gradient=lambda x: H @ x)
    n = 40_000
    s = dg.preconditioner_constants(o, A, pts[:2], n=n, seed=3)
    assert s.sampled and np.all(np.isnan(s.Lambda2))
    for i in range(2):
        g = o.stochastic_gradients(pts[i], n, 3)
        assert s.Gamma[i] == pytest.approx(np.mean(np.sum((g @ A) ** 2, axis=1)), rel=1e-9)
        assert s.Gamma[i] == pytest.approx(r.Gamma[i], rel=0.05)


def test_estimator_and_optimizer_preconditioners() -> None:
    p = ss.problems.SaddleProblem()
    gs = rng(9).standard_normal((50, 2)) * [1.0, 0.1]
    e = ss.EMAEstimator(2, beta=0.9)
    e.update_batch(gs) if hasattr(e, "update_batch") else None
    c = dg.preconditioner_constants(p, e, np.array([0.1, 0.2]), eps=1e-4)
    np.testing.assert_allclose(c.A[0], ref_A(np.asarray(e.estimate()), 1e-4), rtol=1e-8)
    o = ss.RMSProp(2, 0.01, beta=0.9, eps=1e-6, structure="diag")
    x = np.zeros(2)
    for g in gs[:5]:
        o.step(x, g)
    c = dg.preconditioner_constants(p, o, np.array([0.1, 0.2]))
    np.testing.assert_allclose(np.diag(c.A[0]), (o.estimate() + 1e-6) ** -0.5, rtol=1e-10)
    # A callable returning a diagonal.
    c = dg.preconditioner_constants(p, lambda x: np.array([1.0, 2.0 + x[0]]), np.array([0.5, 0]))
    np.testing.assert_allclose(c.A[0], np.diag([1.0, 2.5]))


@pytest.mark.parametrize("kwargs, match", [
    ({"A": np.array([[1.0, 2.0], [0.0, 1.0]])}, "A must be symmetric"),
    ({"A": np.diag([1.0, -1.0])}, "A must be positive semidefinite, got the eigenvalue -1"),
    ({"A": "rmsprop"}, "got 'rmsprop'"),
    ({"A": lambda x: np.eye(3)}, "A\\(x\\) must have shape \\(2, 2\\)"),
    ({"points": np.zeros((2, 3))}, "points must have shape \\(k, 2\\)"),
    ({"points": np.array([np.nan, 0.0])}, "points must be finite"),
    ({"eps": -1.0}, "eps must be a finite number >= 0, got -1.0"),
    ({"n": 1}, "n must be an integer >= 2, got 1"),
    ({"escape_directions": np.zeros(2)}, "escape_directions must contain a nonzero vector"),
    ({"x0": np.zeros(3)}, "x must have shape \\(2,\\)"),
])
def test_preconditioner_constants_rejects_bad_input(kwargs: dict, match: str) -> None:
    args = {"A": None, "points": np.array([0.1, 0.2])}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        dg.preconditioner_constants(ss.problems.SaddleProblem(), **args)


def test_bad_matrices_and_problems() -> None:
    with pytest.raises(ValueError, match="G must be positive semidefinite, got the eigenvalue -0.5"):
        dg.prop_4_3_bounds(np.diag([1.0, -0.5]))
    with pytest.raises(ValueError, match="G must have shape \\(2, 2\\), got shape \\(3, 3\\)"):
        dg.constants_at(np.eye(2), np.eye(3))
    with pytest.raises(ValueError, match="rtol must be a finite number >= 0"):
        dg.check_bounds(dg.Constants(1, 1, 1, 1, 1), dg.Constants(1, 1, 1, 1, 1), rtol=-1)
    no_grad = ss.problems.Oracle(lambda x, g: x, 2)
    with pytest.raises(ValueError, match="has no exact gradient"):
        dg.preconditioner_constants(no_grad, None, np.zeros(2))
    with_grad = ss.problems.Oracle(lambda x, g: x, 2, gradient=lambda x: x)
    with pytest.raises(ValueError, match="has no exact second_moment"):
        dg.preconditioner_constants(with_grad, "adaptive", np.zeros(2))


def test_check_bounds_directions() -> None:
    claimed = dg.Constants(2.0, 2.0, 3.0, 0.5, 0.1)
    assert dg.check_bounds(dg.Constants(2.0, math.nan, 3.0, 0.5, 0.1), claimed)
    bad = dg.check_bounds(dg.Constants(2.1, 1.0, 3.1, 0.4, 0.09), claimed)
    assert not bad and not any((bad.Lambda1, bad.Gamma, bad.nu, bad.lambda_minus)) and bad.Lambda2


@pytest.mark.parametrize("eps", [0.0, 1e-3])
def test_equality_cases_of_prop_4_4_on_a_large_noisy_quadratic(eps: float) -> None:
    # F = x^T H x / 2 with noise covariance Sigma (spectrum prescribed, ill-conditioned, d = 40):
    # G(x) = Sigma + g g^T. At x = H^(-1) c u, u Sigma's eigenvector of lambda_min, the gradient
    # c u is an eigenvector of G(x), still of its smallest eigenvalue lambda_min + c^2: Lambda_1
    # attains Prop. 4.4's (lambda_min(G) + eps)^(-1/2).
    d = 40
    lam = np.logspace(0, -5, d)
    Sigma, Q = spectral(lam, 21)
    H, _ = spectral(np.linspace(3.0, -1.0, d), 22)  # indefinite: a saddle
    p = ss.problems.NoisyQuadratic(H, Sigma)
    c = 1e-3
    u = Q[:, -1]
    x = np.linalg.solve(H, c * u)
    r = dg.preconditioner_constants(p, "adaptive", x, eps=eps)
    G_lam = lam.copy()
    G_lam[-1] += c * c
    lo, hi = G_lam[-1], G_lam.max()
    assert r.Lambda1[0] == pytest.approx((lo + eps) ** -0.5, rel=1e-6)
    assert np.isnan(r.Lambda2[0])  # f is its own quadratic model
    assert r.Gamma[0] == pytest.approx(np.sum(G_lam / (G_lam + eps)), rel=1e-8)
    assert r.nu[0] == pytest.approx(lo / (lo + eps), rel=1e-6)
    assert r.lambda_minus[0] == pytest.approx((hi + eps) ** -0.5, rel=1e-9)
    b = dg.prop_4_4_bounds(r.second_moments[0], eps)
    assert b.Lambda1 == pytest.approx(r.Lambda1[0], rel=1e-6)
    assert dg.check_bounds(r.at(0), b, rtol=1e-6, atol=1e-12)
    # nu_escape: the Hessian's negative eigenvectors (a quarter of them), on which A G A is
    # not diagonal in general; it is at least nu, and the SGD constants are G's own.
    assert r.nu_escape[0] >= r.nu[0] * (1 - 1e-9)
    s = dg.preconditioner_constants(p, None, x)
    assert s.Gamma[0] == pytest.approx(np.sum(G_lam), rel=1e-10)
    assert s.nu[0] == pytest.approx(lo, rel=1e-6)
    assert dg.check_bounds(s.at(0), dg.prop_4_3_bounds(s.second_moments[0]), atol=1e-15)


def test_float32_inputs_give_the_float64_constants() -> None:
    G, Q = spectral(np.array([2.0, 0.5, 0.05]), 31)
    A = ref_A(G, 1e-2)
    g, res = rng(5).standard_normal(3), rng(6).standard_normal(3)
    c64 = dg.constants_at(A, G, g, res)
    G32, A32 = G.astype(np.float32), A.astype(np.float32)
    c32 = dg.constants_at((A32 + A32.T) / 2, (G32 + G32.T) / 2, g.astype(np.float32),
                          res.astype(np.float32))
    for name in ("Lambda1", "Lambda2", "Gamma", "nu", "lambda_minus"):
        assert getattr(c32, name) == pytest.approx(getattr(c64, name), rel=1e-5)
    b32 = dg.prop_4_4_bounds((G32 + G32.T) / 2, 1e-2)
    assert b32.Gamma == pytest.approx(dg.prop_4_4_bounds(G, 1e-2).Gamma, rel=1e-6)
