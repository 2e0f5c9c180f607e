// Unit tests of the second-moment estimators and schedules (saddlescape/estimators.hpp,
// saddlescape/schedules.hpp).
//
// The reference is a plain EMA written here in double with Eigen,
//   G <- beta_t G + (1 - beta_t) g g^T,
// run on the gradients exactly as the library saw them (float gradients are rounded to float
// first; float -> double is exact), and projected onto the diagonal or the diagonal blocks.
// Preconditioners are compared with f(G_ref) from Eigen's SelfAdjointEigenSolver (the library
// factors with LAPACK syevd, or with Eigen for small blocks; the comparison is against the
// reference EMA, not the library's estimate, so the paths stay independent).
//
// Tolerances (u = machine epsilon of T):
// - Every entry of the EMA is its own scalar recurrence. Each step rounds it by a few u of
//   A_ij = EMA(|g_i g_j|) (the scale the rounding errors have, also for entries that cancel),
//   in the library (syr on G = s * S, the decay folded into the scale s; float rounds beta and
//   1 - beta to float too) as in the reference, and older errors decay like the estimate. After
//   n steps: at most about 8 u min(n, 1 / (1 - beta)) A_ij; a rank-k batch adds the k-term sums
//   of syrk, 8 u k A_ij; flushing subnormal values to zero adds at most 4 * the smallest normal.
// - f(G + delta) against f(G): max |f'| ||delta||_F over f(lambda_min), i.e. the sensitivity
//   s = |f'(lambda_min)| / f(lambda_min) times ||delta||_F, plus the eigensolver's rounding
//   4 u (2 s lambda_max + 2 d) (the bound test_matrix_functions.cpp derives).

#include <saddlescape/saddlescape.hpp>

#include <gtest/gtest.h>

#include "expect_throw.hpp"
#include "table_schedule.hpp"
#include <Eigen/Dense>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

namespace ss = saddlescape;
using ss::index_t;
using ss::root_form;
using ss::root_spec;
using ss::structure;
using dmat = Eigen::MatrixXd;
using dvec = Eigen::VectorXd;

// ---------------------------------------------------------------------------------------------
// Error checks: EXPECT_INVALID / EXPECT_NUMERICAL from expect_throw.hpp.

// ---------------------------------------------------------------------------------------------
// Schedules.

ss::schedule_ptr constant(double b) { return std::make_shared<ss::constant_schedule>(b); }

ss::schedule_ptr beta_schedule(double eta0, double C, double floor) {
  return std::make_shared<ss::beta_from_lr_schedule>(
      std::make_shared<ss::inverse_sqrt_schedule>(eta0), C, floor);
}

using saddlescape_test::table_schedule;

// ---------------------------------------------------------------------------------------------
// Inputs and the reference.

template <class T>
double unit_roundoff() {
  return double(std::numeric_limits<T>::epsilon());
}

// n gradients (rows) in precision T, coordinates with scales spread over `spread`, and an
// overall scale. Returned row-major, plus the exact double copy of the rounded values.
template <class T>
struct gradients {
  std::vector<T> rows;  // n x d, row-major
  dmat exact;           // n x d, the same values in double
  index_t n, d;
  const T* row(index_t i) const { return rows.data() + i * d; }
};

// Gradients with per-coordinate scales given explicitly (ill-scaled runs).
template <class T>
gradients<T> scaled_gradients(index_t n, const std::vector<double>& scales, std::uint64_t seed) {
  const auto d = static_cast<index_t>(scales.size());
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal;
  gradients<T> g{std::vector<T>(static_cast<std::size_t>(n * d)), dmat(n, d), n, d};
  for (index_t i = 0; i < n; ++i)
    for (index_t j = 0; j < d; ++j) {
      const T v = static_cast<T>(normal(rng) * scales[j]);
      g.rows[i * d + j] = v;
      g.exact(i, j) = double(v);
    }
  return g;
}

// Gradients whose coordinate scales spread geometrically over `spread`, times `overall`.
template <class T>
gradients<T> make_gradients(index_t n, index_t d, std::uint64_t seed, double spread = 1e3,
                            double overall = 1.0) {
  std::vector<double> scale(static_cast<std::size_t>(d));
  for (index_t j = 0; j < d; ++j)
    scale[j] = d == 1 ? overall
                      : overall * std::pow(spread, -double((j * 5) % d) / double(d - 1));
  return scaled_gradients<T>(n, scale, seed);
}

// The plain EMA, and the EMA of |g g^T| that scales its rounding errors.
struct reference_ema {
  dmat g, a;
  double beta_product = 1.0;
  double beta_max = 0.0;
  std::int64_t steps = 0;

  explicit reference_ema(index_t d) : g(dmat::Zero(d, d)), a(dmat::Zero(d, d)) {}

  void update(const dvec& x, double beta) {
    const dmat xx = x * x.transpose();
    g = beta * g + (1.0 - beta) * xx;
    a = beta * a + (1.0 - beta) * xx.cwiseAbs();
    beta_product *= beta;
    beta_max = std::max(beta_max, beta);
    ++steps;
  }
  void update(const dvec& x, const ss::schedule& beta) { update(x, beta(steps)); }
};

std::vector<index_t> blocks_for(index_t d) {
  if (d == 1) return {1};
  if (d == 2) return {1, 1};
  if (d < 10) return {1, d - 3, 2};
  return {d / 3, 1, d - d / 3 - 1};
}

template <class T>
ss::ema_estimator<T> make_estimator(index_t d, structure s, ss::schedule_ptr beta,
                                    bool bias_correction = false, std::int64_t refresh = 1) {
  return ss::ema_estimator<T>(d, std::move(beta), s,
                              s == structure::block ? blocks_for(d) : std::vector<index_t>{},
                              bias_correction, refresh);
}

// A flat estimate()/preconditioner() output as matrices: [d x d], the blocks, or [d x 1].
template <class T>
std::vector<dmat> unflatten(const ss::ema_estimator<T>& e, const std::vector<T>& flat) {
  std::vector<dmat> out;
  if (e.layout() == structure::diag) {
    dmat m(e.dim(), 1);
    for (index_t i = 0; i < e.dim(); ++i) m(i, 0) = double(flat[i]);
    out.push_back(m);
    return out;
  }
  index_t at = 0;
  for (const index_t b : e.block_sizes()) {
    dmat m(b, b);
    for (index_t i = 0; i < b; ++i)
      for (index_t j = 0; j < b; ++j) m(i, j) = double(flat[at + i * b + j]);
    out.push_back(m);
    at += b * b;
  }
  return out;
}

template <class T>
std::vector<T> estimate_of(const ss::ema_estimator<T>& e) {
  std::vector<T> flat(static_cast<std::size_t>(e.estimate_size()), T(-7));
  e.estimate(flat.data());
  return flat;
}

