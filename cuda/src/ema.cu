// Batched EMA updates of full second-moment blocks: G_b <- c G_b + sum_l w_l g_bl g_bl^T.
//
// The kernel is memory-bound for small k: every entry of G is read once and written once, and
// the gradients a tile needs are staged in shared memory, so each g value is read from global
// memory once per tile instead of once per entry.

#include "common.cuh"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace saddlescape::cuda {

namespace {

using detail::concat;

// A tile of G_b is kTileRows x kTileCols entries, computed by kTileCols x kRowGroups threads:
// consecutive threads take consecutive columns (coalesced), each thread kTileRows / kRowGroups
// rows.
constexpr int kTileRows = 32;
constexpr int kTileCols = 64;
constexpr int kRowGroups = 4;
constexpr int kRowsPerThread = kTileRows / kRowGroups;
// Gradient rows staged per pass: 32 x (32 + 64) doubles = 24 KiB of shared memory. Larger k
// loops over chunks of this many rows.
constexpr int kChunk = 32;

// The sums are formed in double for both T: the product g_i g_j of two floats is then exact,
// and the float result is rounded once. For T = double this is the natural precision.
//
// Exact symmetry: entry (i, j) and entry (j, i) are computed by the same operations on the same
// values (g_i g_j is commutative and the l order is fixed), so a symmetric G stays bitwise
// symmetric even though the two entries are computed by different threads.
template <class T>
__global__ void __launch_bounds__(kTileCols* kRowGroups)
    ema_kernel(T* __restrict G, std::int64_t n, std::int64_t d, const T* __restrict gs,
               std::int64_t k, const double* __restrict w, double c) {
  __shared__ double gi[kChunk][kTileRows];
  __shared__ double gj[kChunk][kTileCols];
  __shared__ double wl[kChunk];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int tid = ty * kTileCols + tx;
  const int nthreads = kTileCols * kRowGroups;
  const std::int64_t row_tiles = (d + kTileRows - 1) / kTileRows;
  const std::int64_t col_tiles = (d + kTileCols - 1) / kTileCols;
  const std::int64_t tiles = row_tiles * col_tiles;
  const T tiny = std::numeric_limits<T>::min();

  for (std::int64_t item = blockIdx.x; item < n * tiles; item += gridDim.x) {
    const std::int64_t b = item / tiles;
    const std::int64_t t = item % tiles;
    const std::int64_t i0 = (t / col_tiles) * kTileRows;
    const std::int64_t j0 = (t % col_tiles) * kTileCols;
    const T* g = gs + b * k * d;

    double acc[kRowsPerThread];
    for (int r = 0; r < kRowsPerThread; ++r) acc[r] = 0.0;

    for (std::int64_t l0 = 0; l0 < k; l0 += kChunk) {
      const int kc = static_cast<int>(std::min<std::int64_t>(kChunk, k - l0));
      __syncthreads();  // the previous chunk (or tile) is no longer being read
      for (int e = tid; e < kc * kTileRows; e += nthreads) {
        const int l = e / kTileRows, r = e % kTileRows;
        const std::int64_t i = i0 + r;
        gi[l][r] = i < d ? static_cast<double>(g[(l0 + l) * d + i]) : 0.0;
      }
      for (int e = tid; e < kc * kTileCols; e += nthreads) {
        const int l = e / kTileCols, cidx = e % kTileCols;
        const std::int64_t j = j0 + cidx;
        gj[l][cidx] = j < d ? static_cast<double>(g[(l0 + l) * d + j]) : 0.0;
      }
      if (tid < kc) wl[tid] = w[l0 + tid];
      __syncthreads();
      for (int l = 0; l < kc; ++l) {
        const double wv = wl[l], gjv = gj[l][tx];
        for (int r = 0; r < kRowsPerThread; ++r)
          acc[r] += wv * (gi[l][ty + r * kRowGroups] * gjv);
      }
    }

    const std::int64_t j = j0 + tx;
    if (j < d) {
      for (int r = 0; r < kRowsPerThread; ++r) {
        const std::int64_t i = i0 + ty + r * kRowGroups;
        if (i >= d) break;
        T* p = G + (b * d + i) * d + j;
        const T v = static_cast<T>(c * static_cast<double>(*p) + acc[r]);
        *p = fabs(v) < tiny ? T(0) : v;  // never leave subnormals: as the CPU estimator
      }
    }
  }
}

}  // namespace

