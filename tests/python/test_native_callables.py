"""C callables as problems and preconditioners (``problems.NativeOracle``,
``PreconditionedSGD(lr, c_function)``), against numpy references.

Two kinds of C function: a ctypes callback (C-callable, backed by Python; ctypes takes the GIL
itself) and, where a C compiler is available, a function compiled from C source here, which the
native loop calls from run_many's threads without the GIL.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import numpy as np
import pytest

import saddlescape as ss
from saddlescape import problems

c_double_p = ctypes.POINTER(ctypes.c_double)
ORACLE = ctypes.CFUNCTYPE(None, ctypes.c_int64, c_double_p, c_double_p, ctypes.c_uint64)
PRECONDITIONER = ctypes.CFUNCTYPE(None, ctypes.c_int64, c_double_p, c_double_p, c_double_p)

H = np.array([2.0, -0.5, 0.25])


def _key_noise(key: int, d: int) -> np.ndarray:
    # Deterministic noise from the key, the way a C oracle would derive it.
    return np.random.default_rng(key).standard_normal(d) * 0.1


@ORACLE
def _ctypes_oracle(dim, x, g, key):
    xs = np.ctypeslib.as_array(x, shape=(dim,))
    out = np.ctypeslib.as_array(g, shape=(dim,))
    out[:] = H * xs + _key_noise(key, dim)


def test_ctypes_oracle_matches_sgd_with_the_documented_keys():
    p = problems.NativeOracle(_ctypes_oracle, 3)
    assert p.dim == 3 and not p.has_value
    x0 = np.array([1.0, -1.0, 0.5])
    r = ss.run(p, ss.SGD(0.1), x0, 20, seed=7, record_every=20)
    # One key per call from the run's generator: a sampler with the run's seed draws the same
    # keys, so SGD written out by hand over it reproduces the run bit for bit.
    x = x0.copy()
    src = p.sampler(7)
    for _ in range(20):
        x -= 0.1 * src.sample(x)
    np.testing.assert_array_equal(r.x_final, x)
    again = ss.run(p, ss.SGD(0.1), x0, 20, seed=7, record_every=20)
    np.testing.assert_array_equal(again.x_final, r.x_final)
    other = ss.run(p, ss.SGD(0.1), x0, 20, seed=8, record_every=20)
    assert not np.array_equal(other.x_final, r.x_final)
    # and the noise really is the key's: the first gradient at x0 minus H x0
    g0 = problems.NativeOracle(_ctypes_oracle, 3).stochastic_gradients(x0, 1, 7)[0]
    noise = g0 - H * x0
    assert np.linalg.norm(noise) > 0
    assert np.linalg.norm(noise) < 1.0


@PRECONDITIONER
def _ctypes_direction(dim, x, g, out):
    xs = np.ctypeslib.as_array(x, shape=(dim,))
    gs = np.ctypeslib.as_array(g, shape=(dim,))
    o = np.ctypeslib.as_array(out, shape=(dim,))
    o[:] = gs / (1.0 + xs * xs)  # A(x) = diag(1 / (1 + x^2))


def test_ctypes_preconditioner_is_algorithm_1():
    opt = ss.PreconditionedSGD(0.3, _ctypes_direction)
    x = np.array([0.5, -2.0, 3.0])
    g = np.array([1.0, 2.0, -4.0])
    want = x - 0.3 * g / (1.0 + x * x)
    opt.step(x, g)
    np.testing.assert_allclose(x, want, rtol=1e-15)


def test_bad_native_functions_are_rejected():
    with pytest.raises(ValueError, match="address is null"):
        problems.NativeOracle(0, 2)
    with pytest.raises(ValueError, match="ctypes function pointer"):
        problems.NativeOracle("not a function", 2)
    with pytest.raises(ValueError, match="dim must be >= 1"):
        problems.NativeOracle(_ctypes_oracle, 0)


C_SOURCE = r"""
#include <stdint.h>
/* splitmix64 of the key: the randomness of one call, from the key alone */
static double unit(uint64_t *z) {
  uint64_t r = (*z += 0x9e3779b97f4a7c15ULL);
  r = (r ^ (r >> 30)) * 0xbf58476d1ce4e5b9ULL;
  r = (r ^ (r >> 27)) * 0x94d049bb133111ebULL;
  r ^= r >> 31;
  return (double)(r >> 11) * 0x1.0p-53 - 0.5;
}
void oracle(int64_t dim, const double *x, double *g, uint64_t key) {
  for (int64_t i = 0; i < dim; ++i) g[i] = (i % 2 ? -0.1 : 1.0) * x[i] + unit(&key);
}
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    d = tmp_path_factory.mktemp("native")
    (d / "o.c").write_text(C_SOURCE)
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(d / "libo.so"), str(d / "o.c")],
                   check=True)
    lib = ctypes.CDLL(str(d / "libo.so"))
    lib.oracle.argtypes = [ctypes.c_int64, c_double_p, c_double_p, ctypes.c_uint64]
    return lib


def test_compiled_oracle_on_threads_equals_single_runs(compiled):
    p = problems.NativeOracle(compiled.oracle, 4)
    x0 = np.array([0.1, 0.0, -0.2, 0.3])
    make = lambda: ss.RMSProp(4, 0.01, structure="diag")  # noqa: E731
    many = ss.run_many(p, make, x0, 500, seeds=[3, 4, 5, 6], threads=2, record_every=100)
    for i, seed in enumerate([3, 4, 5, 6]):
        one = ss.run(p, make(), x0, 500, seed=seed, record_every=100)
        np.testing.assert_array_equal(many.x[i], one.x)
    # the gradient is the documented formula plus noise in [-0.5, 0.5)
    gs = p.stochastic_gradients(x0, 200, 0)
    noise = gs - np.array([1.0, -0.1, 1.0, -0.1]) * x0
    assert noise.min() >= -0.5 and noise.max() < 0.5
    assert abs(noise.mean()) < 0.05