std::vector<dmat> project(const dmat& g, structure s, index_t d) {
  if (s == structure::full) return {g};
  if (s == structure::diag) return {dmat(g.diagonal())};
  std::vector<dmat> out;
  index_t at = 0;
  for (const index_t b : blocks_for(d)) {
    out.push_back(g.block(at, at, b, b));
    at += b;
  }
  return out;
}

template <class T>
double ema_tol(std::int64_t n, double beta_max, index_t k = 1) {
  const double n_eff = beta_max >= 1.0 ? double(n) : std::min(double(n), 1.0 / (1.0 - beta_max));
  return 8.0 * unit_roundoff<T>() * (n_eff + double(k) + 2.0);
}

// Entrywise |estimate - G_ref| <= tol * A_ref + 4 tiny; scale multiplies both reference parts
// (the bias correction).
template <class T>
void expect_matches(const ss::ema_estimator<T>& e, const reference_ema& ref, double tol,
                    const std::string& what, double scale = 1.0) {
  const std::vector<dmat> got = unflatten(e, estimate_of(e));
  const std::vector<dmat> want = project(ref.g * scale, e.layout(), e.dim());
  const std::vector<dmat> size = project(ref.a * scale, e.layout(), e.dim());
  ASSERT_EQ(got.size(), want.size()) << what;
  const double tiny = double(std::numeric_limits<T>::min());
  for (std::size_t b = 0; b < got.size(); ++b) {
    ASSERT_TRUE(got[b].allFinite()) << what << ": non-finite estimate in block " << b;
    const dmat bound = (tol * size[b].array() + 4.0 * tiny).matrix();
    const double worst = ((got[b] - want[b]).cwiseAbs().array() / bound.array()).maxCoeff();
    EXPECT_LE(worst, 1.0) << what << ": block " << b << " error is " << worst
                          << " x the bound (tol " << tol << ")";
  }
}

template <class T>
bool same_state(const typename ss::ema_estimator<T>::state& a,
                const typename ss::ema_estimator<T>::state& b) {
  return a.steps == b.steps && a.scale == b.scale && a.beta_product == b.beta_product &&
         a.data == b.data;
}

template <class T>
bool has_subnormal(const std::vector<T>& v) {
  for (const T x : v)
    if (x != T(0) && std::abs(x) < std::numeric_limits<T>::min()) return true;
  return false;
}

std::string name(structure s) { return std::string(ss::to_string(s)); }

const structure all_structures[] = {structure::full, structure::diag, structure::block};

// ---------------------------------------------------------------------------------------------
// Preconditioner reference.

double f_ref(double lambda, const root_spec& s) {
  lambda = std::max(lambda, 0.0);
  if (s.form == root_form::adam) return 1.0 / (std::sqrt(lambda) + s.eps);
  return std::pow(lambda + s.eps, -0.5);
}

double sensitivity(double lambda_min, const root_spec& s) {
  lambda_min = std::max(lambda_min, 0.0);
  if (s.form == root_form::adam)
    return 1.0 / (2.0 * std::sqrt(lambda_min) * (std::sqrt(lambda_min) + s.eps));
  return 1.0 / (2.0 * (lambda_min + s.eps));
}

dmat f_of(const dmat& g, const root_spec& s) {
  const Eigen::SelfAdjointEigenSolver<dmat> es(g);
  dvec w(g.rows());
  for (index_t i = 0; i < w.size(); ++i) w[i] = f_ref(es.eigenvalues()[i], s);
  return es.eigenvectors() * w.asDiagonal() * es.eigenvectors().transpose();
}

template <class T>
double precond_tol(const dmat& g, const root_spec& s, double delta_f) {
  const dvec lam = Eigen::SelfAdjointEigenSolver<dmat>(g, Eigen::EigenvaluesOnly).eigenvalues();
  const double u = unit_roundoff<T>();
  const double sens = sensitivity(lam[0], s);
  return 4.0 * u * (2.0 * sens * std::max(lam[lam.size() - 1], 0.0) + 2.0 * double(g.rows())) +
         2.0 * sens * delta_f;
}

// ---------------------------------------------------------------------------------------------

template <class T>
class Estimator : public ::testing::Test {};
using Scalars = ::testing::Types<float, double>;
TYPED_TEST_SUITE(Estimator, Scalars);

TYPED_TEST(Estimator, MatchesReferenceEma) {
  using T = TypeParam;
  for (const structure s : all_structures)
    for (const index_t d : {1, 2, 7})
      for (const double beta : {0.0, 0.5, 0.9, 0.999}) {
        const std::string what =
            name(s) + " d=" + std::to_string(d) + " beta=" + std::to_string(beta);
        SCOPED_TRACE(what);
        const auto gs = make_gradients<T>(60, d, 100 + std::uint64_t(d));
        auto est = make_estimator<T>(d, s, constant(beta));
        reference_ema ref(d);
        EXPECT_EQ(est.estimate_size(), s == structure::diag   ? d
                                       : s == structure::full ? d * d
                                                              : [&] {
                                                                  index_t n = 0;
                                                                  for (index_t b : blocks_for(d))
                                                                    n += b * b;
                                                                  return n;
                                                                }());
        // zero before any update
        for (const T x : estimate_of(est)) EXPECT_EQ(x, T(0));
        for (index_t i = 0; i < gs.n; ++i) {
          const std::vector<T> before(gs.row(i), gs.row(i) + d);
          est.update(gs.row(i));
          EXPECT_TRUE(std::equal(before.begin(), before.end(), gs.row(i))) << "g modified";
          ref.update(gs.exact.row(i).transpose(), beta);
        }
        EXPECT_EQ(est.steps(), 60);
        expect_matches(est, ref, ema_tol<T>(60, beta), what);
        // full and block estimates are symmetric to the last bit
        if (s != structure::diag) {
          for (const dmat& m : unflatten(est, estimate_of(est))) EXPECT_TRUE(m == m.transpose());
        }
      }
}

