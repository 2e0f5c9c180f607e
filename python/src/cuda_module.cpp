// The pybind11 module saddlescape._cuda: thin bindings of the CUDA backend (cuda.hpp) for
// saddlescape/cuda.py, which validates arguments, resolves device arrays to raw pointers and
// documents the semantics. Device arrays cross this boundary as integers (addresses) with
// their shapes, dtype and a stream handle (0: the legacy default stream); the GIL is released
// around every call that reaches the device.
//
// The module also owns the little runtime glue the Python layer needs and cuda.hpp does not
// offer: plain device memory for numpy round trips, pointer queries, cross-stream ordering and
// a DLPack capsule reader.

#include <saddlescape/cuda.hpp>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;
namespace sc = saddlescape::cuda;

namespace {

using saddlescape::invalid_argument;
using saddlescape::detail::concat;

// Runtime calls made by this module itself (cuda.hpp's functions report their own failures).
void check(cudaError_t e, const char* call) {
  if (e != cudaSuccess) {
    cudaGetLastError();  // a non-sticky error must not be reported again by a later call
    throw sc::cuda_error(concat(call, " failed: ", cudaGetErrorName(e), " (",
                                cudaGetErrorString(e), ")"));
  }
}

sc::stream_t as_stream(std::uintptr_t handle) { return reinterpret_cast<sc::stream_t>(handle); }
cudaStream_t as_cuda_stream(std::uintptr_t handle) {
  return reinterpret_cast<cudaStream_t>(handle);
}

template <class T>
T* device_ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

// ---------------------------------------------------------------------------------------------
// Contexts: one per (thread, device), created on first use and moved to each call's stream. A
// context holds cuBLAS and cuSOLVER handles, so creating one per call would cost milliseconds;
// keying them by stream as well would keep one per stream a program ever used (CuPy and torch
// make new stream handles freely, and a destroyed stream's handle value can come back).

// Set by an atexit hook: once Python is shutting down, the CUDA runtime may be torn down before
// the main thread's thread_local objects are destroyed, and destroying handles then can crash.
// The process is ending, so those contexts are left to the driver.
std::atomic<bool> g_exiting{false};

struct context_cache {
  std::map<int, std::unique_ptr<sc::context>> contexts;
  context_cache() = default;
  context_cache(const context_cache&) = delete;
  context_cache& operator=(const context_cache&) = delete;
  ~context_cache() {
    if (g_exiting.load())
      for (auto& entry : contexts) (void)entry.second.release();
  }
};

context_cache& thread_cache() {
  thread_local context_cache cache;
  return cache;
}

sc::context& context_for(std::uintptr_t stream) {
  if (!sc::is_available())
    throw sc::cuda_error("no CUDA device can be used: " + sc::unavailable_reason());
  int device = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  auto& slot = thread_cache().contexts[device];
  if (!slot) {
    try {
      slot = std::make_unique<sc::context>(as_stream(stream));
    } catch (...) {
      thread_cache().contexts.erase(device);
      throw;
    }
  }
  slot->set_stream(as_stream(stream));
  return *slot;
}

// ---------------------------------------------------------------------------------------------
// dtype dispatch

template <class F>
void with_dtype(const std::string& dtype, F&& f) {
  if (dtype == "float64") {
    f(double{});
  } else if (dtype == "float32") {
    f(float{});
  } else {
    throw invalid_argument("dtype must be 'float32' or 'float64', got '" + dtype + "'");
  }
}

sc::root_options root_options_of(const std::string& method, double tol, int max_iter,
                                 bool allow_tf32) {
  sc::root_options o;
  // The Python API says "auto" (as torch and cupy do); the C++ enum spells it "automatic".
  o.method = sc::parse_root_method(method == "auto" ? std::string("automatic") : method);
  o.newton.tol = tol;
  o.newton.max_iter = max_iter;
  o.allow_tf32 = allow_tf32;
  return o;
}

// ---------------------------------------------------------------------------------------------
// The operations

void ema_update_batched_py(std::uintptr_t G, std::int64_t n, std::int64_t d, std::uintptr_t gs,
                           std::int64_t k, const std::vector<double>& betas,
                           const std::string& dtype, std::uintptr_t stream) {
  SADDLESCAPE_EXPECTS(k >= 1 && static_cast<std::int64_t>(betas.size()) == k,
                      "betas must hold k = ", k, " values, got ", betas.size());
  py::gil_scoped_release release;
  sc::context& ctx = context_for(stream);
  with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    sc::ema_update_batched<T>(ctx, device_ptr<T>(G), n, d, device_ptr<const T>(gs), k,
                              betas.data());
  });
}

