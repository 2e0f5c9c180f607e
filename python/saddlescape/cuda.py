"""The CUDA backend: batched EMA estimates, batched inverse roots, the fused diagonal RMSProp
step and many seeds of :func:`saddlescape.run` at once, on one NVIDIA GPU.

``import saddlescape.cuda`` always works. Whether the GPU can be used is
:func:`is_available`, and :func:`unavailable_reason` says why not: the package was built
without the backend (``saddlescape._cuda`` is missing; wheels built where no CUDA toolkit was
found are CPU-only), the backend could not be loaded, or the CUDA runtime finds no device.
Every operation then raises :class:`CUDAUnavailableError` with that reason, after it has
checked its arguments (so a bad argument is a ValueError on any machine).

What runs on the GPU, and what it computes (the CPU library is the reference; each function
computes what its CPU counterpart computes, to rounding):

* :func:`ema_update_batched`: k EMA steps G <- beta G + (1 - beta) g g^T on n same-size blocks,
  as ``EMAEstimator(structure="full").update`` k times per block.
* :func:`inv_root` and :func:`inv_root_apply`: (G + eps I)^(-1/p) (form ``"inv_sqrt"``) or
  (G^(1/2) + eps I)^(-1) (form ``"adam"``), and f(G) V without forming f(G), for a batch of
  blocks, with the conventions of :mod:`saddlescape.matrix_functions` (triangles averaged,
  eigenvalues within d * machine epsilon * lambda_max of zero clipped, clearly negative ones a
  ValueError, a singular G with eps = 0 a :class:`saddlescape.NumericalError`). Routes:
  ``"jacobi"`` (cuSOLVER's batched Jacobi, d <= 32), ``"batched_qr"`` (batched symmetric
  eigensolver), ``"divide_conquer"`` (one block at a time), ``"newton"`` (the matmul-only
  coupled Newton iteration, form inv_sqrt only; float32 may use TF32 tensor cores with
  ``allow_tf32=True``, about 1e-3 relative error), and ``"auto"`` (jacobi for d <= 32,
  batched_qr for batches with d <= 512, divide_conquer otherwise; untuned until timed on a
  GPU).
* :func:`rmsprop_diag_step`: one diagonal RMSProp step, v <- beta v + (1 - beta) g^2 and
  x <- x - lr g / sqrt(v + eps) (or / (sqrt(v) + eps) for form ``"adam"``), in one pass.
* :func:`run_seeds`: one GPU thread per seed, each following ``run(..., seed=s)`` (same random
  stream, burn-in, projection and failure rules), reporting when each seed escaped.

Input checks happen on the device before anything is changed: a NaN/Inf gradient, a NaN or
asymmetric G is a ValueError and leaves every in-place argument exactly as it was.

Arrays (interop). Every array argument may be:

* a numpy array (or anything ``numpy.asarray`` accepts, for read-only arguments): it is copied
  to the GPU, the work is done, and the results are copied back. In-place arguments (G of
  :func:`ema_update_batched`, x and v of :func:`rmsprop_diag_step`) must then be writable
  numpy arrays, and receive the result; :func:`inv_root` / :func:`inv_root_apply` return numpy
  arrays. Each call pays these transfers: for repeated work keep the data on the GPU.
* a CUDA device array, used in place without copies: anything with
  ``__cuda_array_interface__`` (versions 2 and 3: CuPy, PyTorch, Numba, ...) or, failing that,
  DLPack (``__dlpack__`` and ``__dlpack_device__``, device type kDLCUDA or kDLCUDAManaged; the
  capsule is read by the compiled module). ``__cuda_array_interface__`` is preferred when an
  object has both, since it needs no capsule. Results of :func:`inv_root` /
  :func:`inv_root_apply` come from the input's library: a ``torch.Tensor`` on the input's device
  for torch input, a ``cupy.ndarray`` for CuPy input, and a :class:`DeviceArray` (which exposes
  ``__cuda_array_interface__``, so ``cupy.asarray`` and ``torch.as_tensor`` wrap it) otherwise.

The arrays of one call are either all numpy arrays or all device arrays, share one dtype
(float32 or float64: no silent conversion), are C-contiguous, and live on the current device
(``torch.cuda.device(i)`` / ``cupy.cuda.Device(i)`` select it). In-place arguments must not
overlap the others. Each violation is a ValueError naming the argument and what it got.

Streams. Work is queued on one CUDA stream per call. With ``stream=None`` (the default) that is
the stream the inputs were produced on: the ``stream`` field of a version-3
``__cuda_array_interface__`` (CuPy's current stream), or PyTorch's current stream for a torch
tensor; if the inputs name different streams, the chosen stream first waits for the others
(event waits, not host synchronisation). DLPack producers are asked to make their data ready on
the chosen stream. With no device input, or none naming a stream, it is the legacy default
stream. An explicit ``stream=`` (a raw ``cudaStream_t`` handle as an int, 0 for the legacy
default stream, e.g. ``torch.cuda.current_stream().cuda_stream`` or
``cupy.cuda.get_current_stream().ptr``) overrides this; the caller then orders later work on
other streams after it. Functions that check their input on the device wait for that check
before returning, so their errors are raised by the call itself.

Threads: each host thread gets its own cached cuBLAS/cuSOLVER context per device, moved to each
call's stream;
:func:`clear_cache` frees the calling thread's. The GIL is released while the GPU works.
"""

from __future__ import annotations

import importlib
import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import numpy as np

from saddlescape import _core
from saddlescape._validation import integer as _integer
from saddlescape._validation import real as _real
from saddlescape._validation import real_array as _real_array
from saddlescape._validation import seed as _seed
from saddlescape.optimizers import SGD, Optimizer, RMSProp, SaddleEscape

__all__ = [
    "CUDAError",
    "CUDAUnavailableError",
    "DeviceArray",
    "SeedRunResult",
    "clear_cache",
    "device_description",
    "ema_update_batched",
    "inv_root",
    "inv_root_apply",
    "is_available",
    "max_seed_dim",
    "rmsprop_diag_step",
    "run_seeds",
    "unavailable_reason",
]

Form = Literal["inv_sqrt", "adam"]
Method = Literal["auto", "jacobi", "batched_qr", "divide_conquer", "newton"]