TYPED_TEST(Estimator, BetaZeroKeepsExactlyTheLastOuterProduct) {
  using T = TypeParam;
  const index_t d = 6;
  const auto gs = make_gradients<T>(5, d, 7);
  for (const structure s : all_structures)
    for (const bool bias : {false, true}) {
      SCOPED_TRACE(name(s) + (bias ? " bias-corrected" : ""));
      auto est = make_estimator<T>(d, s, constant(0.0), bias);
      for (index_t i = 0; i < gs.n; ++i) {
        est.update(gs.row(i));
        // g_i g_j is one rounding in T, in the library as here
        Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> gg(d, d);
        for (index_t a = 0; a < d; ++a)
          for (index_t b = 0; b < d; ++b) gg(a, b) = gs.row(i)[a] * gs.row(i)[b];
        const auto want = project(gg.template cast<double>(), s, d);
        const auto got = unflatten(est, estimate_of(est));
        for (std::size_t b = 0; b < got.size(); ++b) EXPECT_TRUE(got[b] == want[b]) << i;
      }
      est.update_batch(gs.rows.data(), 3);
      Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> gg(d, d);
      for (index_t a = 0; a < d; ++a)
        for (index_t b = 0; b < d; ++b) gg(a, b) = gs.row(2)[a] * gs.row(2)[b];
      const auto want = project(gg.template cast<double>(), s, d);
      const auto got = unflatten(est, estimate_of(est));
      for (std::size_t b = 0; b < got.size(); ++b) EXPECT_TRUE(got[b] == want[b]) << "batch";
    }
}

TYPED_TEST(Estimator, UpdateBatchEqualsSequentialUpdates) {
  using T = TypeParam;
  const index_t d = 7;
  const std::vector<ss::schedule_ptr> betas = {constant(0.5), constant(0.9),
                                               beta_schedule(0.3, 1.0, 0.2)};
  for (const structure s : all_structures)
    for (const auto& beta : betas)
      for (const index_t k : {1, 5, 64}) {
        const std::string what = name(s) + " " + beta->describe() + " k=" + std::to_string(k);
        SCOPED_TRACE(what);
        const auto gs = make_gradients<T>(3 * k + 2, d, 200 + std::uint64_t(k));
        auto batched = make_estimator<T>(d, s, beta);
        auto sequential = make_estimator<T>(d, s, beta);
        reference_ema ref(d);
        // chunks [0, 1), [1, k + 1), [k + 1, k + 2), [k + 2, n): batches start at odd steps;
        // with beta = 0.5 and k = 64 one batch decays by 2^-64, past the renormalisation
        // threshold.
        const index_t cuts[] = {0, 1, k + 1, k + 2, gs.n};
        for (int c = 0; c < 4; ++c) {
          const index_t lo = cuts[c], hi = cuts[c + 1];
          if (hi - lo == 1)
            batched.update(gs.row(lo));
          else
            batched.update_batch(gs.row(lo), hi - lo);
          for (index_t i = lo; i < hi; ++i) {
            sequential.update(gs.row(i));
            ref.update(gs.exact.row(i).transpose(), *beta);
          }
          EXPECT_EQ(batched.steps(), hi);
        }
        const double tol = ema_tol<T>(gs.n, ref.beta_max, k);
        expect_matches(batched, ref, tol, what + " batched");
        expect_matches(sequential, ref, tol, what + " sequential");
        // prod beta_t, multiplied in another order: n roundings either way
        const double pb = batched.save().beta_product, ps = sequential.save().beta_product;
        EXPECT_LE(std::abs(pb - ps), 2.0 * double(gs.n) * unit_roundoff<double>() * ps);
      }
}

TYPED_TEST(Estimator, EmptyBatchIsANoOp) {
  using T = TypeParam;
  for (const structure s : all_structures) {
    auto est = make_estimator<T>(4, s, constant(0.9));
    const auto gs = make_gradients<T>(3, 4, 5);
    est.update_batch(gs.rows.data(), 3);
    const auto before = est.save();
    est.update_batch(nullptr, 0);
    EXPECT_TRUE(same_state<T>(before, est.save())) << name(s);
    EXPECT_INVALID("got -1", est.update_batch(gs.rows.data(), -1));
    EXPECT_TRUE(same_state<T>(before, est.save())) << name(s);
  }
}

// Long runs with ill-scaled gradients: the storage G = s * S renormalises whenever s falls
// below sqrt(u) (every 26 updates for beta = 0.5, every 18,000 for 0.999 in double; every 12
// and 8,000 in float). The scale must stay in [sqrt(u), 1], renormalisations must happen, the
// state must hold no subnormal values, and the estimate must match the plain EMA.
template <class T>
void long_run(const std::vector<double>& scales, double beta, std::int64_t n, structure s,
              const std::string& what) {
  SCOPED_TRACE(what);
  const auto d = static_cast<index_t>(scales.size());
  const auto gs = scaled_gradients<T>(n, scales, 300 + std::uint64_t(beta * 1000));
  auto est = make_estimator<T>(d, s, constant(beta));
  reference_ema ref(d);
  const double threshold = std::sqrt(unit_roundoff<T>());
  int resets = 0;
  double last = 1.0;
  for (index_t i = 0; i < n; ++i) {
    est.update(gs.row(i));
    ref.update(gs.exact.row(i).transpose(), beta);
    const double sc = est.save().scale;
    ASSERT_GE(sc, threshold) << "step " << i;
    ASSERT_LE(sc, 1.0) << "step " << i;
    if (sc > last) ++resets;
    last = sc;
  }
  EXPECT_GE(resets, 2) << "the premise: renormalised more than once";
  ASSERT_TRUE(ref.g.allFinite());
  expect_matches(est, ref, ema_tol<T>(n, beta), what);
  const auto st = est.save();
  EXPECT_FALSE(has_subnormal(st.data)) << "subnormal values in the state";
  EXPECT_TRUE(std::all_of(st.data.begin(), st.data.end(), [](T x) { return std::isfinite(x); }))
      << "non-finite values in the state";
}

// Each scale set over full and block structures, beta 0.5 (5000 steps) and 0.999 (enough steps
// to renormalise at least twice).
template <class T>
void long_runs(const std::vector<std::pair<std::string, std::vector<double>>>& cases) {
  const std::int64_t n_slow = std::is_same_v<T, float> ? 20000 : 40000;
  for (const structure s : {structure::full, structure::block})
    for (const double beta : {0.5, 0.999}) {
      const std::int64_t n = beta == 0.5 ? 5000 : n_slow;
      const std::string tag = name(s) + " beta=" + std::to_string(beta);
      for (const auto& [label, scales] : cases) long_run<T>(scales, beta, n, s, label + " " + tag);
    }
}

TYPED_TEST(Estimator, LongRunsWithTinyAndModerateGradients) {
  using T = TypeParam;
  const double tiny = std::is_same_v<T, float> ? 1e-15 : 1e-150;
  long_runs<T>({{"tiny", {tiny, tiny, tiny, tiny}}, {"tiny and moderate", {tiny, 1.0, 1e-3, tiny}}});
}

// The same long runs with the other end of the range: entries about 1e150 in double (1e15 in
// float), with G about 1e300 (1e30), well inside the range of T.
TYPED_TEST(Estimator, LongRunsWithHugeGradients) {
  using T = TypeParam;
  const double huge = std::is_same_v<T, float> ? 1e15 : 1e150;
  const double tiny = std::is_same_v<T, float> ? 1e-15 : 1e-150;
  long_runs<T>({{"huge", {huge, huge, huge, huge}}, {"mixed", {tiny, 1.0, huge, tiny}}});
}

