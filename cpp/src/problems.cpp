#include <saddlescape/problems.hpp>

#include <saddlescape/detail/formulas.hpp>

#include "checks.hpp"

#include <Eigen/Cholesky>
#include <Eigen/Eigenvalues>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace saddlescape {

namespace {

using matrix = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using cmap = Eigen::Map<const matrix>;

using detail::ipow;
using detail::saddle_gradient;

void expect_all_finite(const std::vector<double>& v, const char* name) {
  for (std::size_t i = 0; i < v.size(); ++i)
    SADDLESCAPE_EXPECTS(std::isfinite(v[i]), name, " must be finite, got ", v[i], " at index ",
                        i);
}

// Checks that a row-major d x d matrix is symmetric to rounding and returns its smallest
// eigenvalue, which the caller may require to be >= 0 (to rounding).
double check_symmetric(const std::vector<double>& a, index_t d, const char* name) {
  SADDLESCAPE_EXPECTS(static_cast<index_t>(a.size()) == d * d, name, " must have ", d * d,
                      " entries (", d, " x ", d, "), got ", a.size());
  expect_all_finite(a, name);
  const cmap m(a.data(), d, d);
  const double scale = std::max(m.cwiseAbs().maxCoeff(), std::numeric_limits<double>::min());
  const double asym = (m - m.transpose()).cwiseAbs().maxCoeff();
  SADDLESCAPE_EXPECTS(asym <= 1e-12 * scale, name, " must be symmetric, max |A - A^T| = ", asym);
  if (d == 0) return 0.0;
  Eigen::SelfAdjointEigenSolver<matrix> es(m, Eigen::EigenvaluesOnly);
  return es.eigenvalues()(0);
}

void check_psd(const std::vector<double>& a, index_t d, const char* name) {
  const double lmin = check_symmetric(a, d, name);
  const double scale = cmap(a.data(), d, d).cwiseAbs().maxCoeff();
  SADDLESCAPE_EXPECTS(lmin >= -static_cast<double>(d) * 1e-14 * scale, name,
                      " must be positive semi-definite, its smallest eigenvalue is ", lmin);
}

// A matrix L with L L^T = a for a symmetric positive semi-definite a: the Cholesky factor when
// it exists, otherwise the symmetric square root (which handles singular covariances).
matrix psd_factor(const std::vector<double>& a, index_t d) {
  const cmap m(a.data(), d, d);
  Eigen::LLT<matrix> llt(m);
  if (llt.info() == Eigen::Success) {
    matrix l = llt.matrixL();
    return l;
  }
  Eigen::SelfAdjointEigenSolver<matrix> es(m);
  const Eigen::VectorXd root = es.eigenvalues().cwiseMax(0.0).cwiseSqrt();
  return es.eigenvectors() * root.asDiagonal() * es.eigenvectors().transpose();
}

// G = grad F(x) grad F(x)^T + cov: E[g g^T] for gradient noise of covariance cov that does not
// depend on x (the saddle problem, noisy quadratics).
void second_moment_with_fixed_noise(const problem& p, const double* x,
                                    const std::vector<double>& cov, double* G) {
  const index_t d = p.dim();
  std::vector<double> g(static_cast<std::size_t>(d));
  p.gradient(x, g.data());
  for (index_t i = 0; i < d; ++i)
    for (index_t j = 0; j < d; ++j)
      G[i * d + j] = g[static_cast<std::size_t>(i)] * g[static_cast<std::size_t>(j)] +
                     cov[static_cast<std::size_t>(i * d + j)];
}

class default_sampler final : public sampler {
 public:
  default_sampler(const problem& p, std::uint64_t seed) : p_(p), r_(seed) {}
  void sample(const double* x, double* g) override { p_.stochastic_gradient(x, r_, g); }
  void project(double* x) const override { p_.project(x); }

