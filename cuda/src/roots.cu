// Batched inverse roots f(G_b) on the device: cuSOLVER eigensolvers (syevjBatched,
// XsyevBatched, Xsyevd) followed by device-side eigenvalue checks and cuBLAS reconstruction, or
// the matmul-only coupled Newton iteration of the CPU's newton_root with batched GEMMs.
//
// Layout. Every d x d block is row-major, as on the CPU. cuSOLVER and cuBLAS are column-major;
// a symmetric matrix reads the same either way, and the eigenvector matrix Q they return is
// column-major (eigenvector j contiguous at Q + j d), which is exactly the CPU's vectors_.
//
// Verdicts. Every check runs on the device and sets flags; the host reads them after one
// synchronisation and reports the first offending block, as the CPU's loop over blocks would.
// The messages of the rare failure paths are built on the host, from a copy of the offending
// block (the CPU's own eigen_root produces the asymmetry and Newton diagnoses verbatim).
// Inputs are never modified. Invalid input is rejected before any output is written; a late
// numerical_error (overflow in reconstruction) may leave the outputs partly written.

#include "common.cuh"

#include <saddlescape/matrix_functions.hpp>

#include <algorithm>
#include <climits>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace saddlescape::cuda {

root_method parse_root_method(std::string_view name) {
  if (name == "automatic") return root_method::automatic;
  if (name == "jacobi") return root_method::jacobi;
  if (name == "batched_qr") return root_method::batched_qr;
  if (name == "divide_conquer") return root_method::divide_conquer;
  if (name == "newton") return root_method::newton;
  throw invalid_argument(detail::concat("method must be 'automatic', 'jacobi', 'batched_qr', "
                                        "'divide_conquer' or 'newton', got '", name, "'"));
}

std::string_view to_string(root_method m) {
  switch (m) {
    case root_method::jacobi: return "jacobi";
    case root_method::batched_qr: return "batched_qr";
    case root_method::divide_conquer: return "divide_conquer";
    case root_method::newton: return "newton";
    default: return "automatic";
  }
}

namespace {

using detail::concat;
using detail::device_buffer;
using i64 = std::int64_t;
using ull = unsigned long long;

constexpr int kTile = 32;      // transpose tiles of 32 x 32 entries, 32 x 8 threads
constexpr int kThreads = 256;  // per-block (one CTA per d x d block) kernels

// Why a block failed, in the order the CPU meets the failures for one block. The verdict word
// is min over failing blocks of b * 8 + code: the first block, as the CPU's loop reports it.
enum verdict : unsigned { v_ok, v_asymmetric, v_not_converged, v_eig_not_finite, v_negative,
                          v_singular, v_overflow };
// Newton per-block state.
enum newton_state : int { n_active, n_converged, n_diverged, n_unscaled, n_asymmetric };

// Multiplications and additions that the compiler must not contract into an FMA: they keep
// the averaged triangles bitwise equal (a/2 + b/2 == b/2 + a/2 also for subnormal halves).
__device__ inline float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ inline double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ inline float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ inline double add_rn(double a, double b) { return __dadd_rn(a, b); }

// Non-negative doubles order like their bit patterns, so a max is an integer atomicMax.
__device__ inline void atomic_max_nonneg(ull* word, double v) {
  if (v > 0) atomicMax(word, static_cast<ull>(__double_as_longlong(v)));
}

enum class reduce_op { sum, min, max };

template <reduce_op Op>
__device__ inline double combine(double a, double b) {
  if constexpr (Op == reduce_op::sum) return a + b;
  else if constexpr (Op == reduce_op::min) return fmin(a, b);
  else return fmax(a, b);
}

// A CTA-wide reduction in a fixed order (deterministic); every thread gets the result.
// blockDim.x must be a multiple of 32; `sh` is 32 doubles of shared memory.
template <reduce_op Op>
__device__ double block_reduce(double v, double identity, double* sh) {
  for (int o = 16; o > 0; o /= 2) v = combine<Op>(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // sh may still be read from a previous call
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x >> 5) ? sh[lane] : identity;
    for (int o = 16; o > 0; o /= 2) v = combine<Op>(v, __shfl_xor_sync(0xffffffffu, v, o));
    if (lane == 0) sh[0] = v;
  }
  __syncthreads();
  return sh[0];
}

