"""saddlescape.cuda: the CUDA backend, against the CPU library.

Two kinds of tests:

* Everywhere, also in CI (no GPU, and usually no ``saddlescape._cuda`` at all): availability is
  reported, never raised on import; every public function checks its arguments (shapes, dtypes,
  scalars, the array protocols) before it needs a GPU, so a bad argument is a ValueError on any
  machine, and a valid call raises CUDAUnavailableError instead of crashing.
* With a usable GPU (``needs_gpu``; skipped otherwise): every operation against the CPU
  implementation or float64 numpy/scipy references, on random, rank-deficient and
  ill-conditioned input, d = 1, 2, 32, 33, 128, batches of 1 and 50, float32 and float64; error
  paths; device arrays from torch and CuPy when those are installed with CUDA support.

Tolerances (u = machine epsilon of the dtype under test):

* Inverse roots: the GPU routes (cuSOLVER eigensolvers, Newton) and the CPU's LAPACK route are
  backward stable, so each is within about 4 u (kappa + 2 d) of the exact f(G), kappa the
  condition number of G + eps I (the error model of tests/python/test_matrix_functions.py), and
  the two differ by at most 8 u (kappa + 2 d). Newton stops once ||M_k - I||_F / sqrt(d) <=
  100 u sqrt(d), which adds about half that to the error; 4 times it is allowed. With TF32 the
  products carry about 1e-3 relative error: those runs use tol = 2e-2 and must be within 5e-2.
  float32 input is compared with the CPU's float64 result on the same (rounded) matrix.
* f(G) V: the error of f(G) times ||V||, relative to ||f(G)||_2 ||V||_F.
* EMA: the device forms the sums in double for both dtypes. float64: within 4 (k + 2) u of the
  numpy loop, relative to max|G_b| (the k steps are summed in another order). float32: one
  rounding of the float64 value, 2 u32 relative to max|G_b|. Symmetry is exact.
* The diagonal step: the CPU's formulas; the device may fuse multiply-adds, which moves each
  step by an ulp: 1e-12 relative after 20 float64 steps, 8 u for one step.
* run_seeds: each seed follows run() with the same random stream; fused multiply-adds change the
  last bits of some steps, and the saddle dynamics amplify that mildly over a few hundred steps,
  so final iterates and values agree to 1e-9 relative (1e-9 absolute near zero), statuses and
  stop steps exactly. An escape step is a threshold crossing, so a last-bit difference moves it
  by one step when ||x_t - x0|| (or F(x_t)) lands within rounding of the threshold: at most 2 of
  64 seeds may differ, and by exactly one step.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import re
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import scipy.linalg

import saddlescape as ss
import saddlescape.cuda as sc
from saddlescape import problems, schedules

GPU = sc.is_available()
_WHY = sc.unavailable_reason()
needs_gpu = pytest.mark.skipif(
    not GPU, reason="no usable CUDA backend: " + (_WHY if len(_WHY) <= 100 else _WHY[:97] + "..."))
without_gpu = pytest.mark.skipif(GPU, reason="a CUDA device is available here")

FLOATS = [np.float32, np.float64]
FORMS = ["inv_sqrt", "adam"]
METHODS = ["auto", "jacobi", "batched_qr", "divide_conquer", "newton"]


def _optional(name: str) -> Any:
    """A module if it imports (quietly: pytest turns warnings into errors), else None."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except Exception:
            return None


def _torch_cuda() -> Any:
    torch = _optional("torch") if GPU else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch if torch is not None and torch.cuda.is_available() else None


def _cupy_cuda() -> Any:
    cupy = _optional("cupy") if GPU else None
    if cupy is None:
        return None
    try:
        return cupy if cupy.cuda.runtime.getDeviceCount() > 0 else None
    except Exception:
        return None


torch_cuda = _torch_cuda()
cupy_cuda = _cupy_cuda()
needs_torch = pytest.mark.skipif(torch_cuda is None, reason="torch with CUDA is not available")
needs_cupy = pytest.mark.skipif(cupy_cuda is None, reason="CuPy with a CUDA device is unavailable")


def u(dtype: Any) -> float:
    return float(np.finfo(dtype).eps)


@contextlib.contextmanager
def unchanged(*arrays: np.ndarray) -> Iterator[None]:
    """Asserts on exit (also when the body raised) that every array holds its values bit for bit."""
    copies = [(a, a.copy()) for a in arrays]
    try:
        yield
    finally:
        for a, c in copies:
            np.testing.assert_array_equal(a, c, strict=True)


# --------------------------------------------------------------------------------------------
# Test data