METHODS: tuple[str, ...] = ("auto", "jacobi", "batched_qr", "divide_conquer", "newton")
FORMS: tuple[str, ...] = ("inv_sqrt", "adam")
#: The largest d of the jacobi route (cuSOLVER's batched Jacobi eigensolver).
JACOBI_MAX_DIM = 32

_BUILD_HINT = (
    "saddlescape was built without the CUDA backend (saddlescape._cuda is missing): reinstall "
    "it from source on a machine with the CUDA toolkit (nvcc, cuBLAS, cuSOLVER), e.g. "
    "`pip install --no-binary saddlescape saddlescape -Ccmake.define.SADDLESCAPE_ENABLE_CUDA=ON` "
    "or, in a checkout, `pip install . -Ccmake.define.SADDLESCAPE_ENABLE_CUDA=ON`"
)


def _load() -> tuple[Any, str]:
    # Importing this module must never fail: a missing or broken backend is a reason, not an
    # ImportError, so that callers can test is_available() first.
    try:
        return importlib.import_module("saddlescape._cuda"), ""
    except ModuleNotFoundError as e:
        if e.name == "saddlescape._cuda":
            return None, _BUILD_HINT
        return None, f"saddlescape's CUDA backend could not be loaded: {e}"
    except ImportError as e:
        return None, (f"saddlescape's CUDA backend (saddlescape._cuda) could not be loaded: {e}; "
                      "check that the NVIDIA driver and the cuBLAS/cuSOLVER libraries it was "
                      "built against are installed")


_cuda, _LOAD_PROBLEM = _load()


class CUDAUnavailableError(RuntimeError):
    """The CUDA backend cannot be used here; the message says why (see
    :func:`unavailable_reason`)."""


if _cuda is not None:
    CUDAError: type[RuntimeError] = _cuda.CUDAError
else:
    class CUDAError(RuntimeError):  # type: ignore[no-redef]
        pass

CUDAError.__doc__ = (
    "A CUDA runtime, cuBLAS or cuSOLVER call failed on valid input: out of device memory, a "
    "launch failure, a lost device. Subclass of RuntimeError; the message names the call."
)

#: The largest problem dimension :func:`run_seeds` handles (each seed's state lives in registers).
max_seed_dim: int = int(_cuda.max_seed_dim) if _cuda is not None else 16

_reason_cache: str | None = None


def unavailable_reason() -> str:
    """Why :func:`is_available` is False, as a sentence; "" when it is True."""
    global _reason_cache
    if _reason_cache is None:
        if _cuda is None:
            _reason_cache = _LOAD_PROBLEM
        else:
            why = _cuda.unavailable_reason()
            _reason_cache = f"no CUDA device can be used: {why}" if why else ""
    return _reason_cache


def is_available() -> bool:
    """Whether the CUDA backend was built, loads, and finds a device (checked once)."""
    return unavailable_reason() == ""


def _require() -> None:
    why = unavailable_reason()
    if why:
        raise CUDAUnavailableError(why)


def device_description() -> str:
    """The current device, e.g. ``"NVIDIA H200 (sm_90, 139 GiB)"``.

    Raises:
        CUDAUnavailableError: the backend cannot be used.
    """
    _require()
    return _cuda.device_description()


def clear_cache() -> None:
    """Destroys the calling thread's cached CUDA contexts (cuBLAS and cuSOLVER handles and
    their scratch memory), which the next call re-creates. A no-op without the backend."""
    if is_available():
        _cuda.release_contexts()


# ---------------------------------------------------------------------------------------------
# Arrays

_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)
_DL_CUDA, _DL_CUDA_MANAGED = 2, 13
_DL_DEVICE_NAMES = {1: "kDLCPU", 2: "kDLCUDA", 3: "kDLCUDAHost", 4: "kDLOpenCL", 7: "kDLVulkan",
                    8: "kDLMetal", 9: "kDLVPI", 10: "kDLROCM", 11: "kDLROCMHost", 12: "kDLExtDev",
                    13: "kDLCUDAManaged", 14: "kDLOneAPI", 15: "kDLWebGPU", 16: "kDLHexagon"}
_DL_TYPE_CODES = {0: "int", 1: "uint", 2: "float", 3: "opaque handle", 4: "bfloat", 5: "complex",
                  6: "bool"}


def _type_name(obj: Any) -> str:
    t = type(obj)
    module = t.__module__.split(".")[0]
    return t.__name__ if module == "builtins" else f"{module}.{t.__name__}"


