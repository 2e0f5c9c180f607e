"""saddlescape.diagnostics and the isotropy experiment, against independent numpy/scipy references.

References: the adaptive preconditioner by scipy's Schur-Pade ``fractional_matrix_power`` (not
the library's eigendecomposition); ||I - A g g^T A - I||_2 = s / (1 + s) with
s = g^T Cov(g)^(-1) g (Sherman-Morrison, for A = (Cov(g) + g g^T)^(-1/2)); sample covariances
by numpy from the same stochastic gradients; Hessian eigenvalues by numpy's eigvalsh.

Statistical tolerances: for Gaussian noise with covariance C the sample covariance S of n draws
(about a known mean) has E||S - C||_F^2 = (tr(C)^2 + ||C||_F^2) / n, so the checks allow 6 times
that root mean square. Over seeds 0-59 the largest observed error was 2.8 root mean squares for
the NoisyQuadratic (median 0.6-0.8) and 1.6 for the saddle problem, whose noise is not Gaussian
(1000 whitened components) but has fourth moments of the same size.
"""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import scipy.linalg

import saddlescape as ss
from saddlescape import diagnostics as dg
from saddlescape.experiments import isotropy

# An anisotropic, correlated noise covariance (eigenvalues 1 and 0.01, rotated by 30 degrees)
# and a positive definite Hessian: the minimum of the NoisyQuadratic is x = 0.
_C, _S = math.cos(math.pi / 6), math.sin(math.pi / 6)
ROT = np.array([[_C, -_S], [_S, _C]])
NOISE = ROT @ np.diag([1.0, 0.01]) @ ROT.T
NOISE = (NOISE + NOISE.T) / 2
H = np.array([[2.0, 0.5], [0.5, 1.0]])
SADDLE_MINIMUM = np.array([0.0, 0.01 ** 0.125])  # h_2 x_2 + 10 x_2^9 = 0 with h_2 = -0.1


def quadratic() -> ss.problems.NoisyQuadratic:
    return ss.problems.NoisyQuadratic(H, NOISE)


def ref_adaptive(M: np.ndarray, eps: float = 0.0) -> np.ndarray:
    """(M + eps I)^(-1/2) by scipy's Schur-Pade algorithm."""
    A = scipy.linalg.fractional_matrix_power(M + eps * np.eye(M.shape[0]), -0.5)
    assert np.abs(np.imag(A)).max() < 1e-12
    return np.real(A)


def sample_tolerance(C: np.ndarray, n: int, k: float = 6.0) -> float:
    """k root mean squares of ||S - C||_F for n Gaussian draws with covariance C."""
    return k * math.sqrt((np.trace(C) ** 2 + np.sum(C * C)) / n)


# --- the rescaled noise covariance --------------------------------------------------------


@pytest.mark.parametrize("A_kind", ["sgd", "adaptive", "adaptive_eps", "matrix"])
def test_sampled_covariance_converges_to_closed_form(A_kind: str) -> None:
    p = quadratic()
    x = np.array([0.3, -0.2])
    g = H @ x
    M = NOISE + np.outer(g, g)  # E[g g^T] for additive noise
    A_ref = {"sgd": np.eye(2), "adaptive": ref_adaptive(M), "adaptive_eps": ref_adaptive(M, 0.1),
             "matrix": np.array([[1.0, 2.0], [-0.5, 3.0]])}[A_kind]
    A_arg = {"sgd": None, "adaptive": "adaptive", "adaptive_eps": "adaptive",
             "matrix": A_ref}[A_kind]
    eps = 0.1 if A_kind == "adaptive_eps" else 0.0
    closed_ref = A_ref @ NOISE @ A_ref.T
    for n, seed in ((2_000, 1), (200_000, 2)):
        r = dg.rescaled_noise_covariance(p, x, A_arg, eps=eps, n=n, seed=seed)
        np.testing.assert_allclose(r.A, A_ref, rtol=1e-10, atol=1e-12)
        assert r.closed_form is not None and r.centred_at_gradient
        np.testing.assert_allclose(r.closed_form, closed_ref, rtol=1e-10, atol=1e-12)
        # The same draws, by numpy: (1/n) sum A (g_i - grad f)(g_i - grad f)^T A^T.
        D = (p.stochastic_gradients(x, n, seed) - g) @ A_ref.T
        np.testing.assert_allclose(r.sampled, D.T @ D / n, rtol=1e-9, atol=1e-12)
        err = np.linalg.norm(r.sampled - closed_ref, "fro")
        assert err <= sample_tolerance(closed_ref, n), (n, err)
        assert r.sampled_distance == pytest.approx(np.linalg.norm(r.sampled - np.eye(2), 2))
    # At n = 200000 the error is far below what it was allowed at n = 2000.
    assert err <= sample_tolerance(closed_ref, 2_000) / 5


