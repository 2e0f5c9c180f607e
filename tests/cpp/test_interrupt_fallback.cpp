// Issue 15: the run loop's monitor (interruption at a step boundary, progress, exceptions from
// user code kept with the records) and the block engine's fallback policy for failed
// refactorisations, driven by its failure-injection hook.

#include <saddlescape/saddlescape.hpp>

#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <stdexcept>
#include <vector>

namespace ss = saddlescape;
using ss::index_t;

namespace {

ss::schedule_ptr constant(double v) { return std::make_shared<ss::constant_schedule>(v); }

std::shared_ptr<ss::function_problem> noisy_bowl(index_t d) {
  return std::make_shared<ss::function_problem>(
      d,
      [d](const double* x, ss::rng& r, double* g) {
        for (index_t i = 0; i < d; ++i) g[i] = double(i + 1) * x[i] + 0.3 * r.normal();
      },
      [d](const double* x) {
        double f = 0.0;
        for (index_t i = 0; i < d; ++i) f += 0.5 * double(i + 1) * x[i] * x[i];
        return f;
      });
}

bool same(const std::vector<double>& a, const std::vector<double>& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(double)) == 0);
}

}  // namespace

TEST(RunMonitor, StopsAtAStepBoundaryWithTheRecordsOfTheStepsDone) {
  const auto p = noisy_bowl(3);
  const std::vector<double> x0{1.0, -1.0, 0.5};
  ss::sgd opt(3, constant(0.01));
  ss::run_options o;
  o.steps = 1000000000;
  o.record_every = 7;
  o.monitor_interval = 1e-9;  // every step
  std::vector<std::int64_t> seen;
  o.monitor = [&](std::int64_t done) {
    seen.push_back(done);
    return done < 100;
  };
  const auto r = ss::run(*p, opt, x0.data(), o);
  EXPECT_EQ(r.status, ss::run_status::interrupted);
  EXPECT_EQ(r.stopped_at, 100);
  EXPECT_EQ(opt.steps(), 100);
  EXPECT_EQ(r.t.back(), 100);  // the last completed step is recorded
  EXPECT_EQ(seen.front(), 0);
  EXPECT_EQ(seen.back(), 100);
  ss::sgd ref_opt(3, constant(0.01));
  ss::run_options ro;
  ro.steps = 100;
  ro.record_every = 7;
  const auto ref = ss::run(*p, ref_opt, x0.data(), ro);
  EXPECT_TRUE(same(r.x_final, ref.x_final));
  EXPECT_TRUE(same(r.f, ref.f));
}

TEST(RunMonitor, AThrowingMonitorOrSamplerKeepsTheRecords) {
  const std::vector<double> x0{1.0, 2.0};
  ss::sgd opt(2, constant(0.01));
  ss::run_options o;
  o.steps = 50;
  o.monitor = [](std::int64_t done) -> bool {
    if (done >= 0) throw std::runtime_error("monitor says no");
    return true;
  };
  const auto p = noisy_bowl(2);
  auto r = ss::run(*p, opt, x0.data(), o);
  EXPECT_EQ(r.status, ss::run_status::error);
  ASSERT_TRUE(r.error);
  EXPECT_THROW(std::rethrow_exception(r.error), std::runtime_error);

  auto calls = std::make_shared<int>(0);
  const auto failing = std::make_shared<ss::function_problem>(
      2, [calls](const double* x, ss::rng&, double* g) {
        if ((*calls)++ == 10) throw std::runtime_error("oracle failed");
        g[0] = x[0];
        g[1] = x[1];
      });
  ss::sgd opt2(2, constant(0.01));
  ss::run_options o2;
  o2.steps = 50;
  r = ss::run(*failing, opt2, x0.data(), o2);
  EXPECT_EQ(r.status, ss::run_status::error);
  EXPECT_EQ(r.stopped_at, 10);
  EXPECT_EQ(r.t.size(), 11u);
  EXPECT_NE(r.message.find("oracle failed"), std::string::npos);
}

TEST(RunMonitor, RunManyStopsEverySeedAndReportsProgress) {
  const auto p = noisy_bowl(4);
  const std::vector<double> x0(4, 1.0);
  std::vector<std::unique_ptr<ss::sgd>> own;
  std::vector<ss::optimizer*> opts;
  std::vector<std::uint64_t> seeds;
  for (int i = 0; i < 5; ++i) {
    own.push_back(std::make_unique<ss::sgd>(4, constant(1e-3)));
    opts.push_back(own.back().get());
    seeds.push_back(static_cast<std::uint64_t>(i));
  }
  ss::run_options o;
  o.steps = 1000000000;
  o.record_every = 1000;
  o.monitor_interval = 0.01;
  std::int64_t last = -1;
  bool monotone = true;
  o.monitor = [&](std::int64_t done) {
    monotone &= done >= last;
    last = done;
    return done < 20000;
  };
  const auto rs = ss::run_many(*p, opts, x0.data(), o, seeds, 2);
  EXPECT_TRUE(monotone);
  EXPECT_GE(last, 20000);
  for (std::size_t i = 0; i < rs.size(); ++i) {
    EXPECT_EQ(rs[i].status, ss::run_status::interrupted) << i;
    EXPECT_EQ(opts[i]->steps(), rs[i].stopped_at) << i;
  }
}

