// The many-seed GPU runner's per-seed code (cuda/src/simulate.hpp), run on the host through
// the plan that run_seeds builds (cuda/src/seed_plan.cpp), against run() itself. The kernel
// executes this same code, one thread per seed, so agreement here is what a machine without a
// GPU can check of it; tests/gpu checks the device against run_many() on a GPU.
//
// Tolerances: the host build of simulate() performs the same operations in the same order as
// the CPU optimizers, except that the CPU's diagonal kernels may be compiled with fused
// multiply-adds (multiversioned for AVX2/FMA) and noisy_quadratic's products go through Eigen.
// Per step that is a few u of |x|; the saddle's unstable direction (curvature -0.1) amplifies
// a difference by at most (1 + 0.1 lr) per step, under 3 over these runs. Checked at 1e-12
// relative to max(1, |x|).

#include <saddlescape/saddlescape.hpp>

#include <gtest/gtest.h>

#include "../../cuda/src/seed_plan.hpp"
#include "expect_throw.hpp"

#include <cmath>
#include <functional>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

namespace ss = saddlescape;
namespace sc = saddlescape::cuda;

namespace {

ss::schedule_ptr constant(double v) { return std::make_shared<ss::constant_schedule>(v); }

using maker = std::function<std::shared_ptr<ss::optimizer>(ss::index_t)>;

// run() for one seed, recording every step so that the escape step can be read off.
struct reference {
  ss::run_result run;
  std::int64_t escape = -1;
};

reference reference_run(const ss::problem& p, ss::optimizer& opt, const std::vector<double>& x0,
                        std::int64_t steps, std::uint64_t seed, double radius) {
  ss::run_options o;
  o.steps = steps;
  o.seed = seed;
  reference r{ss::run(p, opt, x0.data(), o)};
  const auto d = static_cast<std::size_t>(p.dim());
  for (std::size_t k = 0; k < r.run.t.size() && radius > 0; ++k) {
    double s = 0.0;
    for (std::size_t j = 0; j < d; ++j) {
      const double e = r.run.x[k * d + j] - x0[j];
      s += e * e;
    }
    if (s >= radius * radius) {
      r.escape = r.run.t[k];
      break;
    }
  }
  return r;
}

// Runs `seeds` seeds through the plan on the host and through run(), and compares.
// Returns how many of the seeds escaped in run().
int expect_agreement(const ss::problem& p, const maker& make, const std::vector<double>& x0,
                     std::int64_t steps, double radius = 0.0, int seeds = 6) {
  int escaped = 0;
  std::vector<std::uint64_t> list;
  for (int i = 0; i < seeds; ++i) list.push_back(1000 + 7 * static_cast<std::uint64_t>(i));
  sc::seed_run_options o;
  o.steps = steps;
  o.escape_radius = radius;
  sc::detail::seed_plan plan;
  sc::detail::make_seed_plan(p, *make(p.dim()), x0.data(), o, plan);
  const sc::seed_run_result got = sc::detail::run_seeds_on_host(plan, list);
  const auto d = static_cast<std::size_t>(p.dim());
  for (std::size_t i = 0; i < list.size(); ++i) {
    auto opt = make(p.dim());
    const reference want = reference_run(p, *opt, x0, steps, list[i], radius);
    SCOPED_TRACE(::testing::Message() << p.describe() << ", " << opt->describe() << ", seed "
                                      << list[i]);
    EXPECT_EQ(got.status[i], want.run.status) << want.run.message;
    EXPECT_EQ(got.stopped_at[i], want.run.stopped_at);
    if (want.run.status != ss::run_status::completed || got.status[i] != want.run.status) continue;
    for (std::size_t j = 0; j < d; ++j) {
      const double w = want.run.x_final[j];
      EXPECT_NEAR(got.x_final[i * d + j], w, 1e-12 * std::max(1.0, std::abs(w))) << "x_" << j;
    }
    EXPECT_NEAR(got.f_final[i], p.value(want.run.x_final.data()),
                1e-12 * std::max(1.0, std::abs(got.f_final[i])));
    if (radius > 0) {
      EXPECT_EQ(got.escape_step[i], want.escape);
    }
    escaped += want.escape >= 0;
  }
  return escaped;
}

std::shared_ptr<ss::saddle_problem> saddle(std::vector<double> h = {1.0, -0.1},
                                           std::vector<double> cov = {1.0, 0.01}) {
  return std::make_shared<ss::saddle_problem>(std::move(h), std::move(cov), 1000, 10, 3);
}

maker sgd(ss::schedule_ptr lr) {
  return [lr](ss::index_t d) { return std::make_shared<ss::sgd>(d, lr); };
}

maker rms(ss::schedule_ptr lr, ss::schedule_ptr beta, ss::root_form form = ss::root_form::inv_sqrt,
          std::int64_t burn_in = 0, double eps = 1e-8) {
  return [=](ss::index_t d) {
    ss::rmsprop_options o;
    o.layout = ss::structure::diag;
    o.form = form;
    o.burn_in = burn_in;
    o.eps = eps;
    return std::make_shared<ss::rmsprop>(d, lr, beta, o);
  };
}

maker escape(maker base, double r, std::int64_t t_thresh) {
  return [=](ss::index_t d) { return std::make_shared<ss::saddle_escape>(base(d), r, t_thresh); };
}

}  // namespace

