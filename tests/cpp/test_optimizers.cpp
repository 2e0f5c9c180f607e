// Unit tests of the random number generator, the problems, the optimizers and the native loop
// (saddlescape/rng.hpp, problems.hpp, optimizers.hpp, runner.hpp).
//
// References, all written here in float64:
// - rng: a 128-bit Lemire reduction and Marsaglia's polar method on the raw outputs of a copy
//   of the generator (bit for bit), plus loose statistical checks (chi-square, moments).
// - problems: the documented formulas (x^T H x / 2 + sum x_j^p, softmax cross-entropy, ...)
//   evaluated with Eigen, central finite differences, and sums over all components.
// - optimizers: the documented rules replayed on the same gradients, G_t by a plain EMA
//   G <- beta_t G + (1 - beta_t) g g^T and A_t g = f(G_t) g from Eigen's
//   SelfAdjointEigenSolver (negative rounding eigenvalues set to 0), independent of the
//   library's LAPACK, closed-form 2 x 2, tridiagonal and low-rank quadrature paths.
//   The full-matrix rules are compared direction by direction: x is reset to 0 before each
//   step, so x after the step is exactly -lr_t (A_t g_t) rounded once.
// - runner: the documented loop written out by hand (sampler_for(seed), step, project).
//
// Tolerances (u = 2^-53):
// - Scalar recurrences (SGD, diagonal RMSProp/Adam): each step rounds x by a few u of
//   |x| + |step|; over <= 100 steps of size <= 1 that is below 1e-13, checked at 1e-12.
// - Full/block directions: the reference EMA and the library's differ by at most about
//   8 u / (1 - beta) max|g|^2 (see test_estimators.cpp), and f(G) = (G + eps I)^(-1/2) moves
//   by at most 1 / (2 (lambda_min + eps)) times that, relative. With eps = 1e-4, |g| <= ~3 and
//   1 / (1 - beta) <= 20 this is below 1e-10. While G is rank-deficient (fewer steps than d),
//   rounding in the computed null space is amplified by f(0) / f(lambda_max): 1e4 for the adam
//   form 1 / (sqrt(lambda) + eps), i.e. u * 1e4 * (condition of the eigenvectors). Checked at
//   1e-9 relative; measured up to 1e-13 (inv_sqrt) and 3e-11 (adam form, d = 80, 25 steps).
// - The low-rank solver is exact to its quadrature tolerance tol = 1e-10 (relative; measured
//   1.1e-10), checked at 1e-8 relative.
// - Bit-for-bit claims (same seed, run_many vs run, state_dict continuation, unchanged state
//   after a rejected gradient) are checked with exact equality.

#include <saddlescape/saddlescape.hpp>

#include <gtest/gtest.h>

#include "expect_throw.hpp"
#include "table_schedule.hpp"
#include <Eigen/Dense>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

namespace {

namespace ss = saddlescape;
using ss::index_t;
using ss::root_form;
using ss::structure;
using dmat = Eigen::MatrixXd;
using dvec = Eigen::VectorXd;
using rmat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

constexpr double nan_v = std::numeric_limits<double>::quiet_NaN();
constexpr double inf_v = std::numeric_limits<double>::infinity();

// ---------------------------------------------------------------------------------------------
// Schedules.

ss::schedule_ptr constant(double v) { return std::make_shared<ss::constant_schedule>(v); }
ss::schedule_ptr inv_sqrt(double eta0) { return std::make_shared<ss::inverse_sqrt_schedule>(eta0); }

using saddlescape_test::table_schedule;
ss::schedule_ptr table(std::vector<double> v) {
  return std::make_shared<table_schedule>(std::move(v));
}

// ---------------------------------------------------------------------------------------------
// Inputs and references.

dvec to_vec(const double* p, index_t d) { return Eigen::Map<const dvec>(p, d); }
dvec to_vec(const std::vector<double>& v) { return to_vec(v.data(), static_cast<index_t>(v.size())); }

// n gradients of dimension d, coordinate j scaled by spread^(-j / (d - 1)) times `overall`.
std::vector<dvec> gradients(int n, index_t d, std::uint64_t seed, double spread = 10.0,
                            double overall = 1.0) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> normal;
  std::vector<dvec> out;
  for (int i = 0; i < n; ++i) {
    dvec g(d);
    for (index_t j = 0; j < d; ++j)
      g(j) = overall * normal(gen) * (d == 1 ? 1.0 : std::pow(spread, -double(j) / double(d - 1)));
    out.push_back(g);
  }
  return out;
}

double rel_err(const dvec& got, const dvec& want) {
  const double scale = std::max(want.norm(), std::numeric_limits<double>::min());
  return (got - want).norm() / scale;
}

// f(G) v for symmetric positive semi-definite G, f of (eps, form). Eigenvalues below
// d u max|lambda| count as zero (matrix_functions.hpp's documented clip_tolerance): the adam
// form 1 / (sqrt(lambda) + eps) would otherwise turn rounding-level eigenvalues of a
// rank-deficient G into relative changes of sqrt(u) / eps.
dvec f_apply(const dmat& G, double eps, root_form form, const dvec& v) {
  Eigen::SelfAdjointEigenSolver<dmat> es(G);
  const double clip = double(G.rows()) * std::numeric_limits<double>::epsilon() *
                      es.eigenvalues().cwiseAbs().maxCoeff();
  const dvec l = es.eigenvalues().unaryExpr([clip](double x) { return x <= clip ? 0.0 : x; });
  dvec w = es.eigenvectors().transpose() * v;
  for (index_t i = 0; i < w.size(); ++i)
    w(i) *= form == root_form::adam ? 1.0 / (std::sqrt(l(i)) + eps) : 1.0 / std::sqrt(l(i) + eps);
  return es.eigenvectors() * w;
}

// f applied block by block to the diagonal blocks of G (blocks empty: G as a whole).
dvec f_apply_blocks(const dmat& G, const std::vector<index_t>& blocks, double eps, root_form form,
                    const dvec& v) {
  if (blocks.empty()) return f_apply(G, eps, form, v);
  dvec out(v.size());
  index_t at = 0;
  for (const index_t b : blocks) {
    out.segment(at, b) = f_apply(G.block(at, at, b, b), eps, form, v.segment(at, b));
    at += b;
  }
  return out;
}

// The plain EMA G_t = beta_t G_(t-1) + (1 - beta_t) g g^T, beta at the update count.
struct ema_ref {
  dmat G;
  std::int64_t t = 0;
  double product = 1.0;
  ss::schedule_ptr beta;
  ema_ref(index_t d, ss::schedule_ptr b) : G(dmat::Zero(d, d)), beta(std::move(b)) {}
  void update(const dvec& g) {
    const double b = (*beta)(t);
    G = b * G + (1.0 - b) * g * g.transpose();
    product *= b;
    ++t;
  }
};

// Steps `opt` through gs with x reset to 0 before each step (lr_t from `lr` at the moves
// count), and returns the largest relative error of x_after against -lr_t * want(g), where
// `want` updates its own state and returns the reference direction A_t g_t.
double worst_direction_error(ss::optimizer& opt, const std::vector<dvec>& gs,
                             const ss::schedule& lr, const std::function<dvec(const dvec&)>& want) {
  double worst = 0.0;
  const index_t d = opt.dim();
  for (const dvec& g : gs) {
    const double rate = lr(opt.moves());
    std::vector<double> x(static_cast<std::size_t>(d), 0.0);
    opt.step(x.data(), g.data());
    worst = std::max(worst, rel_err(to_vec(x), -rate * want(g)));
  }
  return worst;
}

bool same_state(const ss::optimizer_state& a, const ss::optimizer_state& b) {
  if (a.kind != b.kind || a.scalars.size() != b.scalars.size() || a.arrays.size() != b.arrays.size())
    return false;
  for (const auto& [k, v] : a.scalars) {
    const auto it = b.scalars.find(k);
    if (it == b.scalars.end() || std::memcmp(&v, &it->second, sizeof v) != 0) return false;
  }
  for (const auto& [k, v] : a.arrays) {
    const auto it = b.arrays.find(k);
    if (it == b.arrays.end() || it->second.size() != v.size()) return false;
    if (!v.empty() && std::memcmp(v.data(), it->second.data(), v.size() * sizeof(double)) != 0)
      return false;
  }
  return true;
}

bool same_bits(const std::vector<double>& a, const std::vector<double>& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(double)) == 0);
}

// A smooth stochastic problem in any dimension: g = D x - c + 0.3 z, z standard normal from
// the run's generator, D = diag(1, 2, ...), c = (0.5, ...).
std::shared_ptr<ss::function_problem> smooth_problem(index_t d) {
  return std::make_shared<ss::function_problem>(
      d,
      [d](const double* x, ss::rng& r, double* g) {
        for (index_t i = 0; i < d; ++i) g[i] = double(i + 1) * x[i] - 0.5 + 0.3 * r.normal();
      },
      [d](const double* x) {
        double f = 0.0;
        for (index_t i = 0; i < d; ++i) f += 0.5 * double(i + 1) * x[i] * x[i] - 0.5 * x[i];
        return f;
      },
      [d](const double* x, double* g) {
        for (index_t i = 0; i < d; ++i) g[i] = double(i + 1) * x[i] - 0.5;
      });
}

// ---------------------------------------------------------------------------------------------
// rng

// Lemire's method on the raw outputs of `r`, written with a 128-bit product.
std::uint64_t lemire_below(ss::rng& r, std::uint64_t n) {
  __extension__ using u128 = unsigned __int128;
  u128 m = static_cast<u128>(r.next()) * n;
  auto low = static_cast<std::uint64_t>(m);
  if (low < n) {
    const std::uint64_t threshold = (0 - n) % n;
    while (low < threshold) {
      m = static_cast<u128>(r.next()) * n;
      low = static_cast<std::uint64_t>(m);
    }
  }
  return static_cast<std::uint64_t>(m >> 64);
}

TEST(RngTest, SameSeedSameStreamAndReseedRestarts) {
  ss::rng a(42), b(42), c(43);
  bool differs = false;
  std::vector<std::uint64_t> first;
  for (int i = 0; i < 1000; ++i) {
    const std::uint64_t va = a.next();
    first.push_back(va);
    ASSERT_EQ(va, b.next()) << "draw " << i;
    differs |= va != c.next();
  }
  EXPECT_TRUE(differs) << "seeds 42 and 43 gave the same 1000 outputs";
  // The doubles are fixed functions of the stream, and reseed() starts it (and the spare
  // normal) over.
  (void)a.normal();  // leaves a spare
  a.reseed(42);
  for (int i = 0; i < 1000; ++i) ASSERT_EQ(a.next(), first[static_cast<std::size_t>(i)]);
  ss::rng d(7), e(7);
  for (int i = 0; i < 100; ++i) {
    const double u = d.uniform(), n = d.normal();
    ASSERT_EQ(u, e.uniform()) << "draw " << i;
    ASSERT_EQ(n, e.normal()) << "draw " << i;
  }
}