void inv_root_batched_py(std::uintptr_t G, std::int64_t n, std::int64_t d, std::uintptr_t A,
                         const std::string& dtype, int p, double eps, const std::string& form,
                         const std::string& method, double tol, int max_iter, bool allow_tf32,
                         std::uintptr_t stream) {
  const saddlescape::root_spec spec{p, eps, saddlescape::parse_root_form(form)};
  const sc::root_options opts = root_options_of(method, tol, max_iter, allow_tf32);
  py::gil_scoped_release release;
  sc::context& ctx = context_for(stream);
  with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    sc::inv_root_batched<T>(ctx, device_ptr<const T>(G), n, d, spec, opts, device_ptr<T>(A));
  });
}

void inv_root_apply_batched_py(std::uintptr_t G, std::int64_t n, std::int64_t d,
                               std::uintptr_t V, std::int64_t k, std::uintptr_t out,
                               const std::string& dtype, int p, double eps,
                               const std::string& form, const std::string& method, double tol,
                               int max_iter, bool allow_tf32, std::uintptr_t stream) {
  const saddlescape::root_spec spec{p, eps, saddlescape::parse_root_form(form)};
  const sc::root_options opts = root_options_of(method, tol, max_iter, allow_tf32);
  py::gil_scoped_release release;
  sc::context& ctx = context_for(stream);
  with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    sc::inv_root_apply_batched<T>(ctx, device_ptr<const T>(G), n, d, device_ptr<const T>(V), k,
                                  spec, opts, device_ptr<T>(out));
  });
}

void rmsprop_diag_step_py(std::uintptr_t x, std::uintptr_t g, std::uintptr_t v, std::int64_t n,
                          double lr, double beta, double eps, const std::string& form, bool check_g,
                          const std::string& dtype, std::uintptr_t stream) {
  const saddlescape::root_form f = saddlescape::parse_root_form(form);
  py::gil_scoped_release release;
  sc::context& ctx = context_for(stream);
  with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    sc::rmsprop_diag_step<T>(ctx, device_ptr<T>(x), device_ptr<const T>(g), device_ptr<T>(v), n,
                             lr, beta, eps, f, check_g);
  });
}

template <class T>
py::array_t<T> numpy_of(const std::vector<T>& v) {
  py::array_t<T> out(static_cast<py::ssize_t>(v.size()));
  std::copy(v.begin(), v.end(), out.mutable_data());
  return out;
}

