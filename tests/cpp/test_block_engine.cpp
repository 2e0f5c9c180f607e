// Unit tests of the block engine (saddlescape/block_engine.hpp), as a C++ caller drives it on
// its own buffers. The reference is a dense EMA per block in double with Eigen's
// SelfAdjointEigenSolver (the engine uses LAPACK syevd and, between refreshes, its low-rank
// quadrature), f(G_b) g_b with negative eigenvalues clipped to zero.

#include <saddlescape/block_engine.hpp>

#include <gtest/gtest.h>

#include "expect_throw.hpp"
#include <Eigen/Dense>

#include <cmath>
#include <cstdint>
#include <memory>
#include <random>
#include <vector>

namespace {

namespace ss = saddlescape;
using ss::index_t;

ss::schedule_ptr constant(double v) { return std::make_shared<ss::constant_schedule>(v); }

struct reference {
  std::vector<index_t> sizes;
  std::vector<Eigen::MatrixXd> G;
  double beta, eps;
  ss::root_form form;
  reference(std::vector<index_t> s, double b, double e, ss::root_form f)
      : sizes(std::move(s)), beta(b), eps(e), form(f) {
    for (index_t n : sizes) G.push_back(Eigen::MatrixXd::Zero(n, n));
  }
  std::vector<double> update_direction(const std::vector<double>& g) {
    std::vector<double> out(g.size());
    index_t at = 0;
    for (std::size_t b = 0; b < sizes.size(); ++b) {
      const index_t n = sizes[b];
      const Eigen::Map<const Eigen::VectorXd> gb(g.data() + at, n);
      G[b] = beta * G[b] + (1 - beta) * gb * gb.transpose();
      Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> es(G[b]);
      Eigen::VectorXd f = es.eigenvalues().cwiseMax(0.0);
      for (index_t i = 0; i < n; ++i)
        f[i] = form == ss::root_form::adam ? 1 / (std::sqrt(f[i]) + eps) : 1 / std::sqrt(f[i] + eps);
      const Eigen::VectorXd d = es.eigenvectors() * f.asDiagonal() * es.eigenvectors().transpose() * gb;
      std::copy(d.data(), d.data() + n, out.data() + at);
      at += n;
    }
    return out;
  }
};

double worst_block_error(const std::vector<index_t>& sizes, const std::vector<double>& a,
                         const std::vector<double>& b) {
  double worst = 0;
  index_t at = 0;
  for (index_t n : sizes) {
    double num = 0, den = 0;
    for (index_t i = at; i < at + n; ++i) num += (a[i] - b[i]) * (a[i] - b[i]), den += b[i] * b[i];
    worst = std::max(worst, std::sqrt(num / std::max(den, 1e-300)));
    at += n;
  }
  return worst;
}

class BlockEngine : public ::testing::TestWithParam<ss::root_form> {};

TEST_P(BlockEngine, ExactDirectionsBetweenStaggeredRefreshes) {
  const std::vector<index_t> sizes{9, 1, 20, 4};
  ss::block_engine_options o;
  o.eps = 1e-6;
  o.form = GetParam();
  o.refresh_every = 6;
  ss::block_engine<double> eng(sizes, constant(0.9), o);
  reference ref(sizes, 0.9, 1e-6, GetParam());
  std::mt19937_64 rng(3);
  std::normal_distribution<double> normal;
  std::vector<double> g(34), dir(34);
  double worst = 0;
  for (int t = 0; t < 40; ++t) {
    for (index_t i = 0; i < 34; ++i) g[i] = normal(rng) * std::pow(10.0, -2.0 * i / 33.0);
    eng.update_direction(g.data(), dir.data());
    worst = std::max(worst, worst_block_error(sizes, dir, ref.update_direction(g)));
  }
  EXPECT_LT(worst, GetParam() == ss::root_form::adam ? 1e-7 : 1e-8);
  EXPECT_EQ(eng.updates(), 40);
  const auto stats = eng.statistics();
  for (auto r : stats.refreshes) EXPECT_GE(r, 40 / 6);
}

INSTANTIATE_TEST_SUITE_P(Forms, BlockEngine,
                         ::testing::Values(ss::root_form::inv_sqrt, ss::root_form::adam));

TEST(BlockEngine, UpdateAndDirectionOfAnotherVectorKeepsItsRefactorisations) {
  // The adam form where the low-rank update is unstable: gradients along an eigenvalue of
  // 1e-8 lambda_max, where Woodbury's rounding would be amplified 1e8x, so each such update
  // refactors. update_and_direction keeps those refactorisations (counted); update() then
  // direction() discards them; both give the dense reference's directions.
  const index_t n = 12;
  ss::block_engine_options o;
  o.eps = 1e-3;
  o.form = ss::root_form::adam;
  o.refresh_every = 16;
  ss::block_engine<double> a({n}, constant(0.9), o), b({n}, constant(0.9), o);
  std::mt19937_64 rng(5);
  std::normal_distribution<double> normal;
  Eigen::MatrixXd basis = Eigen::MatrixXd::NullaryExpr(n, n, [&] { return normal(rng); });
  basis = Eigen::HouseholderQR<Eigen::MatrixXd>(basis).householderQ();
  std::vector<double> g(n), v(n), da(n), db(n);
  Eigen::MatrixXd G = Eigen::MatrixXd::Zero(n, n);
  for (int t = 0; t < 46; ++t) {
    Eigen::VectorXd z(n);
    for (index_t i = 0; i < n; ++i)
      z[i] = t < 40 ? normal(rng) * std::pow(10.0, -4.0 * i / (n - 1))
                    : (i == n - 1 ? 1.0 : 1e-3 * normal(rng));
    const Eigen::VectorXd gb = basis * z;
    std::copy(gb.data(), gb.data() + n, g.data());
    for (double& x : v) x = normal(rng);
    a.update_and_direction(g.data(), v.data(), da.data());
    b.update(g.data());
    b.direction(v.data(), db.data());
    G = 0.9 * G + 0.1 * gb * gb.transpose();
    Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> es(G);
    Eigen::VectorXd f = es.eigenvalues();
    for (index_t i = 0; i < n; ++i)
      f[i] = 1 / (std::sqrt(f[i] <= n * 2.2e-16 * f.maxCoeff() ? 0.0 : f[i]) + 1e-3);
    const Eigen::VectorXd want = es.eigenvectors() * f.asDiagonal() *
                                 es.eigenvectors().transpose() *
                                 Eigen::Map<const Eigen::VectorXd>(v.data(), n);
    const std::vector<double> w(want.data(), want.data() + n);
    EXPECT_LT(worst_block_error({n}, da, w), 1e-8) << t;
    EXPECT_LT(worst_block_error({n}, db, w), 1e-8) << t;
  }
  EXPECT_GT(a.statistics().refreshes[0], b.statistics().refreshes[0]);
  v[4] = std::nan("");
  EXPECT_INVALID("v[4] = nan", a.update_and_direction(g.data(), v.data(), da.data()));
  EXPECT_EQ(a.updates(), 46);
}

TEST(BlockEngine, AdamFormOnSingularBlocksRefactorsOnlyOnSchedule) {
  // Fewer gradients than the block size: the estimate's exact zeros are split off in the
  // low-rank update, so no block refactors off its schedule, and the directions equal those
  // of the dense reference.
  const std::vector<index_t> sizes{12, 1, 7};
  ss::block_engine_options o;
  o.eps = 1e-3;
  o.form = ss::root_form::adam;
  o.refresh_every = 4;
  ss::block_engine<double> eng(sizes, constant(0.9), o);
  reference ref(sizes, 0.9, 1e-3, ss::root_form::adam);
  std::mt19937_64 rng(5);
  std::normal_distribution<double> normal;
  std::vector<double> g(20), d(20);
  for (int t = 0; t < 6; ++t) {
    for (index_t i = 0; i < 20; ++i) g[i] = normal(rng) * std::pow(10.0, -3.0 * i / 19.0);
    eng.update_direction(g.data(), d.data());
    EXPECT_LT(worst_block_error(sizes, d, ref.update_direction(g)), 1e-7) << t;
  }
  std::int64_t total = 0;
  for (auto r : eng.statistics().refreshes) total += r;
  EXPECT_EQ(total, 3 * 6 / 4);
}

TEST(BlockEngine, RangeRefreshOfARankDeficientBlockEqualsTheColdOne) {
  // Gradients in a fixed subspace of rank 6 of a block of 40 (and a full-rank block of 5):
  // refresh(warm = true) takes the range refresh for the big block, refresh(warm = false) a
  // cold syevd; both factorise the same estimate, so their directions agree to rounding.
  const std::vector<index_t> sizes{40, 5};
  ss::block_engine_options o;
  o.eps = 1e-6;
  o.refresh_every = 256;  // no refresh but the ones asked for
  std::mt19937_64 rng(9);
  std::normal_distribution<double> normal;
  Eigen::MatrixXd L(40, 6);
  for (index_t j = 0; j < 6; ++j)
    for (index_t i = 0; i < 40; ++i) L(i, j) = normal(rng) * std::pow(10.0, -0.5 * j);
  for (auto form : {ss::root_form::inv_sqrt, ss::root_form::adam}) {
    o.form = form;
    ss::block_engine<double> range(sizes, constant(0.95), o), cold(sizes, constant(0.95), o);
    std::vector<double> g(45), v(45), dr(45), dc(45);
    for (int round = 0; round < 5; ++round) {
      for (int t = 0; t < 9; ++t) {
        Eigen::VectorXd z(6);
        for (index_t j = 0; j < 6; ++j) z[j] = normal(rng);
        const Eigen::VectorXd gb = L * z;
        std::copy(gb.data(), gb.data() + 40, g.data());
        for (index_t i = 40; i < 45; ++i) g[i] = normal(rng);
        range.update(g.data());
        cold.update(g.data());
      }
      range.refresh(-1, true);
      cold.refresh(-1, false);
      for (double& x : v) x = normal(rng);
      range.direction(v.data(), dr.data());
      cold.direction(v.data(), dc.data());
      // The null space's share of v is scaled by 1 / sqrt(eps) or 1 / eps, so compare the
      // directions relative to the whole vector.
      EXPECT_LT(worst_block_error(sizes, dr, dc), form == ss::root_form::adam ? 1e-9 : 1e-11)
          << round;
    }
    const auto st = range.statistics();
    EXPECT_EQ(st.warm_refreshes[0], 5);  // the range refresh each time
    EXPECT_EQ(st.warm_refreshes[1], 0);  // full rank: cold
    EXPECT_EQ(cold.statistics().warm_refreshes[0], 0);
  }
}

TEST(BlockEngineErrors, BadInputChangesNothing) {
  ss::block_engine<float> eng({3, 2}, constant(0.9));
  std::vector<float> g{1, 2, 3, 4, 5}, x(5, 1.0f);
  eng.update(g.data());
  const auto before = eng.save();
  g[3] = std::nanf("");
  EXPECT_INVALID("g[3] = nan", eng.step(x.data(), g.data(), 0.1));
  g[3] = 1e30f;
  EXPECT_NUMERICAL("would overflow float32", eng.update(g.data()));
  const auto after = eng.save();
  EXPECT_EQ(before.data, after.data);
  EXPECT_EQ(before.scalars, after.scalars);
  for (float v : x) EXPECT_EQ(v, 1.0f);
  EXPECT_INVALID("block_sizes[1] = 0", ss::block_engine<double>({2, 0}, constant(0.9)));
  EXPECT_INVALID("beta must be in [0, 1)", ss::block_engine<double>({2}, constant(1.0)));
  EXPECT_INVALID("bytes", ss::block_engine<double>(std::vector<index_t>(4000, 30000), constant(0.9)));
}

}  // namespace