def test_closed_form_is_eq_3() -> None:
    # eps = 0: Cov(A g) = I - A grad grad^T A, at distance s / (1 + s) from I.
    p = quadratic()
    for x in (np.array([0.3, -0.2]), np.array([1e-3, 2e-3]), np.array([-2.0, 0.5])):
        g = H @ x
        r = dg.rescaled_noise_covariance(p, x, "adaptive", n=2, seed=0)
        A = ref_adaptive(NOISE + np.outer(g, g))
        Ag = A @ g
        assert r.closed_form is not None and r.closed_form_distance is not None
        np.testing.assert_allclose(r.closed_form, np.eye(2) - np.outer(Ag, Ag), atol=1e-10)
        s = g @ np.linalg.solve(NOISE, g)
        assert r.closed_form_distance == pytest.approx(s / (1 + s), rel=1e-8, abs=1e-14)
    # eps > 0: A E[gg^T] A - A grad grad^T A, no longer I at a stationary point.
    r = dg.rescaled_noise_covariance(p, np.zeros(2), "adaptive", eps=0.01, n=2, seed=0)
    A = ref_adaptive(NOISE, 0.01)
    np.testing.assert_allclose(r.closed_form, A @ NOISE @ A, atol=1e-12)
    expected = 1 - 0.01 / (0.01 + 0.01)  # the small eigenvalue 0.01 of NOISE is halved
    assert r.closed_form_distance == pytest.approx(expected, rel=1e-9)


def test_near_minimum_adaptive_is_isotropic_and_sgd_is_not() -> None:
    # At distance 1e-3 of the minimum s <= ||H||_2^2 1e-6 / 0.01 < 5e-4 (here 6e-6): the closed
    # form is within 5e-4 of I; the sample of 100000 gradients within 3 root mean squares of its
    # Monte-Carlo error (0.023; the largest over 100 seeds was 0.015).
    # SGD keeps the noise as it is: ||NOISE - I|| = 0.99.
    p = quadratic()
    n = 100_000
    x = 1e-3 * np.array([0.6, 0.8])
    ada = dg.rescaled_noise_covariance(p, x, "adaptive", n=n, seed=7)
    sgd = dg.rescaled_noise_covariance(p, x, None, n=n, seed=7)
    assert ada.closed_form_distance is not None and sgd.closed_form_distance is not None
    assert ada.closed_form_distance < 5e-4
    assert ada.sampled_distance < sample_tolerance(np.eye(2), n, k=3.0)
    assert sgd.closed_form_distance == pytest.approx(0.99, abs=1e-12)
    assert sgd.sampled_distance == pytest.approx(0.99, abs=0.02)
    # The same on the saddle problem at its local minimum and at its saddle.
    sp = ss.problems.SaddleProblem()
    for center in (SADDLE_MINIMUM, np.zeros(2)):
        x = center + 1e-3 * np.array([0.6, 0.8])
        ada = dg.rescaled_noise_covariance(sp, x, "adaptive", n=n, seed=3)
        sgd = dg.rescaled_noise_covariance(sp, x, None, n=n, seed=3)
        assert ada.closed_form_distance < 5e-4 and ada.sampled_distance < 0.03
        assert sgd.closed_form_distance == pytest.approx(0.99, abs=1e-9)
        assert sgd.sampled_distance > 0.95


def test_adaptive_distance_falls_as_x_approaches_the_minimum() -> None:
    p = quadratic()
    u = np.array([0.6, 0.8])
    radii = np.geomspace(1.0, 1e-4, 9)
    d = np.array([dg.rescaled_noise_covariance(p, r * u, "adaptive", n=2, seed=0)
                  .closed_form_distance for r in radii])
    assert np.all(np.diff(d) < 0), d
    # s / (1 + s) with s proportional to r^2: the distance falls like r^2 once small.
    np.testing.assert_allclose(d[-1] / d[-2], (radii[-1] / radii[-2]) ** 2, rtol=1e-3)


