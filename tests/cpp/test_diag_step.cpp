// Unit tests of the multi-tensor diagonal steps (saddlescape/diag_step.hpp) as a native caller
// drives them on its own buffers. The reference is the documented recursion evaluated per entry
// in long double; float32 and float64, tensors of different lengths (including empty and long
// enough to be split over threads), both forms, weight decay and bias correction.

#include <saddlescape/diag_step.hpp>

#include <gtest/gtest.h>

#include "expect_throw.hpp"

#include <cmath>
#include <algorithm>
#include <limits>
#include <type_traits>
#include <random>
#include <vector>

namespace {

namespace ss = saddlescape;
using ss::index_t;

template <class T>
struct model {
  std::vector<std::vector<T>> x, g, v, m;
  explicit model(const std::vector<index_t>& sizes, unsigned seed) {
    std::mt19937_64 rng(seed);
    // gradients over 12 orders of magnitude, and exact zeros
    std::normal_distribution<double> n01(0.0, 1.0);
    std::uniform_int_distribution<int> expo(-8, 4);
    for (index_t n : sizes) {
      std::vector<T> xs(n), gs(n), vs(n), ms(n);
      for (index_t i = 0; i < n; ++i) {
        xs[i] = T(n01(rng));
        gs[i] = i % 7 == 3 ? T(0) : T(n01(rng) * std::pow(10.0, expo(rng)));
        vs[i] = T(std::abs(n01(rng)) * 1e-3);
        ms[i] = T(n01(rng) * 1e-2);
      }
      x.push_back(xs), g.push_back(gs), v.push_back(vs), m.push_back(ms);
    }
  }
  std::vector<ss::diag_tensor<T>> tensors() {
    std::vector<ss::diag_tensor<T>> t(x.size());
    for (std::size_t k = 0; k < x.size(); ++k)
      t[k] = {x[k].data(), g[k].data(), v[k].data(), m[k].data(), index_t(x[k].size())};
    return t;
  }
};

using ld = long double;

ld den(ld s, double eps, ss::root_form form) {
  return form == ss::root_form::inv_sqrt ? std::sqrt(s + eps) : std::sqrt(s) + eps;
}

template <class T>
void check_rmsprop(ss::root_form form, double wd, double c) {
  const std::vector<index_t> sizes{1, 0, 17, 300001, 64};
  model<T> a(sizes, 7);
  const model<T> before = a;
  const double lr = 3e-3, beta = 0.95, eps = 1e-8;
  auto t = a.tensors();
  ss::diag_rmsprop_step(t.data(), t.size(), lr, beta, eps, form, wd, c, true);
  const double tolx = std::is_same_v<T, float> ? 2e-6 : 1e-14;
  for (std::size_t k = 0; k < sizes.size(); ++k)
    for (index_t i = 0; i < sizes[k]; ++i) {
      const ld g = ld(before.g[k][i]) + wd * ld(before.x[k][i]);
      const ld v = beta * ld(before.v[k][i]) + (1 - beta) * g * g;
      const ld x = ld(before.x[k][i]) - lr * g / den(c * v, eps, form);
      ASSERT_NEAR(double(a.v[k][i]), double(v), 4 * tolx * double(v) + 1e-300) << k << " " << i;
      ASSERT_NEAR(double(a.x[k][i]), double(x), tolx * (std::abs(double(x)) + lr)) << k << " " << i;
    }
}

TEST(DiagStep, RmspropMatchesTheRecursionInBothPrecisions) {
  for (auto form : {ss::root_form::inv_sqrt, ss::root_form::adam}) {
    check_rmsprop<double>(form, 0.0, 1.0);
    check_rmsprop<double>(form, 1e-2, 1.7);
    check_rmsprop<float>(form, 0.0, 1.0);
    check_rmsprop<float>(form, 1e-2, 1.7);
  }
}

TEST(DiagStep, AdamMatchesTheRecursion) {
  const std::vector<index_t> sizes{5, 100003};
  model<double> a(sizes, 11);
  const model<double> before = a;
  const double lr_m = 1e-3 / (1 - 0.9), b1 = 0.9, b2 = 0.999, eps = 1e-8, c = 1 / (1 - b2);
  auto t = a.tensors();
  ss::diag_adam_step(t.data(), t.size(), lr_m, b1, b2, eps, ss::root_form::adam, 0.0, c);
  for (std::size_t k = 0; k < sizes.size(); ++k)
    for (index_t i = 0; i < sizes[k]; ++i) {
      const ld g = before.g[k][i];
      const ld m = b1 * ld(before.m[k][i]) + (1 - b1) * g;
      const ld v = b2 * ld(before.v[k][i]) + (1 - b2) * g * g;
      const ld x = ld(before.x[k][i]) - lr_m * m / den(c * v, eps, ss::root_form::adam);
      // rounding relative to the terms, which may cancel
      const double scale = b1 * std::abs(before.m[k][i]) + (1 - b1) * std::abs(before.g[k][i]);
      ASSERT_NEAR(a.m[k][i], double(m), 1e-15 * scale + 1e-300);
      ASSERT_NEAR(a.x[k][i], double(x), 1e-14 * (std::abs(double(x)) + lr_m));
    }
}

TEST(DiagStep, ResultsDoNotDependOnTheThreadSplit) {
  // the same long tensor as one piece and cut into pieces; each entry is independent
  model<float> a({250007}, 3);
  model<float> b = a;
  auto ta = a.tensors();
  ss::diag_rmsprop_step(ta.data(), ta.size(), 1e-3, 0.99, 1e-8, ss::root_form::inv_sqrt, 0.0,
                        1.0, true);
  std::vector<ss::diag_tensor<float>> pieces;
  for (index_t at = 0; at < 250007; at += 1000) {
    const index_t n = std::min<index_t>(1000, 250007 - at);
    pieces.push_back({b.x[0].data() + at, b.g[0].data() + at, b.v[0].data() + at, nullptr, n});
  }
  ss::diag_rmsprop_step(pieces.data(), pieces.size(), 1e-3, 0.99, 1e-8, ss::root_form::inv_sqrt,
                        0.0, 1.0, true);
  EXPECT_EQ(a.x[0], b.x[0]);
  EXPECT_EQ(a.v[0], b.v[0]);
}

TEST(DiagStep, BadInputChangesNothing) {
  model<float> a({10, 20}, 5);
  a.g[1][13] = std::numeric_limits<float>::quiet_NaN();
  const model<float> before = a;
  auto t = a.tensors();
  auto unchanged = [&] {
    EXPECT_EQ(a.x, before.x);
    EXPECT_EQ(a.v, before.v);
    EXPECT_EQ(a.m, before.m);
  };
  const auto inv = ss::root_form::inv_sqrt;
  EXPECT_INVALID("gradient 1", ss::diag_rmsprop_step(t.data(), t.size(), 1e-3, 0.9, 1e-8, inv,
                                                      0.0, 1.0, true));
  unchanged();
  a.g[1][13] = 1e30f;  // finite, but its square overflows float
  EXPECT_INVALID("gradient 1", ss::diag_adam_step(t.data(), t.size(), 1e-3, 0.9, 0.99, 1e-8,
                                                   ss::root_form::adam, 0.0, 1.0));
  unchanged();
  a.g[1][13] = 1.0f;
  EXPECT_INVALID("beta", ss::diag_rmsprop_step(t.data(), t.size(), 1e-3, 1.0, 1e-8, inv, 0.0,
                                                1.0, true));
  EXPECT_INVALID("eps", ss::diag_rmsprop_step(t.data(), t.size(), 1e-3, 0.9, 0.0, inv, 0.0, 1.0,
                                               true));
  EXPECT_INVALID("lr", ss::diag_rmsprop_step(t.data(), t.size(), -1.0, 0.9, 1e-8, inv, 0.0, 1.0,
                                              true));
  EXPECT_INVALID("c must", ss::diag_rmsprop_step(t.data(), t.size(), 1e-3, 0.9, 1e-8, inv, 0.0,
                                                  0.5, true));
  auto no_m = t;
  no_m[1].m = nullptr;
  EXPECT_INVALID("null", ss::diag_adam_step(no_m.data(), no_m.size(), 1e-3, 0.9, 0.99, 1e-8,
                                             ss::root_form::adam, 0.0, 1.0));
  unchanged();
}

}  // namespace
