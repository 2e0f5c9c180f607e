// The context, error translation, input scans and the device queries.

#include "common.cuh"

#include <algorithm>
#include <map>
#include <mutex>
#include <cstring>

namespace saddlescape::cuda {

namespace detail {

void throw_cuda(cudaError_t e, const char* call) {
  cudaGetLastError();  // reported here; a non-sticky error must not resurface at the next call
  throw cuda_error(
      concat(call, " failed: ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ")"));
}

void throw_cublas(cublasStatus_t s, const char* call) {
  throw cuda_error(
      concat(call, " failed: ", cublasGetStatusName(s), " (", cublasGetStatusString(s), ")"));
}

void throw_cusolver(cusolverStatus_t s, const char* call) {
  // cuSOLVER has no status-to-string function; the codes are documented in cusolver_common.h.
  throw cuda_error(concat(call, " failed: cusolverStatus_t ", static_cast<int>(s)));
}


unsigned int grid_for(const context::impl& ctx, std::int64_t n, unsigned int block) {
  const std::int64_t blocks = (n + block - 1) / block;
  const std::int64_t cap = static_cast<std::int64_t>(ctx.sms) * (2048 / block) * 4;
  return static_cast<unsigned int>(std::clamp<std::int64_t>(blocks, 1, cap));
}

cudaMemPool_t memory_pool() {
  static std::mutex mutex;
  static std::map<int, cudaMemPool_t> pools;  // per device, for the life of the process
  int device = 0;
  SADDLESCAPE_CUDA(cudaGetDevice(&device));
  const std::lock_guard<std::mutex> lock(mutex);
  cudaMemPool_t& pool = pools[device];
  if (!pool) {
    cudaMemPoolProps props{};
    props.allocType = cudaMemAllocationTypePinned;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = device;
    SADDLESCAPE_CUDA(cudaMemPoolCreate(&pool, &props));
    std::uint64_t keep = ~std::uint64_t(0);
    SADDLESCAPE_CUDA(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep));
  }
  return pool;
}

context::impl& enter(context& ctx) {
  context::impl& c = ctx.get();
  cudaGetLastError();
  int device = -1;
  SADDLESCAPE_CUDA(cudaGetDevice(&device));
  SADDLESCAPE_EXPECTS(device == c.device, "this context was made for CUDA device ", c.device,
                      ", but the current device is ", device);
  return c;
}

void expect_device_pointer(const void* ptr, const char* name) {
  SADDLESCAPE_EXPECTS(ptr != nullptr, name, " is a null pointer");
  cudaPointerAttributes attr{};
  SADDLESCAPE_CUDA(cudaPointerGetAttributes(&attr, ptr));
  int device = 0;
  SADDLESCAPE_CUDA(cudaGetDevice(&device));
  const bool on_device = attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged;
  SADDLESCAPE_EXPECTS(on_device, name, " is not CUDA device memory (it is ",
                      attr.type == cudaMemoryTypeHost ? "pinned host" : "pageable host",
                      " memory)");
  SADDLESCAPE_EXPECTS(attr.type == cudaMemoryTypeManaged || attr.device == device, name,
                      " lives on device ", attr.device, ", but the current device is ", device);
}

std::string position(std::int64_t flat, std::initializer_list<std::int64_t> dims) {
  static const char* names[] = {"block ", "row ", "index "};
  std::vector<std::int64_t> idx(dims.size());
  std::int64_t rest = flat;
  auto it = dims.end();
  for (std::size_t k = dims.size(); k-- > 0;) {
    --it;
    idx[k] = rest % *it;
    rest /= *it;
  }
  std::string out;
  const std::size_t skip = 3 - std::min<std::size_t>(3, dims.size());
  for (std::size_t k = 0; k < dims.size(); ++k)
    out += concat(k ? ", " : "", names[std::min<std::size_t>(k + skip, 2)], idx[k]);
  return out;
}

namespace {

// For non-negative doubles the order of the bit patterns is the order of the values, so a max
// over |x| is an integer max; NaN and Inf are reported separately by index. Warps reduce by
// shuffles and the block through shared memory, so each block issues one atomic per word.
template <class T>
__global__ void scan_kernel(const T* __restrict a, std::int64_t n, unsigned long long* words) {
  unsigned long long first = ~0ull, best = 0;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const double v = fabs(static_cast<double>(a[i]));
    if (!(v <= 1.7976931348623157e308)) {
      first = min(first, static_cast<unsigned long long>(i));
    } else {
      best = max(best, static_cast<unsigned long long>(__double_as_longlong(v)));
    }
  }
  for (int o = 16; o > 0; o /= 2) {
    first = min(first, __shfl_down_sync(0xffffffffu, first, o));
    best = max(best, __shfl_down_sync(0xffffffffu, best, o));
  }
  __shared__ unsigned long long firsts[32], bests[32];  // blockDim.x <= 1024, a multiple of 32
  const unsigned int warp = threadIdx.x / 32, warps = blockDim.x / 32;
  if (threadIdx.x % 32 == 0) {
    firsts[warp] = first;
    bests[warp] = best;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (unsigned int w = 1; w < warps; ++w) {
      first = min(first, firsts[w]);
      best = max(best, bests[w]);
    }
    if (first != ~0ull) atomicMin(words, first);
    if (best) atomicMax(words + 1, best);
  }
}

}  // namespace

template <class T>
scan_result scan(context::impl& ctx, const T* a, std::int64_t n) {
  scan_result r;
  if (n == 0) return r;
  // words[0] = ~0 (no bad index yet), words[1] = 0 (max of nothing).
  SADDLESCAPE_CUDA(cudaMemsetAsync(ctx.words, 0xff, sizeof(unsigned long long), ctx.stream));
  SADDLESCAPE_CUDA(cudaMemsetAsync(ctx.words + 1, 0, sizeof(unsigned long long), ctx.stream));
  scan_kernel<T><<<grid_for(ctx, n, 256), 256, 0, ctx.stream>>>(a, n, ctx.words);
  SADDLESCAPE_LAUNCHED();
  SADDLESCAPE_CUDA(cudaMemcpyAsync(ctx.host_words, ctx.words, 2 * sizeof(unsigned long long),
                                   cudaMemcpyDeviceToHost, ctx.stream));
  SADDLESCAPE_CUDA(cudaStreamSynchronize(ctx.stream));
  if (ctx.host_words[0] != ~0ull) r.first_bad = static_cast<std::int64_t>(ctx.host_words[0]);
  std::memcpy(&r.max_abs, ctx.host_words + 1, sizeof(double));
  return r;
}

template scan_result scan<float>(context::impl&, const float*, std::int64_t);
template scan_result scan<double>(context::impl&, const double*, std::int64_t);

}  // namespace detail