TEST(RngTest, UniformIsInUnitIntervalOnTheDyadicGrid) {
  ss::rng r(1), raw(1);
  const int n = 100000;
  double lo = 1.0, hi = 0.0, sum = 0.0;
  for (int i = 0; i < n; ++i) {
    const double u = r.uniform();
    ASSERT_GE(u, 0.0);
    ASSERT_LT(u, 1.0);
    // The top 53 bits of one output times 2^-53.
    ASSERT_EQ(u, static_cast<double>(raw.next() >> 11) * 0x1.0p-53) << "draw " << i;
    lo = std::min(lo, u);
    hi = std::max(hi, u);
    sum += u;
  }
  // mean of U(0, 1): 1/2, standard error sqrt(1/12 / n) = 9.1e-4; 5 standard errors.
  EXPECT_NEAR(sum / n, 0.5, 5 * std::sqrt(1.0 / 12.0 / n));
  EXPECT_LT(lo, 1e-3);
  EXPECT_GT(hi, 1.0 - 1e-3);
}

TEST(RngTest, BelowMatchesLemireAndStaysInRange) {
  const std::uint64_t big = (std::uint64_t(1) << 63) + 1;  // rejects about half the outputs
  const std::uint64_t ns[] = {1, 2, 3, 7, 1000, big, ~std::uint64_t(0)};
  for (const std::uint64_t n : ns) {
    ss::rng r(5), ref(5);
    for (int i = 0; i < 20000; ++i) {
      const std::uint64_t v = r.below(n);
      ASSERT_LT(v, n) << "n = " << n;
      ASSERT_EQ(v, lemire_below(ref, n)) << "n = " << n << ", draw " << i;
    }
    // Both consumed the same number of outputs.
    EXPECT_EQ(r.next(), ref.next()) << "n = " << n;
  }
  ss::rng one(9);
  for (int i = 0; i < 1000; ++i) ASSERT_EQ(one.below(1), 0u);
}

// Pearson's chi-square of `count` draws of below(n) sorted into `bins` equal bins.
double chi_square(std::uint64_t n, int bins, int count, std::uint64_t seed,
                  const std::function<int(std::uint64_t)>& bin_of) {
  ss::rng r(seed);
  std::vector<double> hits(static_cast<std::size_t>(bins), 0.0);
  for (int i = 0; i < count; ++i) {
    const std::uint64_t v = r.below(n);
    EXPECT_LT(v, n);
    hits[static_cast<std::size_t>(bin_of(v))] += 1.0;
  }
  const double expected = double(count) / bins;
  double chi2 = 0.0;
  for (const double h : hits) chi2 += (h - expected) * (h - expected) / expected;
  return chi2;
}

TEST(RngTest, BelowIsRoughlyUniform) {
  // Chi-square with k - 1 degrees of freedom has mean k - 1 and standard deviation
  // sqrt(2 (k - 1)); the bounds are ~8 standard deviations above the mean.
  EXPECT_LT(chi_square(7, 7, 70000, 11, [](std::uint64_t v) { return int(v); }), 6 + 8 * 3.5);
  EXPECT_LT(chi_square(2, 2, 20000, 12, [](std::uint64_t v) { return int(v); }), 1 + 8 * 1.5);
  const std::uint64_t big = (std::uint64_t(1) << 63) + 1;
  // Eight bins by the top three of 63 bits (the single value 2^63 goes to the last bin).
  EXPECT_LT(chi_square(big, 8, 80000, 13,
                       [](std::uint64_t v) { return int(std::min<std::uint64_t>(v >> 60, 7)); }),
            7 + 8 * 3.8);
  // Both halves of {0, ..., 2^63}: the rejection must not favour either.
  EXPECT_LT(chi_square(big, 2, 40000, 14, [](std::uint64_t v) { return int(v >> 62 >= 1); }),
            1 + 8 * 1.5);
}

TEST(RngTest, NormalIsPolarMethodWithMeanZeroVarianceOne) {
  ss::rng r(3), ref(3);
  // Marsaglia's polar method on the reference's uniforms, both values of each pair.
  for (int pair = 0; pair < 1000; ++pair) {
    double u, v, s;
    do {
      u = 2.0 * ref.uniform() - 1.0;
      v = 2.0 * ref.uniform() - 1.0;
      s = u * u + v * v;
    } while (s >= 1.0 || s == 0.0);
    const double f = std::sqrt(-2.0 * std::log(s) / s);
    ASSERT_EQ(r.normal(), u * f) << "pair " << pair;
    ASSERT_EQ(r.normal(), v * f) << "pair " << pair;
  }
  ss::rng q(4);
  const int n = 100000;
  double sum = 0.0, sum2 = 0.0, sum4 = 0.0;
  for (int i = 0; i < n; ++i) {
    const double z = q.normal();
    sum += z;
    sum2 += z * z;
    sum4 += z * z * z * z;
  }
  const double mean = sum / n, var = sum2 / n - mean * mean;
  // Standard errors: 1 / sqrt(n) = 3.2e-3 for the mean, sqrt(2 / n) = 4.5e-3 for the variance,
  // sqrt(96 / n) = 0.031 for the fourth moment (3); 5 standard errors each.
  EXPECT_NEAR(mean, 0.0, 5.0 / std::sqrt(n));
  EXPECT_NEAR(var, 1.0, 5.0 * std::sqrt(2.0 / n));
  EXPECT_NEAR(sum4 / n, 3.0, 5.0 * std::sqrt(96.0 / n));
}

TEST(RngTest, SaveLoadResumesTheStreamExactly) {
  for (const int normals_before : {0, 1, 2, 5}) {
    ss::rng r(77);
    for (int i = 0; i < normals_before; ++i) (void)r.normal();  // odd counts leave a spare
    const ss::rng::state st = r.save();
    std::vector<double> want;
    for (int i = 0; i < 50; ++i) {
      want.push_back(r.normal());
      want.push_back(r.uniform());
      want.push_back(double(r.below(1000)));
      want.push_back(double(r.next() >> 11));
    }
    ss::rng s(999);
    (void)s.normal();  // a spare of its own, which load() must replace
    s.load(st);
    std::vector<double> got;
    for (int i = 0; i < 50; ++i) {
      got.push_back(s.normal());
      got.push_back(s.uniform());
      got.push_back(double(s.below(1000)));
      got.push_back(double(s.next() >> 11));
    }
    EXPECT_TRUE(same_bits(got, want)) << normals_before << " normals before save()";
  }
}

// ---------------------------------------------------------------------------------------------
// saddle_problem

// The components as an n x d matrix.
rmat components(const ss::saddle_problem& p) {
  return Eigen::Map<const rmat>(p.b().data(), p.n(), p.dim());
}

void expect_exact_covariance(const ss::saddle_problem& p, const dmat& want, const char* what) {
  const rmat b = components(p);
  const Eigen::RowVectorXd mean = b.colwise().mean();
  const dmat cov = (b.transpose() * b) / double(p.n());  // mean 0: the second moment
  const double scale = want.cwiseAbs().maxCoeff();
  // Centring and whitening with Cholesky factors of well-conditioned d x d matrices: rounding
  // of a few hundred u of the scale at most.
  EXPECT_LE(mean.cwiseAbs().maxCoeff(), 1e-12 * std::sqrt(scale)) << what;
  EXPECT_LE((cov - want).cwiseAbs().maxCoeff(), 1e-12 * scale) << what;
  const dmat nc = Eigen::Map<const rmat>(p.noise_cov().data(), p.dim(), p.dim());
  EXPECT_LE((nc - want).cwiseAbs().maxCoeff(), 1e-12 * scale) << what << ": noise_cov()";
}

TEST(ProblemSaddle, ComponentsHaveMeanZeroAndTheGivenCovariance) {
  {
    const ss::saddle_problem p({1.0, -0.1, 0.5}, {1.0, 0.01, 2.0}, 50, 10, 3);
    EXPECT_EQ(p.n(), 50);
    EXPECT_EQ(p.dim(), 3);
    EXPECT_EQ(p.b().size(), 150u);
    expect_exact_covariance(p, dvec((dvec(3) << 1.0, 0.01, 2.0).finished()).asDiagonal(),
                            "diagonal");
  }
  {
    dmat a(4, 4);
    a << 1, 0.2, 0, 0.5, 0, 1, 0.3, 0, 0.1, 0, 2, 0, 0, 0.4, 0, 0.7;
    const dmat cov = a * a.transpose();
    std::vector<double> flat(16);
    Eigen::Map<rmat>(flat.data(), 4, 4) = cov;
    const ss::saddle_problem p({1, 2, 3, -1}, flat, 30, 4, 8);
    expect_exact_covariance(p, cov, "full");
  }
  {
    // Singular: b_i = (s, s), through the symmetric square root.
    const ss::saddle_problem p({1, -1}, {1, 1, 1, 1}, 20, 2, 1);
    dmat want(2, 2);
    want << 1, 1, 1, 1;
    expect_exact_covariance(p, want, "singular");
  }
  {
    // d = 1: one entry is both the diagonal and the 1 x 1 matrix.
    const ss::saddle_problem p({-0.5}, {4.0}, 2, 2, 2);
    expect_exact_covariance(p, dmat::Constant(1, 1, 4.0), "d = 1");
  }
  // Another seed, other components; the same seed, the same.
  const ss::saddle_problem a({1, -0.1}, {1, 0.01}, 20, 10, 0), b({1, -0.1}, {1, 0.01}, 20, 10, 0),
      c({1, -0.1}, {1, 0.01}, 20, 10, 1);
  EXPECT_TRUE(same_bits(a.b(), b.b()));
  EXPECT_FALSE(same_bits(a.b(), c.b()));
}

TEST(ProblemSaddle, OraclesMatchTheFormulas) {
  const std::vector<double> h = {1.0, -0.1, 0.3};
  for (const int power : {2, 4, 10}) {
    const ss::saddle_problem p(h, {1.0, 0.01, 0.5}, 40, power, 5);
    std::mt19937_64 gen(power);
    std::uniform_real_distribution<double> unif(-1.2, 1.2);
    for (int trial = 0; trial < 5; ++trial) {
      const dvec x = dvec::NullaryExpr(3, [&] { return unif(gen); });
      double f = 0.0, lmin = inf_v;
      dvec grad(3);
      dmat hess = dmat::Zero(3, 3);
      for (int j = 0; j < 3; ++j) {
        f += 0.5 * h[j] * x(j) * x(j) + std::pow(x(j), power);
        grad(j) = h[j] * x(j) + power * std::pow(x(j), power - 1);
        hess(j, j) = h[j] + power * (power - 1) * std::pow(x(j), power - 2);
        lmin = std::min(lmin, hess(j, j));
      }
      const double scale = 1.0 + std::pow(1.2, power) * power * power;
      EXPECT_NEAR(p.value(x.data()), f, 1e-13 * scale) << "power " << power;
      std::vector<double> g(3), H(9), G(9);
      p.gradient(x.data(), g.data());
      EXPECT_LE((to_vec(g) - grad).cwiseAbs().maxCoeff(), 1e-13 * scale) << "power " << power;
      p.hessian(x.data(), H.data());
      EXPECT_LE((dmat(Eigen::Map<const rmat>(H.data(), 3, 3)) - hess).cwiseAbs().maxCoeff(),
                1e-13 * scale);
      EXPECT_NEAR(p.lambda_min(x.data()), lmin, 1e-13 * scale);
      // E[g g^T] over the n equally likely components, summed here.
      dmat second = dmat::Zero(3, 3);
      const rmat b = components(p);
      for (index_t i = 0; i < p.n(); ++i) {
        const dvec gi = grad + b.row(i).transpose();
        second += gi * gi.transpose() / double(p.n());
      }
      p.second_moment(x.data(), G.data());
      EXPECT_LE((dmat(Eigen::Map<const rmat>(G.data(), 3, 3)) - second).cwiseAbs().maxCoeff(),
                1e-12 * scale * scale)
          << "power " << power;
    }
  }
}

