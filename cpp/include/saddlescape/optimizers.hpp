#pragma once
/// @file optimizers.hpp
/// The step rules of the paper's Sec. 4.2, all of the form x <- x - lr_t A_t g_t:
/// - sgd: A = I.
/// - preconditioned_sgd (Algorithm 1): A = A(x_t) from an oracle, e.g. the idealized
///   (E[g g^T](x_t) + eps I)^(-1/2) of a problem that knows E[g g^T].
/// - rmsprop (Algorithms 2 and 3): G_t = beta_t G_(t-1) + (1 - beta_t) g_t g_t^T (G_0 = 0, no
///   bias correction), then A_t = (G_t + eps I)^(-1/2) (form inv_sqrt) or (G_t^(1/2) + eps I)^(-1)
///   (form adam); full, diagonal or block-diagonal G; with burn_in = W > 0 the first W calls of
///   step() only update G (Algorithm 3: x stays at x0).
/// - adam: m_t = beta1 m_(t-1) + (1 - beta1) g_t; G_t as above with beta2; both bias-corrected;
///   x <- x - lr_t A(G_t / (1 - prod beta2)) m_t / (1 - beta1^t).
/// - saddle_escape (Algorithm 4): a base rule whose step size is r at the steps t with
///   t mod t_thresh == 0 (t counted from 0 over the steps that move x).
///
/// Counters. lr_t is evaluated at t = the number of earlier steps that moved x (burn-in steps
/// do not count). beta_t is evaluated at the number of earlier updates of the estimate, which
/// counts burn-in samples and the hallucinated samples of saddle_escape.
///
/// Errors. step() checks g first: a NaN/Inf entry is an invalid_argument naming it, and x and
/// the optimizer's state are then exactly as before the call. So is a g too large for the
/// estimate (a numerical_error: max|g|^2 or the estimate's eigenvalues would overflow, or the
/// step could). An eigensolver that fails (LAPACK's info > 0, not seen in practice) goes through
/// the fallback policy of the estimator or block engine (see
/// rmsprop_options::max_consecutive_failures); when that gives up, x is unchanged but the
/// estimate holds g (the block engine: nothing changed). Optimizers work in float64 and are not thread-safe (one per thread).

#include <saddlescape/block_engine.hpp>
#include <saddlescape/errors.hpp>
#include <saddlescape/estimators.hpp>
#include <saddlescape/matrix_functions.hpp>
#include <saddlescape/problems.hpp>
#include <saddlescape/schedules.hpp>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace saddlescape {

/// A gradient an optimizer drew itself (saddle_escape's hallucinated samples) was not finite.
/// run() reports it as divergence.
class non_finite_gradient : public numerical_error {
 public:
  using numerical_error::numerical_error;
};

/// The largest refresh_every of the lowrank solver: its per-step cost grows like its square.
constexpr std::int64_t max_lowrank_period = 256;

/// An optimizer's complete state, for checkpoints: named arrays and scalars, and the kind of
/// optimizer it came from (load_state_dict checks it).
struct optimizer_state {
  std::string kind;
  std::map<std::string, std::vector<double>> arrays;
  std::map<std::string, double> scalars;
};

class optimizer {
 public:
  virtual ~optimizer() = default;

  index_t dim() const noexcept { return dim_; }
  /// Calls of step() so far, burn-in included.
  std::int64_t steps() const noexcept { return steps_; }
  /// Steps that moved x so far: the t of the next step's lr_t.
  std::int64_t moves() const noexcept { return moves_; }
  /// Burn-in calls still to come (they update the estimate and leave x alone).
  virtual std::int64_t burn_in_remaining() const noexcept { return 0; }
  /// Whether the optimizer keeps an estimate that observe() feeds.
  virtual bool estimates() const noexcept { return false; }
  /// The step size lr_t of the t-th moving step.
  virtual double lr(std::int64_t t) const = 0;
  virtual std::string describe() const = 0;
  /// A short name: "SGD", "RMSProp", ...; the kind recorded in state_dict().
  virtual std::string kind() const = 0;

  /// One step with the gradient g at x (dim entries each); x is updated in place. `source`
  /// gives extra gradient samples where a rule needs them (saddle_escape with hallucinate > 0)
  /// and projects onto the feasible set.
  /// @throws invalid_argument for a non-finite g (x and state unchanged), or a missing source.
  void step(double* x, const double* g, sampler* source = nullptr);