def test_problem_without_gradient_is_centred_at_its_mean() -> None:
    scale = np.array([1.0, 0.1])

    def oracle(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return 2.0 * x + scale * rng.standard_normal(2)

    p = ss.problems.Oracle(oracle, 2)
    x = np.array([1.0, -1.0])
    n = 50_000
    A = np.diag([1.0, 10.0])
    r = dg.rescaled_noise_covariance(p, x, A, n=n, seed=5)
    assert r.closed_form is None and r.closed_form_distance is None
    assert not r.centred_at_gradient
    ref = np.cov((p.stochastic_gradients(x, n, 5) @ A.T).T)  # ddof = 1, about the sample mean
    np.testing.assert_allclose(r.sampled, ref, rtol=1e-9, atol=1e-12)
    assert np.linalg.norm(r.sampled - np.eye(2), "fro") <= sample_tolerance(np.eye(2), n)
    # Callables are accepted directly, as by ss.run.
    r2 = dg.rescaled_noise_covariance(oracle, x, A, n=n, seed=5)
    np.testing.assert_allclose(r2.sampled, r.sampled)


def test_spectral_distance_to_identity() -> None:
    C = np.array([[1.5, 0.2], [0.2, 0.1]])
    assert dg.spectral_distance_to_identity(C) == pytest.approx(
        np.linalg.svd(C - np.eye(2), compute_uv=False)[0], rel=1e-12)


# --- second-order stationarity ------------------------------------------------------------


def test_stationarity_at_the_saddle_and_the_minimum() -> None:
    p = ss.problems.SaddleProblem()
    # The saddle: grad 0, lambda_min = -0.1; stationary only when sqrt(rho tau) >= 0.1.
    s = dg.is_second_order_stationary(p, np.zeros(2), tau=1e-3, rho=1.0)
    assert s.grad_norm < 1e-12 and s.lambda_min == pytest.approx(-0.1, abs=1e-12)
    assert s.curvature_threshold == pytest.approx(-math.sqrt(1e-3))
    assert not s.stationary and not s
    assert dg.is_second_order_stationary(p, np.zeros(2), tau=1e-3, rho=10.0).stationary  # -0.1
    assert dg.is_second_order_stationary(p, np.zeros(2), tau=1e-3, rho=9.9).stationary is False
    # The local minimum: Hessian diag(1, -0.1 + 90 x_2^8) = diag(1, 0.8).
    m = dg.is_second_order_stationary(p, SADDLE_MINIMUM, tau=1e-6, rho=0.0)
    assert m.grad_norm < 1e-12 and m.lambda_min == pytest.approx(0.8, rel=1e-12) and m


def test_stationarity_gradient_threshold_on_a_quadratic() -> None:
    Hq = np.array([[1.0, 0.3], [0.3, -0.5]])
    p = ss.problems.NoisyQuadratic(Hq, np.eye(2))
    x = np.array([0.4, -0.7])
    grad_norm = float(np.linalg.norm(Hq @ x))
    lam = float(np.linalg.eigvalsh(Hq)[0])  # about -0.56
    rho = 2 * lam ** 2 / grad_norm  # curvature passes at tau = grad_norm: sqrt(2) |lam| > |lam|
    at = dg.is_second_order_stationary(p, x, tau=grad_norm, rho=rho)
    assert at.grad_norm == pytest.approx(grad_norm, rel=1e-12)
    assert at.lambda_min == pytest.approx(lam, rel=1e-12)
    assert at.stationary
    assert not dg.is_second_order_stationary(p, x, tau=0.99 * grad_norm, rho=rho).stationary
    # Gradient small enough but curvature too negative: -sqrt(rho tau) > lambda_min.
    assert not dg.is_second_order_stationary(p, x, tau=grad_norm, rho=0.5 * lam ** 2 / grad_norm)


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    ({"n": 1}, "n must be an integer >= 2, got 1"),
    ({"n": 2.5}, "n must be an integer"),
    ({"eps": -1e-3}, "eps must be a finite number >= 0"),
    ({"eps": float("nan")}, "eps must be a finite number >= 0"),
    ({"A": "rmsprop"}, "A must be None, a \\(d, d\\) matrix or 'adaptive', got 'rmsprop'"),
    ({"A": np.eye(3)}, "A must have shape \\(2, 2\\), got shape \\(3, 3\\)"),
    ({"A": np.array([[1.0, np.nan], [0.0, 1.0]])}, "A must be finite"),
    ({"A": np.eye(2, dtype=bool)}, "A must be a real-valued array"),
    ({"x": np.zeros(3)}, "x must have shape \\(2,\\), got shape \\(3,\\)"),
    ({"x": np.array([np.inf, 0.0])}, "x must be finite"),
    ({"seed": -1}, "seed must be an integer in \\[0, 2\\*\\*64\\), got -1"),
    ({"seed": 1.0}, "seed must be an integer, got 1.0"),
])
def test_rescaled_noise_covariance_rejects_bad_input(kwargs: dict, match: str) -> None:
    args = {"x": np.zeros(2), "A": None, "eps": 0.0, "n": 10, "seed": 0}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        dg.rescaled_noise_covariance(quadratic(), **args)


def test_adaptive_needs_a_second_moment() -> None:
    p = ss.problems.Oracle(lambda x, rng: x + rng.standard_normal(2), 2)
    with pytest.raises(ValueError, match="has no exact second_moment"):
        dg.rescaled_noise_covariance(p, np.zeros(2), "adaptive")
    with pytest.raises(ss.NumericalError):  # singular E[gg^T] with eps = 0
        dg.rescaled_noise_covariance(ss.problems.NoisyQuadratic(np.eye(2), [1.0, 0.0]),
                                     np.zeros(2), "adaptive")


