"""Shared helpers for the Python tests.

With ``--import-mode=importlib`` test modules cannot import each other (or this file), so the
helpers are handed out by the ``helpers`` fixture: test matrices with a prescribed spectrum,
independent float64 references computed by scipy's Schur-based matrix functions (a different
algorithm from the library's symmetric eigendecomposition), error measures and a guard that
checks that inputs are left untouched.
"""

from __future__ import annotations

import contextlib
import os
import types
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt
import pytest
import scipy.linalg

# Hypothesis (tests/python/test_properties.py): the "ci" profile, the default, is small and
# derandomised, so that CI is quick and never flaky; HYPOTHESIS_PROFILE=long (or pytest's
# --hypothesis-profile=long) searches for real: many more examples, a new random draw each run,
# failures remembered in .hypothesis/ and replayed first.
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis is in the test extra; without it test_properties.py skips
    pass
else:
    _slow_ok = [HealthCheck.too_slow, HealthCheck.data_too_large]
    settings.register_profile("ci", max_examples=50, deadline=None, derandomize=True,
                              database=None, print_blob=True, suppress_health_check=_slow_ok)
    settings.register_profile("long", max_examples=400, deadline=None, print_blob=True,
                              suppress_health_check=_slow_ok)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

EPS64 = float(np.finfo(np.float64).eps)
EPS32 = float(np.finfo(np.float32).eps)


def machine_eps(dtype: npt.DTypeLike) -> float:
    """Machine epsilon (numpy's finfo.eps, twice the unit roundoff) of a float dtype."""
    return float(np.finfo(dtype).eps)


def random_orthogonal(d: int, rng: np.random.Generator) -> np.ndarray:
    """A Haar-distributed orthogonal d x d matrix (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def with_spectrum(lam: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Q diag(lam) Q^T for a random orthogonal Q, made exactly symmetric, in float64."""
    lam = np.asarray(lam, dtype=np.float64)
    q = random_orthogonal(lam.size, rng)
    g = (q * lam) @ q.T
    return (g + g.T) / 2


def log_spectrum(d: int, kappa: float, scale: float = 1.0) -> np.ndarray:
    """d eigenvalues spread log-uniformly from scale down to scale / kappa (just scale if d = 1)."""
    return scale * np.logspace(0.0, -np.log10(kappa), d) if d > 1 else np.array([scale])


def low_rank(d: int, r: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(G, X) with G = X X^T of rank r < d, computed in float64 (so with rounding noise)."""
    x = rng.standard_normal((d, r))
    return x @ x.T, x


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    """||a - ref||_F / ||ref||_F, in float64."""
    a64 = np.asarray(a, dtype=np.float64)
    r64 = np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(a64 - r64) / np.linalg.norm(r64))


def _real(m: np.ndarray) -> np.ndarray:
    if np.iscomplexobj(m):
        assert np.abs(m.imag).max() <= 1e-8 * np.abs(m.real).max(), "reference is not real"
        m = m.real
    return np.asarray(m, dtype=np.float64)


def ref_inv_root(g: np.ndarray, p: int, eps: float = 0.0) -> np.ndarray:
    """(G + eps I)^(-1/p) by scipy's Schur-Pade fractional_matrix_power, in float64."""
    g64 = np.asarray(g, dtype=np.float64)
    b = g64 + eps * np.eye(g64.shape[-1])
    return _real(scipy.linalg.fractional_matrix_power(b, -1.0 / p))


def ref_adam(g: np.ndarray, eps: float) -> np.ndarray:
    """(G^(1/2) + eps I)^(-1) by scipy's Schur sqrtm and an LU inverse, in float64."""
    g64 = np.asarray(g, dtype=np.float64)
    s = _real(scipy.linalg.sqrtm(g64))
    return np.linalg.inv(s + eps * np.eye(g64.shape[-1]))


def ref_from_factor(x: np.ndarray, eps: float, form: str) -> np.ndarray:
    """f(X X^T) from the SVD of X (no eigensolver, exact zeros for the null space)."""
    d = x.shape[0]
    u, s, _ = np.linalg.svd(x, full_matrices=True)
    sv = np.zeros(d)
    sv[: s.size] = s
    f = 1.0 / np.sqrt(sv**2 + eps) if form == "inv_sqrt" else 1.0 / (sv + eps)
    return (u * f) @ u.T


@contextlib.contextmanager
def unchanged(*arrays: np.ndarray) -> Iterator[None]:
    """Asserts on exit (also when the body raised) that every array still holds its values."""
    copies = [(a, a.copy(), a.dtype, a.shape, a.strides) for a in arrays]
    try:
        yield
    finally:
        for a, c, dtype, shape, strides in copies:
            assert a.dtype == dtype and a.shape == shape and a.strides == strides
            np.testing.assert_array_equal(a, c, strict=True)


@pytest.fixture(scope="session")
def helpers() -> types.SimpleNamespace:
    return types.SimpleNamespace(
        EPS64=EPS64,
        EPS32=EPS32,
        machine_eps=machine_eps,
        random_orthogonal=random_orthogonal,
        with_spectrum=with_spectrum,
        log_spectrum=log_spectrum,
        low_rank=low_rank,
        rel_err=rel_err,
        ref_inv_root=ref_inv_root,
        ref_adam=ref_adam,
        ref_from_factor=ref_from_factor,
        unchanged=unchanged,
    )