TEST(ProblemSaddle, StochasticGradientIsOneComponentAndSamplerMatches) {
  const ss::saddle_problem p({1.0, -0.1}, {1.0, 0.01}, 30, 10, 4);
  const rmat b = components(p);
  const double x[] = {0.7, -0.9};
  std::vector<double> exact(2);
  p.gradient(x, exact.data());
  ss::rng r(21), ref(21);
  const auto s = p.sampler_for(21);
  for (int k = 0; k < 200; ++k) {
    std::vector<double> g(2), gs(2);
    p.stochastic_gradient(x, r, g.data());
    const auto i = static_cast<index_t>(ref.below(30));
    const dvec want = to_vec(exact) + b.row(i).transpose();  // mean(b) = 0 to rounding
    ASSERT_LE((to_vec(g) - want).cwiseAbs().maxCoeff(), 1e-12) << "draw " << k;
    s->sample(x, gs.data());
    ASSERT_TRUE(same_bits(g, gs)) << "sampler_for(21) differs at draw " << k;
  }
  // Unconstrained: project() is the identity.
  double y[] = {5.0, -7.0};
  s->project(y);
  EXPECT_EQ(y[0], 5.0);
  EXPECT_EQ(y[1], -7.0);
}

TEST(ProblemSaddle, FromComponentsUsesThemAsGiven) {
  // Three components with mean (1, -1): F keeps mean^T x, noise_cov is the covariance about
  // the mean, and E[g g^T] is still the average of g_i g_i^T.
  const std::vector<double> b = {1.0, 0.0, 3.0, -2.0, -1.0, -1.0};
  const auto p = ss::saddle_problem::from_components({2.0, -1.0}, b, 4);
  EXPECT_EQ(p.n(), 3);
  EXPECT_TRUE(same_bits(p.b(), b));
  const rmat bm = Eigen::Map<const rmat>(b.data(), 3, 2);
  const Eigen::RowVectorXd mean = bm.colwise().mean();
  const rmat centred = bm.rowwise() - mean;
  const dmat cov = centred.transpose() * centred / 3.0;
  EXPECT_LE((dmat(Eigen::Map<const rmat>(p.noise_cov().data(), 2, 2)) - cov).cwiseAbs().maxCoeff(),
            1e-14);
  const double x[] = {0.5, -0.25};
  const double f = 0.5 * 2.0 * 0.25 - 0.5 * 0.0625 + std::pow(0.5, 4) + std::pow(0.25, 4) +
                   mean(0) * 0.5 + mean(1) * (-0.25);
  EXPECT_NEAR(p.value(x), f, 1e-15);
  std::vector<double> g(2), G(4);
  p.gradient(x, g.data());
  const dvec grad0 = (dvec(2) << 2.0 * 0.5 + 4 * std::pow(0.5, 3),
                      -1.0 * -0.25 + 4 * std::pow(-0.25, 3)).finished();
  EXPECT_LE((to_vec(g) - (grad0 + mean.transpose())).cwiseAbs().maxCoeff(), 1e-15);
  dmat second = dmat::Zero(2, 2);
  for (int i = 0; i < 3; ++i) {
    const dvec gi = grad0 + bm.row(i).transpose();
    second += gi * gi.transpose() / 3.0;
  }
  p.second_moment(x, G.data());
  EXPECT_LE((dmat(Eigen::Map<const rmat>(G.data(), 2, 2)) - second).cwiseAbs().maxCoeff(), 1e-14);
}

TEST(ProblemSaddle, BadInputThrowsNamingTheValue) {
  EXPECT_INVALID("h must have at least one entry", ss::saddle_problem({}, std::vector<double>{}));
  EXPECT_INVALID("h must be finite, got nan at index 1", ss::saddle_problem({1.0, nan_v}, {1, 1}));
  EXPECT_INVALID("power must be an even integer >= 2, got 3",
                 ss::saddle_problem({1.0, -0.1}, {1, 1}, 100, 3));
  EXPECT_INVALID("got 0", ss::saddle_problem({1.0, -0.1}, {1, 1}, 100, 0));
  EXPECT_INVALID("n must be >= d + 1 = 3", ss::saddle_problem({1.0, -0.1}, {1, 1}, 2));
  EXPECT_INVALID("got 2", ss::saddle_problem({1.0, -0.1}, {1, 1}, 2));
  EXPECT_INVALID("noise_cov must be >= 0, got -0.5 at index 1",
                 ss::saddle_problem({1.0, -0.1}, {1.0, -0.5}));
  EXPECT_INVALID("noise_cov must be finite, got inf at index 0",
                 ss::saddle_problem({1.0, -0.1}, {inf_v, 1.0}));
  EXPECT_INVALID("noise_cov must have 4 entries (2 x 2), got 3",
                 ss::saddle_problem({1.0, -0.1}, {1.0, 0.0, 1.0}));
  EXPECT_INVALID("noise_cov must be symmetric", ss::saddle_problem({1.0, -0.1}, {1, 0.5, 0, 1}));
  EXPECT_INVALID("positive semi-definite, its smallest eigenvalue is -1",
                 ss::saddle_problem({1.0, -0.1}, {1, 2, 2, 1}));
  EXPECT_INVALID("got 5", ss::saddle_problem::from_components({1.0, -0.1}, {1, 2, 3, 4, 5}));
  EXPECT_INVALID("b must be finite, got nan at index 2",
                 ss::saddle_problem::from_components({1.0, -0.1}, {1, 2, nan_v, 4}));
  EXPECT_INVALID("power must be an even integer >= 2, got 5",
                 ss::saddle_problem::from_components({1.0}, {1.0}, 5));
}

// ---------------------------------------------------------------------------------------------
// reddi_counterexample, noisy_quadratic, logistic_regression, function_problem

TEST(ProblemReddi, ProbabilitySecondMomentAndProjection) {
  const double C = 10.0, zeta = 0.2;
  const ss::reddi_counterexample p(C, zeta);
  const double prob = (1.0 + zeta) / (C + 1.0);
  EXPECT_DOUBLE_EQ(p.p(), prob);
  EXPECT_EQ(p.dim(), 1);
  double G = 0.0, H = 1.0, g0 = 0.0;
  const double x0 = 0.3;
  p.second_moment(&x0, &G);
  EXPECT_DOUBLE_EQ(G, prob * C * C + (1.0 - prob));
  p.hessian(&x0, &H);
  EXPECT_EQ(H, 0.0);
  p.gradient(&x0, &g0);
  EXPECT_EQ(g0, zeta);
  EXPECT_DOUBLE_EQ(p.value(&x0), zeta * x0);
  // g = C with probability p (one uniform per draw), else -1.
  ss::rng r(6), ref(6);
  const int n = 100000;
  double sum = 0.0, sum2 = 0.0;
  for (int i = 0; i < n; ++i) {
    double g;
    p.stochastic_gradient(&x0, r, &g);
    ASSERT_EQ(g, ref.uniform() < prob ? C : -1.0);
    sum += g;
    sum2 += g * g;
  }
  // E[g] = zeta, E[g^2] as above; standard errors sqrt(Var / n) (Var[g] ~ 9.5, Var[g^2] ~ 820).
  EXPECT_NEAR(sum / n, zeta, 5 * std::sqrt(9.5 / n));
  EXPECT_NEAR(sum2 / n, G, 5 * std::sqrt(820.0 / n));
  for (const auto& [in, out] : std::vector<std::pair<double, double>>{
           {3.0, 1.0}, {-2.0, -1.0}, {0.3, 0.3}, {1.0, 1.0}, {-1.0, -1.0}}) {
    double x = in;
    p.project(&x);
    EXPECT_EQ(x, out) << "project(" << in << ")";
    x = in;
    p.sampler_for(0)->project(&x);
    EXPECT_EQ(x, out) << "sampler project(" << in << ")";
  }
  EXPECT_INVALID("C must be finite and > 0, got 0", ss::reddi_counterexample(0.0, 0.0));
  EXPECT_INVALID("C must be finite and > 0, got nan", ss::reddi_counterexample(nan_v, 0.0));
  EXPECT_INVALID("got 2", ss::reddi_counterexample(2.0, 2.0));
  EXPECT_INVALID("got -1", ss::reddi_counterexample(2.0, -1.0));
}

TEST(ProblemNoisyQuadratic, GradientNoiseAndSecondMoment) {
  dmat H(3, 3);
  H << 2, 0.5, 0, 0.5, -1, 0.25, 0, 0.25, 0.5;
  dmat cov(3, 3);
  cov << 1, 0.3, 0.1, 0.3, 0.5, 0, 0.1, 0, 0.2;
  std::vector<double> Hf(9), cf(9);
  Eigen::Map<rmat>(Hf.data(), 3, 3) = H;
  Eigen::Map<rmat>(cf.data(), 3, 3) = cov;
  const dvec x = (dvec(3) << 0.3, -1.0, 2.0).finished();
  const dvec hx = H * x;
  const dmat L = cov.llt().matrixL();
  for (const bool diagonal : {false, true}) {
    const ss::noisy_quadratic p = diagonal
                                      ? ss::noisy_quadratic(3, Hf, {1.0, 0.5, 0.2})
                                      : ss::noisy_quadratic(3, Hf, cf);
    const dmat want_cov = diagonal ? dmat(dvec((dvec(3) << 1.0, 0.5, 0.2).finished()).asDiagonal())
                                   : cov;
    EXPECT_NEAR(p.value(x.data()), 0.5 * x.dot(hx), 1e-14);
    std::vector<double> g(3), G(9), Hout(9);
    p.gradient(x.data(), g.data());
    EXPECT_LE((to_vec(g) - hx).cwiseAbs().maxCoeff(), 1e-14);
    p.hessian(x.data(), Hout.data());
    EXPECT_TRUE(same_bits(Hout, Hf));
    p.second_moment(x.data(), G.data());
    EXPECT_LE((dmat(Eigen::Map<const rmat>(G.data(), 3, 3)) - (hx * hx.transpose() + want_cov))
                  .cwiseAbs()
                  .maxCoeff(),
              1e-13);
    Eigen::SelfAdjointEigenSolver<dmat> es(H, Eigen::EigenvaluesOnly);
    EXPECT_NEAR(p.lambda_min(x.data()), es.eigenvalues()(0), 1e-14);
    // g = H x + L z with z the generator's next three normals, L the Cholesky factor (or the
    // square roots of the diagonal).
    ss::rng r(8), ref(8);
    for (int k = 0; k < 50; ++k) {
      p.stochastic_gradient(x.data(), r, g.data());
      dvec z(3);
      for (int j = 0; j < 3; ++j) z(j) = ref.normal();
      const dvec noise = diagonal ? dvec(want_cov.diagonal().cwiseSqrt().cwiseProduct(z))
                                  : dvec(L * z);
      ASSERT_LE((to_vec(g) - hx - noise).cwiseAbs().maxCoeff(), 1e-13) << "draw " << k;
    }
  }
  // A singular covariance (noise along (1, 1) only): the sample covariance of the noise.
  const ss::noisy_quadratic s(2, {1, 0, 0, 1}, {1, 1, 1, 1});
  ss::rng r(10);
  dmat acc = dmat::Zero(2, 2);
  const int n = 20000;
  const double zero[] = {0.0, 0.0};
  for (int k = 0; k < n; ++k) {
    std::vector<double> g(2);
    s.stochastic_gradient(zero, r, g.data());
    acc += to_vec(g) * to_vec(g).transpose() / double(n);
  }
  // Entries of the sample covariance of N(0, [[1, 1], [1, 1]]) have standard error
  // sqrt(2 / n) = 0.01.
  EXPECT_LE((acc - dmat::Ones(2, 2)).cwiseAbs().maxCoeff(), 0.05);
  EXPECT_INVALID("H must be symmetric", ss::noisy_quadratic(2, {1, 1, 0, 1}, {1, 1}));
  EXPECT_INVALID("noise_cov must be >= 0, got -1 at index 0",
                 ss::noisy_quadratic(2, {1, 0, 0, 1}, {-1, 1}));
}

