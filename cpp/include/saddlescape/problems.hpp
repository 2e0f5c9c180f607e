#pragma once
/// @file problems.hpp
/// Gradient oracles: the paper's problems (Sec. 3.2, Sec. 6), noisy quadratics, softmax
/// logistic regression, and any C++ callable.
///
/// A problem is immutable after construction and may be shared by many threads; the randomness
/// of a run lives in a `sampler` (one per run), created by `problem::sampler_for(seed)`.
/// All problems work in float64.

#include <saddlescape/errors.hpp>
#include <saddlescape/matrix_functions.hpp>
#include <saddlescape/rng.hpp>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace saddlescape {

/// Stochastic gradients for one run: owns the run's random stream.
class sampler {
 public:
  virtual ~sampler() = default;
  /// g = a stochastic gradient at x (dim entries each).
  virtual void sample(const double* x, double* g) = 0;
  /// Projects x onto the problem's feasible set (the identity for unconstrained problems).
  virtual void project(double* x) const { (void)x; }
};

/// A stochastic optimisation problem min_x F(x) = E[f(x; xi)] in R^dim.
class problem {
 public:
  virtual ~problem() = default;
  virtual index_t dim() const noexcept = 0;
  virtual std::string describe() const = 0;

  /// A stochastic gradient at x drawn with `r`.
  virtual void stochastic_gradient(const double* x, rng& r, double* g) const = 0;

  /// The sampler of one run: stochastic_gradient() with rng(seed) and project().
  virtual std::unique_ptr<sampler> sampler_for(std::uint64_t seed) const;

  /// Projection onto the feasible set; the identity unless overridden.
  virtual void project(double* x) const { (void)x; }

  /// F(x). @throws invalid_argument if !has_value().
  virtual bool has_value() const noexcept { return false; }
  virtual double value(const double* x) const;
  /// grad F(x). @throws invalid_argument if !has_gradient().
  virtual bool has_gradient() const noexcept { return false; }
  virtual void gradient(const double* x, double* g) const;
  /// The Hessian of F at x, row-major dim x dim. @throws invalid_argument if !has_hessian().
  virtual bool has_hessian() const noexcept { return false; }
  virtual void hessian(const double* x, double* H) const;
  /// The smallest eigenvalue of the Hessian at x (closed form where the problem has one).
  virtual double lambda_min(const double* x) const;
  /// E[g g^T] of the stochastic gradient at x, row-major dim x dim.
  /// @throws invalid_argument if !has_second_moment().
  virtual bool has_second_moment() const noexcept { return false; }
  virtual void second_moment(const double* x, double* G) const;
};

using problem_ptr = std::shared_ptr<const problem>;

/// The saddle problem of Sec. 6: f_i(x) = x^T H x / 2 + b_i^T x + sum_j x_j^power, H = diag(h),
/// i uniform on {0, ..., n-1}, so F(x) = x^T H x / 2 + sum_j x_j^power (the b_i have mean zero)
/// and the gradient noise b_i has covariance noise_cov, both exactly (up to rounding):
/// the b_i are n standard normal draws (from rng(seed)), centred, and mapped by
/// L_noise L_sample^(-1), where L L^T are Cholesky factors of the wanted and the sample
/// covariance (population normalisation, 1/n).
class saddle_problem final : public problem {
 public:
  /// @param[in] h          the Hessian's diagonal at 0, d >= 1 finite entries.
  /// @param[in] noise_cov  d x d row-major symmetric positive semi-definite covariance, or its
  ///                       diagonal (d entries).
  /// @param[in] n          number of components, >= d + 1 (needed for an exact covariance).
  /// @param[in] power      even integer >= 2.
  /// @param[in] seed       seed of the b_i.
  saddle_problem(std::vector<double> h, std::vector<double> noise_cov, index_t n = 1000,
                 int power = 10, std::uint64_t seed = 0);
  /// The same problem with explicit components b (n x d row-major, n >= 1), used as given;
  /// noise_cov() is then their covariance about their mean, and F keeps the term mean(b)^T x
  /// when the b_i do not have mean zero.
  static saddle_problem from_components(std::vector<double> h, std::vector<double> b,
                                        int power = 10);

