#include <saddlescape/optimizers.hpp>

#include <saddlescape/detail/formulas.hpp>

#include "checks.hpp"
#include "lapack.hpp"
#include "memory.hpp"
#include "diag_kernels.hpp"
#include "parallel.hpp"
#include "tridiagonal.hpp"

#include <Eigen/Cholesky>
#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace saddlescape {

using detail::concat;

namespace {

constexpr double pi = 3.14159265358979323846;

schedule_ptr require(schedule_ptr s, const char* name) {
  SADDLESCAPE_EXPECTS(s != nullptr, name, " must not be null");
  return s;
}

void check_eps(double eps) {
  SADDLESCAPE_EXPECTS(std::isfinite(eps) && eps > 0.0, "eps must be finite and > 0, got ", eps);
}

// A constant beta is checked when the optimizer is built, whatever its structure; a schedule
// is checked at each step it is used.
schedule_ptr checked_beta(schedule_ptr s, const char* name) {
  s = require(std::move(s), name);
  if (const auto* c = dynamic_cast<const constant_schedule*>(s.get()))
    SADDLESCAPE_EXPECTS(c->value() >= 0.0 && c->value() < 1.0, name, " must be in [0, 1), got ",
                        c->value());
  return s;
}

double beta_at(const schedule& beta, std::int64_t t) {
  const double b = beta(t);
  SADDLESCAPE_EXPECTS(b >= 0.0 && b < 1.0, "beta must be in [0, 1), got beta_t = ", b,
                      " at update t = ", t);
  return b;
}

// Checks an optimizer state's fields before anything is assigned.
const std::vector<double>& state_array(const optimizer_state& st, const std::string& name,
                                       std::size_t size) {
  const auto it = st.arrays.find(name);
  SADDLESCAPE_EXPECTS(it != st.arrays.end(), "the state has no array '", name, "'");
  SADDLESCAPE_EXPECTS(it->second.size() == size, "the state's '", name, "' must have ", size,
                      " entries, got ", it->second.size());
  for (std::size_t i = 0; i < size; ++i)
    SADDLESCAPE_EXPECTS(std::isfinite(it->second[i]), "the state's '", name,
                        "' must be finite, got ", it->second[i], " at index ", i);
  return it->second;
}

double state_scalar(const optimizer_state& st, const std::string& name) {
  const auto it = st.scalars.find(name);
  SADDLESCAPE_EXPECTS(it != st.scalars.end(), "the state has no scalar '", name, "'");
  SADDLESCAPE_EXPECTS(std::isfinite(it->second), "the state's '", name, "' must be finite, got ",
                      it->second);
  return it->second;
}

std::int64_t state_count(const optimizer_state& st, const std::string& name) {
  const double v = state_scalar(st, name);
  SADDLESCAPE_EXPECTS(v >= 0.0 && v <= 9007199254740992.0 && v == std::floor(v), "the state's '",
                      name, "' must be a count (an integer >= 0), got ", v);
  return static_cast<std::int64_t>(v);
}

void save_estimator(const ema_estimator<double>& est, optimizer_state& st) {
  auto s = est.save();
  st.arrays["S"] = std::move(s.data);
  st.scalars["estimate.steps"] = static_cast<double>(s.steps);
  st.scalars["estimate.scale"] = s.scale;
  st.scalars["estimate.beta_product"] = s.beta_product;
  st.scalars["estimate.factored_at"] = static_cast<double>(s.factored_at);
  st.arrays["estimate.fallback_counters"] = est.fallback_counters();
}

ema_estimator<double>::state read_estimator(const optimizer_state& st, std::size_t size) {
  ema_estimator<double>::state s;
  s.data = state_array(st, "S", size);
  s.steps = state_count(st, "estimate.steps");
  s.scale = state_scalar(st, "estimate.scale");
  s.beta_product = state_scalar(st, "estimate.beta_product");
  // Optional: a state from the closed-form 2 x 2 path has no factorisation schedule.
  if (st.scalars.count("estimate.factored_at")) {
    const double f = state_scalar(st, "estimate.factored_at");
    SADDLESCAPE_EXPECTS(f == std::floor(f) && f >= -1.0 && f <= 9007199254740992.0,
                        "the state's 'estimate.factored_at' must be an integer >= -1, got ", f);
    s.factored_at = static_cast<std::int64_t>(f);
  }
  return s;
}

// Loads the estimator and its fallback counters (optional: states from before them have
// none), checking both before either changes.
void load_estimator(ema_estimator<double>& est, const optimizer_state& st) {
  const auto s = read_estimator(st, static_cast<std::size_t>(est.estimate_size()));
  const auto old = est.fallback_counters();
  const auto it = st.arrays.find("estimate.fallback_counters");
  if (it != st.arrays.end())
    est.load_fallback_counters(state_array(st, "estimate.fallback_counters", old.size()));
  try {
    est.load(s);
  } catch (...) {
    est.load_fallback_counters(old);
    throw;
  }
  if (it == st.arrays.end()) est.load_fallback_counters(std::vector<double>(old.size(), 0.0));
}

block_statistics estimator_statistics(const ema_estimator<double>& est) {
  const fallback_statistics f = est.fallback_stats();
  block_statistics s;
  s.failed_refreshes = f.failed_refreshes;
  s.float64_retries = f.float64_retries;  // zeros: the optimizers' estimates are float64
  s.eps_retries = f.eps_retries;
  s.kept_bases = f.kept_bases;
  s.consecutive_failures = f.consecutive_failures;
  return s;
}

// x <- x - lr d, after checking that the step is finite: a direction that overflowed must not
// reach x.
void apply_direction(double* x, const double* dir, index_t d, double lr, const char* what) {
  if (!detail::all_finite(dir, d))
    SADDLESCAPE_NUMERICAL_FAIL("the direction ", what, " is not finite; x is unchanged");
  for (index_t i = 0; i < d; ++i) x[i] -= lr * dir[i];
}

// (inner, outer) of detail::diag_denominator for a form: one loop serves both forms.
struct diag_form {
  double inner, outer;
  diag_form(root_form form, double eps)
      : inner(form == root_form::adam ? 0.0 : eps), outer(form == root_form::adam ? eps : 0.0) {}
};

// max|g| as a bit pattern (diag_kernels.hpp): every NaN and Inf gives one >= that of +Inf. This
// check runs before every step over all of g, so its speed matters as much as the step's.
constexpr std::int64_t infinity_bits = detail::abs_bits_infinity<double>();

double checked_lr(double rate, std::int64_t t) {
  SADDLESCAPE_EXPECTS(std::isfinite(rate) && rate >= 0.0,
                      "lr must be finite and >= 0, got lr_t = ", rate, " at t = ", t);
  return rate;
}

// The eigenvalues of a d x d estimate are at most d max|G_ij| <= d max_t |g_t|^2, since each
// entry is a convex combination of g_i g_j. Refusing g with d max|g|^2 near overflow before the
// update keeps every later eigendecomposition finite, so no step fails after changing the state.
void check_spectrum_fits(double gmax, index_t d, const char* rule) {
  if (!(gmax * gmax * static_cast<double>(d) <= 0.25 * std::numeric_limits<double>::max()))
    SADDLESCAPE_NUMERICAL_FAIL(rule, ": max|g| = ", gmax, " is too large: the estimate's ",
                               "eigenvalues (up to d max|g|^2) would overflow float64; the "
                               "state is unchanged");
}

void check_square_fits(double gmax, const char* rule) {
  if (!(gmax * gmax <= std::numeric_limits<double>::max()))
    SADDLESCAPE_NUMERICAL_FAIL(rule, ": max|g| = ", gmax,
                               " is too large, g^2 overflows float64; the state is unchanged");
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// optimizer

optimizer::optimizer(index_t dim) : dim_(dim) {
  SADDLESCAPE_EXPECTS(dim >= 1, "dim must be >= 1, got ", dim);
}

void optimizer::check_gradient(const double* g) {
  std::int64_t bits = 0;
  if (dim_ < detail::parallel_threshold) {  // the common case, without allocation
    bits = detail::max_abs_bits(dim_, g);
  } else {
    std::vector<std::int64_t> part(detail::pass_threads(), 0);
    const unsigned parts = detail::parallel_chunks(
        dim_, [&](unsigned k, index_t begin, index_t end) {
          part[k] = detail::max_abs_bits(end - begin, g + begin);
        });
    bits = *std::max_element(part.begin(), part.begin() + parts);
  }
  if (bits >= infinity_bits) detail::report_non_finite(g, 1, dim_, "g", true);
  std::memcpy(&gmax_, &bits, sizeof gmax_);
}

void optimizer::step(double* x, const double* g, sampler* source) {
  check_gradient(g);
  do_step(x, g, source);
}

void optimizer::do_step(double* x, const double* g, sampler* source) {
  if (burn_in_remaining() > 0) {
    do_observe(g);
    ++steps_;
    return;
  }
  const double rate = checked_lr(lr(moves_), moves_);
  move(x, g, rate, source);
  ++moves_;
  ++steps_;
}

void optimizer::step_with_lr(double* x, const double* g, double lr, sampler* source) {
  check_gradient(g);
  move(x, g, lr, source);
  ++moves_;
  ++steps_;
}

void optimizer::observe(const double* g) {
  check_gradient(g);
  do_observe(g);
}

optimizer_state optimizer::state_dict() const {
  optimizer_state st;
  st.kind = kind();
  st.scalars["steps"] = static_cast<double>(steps_);
  st.scalars["moves"] = static_cast<double>(moves_);
  save_extra(st);
  return st;
}

void optimizer::load_state_dict(const optimizer_state& st) {
  SADDLESCAPE_EXPECTS(st.kind == kind(), "the state is from a ", st.kind, " optimizer, not ",
                      kind());
  const std::int64_t steps = state_count(st, "steps");
  const std::int64_t moves = state_count(st, "moves");
  SADDLESCAPE_EXPECTS(moves <= steps, "the state's moves (", moves, ") exceed its steps (", steps,
                      ")");
  load_extra(st);
  steps_ = steps;
  moves_ = moves;
}

// ---------------------------------------------------------------------------------------------
// sgd, preconditioned_sgd

sgd::sgd(index_t dim, schedule_ptr lr) : optimizer(dim), lr_(require(std::move(lr), "lr")) {}

std::string sgd::describe() const { return concat("SGD(dim=", dim_, ", lr=", lr_->describe(), ")"); }

void sgd::move(double* x, const double* g, double lr, sampler*) {
  for (index_t i = 0; i < dim_; ++i) x[i] -= lr * g[i];
}

preconditioned_sgd::preconditioned_sgd(index_t dim, schedule_ptr lr, direction_fn direction,
                                       std::string name)
    : optimizer(dim), lr_(require(std::move(lr), "lr")), direction_(std::move(direction)),
      name_(std::move(name)), dir_(static_cast<std::size_t>(dim)) {
  SADDLESCAPE_EXPECTS(static_cast<bool>(direction_), "the preconditioner callable is empty");
}

std::shared_ptr<preconditioned_sgd> preconditioned_sgd::idealized(problem_ptr problem,
                                                                  schedule_ptr lr,
                                                                  const root_spec& spec) {
  SADDLESCAPE_EXPECTS(problem != nullptr, "problem must not be null");
  SADDLESCAPE_EXPECTS(problem->has_second_moment(), problem->describe(),
                      " does not know E[g g^T], so it has no idealized preconditioner");
  spec.validate();
  const index_t d = problem->dim();
  // The factorisation and its input are per optimizer: copies of the callable share them, and
  // an optimizer is used by one thread at a time.
  auto root = std::make_shared<eigen_root<double>>(d);
  auto G = std::make_shared<std::vector<double>>(static_cast<std::size_t>(d * d));
  direction_fn fn = [problem, spec, root, G](const double* x, const double* g, double* out) {
    problem->second_moment(x, G->data());
    root->factor(G->data(), "E[g g^T]");
    root->apply(spec, g, 1, out);
  };
  return std::make_shared<preconditioned_sgd>(
      d, std::move(lr), std::move(fn),
      concat("idealized ", to_string(spec.form), " eps=", spec.eps, " of ", problem->describe()));
}

std::string preconditioned_sgd::describe() const {
  return concat("PreconditionedSGD(dim=", dim_, ", lr=", lr_->describe(), ", A=", name_, ")");
}

void preconditioned_sgd::move(double* x, const double* g, double lr, sampler*) {
  direction_(x, g, dir_.data());
  apply_direction(x, dir_.data(), dim_, lr, "A(x) g");
}

// ---------------------------------------------------------------------------------------------
// rmsprop

root_solver parse_root_solver(std::string_view name) {
  if (name == "eigh") return root_solver::eigh;
  if (name == "lowrank") return root_solver::lowrank;
  throw invalid_argument(concat("solver must be 'eigh' or 'lowrank', got '", name, "'"));
}

std::string_view to_string(root_solver s) { return s == root_solver::eigh ? "eigh" : "lowrank"; }

// The lowrank solver's factorisation: G_t = gamma G_ref + sum_i w_i g_i g_i^T, with
// G_ref = V diag(lambda) V^T from the last refresh and u_i = V^T g_i kept in its eigenbasis.
struct rmsprop::lowrank_state {
  explicit lowrank_state(index_t d, std::int64_t period)
      : root(d), dense(static_cast<std::size_t>(d * d)),
        u(static_cast<std::size_t>(period * d)), w(static_cast<std::size_t>(period)),
        y(static_cast<std::size_t>(d)), z(static_cast<std::size_t>(d)),
        e(static_cast<std::size_t>(d)), a(static_cast<std::size_t>(d)),
        diag(static_cast<std::size_t>(d)) {}
  eigen_root<double> root;
  std::vector<double> dense;
  bool valid = false;      // root holds G_ref and u, w describe the updates since
  double gamma = 1.0;
  index_t k = 0;           // updates since the refresh
  bool y_is_last = false;  // y = V^T g for the latest update (saves a pass over V)
  std::vector<double> u, w, y, z, e, a, diag;
  Eigen::MatrixXd q, c, E, p, pe, qy, r, cw, mk;
  Eigen::VectorXd omega;
};

rmsprop::rmsprop(index_t dim, schedule_ptr lr, schedule_ptr beta, rmsprop_options opts)
    : optimizer(dim), lr_(require(std::move(lr), "lr")), beta_(checked_beta(std::move(beta), "beta")),
      opts_(std::move(opts)), spec_{2, opts_.eps, opts_.form} {
  check_eps(opts_.eps);
  SADDLESCAPE_EXPECTS(opts_.burn_in >= 0, "burn_in must be >= 0, got ", opts_.burn_in);
  SADDLESCAPE_EXPECTS(opts_.refresh_every >= 1, "refresh_every must be >= 1, got ",
                      opts_.refresh_every);
  SADDLESCAPE_EXPECTS(std::isfinite(opts_.tol) && opts_.tol > 0.0 && opts_.tol < 1.0,
                      "tol must be in (0, 1), got ", opts_.tol);
  SADDLESCAPE_EXPECTS(opts_.max_consecutive_failures >= 1, "max_consecutive_failures must be "
                      ">= 1, got ", opts_.max_consecutive_failures);
  SADDLESCAPE_EXPECTS(std::isfinite(opts_.fallback_eps) && opts_.fallback_eps >= 0.0,
                      "fallback_eps must be finite and >= 0, got ", opts_.fallback_eps);
  const bool lowrank = opts_.solver == root_solver::lowrank;
  if (lowrank) {
    SADDLESCAPE_EXPECTS(opts_.refresh_every <= max_lowrank_period, "solver 'lowrank' needs "
                        "refresh_every <= ", max_lowrank_period, " (its cost per step grows like "
                        "refresh_every^2), got ", opts_.refresh_every);
    SADDLESCAPE_EXPECTS(opts_.layout != structure::diag,
                        "solver 'lowrank' needs structure 'full' or 'block', got 'diag'");
    SADDLESCAPE_EXPECTS(opts_.layout == structure::block || opts_.form == root_form::inv_sqrt,
                        "solver 'lowrank' with structure 'full' computes the inv_sqrt form only, "
                        "got form '", to_string(opts_.form), "' (structure 'block' has both)");
  }
  // The diagonal's moment and direction; full: the estimate and the factorisation's or the
  // tridiagonal route's d^2 buffers (the estimator and block engine check their own too).
  const double dd = static_cast<double>(dim);
  const double bytes = 8.0 * (opts_.layout == structure::diag ? 2.0 * dd
                              : opts_.layout == structure::full ? 4.0 * dd * dd + dd : dd);
  const std::string what = concat("RMSProp with dim = ", dim, " (structure '",
                                  to_string(opts_.layout), "')");
  detail::expect_memory(bytes, what);
  detail::allocating(bytes, what, [&] { build_parts(lowrank); });
}

void rmsprop::build_parts(bool lowrank) {
  const index_t dim = dim_;
  if (opts_.layout == structure::diag) {
    SADDLESCAPE_EXPECTS(opts_.block_sizes.empty(), "block_sizes are for structure 'block' only");
    v_.assign(static_cast<std::size_t>(dim), 0.0);
  } else if (opts_.layout == structure::full && dim == 2 && !lowrank &&
             opts_.refresh_every == 1) {
    SADDLESCAPE_EXPECTS(opts_.block_sizes.empty(), "block_sizes are for structure 'block' only");
    closed_2x2_ = true;
  } else if (lowrank && opts_.layout == structure::block) {
    SADDLESCAPE_EXPECTS(!opts_.block_sizes.empty(), "structure 'block' needs block_sizes");
    index_t total = 0;
    for (const index_t b : opts_.block_sizes) total += b;
    SADDLESCAPE_EXPECTS(total == dim, "block_sizes must sum to dim = ", dim, ", they sum to ",
                        total);
    block_engine_options bo;
    bo.eps = opts_.eps;
    bo.form = opts_.form;
    bo.refresh_every = opts_.refresh_every;
    bo.tol = opts_.tol;
    bo.max_consecutive_failures = opts_.max_consecutive_failures;
    bo.fallback_eps = opts_.fallback_eps;
    blocks_ = std::make_unique<block_engine<double>>(opts_.block_sizes, beta_, bo);
  } else {
    est_ = std::make_unique<ema_estimator<double>>(dim, beta_, opts_.layout, opts_.block_sizes,
                                                   false, lowrank ? 1 : opts_.refresh_every);
    est_->set_fallback({opts_.max_consecutive_failures, opts_.fallback_eps});
    if (lowrank) lowrank_ = std::make_unique<lowrank_state>(dim, opts_.refresh_every);
    // Exact every step: no factorisation to reuse, so the eigenvectors are never formed.
    if (!lowrank && opts_.layout == structure::full && opts_.refresh_every == 1 &&
        dim > small_matrix_limit)
      tridiagonal_ = std::make_unique<detail::tridiagonal_apply>(dim);
  }
  dir_.resize(static_cast<std::size_t>(dim));
}

rmsprop::~rmsprop() = default;

std::int64_t rmsprop::burn_in_remaining() const noexcept {
  return std::max<std::int64_t>(0, opts_.burn_in - (steps_ - moves_));
}

std::int64_t rmsprop::updates() const noexcept {
  return blocks_ ? blocks_->updates() : est_ ? est_->steps() : own_updates_;
}

std::string rmsprop::describe() const {
  return concat("RMSProp(dim=", dim_, ", lr=", lr_->describe(), ", beta=", beta_->describe(),
                ", eps=", opts_.eps, ", structure=", to_string(opts_.layout), ", form=",
                to_string(opts_.form), ", burn_in=", opts_.burn_in, ", refresh_every=",
                opts_.refresh_every, ", solver=", to_string(opts_.solver), ")");
}

std::vector<double> rmsprop::estimate() const {
  if (opts_.layout == structure::diag) return {v_.begin(), v_.end()};
  if (closed_2x2_) return {g2_[0], g2_[1], g2_[1], g2_[2]};
  if (blocks_) {
    std::vector<double> out(static_cast<std::size_t>(blocks_->estimate_size()));
    blocks_->estimate(out.data());
    return out;
  }
  std::vector<double> out(static_cast<std::size_t>(est_->estimate_size()));
  est_->estimate(out.data());
  return out;
}

block_statistics rmsprop::statistics() const {
  SADDLESCAPE_EXPECTS(blocks_ != nullptr || est_ != nullptr, "statistics are kept by RMSProp "
                      "with a factorised estimate (structure 'full' or 'block', not 'diag' or the "
                      "closed 2 x 2 form)");
  if (blocks_) return blocks_->statistics();
  block_statistics s = estimator_statistics(*est_);
  if (!s.failed_refreshes.empty()) s.failed_refreshes[0] += route_failures_;
  return s;
}

void rmsprop::inject_refresh_failures(index_t block, std::int64_t attempts, int stages) {
  SADDLESCAPE_EXPECTS(blocks_ != nullptr || est_ != nullptr, "inject_refresh_failures needs "
                      "RMSProp with a factorised estimate (structure 'full' or 'block')");
  if (blocks_) {
    blocks_->inject_refresh_failures(block, attempts, stages);
  } else if (lowrank_ || tridiagonal_) {
    SADDLESCAPE_EXPECTS(block == 0, "block must be 0 for structure 'full', got ", block);
    SADDLESCAPE_EXPECTS(attempts >= 0, "attempts must be >= 0, got ", attempts);
    SADDLESCAPE_EXPECTS(stages >= 0 && stages <= 4, "stages must be in [0, 4], got ", stages);
    route_inject_attempts_ = attempts;
    route_inject_stages_ = stages;
  } else {
    est_->inject_factor_failures(block, attempts, stages);
  }
}

void rmsprop::update_estimate(const double* g) {
  if (opts_.layout == structure::diag) {
    const double b = beta_at(*beta_, own_updates_);
    check_square_fits(gmax_, "RMSProp");
    detail::diag_observe(dim_, b, 1.0 - b, 0.0, g, nullptr, v_.data());
    ++own_updates_;
    return;
  }
  if (closed_2x2_) {
    const double b = beta_at(*beta_, own_updates_), a = 1.0 - b;
    const double n0 = b * g2_[0] + a * g[0] * g[0], n1 = b * g2_[1] + a * g[0] * g[1],
                 n2 = b * g2_[2] + a * g[1] * g[1];
    if (!(std::isfinite(n0) && std::isfinite(n1) && std::isfinite(n2)))
      SADDLESCAPE_NUMERICAL_FAIL("RMSProp: the estimate would overflow float64; it is unchanged");
    g2_[0] = n0;
    g2_[1] = n1;
    g2_[2] = n2;
    g2_beta_product_ *= b;
    ++own_updates_;
    return;
  }
  check_spectrum_fits(gmax_, dim_, "RMSProp");
  if (blocks_) {
    blocks_->update(g);
    return;
  }
  const double b = lowrank_ ? beta_at(*beta_, est_->steps()) : 0.0;
  est_->update(g);
  if (!lowrank_) return;
  auto& L = *lowrank_;
  L.y_is_last = false;
  // G_ref includes the update that refreshed it, so refresh_every - 1 more fit in U.
  if (!L.valid || L.k + 1 >= opts_.refresh_every) {
    L.valid = false;  // refreshed from G_t when a direction is next needed
    return;
  }
  const int d = static_cast<int>(dim_);
  double* row = L.u.data() + L.k * dim_;
  detail::lapack::gemv('T', d, d, 1.0, L.root.eigenvectors(), d, g, 0.0, row);
  L.gamma *= b;
  for (index_t i = 0; i < L.k; ++i) L.w[static_cast<std::size_t>(i)] *= b;
  L.w[static_cast<std::size_t>(L.k)] = 1.0 - b;
  ++L.k;
  std::copy(row, row + dim_, L.y.data());
  L.y_is_last = true;
}

void rmsprop::do_observe(const double* g) { update_estimate(g); }

namespace {

// A = f(G) applied to g for a symmetric positive semi-definite 2 x 2 G = [a b; b c], through
// its Jacobi rotation (Golub and Van Loan, Sec. 8.5.2): stable for any conditioning.
void closed_form_2x2(const double* G, const root_spec& spec, const double* g, double* out) {
  const double a = G[0], b = G[1], c = G[2];
  double cs = 1.0, sn = 0.0, l1 = a, l2 = c;
  if (b != 0.0) {
    const double tau = (c - a) / (2.0 * b);
    const double t = (tau >= 0.0 ? 1.0 : -1.0) / (std::abs(tau) + std::hypot(1.0, tau));
    cs = 1.0 / std::hypot(1.0, t);
    sn = t * cs;
    l1 = a - t * b;
    l2 = c + t * b;
  }
  // Eigenvalues within rounding of zero count as zero, as in eigen_root.
  const double tol = clip_tolerance<double>(2) * std::max(std::abs(l1), std::abs(l2));
  auto f = [&](double l) {
    l = l <= tol ? 0.0 : l;
    return spec.form == root_form::adam ? 1.0 / (std::sqrt(l) + spec.eps)
                                        : 1.0 / std::sqrt(l + spec.eps);
  };
  // Eigenvectors (cs, -sn) and (sn, cs).
  const double p1 = cs * g[0] - sn * g[1], p2 = sn * g[0] + cs * g[1];
  const double f1 = f(l1) * p1, f2 = f(l2) * p2;
  out[0] = cs * f1 + sn * f2;
  out[1] = -sn * f1 + cs * f2;
}

}  // namespace

void rmsprop::move(double* x, const double* g, double lr, sampler*) {
  if (opts_.layout == structure::diag) {
    const double b = beta_at(*beta_, own_updates_);
    check_square_fits(gmax_, "RMSProp");
    const diag_form f(opts_.form, opts_.eps);
    double* v = v_.data();
    detail::parallel_chunks(dim_, [&](unsigned, index_t i, index_t end) {
      detail::rmsprop_diag(end - i, b, 1.0 - b, lr, 1.0, f.inner, f.outer, 0.0, g + i, v + i,
                           x + i);
    });
    ++own_updates_;
    return;
  }
  // |A g| <= max f * |g|_2: a step that could overflow is refused before the estimate changes.
  const double fmax = opts_.form == root_form::adam ? 1.0 / opts_.eps : 1.0 / std::sqrt(opts_.eps);
  if (!(lr * fmax * gmax_ * std::sqrt(static_cast<double>(dim_)) <
        std::numeric_limits<double>::max()))
    SADDLESCAPE_NUMERICAL_FAIL("RMSProp: a step with max|g| = ", gmax_, ", lr = ", lr,
                               " and eps = ", opts_.eps, " could overflow; the state is unchanged");
  if (blocks_) {
    check_spectrum_fits(gmax_, dim_, "RMSProp");
    blocks_->update_direction(g, dir_.data());
    apply_direction(x, dir_.data(), dim_, lr, "(G + eps I)^(-1/2) g");
    return;
  }
  update_estimate(g);
  if (closed_2x2_) {
    closed_form_2x2(g2_, spec_, g, dir_.data());
  } else if (lowrank_) {
    const bool refresh = !lowrank_->valid;
    lowrank_direction(g);  // (may use tridiagonal_ as a fallback, so it is tested first)
    // The test hook's attempts count refreshes, as the estimators' count factorisations.
    if (refresh && route_inject_attempts_ > 0) --route_inject_attempts_;
  } else if (tridiagonal_) {
    tridiagonal_direction(g, 0);
    if (route_inject_attempts_ > 0) --route_inject_attempts_;
  } else {
    est_->apply(spec_, g, dir_.data());
  }
  apply_direction(x, dir_.data(), dim_, lr, "(G + eps I)^(-1/2) g");
}

void rmsprop::tridiagonal_direction(const double* g, int stage) {
  if (!tridiagonal_) tridiagonal_ = std::make_unique<detail::tridiagonal_apply>(dim_);
  try {
    if (injected_route_failure(stage))
      SADDLESCAPE_NUMERICAL_FAIL("the tridiagonal route failed (injected by the test hook)");
    est_->estimate(tridiagonal_->matrix());
    tridiagonal_->apply(spec_, g, dir_.data(), "the estimate G_t");
    return;
  } catch (const numerical_error&) {
    ++route_failures_;
  }
  estimator_direction(g, stage + 1);
}

void rmsprop::estimator_direction(const double* g, int stage) {
  if (route_inject_attempts_ > 0) {
    // The chain's remaining injected failures go to the estimator's own hook, whose stages
    // are its eigendecomposition (0), a float64 retry (1, none for float64) and fallback_eps.
    const int left = std::max(0, route_inject_stages_ - stage);
    est_->inject_factor_failures(0, left > 0 ? 1 : 0, left >= 2 ? 3 : left);
  }
  est_->apply(spec_, g, dir_.data());
}

void rmsprop::lowrank_direction(const double* g) {
  auto& L = *lowrank_;
  const index_t d = dim_;
  const int n = static_cast<int>(d);
  if (!L.valid) {
    est_->estimate(L.dense.data());
    try {
      if (injected_route_failure(0))
        SADDLESCAPE_NUMERICAL_FAIL("the lowrank refresh failed (injected by the test hook)");
      L.root.factor(L.dense.data(), "the estimate G_t");
    } catch (const numerical_error&) {
      // This step exactly by the next solver of the chain; the refresh is retried next step.
      ++route_failures_;
      tridiagonal_direction(g, 1);
      return;
    }
    L.valid = true;
    L.gamma = 1.0;
    L.k = 0;
    L.y_is_last = false;
  }
  if (!L.y_is_last)
    detail::lapack::gemv('T', n, n, 1.0, L.root.eigenvectors(), n, g, 0.0, L.y.data());
  const auto& lambda = L.root.eigenvalues();
  double lo = std::numeric_limits<double>::infinity(), hi = 0.0;
  for (index_t j = 0; j < d; ++j) {
    const double dj = L.gamma * lambda[static_cast<std::size_t>(j)] + opts_.eps;
    L.diag[static_cast<std::size_t>(j)] = dj;
    lo = std::min(lo, dj);
    hi = std::max(hi, dj);
  }
  const index_t k = L.k;
  // Q = W^(1/2) U (k x d); the low-rank part adds at most sum_i ||q_i||^2 to the spectrum.
  L.q.resize(k, d);
  for (index_t i = 0; i < k; ++i) {
    const double s = std::sqrt(L.w[static_cast<std::size_t>(i)]);
    const double* ui = L.u.data() + i * d;
    for (index_t j = 0; j < d; ++j) L.q(i, j) = s * ui[j];
  }
  if (k > 0) hi += L.q.squaredNorm();
  // An estimate so large that the quadrature's scale products could overflow: this step is
  // computed exactly through the tridiagonal route instead, which rescales first.
  if (!(hi < 1e250)) {
    if (!tridiagonal_) tridiagonal_ = std::make_unique<detail::tridiagonal_apply>(d);
    est_->estimate(tridiagonal_->matrix());
    tridiagonal_->apply(spec_, g, dir_.data(), "the estimate G_t");
    return;
  }

  // (M)^(-1/2) y = (2/pi) int (M + e^(2s))^(-1) y e^s ds. For one eigenvalue lambda the
  // integrand is sech(s - log(lambda)/2) / (2 sqrt(lambda)), analytic in the strip |Im| < pi/2,
  // so the trapezoidal rule with step h errs by about 2 exp(-pi^2 / h) (relative), and cutting
  // the tails at distance T from [log(lo)/2, log(hi)/2] loses about 2 exp(-T) / pi.
  const double log_tol = std::log(opts_.tol);
  const double h = pi * pi / (std::log(4.0) - log_tol);
  const double tail = std::log(2.0 / pi) - log_tol + 1.0;
  const double s0 = 0.5 * std::log(lo) - tail, s1 = 0.5 * std::log(hi) + tail;
  const auto nodes = static_cast<index_t>(std::ceil((s1 - s0) / h)) + 1;
  // All nodes at once, as matrix products: E(j, m) = 1 / (D_j + sigma_m) and the node weights
  // omega_m = (2 / pi) h e^(s_m), so that without the low-rank part z = (E omega) .* y.
  L.E.resize(d, nodes);
  L.omega.resize(nodes);
  for (index_t m = 0; m < nodes; ++m) {
    const double s = s0 + static_cast<double>(m) * h;
    const double sigma = std::exp(2.0 * s);
    L.omega(m) = (2.0 / pi) * h * std::exp(s);
    for (index_t j = 0; j < d; ++j) L.E(j, m) = 1.0 / (L.diag[static_cast<std::size_t>(j)] + sigma);
  }
  Eigen::Map<Eigen::VectorXd> y(L.y.data(), d), z(L.z.data(), d);
  z.noalias() = L.E * L.omega;
  z.array() *= y.array();
  if (k > 0) {
    // Woodbury at node m: (E_m^(-1) + Q^T Q)^(-1) y = E_m y - E_m Q^T C_m^(-1) Q E_m y with
    // C_m = I + Q E_m Q^T (symmetric positive definite, eigenvalues >= 1). Entries of every C_m
    // come from one product: P(a k + b, j) = Q(a, j) Q(b, j), then P E. Likewise Q E_m y = the
    // m-th column of (Q .* y^T) E. The corrections sum to sum_a q_a .* (E (omega .* c_a)).
    L.p.resize(k * k, d);
    for (index_t a = 0; a < k; ++a)
      for (index_t b = 0; b < k; ++b)
        L.p.row(a * k + b) = L.q.row(a).cwiseProduct(L.q.row(b));
    L.pe.noalias() = L.p * L.E;
    L.qy = L.q * y.asDiagonal();
    L.r.noalias() = L.qy * L.E;
    L.cw.resize(nodes, k);
    Eigen::LLT<Eigen::MatrixXd> llt(k);
    for (index_t m = 0; m < nodes; ++m) {
      L.c = Eigen::Map<const Eigen::MatrixXd>(L.pe.col(m).data(), k, k);
      L.c.diagonal().array() += 1.0;
      llt.compute(L.c);
      L.cw.row(m) = (L.omega(m) * llt.solve(L.r.col(m))).transpose();
    }
    L.mk.noalias() = L.E * L.cw;  // d x k
    z -= (L.q.transpose().cwiseProduct(L.mk)).rowwise().sum();
  }
  detail::lapack::gemv('N', n, n, 1.0, L.root.eigenvectors(), n, L.z.data(), 0.0, dir_.data());
}

void rmsprop::save_extra(optimizer_state& st) const {
  if (opts_.layout == structure::diag) {
    st.arrays["v"].assign(v_.begin(), v_.end());
    st.scalars["estimate.steps"] = static_cast<double>(own_updates_);
  } else if (closed_2x2_) {
    st.arrays["S"] = {g2_[0], g2_[1], g2_[1], g2_[2]};
    st.scalars["estimate.steps"] = static_cast<double>(own_updates_);
    st.scalars["estimate.scale"] = 1.0;
    st.scalars["estimate.beta_product"] = g2_beta_product_;
  } else if (blocks_) {
    auto e = blocks_->save();
    st.arrays["engine.data"] = std::move(e.data);
    st.arrays["engine.scalars"] = std::move(e.scalars);
    st.scalars["estimate.steps"] = static_cast<double>(e.updates);
    st.scalars["estimate.beta_product"] = e.beta_product;
  } else {
    save_estimator(*est_, st);
    if (lowrank_ || tridiagonal_) st.scalars["route_failures"] = static_cast<double>(route_failures_);
  }
}

void rmsprop::load_extra(const optimizer_state& st) {
  if (opts_.layout == structure::diag) {
    const auto& v = state_array(st, "v", v_.size());
    for (std::size_t i = 0; i < v.size(); ++i)
      SADDLESCAPE_EXPECTS(v[i] >= 0.0, "the state's 'v' must be >= 0, got ", v[i], " at index ",
                          i);
    const std::int64_t n = state_count(st, "estimate.steps");
    v_.assign(v.begin(), v.end());
    own_updates_ = n;
  } else if (closed_2x2_) {
    const auto s = read_estimator(st, 4);
    // ema_estimator's layout: only the column-major lower triangle (entries 0, 1, 3) is
    // meaningful.
    const double n0 = s.scale * s.data[0], n1 = s.scale * s.data[1], n2 = s.scale * s.data[3];
    const double tol = clip_tolerance<double>(2) * std::max(n0, n2) * std::max(n0, n2);
    SADDLESCAPE_EXPECTS(n0 >= 0.0 && n2 >= 0.0 && std::isfinite(n1) && n0 * n2 - n1 * n1 >= -tol,
                        "the state's estimate must be positive semi-definite, got [[", n0, ", ",
                        n1, "], [", n1, ", ", n2, "]]");
    g2_[0] = n0;
    g2_[1] = n1;
    g2_[2] = n2;
    g2_beta_product_ = s.beta_product;
    own_updates_ = s.steps;
  } else if (blocks_) {
    block_engine<double>::state e;
    const auto data = st.arrays.find("engine.data");
    const auto scalars = st.arrays.find("engine.scalars");
    SADDLESCAPE_EXPECTS(data != st.arrays.end() && scalars != st.arrays.end(),
                        "the state has no arrays 'engine.data' and 'engine.scalars' (it is not "
                        "from a block RMSProp with solver 'lowrank')");
    e.data = data->second;
    e.scalars = scalars->second;
    e.updates = state_count(st, "estimate.steps");
    e.beta_product = state_scalar(st, "estimate.beta_product");
    blocks_->load(e);  // checks everything before assigning
  } else {
    // Optional: states from before the full routes' fallback chain have none.
    std::int64_t failures = 0;
    if (st.scalars.count("route_failures")) failures = state_count(st, "route_failures");
    load_estimator(*est_, st);
    if (lowrank_) lowrank_->valid = false;
    route_failures_ = failures;
  }
}

// ---------------------------------------------------------------------------------------------
// adam

adam::adam(index_t dim, schedule_ptr lr, double beta1, schedule_ptr beta2, adam_options opts)
    : optimizer(dim), lr_(require(std::move(lr), "lr")),
      beta2_(checked_beta(std::move(beta2), "beta2")), beta1_(beta1), opts_(std::move(opts)),
      spec_{2, opts_.eps, opts_.form} {
  SADDLESCAPE_EXPECTS(beta1 >= 0.0 && beta1 < 1.0, "beta1 must be in [0, 1), got ", beta1);
  SADDLESCAPE_EXPECTS(opts_.max_consecutive_failures >= 1, "max_consecutive_failures must be "
                      ">= 1, got ", opts_.max_consecutive_failures);
  SADDLESCAPE_EXPECTS(std::isfinite(opts_.fallback_eps) && opts_.fallback_eps >= 0.0,
                      "fallback_eps must be finite and >= 0, got ", opts_.fallback_eps);
  check_eps(opts_.eps);
  SADDLESCAPE_EXPECTS(opts_.refresh_every >= 1, "refresh_every must be >= 1, got ",
                      opts_.refresh_every);
  const auto d = static_cast<std::size_t>(dim);
  const double bytes = 8.0 * static_cast<double>(dim) * (opts_.layout == structure::diag ? 4.0 : 3.0);
  const std::string what = concat("Adam with dim = ", dim, " (structure '",
                                  to_string(opts_.layout), "')");
  detail::expect_memory(bytes, what);
  detail::allocating(bytes, what, [&] {
    m_.assign(d, 0.0);
    mhat_.assign(d, 0.0);
    dir_.assign(d, 0.0);
    if (opts_.layout == structure::diag) {
      SADDLESCAPE_EXPECTS(opts_.block_sizes.empty(), "block_sizes are for structure 'block' only");
      v_.assign(d, 0.0);
    } else {
      est_ = std::make_unique<ema_estimator<double>>(dim, beta2_, opts_.layout, opts_.block_sizes,
                                                     true, opts_.refresh_every);
      est_->set_fallback({opts_.max_consecutive_failures, opts_.fallback_eps});
    }
  });
}

block_statistics adam::statistics() const {
  SADDLESCAPE_EXPECTS(est_ != nullptr, "statistics are kept by Adam with structure 'full' or "
                      "'block'");
  return estimator_statistics(*est_);
}

void adam::inject_refresh_failures(index_t block, std::int64_t attempts, int stages) {
  SADDLESCAPE_EXPECTS(est_ != nullptr, "inject_refresh_failures needs Adam with structure "
                      "'full' or 'block'");
  est_->inject_factor_failures(block, attempts, stages);
}

std::string adam::describe() const {
  return concat("Adam(dim=", dim_, ", lr=", lr_->describe(), ", beta1=", beta1_, ", beta2=",
                beta2_->describe(), ", eps=", opts_.eps, ", structure=", to_string(opts_.layout),
                ", form=", to_string(opts_.form), ")");
}

void adam::do_observe(const double* g) {
  if (est_) {
    check_spectrum_fits(gmax_, dim_, "Adam");
    est_->update(g);
    return;
  }
  const double b = beta_at(*beta2_, updates_);
  check_square_fits(gmax_, "Adam");
  detail::diag_observe(dim_, b, 1.0 - b, 0.0, g, nullptr, v_.data());
  beta2_product_ *= b;
  ++updates_;
}

void adam::move(double* x, const double* g, double lr, sampler*) {
  // The first moment's bias correction counts the moving steps, this one included.
  const double m_correction = 1.0 - std::pow(beta1_, static_cast<double>(moves_ + 1));
  if (!est_) {
    const double b = beta_at(*beta2_, updates_);
    check_square_fits(gmax_, "Adam");
    const double product = beta2_product_ * b;
    const diag_form f(opts_.form, opts_.eps);
    double *m = m_.data(), *v = v_.data();
    detail::parallel_chunks(dim_, [&](unsigned, index_t i, index_t end) {
      detail::adam_diag(end - i, beta1_, b, lr / m_correction, 1.0 / (1.0 - product), f.inner,
                        f.outer, 0.0, g + i, m + i, v + i, x + i);
    });
    beta2_product_ = product;
    ++updates_;
    return;
  }
  check_spectrum_fits(gmax_, dim_, "Adam");
  for (index_t i = 0; i < dim_; ++i) mhat_[i] = beta1_ * m_[i] + (1.0 - beta1_) * g[i];
  est_->update(g);  // throws before any change
  std::copy(mhat_.begin(), mhat_.end(), m_.begin());
  for (auto& v : mhat_) v /= m_correction;
  est_->apply(spec_, mhat_.data(), dir_.data());
  apply_direction(x, dir_.data(), dim_, lr, "A m_hat");
}

void adam::save_extra(optimizer_state& st) const {
  st.arrays["m"].assign(m_.begin(), m_.end());
  if (est_) {
    save_estimator(*est_, st);
  } else {
    st.arrays["v"].assign(v_.begin(), v_.end());
    st.scalars["estimate.steps"] = static_cast<double>(updates_);
    st.scalars["estimate.beta_product"] = beta2_product_;
  }
}

void adam::load_extra(const optimizer_state& st) {
  const auto& m = state_array(st, "m", m_.size());
  if (est_) {
    load_estimator(*est_, st);
  } else {
    const auto& v = state_array(st, "v", v_.size());
    for (std::size_t i = 0; i < v.size(); ++i)
      SADDLESCAPE_EXPECTS(v[i] >= 0.0, "the state's 'v' must be >= 0, got ", v[i], " at index ",
                          i);
    const std::int64_t n = state_count(st, "estimate.steps");
    const double product = state_scalar(st, "estimate.beta_product");
    SADDLESCAPE_EXPECTS(product >= 0.0 && product <= 1.0,
                        "the state's 'estimate.beta_product' must be in [0, 1], got ", product);
    v_.assign(v.begin(), v.end());
    updates_ = n;
    beta2_product_ = product;
  }
  m_.assign(m.begin(), m.end());
}

// ---------------------------------------------------------------------------------------------
// saddle_escape

namespace {
index_t base_dim(const optimizer_ptr& base) {
  SADDLESCAPE_EXPECTS(base != nullptr, "base must not be null");
  return base->dim();
}
}  // namespace

saddle_escape::saddle_escape(optimizer_ptr base, double r, std::int64_t t_thresh,
                             std::int64_t hallucinate)
    : optimizer(base_dim(base)),
      base_(std::move(base)), r_(r), t_thresh_(t_thresh), hallucinate_(hallucinate) {
  SADDLESCAPE_EXPECTS(std::isfinite(r) && r > 0.0, "r must be finite and > 0, got ", r);
  SADDLESCAPE_EXPECTS(t_thresh >= 1, "t_thresh must be >= 1, got ", t_thresh);
  SADDLESCAPE_EXPECTS(hallucinate >= 0, "hallucinate must be >= 0, got ", hallucinate);
  SADDLESCAPE_EXPECTS(hallucinate == 0 || base_->estimates(), "hallucinate = ", hallucinate,
                      " needs a base that keeps an estimate (RMSProp, Adam), got ",
                      base_->kind());
  const auto d = static_cast<std::size_t>(dim_);
  x_prev_.resize(d);
  point_.resize(d);
  g_extra_.resize(d);
  steps_ = base_->steps();
  moves_ = base_->moves();
}

double saddle_escape::lr(std::int64_t t) const {
  return t % t_thresh_ == 0 ? r_ : base_->lr(t);
}

std::string saddle_escape::describe() const {
  return concat("SaddleEscape(base=", base_->describe(), ", r=", r_, ", t_thresh=", t_thresh_,
                ", hallucinate=", hallucinate_, ")");
}

void saddle_escape::do_step(double* x, const double* g, sampler* source) {
  if (base_->burn_in_remaining() > 0) {
    base_->step(x, g, source);
    ++steps_;
    return;
  }
  const std::int64_t t = moves_;
  if (t % t_thresh_ != 0) {
    base_->step_with_lr(x, g, checked_lr(base_->lr(base_->moves()), t), source);
  } else {
    SADDLESCAPE_EXPECTS(hallucinate_ == 0 || source != nullptr,
                        "SaddleEscape with hallucinate = ", hallucinate_,
                        " needs a gradient source (the problem) for its large steps");
    std::copy(x, x + dim_, x_prev_.begin());
    base_->step_with_lr(x, g, r_, source);
    if (source) source->project(x);
    // The step has happened: count it before the samples, which may fail (x has moved then).
    ++moves_;
    ++steps_;
    for (std::int64_t k = 1; k <= hallucinate_; ++k) {
      const double s = static_cast<double>(k) / static_cast<double>(hallucinate_);
      for (index_t i = 0; i < dim_; ++i) point_[i] = x_prev_[i] + s * (x[i] - x_prev_[i]);
      source->sample(point_.data(), g_extra_.data());
      if (!detail::all_finite(g_extra_.data(), dim_))
        throw non_finite_gradient(concat("the gradient sample ", k, " of ", hallucinate_,
                                         " on the large step at t = ", t, " is not finite"));
      base_->observe(g_extra_.data());
    }
    return;
  }
  ++moves_;
  ++steps_;
}

void saddle_escape::move(double* x, const double* g, double lr, sampler* source) {
  base_->step_with_lr(x, g, lr, source);
}

void saddle_escape::do_observe(const double* g) { base_->observe(g); }

void saddle_escape::save_extra(optimizer_state& st) const {
  const optimizer_state b = base_->state_dict();
  st.scalars["base.kind_is_" + b.kind] = 1.0;
  for (const auto& [name, value] : b.arrays) st.arrays["base." + name] = value;
  for (const auto& [name, value] : b.scalars) st.scalars["base." + name] = value;
}

void saddle_escape::load_extra(const optimizer_state& st) {
  optimizer_state b;
  b.kind = base_->kind();
  for (const auto& [name, value] : st.arrays)
    if (name.rfind("base.", 0) == 0) b.arrays[name.substr(5)] = value;
  for (const auto& [name, value] : st.scalars)
    if (name.rfind("base.", 0) == 0 && name.rfind("base.kind_is_", 0) != 0)
      b.scalars[name.substr(5)] = value;
  const auto marker = st.scalars.find("base.kind_is_" + b.kind);
  SADDLESCAPE_EXPECTS(marker != st.scalars.end() && marker->second == 1.0,
                      "the state's base is not a ", b.kind, " optimizer");
  base_->load_state_dict(b);
}

}  // namespace saddlescape