bool is_available() noexcept { return unavailable_reason().empty(); }

std::string unavailable_reason() {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    cudaGetLastError();  // not sticky: clear it so later calls do not see it
    return detail::concat("the CUDA runtime reports ", cudaGetErrorName(e), ": ",
                          cudaGetErrorString(e));
  }
  if (count == 0) return "no CUDA device is present";
  return "";
}

std::string device_description() {
  int device = 0;
  SADDLESCAPE_CUDA(cudaGetDevice(&device));
  cudaDeviceProp prop{};
  SADDLESCAPE_CUDA(cudaGetDeviceProperties(&prop, device));
  return detail::concat(prop.name, " (sm_", prop.major, prop.minor, ", ", prop.multiProcessorCount,
                        " SMs, ",
                        prop.totalGlobalMem >> 30, " GiB)");
}

context::context(stream_t stream) : impl_(std::make_unique<impl>()) {
  const std::string why = unavailable_reason();
  if (!why.empty()) throw cuda_error("no CUDA device can be used: " + why);
  impl& c = *impl_;
  c.stream = reinterpret_cast<cudaStream_t>(stream);
  SADDLESCAPE_CUDA(cudaGetDevice(&c.device));
  SADDLESCAPE_CUDA(cudaDeviceGetAttribute(&c.sms, cudaDevAttrMultiProcessorCount, c.device));
  try {
    SADDLESCAPE_CUBLAS(cublasCreate(&c.blas));
    SADDLESCAPE_CUBLAS(cublasSetStream(c.blas, c.stream));
    SADDLESCAPE_CUSOLVER(cusolverDnCreate(&c.solver));
    SADDLESCAPE_CUSOLVER(cusolverDnSetStream(c.solver, c.stream));
    SADDLESCAPE_CUDA(cudaMallocHost(reinterpret_cast<void**>(&c.host_words),
                                    2 * sizeof(unsigned long long)));
    SADDLESCAPE_CUDA(
        cudaMalloc(reinterpret_cast<void**>(&c.words), 2 * sizeof(unsigned long long)));
  } catch (...) {
    if (c.words) cudaFree(c.words);
    if (c.host_words) cudaFreeHost(c.host_words);
    if (c.solver) cusolverDnDestroy(c.solver);
    if (c.blas) cublasDestroy(c.blas);
    throw;
  }
}

context::~context() {
  // Nothing is freed stream-ordered, so no stream of the caller's (which may be gone by now)
  // is touched. Errors are ignored (a destructor must not throw) and cleared, so that they do
  // not surface at a later call.
  impl& c = *impl_;
  cudaFree(c.words);  // synchronises the device: no queued work still reads it
  cudaFreeHost(c.host_words);
  cusolverDnDestroy(c.solver);
  cublasDestroy(c.blas);
  cudaGetLastError();
}

void context::set_stream(stream_t stream) {
  impl& c = *impl_;
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  if (s == c.stream) return;
  SADDLESCAPE_CUBLAS(cublasSetStream(c.blas, s));
  SADDLESCAPE_CUSOLVER(cusolverDnSetStream(c.solver, s));
  c.stream = s;
}

stream_t context::stream() const noexcept { return reinterpret_cast<stream_t>(impl_->stream); }

void context::synchronize() const { SADDLESCAPE_CUDA(cudaStreamSynchronize(impl_->stream)); }

}  // namespace saddlescape::cuda