TEST(SeedPlan, SaddleSgdAndRmspropAgreeWithRun) {
  const auto p = saddle();
  const std::vector<double> x0 = {0.0, 0.0};
  expect_agreement(*p, sgd(constant(0.01)), x0, 3000, 0.3);
  // RMSProp escapes the saddle within these steps, so the escape steps are compared for real.
  EXPECT_GE(
      expect_agreement(*p, rms(constant(0.01), constant(ss::beta_from_lr(0.01))), x0, 3000, 0.3),
      4);
  expect_agreement(*p, rms(constant(0.003), constant(0.9), ss::root_form::adam, 7), x0, 2000, 0.3);
}

TEST(SeedPlan, SchedulesAndAlgorithm4AgreeWithRun) {
  const auto p = saddle({0.5, -0.2, 2.0}, {0.3, 0.02, 1.0});
  const std::vector<double> x0 = {0.1, -0.05, 0.2};
  const auto lr = std::make_shared<ss::inverse_sqrt_schedule>(0.05);
  const auto beta = std::make_shared<ss::beta_from_lr_schedule>(lr, 0.5, 0.1);
  expect_agreement(*p, rms(lr, beta, ss::root_form::inv_sqrt, 3), x0, 2000, 0.25);
  expect_agreement(*p, escape(rms(constant(0.002), constant(0.95)), 0.05, 100), x0, 2000, 0.25);
  expect_agreement(*p, escape(sgd(lr), 0.3, 250), x0, 1000, 0.25);
  // beta_from_lr of a constant step size is folded into a constant on the host.
  expect_agreement(*p, rms(constant(0.01), std::make_shared<ss::beta_from_lr_schedule>(
                                               constant(0.01), 2.0)),
                   x0, 500);
}

TEST(SeedPlan, CounterexampleAndQuadraticsAgreeWithRun) {
  const ss::reddi_counterexample c(20.0, 0.5);  // projected onto [-1, 1] after every step
  expect_agreement(c, rms(constant(0.01), constant(0.9)), {0.3}, 4000);
  expect_agreement(c, sgd(std::make_shared<ss::inverse_sqrt_schedule>(0.1)), {0.3}, 4000);

  // d = 1; d = 3 with a full, singular noise covariance (symmetric-root factor); d = 16.
  const ss::noisy_quadratic q1(1, {-0.3}, {0.5});
  expect_agreement(q1, rms(constant(0.01), constant(0.99)), {0.01}, 1500, 0.5);
  const ss::noisy_quadratic q3(3, {2.0, 0.3, 0.0, 0.3, -0.5, 0.1, 0.0, 0.1, 1.0},
                               {1.0, 0.5, 0.0, 0.5, 0.25, 0.0, 0.0, 0.0, 0.4});
  expect_agreement(q3, sgd(constant(0.02)), {0.1, 0.2, -0.1}, 1500, 1.0);
  expect_agreement(q3, escape(rms(constant(0.005), constant(0.9), ss::root_form::adam), 0.1, 64),
                   {0.1, 0.2, -0.1}, 1500, 1.0);
  std::vector<double> H(256, 0.0), cov(16);
  for (int i = 0; i < 16; ++i) {
    H[static_cast<std::size_t>(i * 17)] = 1.0 - 0.1 * i;
    cov[static_cast<std::size_t>(i)] = 1e-3 * (i + 1);
  }
  const ss::noisy_quadratic q16(16, H, cov);
  expect_agreement(q16, rms(constant(0.003), constant(0.95)), std::vector<double>(16, 0.01), 800,
                   0.5, 3);
}