  /// A step with the given step size, counted as a moving step, g already checked finite.
  /// For rules built on top of this one (saddle_escape).
  void step_with_lr(double* x, const double* g, double lr, sampler* source);

  /// Feeds g to the estimate without moving x (burn-in; hallucinated samples). A no-op for
  /// rules without an estimate. @throws invalid_argument for a non-finite g (state unchanged).
  void observe(const double* g);

  /// The state: counters, moments and estimates, and when the estimate was last factorised. The
  /// factorisation itself is not part of it: an optimizer that reuses one (refresh_every > 1)
  /// factors the loaded estimate when it next needs a direction, then refreshes on the saved
  /// schedule; so its directions differ from the uninterrupted run's until that run's next
  /// refresh and agree after it (solver lowrank: they differ only by rounding, within tol).
  /// Everything else continues bit for bit.
  optimizer_state state_dict() const;
  /// @throws invalid_argument (naming the field) for a state of another kind or shape, or with
  ///   non-finite entries; the optimizer is then unchanged.
  void load_state_dict(const optimizer_state& st);

 protected:
  explicit optimizer(index_t dim);
  /// Update the state with g, then x <- x - lr A g. g is finite. Must leave x and the state
  /// unchanged when it throws on account of the input.
  virtual void move(double* x, const double* g, double lr, sampler* source) = 0;
  virtual void do_observe(const double* g) { (void)g; }
  virtual void save_extra(optimizer_state& st) const { (void)st; }
  /// Check everything first, then assign: a throw must leave the optimizer unchanged.
  virtual void load_extra(const optimizer_state& st) { (void)st; }
  virtual void do_step(double* x, const double* g, sampler* source);
  /// Throws for a non-finite g; else records max|g| in gmax_ (the diagonal rules' overflow test).
  void check_gradient(const double* g);

  index_t dim_;
  double gmax_ = 0.0;
  std::int64_t steps_ = 0;
  std::int64_t moves_ = 0;
};

using optimizer_ptr = std::shared_ptr<optimizer>;

/// x <- x - lr_t g.
class sgd final : public optimizer {
 public:
  sgd(index_t dim, schedule_ptr lr);
  double lr(std::int64_t t) const override { return (*lr_)(t); }
  std::string describe() const override;
  std::string kind() const override { return "SGD"; }
  const schedule_ptr& lr_schedule() const noexcept { return lr_; }

 protected:
  void move(double* x, const double* g, double lr, sampler* source) override;

 private:
  schedule_ptr lr_;
};

/// Algorithm 1: x <- x - lr_t A(x_t) g_t, with `direction(x, g, out)` writing out = A(x) g.
class preconditioned_sgd final : public optimizer {
 public:
  using direction_fn = std::function<void(const double* x, const double* g, double* out)>;
  preconditioned_sgd(index_t dim, schedule_ptr lr, direction_fn direction,
                     std::string name = "callable");
  /// The idealized adaptive method: A(x) = f(E[g g^T](x)) with f of `spec` (eps > 0 unless
  /// E[g g^T] is non-singular), from problem.second_moment().
  static std::shared_ptr<preconditioned_sgd> idealized(problem_ptr problem, schedule_ptr lr,
                                                       const root_spec& spec);
  double lr(std::int64_t t) const override { return (*lr_)(t); }
  std::string describe() const override;
  std::string kind() const override { return "PreconditionedSGD"; }

 protected:
  void move(double* x, const double* g, double lr, sampler* source) override;

 private:
  schedule_ptr lr_;
  direction_fn direction_;
  std::string name_;
  std::vector<double> dir_;
};

/// How full and block estimates turn into the direction A g.
enum class root_solver {
  eigh,     ///< an eigendecomposition of G_t at every refresh (exact when refresh_every = 1).
  lowrank,  ///< exact at every step to `tol`: see rmsprop_options::solver.
};
root_solver parse_root_solver(std::string_view name);
std::string_view to_string(root_solver s);

