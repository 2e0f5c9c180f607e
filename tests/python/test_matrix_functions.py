"""saddlescape's inverse matrix roots against independent float64 references.

References are scipy's Schur-based ``fractional_matrix_power`` and ``sqrtm`` (a different algorithm
from the library's LAPACK syevd), or, for matrices built as G = X X^T, the SVD of the factor X
(which knows the null space exactly). Test matrices are unfriendly on purpose: random orthogonal
eigenbases, spectra spread over many decades, random overall scale, rank deficiency, d = 1 and
d = 300, float32, batches.

Error model behind every tolerance (``fwd_tol``, ``bwd_tol``), u = machine epsilon of the dtype:

* Forward error ||A - R||_F / ||R||_F. The map G -> (G + eps I)^(-1/p) has relative condition
  number about kappa / p in the Frobenius norm (the derivative of lambda^(-1/p) at lambda_min,
  times the size lambda_max of a perturbation, over lambda_min^(-1/p)), where kappa is the
  condition number of G + eps I. Both the library and scipy are backward stable, i.e. they
  compute the exact function of G perturbed by a small multiple of u ||G||, so two correct
  implementations differ by about u * kappa. (A kappa^(1/2) scaling would be too optimistic:
  the eigenvalue lambda_min itself is only known to absolute accuracy u * lambda_max; over 40
  seeds the observed error was up to ~0.9 u kappa for kappa in [1e2, 1e12].) When kappa is small
  the rounding of d-term sums dominates instead (observed up to about 4 u d at kappa = 1),
  hence ``4 u (kappa + 2 d)``: a safety factor of at least 2 over the worst case seen in 40
  seeds per test, and still a few units in the last place for small d and kappa.
* Backward error ||A^(-2) - G||_F / ||G||_F. Errors in the large-eigenvalue components of A
  (invisible to the forward measure when kappa is large) show up here; A^(-1) has condition
  number kappa^(1/2), so this measure is tight at ``4 u (sqrt(kappa d) + d)``.
* Newton stops once ||M_k - I||_F / sqrt(d) <= 100 u sqrt(d) (the documented default), so its
  error has that floor on top.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import saddlescape as ss

METHODS = ["eigh", "newton"]
# (form, method) pairs the library supports; newton computes the inv_sqrt form only.
FORM_METHODS = [("inv_sqrt", "eigh"), ("inv_sqrt", "newton"), ("adam", "eigh")]
FLOATS = [np.float32, np.float64]


def _u(dtype) -> float:
    return float(np.finfo(dtype).eps)


def newton_floor(dtype, d: int) -> float:
    """The library's default Newton stopping tolerance, 100 u sqrt(d)."""
    return 100.0 * _u(dtype) * np.sqrt(d)


def fwd_tol(dtype, kappa: float, d: int, method: str = "eigh") -> float:
    """Bound on ||A - R||_F / ||R||_F for a G + eps I of condition kappa (module docstring)."""
    t = 4.0 * _u(dtype) * (kappa + 2 * d)
    if method == "newton":
        t += 2.0 * newton_floor(dtype, d)
    return t


def bwd_tol(dtype, kappa: float, d: int, method: str = "eigh") -> float:
    """Bound on ||A^(-2) - G||_F / ||G||_F (module docstring)."""
    t = 4.0 * _u(dtype) * (np.sqrt(kappa * d) + d)
    if method == "newton":
        t += 4.0 * newton_floor(dtype, d)
    return t


def cond(lam: np.ndarray, eps: float = 0.0) -> float:
    """Condition number of G + eps I (rounding-negative eigenvalues count as 0)."""
    lam = np.maximum(np.asarray(lam, dtype=np.float64), 0.0)
    return float((lam.max() + eps) / (lam.min() + eps))


def cond_adam(lam: np.ndarray, eps: float) -> float:
    """The kappa that plays cond's role for the adam form f(lambda) = 1 / (sqrt(lambda) + eps).

    A perturbation u lambda_max of an eigenvalue lambda changes f by a relative
    u lambda_max / (2 sqrt(lambda) (sqrt(lambda) + eps)), at most u times the value returned here
    (lambda_min is the smallest positive eigenvalue; zero eigenvalues are not covered: see
    test_rank_deficient_adam_with_eps).
    """
    lam = np.asarray(lam, dtype=np.float64)
    lam_min = lam[lam > 0].min()
    return float(lam.max() / max(lam_min, eps * np.sqrt(lam_min)))