// Softmax regression written with Eigen: x = [W (K x p) row-major, b (K)].
struct logreg_ref {
  rmat X;
  std::vector<std::int64_t> y;
  index_t K;
  double l2;
  double value(const dvec& x, const std::vector<index_t>& rows, dvec* grad) const {
    const index_t p = X.cols();
    const rmat W = Eigen::Map<const rmat>(x.data(), K, p);
    const dvec b = x.tail(K);
    double loss = 0.0;
    rmat gW = rmat::Zero(K, p);
    dvec gb = dvec::Zero(K);
    for (const index_t i : rows) {
      const dvec z = W * X.row(i).transpose() + b;
      const double top = z.maxCoeff();
      const double lse = top + std::log((z.array() - top).exp().sum());
      loss += lse - z(y[i]);
      dvec prob = (z.array() - lse).exp();
      prob(y[i]) -= 1.0;
      gW += prob * X.row(i);
      gb += prob;
    }
    const double m = double(rows.size());
    if (grad) {
      grad->resize(x.size());
      Eigen::Map<rmat>(grad->data(), K, p) = gW / m + l2 * W;
      grad->tail(K) = gb / m;
    }
    return loss / m + 0.5 * l2 * W.squaredNorm();
  }
};

TEST(ProblemLogisticRegression, ValueAndGradientMatchEigenAndFiniteDifferences) {
  const index_t n = 30, p = 4, K = 3;
  std::mt19937_64 gen(17);
  std::normal_distribution<double> normal;
  std::vector<double> X(static_cast<std::size_t>(n * p));
  for (auto& v : X) v = normal(gen);
  std::vector<std::int64_t> y(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) y[i] = static_cast<std::int64_t>(i % 3);
  const double l2 = 0.1;
  const ss::logistic_regression prob(X, n, p, y, 5, l2);
  EXPECT_EQ(prob.classes(), 3);  // one more than the largest label
  EXPECT_EQ(prob.dim(), K * (p + 1));
  const logreg_ref ref{Eigen::Map<const rmat>(X.data(), n, p), y, K, l2};
  std::vector<index_t> all(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) all[i] = i;
  for (const double scale : {0.5, 30.0}) {  // 30: logits in the hundreds, no overflow
    const dvec x = scale * dvec::NullaryExpr(prob.dim(), [&] { return normal(gen); });
    dvec want_g;
    const double want = ref.value(x, all, &want_g);
    ASSERT_TRUE(std::isfinite(prob.value(x.data())));
    EXPECT_NEAR(prob.value(x.data()), want, 1e-13 * std::max(1.0, std::abs(want)))
        << "scale " << scale;
    std::vector<double> g(static_cast<std::size_t>(prob.dim()));
    prob.gradient(x.data(), g.data());
    EXPECT_LE((to_vec(g) - want_g).cwiseAbs().maxCoeff(), 1e-13 * (1.0 + want_g.cwiseAbs().maxCoeff()))
        << "scale " << scale;
    if (scale < 1.0) {
      // Central differences: error h^2 |F'''| / 6 + u |F| / h, about 1e-10 for h = 1e-5.
      const double h = 1e-5;
      for (index_t j = 0; j < prob.dim(); ++j) {
        dvec xp = x, xm = x;
        xp(j) += h;
        xm(j) -= h;
        const double fd = (prob.value(xp.data()) - prob.value(xm.data())) / (2 * h);
        EXPECT_NEAR(g[j], fd, 1e-8) << "coordinate " << j;
      }
    }
  }
  // A stochastic gradient is the gradient on batch_size rows drawn by below(n).
  const dvec x = 0.5 * dvec::NullaryExpr(prob.dim(), [&] { return normal(gen); });
  ss::rng r(3), rr(3);
  for (int k = 0; k < 20; ++k) {
    std::vector<double> g(static_cast<std::size_t>(prob.dim()));
    prob.stochastic_gradient(x.data(), r, g.data());
    std::vector<index_t> rows;
    for (int s = 0; s < 5; ++s) rows.push_back(static_cast<index_t>(rr.below(n)));
    dvec want;
    ref.value(x, rows, &want);
    ASSERT_LE((to_vec(g) - want).cwiseAbs().maxCoeff(), 1e-13) << "draw " << k;
  }
  // Labels all 0: still two classes.
  EXPECT_EQ(ss::logistic_regression(X, n, p, std::vector<std::int64_t>(n, 0), 1).classes(), 2);
  EXPECT_INVALID("labels must be < classes = 3, got 3",
                 ss::logistic_regression(X, n, p, std::vector<std::int64_t>(n, 3), 1, 0.0, 3));
  EXPECT_INVALID("labels must be >= 0, got -1",
                 ss::logistic_regression(X, n, p, std::vector<std::int64_t>(n, -1), 1));
  EXPECT_INVALID("X must have 120 entries, got 119",
                 ss::logistic_regression(std::vector<double>(119), n, p, y, 1));
  EXPECT_INVALID("batch_size must be >= 1, got 0", ss::logistic_regression(X, n, p, y, 0));
  EXPECT_INVALID("l2 must be finite and >= 0, got -1", ss::logistic_regression(X, n, p, y, 1, -1));
}

TEST(ProblemFunction, CallablesAndMissingOracles) {
  const ss::function_problem p(2, [](const double* x, ss::rng& r, double* g) {
    g[0] = x[0] + r.uniform();
    g[1] = x[1];
  });
  EXPECT_FALSE(p.has_value());
  EXPECT_FALSE(p.has_gradient());
  const double x[] = {1.0, 2.0};
  double g[2];
  EXPECT_INVALID("has no objective value", (void)p.value(x));
  EXPECT_INVALID("has no exact gradient", p.gradient(x, g));
  ss::rng ref(4);
  const auto s = p.sampler_for(4);
  s->sample(x, g);
  EXPECT_EQ(g[0], 1.0 + ref.uniform());
  EXPECT_EQ(g[1], 2.0);
  EXPECT_INVALID("dim must be >= 1, got 0", ss::function_problem(0, [](auto, auto&, auto) {}));
  EXPECT_INVALID("the stochastic gradient callable is empty", ss::function_problem(2, nullptr));
}

// ---------------------------------------------------------------------------------------------
// Optimizers: the rules.

TEST(OptimSgd, StepIsLrTimesGradient) {
  const index_t d = 4;
  const auto lr = inv_sqrt(0.3);
  ss::sgd opt(d, lr);
  const auto gs = gradients(30, d, 1);
  dvec ref = dvec::LinSpaced(d, -1.0, 1.0);
  std::vector<double> x(ref.data(), ref.data() + d);
  for (int t = 0; t < 30; ++t) {
    EXPECT_EQ(opt.lr(t), 0.3 / std::sqrt(t + 1.0));
    opt.step(x.data(), gs[t].data());
    ref -= (*lr)(t)*gs[t];
    ASSERT_LE((to_vec(x) - ref).cwiseAbs().maxCoeff(), 1e-13) << "step " << t;
  }
  EXPECT_EQ(opt.steps(), 30);
  EXPECT_EQ(opt.moves(), 30);
  EXPECT_FALSE(opt.estimates());
  EXPECT_EQ(opt.kind(), "SGD");
}

void rmsprop_diag_case(root_form form) {
  const index_t d = 7;
  const auto lr = inv_sqrt(0.05);
  const auto beta = std::make_shared<ss::beta_from_lr_schedule>(lr);  // varies with t
  const double eps = 1e-8;
  ss::rmsprop_options o;
  o.layout = structure::diag;
  o.form = form;
  o.eps = eps;
  ss::rmsprop opt(d, lr, beta, o);
  const auto gs = gradients(60, d, 2, 1e3);
  dvec xr = dvec::LinSpaced(d, -1.0, 1.0), v = dvec::Zero(d);
  std::vector<double> x(xr.data(), xr.data() + d);
  for (int t = 0; t < 60; ++t) {
    opt.step(x.data(), gs[t].data());
    const double b = (*beta)(t);
    v = b * v + (1.0 - b) * gs[t].cwiseAbs2();
    const dvec den = form == root_form::adam ? dvec(v.cwiseSqrt().array() + eps)
                                             : dvec((v.array() + eps).sqrt());
    xr -= (*lr)(t)*gs[t].cwiseQuotient(den);
    ASSERT_LE((to_vec(x) - xr).cwiseAbs().maxCoeff(), 1e-12) << "step " << t;
  }
  EXPECT_LE(rel_err(to_vec(opt.estimate()), v), 1e-13);
  EXPECT_EQ(opt.updates(), 60);
  EXPECT_EQ(opt.moves(), 60);
}

TEST(OptimRmsprop, DiagInvSqrtForm) { rmsprop_diag_case(root_form::inv_sqrt); }
TEST(OptimRmsprop, DiagAdamForm) { rmsprop_diag_case(root_form::adam); }

// Full or block RMSProp at dimension d against the reference EMA and f(G) from Eigen.
double rmsprop_matrix_error(index_t d, structure layout, std::vector<index_t> blocks,
                            root_form form, int steps, double eps, std::uint64_t seed,
                            ss::root_solver solver = ss::root_solver::eigh,
                            std::int64_t refresh = 1, double spread = 10.0) {
  const auto lr = inv_sqrt(0.1);
  const auto beta = table({0.5, 0.8, 0.9, 0.95});
  ss::rmsprop_options o;
  o.eps = eps;
  o.layout = layout;
  o.form = form;
  o.block_sizes = blocks;
  o.solver = solver;
  o.refresh_every = refresh;
  ss::rmsprop opt(d, lr, beta, o);
  ema_ref G(d, beta);
  const double worst = worst_direction_error(opt, gradients(steps, d, seed, spread), *lr,
                                             [&](const dvec& g) {
                                               G.update(g);
                                               return f_apply_blocks(G.G, blocks, eps, form, g);
                                             });
  EXPECT_EQ(opt.updates(), steps);
  return worst;
}

