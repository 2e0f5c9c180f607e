#pragma once
/// @file estimators.hpp
/// Streaming estimates of the gradient second moment G = E[g g^T] (Sec. 4.1, Theorem 4.1):
/// the exponential moving average
///   G_t = beta_t G_(t-1) + (1 - beta_t) g_t g_t^T,   G_0 = 0,   t = 1, 2, ...
/// in full, diagonal or block-diagonal structure, and the preconditioners (G_t + eps I)^(-1/2)
/// built from it.
///
/// Storage. The full and block estimates keep G = s * S with a running scale s and update only
/// the lower triangle of S: a step multiplies s by beta and adds ((1 - beta) / s) g g^T to S
/// (BLAS syr), so no step rescales the whole matrix. When s falls below sqrt(machine epsilon),
/// S is multiplied by s once and s reset to 1 ("renormalised"), which keeps S's entries within
/// a factor 1/sqrt(epsilon) of G's and flushes to zero any that would become subnormal; S is
/// also renormalised early, and an update that would overflow anyway is a numerical_error,
/// whenever a running bound on max|S| comes near the largest finite T. The untouched upper
/// triangle is never read or decayed. The diagonal estimate flushes subnormals to zero as it
/// decays, and is kept in two buffers:
/// an update reads one and writes the other in a single fused pass, so a gradient found
/// non-finite midway leaves the current estimate untouched.
///
/// Fallback policy of the full and block factorisations (preconditioner(), apply()), per block:
/// a factorisation that fails numerically (the eigensolver does not converge, or its eigenvalues
/// are not finite) is retried, for a float32 estimate, in float64 (the eigenpairs rounded to
/// float32 and checked at float32's tolerance); then, if fallback_eps > 0, with
/// G_b + fallback_eps I (a damping larger by fallback_eps until the next refresh); else the
/// block keeps its previous factorisation and all blocks are refactored at the next use. Each fallback is counted (fallback_statistics());
/// the max_consecutive_failures-th kept factorisation in a row of a block, or a failure with no
/// previous factorisation to keep, throws numerical_error naming the block, the cache unchanged.
/// Blocks are factored aside and committed together, so no block changes when one throws.