py::dict run_seeds_py(const saddlescape::problem& p, const saddlescape::optimizer& opt,
                      const py::array_t<double, py::array::c_style | py::array::forcecast>& x0,
                      const py::array_t<std::uint64_t, py::array::c_style | py::array::forcecast>& seeds,
                      std::int64_t steps, double escape_radius, double escape_value,
                      std::uintptr_t stream) {
  SADDLESCAPE_EXPECTS(x0.ndim() == 1 && x0.shape(0) == p.dim(), "x0 must have shape (", p.dim(),
                      ",), got ", x0.ndim(), " dimensions with ", x0.size(), " entries");
  SADDLESCAPE_EXPECTS(seeds.ndim() == 1 && seeds.size() >= 1,
                      "seeds must be a non-empty 1-D array of seeds");
  const std::vector<double> start(x0.data(), x0.data() + x0.size());
  const std::vector<std::uint64_t> seed_list(seeds.data(), seeds.data() + seeds.size());
  sc::seed_run_options options;
  options.steps = steps;
  options.escape_radius = escape_radius;
  options.escape_value = escape_value;
  sc::seed_run_result r;
  {
    py::gil_scoped_release release;
    sc::context& ctx = context_for(stream);
    r = sc::run_seeds(ctx, p, opt, start.data(), seed_list, options);
  }
  const auto count = static_cast<py::ssize_t>(r.seeds.size());
  py::array_t<double> x_final({count, static_cast<py::ssize_t>(r.dim)});
  std::copy(r.x_final.begin(), r.x_final.end(), x_final.mutable_data());
  // Codes (run_status's order), named in Python: a list of 10^6 strings would cost a
  // noticeable share of a whole run's time.
  py::array_t<std::int8_t> status(static_cast<py::ssize_t>(r.status.size()));
  for (std::size_t i = 0; i < r.status.size(); ++i)
    status.mutable_at(static_cast<py::ssize_t>(i)) = static_cast<std::int8_t>(r.status[i]);
  py::dict out;
  out["seeds"] = numpy_of(r.seeds);
  out["escape_step"] = numpy_of(r.escape_step);
  out["f_final"] = numpy_of(r.f_final);
  out["x_final"] = x_final;
  out["status"] = status;
  out["stopped_at"] = numpy_of(r.stopped_at);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Runtime glue

// cudaMalloc'ed bytes: the staging area of numpy inputs and outputs. Not stream-ordered: plain
// cudaMalloc/cudaFree synchronise as needed, which suits these short-lived round trips.
class device_buffer {
 public:
  explicit device_buffer(std::size_t nbytes) : nbytes_(nbytes) {
    if (nbytes == 0) return;
    if (!sc::is_available())
      throw sc::cuda_error("no CUDA device can be used: " + sc::unavailable_reason());
    py::gil_scoped_release release;
    check(cudaMalloc(&ptr_, nbytes), "cudaMalloc");
  }
  ~device_buffer() { free(); }
  device_buffer(const device_buffer&) = delete;
  device_buffer& operator=(const device_buffer&) = delete;

  std::uintptr_t ptr() const noexcept { return reinterpret_cast<std::uintptr_t>(ptr_); }
  std::size_t nbytes() const noexcept { return nbytes_; }

  void free() noexcept {
    if (ptr_) cudaFree(ptr_);  // an error here (e.g. at shutdown) has nobody to report to
    ptr_ = nullptr;
    nbytes_ = 0;
  }

  void copy_from_host(const py::array& a, std::uintptr_t stream) {
    expect_matching(a, "the source");
    if (nbytes_ == 0) return;
    const void* src = a.data();
    py::gil_scoped_release release;
    check(cudaMemcpyAsync(ptr_, src, nbytes_, cudaMemcpyHostToDevice, as_cuda_stream(stream)),
          "cudaMemcpyAsync");
    // Pageable memory: the copy may still read `a` after cudaMemcpyAsync returns.
    check(cudaStreamSynchronize(as_cuda_stream(stream)), "cudaStreamSynchronize");
  }

  void copy_to_host(py::array& a, std::uintptr_t stream) {
    expect_matching(a, "the destination");
    SADDLESCAPE_EXPECTS(a.writeable(), "the destination array is read-only");
    if (nbytes_ == 0) return;
    void* dst = a.mutable_data();
    py::gil_scoped_release release;
    check(cudaMemcpyAsync(dst, ptr_, nbytes_, cudaMemcpyDeviceToHost, as_cuda_stream(stream)),
          "cudaMemcpyAsync");
    check(cudaStreamSynchronize(as_cuda_stream(stream)), "cudaStreamSynchronize");
  }

 private:
  void expect_matching(const py::array& a, const char* what) const {
    SADDLESCAPE_EXPECTS(a.flags() & py::array::c_style, what, " array must be C-contiguous");
    SADDLESCAPE_EXPECTS(static_cast<std::size_t>(a.nbytes()) == nbytes_, what, " array has ",
                        a.nbytes(), " bytes but the buffer has ", nbytes_);
    SADDLESCAPE_EXPECTS(nbytes_ == 0 || ptr_ != nullptr, "the buffer has been freed");
  }

  void* ptr_ = nullptr;
  std::size_t nbytes_ = 0;
};

// ("device" | "managed" | "host" | "unregistered", device) of an address.
std::pair<std::string, int> pointer_info(std::uintptr_t address) {
  cudaPointerAttributes attr{};
  {
    py::gil_scoped_release release;
    check(cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(address)),
          "cudaPointerGetAttributes");
  }
  switch (attr.type) {
    case cudaMemoryTypeDevice:
      return {"device", attr.device};
    case cudaMemoryTypeManaged:
      return {"managed", attr.device};
    case cudaMemoryTypeHost:
      return {"host", attr.device};
    default:
      return {"unregistered", -1};
  }
}

int current_device() {
  int device = 0;
  py::gil_scoped_release release;
  check(cudaGetDevice(&device), "cudaGetDevice");
  return device;
}

// Makes `waiter` wait for the work queued so far on `producer`, without blocking the host.
void stream_wait(std::uintptr_t waiter, std::uintptr_t producer) {
  if (waiter == producer) return;
  py::gil_scoped_release release;
  cudaEvent_t event = nullptr;
  check(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "cudaEventCreateWithFlags");
  const cudaError_t recorded = cudaEventRecord(event, as_cuda_stream(producer));
  const cudaError_t waited =
      recorded == cudaSuccess ? cudaStreamWaitEvent(as_cuda_stream(waiter), event, 0) : recorded;
  cudaEventDestroy(event);  // safe while the wait is pending: the wait keeps what it needs
  check(recorded, "cudaEventRecord");
  check(waited, "cudaStreamWaitEvent");
}