TEST(OptimRmsprop, FullClosedFormAtD2) {
  for (const root_form form : {root_form::inv_sqrt, root_form::adam})
    for (const double eps : {1e-4, 1e-1})
      EXPECT_LE(rmsprop_matrix_error(2, structure::full, {}, form, 40, eps, 3), 1e-9)
          << "form " << ss::to_string(form) << ", eps " << eps;
  // Nearly collinear gradients (condition ~1e8): the Jacobi rotation stays accurate.
  ss::rmsprop_options o;
  o.eps = 1e-4;
  const auto beta = constant(0.9);
  ss::rmsprop opt(2, constant(1.0), beta, o);
  ema_ref G(2, beta);
  std::vector<dvec> gs;
  std::mt19937_64 gen(5);
  std::normal_distribution<double> normal;
  for (int i = 0; i < 30; ++i) {
    const double a = normal(gen);
    gs.push_back((dvec(2) << a, a * (1.0 + 1e-4 * normal(gen))).finished());
  }
  EXPECT_LE(worst_direction_error(opt, gs, *constant(1.0),
                                  [&](const dvec& g) {
                                    G.update(g);
                                    return f_apply(G.G, 1e-4, root_form::inv_sqrt, g);
                                  }),
            1e-9);
}

TEST(OptimRmsprop, FullEigenPathAtD5) {
  for (const root_form form : {root_form::inv_sqrt, root_form::adam})
    EXPECT_LE(rmsprop_matrix_error(5, structure::full, {}, form, 40, 1e-4, 4), 1e-9)
        << "form " << ss::to_string(form);
}

TEST(OptimRmsprop, FullTridiagonalPathAtD80) {
  // d = 80 > 48 with refresh_every = 1: f(G) g without eigenvectors (tridiagonal.hpp).
  for (const root_form form : {root_form::inv_sqrt, root_form::adam})
    EXPECT_LE(rmsprop_matrix_error(80, structure::full, {}, form, 25, 1e-4, 5), 1e-9)
        << "form " << ss::to_string(form);
}

TEST(OptimRmsprop, BlockDiagonal) {
  for (const root_form form : {root_form::inv_sqrt, root_form::adam})
    EXPECT_LE(rmsprop_matrix_error(6, structure::block, {2, 3, 1}, form, 40, 1e-4, 6), 1e-9)
        << "form " << ss::to_string(form);
}

TEST(OptimRmsprop, LowRankSolverIsExactAtEveryStep) {
  // d = 60, refresh_every = 8: Woodbury updates on a stale eigendecomposition plus quadrature,
  // against the exact (G_t + eps I)^(-1/2) g_t. 70 steps cross several refreshes and pass
  // rank d.
  EXPECT_LE(rmsprop_matrix_error(60, structure::full, {}, root_form::inv_sqrt, 70, 1e-4, 7,
                                 ss::root_solver::lowrank, 8),
            1e-8);
  EXPECT_LE(rmsprop_matrix_error(60, structure::full, {}, root_form::inv_sqrt, 30, 1e-8, 8,
                                 ss::root_solver::lowrank, 8, 1.0),
            1e-8);
  ss::rmsprop_options o;
  o.solver = ss::root_solver::lowrank;
  o.layout = structure::diag;
  EXPECT_INVALID("solver 'lowrank' needs structure 'full' or 'block', got 'diag'",
                 ss::rmsprop(4, constant(0.1), constant(0.9), o));
  o.layout = structure::full;
  o.form = root_form::adam;
  EXPECT_INVALID("solver 'lowrank' with structure 'full' computes the inv_sqrt form only",
                 ss::rmsprop(4, constant(0.1), constant(0.9), o));
}

TEST(OptimRmsprop, EighWithRefreshUsesAStaleFactorisation) {
  // refresh_every = 3 at d = 5: A_t = f(G_s) with s the last update t' with (t' - 1) % 3 == 0
  // (the estimate is refactored once 3 updates have passed since the last factorisation).
  const index_t d = 5;
  const double eps = 1e-4;
  const auto beta = constant(0.8);
  ss::rmsprop_options o;
  o.eps = eps;
  o.refresh_every = 3;
  ss::rmsprop opt(d, constant(1.0), beta, o);
  ema_ref G(d, beta);
  dmat stale;
  int t = 0;
  EXPECT_LE(worst_direction_error(opt, gradients(20, d, 9), *constant(1.0),
                                  [&](const dvec& g) {
                                    G.update(g);
                                    if (t++ % 3 == 0) stale = G.G;
                                    return f_apply(stale, eps, root_form::inv_sqrt, g);
                                  }),
            1e-9);
}

void adam_case(structure layout, root_form form) {
  const index_t d = 5;
  const auto lr = inv_sqrt(0.05);
  const auto beta2 = table({0.5, 0.7, 0.9, 0.99, 0.999});
  const double beta1 = 0.8, eps = layout == structure::diag ? 1e-8 : 1e-4;
  ss::adam_options o;
  o.layout = layout;
  o.form = form;
  o.eps = eps;
  if (layout == structure::block) o.block_sizes = {3, 2};
  ss::adam opt(d, lr, beta1, beta2, o);
  ema_ref G(d, beta2);
  dvec m = dvec::Zero(d);
  int t = 0;
  const double worst = worst_direction_error(opt, gradients(40, d, 10), *lr, [&](const dvec& g) {
    m = beta1 * m + (1.0 - beta1) * g;
    G.update(g);
    ++t;
    const dvec mhat = m / (1.0 - std::pow(beta1, t));
    const dmat Ghat = G.G / (1.0 - G.product);
    if (layout == structure::diag) {
      const dvec v = Ghat.diagonal();
      const dvec den = form == root_form::adam ? dvec(v.cwiseSqrt().array() + eps)
                                               : dvec((v.array() + eps).sqrt());
      return dvec(mhat.cwiseQuotient(den));
    }
    return f_apply_blocks(Ghat, o.block_sizes, eps, form, mhat);
  });
  EXPECT_LE(worst, layout == structure::diag ? 1e-13 : 1e-9)
      << ss::to_string(layout) << ", " << ss::to_string(form);
}

TEST(OptimAdam, DiagBothFormsWithBiasCorrections) {
  adam_case(structure::diag, root_form::adam);
  adam_case(structure::diag, root_form::inv_sqrt);
}

TEST(OptimAdam, FullAndBlockWithBiasCorrections) {
  adam_case(structure::full, root_form::adam);
  adam_case(structure::full, root_form::inv_sqrt);
  adam_case(structure::block, root_form::adam);
}

TEST(OptimRmsprop, BurnInKeepsXFixedAndCountsItsSamples) {
  // Burn-in W = 3: the first three calls only update G (with beta_0..beta_2); the first
  // moving step then uses lr_0 (moves count) and beta_3 (updates count).
  const auto lr = table({0.1, 0.2, 0.3, 0.4, 0.5});
  const auto beta = table({0.5, 0.6, 0.7, 0.8, 0.9});
  for (const structure layout : {structure::diag, structure::full}) {
    const index_t d = 3;
    ss::rmsprop_options o;
    o.layout = layout;
    o.eps = 1e-4;
    o.burn_in = 3;
    ss::rmsprop opt(d, lr, beta, o);
    ema_ref G(d, beta);
    const auto gs = gradients(6, d, 11);
    const std::vector<double> x0 = {0.25, -0.5, 1.0};
    std::vector<double> x = x0;
    for (int k = 0; k < 3; ++k) {
      EXPECT_EQ(opt.burn_in_remaining(), 3 - k);
      opt.step(x.data(), gs[k].data());
      G.update(gs[k]);
      EXPECT_TRUE(same_bits(x, x0)) << "burn-in step " << k << " moved x";
    }
    EXPECT_EQ(opt.burn_in_remaining(), 0);
    EXPECT_EQ(opt.steps(), 3);
    EXPECT_EQ(opt.moves(), 0);
    EXPECT_EQ(opt.updates(), 3);
    const dvec est = to_vec(opt.estimate());
    // G is symmetric: its column-major entries are the row-major estimate().
    const dvec want = layout == structure::diag ? dvec(G.G.diagonal())
                                                : dvec(Eigen::Map<const dvec>(G.G.data(), d * d));
    EXPECT_LE(rel_err(est, want), 1e-14) << ss::to_string(layout);
    for (int k = 3; k < 6; ++k) {
      const dvec before = to_vec(x);
      opt.step(x.data(), gs[k].data());
      G.update(gs[k]);
      const dmat Gm = layout == structure::diag ? dmat(G.G.diagonal().asDiagonal()) : G.G;
      const dvec step = (*lr)(k - 3) * f_apply(Gm, 1e-4, root_form::inv_sqrt, gs[k]);
      EXPECT_LE((to_vec(x) - (before - step)).cwiseAbs().maxCoeff(), 1e-12)
          << ss::to_string(layout) << ", step " << k;
    }
    EXPECT_EQ(opt.moves(), 3);
    EXPECT_EQ(opt.steps(), 6);
  }
}

// ---------------------------------------------------------------------------------------------
// saddle_escape

TEST(OptimSaddleEscape, UsesRAtMultiplesOfTThresh) {
  const index_t d = 3;
  const auto lr = inv_sqrt(0.1);
  const double r = 0.7;
  ss::saddle_escape opt(std::make_shared<ss::sgd>(d, lr), r, 4);
  const auto gs = gradients(13, d, 12);
  dvec xr = dvec::Ones(d);
  std::vector<double> x(xr.data(), xr.data() + d);
  for (int t = 0; t < 13; ++t) {
    const double rate = t % 4 == 0 ? r : (*lr)(t);
    EXPECT_EQ(opt.lr(t), rate) << "t = " << t;
    opt.step(x.data(), gs[t].data());
    xr -= rate * gs[t];
    ASSERT_LE((to_vec(x) - xr).cwiseAbs().maxCoeff(), 1e-13) << "step " << t;
  }
  EXPECT_EQ(opt.moves(), 13);
  EXPECT_EQ(opt.base()->moves(), 13);
  EXPECT_INVALID("r must be finite and > 0, got 0", ss::saddle_escape(opt.base(), 0.0, 4));
  EXPECT_INVALID("t_thresh must be >= 1, got 0", ss::saddle_escape(opt.base(), 1.0, 0));
  EXPECT_INVALID("needs a base that keeps an estimate (RMSProp, Adam), got SGD",
                 ss::saddle_escape(opt.base(), 1.0, 3, 2));
}