TYPED_TEST(Estimator, DecayThroughTheSubnormalRangeFlushesToZero) {
  using T = TypeParam;
  // Tiny gradients, then zeros: the exact EMA decays past the smallest normal number. The
  // state flushes such values rather than keeping subnormals, and stays within 4 tiny of the
  // plain EMA (which does pass through subnormals).
  const double tiny_g = std::is_same_v<T, float> ? 1e-15 : 1e-150;
  const index_t d = 5;
  for (const structure s : {structure::full, structure::block}) {
    for (const double beta : {0.5, 0.9}) {
      SCOPED_TRACE(name(s) + " beta=" + std::to_string(beta));
      const auto gs = scaled_gradients<T>(300, std::vector<double>(d, tiny_g), 400);
      auto est = make_estimator<T>(d, s, constant(beta));
      reference_ema ref(d);
      const std::vector<T> zero(static_cast<std::size_t>(d), T(0));
      const auto n_zero = static_cast<index_t>(std::log(1e-30) / std::log(beta)) + 200;
      bool reference_subnormal = false;
      for (index_t i = 0; i < gs.n + n_zero; ++i) {
        const bool g = i < gs.n;
        est.update(g ? gs.row(i) : zero.data());
        ref.update(g ? dvec(gs.exact.row(i).transpose()) : dvec(dvec::Zero(d)), beta);
        ASSERT_FALSE(has_subnormal(est.save().data)) << "step " << i;
        const double lim = double(std::numeric_limits<T>::min());
        reference_subnormal |= ((ref.g.array() != 0) && (ref.g.array().abs() < lim)).any();
      }
      EXPECT_TRUE(reference_subnormal) << "the premise";
      expect_matches(est, ref, ema_tol<T>(gs.n + n_zero, beta), "after the decay");
    }
  }
}

TYPED_TEST(Estimator, BiasCorrection) {
  using T = TypeParam;
  const index_t d = 4;
  const double u64 = unit_roundoff<double>();
  for (const structure s : all_structures) {
    for (const double beta : {0.5, 0.9, 0.999}) {
      SCOPED_TRACE(name(s) + " beta=" + std::to_string(beta));
      const auto gs = make_gradients<T>(30, d, 500);
      auto est = make_estimator<T>(d, s, constant(beta), true);
      EXPECT_TRUE(est.bias_correction());
      reference_ema ref(d);
      for (index_t i = 0; i < gs.n; ++i) {
        est.update(gs.row(i));
        ref.update(gs.exact.row(i).transpose(), beta);
        const double p = std::pow(beta, double(ref.steps));
        // 1 - P amplifies the t roundings of the product P by P / (1 - P)
        const double tol = ema_tol<T>(ref.steps, beta) +
                           2.0 * double(ref.steps + 2) * u64 * p / (1.0 - p) +
                           4.0 * unit_roundoff<T>();
        expect_matches(est, ref, tol, "step " + std::to_string(i), 1.0 / (1.0 - p));
      }
    }
    // scheduled beta: divided by 1 - prod_t beta_t, checked while the product is still far
    // from 0 (beta_t from 0.86 up to 0.93 over these 10 steps) and far from beta_0^t
    const auto sched = beta_schedule(0.05, 1.0, 0.0);
    const auto gs = make_gradients<T>(10, d, 501);
    auto est = make_estimator<T>(d, s, sched, true);
    reference_ema ref(d);
    for (index_t i = 0; i < gs.n; ++i) {
      est.update(gs.row(i));
      ref.update(gs.exact.row(i).transpose(), *sched);
      const double p = ref.beta_product;
      if (i >= 2) {
        EXPECT_GT(std::abs(p - std::pow((*sched)(0), double(ref.steps))), 0.01 * p)
            << "the premise: prod beta_t differs from beta_0^t";
      }
      const double tol = ema_tol<T>(ref.steps, ref.beta_max) +
                         2.0 * double(ref.steps + 2) * u64 * p / (1.0 - p) +
                         4.0 * unit_roundoff<T>();
      expect_matches(est, ref, tol, name(s) + " scheduled, step " + std::to_string(i),
                     1.0 / (1.0 - p));
    }
  }
}

TYPED_TEST(Estimator, ScheduledBetaMatchesLoop) {
  using T = TypeParam;
  const index_t d = 5, n = 400;
  // eta_0 = 2: 1 - C eta^(2/3) < 0 for the first steps, clipped to the floor 0.1.
  const double eta0 = 2.0, C = 1.0, floor = 0.1;
  const auto sched = beta_schedule(eta0, C, floor);
  std::vector<double> betas(static_cast<std::size_t>(n));
  for (index_t t = 0; t < n; ++t) {
    const double eta = eta0 / std::sqrt(double(t) + 1.0);
    betas[t] = std::clamp(1.0 - C * std::cbrt(eta) * std::cbrt(eta), floor,
                          std::nextafter(1.0, 0.0));
  }
  EXPECT_EQ(betas[0], floor);
  for (const structure s : all_structures) {
    SCOPED_TRACE(name(s));
    const auto gs = make_gradients<T>(n, d, 600);
    auto est = make_estimator<T>(d, s, sched);
    reference_ema ref(d);
    for (index_t i = 0; i < n; ++i) {
      est.update(gs.row(i));
      ref.update(gs.exact.row(i).transpose(), betas[i]);
    }
    expect_matches(est, ref, ema_tol<T>(n, ref.beta_max), name(s));
  }
}