def _shape_str(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + (",)" if len(shape) == 1 else ")")


def _is_float(dtype: np.dtype) -> bool:
    return dtype == _F32 or dtype == _F64


def _library(obj: Any) -> str:
    """Which library made a device array: "torch", "cupy" or "other" (modules already loaded
    only; nothing is imported to find out)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        return "torch"
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(obj, cupy.ndarray):
        return "cupy"
    return "other"


def _expect_c_contiguous(name: str, shape: tuple[int, ...], strides: tuple[int, ...] | None,
                         itemsize: int, unit: str) -> None:
    """strides (in bytes, or None for C-contiguous) must be those of a C-contiguous array;
    the strides of length-1 axes do not matter, nor any stride of an empty array."""
    if strides is None:
        return
    if len(strides) != len(shape):
        raise ValueError(f"{name} has {len(strides)} strides for {len(shape)} dimensions")
    if 0 in shape:
        return
    expected = itemsize
    for n, s in zip(reversed(shape), reversed(strides)):
        if n != 1 and s != expected:
            shown = tuple(strides) if unit == "bytes" else tuple(s // itemsize for s in strides)
            raise ValueError(
                f"{name} must be C-contiguous, got strides {shown} ({unit}) for shape "
                f"{_shape_str(shape)}; pass a contiguous copy (tensor.contiguous(), "
                f"cupy.ascontiguousarray(a))")
        expected *= n


def _normalise_stream(value: int) -> int:
    # __cuda_array_interface__ and DLPack say 1 for the legacy default stream, which the
    # runtime calls 0; 2 (the per-thread default stream) is also a valid runtime handle.
    return 0 if value in (0, 1) else value


def _protocol_stream(handle: int) -> int:
    """A runtime stream handle as the protocols spell it (the legacy default stream is 1)."""
    return 1 if handle == 0 else handle


@dataclass
class _Operand:
    """One array argument of a call."""

    name: str
    obj: Any
    kind: str  # "host", "cai" or "dlpack"
    inplace: bool
    shape: tuple[int, ...] = ()
    dtype: np.dtype = _F64
    host: np.ndarray | None = None
    ptr: int = 0
    producer: int | None = None  # the stream a device array was produced on, if known
    readonly: bool = False
    holder: Any = None  # a consumed DLPack capsule, kept until the call ends
    buffer: Any = None  # the device copy of a numpy array
    dl_device: int = -1  # the device id __dlpack_device__ reported

    @property
    def on_device(self) -> bool:
        return self.kind != "host"

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def what(self) -> str:
        return "a numpy array" if self.kind == "host" else f"a device array ({_type_name(self.obj)})"


def _host_operand(name: str, a: np.ndarray, obj: Any, inplace: bool) -> _Operand:
    if not _is_float(a.dtype):
        raise ValueError(f"{name} must have dtype float32 or float64, got {a.dtype}")
    if inplace and not a.flags.writeable:
        raise ValueError(f"{name} is read-only, but it is updated in place")
    return _Operand(name, obj, "host", inplace, shape=tuple(a.shape), dtype=a.dtype, host=a)


def _cai_operand(name: str, obj: Any, cai: Any, inplace: bool) -> _Operand:
    if not isinstance(cai, dict):
        raise ValueError(f"{name}.__cuda_array_interface__ must be a dict, got {_type_name(cai)}")
    try:
        shape = tuple(int(s) for s in cai["shape"])
        typestr = cai["typestr"]
        ptr, readonly = cai["data"]
        ptr = int(ptr)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{name} has a malformed __cuda_array_interface__ ({e!r})") from None
    if cai.get("mask") is not None:
        raise ValueError(f"{name} is a masked array, which is not supported")
    try:
        dtype = np.dtype(typestr)
    except TypeError:
        raise ValueError(f"{name} has an unknown typestr {typestr!r}") from None
    if not _is_float(dtype):
        raise ValueError(f"{name} must have dtype float32 or float64, got {dtype} "
                         f"(typestr {typestr!r})")
    strides = cai.get("strides")
    _expect_c_contiguous(name, shape, None if strides is None else tuple(int(s) for s in strides),
                         dtype.itemsize, "bytes")
    if inplace and readonly:
        raise ValueError(f"{name} is read-only, but it is updated in place")
    if ptr == 0 and math.prod(shape) > 0:
        raise ValueError(f"{name} has a null data pointer")
    producer = None
    if "stream" in cai and cai["stream"] is not None:
        s = cai["stream"]
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)):
            raise ValueError(f"{name}'s __cuda_array_interface__ has a non-integer stream {s!r}")
        producer = _normalise_stream(int(s))
    elif _library(obj) == "torch":
        # torch's interface (version 2) has no stream field; its kernels run on its current
        # stream for the tensor's device.
        producer = int(sys.modules["torch"].cuda.current_stream(obj.device).cuda_stream)
    return _Operand(name, obj, "cai", inplace, shape=shape, dtype=dtype, ptr=ptr,
                    producer=producer, readonly=bool(readonly))


def _operand(name: str, obj: Any, inplace: bool) -> _Operand:
    if isinstance(obj, np.ndarray):
        return _host_operand(name, obj, obj, inplace)
    try:
        cai = obj.__cuda_array_interface__
    except AttributeError:
        cai = None
    except Exception as e:  # e.g. torch refuses tensors that require grad
        raise ValueError(f"{name} ({_type_name(obj)}) cannot be used as a CUDA array: {e}") from None
    if cai is not None:
        return _cai_operand(name, obj, cai, inplace)
    if hasattr(obj, "__dlpack__") and hasattr(obj, "__dlpack_device__"):
        try:
            dev_type, dev_id = obj.__dlpack_device__()
        except Exception as e:
            raise ValueError(f"{name} ({_type_name(obj)}) reports no DLPack device: {e}") from None
        if int(dev_type) not in (_DL_CUDA, _DL_CUDA_MANAGED):
            where = _DL_DEVICE_NAMES.get(int(dev_type), f"DLPack device type {int(dev_type)}")
            raise ValueError(
                f"{name} is a {_type_name(obj)} in {where} memory, not on a CUDA device; pass a "
                f"numpy array (copied to the GPU and back) or a CUDA array")
        return _Operand(name, obj, "dlpack", inplace, dl_device=int(dev_id))
    if inplace:
        raise ValueError(f"{name} is updated in place, so it must be a numpy array or a CUDA "
                         f"device array, got {_type_name(obj)}")
    return _host_operand(name, np.asarray(obj), obj, inplace)


def _stream_arg(stream: Any) -> int | None:
    if stream is None:
        return None
    s = _integer("stream", stream)
    if not 0 <= s < 2**64:
        raise ValueError(f"stream must be a cudaStream_t handle (an int >= 0) or None, got {s}")
    return 0 if s == 1 else s  # cudaStreamLegacy (1) is the legacy default stream, 0


class _Output:
    """A result array: device memory the kernel writes, and the object handed back."""

    def __init__(self, obj: Any, ptr: int, host: np.ndarray | None, buffer: Any) -> None:
        self.obj, self.ptr, self.host, self.buffer = obj, ptr, host, buffer


class _Call:
    """The arrays of one call: classification, checks, the stream, numpy round trips.

    Use: add() every array, settle() (no GPU needed unless a DLPack-only array must be read),
    check shapes and scalars, then ``with call:`` (needs the GPU) around the device work.
    """

    def __init__(self, stream: Any) -> None:
        self.explicit = _stream_arg(stream)
        self.operands: list[_Operand] = []
        self.outputs: list[_Output] = []
        self.stream = 0

    def add(self, name: str, obj: Any, inplace: bool = False) -> _Operand:
        op = _operand(name, obj, inplace)
        self.operands.append(op)
        return op

    def _choose_stream(self) -> int:
        if self.explicit is not None:
            return self.explicit
        for op in self.operands:
            if op.producer is not None:
                return op.producer
        return 0

    def settle(self) -> None:
        """Checks that the arrays are all numpy or all device arrays, then reads DLPack-only
        arrays (which needs the backend: their shape lives in the capsule)."""
        host = [op for op in self.operands if not op.on_device]
        device = [op for op in self.operands if op.on_device]
        if host and device:
            raise ValueError(
                f"{device[0].name} is {device[0].what()} but {host[0].name} is a numpy array; the "
                f"arrays of one call must be all numpy arrays or all CUDA device arrays")
        pending = [op for op in self.operands if op.kind == "dlpack" and op.holder is None]
        if not pending:
            return
        _require()
        self.stream = self._choose_stream()
        for op in pending:
            self._export(op)

    def _export(self, op: _Operand) -> None:
        requested_device = op.dl_device
        try:
            try:
                capsule = op.obj.__dlpack__(stream=_protocol_stream(self.stream))
            except TypeError:  # a producer from before the stream argument
                capsule = op.obj.__dlpack__()
            holder = _cuda.DLPackTensor(capsule)
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"{op.name} ({_type_name(op.obj)}) could not be exported through "
                             f"DLPack: {e}") from None
        op.holder = holder
        code, bits, lanes = holder.dtype
        if code == 2 and lanes == 1 and bits in (32, 64):
            op.dtype = _F32 if bits == 32 else _F64
        else:
            kind = _DL_TYPE_CODES.get(code, f"type code {code}")
            raise ValueError(f"{op.name} must have dtype float32 or float64, got DLPack dtype "
                             f"{kind}{bits}" + (f"x{lanes}" if lanes != 1 else ""))
        op.shape = tuple(int(s) for s in holder.shape)
        strides = holder.strides
        _expect_c_contiguous(op.name, op.shape, None if strides is None else
                             tuple(int(s) * op.dtype.itemsize for s in strides),
                             op.dtype.itemsize, "elements")
        dev_type, dev_id = holder.device
        if dev_type == _DL_CUDA and dev_id != requested_device:
            raise ValueError(f"{op.name}'s DLPack capsule names device {dev_id}, but "
                             f"__dlpack_device__ said {requested_device}")
        op.ptr = int(holder.ptr)
        if op.ptr == 0 and math.prod(op.shape) > 0:
            raise ValueError(f"{op.name} has a null data pointer")
        if dev_type == _DL_CUDA and op.ptr:
            current = _cuda.current_device()
            if dev_id != current:
                raise ValueError(_wrong_device(op.name, dev_id, current))

    def no_overlap(self, written: _Operand, others: Sequence[_Operand]) -> None:
        """Host arrays are compared now; device arrays by address range once resolved."""
        for other in others:
            if written.host is not None and other.host is not None and \
                    np.may_share_memory(written.host, other.host):
                raise ValueError(f"{written.name} and {other.name} must not overlap: "
                                 f"{written.name} is updated in place")

    def _device_overlap(self) -> None:
        written = [op for op in self.operands if op.inplace and op.on_device]
        for w in written:
            for other in self.operands:
                if other is w or not other.on_device or not w.nbytes or not other.nbytes:
                    continue
                if w.ptr < other.ptr + other.nbytes and other.ptr < w.ptr + w.nbytes:
                    raise ValueError(f"{w.name} and {other.name} must not overlap: {w.name} is "
                                     f"updated in place")

    def __enter__(self) -> "_Call":
        _require()
        self.stream = self._choose_stream()
        try:
            current = None
            for op in self.operands:
                if op.kind == "cai" and op.ptr:
                    current = _cuda.current_device() if current is None else current
                    kind, device = _cuda.pointer_info(op.ptr)
                    if kind == "device" and device != current:
                        raise ValueError(_wrong_device(op.name, device, current))
                    if kind not in ("device", "managed"):
                        raise ValueError(f"{op.name}'s data pointer is not CUDA device memory "
                                         f"(it is {kind} memory)")
            self._device_overlap()
            for op in self.operands:
                if op.on_device and op.producer is not None and op.producer != self.stream:
                    _cuda.stream_wait(self.stream, op.producer)
            for op in self.operands:
                if op.kind == "host":
                    assert op.host is not None
                    op.buffer = _cuda.DeviceBuffer(op.host.nbytes)
                    op.buffer.copy_from_host(np.ascontiguousarray(op.host), self.stream)
                    op.ptr = op.buffer.ptr
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        # Releasing a DLPack capsule may free its memory (when the capsule was the last owner)
        # to the producer's allocator, which reuses it in the producer's stream order, not
        # ours: the queued work must be done with it first.
        if any(op.kind == "dlpack" and op.holder is not None for op in self.operands):
            _cuda.synchronize(self.stream)
        for op in self.operands:
            if op.kind == "host" and op.buffer is not None:
                op.buffer.free()
                op.buffer = None
            if op.kind == "dlpack" and op.holder is not None:
                op.holder.release()
        for out in self.outputs:
            if out.buffer is not None and out.host is not None:
                out.buffer.free()
                out.buffer = None

    def output(self, shape: tuple[int, ...], like: _Operand) -> _Output:
        """A fresh array of like's dtype and library (numpy input: a device buffer that
        result() copies into a numpy array)."""
        dtype = like.dtype
        if like.kind == "host":
            host = np.empty(shape, dtype)
            buffer = _cuda.DeviceBuffer(host.nbytes)
            out = _Output(host, buffer.ptr, host, buffer)
        else:
            lib = _library(like.obj)
            # The output is allocated in the order of the stream that writes it: the caching
            # allocators of torch and CuPy hand out memory that is free in the order of the
            # stream current at allocation, which may differ from this call's stream.
            if lib == "torch":
                torch = sys.modules["torch"]
                device = like.obj.device
                current = torch.cuda.current_stream(device)
                if self.stream == current.cuda_stream:
                    writer = current
                elif self.stream == 0:
                    writer = torch.cuda.default_stream(device)
                else:
                    writer = torch.cuda.ExternalStream(self.stream, device=device)
                with torch.cuda.stream(writer):
                    t = torch.empty(shape, dtype=like.obj.dtype, device=device)
                out = _Output(t, int(t.data_ptr()), None, None)
            elif lib == "cupy":
                cupy = sys.modules["cupy"]
                with cupy.cuda.Device(like.obj.device.id):
                    if self.stream == cupy.cuda.get_current_stream().ptr:
                        c = cupy.empty(shape, dtype=dtype)
                    else:
                        with cupy.cuda.ExternalStream(self.stream):
                            c = cupy.empty(shape, dtype=dtype)
                out = _Output(c, int(c.data.ptr), None, None)
            else:
                arr = DeviceArray(shape, dtype, self.stream)
                out = _Output(arr, arr.ptr, None, None)
        self.outputs.append(out)
        return out

    def result(self, out: _Output) -> Any:
        if out.host is not None:
            out.buffer.copy_to_host(out.host, self.stream)
        return out.obj

    def write_back(self, op: _Operand) -> None:
        """Copies an in-place numpy argument's new values back from the device."""
        if op.kind != "host":
            return
        a = op.host
        assert a is not None and op.buffer is not None
        if a.flags.c_contiguous:
            op.buffer.copy_to_host(a, self.stream)
        else:
            tmp = np.empty(a.shape, a.dtype)
            op.buffer.copy_to_host(tmp, self.stream)
            a[...] = tmp


