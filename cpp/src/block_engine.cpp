#include <saddlescape/block_engine.hpp>

#include "checks.hpp"
#include "lapack.hpp"
#include "lowrank.hpp"
#include "memory.hpp"
#include "parallel.hpp"

#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>

namespace saddlescape {

using detail::concat;

namespace {

// The refresh period of the lowrank representation: its per-step cost grows like its square.
constexpr std::int64_t max_period = 256;

// Counters per block in a saved state, now and before the fallback counters.
constexpr std::size_t counters = 10, counters_v1 = 5;

using detail::physical_memory;

double beta_value(const schedule& beta, std::int64_t t) {
  const double b = beta(t);
  SADDLESCAPE_EXPECTS(b >= 0.0 && b < 1.0, "beta must be in [0, 1), got beta_", t, " = ", b,
                      " from ", beta.describe());
  return b;
}

// The spectral function of a refreshed block, for one eigenvalue (already bias-corrected).
double root_value(double lambda, root_form form, double eps) {
  return form == root_form::adam ? 1.0 / (std::sqrt(lambda) + eps) : 1.0 / std::sqrt(lambda + eps);
}

// Buffers of range_refresh, reused across calls (grown, never shrunk).
struct range_workspace {
  std::vector<double> N, C, tau, W, Tm, X, X2, Z, S, M, lam, work;
  std::vector<int> iwork;
};

}  // namespace

template <class T>
struct block_engine<T>::block {
  index_t n = 0, off = 0;
  std::vector<T> S, V;        // column-major n x n: estimate at the refresh (lower), eigenbasis
  std::vector<double> lambda;  // eigenvalues of S
  std::vector<T> H, U;         // rows: gradients since the refresh, and V^T of them
  std::vector<double> w;       // their weights
  double gamma = 1.0;          // decay of S since the refresh
  std::int64_t k = 0, since = 0;
  std::int64_t refreshes = 0, warm = 0, fallbacks = 0;
  // The fallback policy's counters (saved), and the test hook's injected failures (not saved).
  std::int64_t failed = 0, retried64 = 0, retried_eps = 0, kept = 0, consecutive = 0;
  std::int64_t inject_attempts = 0;
  int inject_stages = 0;
};

// A refreshed block's new factorisation, committed only when every block succeeded.
template <class T>
struct block_engine<T>::job {
  bool refresh = false, warm_ok = false, fell_back = false;
  bool primary_failed = false;
  int stage = 0;  // the fallback that produced the factorisation: 0 none, 1 float64, 2 eps, 3 kept
  std::vector<T> S, V;
  std::vector<double> lambda;
};

template <class T>
struct block_engine<T>::scratch {
  detail::lowrank_workspace lowrank;
  std::vector<double> D, Q, y, z, M, Vd, dwork;
  std::vector<T> yt, zt, rows, work;
  std::vector<int> iwork;
  range_workspace range;
};

template <class T>
block_engine<T>::~block_engine() = default;
template <class T>
block_engine<T>::block_engine(block_engine&&) noexcept = default;
template <class T>
block_engine<T>& block_engine<T>::operator=(block_engine&&) noexcept = default;

template <class T>
std::size_t block_engine<T>::memory_bytes_for(const std::vector<index_t>& sizes,
                                              std::int64_t refresh_every) {
  // In double, so that absurd sizes cannot wrap around.
  double bytes = 0.0, largest = 0.0;
  const double r = static_cast<double>(refresh_every);
  for (const index_t b : sizes) {
    const double n = static_cast<double>(b);
    bytes += (2.0 * n * n + 2.0 * r * n) * sizeof(T) + (n + r) * sizeof(double);
    largest = std::max(largest, n);
  }
  // Refresh buffers for the blocks one step refactors, and one thread's workspace (the range
  // refresh's double copies of S, V's null part and the rotated columns: up to 5 B^2).
  const double refreshing = std::ceil(static_cast<double>(sizes.size()) / r);
  bytes += refreshing * (2.0 * largest * largest * sizeof(T) + largest * sizeof(double));
  bytes += 9.0 * largest * largest * sizeof(double);
  return bytes >= 1.8e19 ? std::numeric_limits<std::size_t>::max()
                         : static_cast<std::size_t>(bytes);
}

template <class T>
std::size_t block_engine<T>::memory_bytes() const noexcept {
  return memory_bytes_for(sizes_, opts_.refresh_every);
}

template <class T>
block_engine<T>::block_engine(std::vector<index_t> block_sizes, schedule_ptr beta,
                              block_engine_options opts)
    : sizes_(std::move(block_sizes)), beta_(std::move(beta)), opts_(opts) {
  SADDLESCAPE_EXPECTS(!sizes_.empty(), "block_sizes must not be empty");
  for (std::size_t i = 0; i < sizes_.size(); ++i) {
    SADDLESCAPE_EXPECTS(sizes_[i] >= 1, "block sizes must be >= 1, got block_sizes[", i, "] = ",
                        sizes_[i]);
    SADDLESCAPE_EXPECTS(sizes_[i] <= 32766, "block sizes must be <= 32766 (32-bit LAPACK), got "
                        "block_sizes[", i, "] = ", sizes_[i]);
    offsets_.push_back(dim_);
    dim_ += sizes_[i];
  }
  SADDLESCAPE_EXPECTS(dim_ <= detail::lapack::max_dim, "the block sizes sum to ", dim_,
                      ", too many entries for 32-bit BLAS");
  SADDLESCAPE_EXPECTS(beta_ != nullptr, "beta must be a number in [0, 1) or a schedule");
  if (auto c = std::dynamic_pointer_cast<const constant_schedule>(beta_))
    SADDLESCAPE_EXPECTS(c->value() >= 0 && c->value() < 1, "beta must be in [0, 1), got ",
                        c->value());
  SADDLESCAPE_EXPECTS(std::isfinite(opts_.eps) && opts_.eps > 0.0,
                      "eps must be finite and > 0, got ", opts_.eps);
  SADDLESCAPE_EXPECTS(opts_.refresh_every >= 1 && opts_.refresh_every <= max_period,
                      "refresh_every must be in [1, ", max_period, "] (the cost of a step grows "
                      "like its square), got ", opts_.refresh_every);
  SADDLESCAPE_EXPECTS(opts_.tol == 0.0 || (std::isfinite(opts_.tol) && opts_.tol >= 1e-15 &&
                                           opts_.tol < 1.0),
                      "tol must be in [1e-15, 1) (or 0 for the default), got ", opts_.tol);
  SADDLESCAPE_EXPECTS(opts_.max_consecutive_failures >= 1, "max_consecutive_failures must be "
                      ">= 1, got ", opts_.max_consecutive_failures);
  SADDLESCAPE_EXPECTS(std::isfinite(opts_.fallback_eps) && opts_.fallback_eps >= 0.0,
                      "fallback_eps must be finite and >= 0, got ", opts_.fallback_eps);
  tol_ = opts_.tol > 0 ? opts_.tol : (sizeof(T) == 4 ? 1e-6 : 1e-10);

  const std::size_t need = memory_bytes();
  const std::size_t have = physical_memory();
  if (need > have)
    throw invalid_argument(concat("the block engine needs ", need, " bytes (",
                                  static_cast<double>(need) / 1073741824.0, " GiB) for ",
                                  sizes_.size(), " blocks of up to ",
                                  *std::max_element(sizes_.begin(), sizes_.end()),
                                  " entries with refresh_every = ", opts_.refresh_every,
                                  ", more than this machine's ", have, " bytes of memory"));
  const auto R = static_cast<std::size_t>(opts_.refresh_every);
  try {
    blocks_.resize(sizes_.size());
    for (std::size_t b = 0; b < sizes_.size(); ++b) {
      block& blk = blocks_[b];
      const auto n = static_cast<std::size_t>(sizes_[b]);
      blk.n = sizes_[b];
      blk.off = offsets_[b];
      blk.S.assign(n * n, T(0));
      blk.V.assign(n * n, T(0));
      for (std::size_t i = 0; i < n; ++i) blk.V[i * n + i] = T(1);  // G_ref = 0: any basis
      blk.lambda.assign(n, 0.0);
      blk.H.assign(R * n, T(0));
      blk.U.assign(R * n, T(0));
      blk.w.assign(R, 0.0);
      // Staggered: block b acts as if refreshed b mod R updates ago.
      blk.since = static_cast<std::int64_t>(b % R);
    }
  } catch (const std::bad_alloc&) {
    throw out_of_memory(concat("the block engine could not allocate its ", need, " bytes"));
  }
}

template <class T>
index_t block_engine<T>::estimate_size() const noexcept {
  index_t s = 0;
  for (const index_t n : sizes_) s += n * n;
  return s;
}

template <class T>
void block_engine<T>::set_beta(schedule_ptr beta) {
  SADDLESCAPE_EXPECTS(beta != nullptr, "block_engine: beta must be a schedule");
  beta_ = std::move(beta);
}

template <class T>
std::vector<double> block_engine<T>::betas_for(index_t k) const {
  std::vector<double> b(static_cast<std::size_t>(k));
  for (index_t i = 0; i < k; ++i) b[i] = beta_value(*beta_, updates_ + i);
  return b;
}

namespace {

// Cyclic Jacobi on the symmetric row-major n x n M (in double), rotating the columns of the
// column-major V along. Returns whether every off-diagonal entry fell below `thresh` within
// `max_sweeps` sweeps; stops early (false) when a sweep does not shrink the off-diagonal mass by
// at least `min_gain`, the sign that a cold syevd would be cheaper.
template <class T>
bool jacobi(double* M, index_t n, T* V, double thresh, int max_sweeps, double min_gain) {
  // A sweep costs about as much as a cold syevd (6 n flops per rotation, n^2 / 2 rotations),
  // so the warm start pays only when few entries need rotating: with more than n of them it
  // gives up at once, having spent only this O(n^2) count.
  index_t large = 0;
  for (index_t p = 0; p < n; ++p)
    for (index_t q = p + 1; q < n; ++q) large += std::abs(M[p * n + q]) > thresh ? 1 : 0;
  if (large > n) return false;
  double prev = std::numeric_limits<double>::infinity();
  for (int sweep = 0; sweep <= max_sweeps; ++sweep) {
    double off = 0.0, worst = 0.0;
    for (index_t p = 0; p < n; ++p)
      for (index_t q = p + 1; q < n; ++q) {
        const double a = std::abs(M[p * n + q]);
        off += a * a;
        worst = std::max(worst, a);
      }
    if (worst <= thresh) return true;
    if (sweep == max_sweeps || off > min_gain * prev) return false;
    prev = off;
    for (index_t p = 0; p < n; ++p)
      for (index_t q = p + 1; q < n; ++q) {
        const double apq = M[p * n + q];
        if (std::abs(apq) <= thresh) continue;
        const double theta = (M[q * n + q] - M[p * n + p]) / (2.0 * apq);
        const double t = (theta >= 0 ? 1.0 : -1.0) / (std::abs(theta) + std::sqrt(theta * theta + 1.0));
        const double c = 1.0 / std::sqrt(t * t + 1.0), s = t * c;
        const double app = M[p * n + p], aqq = M[q * n + q];
        double* mp = M + p * n;
        double* mq = M + q * n;
        for (index_t r = 0; r < n; ++r) {  // rows p and q
          const double x = mp[r], y = mq[r];
          mp[r] = c * x - s * y;
          mq[r] = s * x + c * y;
        }
        for (index_t r = 0; r < n; ++r) {  // columns p and q, from the rows (symmetry)
          M[r * n + p] = mp[r];
          M[r * n + q] = mq[r];
        }
        // The 2 x 2 core, which the row pass alone gets wrong: the rotation annihilates M_pq.
        M[p * n + p] = app - t * apq;
        M[q * n + q] = aqq + t * apq;
        M[p * n + q] = M[q * n + p] = 0.0;
        T* vp = V + p * n;
        T* vq = V + q * n;
        const T cc = static_cast<T>(c), ss = static_cast<T>(s);
        for (index_t r = 0; r < n; ++r) {
          const T x = vp[r], y = vq[r];
          vp[r] = cc * x - ss * y;
          vq[r] = ss * x + cc * y;
        }
      }
  }
  return false;
}

// How often, among a block's successful refactorisations, one is a cold syevd even when the
// range refresh applies. The range refresh takes its null space from the previous basis, so
// the basis's loss of orthogonality (one rounding to T per refresh) would grow with the number
// of range refreshes in a row; a cold one every range_period bounds it, at 1 / range_period of
// a cold refactorisation per refresh.
constexpr std::int64_t range_period = 16;

// The largest rank m for which the range refresh is taken: 0.6 n in float32 and 0.7 n in
// float64, below where it stops beating a cold syevd of n x n (between 0.625 and 0.75 n in
// float32, 0.75 and 0.875 n in float64, at n = 64 to 512), measured with a build that took it at
// every m (its O(n^2 m) products run in double, against a float32 syevd in the float32 engine);
// bench/python/bench_blocks.py --only range times it up to these thresholds.
template <class T>
index_t range_max_m(index_t n) {
  return sizeof(T) == 4 ? (3 * n) / 5 : (7 * n) / 10;
}

// The range refresh of a rank-deficient block: the factorisation of the new estimate S (n x n,
// column-major lower triangle) in O(n^2 m + m^3 + n p k) instead of syevd's O(n^3), where p is
// the dimension of the previous factorisation's null space (its eigenvalues that were zero,
// which come first in V), k the gradients folded in since, and m = (n - p) + min(k, p) the
// rank S can have.
//
// In V's basis S = V (c diag(lambda) + Y Y^T) V^T with Y = V^T [sqrt(w_i) h_i] (n x k,
// column-major). Householder reflectors H = I - W T W^T (compact WY, T upper triangular) turn
// Y's null rows into [R; 0] with R of min(k, p) rows, so the m columns Z = [(V_n H)[:, :min(k,p)],
// V_r] span S's range and the other p - min(k, p) columns of V_n H its null space. Rayleigh-Ritz
// on Z with S itself (M = Z^T S Z, m x m) gives the new eigenpairs; taking M from the previous
// factorisation instead would be cheaper but carries its rounding from one refresh to the next
// (measured: errors growing 4x over 16 range refreshes in float32). The null columns keep the
// eigenvalue 0, as a dense eigensolver's eigenvalues below its rounding are zeroed.
// Computed in double, the basis rounded to T once. Writes V_out (column-major, eigenvalues
// ascending) and lam_out; returns false, having written nothing, when there is no null space
// to exploit (m above max_m) or M's eigensolver fails, and the caller then refactors S cold.
template <class T>
bool range_refresh(const T* V, const double* lambda, const T* S, index_t n, const double* Y,
                   index_t k, index_t max_m, T* V_out, double* lam_out, range_workspace& w) {
  index_t p = 0;
  while (p < n && lambda[p] == 0.0) ++p;
  for (index_t j = p; j < n; ++j)
    if (!(lambda[j] > 0.0)) return false;  // not the ascending spectrum of a factorisation
  const index_t r = n - p, kp = std::min(k, p), m = r + kp;
  if (m > max_m || m == 0) return false;
  auto fit = [](std::vector<double>& v, index_t size) {
    detail::lowrank_workspace::fit(v, static_cast<std::size_t>(size));
  };
  const int ni = static_cast<int>(n), pi = static_cast<int>(p), ki = static_cast<int>(kp);
  fit(w.C, std::max<index_t>(p * k, 1));
  fit(w.N, std::max<index_t>(n * p, 1));
  double* C = w.C.data();
  double* N = w.N.data();
  for (index_t a = 0; a < k; ++a)
    for (index_t i = 0; i < p; ++i) C[a * p + i] = Y[a * n + i];
  for (index_t i = 0; i < n * p; ++i) N[i] = double(V[i]);  // the first p columns: V_n

  if (kp > 0) {
    // Householder QR of the null rows C (p x k), the reflectors stored below the diagonal.
    fit(w.tau, kp);
    detail::householder_qr(C, p, k, w.tau.data());
    // W (p x kp, unit lower trapezoidal) and T with H_0 ... H_(kp-1) = I - W T W^T.
    fit(w.W, p * kp);
    fit(w.Tm, kp * kp);
    double* Wm = w.W.data();
    double* Tm = w.Tm.data();
    for (index_t j = 0; j < kp; ++j)
      for (index_t i = 0; i < p; ++i)
        Wm[j * p + i] = i < j ? 0.0 : (i == j ? 1.0 : C[j * p + i]);
    std::fill(Tm, Tm + kp * kp, 0.0);
    for (index_t j = 0; j < kp; ++j) {
      Tm[j * kp + j] = w.tau[j];
      if (j == 0 || w.tau[j] == 0.0) continue;
      // T[0:j, j] = -tau_j T[0:j, 0:j] (W[:, 0:j]^T w_j)
      double* col = Tm + j * kp;
      for (index_t a = 0; a < j; ++a) {
        double s = 0.0;
        for (index_t i = j; i < p; ++i) s += Wm[a * p + i] * Wm[j * p + i];
        col[a] = s;
      }
      for (index_t a = 0; a < j; ++a) {
        double s = 0.0;
        for (index_t b = a; b < j; ++b) s += Tm[b * kp + a] * col[b];
        col[a] = -w.tau[j] * s;  // a ascends: col[b], b >= a, still holds W^T w_j
      }
    }
    // V_n <- V_n (I - W T W^T) = V_n - ((V_n W) T) W^T, three matrix products.
    fit(w.X, n * kp);
    fit(w.X2, n * kp);
    detail::lapack::gemm('N', 'N', ni, ki, pi, 1.0, N, ni, Wm, pi, 0.0, w.X.data(), ni);
    detail::lapack::gemm('N', 'N', ni, ki, ki, 1.0, w.X.data(), ni, Tm, ki, 0.0, w.X2.data(), ni);
    detail::lapack::gemm('N', 'T', ni, pi, ki, -1.0, w.X2.data(), ni, Wm, pi, 1.0, N, ni);
  }

  // Z = [N[:, 0:kp], V_r] spans every direction the new estimate can have, and M = Z^T S Z
  // (Rayleigh-Ritz with the stored S, not with the previous factorisation, whose rounding
  // would otherwise carry over from one range refresh to the next).
  const int mi = static_cast<int>(m);
  fit(w.Z, n * m);
  double* Z = w.Z.data();
  std::copy(N, N + n * kp, Z);
  for (index_t i = 0; i < n * r; ++i) Z[n * kp + i] = double(V[n * p + i]);
  fit(w.S, n * n);
  double* Sd = w.S.data();
  for (index_t j = 0; j < n; ++j)
    for (index_t i = j; i < n; ++i) Sd[i + j * n] = Sd[j + i * n] = double(S[i + j * n]);
  fit(w.X2, n * m);
  detail::lapack::gemm('N', 'N', ni, mi, ni, 1.0, Sd, ni, Z, ni, 0.0, w.X2.data(), ni);
  fit(w.M, m * m);
  double* M = w.M.data();
  detail::lapack::gemm('T', 'N', mi, mi, ni, 1.0, Z, ni, w.X2.data(), ni, 0.0, M, mi);
  fit(w.lam, m);
  fit(w.work, static_cast<std::size_t>(detail::lapack::syevd_lwork(mi)));
  if (w.iwork.size() < static_cast<std::size_t>(detail::lapack::syevd_liwork(mi)))
    w.iwork.resize(static_cast<std::size_t>(detail::lapack::syevd_liwork(mi)));
  // The sizes for this m, not the buffers' (see detail::lapack::syevd_lwork).
  const int info = detail::lapack::syevd('V', mi, M, w.lam.data(), w.work.data(),
                                         detail::lapack::syevd_lwork(mi), w.iwork.data(),
                                         detail::lapack::syevd_liwork(mi));
  if (info != 0) return false;
  for (index_t j = 0; j < m; ++j)
    if (!std::isfinite(w.lam[j])) return false;

  // V_out = [N[:, kp:p], Z Q].
  detail::lapack::gemm('N', 'N', ni, mi, mi, 1.0, Z, ni, M, mi, 0.0, w.X2.data(), ni);
  const index_t nul = p - kp;
  for (index_t i = 0; i < n * nul; ++i) V_out[i] = static_cast<T>(N[n * kp + i]);
  for (index_t i = 0; i < n * m; ++i) V_out[n * nul + i] = static_cast<T>(w.X2[i]);
  for (index_t j = 0; j < nul; ++j) lam_out[j] = 0.0;
  for (index_t j = 0; j < m; ++j) lam_out[nul + j] = w.lam[j];
  return true;
}

}  // namespace

template <class T>
void block_engine<T>::run(const T* gs, index_t kin, const T* v, T* out, bool commit,
                          int force_refresh, bool warm) {
  const std::int64_t R = opts_.refresh_every;
  const std::vector<double> betas = betas_for(kin);
  // decay of the old state, and the weights of the incoming rows
  double decay = 1.0;
  std::vector<double> win(static_cast<std::size_t>(kin));
  for (index_t i = kin - 1; i >= 0; --i) {
    win[i] = (1.0 - betas[i]) * decay;
    decay *= betas[i];
  }
  const double product = beta_product_ * decay;
  const std::int64_t updates = updates_ + kin;
  const double corr = opts_.bias_correction && updates > 0 ? 1.0 / (1.0 - product) : 1.0;
  const root_form form = opts_.form;
  const double eps = opts_.eps;
  const double tmax = static_cast<double>(std::numeric_limits<T>::max());

  // Input checks before anything changes: finite gradients whose squares, summed over a block,
  // stay far from T's overflow; the same for v's direction.
  if (kin > 0) {
    detail::check_finite(gs, kin, dim_, kin == 1 ? "g" : "gs", kin == 1);
    double gmax = 0.0;
    for (index_t i = 0; i < kin * dim_; ++i) gmax = std::max(gmax, std::abs(double(gs[i])));
    const index_t largest = *std::max_element(sizes_.begin(), sizes_.end());
    if (!(gmax * gmax * static_cast<double>(largest) * corr <= 0.25 * tmax))
      SADDLESCAPE_NUMERICAL_FAIL("max|g| = ", gmax, " is too large: the block estimates would "
                                 "overflow ", detail::type_name<T>(), "; nothing was changed");
  }
  if (v) {
    detail::check_finite(v, 1, dim_, "v", true);
    double vmax = 0.0;
    for (index_t i = 0; i < dim_; ++i) vmax = std::max(vmax, std::abs(double(v[i])));
    const double fmax = form == root_form::adam ? 1.0 / eps : 1.0 / std::sqrt(eps);
    if (!(vmax * fmax * std::sqrt(static_cast<double>(dim_)) < tmax))
      SADDLESCAPE_NUMERICAL_FAIL("the direction of a vector with max|v| = ", vmax, " and eps = ",
                                 eps, " could overflow ", detail::type_name<T>(),
                                 "; nothing was changed");
  }

  const auto nb = static_cast<index_t>(blocks_.size());
  std::vector<job> jobs(static_cast<std::size_t>(nb));
  for (index_t b = 0; b < nb; ++b)
    jobs[b].refresh = force_refresh == -2 ? false
                      : (force_refresh == -1 || force_refresh == b)
                          ? true
                          : (kin > 0 && blocks_[b].since + kin >= R);
  // Order: refreshes first, largest first, so that the long tasks start early.
  std::vector<index_t> order(static_cast<std::size_t>(nb));
  std::iota(order.begin(), order.end(), index_t(0));
  std::stable_sort(order.begin(), order.end(), [&](index_t a, index_t b) {
    if (jobs[a].refresh != jobs[b].refresh) return jobs[a].refresh;
    return sizes_[a] > sizes_[b];
  });
  double work = 0.0;
  for (index_t b = 0; b < nb; ++b) {
    const double n = static_cast<double>(sizes_[b]);
    work += jobs[b].refresh ? 10.0 * n * n * n : (v ? 40.0 * n * n : n * kin);
  }
  const unsigned threads = work < 4e5 ? 1u : detail::pass_threads();
  const unsigned used = static_cast<unsigned>(std::min<index_t>(threads, nb));
  while (scratch_.size() < used) scratch_.push_back(std::make_unique<scratch>());
  // Refreshes write into spare buffers, which trade places with the block's on commit.
  for (index_t b = 0; b < nb; ++b)
    if (jobs[b].refresh && !spares_.empty()) {
      jobs[b].S = std::move(spares_.back().S);
      jobs[b].V = std::move(spares_.back().V);
      spares_.pop_back();
    }
  // The pool keeps the buffers of the refreshes one staggered step makes (what memory_bytes()
  // counts). Refreshes decided inside a task (an unstable low-rank update) or beyond the
  // stagger (update_batch with many rows) bring buffers of their own, which are freed here:
  // returned to the pool, they grew it by a pair per such refresh, every call, without bound.
  struct return_spares {
    std::vector<job>& jobs;
    std::vector<job>& pool;
    std::size_t cap;
    ~return_spares() {
      for (job& j : jobs)
        if (j.refresh && pool.size() < cap) {
          pool.emplace_back();
          pool.back().S = std::move(j.S);
          pool.back().V = std::move(j.V);
        }
    }
  } give_back{jobs, spares_, static_cast<std::size_t>((nb + R - 1) / R)};

  auto task = [&](std::ptrdiff_t t, unsigned me) {
    scratch& sc = *scratch_[me];
    const index_t b = order[t];
    const block& blk = blocks_[b];
    job& jb = jobs[b];
    const index_t n = blk.n;
    const int ni = static_cast<int>(n);
    const auto nn = static_cast<std::size_t>(n);
    auto name = [&] { return nb == 1 ? std::string("the estimate") : concat("block ", b); };
    auto fit = [](auto& buf, std::size_t size) {
      if (buf.size() < size) buf.resize(size);
    };
    fit(sc.y, nn);
    fit(sc.z, nn);
    fit(sc.yt, nn);
    fit(sc.zt, nn);
    const T* gb = gs ? gs + blk.off : nullptr;

    const index_t rows = blk.k + kin;
    const double g = corr * decay * blk.gamma;
    double null_floor = 0.0;  // set with the lowrank operands
    if (!jb.refresh && v) {
      // The lowrank operands, in V's basis: D = g lambda (+ eps), Q's columns sqrt(w_i) u_i.
      fit(sc.D, nn);
      fit(sc.Q, static_cast<std::size_t>(rows) * nn);
      for (index_t j = 0; j < n; ++j)
        sc.D[j] = g * blk.lambda[j] + (form == root_form::inv_sqrt ? eps : 0.0);
      auto& hb = const_cast<block&>(blk);  // rows k.. are unused until commit
      for (index_t i = 0; i < rows; ++i) {
        if (i >= blk.k) {
          T* h = hb.H.data() + i * n;
          std::copy(gb + (i - blk.k) * dim_, gb + (i - blk.k) * dim_ + n, h);
          detail::lapack::gemv('T', ni, ni, T(1), blk.V.data(), ni, h, T(0), hb.U.data() + i * n);
        }
        const double r = std::sqrt(corr * (i < blk.k ? decay * blk.w[i] : win[i - blk.k]));
        for (index_t j = 0; j < n; ++j) sc.Q[i * n + j] = r * double(blk.U[i * n + j]);
      }
      // Null components of the new rows as small as the rounding of V^T h in T (relative
      // n u) are noise, which the adam form's split drops instead of bordering with it.
      if (form == root_form::adam) {
        double q2 = 0.0;
        for (index_t i = 0; i < rows * n; ++i) q2 += sc.Q[i] * sc.Q[i];
        const double nu =
            static_cast<double>(n) * static_cast<double>(std::numeric_limits<T>::epsilon());
        null_floor = nu * nu * q2;
      }
      if (!detail::lowrank_stable(sc.D.data(), n, sc.Q.data(), rows, form, eps, tol_, null_floor,
                                  sc.lowrank))
        jb.refresh = true;  // refactored exactly instead (counted as a refresh)
    }
    if (jb.refresh) {
      // S_new = decay (gamma S + sum w_i h_i h_i^T) + sum win_j g_j g_j^T, lower triangle.
      fit(jb.S, nn * nn);
      fit(jb.V, nn * nn);
      jb.lambda.assign(nn, 0.0);
      const T sg = static_cast<T>(decay * blk.gamma);
      // The upper triangle is never read, but it is saved: zero, so that a state does not
      // depend on what this scratch buffer held before (an engine and its reload then agree).
      for (index_t j = 0; j < n; ++j) {
        for (index_t i = 0; i < j; ++i) jb.S[i + j * n] = T(0);
        for (index_t i = j; i < n; ++i) jb.S[i + j * n] = sg * blk.S[i + j * n];
      }
      fit(sc.rows, static_cast<std::size_t>(rows) * nn);
      for (index_t i = 0; i < blk.k; ++i) {
        const T r = static_cast<T>(std::sqrt(decay * blk.w[i]));
        for (index_t j = 0; j < n; ++j) sc.rows[i * n + j] = r * blk.H[i * n + j];
      }
      for (index_t i = 0; i < kin; ++i) {
        const T r = static_cast<T>(std::sqrt(win[i]));
        for (index_t j = 0; j < n; ++j) sc.rows[(blk.k + i) * n + j] = r * gb[i * dim_ + j];
      }
      if (rows > 0)
        detail::lapack::syrk_lower(ni, static_cast<int>(rows), T(1), sc.rows.data(), ni, T(1),
                                   jb.S.data(), ni);
      double lmax = 0.0;
      for (index_t j = 0; j < n; ++j) lmax = std::max(lmax, std::abs(double(jb.S[j + j * n])));
      // The fallback policy (block_engine.hpp). `injected(stage)`: the test hook fails it.
      auto injected = [&](int stage) {
        return blk.inject_attempts > 0 && stage < blk.inject_stages;
      };
      // Q = the rows since the refresh in V's basis, V^T [sqrt(w_i) h_i] (n x rows, double):
      // V^T S_new V = decay gamma Lambda + Q Q^T, what both refreshes from V start with.
      // Q's rows in V's basis, formed once per refresh (the range refresh and the Jacobi warm
      // start both read them, and neither changes V, U or the gradients).
      bool have_rows = false;
      auto rotated_rows = [&] {
        if (have_rows) return;
        have_rows = true;
        fit(sc.Q, static_cast<std::size_t>(rows) * nn);
        for (index_t i = 0; i < blk.k; ++i) {
          const double r = std::sqrt(decay * blk.w[i]);
          for (index_t j = 0; j < n; ++j) sc.Q[i * n + j] = r * double(blk.U[i * n + j]);
        }
        for (index_t i = 0; i < kin; ++i) {
          for (index_t j = 0; j < n; ++j) sc.yt[j] = gb[i * dim_ + j];
          detail::lapack::gemv('T', ni, ni, T(1), blk.V.data(), ni, sc.yt.data(), T(0),
                               sc.zt.data());
          const double r = std::sqrt(win[i]);
          for (index_t j = 0; j < n; ++j) sc.Q[(blk.k + i) * n + j] = r * double(sc.zt[j]);
        }
      };
      jb.warm_ok = false;
      // The range refresh (a rank-deficient block) takes the columns of V whose lambda is 0 as
      // the last estimate's null space: true after an exact factorisation, not trusted after a
      // kept basis (Rayleigh quotients of a stale basis) or a retry with fallback_eps
      // (eigenvalues of a shifted estimate). Every range_period-th refresh of a block is cold,
      // staggered across blocks like the refreshes themselves, so that blocks refactoring at
      // every step (the adam form's singular ones) do not all go cold in the same step.
      if (warm && !injected(0) && blk.consecutive == 0 && blk.retried_eps == 0 &&
          (blk.refreshes + b) % range_period != range_period - 1) {
        rotated_rows();
        jb.warm_ok = range_refresh(blk.V.data(), blk.lambda.data(), jb.S.data(), n,
                                   sc.Q.data(), rows, range_max_m<T>(n), jb.V.data(),
                                   jb.lambda.data(), sc.range);
      }
      if (!jb.warm_ok && warm && opts_.warm_start && blk.refreshes > 0 && n > 1) {
        // V^T S_new V = decay gamma Lambda + sum of the rank-1 terms in V's basis.
        fit(sc.M, nn * nn);
        double* M = sc.M.data();
        std::fill(M, M + nn * nn, 0.0);
        for (index_t j = 0; j < n; ++j) M[j * n + j] = decay * blk.gamma * blk.lambda[j];
        rotated_rows();
        if (rows > 0)
          detail::lapack::syrk_lower(ni, static_cast<int>(rows), 1.0, sc.Q.data(), ni, 1.0, M, ni);
        // syrk filled the column-major lower triangle, which is the row-major upper one.
        for (index_t j = 0; j < n; ++j)
          for (index_t i = j + 1; i < n; ++i) M[i * n + j] = M[j * n + i];
        // Converged when the rotations left are below the eigensolver's own rounding.
        const double u = static_cast<double>(std::numeric_limits<T>::epsilon());
        // The rotations accumulate in double: thousands of them in float32 would cost V its
        // orthogonality.
        fit(sc.Vd, nn * nn);
        std::copy(blk.V.begin(), blk.V.begin() + nn * nn, sc.Vd.begin());
        if (jacobi(M, n, sc.Vd.data(), 4.0 * u * std::max(lmax, 1e-300), 6, 0.25)) {
          for (index_t j = 0; j < n; ++j) jb.lambda[j] = M[j * n + j];
          std::copy(sc.Vd.begin(), sc.Vd.begin() + nn * nn, jb.V.begin());
          jb.warm_ok = true;
        } else {
          jb.fell_back = true;
        }
      }
      auto finite_lambda = [&] {
        for (index_t j = 0; j < n; ++j)
          if (!std::isfinite(jb.lambda[j])) return false;
        return true;
      };
      int info = 0;
      bool ok = jb.warm_ok;
      if (!ok) {
        if (injected(0)) {
          info = -1000;  // what the hook reports
        } else {
          std::copy(jb.S.begin(), jb.S.begin() + nn * nn, jb.V.begin());
          fit(sc.work, static_cast<std::size_t>(detail::lapack::syevd_lwork(ni)));
          fit(sc.iwork, static_cast<std::size_t>(detail::lapack::syevd_liwork(ni)));
          std::vector<T> lam(nn);
          info = detail::lapack::syevd('V', ni, jb.V.data(), lam.data(), sc.work.data(),
                                       detail::lapack::syevd_lwork(ni), sc.iwork.data(),
                                       detail::lapack::syevd_liwork(ni));
          for (index_t j = 0; j < n; ++j) jb.lambda[j] = lam[j];
        }
        ok = info == 0 && finite_lambda();
      }
      jb.stage = 0;
      jb.primary_failed = !ok;
      // The retries eigendecompose in double (G_b + shift I), the basis rounded to T.
      auto factor_double = [&](double shift) {
        const int inf = detail::lapack::syevd_in_double(jb.S.data(), ni, 1.0, shift, sc.M,
                                                        jb.lambda.data(), sc.dwork, sc.iwork);
        if (inf != 0 || !finite_lambda()) return false;
        for (std::size_t i = 0; i < nn * nn; ++i) jb.V[i] = static_cast<T>(sc.M[i]);
        return true;
      };
      if (!ok && sizeof(T) == 4 && !injected(1) && factor_double(0.0)) {
        ok = true;
        jb.stage = 1;
      }
      if (!ok && opts_.fallback_eps > 0.0 && !injected(2) && factor_double(opts_.fallback_eps)) {
        ok = true;
        jb.stage = 2;
      }
      if (!ok) {
        if (blk.consecutive + 1 >= opts_.max_consecutive_failures)
          SADDLESCAPE_NUMERICAL_FAIL(
              "the refactorisation of ", name(), " failed ", blk.consecutive + 1,
              " times in a row (max_consecutive_failures = ", opts_.max_consecutive_failures,
              "; this time ", info == -1000 ? std::string("a failure injected by the test hook")
                                            : concat("LAPACK syevd info = ", info),
              sizeof(T) == 4 ? ", then the float64 retry" : "",
              opts_.fallback_eps > 0.0 ? ", then the retry with fallback_eps" : "",
              "); nothing was changed");
        // Keep the previous basis; its Rayleigh quotients diag(V^T S V) as eigenvalues.
        jb.stage = 3;
        std::copy(blk.V.begin(), blk.V.begin() + nn * nn, jb.V.begin());
        fit(sc.M, nn * nn);
        fit(sc.Vd, 2 * nn * nn);
        double* M = sc.M.data();
        double* Vd = sc.Vd.data();
        double* P = Vd + nn * nn;
        for (index_t j = 0; j < n; ++j)
          for (index_t i = j; i < n; ++i) M[i + j * n] = M[j + i * n] = double(jb.S[i + j * n]);
        for (std::size_t i = 0; i < nn * nn; ++i) Vd[i] = double(blk.V[i]);
        detail::lapack::gemm('N', 'N', ni, ni, ni, 1.0, M, ni, Vd, ni, 0.0, P, ni);
        for (index_t j = 0; j < n; ++j) {
          double q = 0.0;
          for (index_t i = 0; i < n; ++i) q += Vd[i + j * n] * P[i + j * n];
          jb.lambda[j] = q;
        }
        if (!finite_lambda())
          SADDLESCAPE_NUMERICAL_FAIL("the eigenvalues of ", name(), " are not finite; nothing "
                                     "was changed");
      }
      // An EMA of outer products is positive semidefinite, and a dense eigensolver resolves
      // its eigenvalues only to about n u lambda_max: below that is rounding around zero, as in
      // eigen_root. Clipping matters for the adam form, where a zero computed as 1e-16
      // lambda_max would enter as sqrt(1e-16 lambda_max), far above a typical eps.
      double top = 0.0;
      for (index_t j = 0; j < n; ++j) top = std::max(top, double(jb.lambda[j]));
      const double floor =
          static_cast<double>(n) * static_cast<double>(std::numeric_limits<T>::epsilon()) * top;
      for (index_t j = 0; j < n; ++j)
        if (jb.lambda[j] <= floor) jb.lambda[j] = 0.0;
      if (!v) return;
      for (index_t j = 0; j < n; ++j) sc.yt[j] = v[blk.off + j];
      detail::lapack::gemv('T', ni, ni, T(1), jb.V.data(), ni, sc.yt.data(), T(0), sc.zt.data());
      for (index_t j = 0; j < n; ++j)
        sc.zt[j] = static_cast<T>(double(sc.zt[j]) * root_value(corr * jb.lambda[j], form, eps));
      detail::lapack::gemv('N', ni, ni, T(1), jb.V.data(), ni, sc.zt.data(), T(0), out + blk.off);
    } else {
      // The incoming rows go into the unused history slots k..k+kin-1 (invisible until commit);
      // with v they are already there.
      if (!v) {
        auto& hb = const_cast<block&>(blk);
        for (index_t i = 0; i < kin; ++i) {
          T* h = hb.H.data() + (blk.k + i) * n;
          std::copy(gb + i * dim_, gb + i * dim_ + n, h);
          detail::lapack::gemv('T', ni, ni, T(1), blk.V.data(), ni, h, T(0),
                               hb.U.data() + (blk.k + i) * n);
        }
        return;
      }
      // y = V^T v; for RMSProp's step v is the newest gradient, already rotated.
      if (kin == 1 && v == gs) {
        for (index_t j = 0; j < n; ++j) sc.y[j] = blk.U[blk.k * n + j];
      } else {
        for (index_t j = 0; j < n; ++j) sc.yt[j] = v[blk.off + j];
        detail::lapack::gemv('T', ni, ni, T(1), blk.V.data(), ni, sc.yt.data(), T(0), sc.zt.data());
        for (index_t j = 0; j < n; ++j) sc.y[j] = sc.zt[j];
      }
      detail::lowrank_apply(sc.D.data(), n, sc.Q.data(), rows, sc.y.data(), form, eps, tol_,
                            null_floor, sc.z.data(), sc.lowrank);
      for (index_t j = 0; j < n; ++j) sc.zt[j] = static_cast<T>(sc.z[j]);
      detail::lapack::gemv('N', ni, ni, T(1), blk.V.data(), ni, sc.zt.data(), T(0), out + blk.off);
    }
    if (!detail::all_finite(out + blk.off, n))
      SADDLESCAPE_NUMERICAL_FAIL("the direction of ", name(), " is not finite (", detail::type_name<T>(),
                                 " overflow); nothing was changed");
  };
  {
    // OpenBLAS must not start threads of its own inside ours (and its thread count could
    // change the rounding of a block).
    std::unique_ptr<detail::lapack::single_threaded_scope> single;
    if (used > 1) single = std::make_unique<detail::lapack::single_threaded_scope>();
    detail::parallel_tasks(nb, used, task);
  }
  if (!commit) return;
  for (index_t b = 0; b < nb; ++b) {
    block& blk = blocks_[b];
    job& jb = jobs[b];
    if (jb.refresh) {
      std::swap(blk.S, jb.S);
      std::swap(blk.V, jb.V);
      std::swap(blk.lambda, jb.lambda);
      blk.gamma = 1.0;
      blk.k = 0;
      // A block that kept its basis retries at its next update.
      blk.since = jb.stage == 3 ? R - 1 : 0;
      blk.refreshes += jb.stage == 3 ? 0 : 1;
      blk.warm += jb.warm_ok ? 1 : 0;
      blk.fallbacks += jb.fell_back ? 1 : 0;
      blk.failed += jb.primary_failed ? 1 : 0;
      blk.retried64 += jb.stage == 1 ? 1 : 0;
      blk.retried_eps += jb.stage == 2 ? 1 : 0;
      blk.kept += jb.stage == 3 ? 1 : 0;
      blk.consecutive = jb.stage == 3 ? blk.consecutive + 1 : 0;
      if (blk.inject_attempts > 0) --blk.inject_attempts;
    } else if (kin > 0) {
      blk.gamma *= decay;
      for (std::int64_t i = 0; i < blk.k; ++i) blk.w[i] *= decay;
      for (index_t i = 0; i < kin; ++i) blk.w[blk.k + i] = win[i];
      blk.k += kin;
      blk.since += kin;
    }
  }
  updates_ = updates;
  beta_product_ = product;
}

template <class T>
void block_engine<T>::update(const T* g) {
  run(g, 1, nullptr, nullptr, true, -3, true);
}

template <class T>
void block_engine<T>::update_batch(const T* gs, index_t k) {
  SADDLESCAPE_EXPECTS(k >= 0, "the batch must have >= 0 rows, got ", k);
  SADDLESCAPE_EXPECTS(k <= INT_MAX, "the batch is too large: ", k);
  if (k == 0) return;
  run(gs, k, nullptr, nullptr, true, -3, true);
}

template <class T>
void block_engine<T>::direction(const T* v, T* out) {
  run(nullptr, 0, v, out, false, -2, true);
}

template <class T>
void block_engine<T>::update_direction(const T* g, T* out) {
  run(g, 1, g, out, true, -3, true);
}

template <class T>
void block_engine<T>::update_and_direction(const T* g, const T* v, T* out) {
  run(g, 1, v, out, true, -3, true);
}

template <class T>
void block_engine<T>::step(T* x, const T* g, double lr) {
  SADDLESCAPE_EXPECTS(std::isfinite(lr) && lr >= 0.0, "lr must be finite and >= 0, got ", lr);
  dirbuf_.resize(static_cast<std::size_t>(dim_));
  // run() commits the estimate only when every block's direction is finite, and moving x
  // cannot fail after it.
  run(g, 1, g, dirbuf_.data(), true, -3, true);
  const T l = static_cast<T>(lr);
  for (index_t i = 0; i < dim_; ++i) x[i] -= l * dirbuf_[i];
}

template <class T>
void block_engine<T>::refresh(index_t block, bool warm) {
  SADDLESCAPE_EXPECTS(block >= -1 && block < num_blocks(), "block must be in [-1, ",
                      num_blocks() - 1, "], got ", block);
  run(nullptr, 0, nullptr, nullptr, true, static_cast<int>(block), warm);
}

template <class T>
void block_engine<T>::inject_refresh_failures(index_t block, std::int64_t attempts, int stages) {
  SADDLESCAPE_EXPECTS(block >= 0 && block < num_blocks(), "block must be in [0, ",
                      num_blocks() - 1, "], got ", block);
  SADDLESCAPE_EXPECTS(attempts >= 0, "attempts must be >= 0, got ", attempts);
  SADDLESCAPE_EXPECTS(stages >= 0 && stages <= 3, "stages must be in [0, 3], got ", stages);
  blocks_[block].inject_attempts = attempts;
  blocks_[block].inject_stages = stages;
}

template <class T>
void block_engine<T>::estimate(T* out) const {
  const double corr = opts_.bias_correction && updates_ > 0 ? 1.0 / (1.0 - beta_product_) : 1.0;
  index_t at = 0;
  std::vector<double> G;
  for (const block& blk : blocks_) {
    const index_t n = blk.n;
    G.assign(static_cast<std::size_t>(n * n), 0.0);
    for (index_t j = 0; j < n; ++j)
      for (index_t i = j; i < n; ++i) G[i * n + j] = blk.gamma * double(blk.S[i + j * n]);
    for (std::int64_t r = 0; r < blk.k; ++r) {
      const T* h = blk.H.data() + r * n;
      for (index_t i = 0; i < n; ++i)
        for (index_t j = 0; j <= i; ++j) G[i * n + j] += blk.w[r] * double(h[i]) * double(h[j]);
    }
    for (index_t i = 0; i < n; ++i)
      for (index_t j = 0; j <= i; ++j) {
        const T x = static_cast<T>(corr * G[i * n + j]);
        out[at + i * n + j] = x;
        out[at + j * n + i] = x;
      }
    at += n * n;
  }
}

template <class T>
block_statistics block_engine<T>::statistics() const {
  block_statistics s;
  for (const block& blk : blocks_) {
    s.refreshes.push_back(blk.refreshes);
    s.warm_refreshes.push_back(blk.warm);
    s.fallbacks.push_back(blk.fallbacks);
    const auto [lo, hi] = std::minmax_element(blk.lambda.begin(), blk.lambda.begin() + blk.n);
    s.lambda_min.push_back(*lo);
    s.lambda_max.push_back(*hi);
    s.pending.push_back(blk.k);
    s.failed_refreshes.push_back(blk.failed);
    s.float64_retries.push_back(blk.retried64);
    s.eps_retries.push_back(blk.retried_eps);
    s.kept_bases.push_back(blk.kept);
    s.consecutive_failures.push_back(blk.consecutive);
  }
  return s;
}

template <class T>
typename block_engine<T>::state block_engine<T>::save() const {
  state st;
  st.updates = updates_;
  st.beta_product = beta_product_;
  const auto R = static_cast<std::size_t>(opts_.refresh_every);
  for (const block& blk : blocks_) {
    const auto n = static_cast<std::size_t>(blk.n);
    st.data.insert(st.data.end(), blk.S.begin(), blk.S.begin() + n * n);
    st.data.insert(st.data.end(), blk.V.begin(), blk.V.begin() + n * n);
    st.data.insert(st.data.end(), blk.H.begin(), blk.H.begin() + R * n);
    st.data.insert(st.data.end(), blk.U.begin(), blk.U.begin() + R * n);
    st.scalars.push_back(blk.gamma);
    st.scalars.insert(st.scalars.end(), blk.w.begin(), blk.w.begin() + R);
    st.scalars.insert(st.scalars.end(), blk.lambda.begin(), blk.lambda.begin() + n);
    for (const std::int64_t c : {blk.since, blk.k, blk.refreshes, blk.warm, blk.fallbacks,
                                 blk.failed, blk.retried64, blk.retried_eps, blk.kept,
                                 blk.consecutive})
      st.scalars.push_back(static_cast<double>(c));
  }
  return st;
}

template <class T>
void block_engine<T>::load(const state& st) {
  const auto R = static_cast<std::size_t>(opts_.refresh_every);
  std::size_t data = 0, scalars = 0, scalars_v1 = 0;
  for (const index_t b : sizes_) {
    const auto n = static_cast<std::size_t>(b);
    data += 2 * n * n + 2 * R * n;
    scalars += 1 + R + n + counters;
    scalars_v1 += 1 + R + n + counters_v1;
  }
  SADDLESCAPE_EXPECTS(st.data.size() == data, "the state's data must have ", data,
                      " values for these block sizes and refresh_every = ", R, ", got ",
                      st.data.size());
  // A state from before the fallback counters has 5 counters per block instead of 10.
  SADDLESCAPE_EXPECTS(st.scalars.size() == scalars || st.scalars.size() == scalars_v1,
                      "the state's scalars must have ", scalars, " values (", scalars_v1,
                      " in a state without the fallback counters) for these block sizes and "
                      "refresh_every = ", R, ", got ", st.scalars.size());
  const std::size_t nc = st.scalars.size() == scalars ? counters : counters_v1;
  SADDLESCAPE_EXPECTS(st.updates >= 0, "the state's updates must be >= 0, got ", st.updates);
  SADDLESCAPE_EXPECTS(st.updates == 0 ? st.beta_product == 1.0
                                      : (st.beta_product >= 0.0 && st.beta_product < 1.0),
                      "the state's beta_product must be 1 before any update and in [0, 1) after, "
                      "got ", st.beta_product, " after ", st.updates, " updates");
  detail::check_finite(st.data.data(), 1, static_cast<index_t>(st.data.size()), "state data", true);
  detail::check_finite(st.scalars.data(), 1, static_cast<index_t>(st.scalars.size()),
                       "state scalars", true);
  // Counts and weights, checked per block before anything is assigned.
  std::size_t at = 0;
  for (std::size_t b = 0; b < sizes_.size(); ++b) {
    const auto n = static_cast<std::size_t>(sizes_[b]);
    const double gamma = st.scalars[at];
    SADDLESCAPE_EXPECTS(gamma >= 0.0 && gamma <= 1.0, "block ", b, ": the state's gamma must be in "
                        "[0, 1], got ", gamma);
    for (std::size_t i = 0; i < R; ++i)
      SADDLESCAPE_EXPECTS(st.scalars[at + 1 + i] >= 0.0, "block ", b, ": the state's weights "
                          "must be >= 0, got ", st.scalars[at + 1 + i]);
    for (std::size_t i = 0; i < n; ++i)
      SADDLESCAPE_EXPECTS(st.scalars[at + 1 + R + i] >= 0.0, "block ", b, ": the state's "
                          "eigenvalues must be >= 0, got ", st.scalars[at + 1 + R + i]);
    const double* c = st.scalars.data() + at + 1 + R + n;
    for (std::size_t i = 0; i < nc; ++i)
      SADDLESCAPE_EXPECTS(c[i] >= 0.0 && c[i] == std::floor(c[i]) && c[i] <= 9.0e15, "block ", b,
                          ": the state's counters must be integers >= 0, got ", c[i]);
    SADDLESCAPE_EXPECTS(c[1] <= c[0] && c[0] < static_cast<double>(R), "block ", b,
                        ": the state's history (", c[1], " gradients, ", c[0],
                        " updates since the refresh) does not fit refresh_every = ", R);
    at += 1 + R + n + nc;
  }
  at = 0;
  std::size_t ad = 0;
  for (block& blk : blocks_) {
    const auto n = static_cast<std::size_t>(blk.n);
    auto take = [&](std::vector<T>& dst, std::size_t count) {
      dst.assign(st.data.begin() + ad, st.data.begin() + ad + count);
      ad += count;
    };
    take(blk.S, n * n);
    take(blk.V, n * n);
    take(blk.H, R * n);
    take(blk.U, R * n);
    blk.gamma = st.scalars[at];
    blk.w.assign(st.scalars.begin() + at + 1, st.scalars.begin() + at + 1 + R);
    blk.lambda.assign(st.scalars.begin() + at + 1 + R, st.scalars.begin() + at + 1 + R + n);
    const double* c = st.scalars.data() + at + 1 + R + n;
    blk.since = static_cast<std::int64_t>(c[0]);
    blk.k = static_cast<std::int64_t>(c[1]);
    blk.refreshes = static_cast<std::int64_t>(c[2]);
    blk.warm = static_cast<std::int64_t>(c[3]);
    blk.fallbacks = static_cast<std::int64_t>(c[4]);
    const auto counter = [&](std::size_t i) {
      return i < nc ? static_cast<std::int64_t>(c[i]) : std::int64_t(0);
    };
    blk.failed = counter(5);
    blk.retried64 = counter(6);
    blk.retried_eps = counter(7);
    blk.kept = counter(8);
    blk.consecutive = counter(9);
    at += 1 + R + n + nc;
  }
  updates_ = st.updates;
  beta_product_ = st.beta_product;
}

template class block_engine<float>;
template class block_engine<double>;

}  // namespace saddlescape