// The status and stop step of one seed through the plan.
std::pair<ss::run_status, std::int64_t> outcome(const ss::problem& p, const maker& make,
                                                const std::vector<double>& x0, std::int64_t steps) {
  sc::seed_run_options o;
  o.steps = steps;
  sc::detail::seed_plan plan;
  sc::detail::make_seed_plan(p, *make(p.dim()), x0.data(), o, plan);
  const auto r = sc::detail::run_seeds_on_host(plan, {1000});
  return {r.status[0], r.stopped_at[0]};
}

TEST(SeedPlan, StoppedRunsStopWhereRunStops) {
  // A step size too large for the x^10 term: the iterate overflows (diverged).
  const auto p = saddle();
  expect_agreement(*p, sgd(constant(0.9)), {0.0, 1.5}, 50);
  // Noise of standard deviation 1.3e154: g^2 overflows float64 while g is finite, which the
  // diagonal rule refuses (numerical), during burn-in (reported at step 0) and during the steps.
  const ss::noisy_quadratic huge(2, {1.0, 0.0, 0.0, 1.0}, {1.7e308, 1.0});
  expect_agreement(huge, rms(constant(0.01), constant(0.9), ss::root_form::inv_sqrt, 2),
                   {0.0, 0.0}, 10);
  expect_agreement(huge, rms(constant(0.01), constant(0.9)), {0.0, 0.0}, 10);
  // SGD takes the same gradient and diverges only when x overflows.
  expect_agreement(huge, sgd(constant(1e200)), {0.0, 0.0}, 10);
  // The cases above do stop, and where expected.
  EXPECT_EQ(outcome(*p, sgd(constant(0.9)), {0.0, 1.5}, 50).first, ss::run_status::diverged);
  const auto during_burn_in =
      outcome(huge, rms(constant(0.01), constant(0.9), ss::root_form::inv_sqrt, 2), {0.0, 0.0}, 10);
  EXPECT_EQ(during_burn_in.first, ss::run_status::numerical);
  EXPECT_EQ(during_burn_in.second, 0);
  EXPECT_EQ(outcome(huge, sgd(constant(1e200)), {0.0, 0.0}, 10).first, ss::run_status::diverged);
}