def _wrong_device(name: str, device: int, current: int) -> str:
    return (f"{name} lives on CUDA device {device}, but the current device is {current}; call "
            f"under `with torch.cuda.device({device}):` or `with cupy.cuda.Device({device}):`")


class DeviceArray:
    """A float array in device memory: the result of :func:`inv_root` / :func:`inv_root_apply`
    for device input that is neither a torch tensor nor a CuPy array.

    It exposes ``__cuda_array_interface__`` (version 3, naming the stream it was written on), so
    ``cupy.asarray(a)``, ``torch.as_tensor(a, device="cuda")`` or ``numba.cuda.as_cuda_array(a)``
    wrap it without a copy; :meth:`get` copies it to a numpy array. The memory is freed when the
    object is collected (keep it alive while a wrapper is in use).
    """

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, stream: int = 0) -> None:
        _require()
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self._stream = int(stream)
        self._buffer = _cuda.DeviceBuffer(math.prod(self.shape) * self.dtype.itemsize)

    @property
    def ptr(self) -> int:
        """The device address of the first element."""
        return int(self._buffer.ptr)

    @property
    def nbytes(self) -> int:
        return int(self._buffer.nbytes)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {"version": 3, "shape": self.shape, "typestr": self.dtype.str,
                "data": (self.ptr, False), "strides": None,
                "stream": _protocol_stream(self._stream)}

    def get(self) -> np.ndarray:
        """A numpy copy (waits for the stream the array was written on)."""
        out = np.empty(self.shape, self.dtype)
        self._buffer.copy_to_host(out, self._stream)
        return out

    def __repr__(self) -> str:
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype})"


