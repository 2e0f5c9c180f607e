#pragma once
/// @file block_engine.hpp
/// Block-diagonal full-matrix RMSProp over one flat parameter vector: the preconditioner of
/// real models. The vector of dim entries is cut into consecutive blocks of sizes B_b; block b
/// keeps its own EMA estimate
///   G_b,t = beta_t G_b,(t-1) + (1 - beta_t) g_b,t g_b,t^T,   G_b,0 = 0,
/// and its exact direction A_b g_b with A_b = (G_b + eps I)^(-1/2) (form inv_sqrt, the paper's)
/// or (G_b^(1/2) + eps I)^(-1) (form adam).
///
/// Representation (the "lowrank" idea, per block). At its last refresh a block factored
/// G_ref = V diag(lambda) V^T (LAPACK syevd, or warm from the previous V). Since then it holds the
/// k < refresh_every gradients h_i that arrived, so that exactly
///   G_t = gamma G_ref + sum_i w_i h_i h_i^T
/// with gamma = prod beta and w_i the decayed weights. In V's basis this is diagonal plus rank k,
/// and A g = f(G_t) g is evaluated exactly (to `tol` relative) from the Stieltjes integral
///   f(M) = int_0^inf rho(t) (M + t I)^(-1) dt,
///   rho(t) = 1 / (pi sqrt(t)) for inv_sqrt (with M = G + eps I),
///   rho(t) = sqrt(t) / (pi (eps^2 + t)) for adam,
/// by the trapezoidal rule in log t with Woodbury solves: O(B^2 + N k^2 B) per block and step for
/// N quadrature nodes (about 30 in float32, 100 in float64), instead of an O(B^3) factorisation.
/// The dense estimate is touched only at refreshes (a rank-k syrk folds the gradients in).
/// In the adam form a singular G_ref (early in training) has exact zeros in lambda, where
/// Woodbury would divide by the nodes' t: they are split off (Householder reflectors on the new
/// rows' null components; f = 1/eps on the part they miss, a Schur complement on the part they
/// reach). Where that part, or an eigenvalue near rounding that the rows reach, makes the
/// update unstable for tol, the block refactors instead (counted as a refresh).
///
/// A refresh of a rank-deficient block is a range refresh: the rows since its last refresh,
/// rotated into V's basis, have their components in the previous null space (lambda = 0) split
/// off by Householder reflectors, which leaves m <= rank + k columns that can carry the new
/// estimate; Rayleigh-Ritz with S on them gives its eigenpairs in O(B^2 m) instead of syevd's
/// O(B^3), and the rest of the rotated null space keeps the eigenvalue 0. Taken when
/// m <= 0.6 B (float32) or 0.7 B (float64), where it is faster (bench_blocks.py --only range),
/// and when the last refactorisation was an exact one (not a kept basis, no fallback_eps ever);
/// every 16th refresh of a block is cold, so that the basis's rounding does not accumulate.
///
/// Refreshes are staggered: block b refactors when refresh_every updates have passed since its
/// last refresh, counted from an offset of b mod refresh_every, so a step refactors about
/// n_blocks / refresh_every blocks. The worst step costs that many factorisations of the
/// largest blocks (split over the threads) plus the cheap per-block direction of every block;
/// a rank-k update with k >= refresh_every refactors every block it reaches.
///
/// Threads: blocks are independent tasks spread over SADDLESCAPE_NUM_THREADS threads (default:
/// the hardware's), largest refreshes first; every block is computed by the same code whatever
/// the thread count, and OpenBLAS runs single-threaded inside, so results do not depend on the
/// thread count. One engine must not be used by two threads at once; separate engines may.
///
/// Errors: every call checks its input before changing anything (a NaN/Inf gradient is an
/// invalid_argument naming the entry, a beta outside [0, 1) an invalid_argument), computes all
/// blocks into scratch buffers, and commits only when every block succeeded: a block whose
/// factorisation fails (numerical_error naming the block) leaves every block as it was.
///
/// Fallback policy of a refresh (per block; a failure in one block never changes another). A
/// refactorisation fails when the eigensolver reports failure (LAPACK info != 0) or returns a
/// non-finite eigenvalue. The block then retries, in this order:
///  1. in float64 (float32 engines only): the float32 estimate promoted, eigendecomposed in
///     double, the basis rounded back to float32;
///  2. if fallback_eps > 0: in float64, of G_b + fallback_eps I: until its next refresh the
///     block's direction is that of a damping larger by (a decaying) fallback_eps;
///  3. else it keeps its previous eigenbasis V (the last good factorisation), with eigenvalue
///     estimates diag(V^T G_b V) so that their scale stays current, folds its history into the
///     estimate (which stays exact), and retries the refactorisation at its next update.
/// Every fallback is counted in statistics(). An attempt that reaches step 3 is a failure;
/// the max_consecutive_failures-th failure in a row of a block throws numerical_error naming
/// the block, and, as for every error, nothing is changed. Any successful refactorisation
/// resets the count.