struct rmsprop_options {
  double eps = 1e-8;                       ///< > 0.
  structure layout = structure::full;
  root_form form = root_form::inv_sqrt;
  std::int64_t burn_in = 0;                ///< W >= 0 (Algorithm 3).
  /// eigh: refactor G every this many updates (1: exact; k > 1: A is up to k - 1 updates stale).
  /// lowrank: the period of the full eigendecomposition (the step is exact regardless).
  std::int64_t refresh_every = 1;
  std::vector<index_t> block_sizes;        ///< structure::block only.
  /// root_solver::lowrank with structure::block: the block engine (block_engine.hpp), exact
  /// at every step for both forms, refreshes staggered across blocks.
  /// root_solver::lowrank with structure::full (form inv_sqrt; refresh_every <= 256):
  /// G_t + eps I = B + U W U^T with B
  /// the estimate at the last eigendecomposition (decayed) plus eps I and U the gradients
  /// since, and A g = (2 / pi) int_0^inf (G_t + eps I + s^2 I)^(-1) g ds evaluated by the
  /// trapezoidal rule in log s (error below tol relative) with Woodbury solves in B's
  /// eigenbasis: O(d^2 + d k^2 n_nodes) per step instead of an O(d^3) eigendecomposition.
  root_solver solver = root_solver::eigh;
  double tol = 1e-10;                      ///< lowrank: the quadrature's relative accuracy.
  /// The fallback policy for failed refactorisations: the block engine's (structure block,
  /// solver lowrank; block_engine.hpp) or the estimator's (the factorisations of full and block
  /// with solver eigh; estimators.hpp). The tridiagonal route (full, eigh, refresh_every = 1,
  /// d > 48) and the full lowrank solver have none: their failures raise at once.
  std::int64_t max_consecutive_failures = 3;
  double fallback_eps = 0.0;
};

/// Algorithms 2 and 3. See the file comment for the exact rule.
namespace detail {
class tridiagonal_apply;
}

class rmsprop final : public optimizer {
 public:
  /// @throws invalid_argument for dim < 1, a null schedule, eps <= 0 or not finite, burn_in < 0,
  ///   refresh_every < 1, bad block_sizes, or a lowrank solver with another structure or form.
  rmsprop(index_t dim, schedule_ptr lr, schedule_ptr beta, rmsprop_options opts = {});
  ~rmsprop() override;
  std::int64_t burn_in_remaining() const noexcept override;
  bool estimates() const noexcept override { return true; }
  double lr(std::int64_t t) const override { return (*lr_)(t); }
  std::string describe() const override;
  std::string kind() const override { return "RMSProp"; }
  const rmsprop_options& options() const noexcept { return opts_; }
  const schedule_ptr& lr_schedule() const noexcept { return lr_; }
  const schedule_ptr& beta_schedule() const noexcept { return beta_; }
  /// Updates of the estimate so far.
  std::int64_t updates() const noexcept;
  /// The estimate G_t in the layout of ema_estimator::estimate() (d x d, d, or blocks).
  std::vector<double> estimate() const;
  /// Per-block statistics: the block engine's (structure block, solver lowrank), or the
  /// estimator's fallback counters (full, block with solver eigh; the other fields empty).
  /// Structure full's exact routes (solver lowrank; solver eigh with refresh_every 1 and
  /// d > 48, the tridiagonal route) also count in failed_refreshes each failed solve of their
  /// chain: a lowrank refresh that fails hands the step to the tridiagonal route, and a
  /// tridiagonal solve that fails to the estimator's eigendecomposition (with its fallback
  /// policy); the lowrank refresh is retried at the next step.
  /// @throws invalid_argument for structure diag and the closed 2 x 2 form.
  block_statistics statistics() const;
  /// The test hook of the block engine or the estimator (inject_refresh_failures /
  /// inject_factor_failures). On structure full's exact routes, the next `attempts` directions
  /// see the first `stages` solvers of the chain fail (lowrank refresh, tridiagonal, then the
  /// estimator's eigendecomposition and its fallback_eps retry).
  void inject_refresh_failures(index_t block, std::int64_t attempts, int stages);

 protected:
  void move(double* x, const double* g, double lr, sampler* source) override;
  void do_observe(const double* g) override;
  void save_extra(optimizer_state& st) const override;
  void load_extra(const optimizer_state& st) override;