# ---------------------------------------------------------------------------------------------
# Argument checks shared by the operations


def _choice(name: str, value: Any, options: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}, got {value!r}")
    return value


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _finite(name: str, value: Any, *, positive: bool = False, nonnegative: bool = False) -> float:
    x = _real(name, value)
    if not math.isfinite(x) or (positive and not x > 0) or (nonnegative and not x >= 0):
        need = "finite and > 0" if positive else "finite and >= 0" if nonnegative else "finite"
        raise ValueError(f"{name} must be {need}, got {value!r}")
    return x


def _beta_value(name: str, value: Any) -> float:
    b = _real(name, value)
    if not 0.0 <= b < 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return b


def _per_block_count(op: _Operand, g_op: _Operand, n: int, d: int, *, k_last: bool,
                     need: str) -> int:
    """k of an operand holding k vectors of length d per block of G: shape (n, d, k) (k_last)
    or (n, k, d), without n when G is one matrix, or (n, d) / (d,) for k = 1."""
    lead = (n,) if g_op.ndim == 3 else ()
    shape = op.shape
    k = -1
    if len(shape) == len(lead) + 2 and shape[:len(lead)] == lead:
        inner = shape[len(lead):]
        if (inner[0] if k_last else inner[1]) == d:
            k = inner[1] if k_last else inner[0]
    elif shape == lead + (d,):
        k = 1
    if k < 0:
        dims = [str(x) for x in lead] + ([str(d), "k"] if k_last else ["k", str(d)])
        single = ", ".join([str(x) for x in lead] + [str(d)]) + ("," if not lead else "")
        raise ValueError(f"{op.name} must have shape ({', '.join(dims)}) or ({single}) to match G "
                         f"of shape {_shape_str(g_op.shape)}, got shape {_shape_str(shape)}")
    if k < 1:
        raise ValueError(f"{op.name} must {need}, got shape {_shape_str(shape)}")
    return k


def _same_dtype(first: _Operand, *others: _Operand) -> None:
    for op in others:
        if op.dtype != first.dtype:
            raise ValueError(f"{op.name} must have {first.name}'s dtype {first.dtype}, got "
                             f"{op.dtype}")


def _square_stack(op: _Operand) -> tuple[int, int]:
    """(n, d) of a (d, d) or (n, d, d) array."""
    s = op.shape
    if op.ndim not in (2, 3):
        raise ValueError(f"{op.name} must have shape (d, d) or (n, d, d), got shape {_shape_str(s)}")
    if s[-1] != s[-2]:
        raise ValueError(f"{op.name} must be square, got shape {_shape_str(s)}")
    if s[-1] < 1:
        raise ValueError(f"{op.name} must have d >= 1, got shape {_shape_str(s)}")
    return (s[0] if op.ndim == 3 else 1), s[-1]


@dataclass(frozen=True)
class _RootArgs:
    p: int
    eps: float
    form: str
    method: str
    tol: float
    max_iter: int
    allow_tf32: bool

    def call_args(self) -> tuple[Any, ...]:
        return (self.p, self.eps, self.form, self.method, self.tol, self.max_iter, self.allow_tf32)


def _root_args(d: int, eps: Any, p: Any, form: Any, method: Any, tol: Any, max_iter: Any,
               allow_tf32: Any) -> _RootArgs:
    e = _finite("eps", eps, nonnegative=True)
    pp = _integer("p", p)
    if not 1 <= pp < 2**31:
        raise ValueError(f"p must be an integer >= 1, got {pp}")
    f = _choice("form", form, FORMS)
    if f == "adam" and pp != 2:
        raise ValueError(f"form 'adam' is (G^(1/2) + eps I)^(-1), so p must be 2, got p = {pp}")
    m = _choice("method", method, METHODS)
    if m == "jacobi" and d > JACOBI_MAX_DIM:
        raise ValueError(f"method 'jacobi' handles d <= {JACOBI_MAX_DIM}, got d = {d}; use "
                         f"'auto', 'batched_qr' or 'divide_conquer'")
    if m == "newton" and f != "inv_sqrt":
        raise ValueError(f"method 'newton' computes form 'inv_sqrt' only, got form {f!r}")
    t = 0.0 if tol is None else _finite("tol", tol, nonnegative=True)
    it = _integer("max_iter", max_iter)
    if not 1 <= it < 2**31:
        raise ValueError(f"max_iter must be an integer >= 1, got {it}")
    return _RootArgs(pp, e, f, m, t, it, _flag("allow_tf32", allow_tf32))