  index_t dim() const noexcept override { return static_cast<index_t>(h_.size()); }
  std::string describe() const override;
  void stochastic_gradient(const double* x, rng& r, double* g) const override;
  std::unique_ptr<sampler> sampler_for(std::uint64_t seed) const override;
  bool has_value() const noexcept override { return true; }
  double value(const double* x) const override;
  bool has_gradient() const noexcept override { return true; }
  void gradient(const double* x, double* g) const override;
  bool has_hessian() const noexcept override { return true; }
  void hessian(const double* x, double* H) const override;
  double lambda_min(const double* x) const override;
  bool has_second_moment() const noexcept override { return true; }
  void second_moment(const double* x, double* G) const override;

  const std::vector<double>& h() const noexcept { return h_; }
  /// The components, n x d row-major.
  const std::vector<double>& b() const noexcept { return b_; }
  index_t n() const noexcept { return n_; }
  int power() const noexcept { return power_; }
  /// The exact noise covariance (1/n) sum_i b_i b_i^T of the components.
  const std::vector<double>& noise_cov() const noexcept { return cov_; }
  /// The mean of the components (exactly 0 up to rounding unless built from_components).
  const std::vector<double>& mean() const noexcept { return mean_; }

 private:
  saddle_problem(std::vector<double> h, int power);
  void finish();
  std::vector<double> h_, b_, cov_, mean_;
  index_t n_;
  int power_;
};

/// The counterexample of Sec. 3.2 on [-1, 1]: f(x; xi) = C x with probability
/// p = (1 + zeta) / (C + 1), and -x otherwise, so F(x) = zeta x (minimised at x = -1) and
/// E[g^2] = p C^2 + 1 - p. Iterates are projected onto [-1, 1].
class reddi_counterexample final : public problem {
 public:
  /// @throws invalid_argument unless C > 0 and -1 < zeta < C (so that 0 < p < 1), finite.
  reddi_counterexample(double C, double zeta);
  index_t dim() const noexcept override { return 1; }
  std::string describe() const override;
  void stochastic_gradient(const double* x, rng& r, double* g) const override;
  void project(double* x) const override;
  bool has_value() const noexcept override { return true; }
  double value(const double* x) const override { return zeta_ * x[0]; }
  bool has_gradient() const noexcept override { return true; }
  void gradient(const double*, double* g) const override { g[0] = zeta_; }
  bool has_hessian() const noexcept override { return true; }
  void hessian(const double*, double* H) const override { H[0] = 0.0; }
  double lambda_min(const double*) const override { return 0.0; }
  bool has_second_moment() const noexcept override { return true; }
  void second_moment(const double*, double* G) const override { G[0] = second_moment_; }

  double C() const noexcept { return c_; }
  double zeta() const noexcept { return zeta_; }
  double p() const noexcept { return p_; }

 private:
  double c_, zeta_, p_, second_moment_;
};

/// F(x) = x^T H x / 2 with gradient noise N(0, noise_cov): g = H x + L z, z standard normal,
/// L L^T = noise_cov (Cholesky; a semi-definite covariance uses its symmetric square root).
class noisy_quadratic final : public problem {
 public:
  /// @param[in] H          d x d symmetric, row-major.
  /// @param[in] noise_cov  d x d symmetric positive semi-definite, or d entries (a diagonal).
  noisy_quadratic(index_t dim, std::vector<double> H, std::vector<double> noise_cov);
  index_t dim() const noexcept override { return d_; }
  std::string describe() const override;
  void stochastic_gradient(const double* x, rng& r, double* g) const override;
  bool has_value() const noexcept override { return true; }
  double value(const double* x) const override;
  bool has_gradient() const noexcept override { return true; }
  void gradient(const double* x, double* g) const override;
  bool has_hessian() const noexcept override { return true; }
  void hessian(const double* x, double* H) const override;
  double lambda_min(const double*) const override { return lambda_min_; }
  bool has_second_moment() const noexcept override { return true; }
  void second_moment(const double* x, double* G) const override;