// out_b = the symmetric part of in_b for every block, through 32 x 32 shared-memory tiles so
// that both the tile and its mirror are read coalesced.
// Checked (the input G): out = a if a == b, else a/2 + b/2 (halves first: a + b may overflow),
// as the CPU's symmetrize_checked; diag_add is added to the diagonal (Newton's eps);
// stats[2b] and stats[2b + 1] receive max|G_b| over the lower triangle and max|G - G^T|.
// Not checked (Newton's X): out = (a + b) / 2, as newton_root's last step.
template <class T, bool Checked>
__global__ void __launch_bounds__(kTile * 8)
    symmetrize_kernel(const T* __restrict in, T* __restrict out, i64 n, i64 d, T diag_add,
                      ull* __restrict stats) {
  __shared__ T ta[kTile][kTile + 1], tb[kTile][kTile + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const i64 per_side = (d + kTile - 1) / kTile, tiles = per_side * per_side;
  for (i64 item = blockIdx.x; item < n * tiles; item += gridDim.x) {
    const i64 b = item / tiles, t = item % tiles;
    const i64 i0 = (t / per_side) * kTile, j0 = (t % per_side) * kTile;
    const T* g = in + b * d * d;
    __syncthreads();
    for (int r = ty; r < kTile; r += 8) {
      ta[r][tx] = (i0 + r < d && j0 + tx < d) ? g[(i0 + r) * d + j0 + tx] : T(0);
      tb[r][tx] = (j0 + r < d && i0 + tx < d) ? g[(j0 + r) * d + i0 + tx] : T(0);
    }
    __syncthreads();
    double big = 0.0, gap = 0.0;
    for (int r = ty; r < kTile; r += 8) {
      const i64 i = i0 + r, j = j0 + tx;
      if (i >= d || j >= d) continue;
      const T a = ta[r][tx], m = tb[tx][r];  // G[i][j] and G[j][i]
      T v;
      if constexpr (Checked) {
        v = a == m ? a : add_rn(mul_rn(a, T(0.5)), mul_rn(m, T(0.5)));
        if (i == j && diag_add != T(0)) v = add_rn(v, diag_add);
        if (j <= i) big = fmax(big, fabs(static_cast<double>(a)));
        if (j < i) gap = fmax(gap, fabs(static_cast<double>(a) - static_cast<double>(m)));
      } else {
        v = mul_rn(T(0.5), add_rn(a, m));
      }
      out[(b * d + i) * d + j] = v;
    }
    if constexpr (Checked) {
      for (int o = 16; o > 0; o /= 2) {
        big = fmax(big, __shfl_xor_sync(0xffffffffu, big, o));
        gap = fmax(gap, __shfl_xor_sync(0xffffffffu, gap, o));
      }
      if (tx == 0) {
        atomic_max_nonneg(stats + 2 * b, big);
        atomic_max_nonneg(stats + 2 * b + 1, gap);
      }
    }
  }
}

template <class T>
void symmetrize(context::impl& c, const T* in, T* out, i64 n, i64 d, T diag_add, ull* stats) {
  const i64 per_side = (d + kTile - 1) / kTile;
  const auto grid = static_cast<unsigned>(std::min<i64>(n * per_side * per_side, 1 << 20));
  if (stats) {
    SADDLESCAPE_CUDA(cudaMemsetAsync(stats, 0, 2 * n * sizeof(ull), c.stream));
    symmetrize_kernel<T, true><<<grid, dim3(kTile, 8), 0, c.stream>>>(in, out, n, d, diag_add,
                                                                      stats);
  } else {
    symmetrize_kernel<T, false><<<grid, dim3(kTile, 8), 0, c.stream>>>(in, out, n, d, diag_add,
                                                                       nullptr);
  }
  SADDLESCAPE_LAUNCHED();
}

__device__ inline bool asymmetric(const ull* stats, i64 b, double sym_tol) {
  const double big = __longlong_as_double(static_cast<long long>(stats[2 * b]));
  const double gap = __longlong_as_double(static_cast<long long>(stats[2 * b + 1]));
  return gap > sym_tol * big;
}

// f(lambda) of root_spec in double, as the CPU's spectral_value.
__host__ __device__ inline double spectral(double lambda, const root_spec& s) {
  if (s.form == root_form::adam) return 1.0 / (sqrt(lambda) + s.eps);
  const double shifted = lambda + s.eps;
  if (s.p == 2) return 1.0 / sqrt(shifted);
  return pow(shifted, -1.0 / s.p);
}

// One CTA per block: the CPU's eigen_root::factor and compute_weights checks on the computed
// eigenvalues, then weights_b = f(clipped lambda) (or its square root, for W = Q diag(sqrt f)).
// Every thread derives the same verdict from the same reduced values, so the branches and the
// __syncthreads_or below are uniform.
template <class T>
__global__ void analyze_kernel(const T* __restrict lambda, const int* __restrict info,
                               const ull* __restrict stats, i64 n, i64 d, double sym_tol,
                               double clip_tol, root_spec spec, bool root_weights,
                               T* __restrict weights, ull* __restrict first_bad) {
  __shared__ double sh[32];
  constexpr double inf = std::numeric_limits<double>::infinity();
  for (i64 b = blockIdx.x; b < n; b += gridDim.x) {
    const T* lam = lambda + b * d;
    double lo = inf, hi = -inf;
    int bad = 0;
    for (i64 i = threadIdx.x; i < d; i += blockDim.x) {
      const double x = static_cast<double>(lam[i]);
      if (!isfinite(x)) bad = 1;
      lo = fmin(lo, x);
      hi = fmax(hi, x);
    }
    bad = __syncthreads_or(bad);
    lo = block_reduce<reduce_op::min>(lo, inf, sh);
    hi = block_reduce<reduce_op::max>(hi, -inf, sh);
    const double tol = clip_tol * fmax(fabs(lo), fabs(hi));
    unsigned code = v_ok;
    if (asymmetric(stats, b, sym_tol)) code = v_asymmetric;
    else if (info[b] != 0) code = v_not_converged;
    else if (bad) code = v_eig_not_finite;
    else if (lo < -tol) code = v_negative;
    else if (spec.eps == 0.0 && !(lo > tol)) code = v_singular;  // lo is clipped to 0
    int over = 0;
    if (code == v_ok) {
      for (i64 i = threadIdx.x; i < d; i += blockDim.x) {
        const T l = lam[i] <= tol ? T(0) : lam[i];
        const T f = static_cast<T>(spectral(static_cast<double>(l), spec));
        if (!isfinite(f)) over = 1;
        weights[b * d + i] = root_weights ? sqrt(f) : f;
      }
    }
    over = __syncthreads_or(over);
    if (code == v_ok && over) code = v_overflow;
    if (threadIdx.x == 0 && code != v_ok) atomicMin(first_bad, static_cast<ull>(b) * 8 + code);
  }
}

// x[b][j][i] *= s[b][j] for column-major (rows x d) blocks: column j of block b scaled.
template <class T>
__global__ void scale_columns_kernel(T* __restrict x, const T* __restrict s, i64 n, i64 d,
                                     i64 rows) {
  const i64 total = n * d * rows;
  for (i64 e = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<i64>(gridDim.x) * blockDim.x) {
    const i64 b = e / (d * rows), j = (e % (d * rows)) / rows;
    x[e] = x[e] * s[b * d + j];
  }
}

// Copies the lower triangle of each column-major block into its upper triangle (the CPU's
// mirror_lower after syrk): the result is exactly symmetric whatever order GEMM summed in.
template <class T>
__global__ void mirror_lower_kernel(T* __restrict a, i64 n, i64 d) {
  const i64 total = n * d * d;
  for (i64 e = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<i64>(gridDim.x) * blockDim.x) {
    const i64 r = e % (d * d), row = r % d, col = r / d;
    if (row < col) a[e] = a[e - r + row * d + col];  // (row, col) <- (col, row)
  }
}

// C_b = op(A_b) op(B_b), column-major, for `batch` blocks. The _64 entry points take the batch
// count (and sizes) as int64, so no batch needs splitting.
inline void gemm_batched(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, i64 m,
                         i64 nn, i64 kk, const float* A, i64 lda, i64 sa, const float* B, i64 ldb,
                         i64 sb, float* C, i64 ldc, i64 sc, i64 batch) {
  const float one = 1.0f, zero = 0.0f;
  SADDLESCAPE_CUBLAS(cublasSgemmStridedBatched_64(h, ta, tb, m, nn, kk, &one, A, lda, sa, B, ldb,
                                                  sb, &zero, C, ldc, sc, batch));
}
inline void gemm_batched(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, i64 m,
                         i64 nn, i64 kk, const double* A, i64 lda, i64 sa, const double* B,
                         i64 ldb, i64 sb, double* C, i64 ldc, i64 sc, i64 batch) {
  const double one = 1.0, zero = 0.0;
  SADDLESCAPE_CUBLAS(cublasDgemmStridedBatched_64(h, ta, tb, m, nn, kk, &one, A, lda, sa, B, ldb,
                                                  sb, &zero, C, ldc, sc, batch));
}

template <class T>
constexpr cudaDataType data_type() {
  return sizeof(T) == 4 ? CUDA_R_32F : CUDA_R_64F;
}

std::string batch_name(i64 n, i64 b) { return n == 1 ? std::string("G") : concat("G[", b, "]"); }

template <class T>
std::vector<T> copy_to_host(context::impl& c, const T* src, i64 count) {
  std::vector<T> out(static_cast<std::size_t>(count));
  SADDLESCAPE_CUDA(cudaMemcpyAsync(out.data(), src, count * sizeof(T), cudaMemcpyDeviceToHost,
                                   c.stream));
  SADDLESCAPE_CUDA(cudaStreamSynchronize(c.stream));
  return out;
}

// Rejects a non-finite G with the CPU's message (first bad entry in row-major order).
template <class T>
void check_finite_input(context::impl& c, const T* G, i64 n, i64 d) {
  const detail::scan_result s = detail::scan(c, G, n * d * d);
  if (s.first_bad < 0) return;
  const i64 b = s.first_bad / (d * d), r = s.first_bad % (d * d);
  const T v = copy_to_host(c, G + s.first_bad, 1)[0];
  const std::string what = batch_name(n, b);
  throw invalid_argument(concat(what, " has a non-finite entry ", what, "[", r / d, ", ", r % d,
                                "] = ", v));
}

// The device flagged block b as asymmetric: the CPU's factor() on a copy builds the message.
template <class T>
[[noreturn]] void report_asymmetric(context::impl& c, const T* G, i64 n, i64 d, i64 b) {
  const std::vector<T> g = copy_to_host(c, G + b * d * d, d * d);
  const std::string what = batch_name(n, b);
  eigen_root<T>(d).factor(g.data(), what);  // throws invalid_argument naming the entries
  throw invalid_argument(concat(what, " is not symmetric (max|", what, " - ", what,
                                "^T| exceeds ", symmetry_tolerance<T>(), " * max|", what, "|)"));
}

// ---------------------------------------------------------------------------------------------
// Eigensolver routes

// Keeps what cuSOLVER may still use (workspaces, parameter objects) alive until the caller has
// synchronised with the stream.
struct solver_resources {
  device_buffer<unsigned char> device_work;
  std::vector<unsigned char> host_work;
  cusolverDnParams_t params = nullptr;
  syevjInfo_t syevj = nullptr;
  solver_resources() = default;
  solver_resources(const solver_resources&) = delete;
  solver_resources& operator=(const solver_resources&) = delete;
  ~solver_resources() {
    if (params) cusolverDnDestroyParams(params);
    if (syevj) cusolverDnDestroySyevjInfo(syevj);
  }
  void* device_bytes(std::size_t bytes, cudaStream_t s) {
    if (device_work.size() < bytes) device_work = device_buffer<unsigned char>(bytes, s);
    return device_work.get();
  }
  void* host_bytes(std::size_t bytes) {
    if (host_work.size() < bytes) host_work.resize(bytes);
    return bytes ? host_work.data() : nullptr;
  }
};

// Overwrites the symmetric blocks q (n, d, d) with their eigenvectors (column-major, column j
// is eigenvector j) and writes their eigenvalues (ascending) to lambda (n, d) and a status per
// block to info (n, device memory: > 0 means not converged). All calls are queued on the
// solver's stream; nothing is read back here.
template <class T>
void eigendecompose(context::impl& c, root_method m, T* q, T* lambda, int* info, i64 n, i64 d,
                    solver_resources& res) {
  const auto jobz = CUSOLVER_EIG_MODE_VECTOR;
  const auto uplo = CUBLAS_FILL_MODE_LOWER;  // either triangle: the blocks are exactly symmetric
  const i64 dd = d * d;
  // The batched solvers index with 32-bit ints: n * lda * batch <= INT_MAX per call.
  const i64 chunk = std::max<i64>(1, std::min<i64>(n, INT_MAX / dd));
  if (m == root_method::jacobi) {
    SADDLESCAPE_CUSOLVER(cusolverDnCreateSyevjInfo(&res.syevj));
    // Converged when off(A) <= eps(T) * ||A||_F; 100 sweeps is the library default and far
    // more than a d <= 32 Jacobi needs (quadratic convergence after a few sweeps).
    SADDLESCAPE_CUSOLVER(cusolverDnXsyevjSetTolerance(
        res.syevj, static_cast<double>(std::numeric_limits<T>::epsilon())));
    SADDLESCAPE_CUSOLVER(cusolverDnXsyevjSetMaxSweeps(res.syevj, 100));
    SADDLESCAPE_CUSOLVER(cusolverDnXsyevjSetSortEig(res.syevj, 1));  // ascending, as LAPACK
    const int nd = static_cast<int>(d);
    int lwork = 0;  // in elements of T, for the larger of the two batch sizes
    for (const i64 nb : {chunk, n % chunk}) {
      if (nb == 0) continue;
      int lw = 0;
      if constexpr (sizeof(T) == 4)
        SADDLESCAPE_CUSOLVER(cusolverDnSsyevjBatched_bufferSize(
            c.solver, jobz, uplo, nd, q, nd, lambda, &lw, res.syevj, static_cast<int>(nb)));
      else
        SADDLESCAPE_CUSOLVER(cusolverDnDsyevjBatched_bufferSize(
            c.solver, jobz, uplo, nd, q, nd, lambda, &lw, res.syevj, static_cast<int>(nb)));
      lwork = std::max(lwork, lw);
    }
    auto* work = static_cast<T*>(res.device_bytes(std::size_t(lwork) * sizeof(T), c.stream));
    for (i64 b0 = 0; b0 < n; b0 += chunk) {
      const int nb = static_cast<int>(std::min(chunk, n - b0));
      if constexpr (sizeof(T) == 4)
        SADDLESCAPE_CUSOLVER(cusolverDnSsyevjBatched(c.solver, jobz, uplo, nd, q + b0 * dd, nd,
                                                     lambda + b0 * d, work, lwork, info + b0,
                                                     res.syevj, nb));
      else
        SADDLESCAPE_CUSOLVER(cusolverDnDsyevjBatched(c.solver, jobz, uplo, nd, q + b0 * dd, nd,
                                                     lambda + b0 * d, work, lwork, info + b0,
                                                     res.syevj, nb));
    }
    return;
  }
  const cudaDataType t = data_type<T>();
  SADDLESCAPE_CUSOLVER(cusolverDnCreateParams(&res.params));
  if (m == root_method::batched_qr) {
    // Workspaces sized for both batch sizes (full chunk, tail) before the first call, so that
    // no buffer a queued call may use is reallocated.
    std::size_t dev = 0, host = 0;
    for (const i64 nb : {chunk, n % chunk}) {
      if (nb == 0) continue;
      std::size_t dev_nb = 0, host_nb = 0;
      SADDLESCAPE_CUSOLVER(cusolverDnXsyevBatched_bufferSize(c.solver, res.params, jobz, uplo, d,
                                                             t, q, d, t, lambda, t, &dev_nb,
                                                             &host_nb, nb));
      dev = std::max(dev, dev_nb);
      host = std::max(host, host_nb);
    }
    void* dw = res.device_bytes(dev, c.stream);
    void* hw = res.host_bytes(host);
    for (i64 b0 = 0; b0 < n; b0 += chunk) {
      const i64 nb = std::min(chunk, n - b0);
      SADDLESCAPE_CUSOLVER(cusolverDnXsyevBatched(c.solver, res.params, jobz, uplo, d, t,
                                                  q + b0 * dd, d, t, lambda + b0 * d, t, dw, dev,
                                                  hw, host, info + b0, nb));
    }
    return;
  }
  // divide_conquer: one Xsyevd per block, one workspace for all (same d, same size).
  std::size_t dev = 0, host = 0;
  SADDLESCAPE_CUSOLVER(cusolverDnXsyevd_bufferSize(c.solver, res.params, jobz, uplo, d, t, q, d,
                                                   t, lambda, t, &dev, &host));
  void* dw = res.device_bytes(dev, c.stream);
  void* hw = res.host_bytes(host);
  for (i64 b = 0; b < n; ++b)
    SADDLESCAPE_CUSOLVER(cusolverDnXsyevd(c.solver, res.params, jobz, uplo, d, t, q + b * dd, d,
                                          t, lambda + b * d, t, dw, dev, hw, host, info + b));
}

// Eigenvectors q and weights of every block, checked as the CPU's factor() and
// compute_weights() check them; throws for the first bad block.
template <class T>
struct factored {
  device_buffer<T> q, weights;
};

template <class T>
factored<T> factor_blocks(context::impl& c, const T* G, i64 n, i64 d, const root_spec& spec,
                          root_method method, bool root_weights) {
  check_finite_input(c, G, n, d);
  const i64 dd = d * d;
  factored<T> f{device_buffer<T>(n * dd, c.stream), device_buffer<T>(n * d, c.stream)};
  device_buffer<T> lambda(n * d, c.stream);
  device_buffer<int> info(n, c.stream);
  device_buffer<ull> stats(2 * n + 1, c.stream);  // per-block max|G|, max gap; the verdict
  ull* verdict = stats.get() + 2 * n;

  // cuSOLVER overwrites its input: it gets the averaged copy, G is only read.
  symmetrize<T>(c, G, f.q.get(), n, d, T(0), stats.get());
  SADDLESCAPE_CUDA(cudaMemsetAsync(info.get(), 0, n * sizeof(int), c.stream));
  SADDLESCAPE_CUDA(cudaMemsetAsync(verdict, 0xff, sizeof(ull), c.stream));
  solver_resources res;
  eigendecompose<T>(c, method, f.q.get(), lambda.get(), info.get(), n, d, res);

  const auto grid = static_cast<unsigned>(std::min<i64>(n, 65536));
  analyze_kernel<T><<<grid, 128, 0, c.stream>>>(
      lambda.get(), info.get(), stats.get(), n, d, symmetry_tolerance<T>(), clip_tolerance<T>(d),
      spec, root_weights, f.weights.get(), verdict);
  SADDLESCAPE_LAUNCHED();
  const ull word = copy_to_host(c, verdict, 1)[0];  // synchronises: the one verdict read
  if (word == ~0ull) return f;

  // The failure path: name the first bad block with the CPU's words.
  const i64 b = static_cast<i64>(word / 8);
  const auto code = static_cast<unsigned>(word % 8);
  const std::string what = batch_name(n, b);
  if (code == v_asymmetric) report_asymmetric(c, G, n, d, b);
  if (code == v_not_converged)
    SADDLESCAPE_NUMERICAL_FAIL("the eigensolver (cuSOLVER ",
                               method == root_method::jacobi       ? "syevjBatched"
                               : method == root_method::batched_qr ? "XsyevBatched"
                                                                   : "Xsyevd",
                               ") did not converge for ", what, " (info = ",
                               copy_to_host(c, info.get() + b, 1)[0], ")");
  const std::vector<T> lam = copy_to_host(c, lambda.get() + b * d, d);
  const auto [lo_it, hi_it] = std::minmax_element(lam.begin(), lam.end());
  const double lo = *lo_it, hi = *hi_it;
  const double tol = clip_tolerance<T>(d) * std::max(std::abs(lo), std::abs(hi));
  if (code == v_eig_not_finite)
    SADDLESCAPE_NUMERICAL_FAIL("the eigenvalues of ", what, " are not finite (", lam.front(), ", ",
                               lam.back(), "): its entries are too large for ",
                               saddlescape::detail::type_name<T>());
  if (code == v_negative)
    throw invalid_argument(concat(what, " is not positive semidefinite: it has the eigenvalue ",
                                  lo, ", below the rounding tolerance -", tol,
                                  " (d * machine epsilon * max|eigenvalue|)"));
  if (code == v_singular)
    SADDLESCAPE_NUMERICAL_FAIL(what, " is singular: its smallest eigenvalue is within rounding (",
                               tol, ") of zero and eps = 0; pass eps > 0");
  // v_overflow: the first eigenvalue whose weight is not representable (the device's pow may
  // differ from the host's in the last bit; then the message names no value).
  double x = 0.0, fx = std::numeric_limits<double>::infinity();
  for (const T l : lam) {
    x = static_cast<double>(l) <= tol ? 0.0 : static_cast<double>(l);
    fx = spectral(x, spec);
    if (!std::isfinite(static_cast<T>(fx))) break;
  }
  SADDLESCAPE_NUMERICAL_FAIL("the inverse root of ", what, " overflows: f(", x, ") = ", fx,
                             " is not representable; increase eps");
}

// The CPU's overflow messages: where = "" (Newton), " in reconstruction" (eigensolver routes),
// or nullptr for A v.
[[noreturn]] void report_overflow(i64 n, i64 flat, i64 block_size, const char* where) {
  const std::string what = batch_name(n, flat / block_size);
  if (!where) SADDLESCAPE_NUMERICAL_FAIL("A v overflows for ", what, "; increase eps or rescale v");
  SADDLESCAPE_NUMERICAL_FAIL("the inverse root of ", what, " overflows", where, "; increase eps");
}

// ---------------------------------------------------------------------------------------------
// Newton

// T = ((p + 1) I - M) / p in T arithmetic, as the CPU; the identity for a block that no longer
// iterates, so that the batched products leave its X and M as they are. One CTA per block.
template <class T>
__device__ void newton_form_t(const T* m, T* t, i64 d, int p, bool active) {
  const T pt = static_cast<T>(p);
  for (i64 e = threadIdx.x; e < d * d; e += blockDim.x) {
    const bool diag = e % (d + 1) == 0;
    T v = diag ? T(1) : T(0);
    if (active) {
      v = -m[e] / pt;
      if (diag) v += (pt + T(1)) / pt;
    }
    t[e] = v;
  }
}

// One CTA per block, on M = sym(G) + eps I: the CPU's scaling constant c >= lambda_max(M),
// min(Frobenius, infinity norm) taken relative to max|M| (neither underflows nor overflows);
// the Cholesky test matrix L = M + shift I, shift = (eps > 0 ? delta : -delta) - eps with
// delta = clip_tol * c; then M_0 = M / c (in double: 1 / c may not be representable in T),
// X_0 = c^(-1/p) I and T_0. Each thread rewrites only the entries it read.
template <class T>
__global__ void newton_setup_kernel(T* __restrict M, T* __restrict L, T* __restrict X,
                                    T* __restrict Tk, const ull* __restrict stats, i64 n, i64 d,
                                    double sym_tol, double clip_tol, double eps, int p,
                                    double* __restrict c_out, int* __restrict state) {
  __shared__ double sh[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (i64 b = blockIdx.x; b < n; b += gridDim.x) {
    const i64 dd = d * d;
    T *m = M + b * dd, *l = L + b * dd, *x = X + b * dd;
    double big = 0.0;
    for (i64 e = threadIdx.x; e < dd; e += blockDim.x)
      big = fmax(big, fabs(static_cast<double>(m[e])));
    big = block_reduce<reduce_op::max>(big, 0.0, sh);
    double fro = 0.0, inf = 0.0;
    for (i64 i = warp; i < d && big > 0; i += warps) {  // a warp per row
      double row = 0.0, sq = 0.0;
      for (i64 j = lane; j < d; j += 32) {
        const double v = static_cast<double>(m[i * d + j]) / big;
        row += fabs(v);
        sq += v * v;
      }
      for (int o = 16; o > 0; o /= 2) {
        row += __shfl_xor_sync(0xffffffffu, row, o);
        sq += __shfl_xor_sync(0xffffffffu, sq, o);
      }
      fro += sq;
      inf = fmax(inf, row);
    }
    fro = block_reduce<reduce_op::sum>(lane == 0 ? fro : 0.0, 0.0, sh);
    inf = block_reduce<reduce_op::max>(inf, 0.0, sh);
    const double c = big * fmin(sqrt(fro), inf);
    const double delta = clip_tol * c;
    const T shift = static_cast<T>((eps > 0 ? delta : -delta) - eps);
    const T x0 = static_cast<T>(pow(c, -1.0 / p));
    const int st = asymmetric(stats, b, sym_tol) ? n_asymmetric
                   : (c > 0.0 && isfinite(c))    ? n_active
                                                 : n_unscaled;
    for (i64 e = threadIdx.x; e < dd; e += blockDim.x) {
      const bool diag = e % (d + 1) == 0;
      l[e] = diag ? m[e] + shift : m[e];
      m[e] = static_cast<T>(static_cast<double>(m[e]) / c);
      x[e] = diag ? x0 : T(0);
    }
    newton_form_t(m, Tk + b * dd, d, p, st == n_active);  // reads only this thread's m[e]
    if (threadIdx.x == 0) {
      c_out[b] = c;
      state[b] = st;
    }
  }
}

template <class T>
__global__ void fill_pointers_kernel(T** p, T* base, i64 n, i64 stride) {
  for (i64 b = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x; b < n;
       b += static_cast<i64>(gridDim.x) * blockDim.x)
    p[b] = base + b * stride;
}

// One CTA per active block after an iteration: residual ||M - I||_F / sqrt(d), the CPU's
// stopping rule, and the next T. A converging block has its X saved to Xf right away, so the
// identity iterations that follow cannot touch it (with TF32 they would round it).
template <class T>
__global__ void newton_step_kernel(const T* __restrict M, const T* __restrict X,
                                   T* __restrict Xf, T* __restrict Tk, i64 n, i64 d, int p,
                                   int it, double tol, int* __restrict state,
                                   int* __restrict iters, double* __restrict residual,
                                   double* __restrict first, unsigned int* __restrict active) {
  __shared__ double sh[32];
  for (i64 b = blockIdx.x; b < n; b += gridDim.x) {
    if (state[b] != n_active) continue;  // uniform: every thread reads the same value
    const i64 dd = d * d;
    const T* m = M + b * dd;
    double r2 = 0.0;
    for (i64 e = threadIdx.x; e < dd; e += blockDim.x) {
      const double v = static_cast<double>(m[e]) - (e % (d + 1) == 0 ? 1.0 : 0.0);
      r2 += v * v;
    }
    r2 = block_reduce<reduce_op::sum>(r2, 0.0, sh);
    const double res = sqrt(r2 / static_cast<double>(d));
    const double first_res = it == 1 ? res : first[b];
    int next = n_active;
    if (!isfinite(res) || res > 10.0 * first_res + 10.0) next = n_diverged;
    else if (res <= tol) next = n_converged;
    if (next == n_converged)
      for (i64 e = threadIdx.x; e < dd; e += blockDim.x) Xf[b * dd + e] = X[b * dd + e];
    newton_form_t(m, Tk + b * dd, d, p, next == n_active);
    if (threadIdx.x == 0) {
      iters[b] = it;
      residual[b] = res;
      if (it == 1) first[b] = res;
      state[b] = next;
      if (next == n_active) atomicAdd(active, 1u);
    }
  }
}

// Sets CUBLAS_TF32_TENSOR_OP_MATH for its lifetime and restores the previous mode.
struct tf32_scope {
  cublasHandle_t h;
  cublasMath_t old = CUBLAS_DEFAULT_MATH;
  bool on = false;
  tf32_scope(cublasHandle_t handle, bool enable) : h(handle) {
    if (!enable) return;
    SADDLESCAPE_CUBLAS(cublasGetMathMode(h, &old));
    SADDLESCAPE_CUBLAS(cublasSetMathMode(h, CUBLAS_TF32_TENSOR_OP_MATH));
    on = true;
  }
  ~tf32_scope() {
    if (on) cublasSetMathMode(h, old);
  }
};

// (G_b + eps I)^(-1/p) into A (n, d, d) by the coupled Newton iteration (see newton_root).
template <class T>
void newton_batched(context::impl& c, const T* G, i64 n, i64 d, const root_spec& spec,
                    const root_options& opts, T* A) {
  if (!(spec.eps <= static_cast<double>(std::numeric_limits<T>::max())))
    SADDLESCAPE_NUMERICAL_FAIL("eps = ", spec.eps, " is not representable in ",
                               saddlescape::detail::type_name<T>(),
                               "; the eigensolver methods evaluate it in double");
  check_finite_input(c, G, n, d);
  const i64 dd = d * d;
  const auto sz = static_cast<std::size_t>(n * dd);
  device_buffer<T> m_buf(sz, c.stream), x_buf(sz, c.stream), t_buf(sz, c.stream),
      w_buf(sz, c.stream), xf_buf(sz, c.stream);
  device_buffer<ull> stats(2 * n, c.stream);
  device_buffer<double> scale(n, c.stream), res(n, c.stream), first(n, c.stream);
  device_buffer<int> state(n, c.stream), iters(n, c.stream), chol(n, c.stream);
  device_buffer<unsigned int> active(1, c.stream);
  device_buffer<T*> ptrs(n, c.stream);
  T *M = m_buf.get(), *X = x_buf.get(), *Tk = t_buf.get(), *W = w_buf.get();

  symmetrize<T>(c, G, M, n, d, static_cast<T>(spec.eps), stats.get());
  SADDLESCAPE_CUDA(cudaMemsetAsync(iters.get(), 0, n * sizeof(int), c.stream));
  const auto per_block = static_cast<unsigned>(std::min<i64>(n, 65536));
  newton_setup_kernel<T><<<per_block, kThreads, 0, c.stream>>>(
      M, W, X, Tk, stats.get(), n, d, symmetry_tolerance<T>(), clip_tolerance<T>(d), spec.eps,
      spec.p, scale.get(), state.get());
  SADDLESCAPE_LAUNCHED();
  // Cholesky of L (in W, which the first product overwrites): the CPU's cheap test for what
  // the eigensolver routes reject; a failure is diagnosed on the host below. L is symmetric,
  // so its column-major lower triangle is its row-major one transposed: the same matrix.
  fill_pointers_kernel<T><<<detail::grid_for(c, n, kThreads), kThreads, 0, c.stream>>>(
      ptrs.get(), W, n, dd);
  SADDLESCAPE_LAUNCHED();
  for (i64 b0 = 0; b0 < n; b0 += INT_MAX) {
    const int nb = static_cast<int>(std::min<i64>(INT_MAX, n - b0)), nd = static_cast<int>(d);
    if constexpr (sizeof(T) == 4)
      SADDLESCAPE_CUSOLVER(cusolverDnSpotrfBatched(c.solver, CUBLAS_FILL_MODE_LOWER, nd,
                                                   ptrs.get() + b0, nd, chol.get() + b0, nb));
    else
      SADDLESCAPE_CUSOLVER(cusolverDnDpotrfBatched(c.solver, CUBLAS_FILL_MODE_LOWER, nd,
                                                   ptrs.get() + b0, nd, chol.get() + b0, nb));
  }

  const double tol = opts.newton.tol > 0 ? opts.newton.tol : default_newton_tolerance<T>(d);
  {
    tf32_scope tf32(c.blas, sizeof(T) == 4 && opts.allow_tf32);
    const auto N = CUBLAS_OP_N;
    for (int it = 1; it <= opts.newton.max_iter; ++it) {
      // The CPU's gemm('N', 'N', X, Tk) and gemm('N', 'N', Tk, M) on the same row-major memory
      // read as column-major: the same products with the same operand order.
      gemm_batched(c.blas, N, N, d, d, d, X, d, dd, Tk, d, dd, W, d, dd, n);
      std::swap(X, W);
      for (int r = 0; r < spec.p; ++r) {  // M <- T^p M; T and M commute
        gemm_batched(c.blas, N, N, d, d, d, Tk, d, dd, M, d, dd, W, d, dd, n);
        std::swap(M, W);
      }
      SADDLESCAPE_CUDA(cudaMemsetAsync(active.get(), 0, sizeof(unsigned int), c.stream));
      newton_step_kernel<T><<<per_block, kThreads, 0, c.stream>>>(
          M, X, xf_buf.get(), Tk, n, d, spec.p, it, tol, state.get(), iters.get(), res.get(),
          first.get(), active.get());
      SADDLESCAPE_LAUNCHED();
      if (copy_to_host(c, active.get(), 1)[0] == 0) break;  // synchronises
    }
  }

  // Verdicts, block by block in the CPU's order: symmetry, Cholesky test, scaling, iteration.
  std::vector<int> st(static_cast<std::size_t>(n)), ch(st.size()), its(st.size());
  std::vector<double> cs(st.size()), rs(st.size());
  const auto get = [&](auto* host, const auto* dev, std::size_t bytes) {
    SADDLESCAPE_CUDA(cudaMemcpyAsync(host, dev, bytes, cudaMemcpyDeviceToHost, c.stream));
  };
  get(st.data(), state.get(), n * sizeof(int));
  get(ch.data(), chol.get(), n * sizeof(int));
  get(its.data(), iters.get(), n * sizeof(int));
  get(cs.data(), scale.get(), n * sizeof(double));
  get(rs.data(), res.get(), n * sizeof(double));
  SADDLESCAPE_CUDA(cudaStreamSynchronize(c.stream));
  for (i64 b = 0; b < n; ++b) {
    const auto i = static_cast<std::size_t>(b);
    if (st[i] == n_converged && ch[i] == 0) continue;
    if (st[i] == n_asymmetric) report_asymmetric(c, G, n, d, b);
    const std::string what = batch_name(n, b);
    const std::vector<T> g = copy_to_host(c, G + b * dd, dd);
    eigen_root<T> eig(d);
    if (ch[i] != 0) {
      eig.factor(g.data(), what);  // throws invalid_argument for a clearly negative eigenvalue
      if (spec.eps == 0.0 && !(eig.eigenvalues()[0] > 0))
        SADDLESCAPE_NUMERICAL_FAIL(what, " is singular: its smallest eigenvalue is within "
                                   "rounding (", clip_tolerance<T>(d) * cs[i], ") of zero and "
                                   "eps = 0; pass eps > 0");
      if (st[i] == n_converged) continue;
    }
    // The CPU's fail(): an eigendecomposition tells invalid input from a numerical failure.
    eig.factor(g.data(), what);
    const auto& lam = eig.eigenvalues();
    const double lmax = std::max(std::abs(double(lam.front())), std::abs(double(lam.back())));
    if (spec.eps == 0.0 && !(lam.front() > clip_tolerance<T>(d) * lmax))
      SADDLESCAPE_NUMERICAL_FAIL(what, " is singular (smallest eigenvalue ", lam.front(),
                                 ") and eps = 0: the Newton iteration cannot converge; pass "
                                 "eps > 0");
    const char* how = st[i] == n_unscaled ? "could not be scaled"
                      : st[i] == n_diverged ? "diverged"
                                            : "did not converge";
    SADDLESCAPE_NUMERICAL_FAIL("the Newton iteration for ", what, " ", how, " after ", its[i],
                               " iterations (residual ",
                               st[i] == n_unscaled ? std::numeric_limits<double>::infinity()
                                                   : rs[i],
                               ", tol ", tol, "); raise max_iter or use an eigensolver method");
  }
  // X is symmetric in exact arithmetic; average away the rounding asymmetry.
  symmetrize<T>(c, xf_buf.get(), A, n, d, T(0), nullptr);
}

// ---------------------------------------------------------------------------------------------

// Checks shared by both entry points; returns the concrete method.
template <class T>
root_method validate(i64 n, i64 d, const root_spec& spec, const root_options& opts) {
  spec.validate();
  opts.newton.validate();
  SADDLESCAPE_EXPECTS(n >= 0, "the batch size must be >= 0, got ", n);
  SADDLESCAPE_EXPECTS(d >= 1, "G must have dimension d >= 1, got d = ", d);
  SADDLESCAPE_EXPECTS(d <= (i64(1) << 31) && n <= (i64(1) << 60) / (d * d),
                      "the batch is too large: n = ", n, ", d = ", d);
  // automatic: Jacobi where syevjBatched applies; the batched solver for batches of moderate
  // blocks, where one Xsyevd per block would be a long queue of small launches; divide and
  // conquer for single or large blocks. The thresholds are untuned until bench/gpu/check.sh
  // has timed every route on a GPU.
  root_method m = opts.method;
  if (m == root_method::automatic)
    m = d <= 32                ? root_method::jacobi
        : n > 1 && d <= 512    ? root_method::batched_qr
                               : root_method::divide_conquer;
  SADDLESCAPE_EXPECTS(m != root_method::jacobi || d <= 32,
                      "method 'jacobi' (cuSOLVER syevjBatched) needs d <= 32, got d = ", d,
                      "; use 'batched_qr' or 'divide_conquer'");
  SADDLESCAPE_EXPECTS(m != root_method::batched_qr || d * d <= INT_MAX,
                      "method 'batched_qr' (cuSOLVER XsyevBatched) needs d * d <= 2^31 - 1, got "
                      "d = ", d, "; use 'divide_conquer'");
  SADDLESCAPE_EXPECTS(m != root_method::newton || spec.form == root_form::inv_sqrt,
                      "method 'newton' computes (G + eps I)^(-1/p) only; form '",
                      to_string(spec.form), "' needs an eigensolver method");
  SADDLESCAPE_EXPECTS(m != root_method::newton || d <= INT_MAX,
                      "method 'newton' needs d <= 2^31 - 1, got d = ", d);
  return m;
}

}  // namespace

template <class T>
void inv_root_batched(context& ctx, const T* G, std::int64_t n, std::int64_t d,
                      const root_spec& spec, const root_options& opts, T* A) {
  const root_method m = validate<T>(n, d, spec, opts);
  if (n == 0) return;
  context::impl& c = detail::enter(ctx);
  detail::expect_device_pointer(G, "G");
  detail::expect_device_pointer(A, "A");
  if (m == root_method::newton) {
    newton_batched<T>(c, G, n, d, spec, opts, A);
  } else {
    factored<T> f = factor_blocks<T>(c, G, n, d, spec, m, true);
    // A = W W^T with W = Q diag(sqrt f) (f >= 0): column j of the column-major Q scaled, then
    // one batched GEMM (N, T). The result is symmetric, so its row-major reading is A itself.
    const unsigned int grid = detail::grid_for(c, n * d * d, kThreads);
    scale_columns_kernel<T><<<grid, kThreads, 0, c.stream>>>(f.q.get(), f.weights.get(), n, d, d);
    SADDLESCAPE_LAUNCHED();
    gemm_batched(c.blas, CUBLAS_OP_N, CUBLAS_OP_T, d, d, d, f.q.get(), d, d * d, f.q.get(), d,
                 d * d, A, d, d * d, n);
    mirror_lower_kernel<T><<<grid, kThreads, 0, c.stream>>>(A, n, d);
    SADDLESCAPE_LAUNCHED();
  }
  const detail::scan_result s = detail::scan(c, A, n * d * d);
  if (s.first_bad >= 0)
    report_overflow(n, s.first_bad, d * d, m == root_method::newton ? "" : " in reconstruction");
}

template <class T>
void inv_root_apply_batched(context& ctx, const T* G, std::int64_t n, std::int64_t d,
                            const T* V, std::int64_t k, const root_spec& spec,
                            const root_options& opts, T* out) {
  const root_method m = validate<T>(n, d, spec, opts);
  SADDLESCAPE_EXPECTS(k >= 0, "V must have >= 0 columns, got k = ", k);
  SADDLESCAPE_EXPECTS(k <= (i64(1) << 31) && n <= (i64(1) << 60) / (d * std::max<i64>(k, 1)),
                      "the batch is too large: n = ", n, ", d = ", d, ", k = ", k);
  if (n == 0) return;
  context::impl& c = detail::enter(ctx);
  detail::expect_device_pointer(G, "G");
  const i64 dk = d * k;
  if (k > 0) {
    detail::expect_device_pointer(V, "V");
    detail::expect_device_pointer(out, "out");
    // Checked first, as the CPU's inv_root_apply does.
    const detail::scan_result s = detail::scan(c, V, n * dk);
    if (s.first_bad >= 0)
      throw invalid_argument(concat("V has a non-finite entry at ",
                                    detail::position(s.first_bad, {n, d, k}), ": ",
                                    copy_to_host(c, V + s.first_bad, 1)[0]));
  }
  // Row-major V_b (d x k) is column-major V_b^T (k x d, ld k); likewise out_b. So
  // out_b^T = V_b^T f(G_b), and on the eigensolver routes V_b^T Q F Q^T.
  const auto N = CUBLAS_OP_N;
  if (m == root_method::newton) {
    device_buffer<T> a(static_cast<std::size_t>(n * d * d), c.stream);
    newton_batched<T>(c, G, n, d, spec, opts, a.get());
    const detail::scan_result s = detail::scan(c, a.get(), n * d * d);
    if (s.first_bad >= 0) report_overflow(n, s.first_bad, d * d, "");
    if (k == 0) return;
    tf32_scope tf32(c.blas, sizeof(T) == 4 && opts.allow_tf32);
    gemm_batched(c.blas, N, N, k, d, d, V, k, dk, a.get(), d, d * d, out, k, dk, n);
  } else {
    factored<T> f = factor_blocks<T>(c, G, n, d, spec, m, false);
    if (k == 0) return;  // the checks above still ran, as on the CPU
    device_buffer<T> tmp(static_cast<std::size_t>(n * dk), c.stream);
    gemm_batched(c.blas, N, N, k, d, d, V, k, dk, f.q.get(), d, d * d, tmp.get(), k, dk, n);
    scale_columns_kernel<T><<<detail::grid_for(c, n * dk, kThreads), kThreads, 0, c.stream>>>(
        tmp.get(), f.weights.get(), n, d, k);  // column j of V^T Q times f_j
    SADDLESCAPE_LAUNCHED();
    gemm_batched(c.blas, N, CUBLAS_OP_T, k, d, d, tmp.get(), k, dk, f.q.get(), d, d * d, out, k,
                 dk, n);
  }
  const detail::scan_result s = detail::scan(c, out, n * dk);
  if (s.first_bad >= 0) report_overflow(n, s.first_bad, dk, nullptr);
}

#define SADDLESCAPE_INSTANTIATE(T)                                                             \
  template void inv_root_batched<T>(context&, const T*, std::int64_t, std::int64_t,            \
                                    const root_spec&, const root_options&, T*);                \
  template void inv_root_apply_batched<T>(context&, const T*, std::int64_t, std::int64_t,      \
                                          const T*, std::int64_t, const root_spec&,            \
                                          const root_options&, T*);

SADDLESCAPE_INSTANTIATE(float)
SADDLESCAPE_INSTANTIATE(double)

}  // namespace saddlescape::cuda