# ---------------------------------------------------------------------------------------------
# The operations


def ema_update_batched(G: Any, gs: Any, betas: float | Sequence[float], *,
                       stream: int | None = None) -> None:
    """k EMA steps on n (d, d) estimates at once, in place: for each block b,
    G_b <- (prod_i beta_i) G_b + sum_i w_i g_bi g_bi^T with w_i = (1 - beta_i) prod_(j>i) beta_j,
    i.e. ``EMAEstimator.update(g_b0), ..., update(g_b(k-1))`` with weights beta_0, ...,
    beta_(k-1). Both triangles are written (G_b stays exactly symmetric); entries below the
    smallest normal number are flushed to zero, as on the CPU.

    Args:
        G: (n, d, d) or (d, d) estimates, float32 or float64; updated in place (a writable numpy
            array receives the result: see the module docstring).
        gs: the gradients: (n, k, d), or (n, d) for k = 1, when G is (n, d, d); (k, d), or (d,)
            for k = 1, when G is (d, d). G's dtype.
        betas: one weight for all k steps, or k weights; each in [0, 1).
        stream: see the module docstring.

    Raises:
        ValueError: bad shapes, dtypes or betas; a NaN or Inf in gs (named by block, row and
            index; G is then unchanged).
        NumericalError: a g^2 would overflow G's dtype (G unchanged).
        CUDAUnavailableError: no usable GPU (after the checks above that need none).
    """
    call = _Call(stream)
    g_op = call.add("G", G, inplace=True)
    s_op = call.add("gs", gs)
    call.settle()
    n, d = _square_stack(g_op)
    k = _per_block_count(s_op, g_op, n, d, k_last=False,
                         need="hold at least one gradient per block")
    _same_dtype(g_op, s_op)
    if np.ndim(betas) == 0:
        beta_list = [_beta_value("betas", betas)] * k
    else:
        if np.ndim(betas) != 1 or len(betas) != k:  # type: ignore[arg-type]
            raise ValueError(f"betas must be one number or a sequence of k = {k} numbers, got "
                             f"{np.ndim(betas)}-dimensional input of shape {np.shape(betas)}")
        values = list(np.asarray(betas, dtype=object))
        beta_list = [_beta_value(f"betas[{i}]", b) for i, b in enumerate(values)]
    call.no_overlap(g_op, [s_op])
    with call:
        if n > 0:
            _cuda.ema_update_batched(g_op.ptr, n, d, s_op.ptr, k, beta_list, g_op.dtype.name,
                                     call.stream)
            call.write_back(g_op)


def inv_root(G: Any, eps: float = 0.0, p: int = 2, form: Form = "inv_sqrt",
             method: Method = "auto", tol: float | None = 0.0, max_iter: int = 100,
             allow_tf32: bool = False, *, stream: int | None = None) -> Any:
    """f(G_b) for every block: (G_b + eps I)^(-1/p) (form "inv_sqrt"), or
    (G_b^(1/2) + eps I)^(-1) (form "adam", p = 2); :func:`saddlescape.inv_root` on the GPU.

    Args:
        G: (n, d, d) or (d, d) symmetric positive semidefinite blocks, float32 or float64.
        eps: damping, finite and >= 0.
        p: the root, an integer >= 1.
        form: "inv_sqrt" or "adam".
        method: "auto", "jacobi" (d <= 32), "batched_qr", "divide_conquer" or "newton" (form
            inv_sqrt only); see the module docstring.
        tol: Newton's stopping tolerance on ||M_k - I||_F / sqrt(d); 0 or None: the CPU's
            default for the dtype and d.
        max_iter: Newton's iteration cap (more is a NumericalError).
        allow_tf32: Newton, float32: let cuBLAS use TF32 tensor cores (about 1e-3 relative
            error per product).
        stream: see the module docstring.

    Returns:
        An array of G's shape and dtype, from G's library (numpy for numpy input). G is not
        modified.

    Raises:
        ValueError: bad arguments; a NaN/Inf, asymmetric or clearly indefinite block (named).
        NumericalError: a singular block with eps = 0, no convergence, overflow.
        CUDAUnavailableError: no usable GPU (after the checks above that need none).
    """
    call = _Call(stream)
    g_op = call.add("G", G)
    call.settle()
    n, d = _square_stack(g_op)
    args = _root_args(d, eps, p, form, method, tol, max_iter, allow_tf32)
    with call:
        out = call.output(g_op.shape, g_op)
        if n > 0:
            _cuda.inv_root_batched(g_op.ptr, n, d, out.ptr, g_op.dtype.name, *args.call_args(),
                                   call.stream)
        return call.result(out)


def inv_root_apply(G: Any, V: Any, eps: float = 0.0, p: int = 2, form: Form = "inv_sqrt",
                   method: Method = "auto", tol: float | None = 0.0, max_iter: int = 100,
                   allow_tf32: bool = False, *, stream: int | None = None) -> Any:
    """f(G_b) V_b for every block, without forming f(G_b) on the eigensolver routes
    (Q (f(Lambda) (Q^T V))); :func:`saddlescape.inv_sqrt_apply` on the GPU, batched.

    Args:
        G: (n, d, d) or (d, d), as :func:`inv_root`.
        V: (n, d, k) or (n, d) when G is (n, d, d); (d, k) or (d,) when G is (d, d). G's dtype.
        eps, p, form, method, tol, max_iter, allow_tf32, stream: as :func:`inv_root`.

    Returns:
        An array of V's shape and dtype, from V's library. G and V are not modified.

    Raises:
        As :func:`inv_root`, and ValueError for a V of the wrong shape or with a NaN/Inf.
    """
    call = _Call(stream)
    g_op = call.add("G", G)
    v_op = call.add("V", V)
    call.settle()
    n, d = _square_stack(g_op)
    k = _per_block_count(v_op, g_op, n, d, k_last=True, need="have at least one column")
    _same_dtype(g_op, v_op)
    args = _root_args(d, eps, p, form, method, tol, max_iter, allow_tf32)
    with call:
        out = call.output(v_op.shape, v_op)
        if n > 0:
            _cuda.inv_root_apply_batched(g_op.ptr, n, d, v_op.ptr, k, out.ptr, g_op.dtype.name,
                                         *args.call_args(), call.stream)
        return call.result(out)