TEST(OptimSaddleEscape, HallucinatesExactlySSamplesAlongTheLargeStep) {
  const index_t d = 3;
  const std::int64_t S = 3, T = 4;
  const double r = 0.5, eps = 1e-8;
  // The stochastic callable records every point it is asked about, and what it returned.
  auto points = std::make_shared<std::vector<std::vector<double>>>();
  auto grads = std::make_shared<std::vector<std::vector<double>>>();
  const ss::function_problem p(d, [=](const double* x, ss::rng& rg, double* g) {
    for (index_t i = 0; i < d; ++i) g[i] = double(i + 1) * x[i] - 0.5 + 0.3 * rg.normal();
    points->emplace_back(x, x + d);
    grads->emplace_back(g, g + d);
  });
  const auto lr = inv_sqrt(0.05);
  const auto beta = table({0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95});
  ss::rmsprop_options o;
  o.layout = structure::diag;
  o.eps = eps;
  auto base = std::make_shared<ss::rmsprop>(d, lr, beta, o);
  ss::saddle_escape opt(base, r, T, S);
  EXPECT_TRUE(opt.estimates());
  const auto src = p.sampler_for(5);
  std::vector<double> x = {0.2, -0.3, 0.4}, g(d);
  const int steps = 10;
  std::vector<std::size_t> at_step;  // index in the record of each step's own sample
  for (int t = 0; t < steps; ++t) {
    at_step.push_back(points->size());
    src->sample(x.data(), g.data());
    opt.step(x.data(), g.data(), src.get());
  }
  // 10 steps, 3 of them large (t = 0, 4, 8): 10 + 3 * 3 records.
  ASSERT_EQ(points->size(), std::size_t(steps + 3 * S));
  // Replay: x_(t+1) = x_t - lr_t g / sqrt(v + eps) with v fed the step's gradient, then on a
  // large step the S samples taken at x_t + (k / S)(x_(t+1) - x_t), k = 1..S.
  dvec xr = dvec((dvec(3) << 0.2, -0.3, 0.4).finished()), v = dvec::Zero(d);
  std::int64_t u = 0;
  std::size_t at = 0;
  for (int t = 0; t < steps; ++t) {
    ASSERT_EQ(at, at_step[static_cast<std::size_t>(t)]) << "step " << t;
    ASSERT_LE((to_vec((*points)[at]) - xr).cwiseAbs().maxCoeff(), 1e-13) << "step " << t;
    const dvec gt = to_vec((*grads)[at++]);
    const double b = (*beta)(u++);
    v = b * v + (1.0 - b) * gt.cwiseAbs2();
    const bool large = t % T == 0;
    const dvec xn = xr - (large ? r : (*lr)(t)) * gt.cwiseQuotient(dvec((v.array() + eps).sqrt()));
    if (large) {
      // The library's own x_t and x_(t+1): the points must be these interpolations exactly.
      const dvec lib_xt = to_vec((*points)[at - 1]);
      const dvec lib_xn = t + 1 < steps ? to_vec((*points)[at_step[static_cast<std::size_t>(t) + 1]])
                                        : to_vec(x);
      for (std::int64_t k = 1; k <= S; ++k) {
        const double s = double(k) / double(S);
        const dvec want = lib_xt + s * (lib_xn - lib_xt);
        const dvec got = to_vec((*points)[at]);
        for (index_t i = 0; i < d; ++i)
          EXPECT_DOUBLE_EQ(got(i), want(i)) << "step " << t << ", sample " << k;
        ASSERT_LE((got - (xr + s * (xn - xr))).cwiseAbs().maxCoeff(), 1e-13);
        const dvec gk = to_vec((*grads)[at++]);
        const double bk = (*beta)(u++);
        v = bk * v + (1.0 - bk) * gk.cwiseAbs2();
      }
    }
    xr = xn;
  }
  EXPECT_LE((to_vec(x) - xr).cwiseAbs().maxCoeff(), 1e-13);
  EXPECT_LE(rel_err(to_vec(base->estimate()), v), 1e-13);
  EXPECT_EQ(base->updates(), steps + 3 * S);
  EXPECT_EQ(opt.moves(), steps);
  // Without a source the large step cannot hallucinate.
  ss::saddle_escape lonely(std::make_shared<ss::rmsprop>(d, lr, beta, o), r, T, S);
  EXPECT_INVALID("needs a gradient source", lonely.step(x.data(), g.data()));
}

TEST(OptimSaddleEscape, NonFiniteHallucinatedSampleIsANumericalErrorAfterTheMove) {
  // The samples come after the large step: x has moved, and the step is counted.
  const ss::function_problem p(2, [](const double* x, ss::rng&, double* g) {
    g[0] = x[0] == 1.0 ? 1.0 : nan_v;
    g[1] = 0.0;
  });
  const auto src = p.sampler_for(0);
  ss::rmsprop_options o;
  o.layout = structure::diag;
  ss::saddle_escape opt(std::make_shared<ss::rmsprop>(2, constant(0.1), constant(0.5), o), 0.25,
                        3, 2);
  std::vector<double> x = {1.0, 0.0};
  const double g[] = {1.0, 0.0};
  EXPECT_NUMERICAL("the gradient sample 1 of 2 on the large step at t = 0 is not finite",
                   opt.step(x.data(), g, src.get()));
  EXPECT_NE(x[0], 1.0);
  EXPECT_EQ(x[1], 0.0);
  EXPECT_EQ(opt.moves(), 1);
  EXPECT_EQ(opt.base()->moves(), 1);
}

TEST(OptimSaddleEscape, LargeStepIsProjectedAndBurnInPassesThrough) {
  const ss::reddi_counterexample p(2.0, 0.5);
  const auto src = p.sampler_for(1);
  ss::saddle_escape opt(std::make_shared<ss::sgd>(1, constant(0.01)), 10.0, 5);
  double x = 0.0, g = 1.0;
  opt.step(&x, &g, src.get());
  EXPECT_EQ(x, -1.0);  // 0 - 10 * 1, projected onto [-1, 1]
  // A base that burns in: x stays, and the first moving step is still the large one (t = 0).
  ss::rmsprop_options o;
  o.layout = structure::diag;
  o.burn_in = 2;
  ss::saddle_escape esc(std::make_shared<ss::rmsprop>(1, constant(0.01), constant(0.5), o), 3.0,
                        4);
  double y = 0.25;
  const double gs[] = {1.0, 1.0, 1.0, 1.0};
  esc.step(&y, &gs[0]);
  esc.step(&y, &gs[1]);
  EXPECT_EQ(y, 0.25);
  EXPECT_EQ(esc.burn_in_remaining(), 0);
  EXPECT_EQ(esc.moves(), 0);
  EXPECT_EQ(esc.steps(), 2);
  esc.step(&y, &gs[2]);  // v = 1 after three unit gradients at beta 0.5... up to 1 - 0.5^3
  const double v = 1.0 - 0.125;
  EXPECT_NEAR(y, 0.25 - 3.0 / std::sqrt(v + 1e-8), 1e-14);
  esc.step(&y, &gs[3]);
  EXPECT_NEAR(y, 0.25 - 3.0 / std::sqrt(v + 1e-8) - 0.01 / std::sqrt(1.0 - 0.0625 + 1e-8), 1e-14);
}

// ---------------------------------------------------------------------------------------------
// State and errors, for every rule.

struct optimizer_case {
  std::string name;
  index_t dim;
  std::function<ss::optimizer_ptr()> make;
};

std::vector<optimizer_case> all_cases() {
  const auto lr = inv_sqrt(0.05);
  const auto beta = std::make_shared<ss::beta_from_lr_schedule>(lr);
  auto rms = [=](index_t d, structure layout, root_form form, std::int64_t burn = 0,
                 std::vector<index_t> blocks = {}) {
    return [=] {
      ss::rmsprop_options o;
      o.layout = layout;
      o.form = form;
      o.burn_in = burn;
      o.block_sizes = blocks;
      o.eps = 1e-6;
      return ss::optimizer_ptr(std::make_shared<ss::rmsprop>(d, lr, beta, o));
    };
  };
  auto adm = [=](index_t d, structure layout, root_form form) {
    return [=] {
      ss::adam_options o;
      o.layout = layout;
      o.form = form;
      if (layout == structure::block) o.block_sizes = {1, d - 1};
      return ss::optimizer_ptr(std::make_shared<ss::adam>(d, lr, 0.9, beta, o));
    };
  };
  return {
      {"sgd", 4, [=] { return ss::optimizer_ptr(std::make_shared<ss::sgd>(4, lr)); }},
      {"rmsprop diag inv_sqrt", 4, rms(4, structure::diag, root_form::inv_sqrt)},
      {"rmsprop diag adam, burn-in 3", 4, rms(4, structure::diag, root_form::adam, 3)},
      {"rmsprop full d=2", 2, rms(2, structure::full, root_form::inv_sqrt)},
      {"rmsprop full d=5 burn-in 2", 5, rms(5, structure::full, root_form::adam, 2)},
      {"rmsprop full d=50 (tridiagonal)", 50, rms(50, structure::full, root_form::inv_sqrt)},
      {"rmsprop block", 5, rms(5, structure::block, root_form::inv_sqrt, 0, {2, 3})},
      {"adam diag", 4, adm(4, structure::diag, root_form::adam)},
      {"adam full", 4, adm(4, structure::full, root_form::inv_sqrt)},
      {"adam block", 4, adm(4, structure::block, root_form::adam)},
      {"saddle_escape(sgd)", 3,
       [=] {
         return ss::optimizer_ptr(
             std::make_shared<ss::saddle_escape>(std::make_shared<ss::sgd>(3, lr), 0.3, 3));
       }},
      {"saddle_escape(rmsprop diag, S=2)", 3,
       [=] {
         return ss::optimizer_ptr(std::make_shared<ss::saddle_escape>(
             rms(3, structure::diag, root_form::inv_sqrt, 2)(), 0.3, 3, 2));
       }},
      {"saddle_escape(adam full, S=3)", 3,
       [=] {
         return ss::optimizer_ptr(std::make_shared<ss::saddle_escape>(
             adm(3, structure::full, root_form::adam)(), 0.3, 2, 3));
       }},
  };
}

// Advances opt by n steps with gradients from `src` (and its projection), as run() does.
void advance(ss::optimizer& opt, ss::sampler& src, std::vector<double>& x, int n) {
  std::vector<double> g(x.size());
  for (int i = 0; i < n; ++i) {
    src.sample(x.data(), g.data());
    opt.step(x.data(), g.data(), &src);
    src.project(x.data());
  }
}

// Loading a state_dict into a fresh optimizer and continuing must equal continuing the
// original, bit for bit (same gradients: two samplers of one seed, sampled at equal x).
void expect_continues_bit_for_bit(const optimizer_case& c) {
  SCOPED_TRACE(c.name);
  const auto p = smooth_problem(c.dim);
  const auto a = c.make();
  const auto src0 = p->sampler_for(1);
  std::vector<double> xa(static_cast<std::size_t>(c.dim), 0.3);
  advance(*a, *src0, xa, 7);
  const ss::optimizer_state st = a->state_dict();
  EXPECT_EQ(st.kind, a->kind());
  const auto b = c.make();
  b->load_state_dict(st);
  EXPECT_TRUE(same_state(b->state_dict(), st)) << "load_state_dict(state_dict()) changed it";
  EXPECT_EQ(b->steps(), a->steps());
  EXPECT_EQ(b->moves(), a->moves());
  EXPECT_EQ(b->burn_in_remaining(), a->burn_in_remaining());
  std::vector<double> xb = xa;
  const auto sa = p->sampler_for(2), sb = p->sampler_for(2);
  for (int i = 0; i < 9; ++i) {
    advance(*a, *sa, xa, 1);
    advance(*b, *sb, xb, 1);
    ASSERT_TRUE(same_bits(xa, xb))
        << "x differs " << i + 1 << " steps after the load, max |x_a - x_b| = "
        << (to_vec(xa) - to_vec(xb)).cwiseAbs().maxCoeff() << " (|x| ~ "
        << to_vec(xa).cwiseAbs().maxCoeff() << ")";
  }
  EXPECT_TRUE(same_state(a->state_dict(), b->state_dict()));
}

TEST(OptimState, StateDictRoundTripContinuesBitForBit) {
  for (const auto& c : all_cases()) expect_continues_bit_for_bit(c);
}