def spd_case(helpers, d: int, kappa: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(G, spectrum): random eigenbasis, log-spread spectrum of condition kappa, random scale."""
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.uniform(-3.0, 3.0)
    lam = helpers.log_spectrum(d, kappa, scale)
    return helpers.with_spectrum(lam, rng), lam


def assert_well_formed(a: np.ndarray, g: np.ndarray, dtype) -> None:
    assert isinstance(a, np.ndarray)
    assert a.dtype == dtype
    assert a.shape == g.shape
    assert np.isfinite(a).all()
    assert not np.shares_memory(a, g)


# --------------------------------------------------------------------------------------------
# inv_sqrt: accuracy


@pytest.mark.parametrize(
    ("d", "kappa"), [(1, 1.0), (2, 10.0), (2, 1e6), (9, 10.0), (9, 1e6), (64, 1e3), (64, 1e6)]
)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("eps_rel", [0.0, 1e-3])
def test_inv_sqrt_matches_scipy(helpers, d, kappa, method, eps_rel):
    g, lam = spd_case(helpers, d, kappa, seed=d * 1000 + int(np.log10(kappa)))
    eps = eps_rel * lam.max()
    with helpers.unchanged(g):
        a = ss.inv_sqrt(g, eps, "inv_sqrt", method)
    assert_well_formed(a, g, np.float64)
    np.testing.assert_array_equal(a, a.T)  # exactly symmetric, not just to rounding
    k = cond(lam, eps)
    ref = helpers.ref_inv_root(g, 2, eps)
    assert helpers.rel_err(a, ref) <= fwd_tol(np.float64, k, d, method)
    # A A (G + eps I) = I, with the residual measured as Newton measures it.
    b = g + eps * np.eye(d)
    resid = np.linalg.norm(a @ a @ b - np.eye(d)) / np.sqrt(d)
    assert resid <= fwd_tol(np.float64, k, d, method)


@pytest.mark.parametrize(("d", "kappa"), [(1, 1.0), (2, 1e4), (9, 10.0), (9, 1e6), (64, 1e3)])
@pytest.mark.parametrize("eps_rel", [0.0, 1e-3, 1.0])
def test_adam_form_matches_scipy(helpers, d, kappa, eps_rel):
    g, lam = spd_case(helpers, d, kappa, seed=7 * d + int(np.log10(kappa)))
    eps = eps_rel * np.sqrt(lam.max())  # adam adds eps to G^(1/2), so it scales like sqrt(G)
    with helpers.unchanged(g):
        a = ss.inv_sqrt(g, eps, form="adam")
    assert_well_formed(a, g, np.float64)
    np.testing.assert_array_equal(a, a.T)
    k = cond_adam(lam, eps)
    assert helpers.rel_err(a, helpers.ref_adam(g, eps)) <= fwd_tol(np.float64, k, d)
    # (A^(-1) - eps I)^2 = G: the adam form inverted by hand. Subtracting eps cancels
    # digits in proportion to (sqrt(lambda_max) + eps) / sqrt(lambda_max).
    s = np.linalg.inv(a) - eps * np.eye(d)
    cancellation = 1 + eps_rel
    assert helpers.rel_err(s @ s, g) <= cancellation * bwd_tol(np.float64, cond(lam), d)
    if eps == 0.0:
        # Both forms are G^(-1/2) when eps = 0.
        assert helpers.rel_err(a, ss.inv_sqrt(g)) <= 4 * helpers.EPS64 * d


@pytest.mark.parametrize("kappa", [1e10, 1e12])
@pytest.mark.parametrize("d", [2, 40])
@pytest.mark.parametrize("method", METHODS)
def test_inv_sqrt_ill_conditioned(helpers, kappa, d, method):
    g, lam = spd_case(helpers, d, kappa, seed=31 * d + int(np.log10(kappa)))
    with helpers.unchanged(g):
        a = ss.inv_sqrt(g, method=method)
    assert_well_formed(a, g, np.float64)
    np.testing.assert_array_equal(a, a.T)
    assert helpers.rel_err(a, helpers.ref_inv_root(g, 2)) <= fwd_tol(np.float64, kappa, d, method)
    a_inv = np.linalg.inv(a)
    assert helpers.rel_err(a_inv @ a_inv, g) <= bwd_tol(np.float64, kappa, d, method)


@pytest.mark.parametrize("d", [3, 40])
@pytest.mark.parametrize("method", METHODS)
def test_numerically_singular_needs_eps(helpers, d, method):
    # lambda_min = 1e-18 lambda_max is below the singularity threshold d * u * lambda_max.
    g, lam = spd_case(helpers, d, 1e18, seed=d + 5)
    with helpers.unchanged(g), pytest.raises(ss.NumericalError, match="singular"):
        ss.inv_sqrt(g, method=method)
    eps = 1e-9 * lam.max()
    with helpers.unchanged(g):
        a = ss.inv_sqrt(g, eps, method=method)
    k = cond(lam, eps)
    assert k > 1e8
    # The eigenvalues below d u lambda_max are rounding noise by the library's definition and
    # may be set to zero: a perturbation of up to d u lambda_max rather than a few u lambda_max,
    # which changes f(lambda) = (lambda + eps)^(-1/2) by a relative d u kappa / 2 at most.
    tol = fwd_tol(np.float64, k * (1 + d / 2), d, method)
    assert helpers.rel_err(a, helpers.ref_inv_root(g, 2, eps)) <= tol


@pytest.mark.parametrize(("d", "kappa"), [(1, 1.0), (3, 1e2), (3, 1e4), (40, 1e3), (64, 1e3)])
@pytest.mark.parametrize(("form", "method"), FORM_METHODS)
@pytest.mark.parametrize("eps_rel", [0.0, 1e-3])
def test_float32(helpers, d, kappa, form, method, eps_rel):
    g64, lam = spd_case(helpers, d, kappa, seed=13 * d + int(np.log10(kappa)))
    g = g64.astype(np.float32)
    eps = eps_rel * (lam.max() if form == "inv_sqrt" else np.sqrt(lam.max()))
    with helpers.unchanged(g):
        a = ss.inv_sqrt(g, eps, form, method)
    assert_well_formed(a, g, np.float32)
    np.testing.assert_array_equal(a, a.T)
    # The reference is the exact function of the float32 input, computed in float64.
    g_in = g.astype(np.float64)
    ref = helpers.ref_inv_root(g_in, 2, eps) if form == "inv_sqrt" else helpers.ref_adam(g_in, eps)
    k = cond(lam, eps) if form == "inv_sqrt" else cond_adam(lam, eps)
    assert helpers.rel_err(a, ref) <= fwd_tol(np.float32, k, d, method)


@pytest.mark.parametrize(
    ("dtype", "scale"), [(np.float64, 2.0**-664), (np.float64, 2.0**664),
                         (np.float32, 2.0**-100), (np.float32, 2.0**100)]
)
@pytest.mark.parametrize("method", METHODS)
def test_scale_equivariance(helpers, dtype, scale, method):
    # (s G)^(-1/2) = s^(-1/2) G^(-1/2); s is a power of two, so s G is exact in either dtype and
    # the result (about 1e100 or 1e-100, 1e15 or 1e-15) is representable. Nothing is singular.
    g, lam = spd_case(helpers, 5, 1e2, seed=99)
    g_small = g.astype(dtype)
    g_scaled = g_small * dtype(scale)
    np.testing.assert_array_equal(g_scaled / dtype(scale), g_small)
    a = ss.inv_sqrt(g_scaled, method=method)
    assert_well_formed(a, g_scaled, dtype)
    unscaled = a.astype(np.float64) * np.sqrt(scale)
    ref = helpers.ref_inv_root(g_small.astype(np.float64), 2)
    assert helpers.rel_err(unscaled, ref) <= fwd_tol(dtype, 1e2, 5, method)


# --------------------------------------------------------------------------------------------
# rank-deficient G and rounding-negative eigenvalues


@pytest.mark.parametrize(("d", "r"), [(2, 1), (8, 3), (60, 10)])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("eps_rel", [1e-6, 1e-2])
def test_rank_deficient_inv_sqrt_with_eps(helpers, d, r, method, eps_rel):
    rng = np.random.default_rng(100 * d + r)
    g, x = helpers.low_rank(d, r, rng)
    lam_max = np.linalg.norm(x, 2) ** 2
    eps = eps_rel * lam_max
    with helpers.unchanged(g):
        a = ss.inv_sqrt(g, eps, method=method)
    assert_well_formed(a, g, np.float64)
    np.testing.assert_array_equal(a, a.T)
    k = (lam_max + eps) / eps
    # Against scipy on the same (rounded) G + eps I ...
    assert helpers.rel_err(a, helpers.ref_inv_root(g, 2, eps)) <= fwd_tol(np.float64, k, d, method)
    # ... and against the SVD of X, which has exact zeros: forming X X^T in floating point is a
    # further perturbation of about r u lambda_max, so the condition number counts r times.
    ref = helpers.ref_from_factor(x, eps, "inv_sqrt")
    assert helpers.rel_err(a, ref) <= fwd_tol(np.float64, r * k, d, method)


@pytest.mark.parametrize(("d", "r"), [(2, 1), (8, 3), (60, 10)])
@pytest.mark.parametrize("eps_rel", [1e-2, 1.0])
def test_rank_deficient_adam_with_eps(helpers, d, r, eps_rel):
    rng = np.random.default_rng(200 * d + r)
    g, x = helpers.low_rank(d, r, rng)
    lam_max = np.linalg.norm(x, 2) ** 2
    eps = eps_rel * np.sqrt(lam_max)
    with helpers.unchanged(g):
        a = ss.inv_sqrt(g, eps, form="adam")
    assert_well_formed(a, g, np.float64)
    np.testing.assert_array_equal(a, a.T)
    # The null space of the rounded G carries eigenvalues delta of up to d u lambda_max (those
    # the library keeps rather than clips); sqrt is not Lipschitz at 0, so 1 / (sqrt(delta) + eps)
    # differs from 1 / eps by a relative sqrt(delta) / eps. That, not kappa, bounds this case.
    lam = np.linalg.svd(x, compute_uv=False) ** 2
    tol = 4.0 * np.sqrt(d * helpers.EPS64 * lam_max) / eps + fwd_tol(np.float64,
                                                                     cond_adam(lam, eps), d)
    assert helpers.rel_err(a, helpers.ref_from_factor(x, eps, "adam")) <= tol


def _rounding_negative_psd(helpers) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(G, X, eigenvalues) with G = X X^T of rank 5 in dimension 20 whose computed spectrum has
    eigenvalues that are negative through rounding only."""
    g, x = helpers.low_rank(20, 5, np.random.default_rng(2024))
    w = np.linalg.eigvalsh(g)
    # The premise of the test, checked rather than assumed.
    assert w.min() < 0.0
    assert w.min() > -20 * helpers.EPS64 * w.max()
    return g, x, w


@pytest.mark.parametrize(("form", "method"), FORM_METHODS)
def test_rounding_negative_eigenvalues_are_clipped(helpers, form, method):
    g, x, w = _rounding_negative_psd(helpers)
    eps = 1e-3 * w.max() if form == "inv_sqrt" else 0.1 * np.sqrt(w.max())
    with helpers.unchanged(g):
        a = ss.inv_sqrt(g, eps, form, method)
    assert_well_formed(a, g, np.float64)
    np.testing.assert_array_equal(a, a.T)
    # The reference with the negative eigenvalues clipped to zero, in the test's own float64.
    vals, vecs = np.linalg.eigh(g)
    clipped = np.maximum(vals, 0.0)
    f = 1 / np.sqrt(clipped + eps) if form == "inv_sqrt" else 1 / (np.sqrt(clipped) + eps)
    ref = (vecs * f) @ vecs.T
    if form == "inv_sqrt":
        tol = fwd_tol(np.float64, (w.max() + eps) / eps, 20, method)
    else:  # see test_rank_deficient_adam_with_eps
        lam = np.linalg.svd(x, compute_uv=False) ** 2
        tol = (4.0 * np.sqrt(20 * helpers.EPS64 * w.max()) / eps
               + fwd_tol(np.float64, cond_adam(lam, eps), 20))
    assert helpers.rel_err(a, ref) <= tol
    # The SVD of X knows the exact X X^T, which forming G perturbs by about r u lambda_max with
    # r = 5 (see test_rank_deficient_inv_sqrt_with_eps).
    assert helpers.rel_err(a, helpers.ref_from_factor(x, eps, form)) <= 5 * tol
    # Without eps the same matrix is singular.
    with helpers.unchanged(g), pytest.raises(ss.NumericalError, match="singular"):
        ss.inv_sqrt(g, 0.0, form, method)


@pytest.mark.parametrize("form", ["inv_sqrt", "adam"])
def test_clipping_is_exact_on_a_diagonal_matrix(helpers, form):
    # d = 2, lambda_max = 1: eigenvalues >= -2 u = -4.4e-16 are rounding noise and become 0.
    g = np.diag([1.0, -2e-16])
    eps = 1e-12 if form == "inv_sqrt" else 1e-6
    with helpers.unchanged(g):
        a = ss.inv_sqrt(g, eps, form)
    # Clipped: f(0) = 1e6 in both forms. Unclipped would be 1e6 * (1 + 1e-4) for inv_sqrt and
    # NaN (the square root of a negative number) for adam.
    np.testing.assert_allclose(np.diag(a), [1 / np.sqrt(1 + eps) if form == "inv_sqrt"
                                            else 1 / (1 + eps), 1e6], rtol=1e-12)
    np.testing.assert_array_equal(a[0, 1], 0.0)


@pytest.mark.parametrize("method", METHODS)
def test_clearly_negative_eigenvalue_just_beyond_rounding_is_rejected(helpers, method):
    # Even though eps makes G + eps I positive definite: G itself must be PSD.
    g = np.diag([1.0, -1e-15])  # below -d u lambda_max = -4.4e-16
    with helpers.unchanged(g), pytest.raises(ValueError, match=r"eigenvalue -1e-15\b"):
        ss.inv_sqrt(g, 1e-3, method=method)


# --------------------------------------------------------------------------------------------
# large d


@pytest.fixture(scope="module")
def large_spd(helpers):
    """d = 300, condition 1e4, and its scipy references (computed once: they take ~0.3 s)."""
    d = 300
    lam = helpers.log_spectrum(d, 1e4, 3.0)
    g = helpers.with_spectrum(lam, np.random.default_rng(400))
    eps = 1e-6
    return g, lam, eps, helpers.ref_inv_root(g, 2, eps), helpers.ref_adam(g, eps)


@pytest.mark.parametrize(("form", "method"), FORM_METHODS)
def test_large_dimension(helpers, large_spd, form, method):
    g, lam, eps, ref, ref_adam = large_spd
    d = g.shape[0]
    with helpers.unchanged(g):
        a = ss.inv_sqrt(g, eps, form, method)
    assert_well_formed(a, g, np.float64)
    np.testing.assert_array_equal(a, a.T)
    expected = ref if form == "inv_sqrt" else ref_adam
    k = cond(lam, eps) if form == "inv_sqrt" else cond_adam(lam, eps)
    assert helpers.rel_err(a, expected) <= fwd_tol(np.float64, k, d, method)
    v = np.random.default_rng(401).standard_normal((d, 3))
    with helpers.unchanged(g, v):
        out = ss.inv_sqrt_apply(g, v, eps, form, method=method)
    err = np.linalg.norm(out - expected @ v) / (np.linalg.norm(expected, 2) * np.linalg.norm(v))
    assert err <= fwd_tol(np.float64, k, d, method)


# --------------------------------------------------------------------------------------------
# inv_root


@pytest.mark.parametrize("p", [1, 2, 3, 4])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("d", "kappa"), [(1, 1.0), (6, 1e4), (30, 1e8)])
@pytest.mark.parametrize("eps_rel", [0.0, 1e-2])
def test_inv_root_matches_scipy(helpers, p, method, d, kappa, eps_rel):
    g, lam = spd_case(helpers, d, kappa, seed=17 * d + p)
    eps = eps_rel * lam.max()
    with helpers.unchanged(g):
        a = ss.inv_root(g, p, eps, method)
    assert_well_formed(a, g, np.float64)
    np.testing.assert_array_equal(a, a.T)
    k = cond(lam, eps)
    assert helpers.rel_err(a, helpers.ref_inv_root(g, p, eps)) <= fwd_tol(np.float64, k, d, method)
    # A^p (G + eps I) = I; a relative error e in A is p e in A^p.
    resid = np.linalg.matrix_power(a, p) @ (g + eps * np.eye(d)) - np.eye(d)
    assert np.linalg.norm(resid) / np.sqrt(d) <= p * fwd_tol(np.float64, k, d, method)