TYPED_TEST(Estimator, PreconditionerAndApplyMatchReference) {
  using T = TypeParam;
  const bool single = std::is_same_v<T, float>;
  const double u = unit_roundoff<T>();
  struct shape {
    index_t d, n;
  };
  for (const shape sh : {shape{1, 3}, shape{7, 4}, shape{7, 40}, shape{200, 20}})
    for (const structure s : all_structures)
      for (const root_form form : {root_form::inv_sqrt, root_form::adam}) {
        const index_t d = sh.d, n = sh.n;
        // the adam form is not Lipschitz at a zero eigenvalue (see test_matrix_functions.cpp);
        // rank-deficient estimates are tested in the inv_sqrt form
        if (form == root_form::adam && n < d && s != structure::diag) continue;
        const std::string what = name(s) + " d=" + std::to_string(d) + " n=" +
                                 std::to_string(n) + " " + std::string(ss::to_string(form));
        SCOPED_TRACE(what);
        const auto gs = make_gradients<T>(n, d, 700 + std::uint64_t(d * n), 10.0);
        auto est = make_estimator<T>(d, s, constant(0.9));
        reference_ema ref(d);
        for (index_t i = 0; i < n; ++i) {
          est.update(gs.row(i));
          ref.update(gs.exact.row(i).transpose(), 0.9);
        }
        const double lam_max =
            Eigen::SelfAdjointEigenSolver<dmat>(ref.g, Eigen::EigenvaluesOnly).eigenvalues().maxCoeff();
        const double rel = single ? 1e-1 : 1e-3;
        const root_spec spec{2, form == root_form::inv_sqrt ? rel * lam_max : rel * std::sqrt(lam_max),
                             form};
        std::vector<T> flat(static_cast<std::size_t>(est.estimate_size()));
        est.preconditioner(spec, flat.data());
        const auto got = unflatten(est, flat);
        const auto want_g = project(ref.g, s, d);
        const auto want_a = project(ref.a, s, d);
        const auto v = make_gradients<T>(1, d, 800);
        std::vector<T> av(static_cast<std::size_t>(d), T(-7));
        est.apply(spec, v.rows.data(), av.data());
        dvec formed(d);
        const dvec vd = v.exact.row(0).transpose();
        if (s == structure::diag) {
          for (index_t i = 0; i < d; ++i) {
            const double gi = want_g[0](i, 0);
            const double delta = ema_tol<T>(n, 0.9) * want_a[0](i, 0) + u * std::abs(gi);
            const double f = f_ref(gi, spec);
            EXPECT_LE(std::abs(got[0](i, 0) - f), (4 * u + 2 * sensitivity(gi, spec) * delta) * f)
                << i;
            formed[i] = got[0](i, 0) * vd[i];
          }
        } else {
          index_t at = 0;
          for (std::size_t b = 0; b < got.size(); ++b) {
            const index_t m = got[b].rows();
            EXPECT_TRUE(got[b] == got[b].transpose());
            const double delta_f = ema_tol<T>(n, 0.9) * want_a[b].norm() + u * want_g[b].norm();
            const dmat f = f_of(want_g[b], spec);
            const double err = (got[b] - f).norm() / f.norm();
            EXPECT_LE(err, precond_tol<T>(want_g[b], spec, delta_f)) << "block " << b;
            formed.segment(at, m) = got[b] * vd.segment(at, m);
            at += m;
          }
        }
        // A v without forming A: the rounding of two length-b products through V.
        double norm_a = 0.0;
        index_t bmax = 1;
        for (const dmat& m : got) {
          norm_a = std::max(norm_a, s == structure::diag ? m.cwiseAbs().maxCoeff() : m.norm());
          if (s != structure::diag) bmax = std::max(bmax, m.rows());
        }
        dvec avd(d);
        for (index_t i = 0; i < d; ++i) avd[i] = double(av[i]);
        EXPECT_LE((avd - formed).norm(), 16 * u * double(bmax) * norm_a * vd.norm());
      }
}

TYPED_TEST(Estimator, PreconditionerOfASingularEstimateNeedsEps) {
  using T = TypeParam;
  for (const structure s : all_structures) {
    SCOPED_TRACE(name(s));
    const index_t d = 5;
    auto est = make_estimator<T>(d, s, constant(0.9));
    std::vector<T> out(static_cast<std::size_t>(est.estimate_size()));
    std::vector<T> v(static_cast<std::size_t>(d), T(1)), av(static_cast<std::size_t>(d));
    // G = 0 before any update
    EXPECT_THROW(est.preconditioner({2, 0.0, root_form::inv_sqrt}, out.data()), ss::numerical_error);
    EXPECT_THROW(est.apply({2, 0.0, root_form::adam}, v.data(), av.data()), ss::numerical_error);
    // with eps: eps^(-1/2) I, and 1 / eps I for the adam form
    est.preconditioner({2, 0.25, root_form::inv_sqrt}, out.data());
    for (const dmat& m : unflatten(est, out)) {
      const dmat want = m.cols() == 1 ? dmat(dmat::Constant(m.rows(), 1, 2.0))
                                      : dmat(2.0 * dmat::Identity(m.rows(), m.rows()));
      EXPECT_LE((m - want).cwiseAbs().maxCoeff(), 8 * unit_roundoff<T>());
    }
    est.apply({2, 0.25, root_form::adam}, v.data(), av.data());
    for (const T x : av) EXPECT_NEAR(double(x), 4.0, 16 * unit_roundoff<T>());
    // bad specs are invalid arguments
    EXPECT_INVALID("got -0.001", est.preconditioner({2, -1e-3, root_form::inv_sqrt}, out.data()));
    EXPECT_INVALID("got -0.001", est.apply({2, -1e-3, root_form::inv_sqrt}, v.data(), av.data()));
    if (s != structure::diag) {
      const T g[] = {T(1), T(2), T(3), T(4), T(5)};  // rank one in 5 dimensions
      est.update(g);
      EXPECT_NUMERICAL("singular", est.preconditioner({2, 0.0, root_form::inv_sqrt}, out.data()));
    }
    v[2] = std::numeric_limits<T>::quiet_NaN();
    EXPECT_INVALID("v[2] = nan", est.apply({2, 1e-3, root_form::inv_sqrt}, v.data(), av.data()));
  }
}

TYPED_TEST(Estimator, RefreshEveryReusesTheFactorisation) {
  using T = TypeParam;
  const index_t d = 6;
  const root_spec spec{2, 1e-2, root_form::inv_sqrt};
  const root_spec adam{2, 0.5, root_form::adam};
  for (const structure s : {structure::full, structure::block})
    for (const std::int64_t k : {2, 3}) {
      SCOPED_TRACE(name(s) + " k=" + std::to_string(k));
      const auto gs = make_gradients<T>(20, d, 900, 3.0);
      auto est = make_estimator<T>(d, s, constant(0.8), false, k);
      EXPECT_EQ(est.refresh_every(), k);
      const auto v = make_gradients<T>(1, d, 901);
      const auto size = static_cast<std::size_t>(est.estimate_size());
      // an estimator with the same state and nothing cached
      auto fresh = [&](const root_spec& sp) {
        auto f = make_estimator<T>(d, s, constant(0.8));
        f.load(est.save());
        std::vector<T> p(size);
        f.preconditioner(sp, p.data());
        return p;
      };
      auto fresh_apply = [&] {
        auto f = make_estimator<T>(d, s, constant(0.8));
        f.load(est.save());
        std::vector<T> out(static_cast<std::size_t>(d));
        f.apply(spec, v.rows.data(), out.data());
        return out;
      };
      for (index_t i = 0; i < 5; ++i) est.update(gs.row(i));
      std::vector<T> old_p(size), p(size), old_av(static_cast<std::size_t>(d)),
          av(static_cast<std::size_t>(d));
      est.preconditioner(spec, old_p.data());  // factors at step 5
      est.apply(spec, v.rows.data(), old_av.data());
      for (std::int64_t j = 1; j < k; ++j) {
        est.update(gs.row(4 + j));
        est.preconditioner(spec, p.data());
        EXPECT_EQ(p, old_p) << "after " << j << " updates: the OLD estimate's preconditioner";
        est.apply(spec, v.rows.data(), av.data());
        EXPECT_EQ(av, old_av);
        EXPECT_NE(fresh(spec), old_p) << "the premise: the estimate did change";
        // a copy starts with an empty cache, so it sees the current estimate
        auto copy = est;
        copy.preconditioner(spec, p.data());
        EXPECT_EQ(p, fresh(spec));
      }
      est.update(gs.row(4 + k));
      est.preconditioner(spec, p.data());
      EXPECT_EQ(p, fresh(spec)) << "after k updates: the new estimate's preconditioner";
      EXPECT_NE(p, old_p);
      est.apply(spec, v.rows.data(), av.data());
      EXPECT_EQ(av, fresh_apply());
      // the factorisation serves any eps and form
      est.preconditioner(adam, p.data());
      EXPECT_EQ(p, fresh(adam));
      // loading a state drops the cached factorisation
      auto other = make_estimator<T>(d, s, constant(0.8));
      for (index_t i = 10; i < 20; ++i) other.update(gs.row(i));
      est.load(other.save());
      est.preconditioner(spec, p.data());
      EXPECT_EQ(p, fresh(spec));
    }
}