def rmsprop_diag_step(x: Any, g: Any, v: Any, lr: float, beta: float, eps: float = 1e-8,
                      form: Form = "inv_sqrt", check: bool = True, *,
                      stream: int | None = None) -> None:
    """One diagonal RMSProp step in place, in one fused pass over the entries:
    v <- beta v + (1 - beta) g^2 (subnormals flushed), then x <- x - lr g / sqrt(v + eps)
    (form "inv_sqrt") or x - lr g / (sqrt(v) + eps) (form "adam"): the step of
    ``RMSProp(structure="diag")`` with this lr and beta, to rounding.

    Args:
        x: the iterate, updated in place; any shape (the step is elementwise).
        g: the gradient, x's shape and dtype.
        v: the diagonal estimate, x's shape and dtype, updated in place.
        lr: finite and >= 0. beta: in [0, 1). eps: finite and > 0.
        form: "inv_sqrt" or "adam".
        check: read g first to verify that it is finite and that g^2 cannot overflow (then a bad
            g is a ValueError, or NumericalError for overflow, and x, v are unchanged). Without
            it a bad g leaves NaN/Inf in x and v, for callers that check g themselves; the step
            then moves 40 instead of 48 bytes per float64 entry.
        stream: see the module docstring.

    Raises:
        ValueError: bad arguments, overlapping x, g, v; with check, a NaN/Inf in g (named).
        NumericalError: with check, g^2 overflows.
        CUDAUnavailableError: no usable GPU (after the checks above that need none).
    """
    call = _Call(stream)
    x_op = call.add("x", x, inplace=True)
    g_op = call.add("g", g)
    v_op = call.add("v", v, inplace=True)
    call.settle()
    for op in (g_op, v_op):
        if op.shape != x_op.shape:
            raise ValueError(f"{op.name} must have x's shape {_shape_str(x_op.shape)}, got shape "
                             f"{_shape_str(op.shape)}")
    _same_dtype(x_op, g_op, v_op)
    lr_ = _finite("lr", lr, nonnegative=True)
    beta_ = _beta_value("beta", beta)
    eps_ = _finite("eps", eps, positive=True)
    form_ = _choice("form", form, FORMS)
    check_ = _flag("check", check)
    call.no_overlap(x_op, [g_op, v_op])
    call.no_overlap(v_op, [g_op])
    n = math.prod(x_op.shape)
    with call:
        if n > 0:
            _cuda.rmsprop_diag_step(x_op.ptr, g_op.ptr, v_op.ptr, n, lr_, beta_, eps_, form_,
                                    check_, x_op.dtype.name, call.stream)
            call.write_back(x_op)
            call.write_back(v_op)


# ---------------------------------------------------------------------------------------------
# Many seeds


@dataclass(frozen=True)
class SeedRunResult:
    """What each seed of :func:`run_seeds` ended with; row i is seed ``seeds[i]``.

    Attributes:
        seeds: (S,) uint64.
        escape_step: (S,) int64: the first t (0 <= t <= steps) at which the seed had escaped
            (``||x_t - x0|| >= escape_radius`` or ``F(x_t) <= escape_value``), or -1.
        f_final: (S,) F at the last iterate (NaN if it is not finite).
        x_final: (S, d) the last iterate (where a failed run stopped).
        status: (S,) str: "completed", "diverged", "numerical" or "invalid", as
            :attr:`saddlescape.RunResult.status`; "interrupted" for the seeds a Ctrl-C kept
            from being launched (on the ``result`` of the KeyboardInterrupt).
        stopped_at: (S,) int64: the step at which a run stopped, -1 if it completed.
    """

    seeds: np.ndarray
    escape_step: np.ndarray
    f_final: np.ndarray
    x_final: np.ndarray
    status: np.ndarray
    stopped_at: np.ndarray

    @property
    def escaped(self) -> np.ndarray:
        """(S,) bool: whether each seed escaped within the run."""
        return self.escape_step >= 0

    @property
    def completed(self) -> np.ndarray:
        """(S,) bool: whether each seed ran all its steps."""
        return self.status == "completed"

    def __len__(self) -> int:
        return int(self.seeds.shape[0])


_SEED_PROBLEMS = (_core.SaddleProblem, _core.ReddiCounterexample, _core.NoisyQuadratic)


def _check_seed_optimizer(opt: Any, *, base: bool = False) -> None:
    """The optimizer families the GPU runner knows; finer limits (schedules) are the native
    side's to check, with its own messages."""
    role = "the SaddleEscape's base" if base else "optimizer"
    if isinstance(opt, SaddleEscape) and not base:
        if opt._hallucinate != 0:
            raise ValueError(f"run_seeds supports SaddleEscape with hallucinate = 0, got "
                             f"{opt._hallucinate}")
        _check_seed_optimizer(opt._base, base=True)
    elif isinstance(opt, RMSProp):
        structure = opt._native_obj.structure
        if structure != "diag":
            raise ValueError(f"run_seeds supports RMSProp with structure 'diag', got {structure!r}")
    elif not isinstance(opt, SGD):
        raise ValueError(f"run_seeds supports SGD, RMSProp (structure 'diag') and SaddleEscape "
                         f"over them; {role} is {_type_name(opt)}")
    if opt.steps != 0:
        raise ValueError(f"run_seeds starts every seed from a fresh optimizer; {role} has taken "
                         f"{opt.steps} steps")


# saddlescape::run_status in its order: the codes _cuda.run_seeds returns.
_RUN_STATUSES = np.array(["completed", "diverged", "numerical", "invalid", "interrupted"])
_INTERRUPTED = 4

# run_seeds launches seeds in batches so that Ctrl-C is noticed between launches: the first of
# up to _FIRST_BATCH seeds (enough to fill an H200's SMs several times over), later ones sized
# from the measured time to take about _LAUNCH_S seconds each.
_FIRST_BATCH = 1 << 16
_LAUNCH_S = 0.1