def test_inv_root_special_cases(helpers):
    g, _ = spd_case(helpers, 7, 1e3, seed=3)
    assert helpers.rel_err(ss.inv_root(g, 1), np.linalg.inv(g)) <= fwd_tol(np.float64, 1e3, 7)
    # p = 2 is inv_sqrt: the same function by the same algorithm, so equal up to rounding.
    assert helpers.rel_err(ss.inv_root(g, 2, 0.5), ss.inv_sqrt(g, 0.5)) <= 4 * helpers.EPS64 * 7
    # p and eps given as numpy scalars.
    a = ss.inv_root(g, np.int64(3), np.float32(0.25))
    assert helpers.rel_err(a, helpers.ref_inv_root(g, 3, 0.25)) <= fwd_tol(np.float64, 1e3, 7)


@pytest.mark.parametrize("p", [1, 3])
@pytest.mark.parametrize("method", METHODS)
def test_inv_root_float32(helpers, p, method):
    g64, lam = spd_case(helpers, 12, 1e3, seed=p)
    g = g64.astype(np.float32)
    with helpers.unchanged(g):
        a = ss.inv_root(g, p, method=method)
    assert_well_formed(a, g, np.float32)
    ref = helpers.ref_inv_root(g.astype(np.float64), p)
    assert helpers.rel_err(a, ref) <= fwd_tol(np.float32, 1e3, 12, method)


@pytest.mark.parametrize("p", [2**31, 2**40])
def test_inv_root_huge_p_is_computed_or_a_value_error(helpers, p):
    # An integer p >= 1 is valid input; if the library cannot take it, a ValueError naming p is
    # the documented way to say so, not a TypeError from the binding layer.
    g, _ = spd_case(helpers, 3, 10.0, seed=1)
    try:
        a = ss.inv_root(g, p)
    except ValueError as e:
        assert re.search(r"\bp\b", str(e)), str(e)
    else:
        assert helpers.rel_err(a, helpers.ref_inv_root(g, p)) <= fwd_tol(np.float64, 10.0, 3)


# --------------------------------------------------------------------------------------------
# inv_sqrt_apply


@pytest.mark.parametrize("d", [1, 7, 50])
@pytest.mark.parametrize("k", [None, 1, 4])
@pytest.mark.parametrize(("form", "method"), FORM_METHODS)
@pytest.mark.parametrize("eps_rel", [0.0, 1e-3])
def test_apply_matches_reference(helpers, d, k, form, method, eps_rel):
    g, lam = spd_case(helpers, d, 1e4, seed=23 * d + (k or 0))
    rng = np.random.default_rng(d + 1000 * (k or 0))
    v = rng.standard_normal(d if k is None else (d, k))
    eps = eps_rel * (lam.max() if form == "inv_sqrt" else np.sqrt(lam.max()))
    with helpers.unchanged(g, v):
        out = ss.inv_sqrt_apply(g, v, eps, form, method=method)
    assert isinstance(out, np.ndarray)
    assert out.shape == v.shape
    assert out.dtype == np.float64
    assert np.isfinite(out).all()
    ref = helpers.ref_inv_root(g, 2, eps) if form == "inv_sqrt" else helpers.ref_adam(g, eps)
    scale = np.linalg.norm(ref, 2) * np.linalg.norm(v)
    kappa = cond(lam, eps) if form == "inv_sqrt" else cond_adam(lam, eps)
    tol = fwd_tol(np.float64, kappa, d, method)
    assert np.linalg.norm(out - ref @ v) / scale <= tol
    # The same as forming A first.
    a = ss.inv_sqrt(g, eps, form, method)
    assert np.linalg.norm(out - a @ v) / scale <= tol


@pytest.mark.parametrize("method", METHODS)
def test_apply_zero_columns(helpers, method):
    g, _ = spd_case(helpers, 4, 10.0, seed=4)
    v = np.zeros((4, 0))
    out = ss.inv_sqrt_apply(g, v, method=method)
    assert out.shape == (4, 0)
    assert out.dtype == np.float64