TYPED_TEST(Estimator, SaveLoadContinuesBitIdentically) {
  using T = TypeParam;
  const index_t d = 7;
  const std::vector<ss::schedule_ptr> betas = {constant(0.5), beta_schedule(0.5, 1.0, 0.05)};
  for (const structure s : all_structures)
    for (const auto& beta : betas)
      for (const bool bias : {false, true}) {
        SCOPED_TRACE(name(s) + " " + beta->describe() + (bias ? " bias" : ""));
        const auto gs = make_gradients<T>(120, d, 1000);
        auto a = make_estimator<T>(d, s, beta, bias);
        for (index_t i = 0; i < 60; ++i) a.update(gs.row(i));
        const auto st = a.save();
        EXPECT_EQ(st.steps, 60);
        EXPECT_EQ(static_cast<index_t>(st.data.size()), a.estimate_size());
        auto b = make_estimator<T>(d, s, beta, bias);
        b.load(st);
        EXPECT_TRUE(same_state<T>(a.save(), b.save()));
        for (index_t i = 60; i < 90; ++i) {
          a.update(gs.row(i));
          b.update(gs.row(i));
        }
        a.update_batch(gs.row(90), 30);
        b.update_batch(gs.row(90), 30);
        EXPECT_TRUE(same_state<T>(a.save(), b.save()));
        EXPECT_EQ(estimate_of(a), estimate_of(b));
        std::vector<T> pa(static_cast<std::size_t>(a.estimate_size())), pb(pa.size());
        a.preconditioner({2, 1e-3, root_form::inv_sqrt}, pa.data());
        b.preconditioner({2, 1e-3, root_form::inv_sqrt}, pb.data());
        EXPECT_EQ(pa, pb);
      }
}

TYPED_TEST(Estimator, LoadRejectsBadStatesAndLeavesTheEstimatorUnchanged) {
  using T = TypeParam;
  using state = typename ss::ema_estimator<T>::state;
  const index_t d = 4;
  for (const structure s : all_structures) {
    SCOPED_TRACE(name(s));
    const auto gs = make_gradients<T>(10, d, 1100);
    auto src = make_estimator<T>(d, s, constant(0.9));
    for (index_t i = 0; i < 10; ++i) src.update(gs.row(i));
    auto dst = make_estimator<T>(d, s, constant(0.9));
    for (index_t i = 0; i < 3; ++i) dst.update(gs.row(i));
    const state before = dst.save();
    auto check = [&](const char* needle, auto garble) {
      state st = src.save();
      garble(st);
      EXPECT_INVALID(needle, dst.load(st));
      EXPECT_TRUE(same_state<T>(before, dst.save())) << needle;
    };
    check("steps must be >= 0, got -1", [](state& st) { st.steps = -1; });
    check("scale must be in (0, 1], got 0", [](state& st) { st.scale = 0.0; });
    check("got 2", [](state& st) { st.scale = 2.0; });
    check("got nan", [](state& st) { st.scale = std::nan(""); });
    check("beta_product must be in [0, 1], got nan", [](state& st) { st.beta_product = std::nan(""); });
    check("got 1.5", [](state& st) { st.beta_product = 1.5; });
    check("got -0.5", [](state& st) { st.beta_product = -0.5; });
    check("values for this estimator, got", [](state& st) { st.data.pop_back(); });
    check("values for this estimator, got", [](state& st) { st.data.push_back(T(0)); });
    check("non-finite", [](state& st) { st.data[1] = std::numeric_limits<T>::quiet_NaN(); });
    check("inf", [](state& st) { st.data[0] = std::numeric_limits<T>::infinity(); });
  }
}

TYPED_TEST(Estimator, BadGradientsLeaveTheEstimateUnchanged) {
  using T = TypeParam;
  const index_t d = 5;
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const T inf = std::numeric_limits<T>::infinity();
  for (const structure s : all_structures) {
    SCOPED_TRACE(name(s));
    const auto gs = make_gradients<T>(10, d, 1200);
    auto est = make_estimator<T>(d, s, constant(0.9));
    for (index_t i = 0; i < 3; ++i) est.update(gs.row(i));
    const auto before = est.save();

    std::vector<T> g(gs.row(3), gs.row(3) + d);
    g[2] = nan;
    EXPECT_INVALID("g has a non-finite entry g[2] = nan", est.update(g.data()));
    g[2] = T(1);
    g[4] = -inf;
    EXPECT_INVALID("g[4] = -inf", est.update(g.data()));
    g[4] = T(1);
    g[0] = inf;
    EXPECT_INVALID("g[0] = inf", est.update(g.data()));
    EXPECT_TRUE(same_state<T>(before, est.save()));

    // one bad row in the middle of a batch
    std::vector<T> rows(gs.rows.begin(), gs.rows.begin() + 7 * d);
    rows[3 * d + 1] = nan;
    EXPECT_INVALID("gs[3, 1] = nan", est.update_batch(rows.data(), 7));
    EXPECT_TRUE(same_state<T>(before, est.save()));
    rows[3 * d + 1] = T(0);
    rows[6 * d + 4] = -inf;
    EXPECT_INVALID("gs[6, 4] = -inf", est.update_batch(rows.data(), 7));
    EXPECT_TRUE(same_state<T>(before, est.save()));
    EXPECT_EQ(est.steps(), 3);

    // still usable afterwards
    est.update(gs.row(3));
    EXPECT_EQ(est.steps(), 4);
  }
}