#include <saddlescape/errors.hpp>
#include <saddlescape/matrix_functions.hpp>
#include <saddlescape/schedules.hpp>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace saddlescape {

struct block_engine_options {
  double eps = 1e-8;  ///< > 0 and finite.
  root_form form = root_form::inv_sqrt;
  /// Refactor each block once this many updates have passed since its last refresh; 1 to 256.
  std::int64_t refresh_every = 16;
  /// Relative accuracy of the quadrature between refreshes; 0 selects 1e-10 (float64) or 1e-6
  /// (float32 estimates, whose own rounding is 6e-8).
  double tol = 0.0;
  /// Divide the estimate by 1 - prod_t beta_t (Adam's correction).
  bool bias_correction = false;
  /// Refactor from the previous eigenbasis V: Jacobi sweeps on V^T G V, which is diagonal plus
  /// the rank-k change since, when at most B of its off-diagonal entries exceed rounding; else
  /// (and when the sweeps stall) syevd. Pays only when G barely moved since the last refresh;
  /// off by default (see bench/RESULTS.md).
  bool warm_start = false;
  /// A block's refresh that keeps its previous basis this many times in a row (see the
  /// fallback policy above) throws numerical_error instead; >= 1.
  std::int64_t max_consecutive_failures = 3;
  /// >= 0 and finite; > 0 enables the retry of a failed refactorisation with G + fallback_eps I.
  double fallback_eps = 0.0;
};

/// Per-block figures for logging (plain numbers).
struct block_statistics {
  std::vector<std::int64_t> refreshes;       ///< factorisations so far
  /// of which started from the previous basis: range refreshes and converged warm starts
  std::vector<std::int64_t> warm_refreshes;
  std::vector<std::int64_t> fallbacks;       ///< warm starts that fell back to syevd
  std::vector<double> lambda_min, lambda_max;  ///< of G_b at its last refresh (0 before any)
  std::vector<std::int64_t> pending;           ///< gradients held since the last refresh
  // The fallback policy's counters (see the file comment).
  std::vector<std::int64_t> failed_refreshes;      ///< refreshes whose first eigensolver failed
  std::vector<std::int64_t> float64_retries;       ///< of which the float64 retry succeeded
  std::vector<std::int64_t> eps_retries;           ///< ... the retry with fallback_eps succeeded
  std::vector<std::int64_t> kept_bases;            ///< ... every retry failed: basis kept
  std::vector<std::int64_t> consecutive_failures;  ///< kept bases in a row, now
};

template <class T>
class block_engine {
 public:
  /// @param[in] block_sizes  sizes >= 1; their sum is dim. Up to 2^31 - 1 entries each.
  /// @param[in] beta         beta_t for the t-th update (t from 0), checked in [0, 1) when used
  ///                         (a constant at construction).
  /// @throws invalid_argument for bad sizes, options or beta, and, naming the bytes needed,
  ///   for a configuration whose buffers exceed this machine's memory.
  block_engine(std::vector<index_t> block_sizes, schedule_ptr beta, block_engine_options opts = {});
  ~block_engine();
  block_engine(block_engine&&) noexcept;
  block_engine& operator=(block_engine&&) noexcept;