template <class T>
void ema_update_batched(context& ctx, T* G, std::int64_t n, std::int64_t d, const T* gs,
                        std::int64_t k, const double* betas) {
  SADDLESCAPE_EXPECTS(n >= 0, "the number of blocks must be >= 0, got n = ", n);
  SADDLESCAPE_EXPECTS(d >= 1, "the block dimension must be >= 1, got d = ", d);
  SADDLESCAPE_EXPECTS(k >= 1, "the number of EMA steps must be >= 1, got k = ", k);
  SADDLESCAPE_EXPECTS(betas != nullptr, "betas is a null pointer");
  for (std::int64_t i = 0; i < k; ++i)
    SADDLESCAPE_EXPECTS(betas[i] >= 0.0 && betas[i] < 1.0, "beta must be in [0, 1), got betas[",
                        i, "] = ", betas[i]);
  // Sizes are products of these; keep every index of n * d * d and n * k * d inside int64.
  constexpr std::int64_t limit = std::int64_t(1) << 62;
  SADDLESCAPE_EXPECTS(d <= (std::int64_t(1) << 31) && n <= limit / (d * d) &&
                          k <= limit / d && n <= limit / (k * d),
                      "the batch is too large: n = ", n, ", d = ", d, ", k = ", k);
  if (n == 0) return;
  context::impl& c = detail::enter(ctx);
  detail::expect_device_pointer(G, "G");
  detail::expect_device_pointer(gs, "gs");

  // Checked before anything is written, so that a bad gradient leaves G as it was.
  const detail::scan_result s = detail::scan(c, gs, n * k * d);
  if (s.first_bad >= 0) {
    T bad{};
    SADDLESCAPE_CUDA(cudaMemcpyAsync(&bad, gs + s.first_bad, sizeof(T), cudaMemcpyDeviceToHost,
                                     c.stream));
    SADDLESCAPE_CUDA(cudaStreamSynchronize(c.stream));
    throw invalid_argument(concat("gs has a non-finite entry at ",
                                  detail::position(s.first_bad, {n, k, d}), ": ", bad,
                                  "; G is unchanged"));
  }
  // w_l <= 1 - beta_l <= 1 and c + sum_l w_l = 1: each new entry is a convex combination of
  // the old entry and the products g_i g_j, so it cannot overflow when max|g|^2 does not (up
  // to the last rounding of a value within an ulp of the largest finite T).
  if (!(s.max_abs * s.max_abs <= static_cast<double>(std::numeric_limits<T>::max())))
    SADDLESCAPE_NUMERICAL_FAIL("g g^T would overflow ", saddlescape::detail::type_name<T>(),
                               ": max|gs| = ", s.max_abs, "; G is unchanged");

  // w_l = (1 - beta_l) prod_(j > l) beta_j by suffix products, in double, as the CPU does.
  std::vector<double> w(static_cast<std::size_t>(k));
  double suffix = 1.0;
  for (std::int64_t l = k - 1; l >= 0; --l) {
    w[static_cast<std::size_t>(l)] = (1.0 - betas[l]) * suffix;
    suffix *= betas[l];
  }
  detail::device_buffer<double> dw(w.size(), c.stream);
  // From pageable memory the copy is staged before cudaMemcpyAsync returns, so w may go.
  dw.upload(w.data(), w.size());

  const std::int64_t tiles =
      ((d + kTileRows - 1) / kTileRows) * ((d + kTileCols - 1) / kTileCols);
  const unsigned int grid =
      static_cast<unsigned int>(std::min<std::int64_t>(n * tiles, std::int64_t(1) << 20));
  ema_kernel<T><<<grid, dim3(kTileCols, kRowGroups), 0, c.stream>>>(G, n, d, gs, k, dw.get(),
                                                                    suffix);
  SADDLESCAPE_LAUNCHED();
}

template void ema_update_batched<float>(context&, float*, std::int64_t, std::int64_t,
                                        const float*, std::int64_t, const double*);
template void ema_update_batched<double>(context&, double*, std::int64_t, std::int64_t,
                                         const double*, std::int64_t, const double*);

}  // namespace saddlescape::cuda