@pytest.mark.parametrize(("form", "method"), FORM_METHODS)
def test_apply_float32(helpers, form, method):
    g64, lam = spd_case(helpers, 16, 1e3, seed=16)
    g = g64.astype(np.float32)
    v = np.random.default_rng(16).standard_normal((16, 3)).astype(np.float32)
    with helpers.unchanged(g, v):
        out = ss.inv_sqrt_apply(g, v, 1e-4, form, method=method)
    assert out.dtype == np.float32
    assert out.shape == v.shape
    g_in = g.astype(np.float64)
    ref = (helpers.ref_inv_root(g_in, 2, 1e-4) if form == "inv_sqrt"
           else helpers.ref_adam(g_in, 1e-4))
    err = np.linalg.norm(out - ref @ v) / (np.linalg.norm(ref, 2) * np.linalg.norm(v))
    assert err <= fwd_tol(np.float32, 1e3, 16, method)


@pytest.mark.parametrize(("g_dtype", "v_dtype"), [(np.float32, np.float64),
                                                  (np.float64, np.float32)])
def test_apply_promotes_mixed_dtypes(helpers, g_dtype, v_dtype):
    g64, _ = spd_case(helpers, 6, 1e2, seed=6)
    g = g64.astype(g_dtype)
    v = np.random.default_rng(6).standard_normal((6, 2)).astype(v_dtype)
    with helpers.unchanged(g, v):
        out = ss.inv_sqrt_apply(g, v, 1e-3)
    assert out.dtype == np.float64
    # Exactly what the float64 computation on the promoted inputs gives.
    expected = ss.inv_sqrt_apply(g.astype(np.float64), v.astype(np.float64), 1e-3)
    np.testing.assert_array_equal(out, expected)


def test_apply_accepts_lists(helpers):
    g = [[4.0, 1.0], [1.0, 3.0]]
    out = ss.inv_sqrt_apply(g, [1.0, -2.0], 0.5)
    ref = helpers.ref_inv_root(np.array(g), 2, 0.5) @ np.array([1.0, -2.0])
    np.testing.assert_allclose(out, ref, rtol=1e-14, atol=1e-15)


# --------------------------------------------------------------------------------------------
# diag_inv_sqrt


def _diag_reference(v: np.ndarray, eps: float, form: str) -> np.ndarray:
    x = v.astype(np.float64)
    return 1.0 / np.sqrt(x + eps) if form == "inv_sqrt" else 1.0 / (np.sqrt(x) + eps)


@pytest.mark.parametrize("shape", [(), (1,), (17,), (3, 5), (2, 3, 4)])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("form", ["inv_sqrt", "adam"])
@pytest.mark.parametrize("eps", [0.0, 1e-8, 0.5])
def test_diag_matches_reference(helpers, shape, dtype, form, eps):
    rng = np.random.default_rng(len(shape) + 10 * len(str(eps)))
    # Entries over 60 decades (inside float32's range too), zeros where eps > 0.
    v = (10.0 ** rng.uniform(-30, 30, size=shape)).astype(dtype)
    if eps > 0 and v.size > 1:
        v.reshape(-1)[:: 3] = 0.0
    with helpers.unchanged(v):
        out = ss.diag_inv_sqrt(v, eps, form)
    assert isinstance(out, np.ndarray)
    assert out.shape == v.shape
    assert out.dtype == dtype
    assert np.isfinite(out).all()
    # Elementwise, a handful of correctly rounded operations: 2 u relative.
    np.testing.assert_allclose(out, _diag_reference(v, eps, form), rtol=2 * _u(dtype), atol=0)


def test_diag_float32_subnormal_entries(helpers):
    v = np.array([1e-40, 1e-45, 1e-38], dtype=np.float32)  # the first two are subnormal
    assert v[1] > 0
    out = ss.diag_inv_sqrt(v)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, _diag_reference(v, 0.0, "inv_sqrt"), rtol=2 * helpers.EPS32)


@pytest.mark.parametrize(("dtype", "form", "eps"), [
    (np.float64, "inv_sqrt", 0.0), (np.float64, "adam", 1e-3), (np.float32, "inv_sqrt", 1e-3),
    (np.float32, "adam", 0.25),
    # eps = 1e-50 is below float32's range, but (0 + 1e-50)^(-1/2) = 1e25 is not.
    (np.float32, "inv_sqrt", 1e-50),
])
def test_diag_agrees_with_the_matrix_function_on_diagonal_matrices(helpers, dtype, form, eps):
    # A dynamic range of 3e4, well inside 1 / (d u) for float32, so that the matrix function
    # does not count the small entries as rounding noise around zero.
    v = np.array([0.0 if eps > 0 else 1e-3, 2e-3, 1.0, 30.0], dtype=dtype)
    expected = np.diag(ss.inv_sqrt(np.diag(v), eps, form))
    out = ss.diag_inv_sqrt(v, eps, form)
    assert out.dtype == dtype
    np.testing.assert_allclose(out, expected, rtol=8 * _u(dtype), atol=0)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize(("bad", "exc", "message"), [
    (-1.0, ValueError, r"v\[6\] = -1\b"),
    (-1e-30, ValueError, r"v\[6\] = -1e-30\b"),
    (np.nan, ValueError, r"v\[6\] = nan"),
    (np.inf, ValueError, r"v\[6\] = inf"),
    (-np.inf, ValueError, r"v\[6\] = -inf"),
    (0.0, ss.NumericalError, r"v\[6\] = 0\b"),
])
def test_diag_bad_entries(helpers, dtype, bad, exc, message):
    v = np.arange(1.0, 13.0, dtype=dtype).reshape(3, 4)
    v[1, 2] = bad  # flat index 6
    with helpers.unchanged(v), pytest.raises(exc, match=message):
        ss.diag_inv_sqrt(v, 0.0)
    if exc is ValueError:  # a bad entry stays bad with damping
        with pytest.raises(ValueError, match=message):
            ss.diag_inv_sqrt(v, 1.0, "adam")
    else:
        assert np.isfinite(ss.diag_inv_sqrt(v, 1e-6)).all()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"eps": -1e-3}, r"eps must be a finite number >= 0, got -0\.001"),
    ({"eps": np.nan}, r"eps must be a finite number >= 0, got nan"),
    ({"eps": np.inf}, r"eps must be a finite number >= 0, got inf"),
    ({"eps": "abc"}, r"eps must be a real number, got 'abc'"),
    ({"form": "sqrt"}, r"form must be 'inv_sqrt' or 'adam', got 'sqrt'"),
])
def test_diag_bad_arguments(helpers, kwargs, message):
    v = np.ones(3)
    with helpers.unchanged(v), pytest.raises(ValueError, match=message):
        ss.diag_inv_sqrt(v, **kwargs)


@pytest.mark.parametrize("dtype", [np.int64, np.bool_, np.complex128, np.float16])
def test_diag_rejects_non_float_dtypes(helpers, dtype):
    v = np.ones(3, dtype=dtype)
    with helpers.unchanged(v), pytest.raises(ValueError, match=np.dtype(dtype).name):
        ss.diag_inv_sqrt(v, 1.0)


def test_diag_overflow_is_numerical_error():
    # eps = 1e-50 rounds to 0 in float32 and 1 / (sqrt(0) + 1e-50) = 1e50 exceeds float32.
    with pytest.raises(ss.NumericalError, match=r"v\[1\]"):
        ss.diag_inv_sqrt(np.array([1.0, 0.0], dtype=np.float32), 1e-50, "adam")


def test_diag_accepts_lists_and_scalars():
    np.testing.assert_allclose(ss.diag_inv_sqrt([4.0, 0.25]), [0.5, 2.0], rtol=1e-15)
    out = ss.diag_inv_sqrt(4.0, 5.0)
    assert out.shape == ()
    np.testing.assert_allclose(out, 1 / 3, rtol=1e-15)
    assert ss.diag_inv_sqrt(np.zeros(0)).shape == (0,)


# --------------------------------------------------------------------------------------------
# batches