  index_t dim() const noexcept { return dim_; }
  index_t num_blocks() const noexcept { return static_cast<index_t>(sizes_.size()); }
  const std::vector<index_t>& block_sizes() const noexcept { return sizes_; }
  /// Offset of each block in the flat vector.
  const std::vector<index_t>& block_offsets() const noexcept { return offsets_; }
  const block_engine_options& options() const noexcept { return opts_; }
  const schedule_ptr& beta() const noexcept { return beta_; }
  /// Replaces the beta schedule for the updates to come (still evaluated at the update count):
  /// callers whose beta follows a changing step size (beta_t = 1 - C lr_t^(2/3) under an LR
  /// scheduler) set it before each update. The schedule is not part of the saved state.
  /// @throws invalid_argument for a null schedule.
  void set_beta(schedule_ptr beta);
  /// EMA updates so far (a rank-k update counts k).
  std::int64_t updates() const noexcept { return updates_; }
  /// Bytes the engine allocates (estimates, eigenbases, gradient history, refresh buffers).
  std::size_t memory_bytes() const noexcept;
  /// The bytes memory_bytes() would be for a configuration, without allocating.
  static std::size_t memory_bytes_for(const std::vector<index_t>& block_sizes,
                                      std::int64_t refresh_every);

  /// One EMA update of every block with g (dim entries).
  void update(const T* g);
  /// k EMA updates with the rows of the row-major (k, dim) gs, equal to k calls of update() up
  /// to rounding (one rank-k step per block).
  void update_batch(const T* gs, index_t k);
  /// out = A v for the current estimate (dim entries each), without changing the estimate.
  void direction(const T* v, T* out);
  /// update(g), then out = A g: the direction of RMSProp's step, at the cost of one pass.
  void update_direction(const T* g, T* out);
  /// update(g), then out = A v for the updated estimate, in one pass (Adam's step: v the
  /// bias-corrected first moment). Unlike update() followed by direction(v), a block whose
  /// low-rank update is unstable refactors once and keeps it, instead of refactoring (and
  /// discarding it) at each direction().
  void update_and_direction(const T* g, const T* v, T* out);
  /// update(g), then x <- x - lr A g. x is unchanged if anything throws.
  void step(T* x, const T* g, double lr);
  /// Refactors the given block (or every block, block = -1) now: with warm = false by syevd,
  /// else as a step would (the range refresh where it applies, the warm start if enabled). Does not change the estimate, only its representation.
  void refresh(index_t block = -1, bool warm = true);

  /// Test hook for the fallback policy: the next `attempts` refreshes of `block` that commit
  /// see their first `stages` eigensolver calls fail (0: none; 1: the first; 2: also the
  /// float64 retry, which float64 engines do not have; 3: also the retry with fallback_eps).
  /// A call that throws consumes nothing. Not part of the saved state.
  void inject_refresh_failures(index_t block, std::int64_t attempts, int stages);

  /// The estimates G_b (bias-corrected if requested), back to back, each B_b x B_b row-major.
  void estimate(T* out) const;
  index_t estimate_size() const noexcept;

  block_statistics statistics() const;

  /// The complete state: continuing from load() is bit for bit the uninterrupted run.
  struct state {
    std::int64_t updates = 0;
    double beta_product = 1.0;
    /// Per block, concatenated: S (B^2, the estimate at the last refresh, column-major lower
    /// triangle meaningful), V (B^2, column-major), lambda (B), history h and its rotation
    /// u = V^T h (refresh_every * B each, the first k rows meaningful).
    std::vector<T> data;
    /// Per block: gamma, then the refresh_every weights w_i, the B eigenvalues; then since, k,
    /// refreshes, warm_refreshes, fallbacks, failed_refreshes, float64_retries, eps_retries,
    /// kept_bases, consecutive_failures as numbers. load() also takes the layout before the
    /// fallback counters (5 counters per block), which it reads with those counters at 0.
    std::vector<double> scalars;
  };
  state save() const;
  /// @throws invalid_argument (naming the field) for a state of another configuration or with
  ///   non-finite or inconsistent entries; the engine is then unchanged.
  void load(const state& st);

 private:
  struct block;
  struct scratch;
  struct job;
  void run(const T* gs, index_t k, const T* v, T* out, bool commit, int force_refresh,
           bool warm);
  std::vector<double> betas_for(index_t k) const;

  index_t dim_ = 0;
  std::vector<index_t> sizes_, offsets_;
  schedule_ptr beta_;
  block_engine_options opts_;
  double tol_ = 0.0;
  std::int64_t updates_ = 0;
  double beta_product_ = 1.0;
  std::vector<block> blocks_;
  std::vector<std::unique_ptr<scratch>> scratch_;
  std::vector<job> spares_;  // refresh buffers between calls
  std::vector<T> gbuf_, dirbuf_;
};

}  // namespace saddlescape