 private:
  const problem& p_;
  rng r_;
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// problem

std::unique_ptr<sampler> problem::sampler_for(std::uint64_t seed) const {
  return std::make_unique<default_sampler>(*this, seed);
}

double problem::value(const double*) const {
  throw invalid_argument(describe() + " has no objective value");
}
void problem::gradient(const double*, double*) const {
  throw invalid_argument(describe() + " has no exact gradient");
}
void problem::hessian(const double*, double*) const {
  throw invalid_argument(describe() + " has no Hessian");
}
void problem::second_moment(const double*, double*) const {
  throw invalid_argument(describe() + " does not know E[g g^T]");
}

double problem::lambda_min(const double* x) const {
  const index_t d = dim();
  std::vector<double> h(static_cast<std::size_t>(d * d));
  hessian(x, h.data());
  Eigen::SelfAdjointEigenSolver<matrix> es(cmap(h.data(), d, d), Eigen::EigenvaluesOnly);
  return es.eigenvalues()(0);
}

// ---------------------------------------------------------------------------------------------
// saddle_problem

namespace {

// The saddle problem's gradient is the hot loop of the paper's Sec. 6 experiments, so its
// sampler is final and inlines the oracle: run() then costs two indirect calls per step.
class saddle_sampler final : public sampler {
 public:
  saddle_sampler(const saddle_problem& p, std::uint64_t seed)
      : h_(p.h().data()), b_(p.b().data()), d_(p.dim()),
        n_(static_cast<std::uint64_t>(p.n())), power_(p.power()), r_(seed) {}
  void sample(const double* x, double* g) override {
    saddle_gradient(h_, b_ + static_cast<index_t>(r_.below(n_)) * d_, x, d_, power_, g);
  }