def _batch(helpers, dtype, seed: int):
    """Five 4 x 4 members as (G, X) with G = X X^T: spectra from well to ill conditioned, one
    member of rank 2, each with its own scale."""
    rng = np.random.default_rng(seed)
    d = 4
    kappas = [1.0, 1e2, 1e3 if dtype == np.float32 else 1e8, None, 10.0]
    gs, xs = [], []
    for kappa in kappas:
        if kappa is None:
            x = rng.standard_normal((d, 2))
        else:
            lam = helpers.log_spectrum(d, kappa, 10.0 ** rng.uniform(-2, 2))
            x = helpers.random_orthogonal(d, rng) * np.sqrt(lam)
        g = x @ x.T
        gs.append((g + g.T) / 2)
        xs.append(x)
    return np.stack(gs).astype(dtype), xs


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize(("form", "method"), FORM_METHODS)
def test_batch_matches_members(helpers, dtype, form, method):
    gb, xs = _batch(helpers, dtype, seed=5)
    eps = 1e-3 if form == "inv_sqrt" else 3e-2
    with helpers.unchanged(gb):
        ab = ss.inv_sqrt(gb, eps, form, method)
    assert_well_formed(ab, gb, dtype)
    np.testing.assert_array_equal(ab, ab.transpose(0, 2, 1))
    for i, (g, x) in enumerate(zip(gb, xs)):
        lam = np.linalg.svd(x, compute_uv=False) ** 2
        lam = np.concatenate([lam, np.zeros(4 - lam.size)])
        k = cond(lam, eps) if form == "inv_sqrt" else cond_adam(lam, eps)
        tol = fwd_tol(dtype, k, 4, method)
        if form == "adam" and lam.min() == 0:  # see test_rank_deficient_adam_with_eps
            tol += 4.0 * np.sqrt(4 * _u(dtype) * lam.max()) / eps
        ref_exact = g.astype(np.float64)
        ref = (helpers.ref_inv_root(ref_exact, 2, eps) if form == "inv_sqrt"
               else (helpers.ref_adam(ref_exact, eps) if lam.min() > 0
                     else helpers.ref_from_factor(x, eps, form)))
        assert helpers.rel_err(ab[i], ref) <= tol, i
        # Each member as the single call computes it (the same algorithm: rounding only, d = 4).
        single = ss.inv_sqrt(g, eps, form, method)
        assert helpers.rel_err(ab[i], single) <= 4 * 4 * _u(dtype), i


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("d", [1, 3])
def test_empty_batch(dtype, method, d):
    gb = np.zeros((0, d, d), dtype=dtype)
    out = ss.inv_sqrt(gb, method=method)
    assert out.shape == (0, d, d)
    assert out.dtype == dtype
    assert ss.inv_root(gb, 3, 1.0).shape == (0, d, d)


def _member_with(kind: str) -> np.ndarray:
    g = np.diag([2.0, 1.0, 0.5])
    if kind == "nan":
        g[1, 0] = np.nan
    elif kind == "inf":
        g[0, 2] = np.inf
    elif kind == "asymmetric":
        g[2, 1] = 1e-6
    elif kind == "negative":
        g = np.diag([2.0, 1.0, -0.5])
    elif kind == "singular":
        g = np.diag([2.0, 1.0, 0.0])
    return g


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("kind", "index", "exc", "message"), [
    ("nan", 2, ValueError, "G[2] has a non-finite entry G[2][1, 0] = nan"),
    ("inf", 4, ValueError, "G[4] has a non-finite entry G[4][0, 2] = inf"),
    ("asymmetric", 3, ValueError, "G[3] is not symmetric: |G[3][2, 1] - G[3][1, 2]|"),
    ("negative", 1, ValueError, "G[1] is not positive semidefinite: it has the eigenvalue -0.5"),
    ("singular", 0, ss.NumericalError, "G[0] is singular"),
])
def test_batch_names_the_bad_member(helpers, method, kind, index, exc, message):
    rng = np.random.default_rng(index)
    gb = np.stack([helpers.with_spectrum([3.0, 1.0, 0.2], rng) for _ in range(5)])
    gb[index] = _member_with(kind)
    with helpers.unchanged(gb), pytest.raises(exc, match=re.escape(message)):
        ss.inv_sqrt(gb, method=method)


def _big_batch(helpers, n: int, d: int, dtype, seed: int) -> tuple[np.ndarray, list[str], float]:
    """n members of three kinds in turn, each with its own eigenbasis and a scale in [0.1, 10]:
    random SPD (condition 1e2), rank-deficient (X X^T with rank d // 2, so d = 1 gives G = 0),
    and ill-conditioned (condition 1e12, past float32's precision). Returns (G, kinds, eps): the
    eps > 0 that every member needs, 1e-8 (float64) or 1e-3 (float32) times the largest scale."""
    rng = np.random.default_rng(seed)
    gs, kinds = [], []
    for i in range(n):
        kind = ("spd", "rank-deficient", "ill-conditioned")[i % 3]
        scale = 10.0 ** rng.uniform(-1, 1)
        if kind == "rank-deficient":
            g = helpers.with_spectrum(np.r_[np.zeros(d - d // 2), scale * rng.uniform(0.1, 1, d // 2)],
                                      rng)
        else:
            g = helpers.with_spectrum(helpers.log_spectrum(d, 1e2 if kind == "spd" else 1e12, scale),
                                      rng)
        gs.append(g)
        kinds.append(kind)
    eps = (1e-8 if dtype == np.float64 else 1e-3) * 10.0
    return np.stack(gs).astype(dtype), kinds, eps


def _eigh_reference(g: np.ndarray, eps: float, u: float) -> tuple[np.ndarray, float]:
    """(G + eps I)^(-1/2) of the member as given, by np.linalg.eigh in float64 with the library's
    clipping of |lambda| <= d u max|lambda| to 0, and the condition number of G + eps I."""
    lam, v = np.linalg.eigh(g.astype(np.float64))
    lam = np.where(lam <= g.shape[0] * u * np.abs(lam).max(), 0.0, lam)
    return (v / np.sqrt(lam + eps)) @ v.T, cond(lam, eps)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("d", [1, 5, 16, 31, 32, 33, 64])
def test_large_batch_matches_float64_eigh(helpers, dtype, d):
    # 300 members: enough for several threads, several lockstep groups and a partial last one.
    gb, kinds, eps = _big_batch(helpers, 300, d, dtype, seed=d)
    u = _u(dtype)
    with helpers.unchanged(gb):
        ab = ss.inv_sqrt(gb, eps)
    assert_well_formed(ab, gb, dtype)
    np.testing.assert_array_equal(ab, ab.transpose(0, 2, 1))
    for i, (g, kind) in enumerate(zip(gb, kinds)):
        ref, k = _eigh_reference(g, eps, u)
        # Members with eigenvalues at the clipping threshold d u lambda_max may have them set to
        # zero here and not there: a perturbation of d u lambda_max (test_numerically_singular_
        # needs_eps), in the float32 ill-conditioned and in the rank-deficient members.
        if kind != "spd":
            k *= 1 + d / 2
        assert helpers.rel_err(ab[i], ref) <= fwd_tol(dtype, k, d), (i, kind)
    # A member's result does not depend on its batch: the single call computes the same bits.
    for i in (0, 1, 2, 7, 299):
        np.testing.assert_array_equal(ab[i], ss.inv_sqrt(gb[i], eps), strict=True)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("d", [16, 150])
@pytest.mark.parametrize(("first", "second", "message"), [
    ("nan", "nan", "G[{i}] has a non-finite entry G[{i}][1, 0] = nan"),
    ("negative", "nan", "G[{i}] is not positive semidefinite: it has the eigenvalue -"),
    ("nan", "negative", "G[{i}] has a non-finite entry G[{i}][1, 0] = nan"),
])
@pytest.mark.parametrize(("i", "j"), [(7, 200), (5, 6)])
def test_large_batch_names_the_lowest_bad_member(helpers, dtype, method, d, first, second,
                                                  message, i, j):
    # With threads (several matrices at once) and lockstep groups (G[5] and G[6] are decomposed
    # together, and G[6]'s input check fails before G[5]'s eigenvalues exist), the error is still
    # the one a loop over the members would meet first.
    n = 300 if d == 16 else 40
    j = min(j, n - 1)
    rng = np.random.default_rng(d)
    gb = np.stack([helpers.with_spectrum(rng.uniform(1, 2, d), rng) for _ in range(n)])
    for idx, kind in ((i, first), (j, second)):
        if kind == "nan":
            gb[idx, 1, 0] = np.nan
        else:
            gb[idx] = helpers.with_spectrum(np.r_[-1.0, np.ones(d - 1)], rng)
    gb = gb.astype(dtype)
    with helpers.unchanged(gb), pytest.raises(ValueError, match=re.escape(message.format(i=i))):
        ss.inv_sqrt(gb, 1e-3, method=method)


def test_batch_results_do_not_depend_on_the_thread_count():
    # SADDLESCAPE_NUM_THREADS is read once per process, hence the subprocesses. The cases cover
    # the lockstep solver (d = 16, 64, with a partial last group), LAPACK (d = 150, with
    # OpenBLAS made single-threaded under the library's threads) and Newton.
    script = textwrap.dedent(
        """
        import hashlib
        import numpy as np, saddlescape as ss
        rng = np.random.default_rng(3)
        h = hashlib.sha256()
        for n, d, method in [(301, 16, "eigh"), (67, 64, "eigh"), (24, 150, "eigh"),
                             (40, 24, "newton")]:
            x = rng.standard_normal((n, d, d + 3))
            g = x @ x.transpose(0, 2, 1)
            for dtype in (np.float32, np.float64):
                h.update(ss.inv_sqrt(g.astype(dtype), 1e-3, method=method).tobytes())
                h.update(ss.inv_root(g.astype(dtype), 3, 1e-3, method=method).tobytes())
        print(h.hexdigest())
        """
    )
    outs = []
    for threads in ("1", "2", "3", None):
        env = dict(os.environ)
        env.pop("SADDLESCAPE_NUM_THREADS", None)
        if threads is not None:
            env["SADDLESCAPE_NUM_THREADS"] = threads
        outs.append(subprocess.run([sys.executable, "-c", script], env=env, check=True,
                                   capture_output=True, text=True, timeout=300).stdout)
    assert len(outs[0]) == 65 and len(set(outs)) == 1, outs


# --------------------------------------------------------------------------------------------
# bad input, for every matrix function


def _apply(g, **kw):
    g = np.asarray(g)
    d = g.shape[0] if g.ndim >= 1 else 1
    dtype = g.dtype if g.dtype.kind == "f" else np.float64
    return ss.inv_sqrt_apply(g, np.ones(d, dtype=dtype), **kw)


CALLS = {
    "inv_sqrt": lambda g, **kw: ss.inv_sqrt(g, **kw),
    "inv_sqrt-adam": lambda g, **kw: ss.inv_sqrt(g, form="adam", **kw),
    "inv_sqrt-newton": lambda g, **kw: ss.inv_sqrt(g, method="newton", **kw),
    "inv_root": lambda g, **kw: ss.inv_root(g, 3, **kw),
    "inv_root-newton": lambda g, **kw: ss.inv_root(g, 3, method="newton", **kw),
    "inv_sqrt_apply": _apply,
    "inv_sqrt_apply-newton": lambda g, **kw: _apply(g, method="newton", **kw),
}
CALL_IDS = list(CALLS)


@pytest.mark.parametrize("call", CALL_IDS)
@pytest.mark.parametrize(("shape", "message"), [
    ((3,), r"G must have shape \(d, d\).* got shape \(3,\)"),
    ((1, 2, 2, 2), r"G must have shape \(d, d\).* got shape \(1, 2, 2, 2\)"),
    ((2, 3), r"G must be square, got shape \(2, 3\)"),
    ((0, 0), r"G must have dimension d >= 1, got d = 0"),
])
def test_bad_shapes(helpers, call, shape, message):
    g = np.ones(shape)
    with helpers.unchanged(g), pytest.raises(ValueError, match=message):
        CALLS[call](g, eps=1.0)


@pytest.mark.parametrize("call", ["inv_sqrt", "inv_root"])
@pytest.mark.parametrize(("shape", "message"), [
    ((2, 2, 3), r"G must be square, got shape \(2, 2, 3\)"),
    ((2, 0, 0), r"G must have dimension d >= 1, got d = 0"),
])
def test_bad_batch_shapes(helpers, call, shape, message):
    g = np.ones(shape)
    with helpers.unchanged(g), pytest.raises(ValueError, match=message):
        CALLS[call](g, eps=1.0)


@pytest.mark.parametrize("call", CALL_IDS)
@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.bool_, np.complex128, np.float16])
def test_bad_dtypes(helpers, call, dtype):
    g = np.eye(3, dtype=dtype)
    with helpers.unchanged(g), pytest.raises(
        ValueError, match=rf"G must have dtype float32 or float64, got {np.dtype(dtype).name}"
    ):
        CALLS[call](g, eps=1.0)