// The state holds no cached factorisation (optimizers.hpp, state_dict()): with
// refresh_every = k > 1 a loaded optimizer refactors the loaded estimate when it next needs a
// direction, and its continuation departs from the uninterrupted run's until that run's next
// refresh. Checked on x-independent gradients, direction by direction.
TEST(OptimState, LoadedEighOptimizerRefactorsAndRejoinsAtTheNextRefresh) {
  const index_t d = 5;
  const double eps = 1e-2;
  const auto beta = constant(0.8);
  const auto one = constant(1.0);
  ss::rmsprop_options o;
  o.eps = eps;
  o.refresh_every = 3;
  ss::rmsprop a(d, one, beta, o), b(d, one, beta, o);
  const auto gs = gradients(16, d, 13);
  ema_ref G(d, beta);
  // The uninterrupted run factors at updates t = 0, 3, 6, 9, ... (0-based).
  dmat stale;
  auto direction = [](ss::optimizer& opt, const dvec& g) {
    std::vector<double> x(static_cast<std::size_t>(g.size()), 0.0);
    opt.step(x.data(), g.data());
    return dvec(-to_vec(x));
  };
  for (int t = 0; t < 7; ++t) {
    G.update(gs[t]);
    if (t % 3 == 0) stale = G.G;
    EXPECT_LE(rel_err(direction(a, gs[t]), f_apply(stale, eps, root_form::inv_sqrt, gs[t])), 1e-12);
  }
  b.load_state_dict(a.state_dict());
  bool departed = false;
  int first_differing = -1;  // at t >= 9
  double by = 0.0;
  for (int t = 7; t < 16; ++t) {
    G.update(gs[t]);
    if (t % 3 == 0) stale = G.G;
    const dvec da = direction(a, gs[t]), db = direction(b, gs[t]);
    EXPECT_LE(rel_err(da, f_apply(stale, eps, root_form::inv_sqrt, gs[t])), 1e-12) << "t = " << t;
    if (t == 7) {
      // The loaded optimizer's first direction is the exact one of the loaded estimate + g_7.
      EXPECT_LE(rel_err(db, f_apply(G.G, eps, root_form::inv_sqrt, gs[t])), 1e-12);
      departed = !(da == db);
    }
    if (t >= 9 && first_differing < 0 && !(da == db)) {  // the uninterrupted run refreshed at 9
      first_differing = t;
      by = rel_err(db, da);
    }
  }
  EXPECT_TRUE(departed) << "the test needs a stale factorisation at the load";
  EXPECT_EQ(first_differing, -1)
      << "the loaded optimizer's directions still differ at t = " << first_differing
      << " (relative difference " << by << "), after the uninterrupted run's refresh at t = 9: "
      << "it refactored at t = 7 and keeps that phase (t = 10, 13, ...)";
}

TEST(OptimState, LoadedLowRankOptimizerDiffersOnlyWithinTol) {
  // solver lowrank: the loaded optimizer refactors; its directions differ only by rounding,
  // within the quadrature tolerance (1e-10 relative; checked at 1e-8).
  const index_t d = 6;
  const auto beta = constant(0.9);
  const auto one = constant(1.0);
  ss::rmsprop_options o;
  o.eps = 1e-4;
  o.refresh_every = 4;
  o.solver = ss::root_solver::lowrank;
  ss::rmsprop a(d, one, beta, o), b(d, one, beta, o);
  const auto gs = gradients(20, d, 14);
  std::vector<double> x(static_cast<std::size_t>(d));
  for (int t = 0; t < 6; ++t) {
    std::fill(x.begin(), x.end(), 0.0);
    a.step(x.data(), gs[t].data());
  }
  b.load_state_dict(a.state_dict());
  double worst = 0.0;
  for (int t = 6; t < 20; ++t) {
    std::vector<double> xa(static_cast<std::size_t>(d), 0.0), xb = xa;
    a.step(xa.data(), gs[t].data());
    b.step(xb.data(), gs[t].data());
    worst = std::max(worst, rel_err(to_vec(xb), to_vec(xa)));
  }
  EXPECT_LE(worst, 1e-8);
  EXPECT_TRUE(same_state(a.state_dict(), b.state_dict()));  // the estimate itself is exact
}

TEST(OptimState, LoadRejectsAnotherKindOrShapeAndLeavesTheOptimizer) {
  const auto lr = inv_sqrt(0.05);
  ss::sgd s(3, lr);
  ss::rmsprop_options o;
  o.layout = structure::diag;
  ss::rmsprop r(3, lr, constant(0.9), o);
  std::vector<double> x(3, 0.0);
  const double g[] = {1.0, 2.0, 3.0};
  r.step(x.data(), g);
  const auto before = r.state_dict();
  EXPECT_INVALID("the state is from a SGD optimizer, not RMSProp", r.load_state_dict(s.state_dict()));
  auto bad = before;
  bad.arrays["v"] = {1.0, 2.0};
  EXPECT_INVALID("the state's 'v' must have 3 entries, got 2", r.load_state_dict(bad));
  bad = before;
  bad.arrays["v"][1] = -1.0;
  EXPECT_INVALID("the state's 'v' must be >= 0, got -1 at index 1", r.load_state_dict(bad));
  bad = before;
  bad.scalars["moves"] = 5.0;
  EXPECT_INVALID("the state's moves (5) exceed its steps (1)", r.load_state_dict(bad));
  bad = before;
  bad.scalars["steps"] = 1.5;
  EXPECT_INVALID("the state's 'steps' must be a count", r.load_state_dict(bad));
  EXPECT_TRUE(same_state(r.state_dict(), before));
}

TEST(OptimErrors, NonFiniteGradientLeavesXAndStateUnchanged) {
  for (const auto& c : all_cases()) {
    SCOPED_TRACE(c.name);
    const auto p = smooth_problem(c.dim);
    const auto opt = c.make();
    const auto src = p->sampler_for(3);
    std::vector<double> x(static_cast<std::size_t>(c.dim), -0.2);
    // Once during burn-in (where there is one), once after several moving steps.
    for (const int before_steps : {1, 8}) {
      advance(*opt, *src, x, before_steps);
      const std::vector<double> x_before = x;
      const auto st = opt->state_dict();
      for (const double bad : {nan_v, inf_v, -inf_v}) {
        std::vector<double> g(x.size(), 0.5);
        g[1] = bad;
        const std::string needle = std::string("g[1] = ") + (std::isnan(bad) ? "nan" : bad > 0 ? "inf" : "-inf");
        EXPECT_INVALID(needle, opt->step(x.data(), g.data(), src.get()));
        EXPECT_TRUE(same_bits(x, x_before)) << "x changed";
        EXPECT_TRUE(same_state(opt->state_dict(), st)) << "state changed";
        EXPECT_INVALID(needle, opt->observe(g.data()));
        EXPECT_TRUE(same_state(opt->state_dict(), st)) << "observe changed the state";
      }
    }
  }
}

TEST(OptimErrors, BadConstructorArgumentsNameTheValue) {
  const auto lr = constant(0.1);
  ss::rmsprop_options o;
  o.eps = 0.0;
  EXPECT_INVALID("eps must be finite and > 0, got 0", ss::rmsprop(3, lr, constant(0.9), o));
  o = {};
  o.burn_in = -2;
  EXPECT_INVALID("burn_in must be >= 0, got -2", ss::rmsprop(3, lr, constant(0.9), o));
  o = {};
  o.refresh_every = 0;
  EXPECT_INVALID("refresh_every must be >= 1, got 0", ss::rmsprop(3, lr, constant(0.9), o));
  EXPECT_INVALID("dim must be >= 1, got 0", ss::sgd(0, lr));
  EXPECT_INVALID("lr must not be null", ss::sgd(2, nullptr));
  EXPECT_INVALID("beta1 must be in [0, 1), got 1", ss::adam(2, lr, 1.0, constant(0.9)));
  // A beta schedule that leaves [0, 1) is an error when met, with x and state unchanged.
  ss::rmsprop_options d;
  d.layout = structure::diag;
  ss::rmsprop r(2, lr, table({0.9, 1.0}), d);
  std::vector<double> x = {1.0, 1.0};
  const double g[] = {1.0, -1.0};
  r.step(x.data(), g);
  const auto x1 = x;
  const auto st = r.state_dict();
  EXPECT_INVALID("beta must be in [0, 1), got beta_t = 1 at update t = 1", r.step(x.data(), g));
  EXPECT_TRUE(same_bits(x, x1));
  EXPECT_TRUE(same_state(r.state_dict(), st));
}

// ---------------------------------------------------------------------------------------------
// run / run_many

ss::saddle_problem run_problem() { return ss::saddle_problem({1.0, -0.1}, {1.0, 0.01}, 200, 10, 0); }

std::shared_ptr<ss::rmsprop> run_optimizer(std::int64_t burn_in = 0) {
  ss::rmsprop_options o;
  o.layout = structure::diag;
  o.burn_in = burn_in;
  return std::make_shared<ss::rmsprop>(2, constant(0.01), constant(ss::beta_from_lr(0.01)), o);
}

bool same_result(const ss::run_result& a, const ss::run_result& b) {
  return a.dim == b.dim && a.t == b.t && same_bits(a.f, b.f) && same_bits(a.grad_norm, b.grad_norm) &&
         same_bits(a.lambda_min, b.lambda_min) && same_bits(a.x, b.x) &&
         same_bits(a.x_final, b.x_final) && a.status == b.status && a.stopped_at == b.stopped_at &&
         a.message == b.message;
}

TEST(RunRecords, AtZeroEveryRecordEveryAndTheFinalStep) {
  const auto p = run_problem();
  const double x0[] = {0.3, 0.05};
  struct expected_case {
    std::int64_t steps, every;
    std::vector<std::int64_t> t;
  };
  for (const auto& c : std::vector<expected_case>{{10, 3, {0, 3, 6, 9, 10}},
                                                  {9, 3, {0, 3, 6, 9}},
                                                  {0, 5, {0}},
                                                  {4, 1, {0, 1, 2, 3, 4}},
                                                  {5, 100, {0, 5}}}) {
    SCOPED_TRACE(testing::Message() << "steps " << c.steps << ", record_every " << c.every);
    auto opt = run_optimizer();
    ss::run_options o;
    o.steps = c.steps;
    o.record_every = c.every;
    o.seed = 4;
    const auto r = ss::run(p, *opt, x0, o);
    EXPECT_EQ(r.status, ss::run_status::completed);
    EXPECT_EQ(r.stopped_at, -1);
    EXPECT_EQ(r.t, c.t);
    const std::size_t n = c.t.size();
    ASSERT_EQ(r.f.size(), n);
    ASSERT_EQ(r.grad_norm.size(), n);
    ASSERT_EQ(r.lambda_min.size(), n);
    ASSERT_EQ(r.x.size(), 2 * n);
    EXPECT_EQ(r.x[0], x0[0]);
    EXPECT_EQ(r.x[1], x0[1]);
    for (std::size_t k = 0; k < n; ++k) {
      const double* xk = r.x.data() + 2 * k;
      EXPECT_EQ(r.f[k], p.value(xk));
      std::vector<double> g(2);
      p.gradient(xk, g.data());
      EXPECT_NEAR(r.grad_norm[k], std::hypot(g[0], g[1]), 1e-15 * (1 + r.grad_norm[k]));
      EXPECT_EQ(r.lambda_min[k], p.lambda_min(xk));
    }
    EXPECT_EQ(r.x_final[0], r.x[2 * n - 2]);
    EXPECT_EQ(r.x_final[1], r.x[2 * n - 1]);
    EXPECT_EQ(opt->moves(), c.steps);
  }
  // record_x = false keeps the rest; a problem without value or gradient records only t.
  auto opt = run_optimizer();
  ss::run_options o;
  o.steps = 6;
  o.record_every = 2;
  o.record_x = false;
  const auto r = ss::run(p, *opt, x0, o);
  EXPECT_TRUE(r.x.empty());
  EXPECT_EQ(r.f.size(), 4u);
  const ss::function_problem bare(2, [](const double* x, ss::rng&, double* g) {
    g[0] = x[0];
    g[1] = x[1];
  });
  auto opt2 = run_optimizer();
  const auto rb = ss::run(bare, *opt2, x0, o);
  EXPECT_EQ(rb.t, (std::vector<std::int64_t>{0, 2, 4, 6}));
  EXPECT_TRUE(rb.f.empty());
  EXPECT_TRUE(rb.grad_norm.empty());
  EXPECT_TRUE(rb.lambda_min.empty());
}