 private:
  struct lowrank_state;
  void build_parts(bool lowrank);  // the constructor's allocations, after its checks
  void update_estimate(const double* g);
  void lowrank_direction(const double* g);
  // Structure full's fallback chain from position `stage` on (see statistics()).
  void tridiagonal_direction(const double* g, int stage);
  void estimator_direction(const double* g, int stage);
  bool injected_route_failure(int stage) const noexcept {
    return route_inject_attempts_ > 0 && stage < route_inject_stages_;
  }
  std::int64_t route_failures_ = 0;  // failed lowrank refreshes and tridiagonal solves
  std::int64_t route_inject_attempts_ = 0;
  int route_inject_stages_ = 0;
  schedule_ptr lr_, beta_;
  rmsprop_options opts_;
  root_spec spec_;
  // diag, and full with d = 2 (closed form): the estimate kept here, with its update count.
  std::int64_t own_updates_ = 0;
  bool closed_2x2_ = false;
  double g2_[3] = {0.0, 0.0, 0.0};                   // closed form: G = [g0 g1; g1 g2]
  double g2_beta_product_ = 1.0;                     // closed form: prod beta_t, as saved
  // diag: the estimate, in huge pages when large (a step streams it with x and g).
  std::vector<double, detail::huge_page_allocator<double>> v_;
  std::unique_ptr<ema_estimator<double>> est_;       // full, block (solver eigh)
  std::unique_ptr<block_engine<double>> blocks_;      // block, solver lowrank
  std::unique_ptr<lowrank_state> lowrank_;
  std::unique_ptr<detail::tridiagonal_apply> tridiagonal_;  // full, exact, d > 48
  std::vector<double> dir_;
};

struct adam_options {
  double eps = 1e-8;  ///< > 0.
  structure layout = structure::diag;
  root_form form = root_form::adam;
  std::int64_t refresh_every = 1;
  std::vector<index_t> block_sizes;
  /// full and block: the estimator's fallback policy for failed factorisations (estimators.hpp).
  std::int64_t max_consecutive_failures = 3;
  double fallback_eps = 0.0;
};

class adam final : public optimizer {
 public:
  /// @throws invalid_argument for dim < 1, beta1 outside [0, 1), eps <= 0, bad blocks.
  adam(index_t dim, schedule_ptr lr, double beta1, schedule_ptr beta2, adam_options opts = {});
  bool estimates() const noexcept override { return true; }
  double lr(std::int64_t t) const override { return (*lr_)(t); }
  std::string describe() const override;
  std::string kind() const override { return "Adam"; }
  /// full, block: the estimator's fallback counters. @throws invalid_argument for diag.
  block_statistics statistics() const;
  void inject_refresh_failures(index_t block, std::int64_t attempts, int stages);

 protected:
  void move(double* x, const double* g, double lr, sampler* source) override;
  void do_observe(const double* g) override;
  void save_extra(optimizer_state& st) const override;
  void load_extra(const optimizer_state& st) override;

 private:
  schedule_ptr lr_, beta2_;
  double beta1_;
  adam_options opts_;
  root_spec spec_;
  std::int64_t updates_ = 0;
  double beta2_product_ = 1.0;
  std::vector<double, detail::huge_page_allocator<double>> m_, v_;  // diag: streamed each step
  std::vector<double> mhat_, dir_;
  std::unique_ptr<ema_estimator<double>> est_;  // full, block
};

/// Algorithm 4 over a base rule. With hallucinate = S > 0 (base must estimate), after each large
/// step from x_t to x_(t+1) (projected) the base's estimate is fed S stochastic gradients taken
/// at x_t + (k / S)(x_(t+1) - x_t), k = 1..S: so that, as far as the estimator sees, no step is
/// longer than max(lr, r / S). This is this library's reading of the paper's Appendix B.
class saddle_escape final : public optimizer {
 public:
  /// @throws invalid_argument for a null base, r not finite or <= 0, t_thresh < 1,
  ///   hallucinate < 0, or hallucinate > 0 with a base that keeps no estimate.
  saddle_escape(optimizer_ptr base, double r, std::int64_t t_thresh, std::int64_t hallucinate = 0);
  std::int64_t burn_in_remaining() const noexcept override { return base_->burn_in_remaining(); }
  bool estimates() const noexcept override { return base_->estimates(); }
  double lr(std::int64_t t) const override;
  std::string describe() const override;
  std::string kind() const override { return "SaddleEscape"; }
  const optimizer_ptr& base() const noexcept { return base_; }
  double r() const noexcept { return r_; }
  std::int64_t t_thresh() const noexcept { return t_thresh_; }
  std::int64_t hallucinate() const noexcept { return hallucinate_; }

 protected:
  void do_step(double* x, const double* g, sampler* source) override;
  void move(double* x, const double* g, double lr, sampler* source) override;
  void do_observe(const double* g) override;
  void save_extra(optimizer_state& st) const override;
  void load_extra(const optimizer_state& st) override;

 private:
  optimizer_ptr base_;
  double r_;
  std::int64_t t_thresh_, hallucinate_;
  std::vector<double> x_prev_, point_, g_extra_;
};

}  // namespace saddlescape