@pytest.mark.parametrize("call", CALL_IDS)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize(("pos", "bad", "shown"), [
    ((2, 1), np.nan, "nan"), ((1, 2), np.inf, "inf"), ((3, 3), -np.inf, "-inf"),
])
def test_non_finite_entries_are_named(helpers, call, dtype, pos, bad, shown):
    g, _ = spd_case(helpers, 4, 10.0, seed=1)
    g = g.astype(dtype)
    g[pos] = bad
    message = re.escape(f"G has a non-finite entry G[{pos[0]}, {pos[1]}] = {shown}")
    with helpers.unchanged(g), pytest.raises(ValueError, match=message):
        CALLS[call](g, eps=1.0)


@pytest.mark.parametrize("call", CALL_IDS)
@pytest.mark.parametrize("dtype", FLOATS)
def test_asymmetry_beyond_tolerance_is_rejected(helpers, call, dtype):
    g, _ = spd_case(helpers, 5, 10.0, seed=2)
    g = g.astype(dtype)
    g[3, 0] += dtype(2 * 1000 * _u(dtype) * np.abs(g).max())  # twice the documented tolerance
    message = re.escape("G is not symmetric: |G[3, 0] - G[0, 3]|")
    with helpers.unchanged(g), pytest.raises(ValueError, match=message):
        CALLS[call](g, eps=1.0)
    g[3, 0] = g[0, 3] + dtype(1e-3 * np.abs(g).max())  # and a gross one
    with helpers.unchanged(g), pytest.raises(ValueError, match=message):
        CALLS[call](g, eps=1.0)


@pytest.mark.parametrize("call", CALL_IDS)
@pytest.mark.parametrize(("dtype", "rel"), [
    (np.float64, 1e-15), (np.float64, 0.5 * 1000 * 2.0**-52),
    (np.float32, 1e-6), (np.float32, 0.5 * 1000 * 2.0**-23),
])
def test_tiny_asymmetry_is_accepted_and_averaged(helpers, call, dtype, rel):
    g, _ = spd_case(helpers, 5, 10.0, seed=3)
    g = g.astype(dtype)
    g[4, 1] += dtype(rel * np.abs(g).max())
    assert g[4, 1] != g[1, 4]
    with helpers.unchanged(g):
        out = CALLS[call](g, eps=0.1)
    # The library averages the triangles, (a + b) / 2 in the input's dtype, as numpy does here.
    averaged = (g + g.T) / 2
    expected = CALLS[call](averaged, eps=0.1)
    assert helpers.rel_err(out, expected) <= 4 * _u(dtype) * 5


@pytest.mark.parametrize("call", CALL_IDS)
def test_clearly_negative_eigenvalue_is_named(helpers, call):
    g = helpers.with_spectrum([2.0, 1.0, -0.25], np.random.default_rng(8))
    with helpers.unchanged(g), pytest.raises(ValueError, match=r"eigenvalue -0\.(25|2499999\d*)\b"):
        CALLS[call](g)


@pytest.mark.parametrize("call", CALL_IDS)
@pytest.mark.parametrize("kind", ["exact zero", "rank deficient", "zero matrix",
                                  "numerically singular"])
def test_singular_without_eps_is_numerical_error(helpers, call, kind):
    rng = np.random.default_rng(9)
    if kind == "exact zero":
        g = np.diag([2.0, 1.0, 0.0])
    elif kind == "rank deficient":
        g, _ = helpers.low_rank(6, 2, rng)
    elif kind == "zero matrix":
        g = np.zeros((3, 3))
    else:
        # lambda_min = 1e-20 lambda_max: far below the documented singularity threshold
        # d * u * lambda_max; what any method could return here is set by rounding noise.
        g = helpers.with_spectrum([1.0, 1e-20], rng)
    with helpers.unchanged(g), pytest.raises(ss.NumericalError, match="singular"):
        CALLS[call](g)
    # ... and fine with damping.
    assert np.isfinite(CALLS[call](g, eps=1e-3)).all()


def test_numerical_error_is_an_arithmetic_error():
    assert issubclass(ss.NumericalError, ArithmeticError)
    assert not issubclass(ss.NumericalError, ValueError)
    with pytest.raises(ArithmeticError):
        ss.inv_sqrt(np.zeros((2, 2)))