def run_seeds(problem: Any, optimizer: Optimizer, x0: Any, steps: int,
              seeds: int | Sequence[int], escape_radius: float | None = None,
              escape_value: float | None = None,
              progress: bool | Callable[[int], Any] = False) -> SeedRunResult:
    """Many seeds of :func:`saddlescape.run` at once, one GPU thread each.

    Seed s follows ``run(problem, fresh optimizer, x0, steps, seed=s)``: the same gradient
    stream, burn-in, steps, projection and failure rules, so its final iterate agrees with the
    CPU's to rounding (the GPU may fuse multiply-adds). Only the outcome is kept: when the seed
    escaped, where it ended, and how its run ended. Failed runs are reported in ``status``,
    not raised.

    Supported: problems :class:`~saddlescape.problems.SaddleProblem`,
    :class:`~saddlescape.problems.ReddiCounterexample` and
    :class:`~saddlescape.problems.NoisyQuadratic` of dim <= :data:`max_seed_dim`; optimizers
    :class:`~saddlescape.SGD`, :class:`~saddlescape.RMSProp` with structure "diag" (either form,
    with burn-in) and :class:`~saddlescape.SaddleEscape` over those with hallucinate = 0;
    schedules constant, inverse_sqrt and beta_from_lr of either.

    Args:
        problem: the problem.
        optimizer: a fresh (never stepped) optimizer of one of the supported kinds: the settings
            every seed starts from. It is not advanced.
        x0: the start, shape (dim,), finite.
        steps: the number of steps (>= 0; burn-in steps come on top).
        seeds: a count n (seeds 0..n-1, as :func:`saddlescape.run_many`) or a sequence of seeds.
        escape_radius: a seed has escaped at the first t with ``||x_t - x0||_2 >= escape_radius``
            (finite and > 0; None: not used).
        escape_value: ... or with ``F(x_t) <= escape_value`` (finite; None: not used).
        progress: True for a tqdm bar of the seeds done, or a callable ``progress(seeds_done)``
            called after each launch.

    Returns:
        A :class:`SeedRunResult`.

    Interruption: seeds are launched in batches (the first of up to 65536 seeds, later ones
    sized to take about 0.1 s), and Ctrl-C is noticed between launches: the
    ``KeyboardInterrupt`` raised carries, as ``result``, a :class:`SeedRunResult` with every
    launched seed's outcome and status "interrupted" (x_final = x0, stopped_at = 0) for the
    others. A single launch is not interrupted, so a run of few seeds with many steps finishes
    its launch first.

    Raises:
        ValueError: an unsupported problem, optimizer or schedule (named), a used optimizer, a
            dimension mismatch, a bad x0, steps, seeds or escape criterion.
        CUDAUnavailableError: no usable GPU (after the checks above that need none).
    """
    if not isinstance(problem, _SEED_PROBLEMS):
        raise ValueError(f"run_seeds supports SaddleProblem, ReddiCounterexample and "
                         f"NoisyQuadratic, got {_type_name(problem)}")
    dim = int(problem.dim)
    if dim > max_seed_dim:
        raise ValueError(f"run_seeds handles problems of dim <= {max_seed_dim}, got dim {dim}")
    if not isinstance(optimizer, Optimizer):
        raise ValueError(f"optimizer must be a saddlescape optimizer, got {_type_name(optimizer)}")
    _check_seed_optimizer(optimizer)
    native = optimizer._native(dim)  # a dimension mismatch is a ValueError here
    x = _real_array("x0", x0, _F64, (dim,))
    if not np.isfinite(x).all():
        raise ValueError(f"x0 must be finite, got {x}")
    n_steps = _integer("steps", steps)
    if n_steps < 0:
        raise ValueError(f"steps must be >= 0, got {n_steps}")
    if isinstance(seeds, np.ndarray) and seeds.ndim == 0:
        seeds = seeds.item()  # a 0-d array is its one value: a count
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, (bool, np.bool_)):
        count = _integer("seeds", seeds)
        if count < 1:
            raise ValueError(f"seeds must be >= 1 (a count) or a sequence of seeds, got {count}")
        seed_array = np.arange(count, dtype=np.uint64)
    else:
        if isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__iter__"):
            raise ValueError(f"seeds must be a count or a sequence of seeds, got {seeds!r}")
        seed_array = np.array([_seed(s) for s in seeds], dtype=np.uint64)
        if seed_array.size == 0:
            raise ValueError("seeds must not be empty")
    radius = 0.0 if escape_radius is None else _finite("escape_radius", escape_radius,
                                                       positive=True)
    value = math.nan if escape_value is None else _finite("escape_value", escape_value)
    _require()
    from saddlescape.runner import _progress_bar

    count = len(seed_array)
    escape = np.full(count, -1, dtype=np.int64)
    f_final = np.full(count, math.nan)
    x_final = np.tile(x, (count, 1))
    status = np.full(count, _INTERRUPTED, dtype=np.int64)
    stopped = np.zeros(count, dtype=np.int64)

    def result() -> SeedRunResult:
        return SeedRunResult(seeds=seed_array.copy(), escape_step=escape, f_final=f_final,
                             x_final=x_final, status=_RUN_STATUSES[status], stopped_at=stopped)

    callback, bar = _progress_bar(progress, count, "run_seeds")
    done, batch = 0, min(count, _FIRST_BATCH)
    try:
        while done < count:
            part = seed_array[done : done + batch]
            began = time.perf_counter()
            out = _cuda.run_seeds(problem, native, x, part, n_steps, radius, value, 0)
            took = time.perf_counter() - began
            rows = slice(done, done + len(part))
            escape[rows] = np.asarray(out["escape_step"], dtype=np.int64)
            f_final[rows] = np.asarray(out["f_final"], dtype=np.float64)
            x_final[rows] = np.asarray(out["x_final"], dtype=np.float64).reshape(len(part), dim)
            status[rows] = np.asarray(out["status"], dtype=np.int64)
            stopped[rows] = np.asarray(out["stopped_at"], dtype=np.int64)
            done += len(part)
            if callback is not None:
                callback(done)
            # Sized from this launch's time; never below the first batch (the GPU stays full).
            scale = _LAUNCH_S / max(took, 1e-6)
            batch = int(min(max(batch * scale, _FIRST_BATCH), count - done)) or 1
    except KeyboardInterrupt as e:
        e.result = result()  # type: ignore[attr-defined]
        raise
    finally:
        if bar is not None:
            bar.close()
    return result()