@pytest.mark.parametrize("tau, rho, match", [
    (-1.0, 1.0, "tau must be a finite number >= 0, got -1.0"),
    (float("nan"), 1.0, "tau must be a finite number >= 0"),
    (1.0, float("inf"), "rho must be a finite number >= 0, got inf"),
    (1.0, "1", "rho must be a real number"),
])
def test_stationarity_rejects_bad_input(tau: object, rho: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dg.is_second_order_stationary(quadratic(), np.zeros(2), tau, rho)  # type: ignore[arg-type]


def test_stationarity_needs_gradient_and_hessian() -> None:
    p = ss.problems.Oracle(lambda x, rng: x, 2, gradient=lambda x: x)
    with pytest.raises(ValueError, match="exact gradient and Hessian"):
        dg.is_second_order_stationary(p, np.zeros(2), 1.0, 1.0)


# --- the isotropy experiment --------------------------------------------------------------


def test_isotropy_experiment_quick(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("matplotlib")
    summary = isotropy.run(tmp_path, quick=True, progress=False)
    folder = tmp_path / "isotropy"
    png = (folder / "isotropy.png").read_bytes()
    assert len(png) > 10_000 and png.startswith(b"\x89PNG\r\n\x1a\n")

    with open(folder / "isotropy.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == isotropy.HEADER
    data = rows[1:]
    assert len(data) == 2 * summary["points_per_target"] == 10
    col = {name: i for i, name in enumerate(rows[0])}
    sp = ss.problems.SaddleProblem()
    for target, center in (("saddle", np.zeros(2)), ("minimum", SADDLE_MINIMUM)):
        part = [r for r in data if r[col["target"]] == target]
        dist = np.array([float(r[col["distance"]]) for r in part])
        closed = np.array([float(r[col["adaptive_closed"]]) for r in part])
        sampled = np.array([float(r[col["adaptive_sampled"]]) for r in part])
        sgd_closed = np.array([float(r[col["sgd_closed"]]) for r in part])
        sgd_sampled = np.array([float(r[col["sgd_sampled"]]) for r in part])
        assert np.all(np.diff(dist) < 0) and dist[-1] == pytest.approx(1e-4)
        # Independent closed form: grad F = h x + 10 x^9, Cov(g) = diag(1, 0.01), s / (1 + s).
        for r, c in zip(dist, closed):
            x = center + r * np.array([1.0, 1.0]) / math.sqrt(2)
            grad = np.array([1.0, -0.1]) * x + 10 * x ** 9
            s = grad[0] ** 2 + grad[1] ** 2 / 0.01
            assert c == pytest.approx(s / (1 + s), rel=2e-5)
            assert float(np.linalg.norm(sp.gradient(x))) == pytest.approx(np.linalg.norm(grad))
        # The claim: the adaptive preconditioner's noise approaches I; SGD's stays 0.99 away.
        assert np.all(np.diff(closed) < 0) and closed[-1] < 1e-6
        assert sampled[-1] < 0.05
        np.testing.assert_allclose(sgd_closed, 0.99, atol=1e-6)
        np.testing.assert_allclose(sgd_sampled, 0.99, atol=0.02)
        assert np.all(np.abs(sampled - closed) < 0.05)

        # The returned summary agrees with the CSV (summary.txt with the summary, below).
        assert summary[f"{target}_closest_distance"] == pytest.approx(dist[-1], rel=1e-5)
        for key, column, row in (("adaptive_closed_at_closest", closed, -1),
                                 ("adaptive_sampled_at_closest", sampled, -1),
                                 ("sgd_closed_at_closest", sgd_closed, -1),
                                 ("sgd_sampled_at_closest", sgd_sampled, -1),
                                 ("adaptive_closed_at_farthest", closed, 0),
                                 ("adaptive_sampled_at_farthest", sampled, 0)):
            assert summary[f"{target}_{key}"] == pytest.approx(column[row], rel=1e-5), key
        assert summary[f"{target}_sgd_sampled_at_closest"] > 20 * summary[
            f"{target}_adaptive_sampled_at_closest"]

    text = (folder / "summary.txt").read_text().splitlines()
    parsed = dict(line.split(": ", 1) for line in text)
    assert set(parsed) == set(summary)
    for key, value in summary.items():
        assert float(parsed[key]) == pytest.approx(float(value), rel=1e-5), key
    assert summary["n"] == 20_000 and summary["seeds"] == 2
    assert 0 < summary["max_sampling_error"] < 0.05


def test_isotropy_experiment_rejects_bad_seeds(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="seeds must be an integer >= 1, got 0"):
        isotropy.run(tmp_path, quick=True, seeds=0, progress=False)