@pytest.mark.parametrize("call", CALL_IDS)
@pytest.mark.parametrize(("eps", "message"), [
    (-1e-3, r"eps must be a finite number >= 0, got -0\.001"),
    (-np.inf, r"eps must be a finite number >= 0, got -inf"),
    (np.nan, r"eps must be a finite number >= 0, got nan"),
    (np.inf, r"eps must be a finite number >= 0, got inf"),
    ("abc", r"eps must be a real number, got 'abc'"),
    (True, r"eps must be a real number, got True"),
    (None, r"eps must be a real number, got None"),
])
def test_bad_eps(helpers, call, eps, message):
    g = np.eye(3)
    with helpers.unchanged(g), pytest.raises(ValueError, match=message):
        CALLS[call](g, eps=eps)


@pytest.mark.parametrize("fn", ["inv_sqrt", "inv_sqrt_apply"])
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"form": "sqrt"}, r"form must be 'inv_sqrt' or 'adam', got 'sqrt'"),
    ({"form": "Adam"}, r"form must be 'inv_sqrt' or 'adam', got 'Adam'"),
    ({"method": "cholesky"}, r"method must be 'eigh' or 'newton', got 'cholesky'"),
    ({"method": "EIGH"}, r"method must be 'eigh' or 'newton', got 'EIGH'"),
    ({"method": "newton", "form": "adam"}, r"method 'newton'.* form 'adam' needs method 'eigh'"),
    ({"method": "newton", "tol": 0.0}, r"tol must be > 0 .*got 0\.0"),
    ({"method": "newton", "tol": -1e-8}, r"tol must be > 0 .*got -1e-08"),
    ({"method": "newton", "tol": np.nan}, r"tol must be > 0 .*got nan"),
    ({"method": "newton", "max_iter": 0}, r"max_iter must be >= 1, got 0"),
    ({"method": "newton", "max_iter": 2.5}, r"max_iter must be an integer, got 2\.5"),
])
def test_bad_form_method_and_newton_options(helpers, fn, kwargs, message):
    g = np.eye(3)
    with helpers.unchanged(g), pytest.raises(ValueError, match=message):
        if fn == "inv_sqrt":
            ss.inv_sqrt(g, 0.1, **kwargs)
        else:
            ss.inv_sqrt_apply(g, np.ones(3), 0.1, **kwargs)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("p", "message"), [
    (0, r"p must be an integer >= 1, got 0"),
    (-2, r"p must be an integer >= 1, got -2"),
    (2.5, r"p must be an integer, got 2\.5"),
    (2.0, r"p must be an integer, got 2\.0"),
    (True, r"p must be an integer, got True"),
    ("3", r"p must be an integer, got '3'"),
])
def test_bad_p(helpers, method, p, message):
    g = np.eye(3)
    with helpers.unchanged(g), pytest.raises(ValueError, match=message):
        ss.inv_root(g, p, 0.1, method)


# --------------------------------------------------------------------------------------------
# Newton-specific failures


def test_newton_on_indefinite_matrix_is_value_error(helpers):
    g = helpers.with_spectrum([1.0, 0.3, -0.5], np.random.default_rng(12))
    with helpers.unchanged(g), pytest.raises(ValueError, match=r"eigenvalue -0\.5\b"):
        ss.inv_sqrt(g, method="newton")
    # Whether or not eps is large enough to make G + eps I positive definite (then the
    # iteration itself would converge), G is not PSD, as method 'eigh' says too.
    for eps in (0.1, 1.0, 10.0):
        with pytest.raises(ValueError, match=r"eigenvalue -0\.5\b"):
            ss.inv_sqrt(g, eps, method="newton")
        with pytest.raises(ValueError, match=r"eigenvalue -0\.5\b"):
            ss.inv_sqrt(g, eps)


@pytest.mark.parametrize("p", [2, 3])
def test_newton_iteration_cap(helpers, p):
    g, _ = spd_case(helpers, 6, 1e10, seed=14)
    with helpers.unchanged(g), pytest.raises(ss.NumericalError, match="did not converge"):
        ss.inv_root(g, p, method="newton", max_iter=1)
    with pytest.raises(ss.NumericalError, match="did not converge"):
        ss.inv_root(g, p, method="newton", max_iter=5)
    # Enough iterations: fine.
    a = ss.inv_root(g, p, method="newton", max_iter=200)
    ref = helpers.ref_inv_root(g, p)
    assert helpers.rel_err(a, ref) <= fwd_tol(np.float64, 1e10, 6, "newton")


def test_newton_tolerance_is_honoured(helpers):
    g, lam = spd_case(helpers, 10, 1e3, seed=15)
    loose = ss.inv_sqrt(g, method="newton", tol=1e-3)
    resid = np.linalg.norm(loose @ loose @ g - np.eye(10)) / np.sqrt(10)
    assert resid <= 1e-3 + fwd_tol(np.float64, 1e3, 10)
    tight = ss.inv_sqrt(g, method="newton")
    assert helpers.rel_err(tight, helpers.ref_inv_root(g, 2)) <= fwd_tol(np.float64, 1e3, 10,
                                                                          "newton")


# --------------------------------------------------------------------------------------------
# overflow


@pytest.mark.parametrize(("call", "message"), [
    # float32: f(1e-44) = 1e44 > 3.4e38.
    (lambda: ss.inv_root(np.array([[1e-44]], dtype=np.float32), 1), "overflows"),
    # float64: 1 / 5e-324 is infinite.
    (lambda: ss.inv_root(np.array([[5e-324]]), 1), "overflows"),
    # A zero G with an eps far below 1 / DBL_MAX.
    (lambda: ss.inv_root(np.zeros((2, 2)), 1, 1e-320), "overflows"),
    # A itself is representable (1e22), A v is not.
    (lambda: ss.inv_sqrt_apply(np.array([[1e-44]], dtype=np.float32),
                               np.array([1e30], dtype=np.float32)), "overflows"),
    # diag(1e-45, 1) does not overflow: it is singular relative to d * u * lambda_max.
    (lambda: ss.inv_sqrt(np.diag([1e-45, 1.0]).astype(np.float32)), "singular"),
], ids=["f32-p1", "f64-p1", "tiny-eps", "apply", "f32-singular"])
def test_overflow_is_numerical_error(call, message):
    with pytest.raises(ss.NumericalError, match=message):
        call()


def test_tiny_but_representable_results_do_not_overflow(helpers):
    # 1e-40 is subnormal in float32; its inverse square root 1e20 is representable (f is
    # evaluated in double, so nothing overflows on the way).
    g = np.array([[1e-40]], dtype=np.float32)
    a = ss.inv_sqrt(g)
    assert a.dtype == np.float32
    np.testing.assert_allclose(a, 1 / np.sqrt(np.float64(g[0, 0])), rtol=2 * helpers.EPS32)
    np.testing.assert_allclose(ss.inv_sqrt(np.zeros((2, 2)), 1e-300), 1e150 * np.eye(2),
                               rtol=1e-15)


# --------------------------------------------------------------------------------------------
# inv_sqrt_apply: bad v


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("v", "message"), [
    (np.ones(4), r"v must have shape \(3,\) or \(3, k\) to match G, got shape \(4,\)"),
    (np.ones((2, 5)), r"v must have shape \(3,\) or \(3, k\) to match G, got shape \(2, 5\)"),
    (np.ones((3, 2, 1)), r"got shape \(3, 2, 1\)"),
    (np.float64(1.0), r"got shape \(\)"),
    (np.array([1.0, np.nan, 2.0]), r"v has a non-finite entry"),
    (np.array([[1.0], [2.0], [np.inf]]), r"v has a non-finite entry"),
    (np.ones(3, dtype=np.complex128), r"v must have dtype float32 or float64, got complex128"),
    (np.ones(3, dtype=np.bool_), r"v must have dtype float32 or float64, got bool"),
])
def test_apply_bad_v(helpers, method, v, message):
    g, _ = spd_case(helpers, 3, 10.0, seed=4)
    v = np.asarray(v)
    with helpers.unchanged(g, v), pytest.raises(ValueError, match=message):
        ss.inv_sqrt_apply(g, v, method=method)


@pytest.mark.parametrize("method", METHODS)
def test_apply_rejects_batches_and_propagates_g_errors(helpers, method):
    g = np.stack([np.eye(3)] * 2)
    with pytest.raises(ValueError, match=r"G must have shape \(d, d\), got shape \(2, 3, 3\)"):
        ss.inv_sqrt_apply(g, np.ones(3), method=method)
    with pytest.raises(ss.NumericalError, match="singular"):
        ss.inv_sqrt_apply(np.diag([1.0, 0.0]), np.ones(2), method=method)


