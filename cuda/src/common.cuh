#pragma once
// Shared by the CUDA sources: error checks that turn CUDA, cuBLAS and cuSOLVER failures into
// exceptions, device memory owned by RAII, the context's handles, and the device-side scan
// whose verdict checks read back before anything is changed.

#include <saddlescape/cuda.hpp>

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>

namespace saddlescape::cuda::detail {

using saddlescape::detail::concat;

[[noreturn]] void throw_cuda(cudaError_t e, const char* call);
[[noreturn]] void throw_cublas(cublasStatus_t s, const char* call);
[[noreturn]] void throw_cusolver(cusolverStatus_t s, const char* call);

#define SADDLESCAPE_CUDA(call)                                                     \
  do {                                                                             \
    const cudaError_t e_ = (call);                                                 \
    if (e_ != cudaSuccess) ::saddlescape::cuda::detail::throw_cuda(e_, #call);    \
  } while (0)
#define SADDLESCAPE_CUBLAS(call)                                                           \
  do {                                                                                     \
    const cublasStatus_t s_ = (call);                                                      \
    if (s_ != CUBLAS_STATUS_SUCCESS) ::saddlescape::cuda::detail::throw_cublas(s_, #call); \
  } while (0)
#define SADDLESCAPE_CUSOLVER(call)                                                             \
  do {                                                                                         \
    const cusolverStatus_t s_ = (call);                                                        \
    if (s_ != CUSOLVER_STATUS_SUCCESS) ::saddlescape::cuda::detail::throw_cusolver(s_, #call); \
  } while (0)
/// After a kernel launch: a bad configuration shows up here, a fault at the next sync.
#define SADDLESCAPE_LAUNCHED() SADDLESCAPE_CUDA(cudaGetLastError())

/// The library's own stream-ordered memory pool on the current device: work buffers come from
/// it, and it keeps freed memory for the next call instead of unmapping it at every
/// synchronisation (which costs milliseconds for the buffers of a large batch). It is private,
/// so the default pool that other libraries in the process use keeps its own settings.
cudaMemPool_t memory_pool();

/// Device memory of `count` T from memory_pool(), freed on destruction, stream-ordered on the
/// stream it was allocated on (which must outlive it: buffers live within one call).
template <class T>
class device_buffer {
 public:
  device_buffer() = default;
  device_buffer(std::size_t count, cudaStream_t stream) : stream_(stream), count_(count) {
    if (count > 0)
      SADDLESCAPE_CUDA(cudaMallocFromPoolAsync(reinterpret_cast<void**>(&p_), count * sizeof(T),
                                               memory_pool(), stream));
  }
  ~device_buffer() {
    if (p_ && cudaFreeAsync(p_, stream_) != cudaSuccess) cudaGetLastError();
  }
  device_buffer(const device_buffer&) = delete;
  device_buffer& operator=(const device_buffer&) = delete;
  device_buffer(device_buffer&& o) noexcept : p_(o.p_), stream_(o.stream_), count_(o.count_) {
    o.p_ = nullptr;
    o.count_ = 0;
  }
  device_buffer& operator=(device_buffer&& o) noexcept {
    if (this != &o) {
      if (p_) cudaFreeAsync(p_, stream_);
      p_ = o.p_;
      stream_ = o.stream_;
      count_ = o.count_;
      o.p_ = nullptr;
      o.count_ = 0;
    }
    return *this;
  }
  T* get() const noexcept { return p_; }
  std::size_t size() const noexcept { return count_; }
  /// Copies count values from the host (stream-ordered; the caller keeps src alive until
  /// the stream is synchronised).
  void upload(const T* src, std::size_t count) {
    if (count)
      SADDLESCAPE_CUDA(
          cudaMemcpyAsync(p_, src, count * sizeof(T), cudaMemcpyHostToDevice, stream_));
  }

 private:
  T* p_ = nullptr;
  cudaStream_t stream_ = nullptr;
  std::size_t count_ = 0;
};


}  // namespace saddlescape::cuda::detail

namespace saddlescape::cuda {

struct context::impl {
  cudaStream_t stream = nullptr;
  int device = 0;
  int sms = 1;  // multiprocessors of the device
  cublasHandle_t blas = nullptr;
  cusolverDnHandle_t solver = nullptr;
  // The two words scan() reads back: on the device (plain cudaMalloc, not stream-ordered, so
  // the context may change streams) and in pinned host memory.
  unsigned long long* words = nullptr;
  unsigned long long* host_words = nullptr;
};

}  // namespace saddlescape::cuda

namespace saddlescape::cuda::detail {

/// What scan() found in a device array: the first flat index of a NaN/Inf entry (-1: none) and
/// the largest |entry| over the finite ones (0 for n = 0).
struct scan_result {
  std::int64_t first_bad = -1;
  double max_abs = 0.0;
};

/// Scans n entries of the device array a, then synchronises with the stream to return.
template <class T>
scan_result scan(context::impl& ctx, const T* a, std::int64_t n);

/// "block b, row i, index j" style position of flat index `flat` in an array of shape dims.
std::string position(std::int64_t flat, std::initializer_list<std::int64_t> dims);

/// Blocks for a grid-stride kernel over n items: enough to fill every SM several times over,
/// no more (a larger grid only adds scheduling and, for reductions, atomics).
unsigned int grid_for(const context::impl& ctx, std::int64_t n, unsigned int block);

/// Throws unless ptr is device-accessible memory of the current device.
void expect_device_pointer(const void* ptr, const char* name);

/// Every public entry point starts here: the context's handles and stream belong to its device,
/// which must be the current one; and an error that an earlier failed call left as the runtime's
/// "last error" is cleared, so that it is not reported against this call's first launch.
context::impl& enter(context& ctx);

}  // namespace saddlescape::cuda::detail