void synchronize(std::uintptr_t stream) {
  py::gil_scoped_release release;
  check(cudaStreamSynchronize(as_cuda_stream(stream)), "cudaStreamSynchronize");
}

void release_contexts() {
  py::gil_scoped_release release;
  thread_cache().contexts.clear();
}

// ---------------------------------------------------------------------------------------------
// DLPack: the structs of dlpack.h (v0.x ABI, the unversioned "dltensor" capsule), declared here
// because the module needs nothing else from that header.

struct dl_device {
  std::int32_t device_type;
  std::int32_t device_id;
};
struct dl_data_type {
  std::uint8_t code;
  std::uint8_t bits;
  std::uint16_t lanes;
};
struct dl_tensor {
  void* data;
  dl_device device;
  std::int32_t ndim;
  dl_data_type dtype;
  std::int64_t* shape;
  std::int64_t* strides;  // in elements; null: C-contiguous
  std::uint64_t byte_offset;
};
struct dl_managed_tensor {
  dl_tensor tensor;
  void* manager_ctx;
  void (*deleter)(dl_managed_tensor*);
};

// A consumed capsule: the tensor stays valid (and owned by its producer) until this object is
// released or collected, when the producer's deleter runs.
class dlpack_tensor {
 public:
  explicit dlpack_tensor(const py::object& capsule) {
    PyObject* c = capsule.ptr();
    if (!PyCapsule_IsValid(c, "dltensor")) {
      const bool used = PyCapsule_IsValid(c, "used_dltensor");
      throw invalid_argument(used ? "the DLPack capsule has already been consumed"
                                  : "expected a DLPack capsule named 'dltensor' (legacy, "
                                    "unversioned), got another object");
    }
    t_ = static_cast<dl_managed_tensor*>(PyCapsule_GetPointer(c, "dltensor"));
    if (!t_) throw py::error_already_set();
    // Renaming transfers ownership: the producer's capsule destructor no longer frees it.
    if (PyCapsule_SetName(c, "used_dltensor") != 0) {
      t_ = nullptr;
      throw py::error_already_set();
    }
  }
  ~dlpack_tensor() { release(); }
  dlpack_tensor(const dlpack_tensor&) = delete;
  dlpack_tensor& operator=(const dlpack_tensor&) = delete;

  void release() {
    if (t_ && t_->deleter) t_->deleter(t_);
    t_ = nullptr;
  }

  std::uintptr_t ptr() const {
    const dl_tensor& t = get();
    return reinterpret_cast<std::uintptr_t>(t.data) + static_cast<std::uintptr_t>(t.byte_offset);
  }
  py::tuple shape() const {
    const dl_tensor& t = get();
    py::tuple out(t.ndim);
    for (std::int32_t i = 0; i < t.ndim; ++i) out[i] = t.shape[i];
    return out;
  }
  py::object strides() const {
    const dl_tensor& t = get();
    if (!t.strides) return py::none();
    py::tuple out(t.ndim);
    for (std::int32_t i = 0; i < t.ndim; ++i) out[i] = t.strides[i];
    return std::move(out);
  }
  py::tuple dtype() const {
    const dl_tensor& t = get();
    return py::make_tuple(t.dtype.code, t.dtype.bits, t.dtype.lanes);
  }
  py::tuple device() const {
    const dl_tensor& t = get();
    return py::make_tuple(t.device.device_type, t.device.device_id);
  }