TEST(SeedPlan, EscapeByValueAndAtTheStart) {
  const auto p = saddle();
  sc::seed_run_options o;
  o.steps = 4000;
  o.escape_value = -0.01;
  sc::detail::seed_plan plan;
  const std::vector<double> x0 = {0.0, 0.0};
  sc::detail::make_seed_plan(*p, *rms(constant(0.01), constant(0.95))(2), x0.data(), o, plan);
  const auto got = sc::detail::run_seeds_on_host(plan, {1, 2, 3});
  for (std::size_t i = 0; i < 3; ++i) {
    auto opt = rms(constant(0.01), constant(0.95))(2);
    ss::run_options ro;
    ro.steps = o.steps;
    ro.seed = got.seeds[i];
    const auto r = ss::run(*p, *opt, x0.data(), ro);
    std::int64_t want = -1;
    for (std::size_t k = 0; k < r.f.size(); ++k)
      if (r.f[k] <= -0.01) {
        want = r.t[k];
        break;
      }
    EXPECT_EQ(got.escape_step[i], want) << "seed " << got.seeds[i];
  }
  // Any first step leaves a tiny radius: escaped at step 1; F(x0) <= escape_value: at step 0.
  o.escape_value = std::numeric_limits<double>::quiet_NaN();
  o.escape_radius = 1e-100;
  o.steps = 3;
  sc::detail::seed_plan moved;
  sc::detail::make_seed_plan(*p, *sgd(constant(0.1))(2), x0.data(), o, moved);
  EXPECT_EQ(sc::detail::run_seeds_on_host(moved, {5}).escape_step[0], 1);
  o.escape_value = 1.0;  // F(x0) = 0 <= 1
  sc::detail::seed_plan at_start;
  sc::detail::make_seed_plan(*p, *sgd(constant(0.1))(2), x0.data(), o, at_start);
  EXPECT_EQ(sc::detail::run_seeds_on_host(at_start, {5}).escape_step[0], 0);
}

TEST(SeedPlan, UnsupportedInputsAreNamed) {
  const auto p = saddle();
  const std::vector<double> x0 = {0.0, 0.0};
  sc::seed_run_options o;
  o.steps = 10;
  auto plan_of = [&](const ss::problem& prob, const ss::optimizer& opt,
                     const sc::seed_run_options& opts, const double* x) {
    sc::detail::seed_plan plan;
    sc::detail::make_seed_plan(prob, opt, x, opts, plan);
  };
  ss::rmsprop_options full;
  const ss::rmsprop full_rms(2, constant(0.1), constant(0.9), full);
  EXPECT_INVALID("structure diag, got full", plan_of(*p, full_rms, o, x0.data()));
  const ss::adam adam(2, constant(0.1), 0.9, constant(0.99));
  EXPECT_INVALID("SGD, RMSProp (structure diag) and SaddleEscape", plan_of(*p, adam, o, x0.data()));
  const ss::saddle_escape hall(rms(constant(0.1), constant(0.9))(2), 0.5, 10, 2);
  EXPECT_INVALID("hallucinate = 0, got 2", plan_of(*p, hall, o, x0.data()));
  auto used = sgd(constant(0.1))(2);
  std::vector<double> x = x0, g = {1.0, 1.0};
  used->step(x.data(), g.data());
  EXPECT_INVALID("fresh optimizer", plan_of(*p, *used, o, x0.data()));
  // beta_from_lr of a schedule that is neither constant nor inverse_sqrt.
  const auto inner = std::make_shared<ss::beta_from_lr_schedule>(
      std::make_shared<ss::inverse_sqrt_schedule>(0.1), 1.0);
  ss::rmsprop_options diag;
  diag.layout = ss::structure::diag;
  const ss::rmsprop odd_beta(2, constant(0.1),
                             std::make_shared<ss::beta_from_lr_schedule>(inner, 1.0), diag);
  EXPECT_INVALID("schedules for beta", plan_of(*p, odd_beta, o, x0.data()));
  const ss::noisy_quadratic big(17, std::vector<double>(289, 0.0), std::vector<double>(17, 1.0));
  const std::vector<double> x17(17, 0.0);
  EXPECT_INVALID("dim <= 16", plan_of(big, *sgd(constant(0.1))(17), o, x17.data()));
  EXPECT_INVALID("dimension 3", plan_of(*p, *sgd(constant(0.1))(3), o, x0.data()));
  const std::vector<double> bad = {0.0, std::nan("")};
  EXPECT_INVALID("x0 must be finite", plan_of(*p, *sgd(constant(0.1))(2), o, bad.data()));
  sc::seed_run_options neg = o;
  neg.steps = -1;
  EXPECT_INVALID("steps must be >= 0", plan_of(*p, *sgd(constant(0.1))(2), neg, x0.data()));
  sc::seed_run_options rad = o;
  rad.escape_radius = -1.0;
  EXPECT_INVALID("escape_radius", plan_of(*p, *sgd(constant(0.1))(2), rad, x0.data()));
}