 private:
  const double* h_;
  const double* b_;
  index_t d_;
  std::uint64_t n_;
  int power_;
  rng r_;
};

void check_saddle_args(const std::vector<double>& h, int power) {
  SADDLESCAPE_EXPECTS(!h.empty(), "h must have at least one entry");
  expect_all_finite(h, "h");
  SADDLESCAPE_EXPECTS(power >= 2 && power % 2 == 0,
                      "power must be an even integer >= 2, got ", power);
}

}  // namespace

saddle_problem::saddle_problem(std::vector<double> h, int power)
    : h_(std::move(h)), n_(0), power_(power) {
  check_saddle_args(h_, power_);
}

saddle_problem::saddle_problem(std::vector<double> h, std::vector<double> noise_cov, index_t n,
                               int power, std::uint64_t seed)
    : saddle_problem(std::move(h), power) {
  const index_t d = dim();
  SADDLESCAPE_EXPECTS(n >= d + 1, "n must be >= d + 1 = ", d + 1,
                      " for the components to have an exact covariance, got ", n);
  if (static_cast<index_t>(noise_cov.size()) == d && d > 1) {  // the diagonal of a covariance
    expect_all_finite(noise_cov, "noise_cov");
    std::vector<double> full(static_cast<std::size_t>(d * d), 0.0);
    for (index_t i = 0; i < d; ++i) {
      const double v = noise_cov[static_cast<std::size_t>(i)];
      SADDLESCAPE_EXPECTS(v >= 0.0, "noise_cov must be >= 0, got ", v, " at index ", i);
      full[static_cast<std::size_t>(i * d + i)] = v;
    }
    noise_cov = std::move(full);
  }
  check_psd(noise_cov, d, "noise_cov");
  n_ = n;
  rng r(seed);
  matrix z(n, d);
  for (index_t i = 0; i < n; ++i)
    for (index_t j = 0; j < d; ++j) z(i, j) = r.normal();
  z.rowwise() -= z.colwise().mean();
  const matrix sample = (z.transpose() * z) / static_cast<double>(n);
  Eigen::LLT<matrix> llt(sample);
  if (llt.info() != Eigen::Success)
    SADDLESCAPE_NUMERICAL_FAIL("the sample covariance of the components is singular; try "
                               "another seed or a larger n");
  // b_i = L_noise L_sample^(-1) z_i, i.e. B = Z L_sample^(-T) L_noise^T.
  const matrix white = llt.matrixU().solve<Eigen::OnTheRight>(z);  // Z U^(-1), U = L^T
  const matrix bmat = white * psd_factor(noise_cov, d).transpose();
  b_.assign(bmat.data(), bmat.data() + n * d);
  finish();
}

saddle_problem saddle_problem::from_components(std::vector<double> h, std::vector<double> b,
                                               int power) {
  saddle_problem p(std::move(h), power);
  const auto d = static_cast<std::size_t>(p.dim());
  SADDLESCAPE_EXPECTS(!b.empty() && b.size() % d == 0,
                      "b must have n x d entries with n >= 1 and d = ", d, ", got ", b.size());
  expect_all_finite(b, "b");
  p.n_ = static_cast<index_t>(b.size() / d);
  p.b_ = std::move(b);
  p.finish();
  return p;
}

void saddle_problem::finish() {
  const index_t d = dim();
  const cmap bm(b_.data(), n_, d);
  const Eigen::RowVectorXd mean = bm.colwise().mean();
  mean_.assign(mean.data(), mean.data() + d);
  const matrix centred = bm.rowwise() - mean;
  const matrix cov = (centred.transpose() * centred) / static_cast<double>(n_);
  cov_.assign(cov.data(), cov.data() + d * d);
}

std::string saddle_problem::describe() const {
  return detail::concat("SaddleProblem(d=", dim(), ", n=", n_, ", power=", power_, ")");
}

void saddle_problem::stochastic_gradient(const double* x, rng& r, double* g) const {
  const index_t i = static_cast<index_t>(r.below(static_cast<std::uint64_t>(n_)));
  saddle_gradient(h_.data(), b_.data() + i * dim(), x, dim(), power_, g);
}

std::unique_ptr<sampler> saddle_problem::sampler_for(std::uint64_t seed) const {
  return std::make_unique<saddle_sampler>(*this, seed);
}

double saddle_problem::value(const double* x) const {
  double f = 0.0;
  for (index_t j = 0; j < dim(); ++j) {
    const auto k = static_cast<std::size_t>(j);
    f += 0.5 * h_[k] * x[j] * x[j] + mean_[k] * x[j] + ipow(x[j], power_);
  }
  return f;
}

void saddle_problem::gradient(const double* x, double* g) const {
  saddle_gradient(h_.data(), mean_.data(), x, dim(), power_, g);
}

void saddle_problem::hessian(const double* x, double* H) const {
  const index_t d = dim();
  std::fill(H, H + d * d, 0.0);
  for (index_t j = 0; j < d; ++j)
    H[j * d + j] = h_[static_cast<std::size_t>(j)] +
                   static_cast<double>(power_) * (power_ - 1) * ipow(x[j], power_ - 2);
}

double saddle_problem::lambda_min(const double* x) const {
  double m = std::numeric_limits<double>::infinity();
  for (index_t j = 0; j < dim(); ++j)
    m = std::min(m, h_[static_cast<std::size_t>(j)] +
                        static_cast<double>(power_) * (power_ - 1) * ipow(x[j], power_ - 2));
  return m;
}

void saddle_problem::second_moment(const double* x, double* G) const {
  second_moment_with_fixed_noise(*this, x, cov_, G);  // the b_i do not depend on x
}

// ---------------------------------------------------------------------------------------------
// reddi_counterexample

reddi_counterexample::reddi_counterexample(double C, double zeta) : c_(C), zeta_(zeta) {
  SADDLESCAPE_EXPECTS(std::isfinite(C) && C > 0.0, "C must be finite and > 0, got ", C);
  SADDLESCAPE_EXPECTS(std::isfinite(zeta) && zeta > -1.0 && zeta < C,
                      "zeta must satisfy -1 < zeta < C = ", C,
                      " (so that p = (1 + zeta) / (C + 1) is in (0, 1)), got ", zeta);
  p_ = (1.0 + zeta) / (C + 1.0);
  second_moment_ = p_ * C * C + (1.0 - p_);
}

std::string reddi_counterexample::describe() const {
  return detail::concat("ReddiCounterexample(C=", c_, ", zeta=", zeta_, ")");
}

void reddi_counterexample::stochastic_gradient(const double*, rng& r, double* g) const {
  g[0] = r.uniform() < p_ ? c_ : -1.0;
}

void reddi_counterexample::project(double* x) const { x[0] = std::clamp(x[0], -1.0, 1.0); }

// ---------------------------------------------------------------------------------------------
// noisy_quadratic

noisy_quadratic::noisy_quadratic(index_t dim, std::vector<double> H, std::vector<double> noise_cov)
    : d_(dim), h_(std::move(H)) {
  SADDLESCAPE_EXPECTS(d_ >= 1, "dim must be >= 1, got ", d_);
  lambda_min_ = check_symmetric(h_, d_, "H");
  const auto d = static_cast<std::size_t>(d_);
  diagonal_ = noise_cov.size() == d;
  if (diagonal_) {
    expect_all_finite(noise_cov, "noise_cov");
    for (std::size_t i = 0; i < d; ++i)
      SADDLESCAPE_EXPECTS(noise_cov[i] >= 0.0, "noise_cov must be >= 0, got ", noise_cov[i],
                          " at index ", i);
    cov_.assign(d * d, 0.0);
    factor_.resize(d);
    for (std::size_t i = 0; i < d; ++i) {
      cov_[i * d + i] = noise_cov[i];
      factor_[i] = std::sqrt(noise_cov[i]);
    }
  } else {
    check_psd(noise_cov, d_, "noise_cov");
    cov_ = std::move(noise_cov);
    const matrix l = psd_factor(cov_, d_);
    factor_.assign(l.data(), l.data() + d * d);
  }
}

std::string noisy_quadratic::describe() const {
  return detail::concat("NoisyQuadratic(d=", d_, ")");
}

void noisy_quadratic::stochastic_gradient(const double* x, rng& r, double* g) const {
  gradient(x, g);
  if (diagonal_) {
    for (index_t i = 0; i < d_; ++i) g[i] += factor_[static_cast<std::size_t>(i)] * r.normal();
    return;
  }
  thread_local std::vector<double> z;
  z.resize(static_cast<std::size_t>(d_));
  for (auto& v : z) v = r.normal();
  Eigen::Map<Eigen::VectorXd>(g, d_) += cmap(factor_.data(), d_, d_) *
                                        Eigen::Map<const Eigen::VectorXd>(z.data(), d_);
}

double noisy_quadratic::value(const double* x) const {
  const Eigen::Map<const Eigen::VectorXd> v(x, d_);
  return 0.5 * v.dot(cmap(h_.data(), d_, d_) * v);
}

void noisy_quadratic::gradient(const double* x, double* g) const {
  Eigen::Map<Eigen::VectorXd>(g, d_).noalias() =
      cmap(h_.data(), d_, d_) * Eigen::Map<const Eigen::VectorXd>(x, d_);
}

void noisy_quadratic::hessian(const double*, double* H) const {
  std::copy(h_.begin(), h_.end(), H);
}

void noisy_quadratic::second_moment(const double* x, double* G) const {
  second_moment_with_fixed_noise(*this, x, cov_, G);
}

// ---------------------------------------------------------------------------------------------
// logistic_regression

logistic_regression::logistic_regression(std::vector<double> X, index_t n, index_t p,
                                         std::vector<std::int64_t> y, index_t batch_size,
                                         double l2, index_t classes)
    : x_(std::move(X)), y_(std::move(y)), n_(n), p_(p), k_(classes), batch_(batch_size),
      l2_(l2) {
  SADDLESCAPE_EXPECTS(n_ >= 1, "X must have at least one row, got ", n_);
  SADDLESCAPE_EXPECTS(p_ >= 1, "X must have at least one column, got ", p_);
  SADDLESCAPE_EXPECTS(static_cast<index_t>(x_.size()) == n_ * p_, "X must have ", n_ * p_,
                      " entries, got ", x_.size());
  expect_all_finite(x_, "X");
  SADDLESCAPE_EXPECTS(static_cast<index_t>(y_.size()) == n_, "y must have ", n_,
                      " labels (one per row of X), got ", y_.size());
  SADDLESCAPE_EXPECTS(std::isfinite(l2_) && l2_ >= 0.0, "l2 must be finite and >= 0, got ", l2_);
  SADDLESCAPE_EXPECTS(batch_ >= 1, "batch_size must be >= 1, got ", batch_);
  const std::int64_t lo = *std::min_element(y_.begin(), y_.end());
  const std::int64_t hi = *std::max_element(y_.begin(), y_.end());
  SADDLESCAPE_EXPECTS(lo >= 0, "labels must be >= 0, got ", lo);
  SADDLESCAPE_EXPECTS(hi < (std::int64_t(1) << 31), "labels must be < 2^31, got ", hi);
  if (k_ == 0) k_ = std::max<index_t>(2, static_cast<index_t>(hi) + 1);
  SADDLESCAPE_EXPECTS(k_ >= 2, "classes must be >= 2, got ", k_);
  SADDLESCAPE_EXPECTS(hi < k_, "labels must be < classes = ", k_, ", got ", hi);
}

std::string logistic_regression::describe() const {
  return detail::concat("LogisticRegression(n=", n_, ", features=", p_, ", classes=", k_,
                        ", batch_size=", batch_, ", l2=", l2_, ")");
}

double logistic_regression::accumulate(const double* x, index_t i, double w, double* g,
                                       double* logits) const {
  const double* a = x_.data() + i * p_;
  const double* bias = x + k_ * p_;
  double top = -std::numeric_limits<double>::infinity();
  for (index_t c = 0; c < k_; ++c) {
    const double* wc = x + c * p_;
    double z = bias[c];
    for (index_t j = 0; j < p_; ++j) z += wc[j] * a[j];
    logits[c] = z;
    top = std::max(top, z);
  }
  // log-sum-exp shifted by the largest logit, so that no exp overflows.
  double sum = 0.0;
  for (index_t c = 0; c < k_; ++c) sum += std::exp(logits[c] - top);
  const double lse = top + std::log(sum);
  const auto label = static_cast<index_t>(y_[static_cast<std::size_t>(i)]);
  if (g) {
    for (index_t c = 0; c < k_; ++c) {
      const double r = w * (std::exp(logits[c] - lse) - (c == label ? 1.0 : 0.0));
      double* gc = g + c * p_;
      for (index_t j = 0; j < p_; ++j) gc[j] += r * a[j];
      g[k_ * p_ + c] += r;
    }
  }
  return lse - logits[label];
}

void logistic_regression::stochastic_gradient(const double* x, rng& r, double* g) const {
  thread_local std::vector<double> logits;
  logits.resize(static_cast<std::size_t>(k_));
  std::fill(g, g + dim(), 0.0);
  const double w = 1.0 / static_cast<double>(batch_);
  for (index_t s = 0; s < batch_; ++s) {
    const auto i = static_cast<index_t>(r.below(static_cast<std::uint64_t>(n_)));
    accumulate(x, i, w, g, logits.data());
  }
  for (index_t j = 0; j < k_ * p_; ++j) g[j] += l2_ * x[j];
}

double logistic_regression::value(const double* x) const {
  std::vector<double> logits(static_cast<std::size_t>(k_));
  double loss = 0.0;
  for (index_t i = 0; i < n_; ++i) loss += accumulate(x, i, 0.0, nullptr, logits.data());
  double penalty = 0.0;
  for (index_t j = 0; j < k_ * p_; ++j) penalty += x[j] * x[j];
  return loss / static_cast<double>(n_) + 0.5 * l2_ * penalty;
}

void logistic_regression::gradient(const double* x, double* g) const {
  std::vector<double> logits(static_cast<std::size_t>(k_));
  std::fill(g, g + dim(), 0.0);
  const double w = 1.0 / static_cast<double>(n_);
  for (index_t i = 0; i < n_; ++i) accumulate(x, i, w, g, logits.data());
  for (index_t j = 0; j < k_ * p_; ++j) g[j] += l2_ * x[j];
}

// ---------------------------------------------------------------------------------------------
// function_problem

function_problem::function_problem(index_t dim, stochastic_fn stochastic, value_fn value,
                                   gradient_fn gradient)
    : d_(dim), stochastic_(std::move(stochastic)), value_(std::move(value)),
      gradient_(std::move(gradient)) {
  SADDLESCAPE_EXPECTS(d_ >= 1, "dim must be >= 1, got ", d_);
  SADDLESCAPE_EXPECTS(static_cast<bool>(stochastic_), "the stochastic gradient callable is empty");
}

std::string function_problem::describe() const {
  return detail::concat("function_problem(d=", d_, ")");
}

void function_problem::stochastic_gradient(const double* x, rng& r, double* g) const {
  stochastic_(x, r, g);
}

double function_problem::value(const double* x) const {
  if (!value_) return problem::value(x);
  return value_(x);
}

void function_problem::gradient(const double* x, double* g) const {
  if (!gradient_) return problem::gradient(x, g);
  gradient_(x, g);
}

}  // namespace saddlescape