TEST(RunLoop, EqualsTheLoopWrittenOutAndSeedsNameResults) {
  const auto p = run_problem();
  const double x0[] = {0.0, 0.0};
  ss::run_options o;
  o.steps = 500;
  o.record_every = 50;
  o.seed = 11;
  // Burn-in included: 5 gradients at x0 first, then the steps.
  auto opt = run_optimizer(5);
  const auto r = ss::run(p, *opt, x0, o);
  auto ref = run_optimizer(5);
  const auto src = p.sampler_for(11);
  std::vector<double> x(x0, x0 + 2), g(2);
  while (ref->burn_in_remaining() > 0) {
    src->sample(x.data(), g.data());
    ref->step(x.data(), g.data(), src.get());
  }
  EXPECT_EQ(r.x[0], 0.0);
  for (int t = 0; t < 500; ++t) {
    src->sample(x.data(), g.data());
    ref->step(x.data(), g.data(), src.get());
    src->project(x.data());
    if ((t + 1) % 50 == 0) {
      ASSERT_EQ(r.x[static_cast<std::size_t>((t + 1) / 50 * 2)], x[0]) << "record at " << t + 1;
      ASSERT_EQ(r.x[static_cast<std::size_t>((t + 1) / 50 * 2 + 1)], x[1]);
    }
  }
  EXPECT_TRUE(same_bits(r.x_final, x));
  EXPECT_TRUE(same_state(opt->state_dict(), ref->state_dict()));
  EXPECT_EQ(opt->steps(), 505);
  // Same seed: the same result bit for bit; another seed: another result.
  auto again = run_optimizer(5);
  EXPECT_TRUE(same_result(ss::run(p, *again, x0, o), r));
  auto other = run_optimizer(5);
  o.seed = 12;
  EXPECT_FALSE(same_bits(ss::run(p, *other, x0, o).x_final, r.x_final));
}

TEST(RunLoop, RmspropEscapesTheSaddleProblem) {
  // The consumer's run (tests/cpp/consumer/main.cpp): from the saddle at 0, diagonal RMSProp
  // reaches the basin of a minimum x = (0, +-0.1^(1/4)), F = -0.0126.
  const ss::saddle_problem p({1.0, -0.1}, {1.0, 0.01});
  ss::rmsprop_options o;
  o.layout = structure::diag;
  ss::rmsprop opt(2, constant(0.001), constant(ss::beta_from_lr(0.001)), o);
  ss::run_options ro;
  ro.steps = 10000;
  ro.record_every = 1000;
  const double x0[] = {0.0, 0.0};
  const auto r = ss::run(p, opt, x0, ro);
  ASSERT_EQ(r.status, ss::run_status::completed);
  EXPECT_EQ(r.f.front(), 0.0);
  EXPECT_LT(r.f.back(), -0.01);
  EXPECT_NEAR(std::abs(r.x_final[1]), std::pow(0.01, 1.0 / 8.0), 0.1);
}

TEST(RunLoop, ProjectsOntoTheFeasibleSet) {
  const ss::reddi_counterexample p(3.0, 0.5);
  ss::sgd opt(1, constant(0.6));
  const double x0 = 0.0;
  ss::run_options o;
  o.steps = 200;
  const auto r = ss::run(p, opt, &x0, o);
  bool hit = false;
  for (const double x : r.x) {
    ASSERT_LE(std::abs(x), 1.0);
    hit |= std::abs(x) == 1.0;
  }
  EXPECT_TRUE(hit) << "steps of 0.6 * 3 never reached the boundary";
}

TEST(RunMany, TwoThreadsEqualRunPerSeed) {
  const auto p = run_problem();
  const double x0[] = {0.1, 0.0};
  ss::run_options o;
  o.steps = 300;
  o.record_every = 30;
  const std::vector<std::uint64_t> seeds = {3, 1, 4, 1, 5};
  std::vector<std::shared_ptr<ss::rmsprop>> own;
  std::vector<ss::optimizer*> opts;
  for (std::size_t i = 0; i < seeds.size(); ++i) {
    own.push_back(run_optimizer(2));
    opts.push_back(own.back().get());
  }
  const auto many = ss::run_many(p, opts, x0, o, seeds, 2);
  ASSERT_EQ(many.size(), seeds.size());
  for (std::size_t i = 0; i < seeds.size(); ++i) {
    auto single = run_optimizer(2);
    o.seed = seeds[i];
    EXPECT_TRUE(same_result(many[i], ss::run(p, *single, x0, o))) << "seed index " << i;
    EXPECT_TRUE(same_state(own[i]->state_dict(), single->state_dict())) << "seed index " << i;
  }
  EXPECT_TRUE(same_result(many[1], many[3]));  // seed 1 twice
  EXPECT_FALSE(same_bits(many[0].x_final, many[1].x_final));
  // One optimizer per seed, and as many as seeds.
  std::vector<ss::optimizer*> twice = {opts[0], opts[0]};
  EXPECT_INVALID("two seeds have the same optimizer object",
                 ss::run_many(p, twice, x0, o, {1, 2}, 2));
  EXPECT_INVALID("need one optimizer per seed: 2 optimizers for 3 seeds",
                 ss::run_many(p, {opts[0], opts[1]}, x0, o, {1, 2, 3}, 2));
}

TEST(RunStops, NanGradientStopsWithDivergedAndKeepsRecords) {
  // g = -1 until x_0 reaches 5, then NaN: with lr 1, x_t = t, so step t = 5 fails.
  const ss::function_problem p(
      2,
      [](const double* x, ss::rng&, double* g) {
        g[0] = x[0] >= 5.0 ? nan_v : -1.0;
        g[1] = -1.0;
      },
      [](const double* x) { return x[0] + x[1]; },
      [](const double*, double* g) { g[0] = g[1] = 1.0; });
  ss::sgd opt(2, constant(1.0));
  const double x0[] = {0.0, 0.0};
  ss::run_options o;
  o.steps = 20;
  o.record_every = 2;
  const auto r = ss::run(p, opt, x0, o);
  EXPECT_EQ(r.status, ss::run_status::diverged);
  EXPECT_EQ(ss::to_string(r.status), "diverged");
  EXPECT_EQ(r.stopped_at, 5);
  EXPECT_NE(r.message.find("not finite"), std::string::npos) << r.message;
  EXPECT_EQ(r.t, (std::vector<std::int64_t>{0, 2, 4}));
  EXPECT_EQ(r.f, (std::vector<double>{0.0, 4.0, 8.0}));
  EXPECT_EQ(r.x, (std::vector<double>{0, 0, 2, 2, 4, 4}));
  EXPECT_EQ(r.x_final, (std::vector<double>{5.0, 5.0}));
  EXPECT_EQ(opt.moves(), 5);
}

TEST(RunStops, OverflowingIterateAndOptimizerErrorsStopTheRun) {
  // An iterate that overflows: x = 0 - 10 * (-1e308) = inf at step 0.
  const ss::function_problem huge(1, [](const double*, ss::rng&, double* g) { g[0] = -1e308; });
  ss::sgd s(1, constant(10.0));
  const double x0 = 0.0;
  ss::run_options o;
  o.steps = 5;
  auto r = ss::run(huge, s, &x0, o);
  EXPECT_EQ(r.status, ss::run_status::diverged);
  EXPECT_EQ(r.stopped_at, 0);
  EXPECT_NE(r.message.find("iterate"), std::string::npos) << r.message;
  EXPECT_EQ(r.t, (std::vector<std::int64_t>{0}));
  // The optimizer's invalid_argument (beta leaves [0, 1) at update 2): status invalid, the
  // records before kept, x_final the iterate before the failed step.
  const ss::function_problem unit(1, [](const double*, ss::rng&, double* g) { g[0] = 1.0; });
  ss::rmsprop_options d;
  d.layout = structure::diag;
  ss::rmsprop bad_beta(1, constant(0.1), table({0.5, 0.5, 1.5}), d);
  r = ss::run(unit, bad_beta, &x0, o);
  EXPECT_EQ(r.status, ss::run_status::invalid);
  EXPECT_EQ(r.stopped_at, 2);
  EXPECT_NE(r.message.find("beta"), std::string::npos) << r.message;
  EXPECT_EQ(r.t, (std::vector<std::int64_t>{0, 1, 2}));
  EXPECT_EQ(r.x_final[0], r.x.back());
  // numerical_error: g^2 overflows float64.
  const ss::function_problem big(1, [](const double*, ss::rng&, double* g) { g[0] = 1e200; });
  ss::rmsprop overflow(1, constant(0.1), constant(0.9), d);
  r = ss::run(big, overflow, &x0, o);
  EXPECT_EQ(r.status, ss::run_status::numerical);
  EXPECT_EQ(r.stopped_at, 0);
  EXPECT_EQ(r.x_final[0], 0.0);
}

TEST(RunArguments, BadX0DimensionAndOptionsThrow) {
  const auto p = run_problem();
  auto opt = run_optimizer();
  ss::run_options o;
  o.steps = 3;
  const double bad[] = {0.0, nan_v};
  EXPECT_INVALID("x0[1] = nan", ss::run(p, *opt, bad, o));
  const double inf0[] = {inf_v, 0.0};
  EXPECT_INVALID("x0[0] = inf", ss::run(p, *opt, inf0, o));
  ss::sgd three(3, constant(0.1));
  const double x0[] = {0.0, 0.0, 0.0};
  EXPECT_INVALID("the optimizer has dim 3 but the problem has dim 2", ss::run(p, three, x0, o));
  o.steps = -1;
  EXPECT_INVALID("steps must be >= 0, got -1", ss::run(p, *opt, x0, o));
  o.steps = 3;
  o.record_every = 0;
  EXPECT_INVALID("record_every must be >= 1, got 0", ss::run(p, *opt, x0, o));
  o.record_every = 1;
  std::vector<ss::optimizer*> opts = {opt.get()};
  EXPECT_INVALID("x0[1] = nan", ss::run_many(p, opts, bad, o, {1}, 2));
  EXPECT_EQ(opt->steps(), 0);  // nothing ran
}

}  // namespace