 private:
  const dl_tensor& get() const {
    if (!t_) throw invalid_argument("the DLPack tensor has been released");
    return t_->tensor;
  }
  dl_managed_tensor* t_ = nullptr;
};

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "saddlescape's CUDA backend; use saddlescape.cuda, which documents and checks it.";

  // The problem and optimizer classes run_seeds accepts are registered by _core; pybind11
  // shares type registrations between modules built alike, once _core is loaded.
  const py::module_ core = py::module_::import("saddlescape._core");
  // Kept for the life of the process: the translator may run until the interpreter ends.
  static PyObject* numerical_error_type = py::object(core.attr("NumericalError")).release().ptr();

  py::register_local_exception<sc::cuda_error>(m, "CUDAError", PyExc_RuntimeError);
  py::register_local_exception_translator([](std::exception_ptr e) {
    try {
      if (e) std::rethrow_exception(e);
    } catch (const saddlescape::numerical_error& err) {
      PyErr_SetString(numerical_error_type, err.what());
    }
  });
  py::module_::import("atexit").attr("register")(py::cpp_function([] { g_exiting.store(true); }));

  // The first runtime call initialises the driver, which can take a noticeable time.
  m.def("is_available", [] {
    py::gil_scoped_release release;
    return sc::is_available();
  }, "Whether a CUDA device can be used.");
  m.def("unavailable_reason", [] {
    py::gil_scoped_release release;
    return sc::unavailable_reason();
  }, "Why is_available() is False ('' when it is True).");
  m.def("device_description", [] {
    py::gil_scoped_release release;
    return sc::device_description();
  });
  m.attr("max_seed_dim") = sc::max_seed_dim;

  m.def("ema_update_batched", &ema_update_batched_py, py::arg("G"), py::arg("n"), py::arg("d"),
        py::arg("gs"), py::arg("k"), py::arg("betas"), py::arg("dtype"), py::arg("stream") = 0,
        "k EMA steps on n (d, d) blocks in place (device pointers G: (n, d, d), gs: (n, k, d)).");
  m.def("inv_root_batched", &inv_root_batched_py, py::arg("G"), py::arg("n"), py::arg("d"),
        py::arg("A"), py::arg("dtype"), py::arg("p"), py::arg("eps"), py::arg("form"),
        py::arg("method"), py::arg("tol"), py::arg("max_iter"), py::arg("allow_tf32"),
        py::arg("stream") = 0, "A_b = f(G_b) for n blocks (device pointers, (n, d, d) each).");
  m.def("inv_root_apply_batched", &inv_root_apply_batched_py, py::arg("G"), py::arg("n"),
        py::arg("d"), py::arg("V"), py::arg("k"), py::arg("out"), py::arg("dtype"), py::arg("p"),
        py::arg("eps"), py::arg("form"), py::arg("method"), py::arg("tol"), py::arg("max_iter"),
        py::arg("allow_tf32"), py::arg("stream") = 0,
        "out_b = f(G_b) V_b for n blocks (device pointers G: (n, d, d), V, out: (n, d, k)).");
  m.def("rmsprop_diag_step", &rmsprop_diag_step_py, py::arg("x"), py::arg("g"), py::arg("v"),
        py::arg("n"), py::arg("lr"), py::arg("beta"), py::arg("eps"), py::arg("form"),
        py::arg("check"), py::arg("dtype"), py::arg("stream") = 0,
        "One fused diagonal RMSProp step on n entries in place (device pointers).");
  m.def("run_seeds", &run_seeds_py, py::arg("problem"), py::arg("optimizer"), py::arg("x0"),
        py::arg("seeds"), py::arg("steps"), py::arg("escape_radius"), py::arg("escape_value"),
        py::arg("stream") = 0, "Many seeds of run() at once on the device; a dict of arrays.");

  py::class_<device_buffer>(m, "DeviceBuffer")
      .def(py::init<std::size_t>(), py::arg("nbytes"))
      .def_property_readonly("ptr", &device_buffer::ptr)
      .def_property_readonly("nbytes", &device_buffer::nbytes)
      .def("copy_from_host", &device_buffer::copy_from_host, py::arg("array"),
           py::arg("stream") = 0, "Copies a C-contiguous array of exactly nbytes in; waits.")
      .def("copy_to_host", &device_buffer::copy_to_host, py::arg("array"), py::arg("stream") = 0,
           "Copies the bytes into a writable C-contiguous array of exactly nbytes; waits.")
      .def("free", &device_buffer::free, "Frees the memory now rather than at collection.");

  py::class_<dlpack_tensor>(m, "DLPackTensor")
      .def(py::init<const py::object&>(), py::arg("capsule"))
      .def_property_readonly("ptr", &dlpack_tensor::ptr)
      .def_property_readonly("shape", &dlpack_tensor::shape)
      .def_property_readonly("strides", &dlpack_tensor::strides, "In elements, or None.")
      .def_property_readonly("dtype", &dlpack_tensor::dtype, "(code, bits, lanes).")
      .def_property_readonly("device", &dlpack_tensor::device, "(device_type, device_id).")
      .def("release", &dlpack_tensor::release, "Hands the tensor back to its producer.");

  m.def("pointer_info", &pointer_info, py::arg("ptr"),
        "(kind, device) of an address: kind is device, managed, host or unregistered.");
  m.def("current_device", &current_device);
  m.def("stream_wait", &stream_wait, py::arg("waiter"), py::arg("producer"),
        "Orders the waiter stream after the work queued so far on the producer stream.");
  m.def("synchronize", &synchronize, py::arg("stream") = 0);
  m.def("release_contexts", &release_contexts,
        "Destroys the calling thread's cached contexts (handles and scratch memory).");
}