TEST(BlockEngineFallback, FailuresStayInTheirBlockAndRaiseAfterTheLimit) {
  const std::vector<index_t> sizes{5, 4, 6};
  ss::block_engine_options bo;
  bo.eps = 1e-6;
  bo.refresh_every = 2;
  bo.max_consecutive_failures = 2;
  ss::block_engine<float> a(sizes, constant(0.9), bo), b(sizes, constant(0.9), bo);
  std::mt19937_64 rng(5);
  std::normal_distribution<float> normal;
  std::vector<float> g(15), da(15), db(15);
  auto next = [&] {
    for (auto& v : g) v = normal(rng);
  };
  for (int t = 0; t < 3; ++t) {
    next();
    a.update(g.data());
    b.update(g.data());
  }
  a.inject_refresh_failures(1, 2, 1);  // rescued in float64
  for (int t = 0; t < 6; ++t) {
    next();
    a.update_direction(g.data(), da.data());
    b.update_direction(g.data(), db.data());
    for (index_t i = 0; i < 5; ++i) EXPECT_EQ(da[i], db[i]);
    for (index_t i = 9; i < 15; ++i) EXPECT_EQ(da[i], db[i]);
    for (index_t i = 5; i < 9; ++i) EXPECT_NEAR(da[i], db[i], 2e-3 * std::abs(db[i]) + 1e-6);
  }
  auto s = a.statistics();
  EXPECT_EQ(s.float64_retries[1], 2);
  EXPECT_EQ(s.kept_bases[1], 0);
  a.inject_refresh_failures(2, 100, 3);
  bool raised = false;
  for (int t = 0; t < 6 && !raised; ++t) {
    next();
    const auto before = a.save();
    try {
      a.update_direction(g.data(), da.data());
    } catch (const ss::numerical_error& e) {
      raised = true;
      EXPECT_NE(std::string(e.what()).find("block 2"), std::string::npos) << e.what();
      const auto after = a.save();
      EXPECT_EQ(after.data, before.data);
      EXPECT_EQ(after.scalars, before.scalars);
    }
  }
  EXPECT_TRUE(raised);
  EXPECT_EQ(a.statistics().kept_bases[2], 1);
}

TEST(EstimatorFallback, Float32RetriesInFloat64AtFloat32Tolerance) {
  // A rank-deficient float32 block (3 updates, d = 30): its float32 S has null-space
  // eigenvalues near -1e-9 lambda_max, which double's tolerance would call clearly negative.
  // The float64 retry clips them at float32's and gives the float32 solver's A v.
  ss::ema_estimator<float> a(31, constant(0.9), ss::structure::block, {30, 1}),
      b(31, constant(0.9), ss::structure::block, {30, 1});
  const ss::root_spec spec{2, 1e-4, ss::root_form::inv_sqrt};
  std::mt19937_64 rng(11);
  std::normal_distribution<double> normal;
  std::vector<float> g(31), oa(31), ob(31);
  for (int t = 0; t < 3; ++t) {
    for (int i = 0; i < 31; ++i) g[i] = static_cast<float>(normal(rng) * std::pow(10.0, -i / 10.0));
    a.update(g.data());
    b.update(g.data());
  }
  a.inject_factor_failures(0, 1, 1);
  a.apply(spec, g.data(), oa.data());
  b.apply(spec, g.data(), ob.data());
  double num = 0, den = 0;
  for (int i = 0; i < 31; ++i) num += (oa[i] - ob[i]) * (oa[i] - ob[i]), den += ob[i] * ob[i];
  EXPECT_LT(std::sqrt(num / den), 1e-4);
  const auto st = a.fallback_stats();
  EXPECT_EQ(st.failed_refreshes, (std::vector<std::int64_t>{1, 0}));
  EXPECT_EQ(st.float64_retries, (std::vector<std::int64_t>{1, 0}));
  EXPECT_EQ(st.kept_bases, (std::vector<std::int64_t>{0, 0}));
  EXPECT_EQ(b.fallback_stats().float64_retries, (std::vector<std::int64_t>{0, 0}));
}

TEST(EstimatorFallback, KeepsTheBlocksFactorisationAndRaisesAfterTheLimit) {
  ss::ema_estimator<double> a(5, constant(0.9), ss::structure::block, {2, 3}),
      b(5, constant(0.9), ss::structure::block, {2, 3});
  a.set_fallback({2, 0.0});
  const ss::root_spec spec{2, 1e-3, ss::root_form::inv_sqrt};
  std::mt19937_64 rng(9);
  std::normal_distribution<double> normal;
  std::vector<double> g(5), oa(5), ob(5), od(5);
  ss::ema_estimator<double> d(5, constant(0.9), ss::structure::block, {2, 3});
  auto feed = [&] {
    for (auto& v : g) v = normal(rng);
    a.update(g.data());
    b.update(g.data());
  };
  feed();
  d.update(g.data());  // d stays at the first update
  a.apply(spec, g.data(), oa.data());
  b.apply(spec, g.data(), ob.data());
  a.inject_factor_failures(0, 1, 3);
  feed();
  a.apply(spec, g.data(), oa.data());
  b.apply(spec, g.data(), ob.data());
  d.apply(spec, g.data(), od.data());
  for (int i = 2; i < 5; ++i) EXPECT_EQ(oa[i], ob[i]);  // block 1 refactored as usual
  // Block 0 used its previous factorisation: A of the first update.
  for (int i = 0; i < 2; ++i) EXPECT_EQ(oa[i], od[i]);
  EXPECT_NE(oa[0], ob[0]);
  EXPECT_EQ(a.fallback_stats().kept_bases, (std::vector<std::int64_t>{1, 0}));
  ss::ema_estimator<double> c(5, constant(0.9), ss::structure::block, {2, 3});
  a.inject_factor_failures(0, 5, 3);
  feed();
  EXPECT_THROW(a.apply(spec, g.data(), oa.data()), ss::numerical_error);
  EXPECT_EQ(a.fallback_stats().consecutive_failures, (std::vector<std::int64_t>{1, 0}));
  EXPECT_THROW(c.inject_factor_failures(2, 1, 1), ss::invalid_argument);
}