def random_orthogonal(d: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def spd_batch(n: int, d: int, kappa: float, rng: np.random.Generator,
              scales: tuple[float, float] = (-2.0, 2.0)) -> np.ndarray:
    """n exactly symmetric blocks with random eigenbases, spectra log-spread over condition
    kappa and random overall scales 10^U(scales), in float64."""
    out = np.empty((n, d, d))
    for b in range(n):
        scale = 10.0 ** rng.uniform(*scales)
        lam = scale * np.logspace(0.0, -np.log10(kappa), d) if d > 1 else np.array([scale])
        q = random_orthogonal(d, rng)
        g = (q * lam) @ q.T
        out[b] = (g + g.T) / 2
    return out


def cpu_root(G64: np.ndarray, eps: float, p: int = 2, form: str = "inv_sqrt") -> np.ndarray:
    """The CPU library's f(G) (LAPACK eigendecomposition), block by block, in float64."""
    if form == "adam":
        return ss.inv_sqrt(G64, eps, "adam")
    return ss.inv_root(G64, p, eps)


def clipped_root(G64: np.ndarray, eps: float, form: str = "inv_sqrt") -> np.ndarray:
    """f(G) from numpy's float64 eigendecomposition with rounding-negative eigenvalues clipped
    to zero: the reference for positive semidefinite blocks that are singular up to rounding."""
    vals, vecs = np.linalg.eigh(G64)
    lam = np.maximum(vals, 0.0)
    f = 1.0 / np.sqrt(lam + eps) if form == "inv_sqrt" else 1.0 / (np.sqrt(lam) + eps)
    return (vecs * f[..., None, :]) @ np.swapaxes(vecs, -1, -2)


def block_rel_err(a: Any, ref: np.ndarray) -> float:
    """max over blocks of ||a_b - ref_b||_F / ||ref_b||_F."""
    a64 = np.asarray(a, dtype=np.float64).reshape(ref.shape)
    r = ref.reshape((-1,) + ref.shape[-2:])
    e = a64.reshape(r.shape) - r
    return float(max(np.linalg.norm(e[b]) / np.linalg.norm(r[b]) for b in range(r.shape[0])))


def assert_same_result(a: Any, b: Any) -> None:
    """Two GPU results of one computation (other stream, thread or array library). cuSOLVER and
    cuBLAS are deterministic by default, so they should agree bit for bit; a few ulps are allowed
    in case a library picks another kernel for another stream or handle."""
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    np.testing.assert_allclose(a64, b64, rtol=1e-12, atol=1e-12 * np.abs(b64).max())


def root_tol(dtype: Any, kappa: float, d: int, method: str) -> float:
    t = 8.0 * u(dtype) * (kappa + 2 * d)
    if method == "newton":
        t += 4.0 * 100.0 * u(dtype) * np.sqrt(d)
    return t


class FakeCUDAArray:
    """Only a ``__cuda_array_interface__`` (no memory behind it): for the checks that need no
    GPU. The default address is a host address, which no CUDA device owns."""

    def __init__(self, shape: tuple[int, ...], typestr: str = "<f8", ptr: int = 0x1000,
                 readonly: bool = False, **extra: Any) -> None:
        self.cai = {"version": 3, "shape": shape, "typestr": typestr, "data": (ptr, readonly),
                    "strides": None, "stream": None, **extra}

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return self.cai


class RefusingArray:
    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        raise RuntimeError("cannot export this one")


class FakeDLPack:
    """An object that speaks DLPack only, on the given device type (1 = CPU, 10 = ROCm)."""

    def __init__(self, device_type: int) -> None:
        self.device_type = device_type

    def __dlpack__(self, stream: Any = None) -> Any:
        raise AssertionError("a non-CUDA array must be rejected before it is exported")

    def __dlpack_device__(self) -> tuple[int, int]:
        return (self.device_type, 0)


class DLPackOnly:
    """Hides a device array's ``__cuda_array_interface__``: the DLPack route."""

    def __init__(self, array: Any) -> None:
        self.array = array

    def __dlpack__(self, stream: Any = None) -> Any:
        return self.array.__dlpack__(stream=stream)

    def __dlpack_device__(self) -> Any:
        return self.array.__dlpack_device__()


# --------------------------------------------------------------------------------------------
# Everywhere: availability


def test_availability_is_a_bool_with_a_reason():
    assert isinstance(sc.is_available(), bool)
    reason = sc.unavailable_reason()
    assert isinstance(reason, str)
    if sc.is_available():
        assert reason == ""
        assert isinstance(sc.device_description(), str) and sc.device_description()
    else:
        assert reason.strip()
        with pytest.raises(sc.CUDAUnavailableError, match=re.escape(reason)):
            sc.device_description()
    assert sc.is_available() == sc.is_available()  # cached, stable


def test_exception_types():
    assert issubclass(sc.CUDAUnavailableError, RuntimeError)
    assert issubclass(sc.CUDAError, RuntimeError)
    assert not issubclass(sc.CUDAUnavailableError, ValueError)
    assert sc.max_seed_dim == 16
    sc.clear_cache()  # a no-op without the backend


# --------------------------------------------------------------------------------------------
# Everywhere: argument checks before any GPU work


def _x(n: int = 4, dtype: Any = np.float64) -> np.ndarray:
    return np.zeros(n, dtype=dtype)


BAD_CALLS: list[tuple[str, Callable[[], Any], str]] = [
    # ema_update_batched
    ("ema G int", lambda: sc.ema_update_batched(np.eye(3, dtype=np.int64), np.ones(3), 0.9),
     r"G must have dtype float32 or float64, got int64"),
    ("ema G complex", lambda: sc.ema_update_batched(np.eye(3, dtype=complex), np.ones(3), 0.9),
     r"G must have dtype float32 or float64, got complex128"),
    ("ema G 1-D", lambda: sc.ema_update_batched(np.ones(3), np.ones(3), 0.9),
     r"G must have shape \(d, d\) or \(n, d, d\), got shape \(3,\)"),
    ("ema G not square", lambda: sc.ema_update_batched(np.ones((3, 4)), np.ones(4), 0.9),
     r"G must be square, got shape \(3, 4\)"),
    ("ema G empty d", lambda: sc.ema_update_batched(np.ones((2, 0, 0)), np.ones((2, 0)), 0.9),
     r"G must have d >= 1"),
    ("ema gs shape 2-D G", lambda: sc.ema_update_batched(np.eye(3), np.ones((2, 4)), 0.9),
     r"gs must have shape \(k, 3\) or \(3,\) to match G of shape \(3, 3\), got shape \(2, 4\)"),
    ("ema gs shape 3-D G", lambda: sc.ema_update_batched(np.zeros((2, 3, 3)), np.ones((3, 3)), 0.9),
     r"gs must have shape \(2, k, 3\) or \(2, 3\) to match G of shape \(2, 3, 3\), got shape \(3, 3\)"),
    ("ema gs k=0", lambda: sc.ema_update_batched(np.eye(3), np.ones((0, 3)), 0.9),
     r"gs must hold at least one gradient"),
    ("ema gs dtype", lambda: sc.ema_update_batched(np.eye(3), np.ones(3, dtype=np.float32), 0.9),
     r"gs must have G's dtype float64, got float32"),
    ("ema beta 1", lambda: sc.ema_update_batched(np.eye(3), np.ones(3), 1.0),
     r"betas must be in \[0, 1\), got 1.0"),
    ("ema beta NaN", lambda: sc.ema_update_batched(np.eye(3), np.ones(3), math.nan),
     r"betas must be in \[0, 1\), got nan"),
    ("ema beta negative", lambda: sc.ema_update_batched(np.eye(3), np.ones((2, 3)), [0.5, -0.1]),
     r"betas\[1\] must be in \[0, 1\), got -0.1"),
    ("ema beta count", lambda: sc.ema_update_batched(np.eye(3), np.ones((2, 3)), [0.5, 0.5, 0.5]),
     r"betas must be one number or a sequence of k = 2 numbers"),
    ("ema beta string", lambda: sc.ema_update_batched(np.eye(3), np.ones(3), "0.9"),
     r"betas must be a real number, got '0.9'"),
    ("ema G read-only", lambda: sc.ema_update_batched(_readonly(np.eye(3)), np.ones(3), 0.9),
     r"G is read-only, but it is updated in place"),
    ("ema G list", lambda: sc.ema_update_batched([[1.0, 0.0], [0.0, 1.0]], np.ones(2), 0.9),
     r"G is updated in place, so it must be a numpy array or a CUDA device array, got list"),
    ("ema overlap", lambda: _ema_overlap(), r"G and gs must not overlap"),
    ("ema stream negative", lambda: sc.ema_update_batched(np.eye(3), np.ones(3), 0.9, stream=-1),
     r"stream must be a cudaStream_t handle"),
    ("ema stream float", lambda: sc.ema_update_batched(np.eye(3), np.ones(3), 0.9, stream=1.5),
     r"stream must be an integer, got 1.5"),
    # inv_root
    ("root G int", lambda: sc.inv_root(np.eye(3, dtype=np.int32)),
     r"G must have dtype float32 or float64, got int32"),
    ("root G float16", lambda: sc.inv_root(np.eye(3, dtype=np.float16)),
     r"G must have dtype float32 or float64, got float16"),
    ("root G big-endian", lambda: sc.inv_root(np.eye(3, dtype=">f8")),
     r"G must have dtype float32 or float64, got >f8"),
    ("root G 4-D", lambda: sc.inv_root(np.ones((1, 2, 3, 3))),
     r"G must have shape \(d, d\) or \(n, d, d\), got shape \(1, 2, 3, 3\)"),
    ("root G strings", lambda: sc.inv_root([["a"]]), r"G must have dtype float32 or float64"),
    ("root eps NaN", lambda: sc.inv_root(np.eye(3), eps=math.nan),
     r"eps must be finite and >= 0, got nan"),
    ("root eps negative", lambda: sc.inv_root(np.eye(3), eps=-1e-3),
     r"eps must be finite and >= 0, got -0.001"),
    ("root eps inf", lambda: sc.inv_root(np.eye(3), eps=math.inf),
     r"eps must be finite and >= 0, got inf"),
    ("root p 0", lambda: sc.inv_root(np.eye(3), p=0), r"p must be an integer >= 1, got 0"),
    ("root p float", lambda: sc.inv_root(np.eye(3), p=2.0), r"p must be an integer, got 2.0"),
    ("root form", lambda: sc.inv_root(np.eye(3), form="sqrt"),
     r"form must be one of 'inv_sqrt', 'adam', got 'sqrt'"),
    ("root adam p", lambda: sc.inv_root(np.eye(3), p=3, form="adam"), r"p must be 2, got p = 3"),
    ("root CPU method name", lambda: sc.inv_root(np.eye(3), method="eigh"),
     r"method must be one of 'auto', 'jacobi', 'batched_qr', 'divide_conquer', 'newton', got 'eigh'"),
    ("root jacobi d=33", lambda: sc.inv_root(np.eye(33), method="jacobi"),
     r"method 'jacobi' handles d <= 32, got d = 33"),
    ("root newton adam", lambda: sc.inv_root(np.eye(3), form="adam", method="newton"),
     r"method 'newton' computes form 'inv_sqrt' only"),
    ("root tol negative", lambda: sc.inv_root(np.eye(3), tol=-1.0),
     r"tol must be finite and >= 0, got -1.0"),
    ("root tol NaN", lambda: sc.inv_root(np.eye(3), tol=math.nan), r"tol must be finite and >= 0"),
    ("root max_iter 0", lambda: sc.inv_root(np.eye(3), max_iter=0),
     r"max_iter must be an integer >= 1, got 0"),
    ("root max_iter float", lambda: sc.inv_root(np.eye(3), max_iter=10.0),
     r"max_iter must be an integer"),
    ("root tf32 not bool", lambda: sc.inv_root(np.eye(3), allow_tf32=1),
     r"allow_tf32 must be True or False, got 1"),
    # inv_root_apply
    ("apply V shape 2-D G", lambda: sc.inv_root_apply(np.eye(3), np.ones(4)),
     r"V must have shape \(3, k\) or \(3,\) to match G of shape \(3, 3\), got shape \(4,\)"),
    ("apply V shape 3-D G", lambda: sc.inv_root_apply(np.zeros((2, 3, 3)), np.ones((3, 3, 1))),
     r"V must have shape \(2, 3, k\) or \(2, 3\) to match G of shape \(2, 3, 3\), "
     r"got shape \(3, 3, 1\)"),
    ("apply V k=0", lambda: sc.inv_root_apply(np.eye(3), np.ones((3, 0))),
     r"V must have at least one column"),
    ("apply V dtype", lambda: sc.inv_root_apply(np.eye(3, dtype=np.float32), np.ones(3)),
     r"V must have G's dtype float32, got float64"),
    ("apply V int", lambda: sc.inv_root_apply(np.eye(3), np.ones(3, dtype=np.int64)),
     r"V must have dtype float32 or float64, got int64"),
    ("apply eps", lambda: sc.inv_root_apply(np.eye(3), np.ones(3), eps=-1.0),
     r"eps must be finite and >= 0"),
    ("apply method", lambda: sc.inv_root_apply(np.eye(3), np.ones(3), method="qr"),
     r"method must be one of"),
    # rmsprop_diag_step
    ("diag x int", lambda: sc.rmsprop_diag_step(np.zeros(4, dtype=np.int64), _x(), _x(), 0.1, 0.9),
     r"x must have dtype float32 or float64, got int64"),
    ("diag g shape", lambda: sc.rmsprop_diag_step(_x(), _x(5), _x(), 0.1, 0.9),
     r"g must have x's shape \(4,\), got shape \(5,\)"),
    ("diag v shape", lambda: sc.rmsprop_diag_step(_x(), _x(), np.zeros((2, 2)), 0.1, 0.9),
     r"v must have x's shape \(4,\), got shape \(2, 2\)"),
    ("diag v dtype", lambda: sc.rmsprop_diag_step(_x(), _x(), _x(4, np.float32), 0.1, 0.9),
     r"v must have x's dtype float64, got float32"),
    ("diag lr < 0", lambda: sc.rmsprop_diag_step(_x(), _x(), _x(), -0.1, 0.9),
     r"lr must be finite and >= 0, got -0.1"),
    ("diag lr NaN", lambda: sc.rmsprop_diag_step(_x(), _x(), _x(), math.nan, 0.9),
     r"lr must be finite and >= 0, got nan"),
    ("diag lr inf", lambda: sc.rmsprop_diag_step(_x(), _x(), _x(), math.inf, 0.9),
     r"lr must be finite and >= 0, got inf"),
    ("diag beta 1", lambda: sc.rmsprop_diag_step(_x(), _x(), _x(), 0.1, 1.0),
     r"beta must be in \[0, 1\), got 1.0"),
    ("diag beta NaN", lambda: sc.rmsprop_diag_step(_x(), _x(), _x(), 0.1, math.nan),
     r"beta must be in \[0, 1\), got nan"),
    ("diag eps 0", lambda: sc.rmsprop_diag_step(_x(), _x(), _x(), 0.1, 0.9, eps=0.0),
     r"eps must be finite and > 0, got 0.0"),
    ("diag form", lambda: sc.rmsprop_diag_step(_x(), _x(), _x(), 0.1, 0.9, form="rms"),
     r"form must be one of"),
    ("diag check", lambda: sc.rmsprop_diag_step(_x(), _x(), _x(), 0.1, 0.9, check="yes"),
     r"check must be True or False, got 'yes'"),
    ("diag x read-only", lambda: sc.rmsprop_diag_step(_readonly(_x()), _x(), _x(), 0.1, 0.9),
     r"x is read-only, but it is updated in place"),
    ("diag v read-only", lambda: sc.rmsprop_diag_step(_x(), _x(), _readonly(_x()), 0.1, 0.9),
     r"v is read-only, but it is updated in place"),
    ("diag x tuple", lambda: sc.rmsprop_diag_step((0.0, 0.0), _x(2), _x(2), 0.1, 0.9),
     r"x is updated in place, so it must be a numpy array or a CUDA device array, got tuple"),
    ("diag x is v", lambda: _diag_alias(), r"x and v must not overlap"),
    ("diag g in x", lambda: _diag_overlap_g(), r"x and g must not overlap"),
]


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def _ema_overlap() -> None:
    G = np.eye(3)
    sc.ema_update_batched(G, G[0], 0.9)


def _diag_alias() -> None:
    x = _x()
    sc.rmsprop_diag_step(x, _x(), x, 0.1, 0.9)


def _diag_overlap_g() -> None:
    buf = np.zeros(8)
    sc.rmsprop_diag_step(buf[:4], buf[2:6], _x(), 0.1, 0.9)


@pytest.mark.parametrize(("call", "message"), [pytest.param(c, m, id=i) for i, c, m in BAD_CALLS])
def test_bad_numpy_arguments_are_value_errors_on_any_machine(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# Device arrays described by __cuda_array_interface__ alone: their checks need no GPU either.
FAKE_BAD: list[tuple[str, Callable[[], Any], str]] = [
    ("int typestr", lambda: sc.inv_root(FakeCUDAArray((3, 3), "<i8")),
     r"G must have dtype float32 or float64, got int64 \(typestr '<i8'\)"),
    ("half typestr", lambda: sc.inv_root(FakeCUDAArray((3, 3), "<f2")),
     r"G must have dtype float32 or float64"),
    ("big-endian typestr", lambda: sc.inv_root(FakeCUDAArray((3, 3), ">f8")), r"got >f8"),
    ("unknown typestr", lambda: sc.inv_root(FakeCUDAArray((3, 3), "what")),
     r"G has an unknown typestr 'what'"),
    ("strided", lambda: sc.inv_root(FakeCUDAArray((3, 3), strides=(8, 24))),
     r"G must be C-contiguous, got strides \(8, 24\) \(bytes\) for shape \(3, 3\)"),
    ("every other row", lambda: sc.inv_root(FakeCUDAArray((3, 3), strides=(48, 8))),
     r"G must be C-contiguous"),
    ("masked", lambda: sc.inv_root(FakeCUDAArray((3, 3), mask=FakeCUDAArray((3, 3), "|b1"))),
     r"G is a masked array"),
    ("malformed", lambda: sc.inv_root(_malformed()), r"G has a malformed __cuda_array_interface__"),
    ("not a dict", lambda: sc.inv_root(_not_a_dict()),
     r"G.__cuda_array_interface__ must be a dict"),
    ("null pointer", lambda: sc.inv_root(FakeCUDAArray((3, 3), ptr=0)),
     r"G has a null data pointer"),
    ("refusing", lambda: sc.inv_root(RefusingArray()),
     r"G \(.*RefusingArray\) cannot be used as a CUDA array: cannot export this one"),
    ("read-only in place", lambda: sc.ema_update_batched(FakeCUDAArray((3, 3), readonly=True),
                                                         FakeCUDAArray((3,)), 0.9),
     r"G is read-only, but it is updated in place"),
    ("square", lambda: sc.inv_root(FakeCUDAArray((3, 4))), r"G must be square, got shape \(3, 4\)"),
    ("dtypes differ", lambda: sc.inv_root_apply(FakeCUDAArray((3, 3)), FakeCUDAArray((3,), "<f4")),
     r"V must have G's dtype float64, got float32"),
    ("mixed with numpy", lambda: sc.inv_root_apply(FakeCUDAArray((3, 3)), np.ones(3)),
     r"G is a device array \(.*FakeCUDAArray\) but V is a numpy array; the arrays of one call must "
     r"be all numpy arrays or all CUDA device arrays"),
    ("mixed in place", lambda: sc.rmsprop_diag_step(_x(), FakeCUDAArray((4,)), _x(), 0.1, 0.9),
     r"g is a device array .* but x is a numpy array"),
    ("bad stream field", lambda: sc.inv_root(FakeCUDAArray((3, 3), stream="s")),
     r"G's __cuda_array_interface__ has a non-integer stream 's'"),
    ("CPU DLPack", lambda: sc.inv_root(FakeDLPack(1)),
     r"G is a .*FakeDLPack in kDLCPU memory, not on a CUDA device; pass a numpy array"),
    ("ROCm DLPack", lambda: sc.inv_root(FakeDLPack(10)), r"in kDLROCM memory"),
    ("pinned-host DLPack", lambda: sc.inv_root_apply(np.eye(2), FakeDLPack(3)),
     r"V is a .*FakeDLPack in kDLCUDAHost memory"),
]


def _malformed() -> FakeCUDAArray:
    a = FakeCUDAArray((3, 3))
    del a.cai["shape"]
    return a


def _not_a_dict() -> Any:
    class A:
        __cuda_array_interface__ = [1, 2]

    return A()


@pytest.mark.parametrize(("call", "message"), [pytest.param(c, m, id=i) for i, c, m in FAKE_BAD])
def test_bad_device_arrays_are_value_errors_on_any_machine(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_a_cpu_torch_tensor_is_refused_by_name():
    torch = _optional("torch")
    if torch is None:
        pytest.skip("torch is not installed")
    with pytest.raises(ValueError, match=r"G is a torch.Tensor in kDLCPU memory, not on a CUDA device"):
        sc.inv_root(torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"x is a torch.Tensor in kDLCPU memory"):
        sc.rmsprop_diag_step(torch.zeros(3), torch.ones(3), torch.zeros(3), 0.1, 0.9)


def _valid_calls() -> list[tuple[str, Callable[[], Any]]]:
    G3 = np.broadcast_to(np.eye(3), (2, 3, 3)).copy()
    return [
        ("ema", lambda: sc.ema_update_batched(G3, np.ones((2, 4, 3)), [0.9, 0.8, 0.7, 0.6])),
        ("ema 2-D", lambda: sc.ema_update_batched(np.eye(3, dtype=np.float32),
                                                  np.ones(3, dtype=np.float32), 0.9)),
        ("inv_root", lambda: sc.inv_root(np.eye(3), eps=1e-3, method="newton")),
        ("inv_root list", lambda: sc.inv_root([[2.0, 0.0], [0.0, 2.0]])),
        ("inv_root empty batch", lambda: sc.inv_root(np.zeros((0, 3, 3)))),
        ("inv_root_apply", lambda: sc.inv_root_apply(G3, np.ones((2, 3, 5)), form="adam")),
        ("rmsprop", lambda: sc.rmsprop_diag_step(_x(), np.ones(4), _x(), 0.1, 0.9)),
        ("run_seeds", lambda: sc.run_seeds(problems.SaddleProblem(), ss.SGD(0.1), np.zeros(2), 10, 4)),
        ("device_description", sc.device_description),
        ("device array", lambda: sc.inv_root(FakeCUDAArray((3, 3)))),
        ("DeviceArray", lambda: sc.DeviceArray((3,), np.float64)),
    ]


@without_gpu
@pytest.mark.parametrize(("call"), [pytest.param(c, id=i) for i, c in _valid_calls()])
def test_valid_calls_without_a_gpu_raise_cuda_unavailable_error(call):
    with pytest.raises(sc.CUDAUnavailableError, match=re.escape(sc.unavailable_reason())):
        call()


@without_gpu
def test_in_place_numpy_arguments_are_untouched_without_a_gpu():
    G, gs = np.eye(3), np.ones((2, 3))
    x, g, v = np.ones(4), np.ones(4), np.ones(4)
    with unchanged(G, gs, x, g, v), pytest.raises(sc.CUDAUnavailableError):
        sc.ema_update_batched(G, gs, 0.5)
    with unchanged(G, gs, x, g, v), pytest.raises(sc.CUDAUnavailableError):
        sc.rmsprop_diag_step(x, g, v, 0.1, 0.9)


@needs_gpu
def test_a_host_address_is_not_taken_for_device_memory():
    a = np.eye(3)
    with pytest.raises(ValueError, match=r"G's data pointer is not CUDA device memory"):
        sc.inv_root(FakeCUDAArray((3, 3), ptr=a.ctypes.data))


# --------------------------------------------------------------------------------------------
# Everywhere: run_seeds' checks


def _fresh_rms(d: int = 2, **kw: Any) -> ss.RMSProp:
    return ss.RMSProp(d, 0.01, beta=0.9, structure=kw.pop("structure", "diag"), **kw)


def _stepped_sgd() -> ss.SGD:
    o = ss.SGD(0.1)
    o.step(np.zeros(2), np.ones(2))
    return o


SEED_BAD: list[tuple[str, Callable[[], Any], str]] = [
    ("oracle", lambda: sc.run_seeds(problems.Oracle(lambda x, r: x, 2), ss.SGD(0.1), np.zeros(2), 5, 2),
     r"run_seeds supports SaddleProblem, ReddiCounterexample and NoisyQuadratic, got "
     r"saddlescape.Oracle"),
    ("callable", lambda: sc.run_seeds(lambda x, r: x, ss.SGD(0.1), np.zeros(2), 5, 2),
     r"run_seeds supports SaddleProblem, ReddiCounterexample and NoisyQuadratic, got function"),
    ("logistic", lambda: sc.run_seeds(problems.LogisticRegression(np.ones((4, 2)), [0, 1, 0, 1], 2),
                                      ss.SGD(0.1), np.zeros(6), 5, 2),
     r"got saddlescape.LogisticRegression"),
    ("dim 17", lambda: sc.run_seeds(problems.NoisyQuadratic(np.eye(17), np.ones(17)), ss.SGD(0.1),
                                    np.zeros(17), 5, 2),
     r"run_seeds handles problems of dim <= 16, got dim 17"),
    ("adam", lambda: sc.run_seeds(problems.SaddleProblem(), ss.Adam(2), np.zeros(2), 5, 2),
     r"run_seeds supports SGD, RMSProp \(structure 'diag'\) and SaddleEscape over them; "
     r"optimizer is saddlescape.Adam"),
    ("full rmsprop", lambda: sc.run_seeds(problems.SaddleProblem(), _fresh_rms(structure="full"),
                                          np.zeros(2), 5, 2),
     r"run_seeds supports RMSProp with structure 'diag', got 'full'"),
    ("hallucinate", lambda: sc.run_seeds(problems.SaddleProblem(),
                                         ss.SaddleEscape(_fresh_rms(), 0.1, 10, hallucinate=2),
                                         np.zeros(2), 5, 2),
     r"run_seeds supports SaddleEscape with hallucinate = 0, got 2"),
    ("escape over adam", lambda: sc.run_seeds(problems.SaddleProblem(),
                                              ss.SaddleEscape(ss.Adam(2), 0.1, 10), np.zeros(2), 5, 2),
     r"the SaddleEscape's base is saddlescape.Adam"),
    ("escape over escape", lambda: sc.run_seeds(
        problems.SaddleProblem(), ss.SaddleEscape(ss.SaddleEscape(ss.SGD(0.1, dim=2), 0.1, 10), 0.1, 10),
        np.zeros(2), 5, 2),
     r"the SaddleEscape's base is saddlescape.SaddleEscape"),
    ("stepped", lambda: sc.run_seeds(problems.SaddleProblem(), _stepped_sgd(), np.zeros(2), 5, 2),
     r"run_seeds starts every seed from a fresh optimizer; optimizer has taken 1 steps"),
    ("not an optimizer", lambda: sc.run_seeds(problems.SaddleProblem(), "sgd", np.zeros(2), 5, 2),
     r"optimizer must be a saddlescape optimizer, got str"),
    ("dim mismatch", lambda: sc.run_seeds(problems.SaddleProblem(), ss.SGD(0.1, dim=3),
                                          np.zeros(2), 5, 2),
     r"this optimizer works in dimension 3, got 2"),
    ("x0 shape", lambda: sc.run_seeds(problems.SaddleProblem(), ss.SGD(0.1), np.zeros(3), 5, 2),
     r"x0 must have shape \(2,\), got shape \(3,\)"),
    ("x0 NaN", lambda: sc.run_seeds(problems.SaddleProblem(), ss.SGD(0.1), [0.0, math.nan], 5, 2),
     r"x0 must be finite"),
    ("steps", lambda: sc.run_seeds(problems.SaddleProblem(), ss.SGD(0.1), np.zeros(2), -1, 2),
     r"steps must be >= 0, got -1"),
    ("steps float", lambda: sc.run_seeds(problems.SaddleProblem(), ss.SGD(0.1), np.zeros(2), 5.0, 2),
     r"steps must be an integer, got 5.0"),
    ("seeds 0", lambda: sc.run_seeds(problems.SaddleProblem(), ss.SGD(0.1), np.zeros(2), 5, 0),
     r"seeds must be >= 1 \(a count\) or a sequence of seeds, got 0"),
    ("seeds empty", lambda: sc.run_seeds(problems.SaddleProblem(), ss.SGD(0.1), np.zeros(2), 5, []),
     r"seeds must not be empty"),
    ("seed negative", lambda: sc.run_seeds(problems.SaddleProblem(), ss.SGD(0.1), np.zeros(2), 5,
                                           [1, -1]),
     r"seed must be an integer in \[0, 2\*\*64\), got -1"),
    ("seeds string", lambda: sc.run_seeds(problems.SaddleProblem(), ss.SGD(0.1), np.zeros(2), 5, "12"),
     r"seeds must be a count or a sequence of seeds, got '12'"),
    ("radius 0", lambda: sc.run_seeds(problems.SaddleProblem(), ss.SGD(0.1), np.zeros(2), 5, 2,
                                      escape_radius=0.0),
     r"escape_radius must be finite and > 0, got 0.0"),
    ("radius NaN", lambda: sc.run_seeds(problems.SaddleProblem(), ss.SGD(0.1), np.zeros(2), 5, 2,
                                        escape_radius=math.nan),
     r"escape_radius must be finite and > 0, got nan"),
    ("value inf", lambda: sc.run_seeds(problems.SaddleProblem(), ss.SGD(0.1), np.zeros(2), 5, 2,
                                       escape_value=-math.inf),
     r"escape_value must be finite, got -inf"),
]


@pytest.mark.parametrize(("call", "message"), [pytest.param(c, m, id=i) for i, c, m in SEED_BAD])
def test_run_seeds_rejects_on_any_machine(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# --------------------------------------------------------------------------------------------
# GPU: inverse roots

ROUTES = [(m, d) for d in (1, 2, 32, 33, 128) for m in METHODS if not (m == "jacobi" and d > 32)]


@needs_gpu
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", [1, 50])
@pytest.mark.parametrize(("method", "d"), ROUTES)
def test_inv_root_matches_the_cpu(method, d, n, dtype):
    rng = np.random.default_rng(1000 * d + n + METHODS.index(method))
    kappa = 1e3
    G = spd_batch(n, d, kappa, rng).astype(dtype)
    G64 = G.astype(np.float64)  # the rounded input, exactly
    lam_max_min = float(np.linalg.eigvalsh(G64)[:, -1].min())
    for form in ["inv_sqrt"] if method == "newton" else FORMS:
        for eps in (0.0, 1e-3 * lam_max_min):
            with unchanged(G):
                A = sc.inv_root(G, eps=eps, form=form, method=method)
            assert isinstance(A, np.ndarray) and A.dtype == dtype and A.shape == G.shape
            assert np.isfinite(A).all()
            err = block_rel_err(A, cpu_root(G64, eps, 2, form))
            assert err <= root_tol(dtype, kappa, d, method), (form, eps, err)
    # A single (d, d) matrix gives a (d, d) result, equal to the batch's first block.
    A1 = sc.inv_root(G[0], method=method)
    assert A1.shape == (d, d)
    assert block_rel_err(A1, cpu_root(G64[:1], 0.0)) <= root_tol(dtype, kappa, d, method)


@needs_gpu
@pytest.mark.parametrize("method", ["auto", "batched_qr", "divide_conquer", "newton"])
@pytest.mark.parametrize("p", [1, 3])
def test_inv_root_other_p(method, p):
    rng = np.random.default_rng(77 + p)
    G = spd_batch(5, 33, 100.0, rng)
    A = sc.inv_root(G, eps=1e-2, p=p, method=method)
    assert block_rel_err(A, cpu_root(G, 1e-2, p)) <= root_tol(np.float64, 100.0, 33, method)
    ref = scipy.linalg.fractional_matrix_power(G[2] + 1e-2 * np.eye(33), -1.0 / p).real
    assert block_rel_err(A[2], ref[None]) <= root_tol(np.float64, 100.0, 33, method)


@needs_gpu
@pytest.mark.parametrize("method", ["auto", "jacobi", "batched_qr", "divide_conquer"])
@pytest.mark.parametrize("kappa", [1e6, 1e10])
def test_inv_root_ill_conditioned(method, kappa):
    rng = np.random.default_rng(int(np.log10(kappa)))
    G = spd_batch(8, 24, kappa, rng)
    for form in FORMS:
        A = sc.inv_root(G, form=form, method=method)
        assert block_rel_err(A, cpu_root(G, 0.0, 2, form)) <= root_tol(np.float64, kappa, 24, method)


@needs_gpu
def test_newton_on_an_ill_conditioned_batch():
    G = spd_batch(8, 40, 1e6, np.random.default_rng(6))
    A = sc.inv_root(G, method="newton")
    assert block_rel_err(A, cpu_root(G, 0.0)) <= root_tol(np.float64, 1e6, 40, "newton")


@needs_gpu
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize(("d", "r"), [(2, 1), (20, 6), (40, 10)])
def test_rank_deficient_blocks_with_eps(dtype, d, r):
    rng = np.random.default_rng(10 * d + r)
    X = rng.standard_normal((4, d, r))
    G = (X @ X.transpose(0, 2, 1)).astype(dtype)  # rank r, with rounding-negative eigenvalues
    G64 = G.astype(np.float64)
    lam_max = float(np.linalg.eigvalsh(G64)[:, -1].max())
    eps = 1e-3 * lam_max
    kappa = (lam_max + eps) / eps
    for method in [m for m in METHODS if not (m == "jacobi" and d > 32)]:
        with unchanged(G):
            A = sc.inv_root(G, eps=eps, method=method)
        # numpy's eigh, not the CPU library: for float32 input the CPU's float64 route would
        # reject the rounding-negative eigenvalues of the rounded G, which float32 tolerates.
        assert block_rel_err(A, clipped_root(G64, eps)) <= root_tol(dtype, kappa, d, method), method
        if dtype == np.float64 and method != "newton":
            # The SVD of X knows the null space exactly; forming X X^T costs r more in kappa.
            u_, s, _ = np.linalg.svd(X[0], full_matrices=True)
            sv = np.zeros(d)
            sv[: s.size] = s
            ref = (u_ * (1.0 / np.sqrt(sv**2 + eps))) @ u_.T
            assert block_rel_err(A[0], ref[None]) <= root_tol(dtype, r * kappa, d, method)
    # The adam form: the kept rounding eigenvalues delta of the null space move
    # 1 / (sqrt(delta) + eps) by sqrt(delta) / eps (tests/python/test_matrix_functions.py).
    eps_a = np.sqrt(lam_max)
    A = sc.inv_root(G, eps=eps_a, form="adam")
    tol = 2 * (4.0 * np.sqrt(d * u(dtype) * lam_max) / eps_a) + root_tol(dtype, kappa, d, "auto")
    assert block_rel_err(A, clipped_root(G64, eps_a, "adam")) <= tol


@needs_gpu
def test_newton_with_tf32_is_loose_but_close():
    rng = np.random.default_rng(32)
    G = spd_batch(4, 128, 10.0, rng).astype(np.float32)
    ref = cpu_root(G.astype(np.float64), 0.0)
    A = sc.inv_root(G, method="newton", allow_tf32=True, tol=2e-2)
    assert A.dtype == np.float32
    assert block_rel_err(A, ref) <= 5e-2
    # Without TF32 the float32 Newton result is far better: the flag did something only if the
    # two differ; allow_tf32 on float64 input is ignored.
    exact = sc.inv_root(G, method="newton")
    assert block_rel_err(exact, ref) <= root_tol(np.float32, 10.0, 128, "newton")
    G64 = G.astype(np.float64)
    np.testing.assert_array_equal(sc.inv_root(G64, method="newton", allow_tf32=True),
                                  sc.inv_root(G64, method="newton"))


@needs_gpu
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("n", "d", "k"), [(1, 1, 1), (50, 2, 3), (50, 32, 1), (3, 33, 7), (2, 128, 4)])
def test_inv_root_apply_matches_the_cpu(method, n, d, k, dtype):
    if method == "jacobi" and d > 32:
        pytest.skip("jacobi handles d <= 32")
    rng = np.random.default_rng(7 * d + k)
    kappa = 1e3
    G = spd_batch(n, d, kappa, rng).astype(dtype)
    V = rng.standard_normal((n, d, k)).astype(dtype)
    G64, V64 = G.astype(np.float64), V.astype(np.float64)
    for form in ["inv_sqrt"] if method == "newton" else FORMS:
        eps = 1e-2
        with unchanged(G, V):
            out = sc.inv_root_apply(G, V, eps=eps, form=form, method=method)
        assert isinstance(out, np.ndarray) and out.dtype == dtype and out.shape == V.shape
        A = cpu_root(G64, eps, 2, form)
        ref = A @ V64
        tol = root_tol(dtype, kappa, d, method)
        for b in range(n):
            scale = np.linalg.norm(A[b], 2) * np.linalg.norm(V64[b])
            assert np.linalg.norm(out[b] - ref[b]) <= tol * scale, (form, b)
        # (n, d) for k = 1, and the single-matrix shapes
        if k == 1:
            out2 = sc.inv_root_apply(G, V[:, :, 0], eps=eps, form=form, method=method)
            assert out2.shape == (n, d)
            np.testing.assert_allclose(out2, out[:, :, 0], rtol=0, atol=tol * np.abs(ref).max())
    one = sc.inv_root_apply(G[0], V[0], eps=0.5, method=method)
    assert one.shape == (d, k)
    ref1 = cpu_root(G64[:1], 0.5)[0] @ V64[0]
    assert np.linalg.norm(one - ref1) <= root_tol(dtype, kappa, d, method) * \
        np.linalg.norm(cpu_root(G64[:1], 0.5)[0], 2) * np.linalg.norm(V64[0])
    vec = sc.inv_root_apply(G[0], V[0, :, 0], eps=0.5, method=method)
    assert vec.shape == (d,)
    np.testing.assert_allclose(vec, one[:, 0], rtol=0,
                               atol=root_tol(dtype, kappa, d, method) * np.abs(ref1).max())


@needs_gpu
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("method", ["auto", "batched_qr", "divide_conquer", "newton"])
def test_bad_blocks_are_named_and_nothing_is_written(method, dtype):
    rng = np.random.default_rng(3)
    G = spd_batch(5, 8, 10.0, rng).astype(dtype)
    V = rng.standard_normal((5, 8, 2)).astype(dtype)
    bad = G.copy()
    bad[3, 2, 5] = np.nan
    nan_message = r"G\[3\] has a non-finite entry G\[3\]\[2, 5\]"
    with unchanged(bad), pytest.raises(ValueError, match=nan_message):
        sc.inv_root(bad, method=method)
    bad = G.copy()
    bad[3, 2, 5] += 1.0  # far outside the symmetry tolerance
    with pytest.raises(ValueError, match=r"G\[3\] is not symmetric"):
        sc.inv_root(bad, method=method)
    bad = G.copy()
    lam, q = np.linalg.eigh(bad[1].astype(np.float64))
    # lambda_max -> -lambda_max: clearly negative, and still exactly symmetric
    bad[1] -= (2 * lam[-1] * np.outer(q[:, -1], q[:, -1])).astype(dtype)
    with pytest.raises(ValueError, match=r"G\[1\] is not positive semidefinite"):
        sc.inv_root(bad, method=method)
    Vbad = V.copy()
    Vbad[4, 7, 1] = np.inf
    v_message = r"V has a non-finite entry at block 4, row 7, index 1"
    with unchanged(Vbad), pytest.raises(ValueError, match=v_message):
        sc.inv_root_apply(G, Vbad, method=method)


@needs_gpu
@pytest.mark.parametrize("method", ["auto", "jacobi", "batched_qr", "divide_conquer", "newton"])
def test_a_singular_block_with_eps_zero_is_a_numerical_error(method):
    rng = np.random.default_rng(4)
    G = spd_batch(3, 8, 10.0, rng)
    X = rng.standard_normal((8, 3))
    G[2] = X @ X.T
    with pytest.raises(ss.NumericalError, match=r"G\[2\] is singular"):
        sc.inv_root(G, eps=0.0, method=method)
    with pytest.raises(ss.NumericalError):
        sc.inv_root_apply(G, np.ones((3, 8)), eps=0.0, method=method)
    sc.inv_root(G, eps=1e-3, method=method)  # fine with damping


@needs_gpu
def test_numpy_round_trip_copes_with_non_contiguous_input():
    G = spd_batch(4, 6, 10.0, np.random.default_rng(8))
    wide = np.zeros((4, 6, 12))
    wide[:, :, ::2] = G
    view = wide[:, :, ::2]
    assert not view.flags.c_contiguous
    assert_same_result(sc.inv_root(view), sc.inv_root(G))


# --------------------------------------------------------------------------------------------
# GPU: EMA


@needs_gpu
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize(("n", "d", "k"),
                         [(1, 1, 1), (50, 2, 3), (1, 33, 40), (50, 32, 1), (3, 65, 33), (2, 128, 5)])
def test_ema_update_batched_matches_the_numpy_loop(n, d, k, dtype):
    rng = np.random.default_rng(d * 100 + k)
    X = rng.standard_normal((n, d, d))
    G0 = X @ X.transpose(0, 2, 1) / d
    G0 = ((G0 + G0.transpose(0, 2, 1)) / 2).astype(dtype)  # exactly symmetric
    gs = (rng.standard_normal((n, k, d)) * 10.0 ** rng.uniform(-2, 2, (n, 1, 1))).astype(dtype)
    betas = rng.uniform(0.5, 0.999, k)
    G = G0.copy()
    with unchanged(gs):
        sc.ema_update_batched(G, gs, betas)
    np.testing.assert_array_equal(G, G.transpose(0, 2, 1))  # exactly symmetric
    ref = G0.astype(np.float64)
    g64 = gs.astype(np.float64)
    for i in range(k):
        ref = betas[i] * ref + (1 - betas[i]) * np.einsum("bi,bj->bij", g64[:, i], g64[:, i])
    scale = np.abs(ref).max(axis=(1, 2), keepdims=True)
    tol = 4 * (k + 2) * u(np.float64) if dtype == np.float64 else 2 * u(np.float32)
    assert (np.abs(G - ref) / scale).max() <= tol


@needs_gpu
@pytest.mark.parametrize("dtype", FLOATS)
def test_ema_update_batched_matches_the_cpu_estimator(dtype):
    rng = np.random.default_rng(5)
    n, d, k = 6, 17, 4
    G = np.zeros((n, d, d), dtype=dtype)
    ests = [ss.EMAEstimator(d, beta=0.9, dtype=dtype) for _ in range(n)]
    for _ in range(3):
        gs = rng.standard_normal((n, k, d)).astype(dtype)
        sc.ema_update_batched(G, gs, 0.9)
        for b in range(n):
            ests[b].update_batch(gs[b])
    for b in range(n):
        ref = np.asarray(ests[b].estimate(), dtype=np.float64)
        assert np.abs(G[b] - ref).max() <= 4 * (3 * k + 2) * u(dtype) * np.abs(ref).max()


@needs_gpu
def test_ema_shapes_and_one_beta_for_all_steps():
    rng = np.random.default_rng(6)
    G0 = np.eye(4)
    gs = rng.standard_normal((3, 4))
    a, b = G0.copy(), G0.copy()
    sc.ema_update_batched(a, gs, 0.8)
    sc.ema_update_batched(b, gs, [0.8, 0.8, 0.8])
    np.testing.assert_array_equal(a, b)
    # (d,) is one step; (n, d) is one step per block
    c = G0.copy()
    sc.ema_update_batched(c, gs[0], 0.8)
    np.testing.assert_allclose(c, 0.8 * G0 + 0.2 * np.outer(gs[0], gs[0]), rtol=1e-15, atol=1e-15)
    Gn = np.stack([G0, 2 * G0])
    sc.ema_update_batched(Gn, gs[:2], 0.5)
    for i in range(2):
        np.testing.assert_allclose(Gn[i], 0.5 * (i + 1) * G0 + 0.5 * np.outer(gs[i], gs[i]),
                                   rtol=1e-15, atol=1e-15)
    # beta = 0 keeps only the newest sample
    z = G0.copy()
    sc.ema_update_batched(z, gs, 0.0)
    np.testing.assert_allclose(z, np.outer(gs[2], gs[2]), rtol=1e-15, atol=1e-15)


@needs_gpu
@pytest.mark.parametrize("dtype", FLOATS)
def test_ema_bad_gradients_leave_g_unchanged(dtype):
    G = np.broadcast_to(np.eye(3, dtype=dtype), (4, 3, 3)).copy()
    gs = np.ones((4, 2, 3), dtype=dtype)
    gs[1, 0, 2] = np.nan
    message = r"gs has a non-finite entry at block 1, row 0, index 2"
    with unchanged(G, gs), pytest.raises(ValueError, match=message):
        sc.ema_update_batched(G, gs, 0.9)
    big = np.ones((4, 2, 3), dtype=dtype)
    big[2, 1, 1] = 1e20 if dtype == np.float32 else 1e200
    with unchanged(G), pytest.raises(ss.NumericalError, match="overflow"):
        sc.ema_update_batched(G, big, 0.9)


@needs_gpu
def test_ema_flushes_subnormals_to_zero():
    G = np.full((2, 2), 1e-300)
    sc.ema_update_batched(G, np.zeros(2), 1e-9)  # 1e-309 would be subnormal
    np.testing.assert_array_equal(G, np.zeros((2, 2)))


# --------------------------------------------------------------------------------------------
# GPU: the diagonal step


@needs_gpu
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("d", [1, 7, 1000])
def test_rmsprop_diag_step_follows_the_cpu_optimizer(form, d):
    rng = np.random.default_rng(d)
    lr, beta, eps = 0.01, 0.95, 1e-6
    opt = ss.RMSProp(d, lr, beta=beta, eps=eps, structure="diag", form=form)
    x_cpu = rng.standard_normal(d)
    x_gpu = x_cpu.copy()
    v = np.zeros(d)
    for _ in range(20):
        g = rng.standard_normal(d) * 10.0 ** rng.uniform(-3, 3)
        with unchanged(g):
            sc.rmsprop_diag_step(x_gpu, g, v, lr, beta, eps, form)
        opt.step(x_cpu, g)
    np.testing.assert_allclose(v, opt.estimate(), rtol=1e-12, atol=0)
    np.testing.assert_allclose(x_gpu, x_cpu, rtol=1e-12, atol=1e-15)


@needs_gpu
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("form", FORMS)
def test_rmsprop_diag_step_on_a_long_vector(dtype, form):
    rng = np.random.default_rng(11)
    n = 2**20 + 3  # not a multiple of any unroll or block size
    x = rng.standard_normal(n).astype(dtype)
    g = rng.standard_normal(n).astype(dtype)
    v = rng.uniform(0.0, 2.0, n).astype(dtype)
    lr, beta, eps = 1e-3, 0.9, 1e-8
    x64, g64, v64 = (a.astype(np.float64) for a in (x, g, v))
    v_ref = beta * v64 + (1 - beta) * g64**2
    den = np.sqrt(v_ref + eps) if form == "inv_sqrt" else np.sqrt(v_ref) + eps
    x_ref = x64 - lr * g64 / den
    sc.rmsprop_diag_step(x, g, v, lr, beta, eps, form)
    np.testing.assert_allclose(v, v_ref, rtol=8 * u(dtype), atol=0)
    np.testing.assert_allclose(x, x_ref, rtol=8 * u(dtype),
                               atol=8 * u(dtype) * lr * np.abs(g64 / den).max())


@needs_gpu
def test_rmsprop_diag_step_shapes_and_strided_numpy():
    rng = np.random.default_rng(12)
    x = rng.standard_normal((3, 5, 7))
    g = rng.standard_normal((3, 5, 7))
    v = np.zeros((3, 5, 7))
    flat = [a.ravel().copy() for a in (x, g, v)]
    sc.rmsprop_diag_step(x, g, v, 0.1, 0.5)
    sc.rmsprop_diag_step(flat[0], flat[1], flat[2], 0.1, 0.5)
    np.testing.assert_array_equal(x.ravel(), flat[0])
    np.testing.assert_array_equal(v.ravel(), flat[2])
    # in-place arguments that are strided numpy views receive the result too
    big_x, big_v = np.zeros(8), np.zeros(8)
    sc.rmsprop_diag_step(big_x[::2], np.ones(4), big_v[::2], 0.1, 0.5)
    assert (big_x[::2] < 0).all() and (big_x[1::2] == 0).all()
    assert (big_v[::2] > 0).all() and (big_v[1::2] == 0).all()
    sc.rmsprop_diag_step(np.zeros(0), np.zeros(0), np.zeros(0), 0.1, 0.5)  # nothing to do


@needs_gpu
def test_rmsprop_diag_step_bad_gradients():
    x, v = np.ones(10), np.ones(10)
    g = np.ones(10)
    g[5] = np.nan
    with unchanged(x, v), pytest.raises(ValueError, match=r"g must be finite; entry 5"):
        sc.rmsprop_diag_step(x, g, v, 0.1, 0.9)
    big = np.ones(10)
    big[2] = 1e200
    with unchanged(x, v), pytest.raises(ss.NumericalError, match="overflows"):
        sc.rmsprop_diag_step(x, big, v, 0.1, 0.9)
    # Without the check the step is taken and the NaN spreads to that entry only.
    sc.rmsprop_diag_step(x, g, v, 0.1, 0.9, check=False)
    assert np.isnan(x[5]) and np.isnan(v[5])
    assert np.isfinite(np.delete(x, 5)).all() and np.isfinite(np.delete(v, 5)).all()


# --------------------------------------------------------------------------------------------
# GPU: many seeds


def _escape_steps(m: ss.RunManyResult, x0: np.ndarray, radius: float | None,
                  value: float | None) -> np.ndarray:
    """The first recorded t at which each CPU run satisfied the escape criterion, or -1."""
    hit = np.zeros(m.x.shape[:2], dtype=bool)
    if radius is not None:
        with np.errstate(invalid="ignore"):
            hit |= np.linalg.norm(m.x - x0, axis=-1) >= radius
    if value is not None:
        with np.errstate(invalid="ignore"):
            hit |= m.f <= value
    return np.array([np.flatnonzero(h)[0] if h.any() else -1 for h in hit], dtype=np.int64)


def _q16() -> problems.NoisyQuadratic:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((16, 16))
    return problems.NoisyQuadratic((a + a.T) / 8, a @ a.T / 160)


def _q5() -> problems.NoisyQuadratic:
    rng = np.random.default_rng(1)
    rng.standard_normal((16, 16))
    a = rng.standard_normal((5, 5))
    return problems.NoisyQuadratic((a + a.T) / 8, np.full(5, 0.1))


_H3 = np.diag([1.0, -0.05, 0.5])
_C3 = np.array([[0.5, 0.1, 0.0], [0.1, 0.05, 0.01], [0.0, 0.01, 0.2]])

# (id, problem, make_optimizer, x0, steps, escape_radius, escape_value). Each mixes seeds that
# escape with seeds that do not (checked below on the CPU result, so that the comparison means
# something).
SEED_CASES = [
    ("sgd saddle", problems.SaddleProblem, lambda: ss.SGD(0.03), np.zeros(2), 400, 0.3, None),
    ("rmsprop inv_sqrt schedules burn-in", problems.SaddleProblem,
     lambda: ss.RMSProp(2, schedules.inverse_sqrt(0.05),
                        beta=schedules.beta_from_lr_schedule(schedules.inverse_sqrt(0.05), C=1.0),
                        structure="diag", burn_in=10), np.zeros(2), 400, 0.3, None),
    ("rmsprop adam", problems.SaddleProblem,
     lambda: ss.RMSProp(2, 0.005, beta=0.9, eps=1e-6, structure="diag", form="adam"),
     np.zeros(2), 400, 0.3, None),
    ("saddle escape", problems.SaddleProblem,
     lambda: ss.SaddleEscape(ss.RMSProp(2, 0.002, beta=0.95, structure="diag"), r=0.02, t_thresh=50),
     np.zeros(2), 400, 0.3, None),
    ("reddi sgd", lambda: problems.ReddiCounterexample(3.0, 0.5),
     lambda: ss.SGD(schedules.inverse_sqrt(0.05)), np.array([0.5]), 300, None, -0.25),
    ("reddi rmsprop", lambda: problems.ReddiCounterexample(3.0, 0.5),
     lambda: ss.RMSProp(1, 0.005, beta=0.9, structure="diag"), np.array([0.5]), 300, None, 0.15),
    ("quadratic diag noise", lambda: problems.NoisyQuadratic(_H3, [0.5, 0.05, 0.2]),
     lambda: ss.SGD(0.05), np.zeros(3), 400, 0.5, None),
    ("quadratic full noise", lambda: problems.NoisyQuadratic(_H3, _C3),
     lambda: ss.RMSProp(3, 0.005, beta=0.95, structure="diag"), np.zeros(3), 400, 0.25, None),
    ("quadratic d=16", _q16,
     lambda: ss.RMSProp(16, 0.002, beta=0.9, structure="diag", form="adam"),
     np.zeros(16), 300, 0.2, None),
    ("quadratic d=5 saddle escape", _q5,
     lambda: ss.SaddleEscape(ss.SGD(0.02), r=0.2, t_thresh=25), np.zeros(5), 150, 1.0, None),
]


@needs_gpu
@pytest.mark.parametrize(("make_problem", "make_opt", "x0", "steps", "radius", "value"),
                         [pytest.param(*c[1:], id=c[0]) for c in SEED_CASES])
def test_run_seeds_follows_run_many(make_problem, make_opt, x0, steps, radius, value):
    p = make_problem()
    S = 64
    opt = make_opt()
    r = sc.run_seeds(p, opt, x0, steps, S, escape_radius=radius, escape_value=value)
    assert opt.steps == 0  # not advanced
    m = ss.run_many(p, make_opt, x0, steps, S, on_error="return")
    assert isinstance(r, sc.SeedRunResult) and len(r) == S
    np.testing.assert_array_equal(r.seeds, np.arange(S, dtype=np.uint64))
    assert r.x_final.shape == (S, p.dim) and r.status.shape == (S,)
    assert r.status.tolist() == m.status
    np.testing.assert_array_equal(r.stopped_at, m.stopped_at)
    np.testing.assert_allclose(r.x_final, m.x_final, rtol=1e-9, atol=1e-9)
    f_cpu = np.array([p.value(x) if np.isfinite(x).all() else np.nan for x in m.x_final])
    np.testing.assert_allclose(r.f_final, f_cpu, rtol=1e-9, atol=1e-9)
    cpu_escape = _escape_steps(m, x0, radius, value)
    assert 0 < (cpu_escape >= 0).sum() < S  # a mix, or the comparison says little
    differ = np.flatnonzero(r.escape_step != cpu_escape)
    assert differ.size <= 2, (r.escape_step[differ], cpu_escape[differ])
    assert (np.abs(r.escape_step[differ] - cpu_escape[differ]) == 1).all()
    np.testing.assert_array_equal(r.escaped, r.escape_step >= 0)


@needs_gpu
def test_run_seeds_reports_divergence_like_run_many():
    p = problems.NoisyQuadratic(np.diag([100.0, 1.0]), [0.1, 0.1])
    x0 = np.array([0.1, 0.1])
    seeds = [0, 5, 2**63 + 5, 2**64 - 1]
    r = sc.run_seeds(p, ss.SGD(0.1), x0, 400, seeds)
    m = ss.run_many(p, lambda: ss.SGD(0.1), x0, 400, seeds, on_error="return")
    np.testing.assert_array_equal(r.seeds, np.array(seeds, dtype=np.uint64))
    assert r.status.tolist() == m.status == ["diverged"] * 4
    np.testing.assert_array_equal(r.stopped_at, m.stopped_at)
    np.testing.assert_allclose(r.x_final, m.x_final, rtol=1e-9)
    assert not r.completed.any()
    np.testing.assert_array_equal(r.escape_step, -1)  # no criterion given


@needs_gpu
def test_run_seeds_is_reproducible_and_counts_mean_zero_to_n():
    p = problems.SaddleProblem()
    a = sc.run_seeds(p, ss.SGD(0.03), np.zeros(2), 100, 8, escape_radius=0.1)
    b = sc.run_seeds(p, ss.SGD(0.03), np.zeros(2), 100, list(range(8)), escape_radius=0.1)
    for name in ("seeds", "escape_step", "f_final", "x_final", "status", "stopped_at"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    zero = sc.run_seeds(p, ss.SGD(0.03), np.array([0.2, 0.1]), 0, 3, escape_value=1e6)
    np.testing.assert_array_equal(zero.x_final, np.tile([0.2, 0.1], (3, 1)))
    np.testing.assert_array_equal(zero.escape_step, 0)  # F(x0) <= 1e6 at t = 0


@needs_gpu
def test_run_seeds_names_an_unsupported_schedule():
    nested = schedules.beta_from_lr_schedule(schedules.beta_from_lr_schedule(0.1), C=0.5)
    with pytest.raises(ValueError, match=r"schedules for beta"):
        sc.run_seeds(problems.SaddleProblem(), ss.RMSProp(2, 0.01, beta=nested, structure="diag"),
                     np.zeros(2), 10, 2)


# --------------------------------------------------------------------------------------------
# GPU: threads, the cache, DeviceArray


@needs_gpu
def test_threads_get_their_own_contexts():
    G = spd_batch(10, 20, 100.0, np.random.default_rng(13))
    ref = sc.inv_root(G)
    results: list[Any] = [None] * 4
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(5):
                results[i] = sc.inv_root(G)
            sc.clear_cache()
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for r in results:
        assert_same_result(r, ref)
    sc.clear_cache()
    assert_same_result(sc.inv_root(G), ref)
    assert "sm_" in sc.device_description()


@needs_gpu
def test_device_array_round_trip():
    a = sc.DeviceArray((2, 3), np.float32)
    assert a.shape == (2, 3) and a.dtype == np.float32 and a.nbytes == 24 and a.ptr != 0
    cai = a.__cuda_array_interface__
    assert cai["typestr"] == "<f4" and cai["version"] == 3 and cai["stream"] == 1
    # A DeviceArray is itself a device array for the functions.
    G = spd_batch(1, 3, 10.0, np.random.default_rng(14))[0]
    dG = sc.DeviceArray((3, 3), np.float64)
    dG._buffer.copy_from_host(G, 0)
    A = sc.inv_root(dG)
    assert isinstance(A, sc.DeviceArray)
    assert_same_result(A.get(), sc.inv_root(G))


# --------------------------------------------------------------------------------------------
# GPU: torch and CuPy arrays


@needs_torch
@pytest.mark.parametrize("dtype", FLOATS)
def test_torch_tensors_are_used_without_copies(dtype):
    torch = torch_cuda
    rng = np.random.default_rng(15)
    G = spd_batch(6, 9, 100.0, rng).astype(dtype)
    V = rng.standard_normal((6, 9, 2)).astype(dtype)
    tG, tV = torch.from_numpy(G).cuda(), torch.from_numpy(V).cuda()
    A = sc.inv_root(tG, eps=1e-3)
    assert isinstance(A, torch.Tensor) and A.device == tG.device and A.dtype == tG.dtype
    assert A.shape == tG.shape
    tol = root_tol(dtype, 100.0, 9, "auto")
    assert block_rel_err(A.cpu().numpy(), sc.inv_root(G, eps=1e-3).astype(np.float64)) <= tol
    out = sc.inv_root_apply(tG, tV, eps=1e-3)
    assert isinstance(out, torch.Tensor) and out.shape == tV.shape
    np.testing.assert_allclose(out.cpu().numpy(), sc.inv_root_apply(G, V, eps=1e-3),
                               rtol=tol, atol=tol * np.abs(out.cpu().numpy()).max())
    np.testing.assert_array_equal(tG.cpu().numpy(), G)  # inputs untouched
    # in place
    gs = rng.standard_normal((6, 3, 9)).astype(dtype)
    Gn = G.copy()
    sc.ema_update_batched(Gn, gs, 0.9)
    sc.ema_update_batched(tG, torch.from_numpy(gs).cuda(), 0.9)
    np.testing.assert_allclose(tG.cpu().numpy(), Gn, rtol=4 * u(dtype),
                               atol=4 * u(dtype) * np.abs(Gn).max())
    x, g, v = (rng.standard_normal(100).astype(dtype) for _ in range(3))
    v = np.abs(v)
    tx, tg, tv = (torch.from_numpy(a.copy()).cuda() for a in (x, g, v))
    sc.rmsprop_diag_step(x, g, v, 0.01, 0.9)
    sc.rmsprop_diag_step(tx, tg, tv, 0.01, 0.9)
    np.testing.assert_allclose(tx.cpu().numpy(), x, rtol=4 * u(dtype))
    np.testing.assert_allclose(tv.cpu().numpy(), v, rtol=4 * u(dtype))


@needs_torch
def test_torch_arrays_that_cannot_be_used_are_named():
    torch = torch_cuda
    G = torch.eye(4, dtype=torch.float64, device="cuda").repeat(3, 1, 1)
    with pytest.raises(ValueError, match=r"G must be C-contiguous"):
        sc.inv_root(G.transpose(0, 2))
    with pytest.raises(ValueError, match=r"G \(torch.Tensor\) cannot be used as a CUDA array"):
        sc.inv_root(G.clone().requires_grad_(True))
    with pytest.raises(ValueError, match=r"V must have G's dtype float64, got float32"):
        sc.inv_root_apply(G, torch.ones(3, 4, device="cuda"))
    with pytest.raises(ValueError, match=r"all numpy arrays or all CUDA device arrays"):
        sc.inv_root_apply(G, np.ones((3, 4)))
    with pytest.raises(ValueError, match=r"G must have dtype float32 or float64"):
        sc.inv_root(G.to(torch.float16))
    if torch.cuda.device_count() > 1:
        other = torch.eye(4, dtype=torch.float64, device="cuda:1")
        with pytest.raises(ValueError, match=r"G lives on CUDA device 1, but the current device is 0"):
            sc.inv_root(other)


@needs_torch
def test_torch_streams_are_followed():
    torch = torch_cuda
    G = spd_batch(20, 16, 10.0, np.random.default_rng(16))
    ref = sc.inv_root(G)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        tG = torch.from_numpy(G).to("cuda", non_blocking=False) * 1.0  # produced on s
        A = sc.inv_root(tG)  # queued on s, after tG
        B = A * 2.0
    s.synchronize()
    assert_same_result(A.cpu().numpy(), ref)
    assert_same_result(B.cpu().numpy(), 2 * ref)
    # an explicit stream
    tG2 = torch.from_numpy(G).cuda()
    torch.cuda.synchronize()
    C = sc.inv_root(tG2, stream=s.cuda_stream)
    s.synchronize()
    assert_same_result(C.cpu().numpy(), ref)


@needs_torch
def test_dlpack_only_arrays():
    torch = torch_cuda
    G = spd_batch(3, 5, 10.0, np.random.default_rng(17))
    tG = torch.from_numpy(G).cuda()
    A = sc.inv_root(DLPackOnly(tG))
    assert isinstance(A, sc.DeviceArray)
    assert_same_result(A.get(), sc.inv_root(G))
    gs = np.ones((3, 5))
    sc.ema_update_batched(DLPackOnly(tG), DLPackOnly(torch.from_numpy(gs).cuda()), 0.5)
    Gn = G.copy()
    sc.ema_update_batched(Gn, gs, 0.5)
    np.testing.assert_allclose(tG.cpu().numpy(), Gn, rtol=1e-15, atol=1e-15)
    with pytest.raises(ValueError, match=r"G must be C-contiguous, got strides .* \(elements\)"):
        sc.inv_root(DLPackOnly(tG.transpose(0, 2)))
    with pytest.raises(ValueError, match=r"G must have dtype float32 or float64, got DLPack dtype "
                                         r"int64"):
        sc.inv_root(DLPackOnly(torch.ones(2, 2, dtype=torch.int64, device="cuda")))


@needs_cupy
@pytest.mark.parametrize("dtype", FLOATS)
def test_cupy_arrays_are_used_without_copies(dtype):
    cupy = cupy_cuda
    rng = np.random.default_rng(18)
    G = spd_batch(4, 40, 100.0, rng).astype(dtype)
    cG = cupy.asarray(G)
    A = sc.inv_root(cG, method="divide_conquer")
    assert isinstance(A, cupy.ndarray) and A.dtype == dtype and A.shape == G.shape
    tol = root_tol(dtype, 100.0, 40, "divide_conquer")
    assert block_rel_err(cupy.asnumpy(A), cpu_root(G.astype(np.float64), 0.0)) <= tol
    x = cupy.asarray(rng.standard_normal(50).astype(dtype))
    v = cupy.zeros(50, dtype=dtype)
    x0 = cupy.asnumpy(x).copy()
    sc.rmsprop_diag_step(x, cupy.ones(50, dtype=dtype), v, 0.1, 0.5)
    assert (cupy.asnumpy(x) < x0).all() and (cupy.asnumpy(v) > 0).all()
    with cupy.cuda.Stream(non_blocking=True) as s:
        B = sc.inv_root(cupy.asarray(G))  # CuPy's interface names its current stream
        s.synchronize()
    assert block_rel_err(cupy.asnumpy(B), cpu_root(G.astype(np.float64), 0.0)) <= root_tol(
        dtype, 100.0, 40, "auto")
    wrapped = cupy.asarray(sc.inv_root(DLPackOnly(cG)))  # DeviceArray -> CuPy, no copy
    assert block_rel_err(cupy.asnumpy(wrapped), cpu_root(G.astype(np.float64), 0.0)) <= root_tol(
        dtype, 100.0, 40, "auto")