TYPED_TEST(Estimator, BetaScheduleLeavingTheRangeLeavesTheEstimateUnchanged) {
  using T = TypeParam;
  const index_t d = 4;
  const auto gs = make_gradients<T>(10, d, 1300);
  for (const structure s : all_structures) {
    SCOPED_TRACE(name(s));
    // valid for t < 5, then 1 (not < 1), then NaN from t = 8
    const auto beta = std::make_shared<table_schedule>(
        std::vector<double>{0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.0, 1.0, std::nan("")});
    auto est = make_estimator<T>(d, s, beta);
    for (index_t i = 0; i < 2; ++i) est.update(gs.row(i));
    const auto before = est.save();
    // a batch of 6 from step 2 reaches beta_5 = 1 in its fourth row
    EXPECT_INVALID("beta_5 = 1", est.update_batch(gs.row(2), 6));
    EXPECT_TRUE(same_state<T>(before, est.save()));
    for (index_t i = 2; i < 5; ++i) est.update(gs.row(i));
    const auto at5 = est.save();
    EXPECT_INVALID("beta must be in [0, 1), got beta_5 = 1 from table", est.update(gs.row(5)));
    EXPECT_TRUE(same_state<T>(at5, est.save()));
    EXPECT_EQ(est.steps(), 5);
  }
  // beta_t from a step-size schedule that is not > 0
  auto est = make_estimator<T>(
      d, structure::full,
      std::make_shared<ss::beta_from_lr_schedule>(
          std::make_shared<table_schedule>(std::vector<double>{-0.1})));
  EXPECT_INVALID("lr_0 = -0.1", est.update(gs.row(0)));
  EXPECT_EQ(est.steps(), 0);
}

TYPED_TEST(Estimator, ConstructorErrorsNameTheValue) {
  using T = TypeParam;
  using est = ss::ema_estimator<T>;
  const auto b = constant(0.9);
  EXPECT_INVALID("dim must be >= 1, got 0", est(0, b));
  EXPECT_INVALID("got -3", est(-3, b));
  EXPECT_INVALID("beta must be a number in [0, 1) or a schedule", est(3, nullptr));
  EXPECT_INVALID("beta must be in [0, 1), got 1", est(3, constant(1.0)));
  EXPECT_INVALID("got -0.1", est(3, constant(-0.1)));
  EXPECT_INVALID("refresh_every must be >= 1, got 0", est(3, b, structure::full, {}, false, 0));
  EXPECT_INVALID("block_sizes must sum to dim = 4, they sum to 3",
                 est(4, b, structure::block, {1, 2}));
  EXPECT_INVALID("block_sizes[1] = 0", est(4, b, structure::block, {4, 0}));
  EXPECT_INVALID("block_sizes[0] = -1", est(4, b, structure::block, {-1, 5}));
  EXPECT_INVALID("needs block_sizes", est(4, b, structure::block, {}));
  EXPECT_INVALID("only for structure 'block'", est(4, b, structure::full, {2, 2}));
  EXPECT_INVALID("only for structure 'block'", est(4, b, structure::diag, {4}));
  // also catchable as the standard type (what pybind11 maps onto ValueError)
  EXPECT_THROW(est(0, b), std::invalid_argument);
  // the accessors
  const est e(5, b, structure::block, {2, 3}, true, 4);
  EXPECT_EQ(e.dim(), 5);
  EXPECT_EQ(e.layout(), structure::block);
  EXPECT_EQ(e.block_sizes(), (std::vector<index_t>{2, 3}));
  EXPECT_TRUE(e.bias_correction());
  EXPECT_EQ(e.refresh_every(), 4);
  EXPECT_EQ(e.beta(), b);
  EXPECT_EQ(e.steps(), 0);
  EXPECT_EQ(e.estimate_size(), 13);
  EXPECT_EQ(est(5, b).block_sizes(), (std::vector<index_t>{5}));
  EXPECT_TRUE(est(5, b, structure::diag).block_sizes().empty());
}

TYPED_TEST(Estimator, CovarianceMatchesReference) {
  using T = TypeParam;
  for (const structure s : all_structures)
    for (const index_t d : {1, 7}) {
      SCOPED_TRACE(name(s) + " d=" + std::to_string(d));
      const auto g1 = make_gradients<T>(50, d, 1400);
      const auto g2 = make_gradients<T>(50, d, 1401);
      ss::covariance_estimator<T> cov(d, constant(0.95), s,
                                      s == structure::block ? blocks_for(d) : std::vector<index_t>{});
      reference_ema ref(d);
      for (index_t i = 0; i < 50; ++i) {
        cov.update_pair(g1.row(i), g2.row(i));
        ref.update((g1.exact.row(i) - g2.exact.row(i)).transpose() / std::sqrt(2.0), 0.95);
      }
      EXPECT_EQ(cov.ema().steps(), 50);
      // one more rounding: the difference is formed in T
      expect_matches(cov.ema(), ref, ema_tol<T>(50, 0.95) + 8 * unit_roundoff<T>(), "covariance");
    }
}

TYPED_TEST(Estimator, CovarianceErrorsLeaveTheEstimateUnchanged) {
  using T = TypeParam;
  const index_t d = 4;
  ss::covariance_estimator<T> cov(d, constant(0.9));
  const T a[] = {T(1), T(2), T(3), T(4)};
  const T b[] = {T(0), T(1), T(0), T(-1)};
  cov.update_pair(a, b);
  const auto before = cov.ema().save();
  T bad[] = {T(1), std::numeric_limits<T>::quiet_NaN(), T(0), T(0)};
  EXPECT_INVALID("g1[1] = nan", cov.update_pair(bad, b));
  EXPECT_INVALID("g2[1] = nan", cov.update_pair(a, bad));
  EXPECT_TRUE(same_state<T>(before, cov.ema().save()));
  // finite gradients whose difference overflows
  const T big = std::numeric_limits<T>::max();
  const T p[] = {big, T(0), T(0), T(0)};
  const T m[] = {-big, T(0), T(0), T(0)};
  EXPECT_THROW(cov.update_pair(p, m), ss::numerical_error);
  EXPECT_TRUE(same_state<T>(before, cov.ema().save()));
  EXPECT_INVALID("beta must be in [0, 1), got 1", ss::covariance_estimator<T>(3, constant(1.0)));
}

// ---------------------------------------------------------------------------------------------
// Schedules.