#include <saddlescape/detail/huge_page_allocator.hpp>
#include <saddlescape/errors.hpp>
#include <saddlescape/matrix_functions.hpp>
#include <saddlescape/schedules.hpp>

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace saddlescape {

/// The sparsity pattern of an estimate.
enum class structure {
  full,   ///< d x d symmetric.
  diag,   ///< the diagonal only: the estimate RMSProp and Adam keep.
  block,  ///< diagonal blocks of the sizes given, summing to d.
};

/// Parses "full" / "diag" / "block". @throws invalid_argument naming any other string.
structure parse_structure(std::string_view name);
std::string_view to_string(structure s);

/// Exponential moving average of g g^T. Not thread-safe; one object per thread.
/// Options and per-block counters of the fallback policy (file comment).
struct fallback_options {
  std::int64_t max_consecutive_failures = 3;  ///< >= 1.
  double fallback_eps = 0.0;                  ///< >= 0; 0 skips the retry with a larger eps.
};
struct fallback_statistics {
  std::vector<std::int64_t> failed_refreshes;      ///< factorisations that failed first time
  std::vector<std::int64_t> float64_retries;       ///< of which the float64 retry worked (float32)
  std::vector<std::int64_t> eps_retries;           ///< of which the fallback_eps retry worked
  std::vector<std::int64_t> kept_bases;            ///< of which the previous one was kept
  std::vector<std::int64_t> consecutive_failures;  ///< kept in a row, now
};

template <class T>
class ema_estimator {
 public:
  /// @param[in] dim            d >= 1.
  /// @param[in] beta           beta_t for the t-th update (t from 0); values outside [0, 1) are
  ///                           an invalid_argument when met.
  /// @param[in] s              the structure.
  /// @param[in] block_sizes    structure::block only: positive sizes summing to dim.
  /// @param[in] bias_correction divide the estimate by 1 - prod_t beta_t (Adam's correction,
  ///                           1 - beta^t for a constant beta).
  /// @param[in] refresh_every  preconditioner()/apply() refactor the estimate once this many
  ///                           updates have happened since the last factorisation (>= 1).
  /// @throws invalid_argument for a bad dim, beta, block_sizes or refresh_every.
  ema_estimator(index_t dim, schedule_ptr beta, structure s = structure::full,
                std::vector<index_t> block_sizes = {}, bool bias_correction = false,
                std::int64_t refresh_every = 1);

  index_t dim() const noexcept { return dim_; }
  structure layout() const noexcept { return structure_; }
  /// The block sizes: {dim} for full, {} for diag.
  const std::vector<index_t>& block_sizes() const noexcept { return blocks_; }
  bool bias_correction() const noexcept { return bias_correction_; }
  std::int64_t refresh_every() const noexcept { return refresh_every_; }
  const schedule_ptr& beta() const noexcept { return beta_; }
  /// Updates so far.
  std::int64_t steps() const noexcept { return steps_; }

  /// One EMA step with the sample g g^T; g has dim entries.
  /// @throws invalid_argument if g has a NaN/Inf entry or beta_t is outside [0, 1);
  /// @throws numerical_error if the estimate would overflow T.
  /// In both cases the estimate is exactly as before the call.
  void update(const T* g);

  /// k EMA steps with the rows of the row-major (k, dim) array gs, as one weighted rank-k update
  /// (BLAS syrk): G <- (prod_i beta_i) G + sum_i w_i g_i g_i^T, w_i = (1 - beta_i) prod_(j>i) beta_j.
  /// Equal to k calls of update() up to rounding. Same errors and guarantee as update().
  void update_batch(const T* gs, index_t k);

  /// Number of values estimate() writes: d^2 (full), d (diag), sum of b^2 (block).
  index_t estimate_size() const noexcept;

  /// Writes the estimate (bias-corrected if requested): the full symmetric d x d matrix, the
  /// diagonal, or the blocks back to back (each b x b, row-major). Zero before any update.
  void estimate(T* out) const;

  /// Writes the preconditioner A = f(G_t) of `spec` in the layout of estimate(), through
  /// eigen_root (full, block) or diag_inv_root (diag). Factorisations are reused for
  /// refresh_every updates.
  /// @throws numerical_error if G_t is singular and spec.eps = 0 (e.g. before any update).
  void preconditioner(const root_spec& spec, T* out);

  /// out = A v for v with dim entries, without forming A.
  void apply(const root_spec& spec, const T* v, T* out);

  /// The raw state, for saving: G = scale * S, S stored as estimate_size() values in the layout
  /// of estimate() but with only the lower triangles meaningful for full and block.
  struct state {
    std::int64_t steps = 0;
    double scale = 1.0;
    double beta_product = 1.0;  ///< prod_t beta_t, for the bias correction
    std::vector<T> data;
    /// The update count of the last factorisation (-1: none). The factorisation itself is not
    /// saved: a loaded estimator factors at its first use, then refreshes on the saved
    /// schedule (at factored_at + m * refresh_every), as the saved one would have.
    std::int64_t factored_at = -1;
  };
  state save() const;

  /// The fallback policy (file comment). @throws invalid_argument for bad options.
  void set_fallback(const fallback_options& o);
  const fallback_options& fallback() const noexcept { return fallback_; }
  fallback_statistics fallback_stats() const;
  /// The counters as saved: per block failed, eps_retries, kept, consecutive. float64_retries
  /// is not among them: the optimizers that save counters keep float64 estimates.
  std::vector<double> fallback_counters() const;
  /// @throws invalid_argument for a wrong size or entries that are not counts (nothing changes).
  void load_fallback_counters(const std::vector<double>& c);
  /// Test hook: the next `attempts` factorisations of `block` that commit see their first
  /// `stages` solver calls fail (1: the first; 2: also the float64 retry of a float32
  /// estimate; 3: also the retry with fallback_eps). Not saved.
  void inject_factor_failures(index_t block, std::int64_t attempts, int stages);

  /// Restores a state from save() of an estimator of the same dim, structure and blocks.
  /// @throws invalid_argument (naming the field) for a state that does not fit or is not
  ///   finite; the estimator is then unchanged.
  void load(const state& st);

 private:
  double next_beta(std::int64_t t) const;
  void check_finite(const T* g, index_t n, index_t rows) const;
  void prepare_scale(double new_scale, double increment);
  double correction() const noexcept;
  void refresh_factors();
  // The float64 retry of block b's failed factorisation (float32 estimates), into its spare.
  bool retry_in_double(std::size_t b, const std::string& name);

  index_t dim_;
  schedule_ptr beta_;
  structure structure_;
  std::vector<index_t> blocks_;   // sizes
  std::vector<index_t> offsets_;  // row offset of each block in g
  std::vector<index_t> storage_;  // offset of each block in data_
  bool bias_correction_;
  std::int64_t refresh_every_;

  std::int64_t steps_ = 0;
  double scale_ = 1.0;
  double beta_product_ = 1.0;
  double bound_ = 0.0;    // an upper bound on max|S| (full, block)
  using buffer = std::vector<T, detail::huge_page_allocator<T>>;
  buffer data_;   // S (full/block) or the diagonal
  buffer spare_;  // diag: the buffer the next update writes
  std::vector<T> rows_;   // update_batch: the weighted rows
  std::vector<double> batch_betas_, batch_weights_;  // update_batch: beta_i and w_i

  // Factorisations of the estimate. A copy of the estimator starts with an empty cache, so
  // copies are cheap and independent.
  struct factor_cache {
    std::vector<std::unique_ptr<eigen_root<T>>> roots, spares;
    std::vector<double> m64, lambda64, work64;  // the float64 retry's matrix and workspace
    std::vector<int> iwork64;
    std::int64_t factored_at = -1;
    factor_cache() = default;
    factor_cache(const factor_cache&) {}
    factor_cache& operator=(const factor_cache&) {
      roots.clear();
      spares.clear();
      factored_at = -1;
      return *this;
    }
    factor_cache(factor_cache&&) noexcept = default;
    factor_cache& operator=(factor_cache&&) noexcept = default;
  };
  factor_cache cache_;
  std::int64_t resume_from_ = -1;  // after load(): the saved factored_at, to keep its schedule
  std::vector<T> dense_;  // a symmetric copy of one block for factor()
  std::vector<T> diag_;   // the corrected diagonal
  fallback_options fallback_;
  std::vector<std::int64_t> fb_failed_, fb_f64_, fb_eps_, fb_kept_, fb_consecutive_;  // per block
  std::vector<std::int64_t> inject_attempts_;
  std::vector<int> inject_stages_;
};

/// The covariance variant (Sec. 5.3): an EMA of (g1 - g2)(g1 - g2)^T / 2 for two independent
/// stochastic gradients at the same point, an unbiased estimate of Cov(g) since
/// E[(g1 - g2)(g1 - g2)^T] = 2 Cov(g).
template <class T>
class covariance_estimator {
 public:
  covariance_estimator(index_t dim, schedule_ptr beta, structure s = structure::full,
                       std::vector<index_t> block_sizes = {}, bool bias_correction = false,
                       std::int64_t refresh_every = 1);

  /// One EMA step with (g1 - g2)(g1 - g2)^T / 2. Errors as ema_estimator::update, naming g1/g2.
  void update_pair(const T* g1, const T* g2);

  ema_estimator<T>& ema() noexcept { return ema_; }
  const ema_estimator<T>& ema() const noexcept { return ema_; }

 private:
  ema_estimator<T> ema_;
  std::vector<T> diff_;
};

}  // namespace saddlescape