# --------------------------------------------------------------------------------------------
# memory layout and array-likes


def _layouts(g: np.ndarray) -> dict[str, np.ndarray]:
    """The same matrix values in several non-C-contiguous layouts."""
    d = g.shape[-1]
    big = np.zeros(g.shape[:-2] + (2 * d, 3 * d), dtype=g.dtype)
    big[..., ::2, ::3] = g
    flipped = np.ascontiguousarray(g[..., ::-1, ::-1])[..., ::-1, ::-1]
    out = {
        "fortran": np.asfortranarray(g),
        "transposed": np.ascontiguousarray(np.swapaxes(g, -1, -2)).swapaxes(-1, -2),
        "strided": big[..., ::2, ::3],
        "negative-strides": flipped,
        "read-only": g.copy(),
    }
    out["read-only"].setflags(write=False)
    for name, a in out.items():
        np.testing.assert_array_equal(a, g)
        assert name == "read-only" or not a.flags.c_contiguous, name
    return out


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize(("form", "method"), FORM_METHODS)
def test_non_contiguous_input_gives_the_same_result(helpers, dtype, form, method):
    g, _ = spd_case(helpers, 6, 1e3, seed=21)
    g = g.astype(dtype)
    expected = ss.inv_sqrt(g, 1e-3, form, method)
    for name, view in _layouts(g).items():
        with helpers.unchanged(view):
            out = ss.inv_sqrt(view, 1e-3, form, method)
        np.testing.assert_array_equal(out, expected, err_msg=name)
    gb = np.stack([g, g * 2, g * 3])
    expected_b = ss.inv_sqrt(gb, 1e-3, form, method)
    for name, view in _layouts(gb).items():
        np.testing.assert_array_equal(ss.inv_sqrt(view, 1e-3, form, method), expected_b, name)
    gb_strided = np.stack([gb, gb], axis=1)[:, 0]  # every other matrix of a bigger stack
    assert not gb_strided.flags.c_contiguous
    np.testing.assert_array_equal(ss.inv_sqrt(gb_strided, 1e-3, form, method), expected_b)


def test_non_contiguous_inputs_elsewhere(helpers):
    g, _ = spd_case(helpers, 5, 1e2, seed=22)
    v = np.random.default_rng(22).standard_normal((5, 6))
    expected = ss.inv_sqrt_apply(g, np.ascontiguousarray(v[:, ::2]), 1e-2)
    for view in (v[:, ::2], np.asfortranarray(v[:, ::2])):
        np.testing.assert_array_equal(ss.inv_sqrt_apply(np.asfortranarray(g), view, 1e-2),
                                      expected)
    np.testing.assert_array_equal(ss.inv_sqrt_apply(g, v[:, 3], 1e-2),
                                  ss.inv_sqrt_apply(g, v[:, 3].copy(), 1e-2))
    np.testing.assert_array_equal(ss.inv_root(g.T, 3, 0.1), ss.inv_root(g, 3, 0.1))
    d = np.abs(v) + 0.1
    np.testing.assert_array_equal(ss.diag_inv_sqrt(d[:, ::2].T, 0.1, "adam"),
                                  ss.diag_inv_sqrt(np.ascontiguousarray(d[:, ::2].T), 0.1, "adam"))


def test_lists_are_accepted(helpers):
    g = [[4.0, 1.0, 0.0], [1.0, 3.0, 0.5], [0.0, 0.5, 2.0]]
    expected = helpers.ref_inv_root(np.array(g), 2)
    assert helpers.rel_err(ss.inv_sqrt(g), expected) <= fwd_tol(np.float64, 10.0, 3)
    assert ss.inv_sqrt(g).dtype == np.float64
    batch = ss.inv_sqrt([g, g], method="newton")
    assert batch.shape == (2, 3, 3)
    assert helpers.rel_err(batch[1], expected) <= fwd_tol(np.float64, 10.0, 3, "newton")
    assert helpers.rel_err(ss.inv_root(g, 3), helpers.ref_inv_root(np.array(g), 3)) <= 1e-13
    assert ss.inv_sqrt([[2.0]])[0, 0] == pytest.approx(2**-0.5, rel=1e-15)


def test_no_input_is_ever_modified(helpers):
    # One sweep over successful and failing calls of every function on the same arrays.
    g, _ = spd_case(helpers, 5, 1e4, seed=30)
    bad = g.copy()
    bad[0, 0] = -5.0
    v = np.random.default_rng(30).standard_normal((5, 2))
    diag = np.abs(v[:, 0]).copy()
    diag[2] = 0.0
    arrays = (g, bad, v, diag)
    calls = [
        lambda: ss.inv_sqrt(g), lambda: ss.inv_sqrt(g, 1.0, "adam"),
        lambda: ss.inv_sqrt(g, method="newton"), lambda: ss.inv_root(g, 4, 0.5, "newton"),
        lambda: ss.inv_sqrt_apply(g, v, 0.1), lambda: ss.inv_sqrt_apply(g, v, method="newton"),
        lambda: ss.diag_inv_sqrt(diag, 0.1), lambda: ss.inv_sqrt(bad),
        lambda: ss.inv_sqrt(bad, method="newton"), lambda: ss.inv_sqrt_apply(bad, v),
        lambda: ss.diag_inv_sqrt(diag), lambda: ss.inv_sqrt(g, method="newton", max_iter=1),
    ]
    with helpers.unchanged(*arrays):
        for call in calls:
            try:
                call()
            except (ValueError, ArithmeticError):
                pass


# --------------------------------------------------------------------------------------------
# threads


def test_concurrent_calls_give_the_right_answers(helpers):
    # Each thread has its own batch (its own conditioning, method and dtype) and calls the
    # library repeatedly while the others do the same. The matrices are small (d = 24), so that
    # BLAS stays single-threaded inside each call and the test stays fast on two cores.
    n_threads, n, d = 6, 40, 24
    cases = []
    for i in range(n_threads):
        rng = np.random.default_rng(500 + i)
        kappa = 10.0 ** (1 + i)
        dtype = np.float64 if i < 4 else np.float32
        kappa = kappa if dtype == np.float64 else 10.0 ** (i - 2)
        gb = np.stack([helpers.with_spectrum(helpers.log_spectrum(d, kappa), rng)
                       for _ in range(n)]).astype(dtype)
        method = METHODS[i % 2]
        cases.append((gb, method, kappa, ss.inv_sqrt(gb, 1e-9, method=method)))

    def work(i: int) -> list[np.ndarray]:
        gb, method, _, _ = cases[i]
        return [ss.inv_sqrt(gb, 1e-9, method=method) for _ in range(5)]

    with ThreadPoolExecutor(max_workers=n_threads) as pool:
        results = list(pool.map(work, range(n_threads)))
    for (gb, method, kappa, serial), outs in zip(cases, results):
        tol = fwd_tol(gb.dtype, kappa, d, method)
        for out in outs:
            for j in range(n):
                assert helpers.rel_err(out[j], serial[j]) <= tol
        for j in (0, n - 1):
            ref = helpers.ref_inv_root(gb[j].astype(np.float64), 2, 1e-9)
            assert helpers.rel_err(serial[j], ref) <= tol


def test_the_gil_is_released_during_the_computation(helpers):
    # While a worker thread is inside one long inv_sqrt call (a batch of many small matrices),
    # this thread keeps waking up from 1 ms sleeps. If the call held the GIL, no wake-up could
    # happen until it returned (at most one or two around its start and end).
    rng = np.random.default_rng(600)
    # 8000 matrices: about 60 ms on two cores with the lockstep solver, so many 1 ms wake-ups.
    gb = np.stack([helpers.with_spectrum(helpers.log_spectrum(24, 1e3), rng) for _ in range(8000)])
    state = {"inside": False, "done": False}

    def work() -> None:
        state["inside"] = True
        ss.inv_sqrt(gb)
        state["inside"] = False
        state["done"] = True

    worker = threading.Thread(target=work)
    wakeups = 0
    start = time.perf_counter()
    worker.start()
    while not state["done"]:
        time.sleep(0.001)
        wakeups += state["inside"]
    worker.join()
    assert wakeups >= 5, (wakeups, time.perf_counter() - start)