TEST(Schedules, ConstantAndInverseSqrt) {
  const ss::constant_schedule c(0.25);
  EXPECT_EQ(c.value(), 0.25);
  for (std::int64_t t : {0, 1, 7, 1000000}) EXPECT_EQ(c(t), 0.25);
  EXPECT_NE(c.describe().find("constant(0.25)"), std::string::npos);
  const ss::inverse_sqrt_schedule s(2.0);
  EXPECT_EQ(s.eta0(), 2.0);
  EXPECT_EQ(s(0), 2.0);
  EXPECT_EQ(s(3), 1.0);
  for (const std::int64_t t : std::vector<std::int64_t>{1, 2, 10, 99, 12345, std::int64_t(1) << 40}) {
    const double want = 2.0 / std::sqrt(double(t) + 1.0);
    EXPECT_LE(std::abs(s(t) - want), unit_roundoff<double>() * want) << t;
  }
  EXPECT_NE(s.describe().find("inverse_sqrt"), std::string::npos);
  EXPECT_INVALID("got nan", ss::constant_schedule(std::nan("")));
  EXPECT_INVALID("got inf", (void)ss::constant_schedule(HUGE_VAL));
  EXPECT_INVALID("eta0 must be finite and > 0, got 0", ss::inverse_sqrt_schedule(0.0));
  EXPECT_INVALID("got -1", ss::inverse_sqrt_schedule(-1.0));
}

double ref_beta(double lr, double C, double floor) {
  const double beta = 1.0 - C * std::cbrt(lr) * std::cbrt(lr);
  return std::clamp(beta, floor, std::nextafter(1.0, 0.0));
}

double beta_tol(double lr, double C) {
  return 8.0 * unit_roundoff<double>() * std::max(1.0, C * std::cbrt(lr) * std::cbrt(lr));
}

TEST(Schedules, BetaFromLr) {
  for (const double C : {0.5, 1.0, 3.0})
    for (const double floor : {0.0, 0.3})
      for (int i = -120; i <= 10; ++i) {
        const double lr = std::pow(10.0, i / 10.0);
        const double b = ss::beta_from_lr(lr, C, floor);
        EXPECT_LE(std::abs(b - ref_beta(lr, C, floor)), beta_tol(lr, C)) << lr << " " << C;
        EXPECT_GE(b, floor);
        EXPECT_LT(b, 1.0);
      }
  // clipping: never 1 (that would freeze the estimate), never below the floor
  EXPECT_EQ(ss::beta_from_lr(1e-30), std::nextafter(1.0, 0.0));
  EXPECT_EQ(ss::beta_from_lr(5e-324), std::nextafter(1.0, 0.0));
  EXPECT_EQ(ss::beta_from_lr(8.0), 0.0);
  EXPECT_EQ(ss::beta_from_lr(8.0, 1.0, 0.25), 0.25);
  EXPECT_NEAR(ss::beta_from_lr(0.125), 0.75, 2 * unit_roundoff<double>());
  // errors
  EXPECT_INVALID("lr must be finite and > 0, got 0", ss::beta_from_lr(0.0));
  EXPECT_INVALID("got -0.5", ss::beta_from_lr(-0.5));
  EXPECT_INVALID("got nan", ss::beta_from_lr(std::nan("")));
  EXPECT_INVALID("C must be finite and > 0, got 0", ss::beta_from_lr(0.1, 0.0));
  EXPECT_INVALID("got -2", ss::beta_from_lr(0.1, -2.0));
  EXPECT_INVALID("floor must be in [0, 1), got 1", ss::beta_from_lr(0.1, 1.0, 1.0));
  EXPECT_INVALID("got -0.1", ss::beta_from_lr(0.1, 1.0, -0.1));
}

// 1 - C lr^(2/3) well inside (0, 1) with lr far from 1 and C compensating: the formula has no
// overflow or underflow, only an intermediate like lr^2 would.
TEST(Schedules, BetaFromLrExtremeStepSizes) {
  const std::pair<double, double> cases[] = {
      {1e-170, 1e112}, {1e-200, 1e133}, {1e160, 1e-110}, {1e200, 1e-134}, {1e-150, 4e99}};
  for (const auto& [lr, C] : cases) {
    const double want = ref_beta(lr, C, 0.0);
    EXPECT_GT(want, 0.5);
    EXPECT_LE(std::abs(ss::beta_from_lr(lr, C) - want), beta_tol(lr, C))
        << "beta_from_lr(" << lr << ", C=" << C << ") = " << ss::beta_from_lr(lr, C)
        << ", want " << want;
  }
}

TEST(Schedules, BetaFromLrScheduleMatchesLoop) {
  for (const auto& [eta0, C, floor] :
       {std::tuple{2.0, 1.0, 0.1}, std::tuple{0.05, 1.0, 0.0}, std::tuple{0.3, 2.0, 0.5}}) {
    const auto lr = std::make_shared<ss::inverse_sqrt_schedule>(eta0);
    const ss::beta_from_lr_schedule s(lr, C, floor);
    EXPECT_EQ(s.lr(), lr);
    EXPECT_EQ(s.C(), C);
    EXPECT_EQ(s.floor(), floor);
    for (std::int64_t t = 0; t < 3000; ++t) {
      const double eta = eta0 / std::sqrt(double(t) + 1.0);
      EXPECT_LE(std::abs(s(t) - ref_beta(eta, C, floor)), beta_tol(eta, C)) << t;
    }
    EXPECT_NE(s.describe().find("inverse_sqrt"), std::string::npos);
  }
  EXPECT_INVALID("needs a step-size schedule", ss::beta_from_lr_schedule(nullptr));
  const auto lr = std::make_shared<ss::inverse_sqrt_schedule>(1.0);
  EXPECT_INVALID("C must be finite and > 0, got 0", ss::beta_from_lr_schedule(lr, 0.0));
  EXPECT_INVALID("got 1.5", ss::beta_from_lr_schedule(lr, 1.0, 1.5));
  // A constant step size that is not > 0 is rejected at construction, a schedule that leaves
  // the range when the step is reached.
  EXPECT_INVALID("got -0.25",
                 ss::beta_from_lr_schedule(std::make_shared<ss::constant_schedule>(-0.25)));
  const ss::beta_from_lr_schedule bad(
      std::make_shared<table_schedule>(std::vector<double>{0.1, 0.1, -0.25}));
  EXPECT_INVALID("lr_2 = -0.25", (void)bad(2));
}

TEST(Structures, ParseAndNames) {
  for (const structure s : all_structures) EXPECT_EQ(ss::parse_structure(ss::to_string(s)), s);
  EXPECT_EQ(ss::parse_structure("diag"), structure::diag);
  EXPECT_INVALID("'dense'", ss::parse_structure("dense"));
  EXPECT_INVALID("'Full'", ss::parse_structure("Full"));
  EXPECT_INVALID("''", ss::parse_structure(""));
}

}  // namespace