  const std::vector<double>& H() const noexcept { return h_; }
  /// The noise covariance as d x d.
  const std::vector<double>& noise_cov() const noexcept { return cov_; }
  /// Whether the noise covariance is diagonal; then noise_factor() holds the d standard
  /// deviations, else the d x d row-major factor L (L L^T = noise_cov) with g = H x + L z.
  bool diagonal_noise() const noexcept { return diagonal_; }
  const std::vector<double>& noise_factor() const noexcept { return factor_; }

 private:
  index_t d_;
  std::vector<double> h_, cov_, factor_;  // factor_: L (d x d) or sqrt of the diagonal
  bool diagonal_;
  double lambda_min_;
};

/// Softmax (multinomial logistic) regression: parameters W (K x p) and b (K), flattened as
/// x = [W row-major, b], dim = K (p + 1). F(x) = mean_i CE(softmax(W a_i + b), y_i)
/// + l2 / 2 ||W||_F^2 (the bias is not penalised). A stochastic gradient is the gradient on
/// batch_size rows drawn uniformly with replacement.
class logistic_regression final : public problem {
 public:
  /// @param[in] X  n x p row-major features (finite). @param[in] y  n labels in [0, classes).
  /// @param[in] classes  K >= 2 (0: one more than the largest label, at least 2).
  logistic_regression(std::vector<double> X, index_t n, index_t p, std::vector<std::int64_t> y,
                      index_t batch_size, double l2 = 0.0, index_t classes = 0);
  index_t dim() const noexcept override { return k_ * (p_ + 1); }
  std::string describe() const override;
  void stochastic_gradient(const double* x, rng& r, double* g) const override;
  bool has_value() const noexcept override { return true; }
  double value(const double* x) const override;
  bool has_gradient() const noexcept override { return true; }
  void gradient(const double* x, double* g) const override;

  index_t samples() const noexcept { return n_; }
  index_t features() const noexcept { return p_; }
  index_t classes() const noexcept { return k_; }
  index_t batch_size() const noexcept { return batch_; }
  double l2() const noexcept { return l2_; }

 private:
  // Adds the gradient of row i's loss to g (scaled by w) and returns the loss.
  double accumulate(const double* x, index_t i, double w, double* g, double* logits) const;
  std::vector<double> x_;
  std::vector<std::int64_t> y_;
  index_t n_, p_, k_, batch_;
  double l2_;
};

/// A problem from C++ callables. The stochastic gradient is required; value and gradient are
/// optional. The callables must be safe to call from several threads when used with run_many.
class function_problem final : public problem {
 public:
  using stochastic_fn = std::function<void(const double* x, rng& r, double* g)>;
  using value_fn = std::function<double(const double* x)>;
  using gradient_fn = std::function<void(const double* x, double* g)>;
  function_problem(index_t dim, stochastic_fn stochastic, value_fn value = {},
                   gradient_fn gradient = {});
  index_t dim() const noexcept override { return d_; }
  std::string describe() const override;
  void stochastic_gradient(const double* x, rng& r, double* g) const override;
  bool has_value() const noexcept override { return static_cast<bool>(value_); }
  double value(const double* x) const override;
  bool has_gradient() const noexcept override { return static_cast<bool>(gradient_); }
  void gradient(const double* x, double* g) const override;

 private:
  index_t d_;
  stochastic_fn stochastic_;
  value_fn value_;
  gradient_fn gradient_;
};

}  // namespace saddlescape
