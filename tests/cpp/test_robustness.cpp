// Regression tests for faults found by the sanitizer and property-based runs (issue 15):
// sums that overflow although the answer is representable, and buffers that cannot exist.
// References are the formulas evaluated in long double or with the halving written out.

#include <saddlescape/saddlescape.hpp>

#include <gtest/gtest.h>

#include "../../cpp/src/parallel.hpp"
#include "expect_throw.hpp"

#include <algorithm>
#include <cmath>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

namespace ss = saddlescape;
using ss::index_t;

namespace {

ss::schedule_ptr constant(double b) { return std::make_shared<ss::constant_schedule>(b); }

}  // namespace

// lambda + eps overflowed to inf and the result was 1 / sqrt(inf) = 0, silently.
TEST(Overflow, ShiftNearTheLargestDoubleIsNotASilentZero) {
  const double lam[2] = {1e308, 2e307};
  const double G[4] = {lam[0], 0.0, 0.0, lam[1]};
  double A[4];
  const ss::root_spec spec{2, 1e308, ss::root_form::inv_sqrt};
  ss::inv_root_batched<double>(G, 1, 2, spec, ss::root_method::eigh, ss::newton_options{}, A);
  for (int i = 0; i < 2; ++i) {
    const long double want = 1.0L / std::sqrt(static_cast<long double>(lam[i]) + 1e308L);
    EXPECT_NEAR(A[3 * i] / static_cast<double>(want), 1.0, 1e-14) << i;
  }
  EXPECT_EQ(A[1], 0.0);
  double out[2];
  ss::diag_inv_root<double>(lam, 2, spec, out);
  for (int i = 0; i < 2; ++i)
    EXPECT_NEAR(out[i] * std::sqrt(static_cast<long double>(lam[i]) + 1e308L), 1.0, 1e-14);
}

// float32: eps = 1e39 is finite in double but infinite in float; v + eps overflows in float.
TEST(Overflow, Float32DiagonalWithAnEpsBeyondFloatRange) {
  const float v[3] = {3e38f, 0.0f, 1.0f};
  float out[3];
  ss::diag_inv_root<float>(v, 3, ss::root_spec{2, 1e39, ss::root_form::inv_sqrt}, out);
  for (int i = 0; i < 3; ++i)
    EXPECT_NEAR(out[i] * std::sqrt(static_cast<double>(v[i]) + 1e39), 1.0, 1e-6) << i;
  ss::diag_inv_root<float>(v, 3, ss::root_spec{2, 3e38, ss::root_form::adam}, out);
  for (int i = 0; i < 3; ++i) {
    EXPECT_GT(out[i], 0.0f) << i;
    EXPECT_NEAR(out[i] * (std::sqrt(static_cast<double>(v[i])) + 3e38), 1.0, 1e-6) << i;
  }
}

// Buffers beyond any machine: an invalid_argument naming the bytes, before any allocation.
TEST(Memory, ImpossibleBuffersAreRefusedNamingTheBytes) {
  EXPECT_INVALID("32000000000000 bytes",
                 ss::ema_estimator<double>(1000000, constant(0.9), ss::structure::full, {}, false, 1));
  EXPECT_INVALID("bytes of memory",
                 ss::ema_estimator<float>(2000000, constant(0.9), ss::structure::block,
                                          {1000000, 1000000}, false, 1));
  ss::rmsprop_options o;
  o.layout = ss::structure::diag;
  EXPECT_INVALID("1600000000000 bytes",
                 ss::rmsprop(index_t(100000000000), constant(0.1), constant(0.9), o));
  ss::adam_options a;
  a.layout = ss::structure::diag;
  EXPECT_INVALID("bytes", ss::adam(index_t(100000000000), constant(0.1), 0.9, constant(0.99), a));
}

// out_of_memory is a std::bad_alloc (existing handlers catch it) whose message names the bytes.
TEST(Memory, OutOfMemoryIsABadAllocWithAMessage) {
  try {
    throw ss::out_of_memory("an EMAEstimator could not allocate its 123 bytes");
  } catch (const std::bad_alloc& e) {
    EXPECT_NE(std::string(e.what()).find("123 bytes"), std::string::npos);
  }
}

// parallel_chunks used to run fn on threads with no handler: an exception in any part but the
// caller's reached std::terminate. It must reach the caller, after every part has run.
TEST(ParallelChunks, AnExceptionInAnyPartReachesTheCallerAfterAllParts) {
  const std::ptrdiff_t n = std::ptrdiff_t(1) << 20;  // above parallel_threshold
  const unsigned parts = ss::detail::pass_threads();
  for (unsigned bad = 0; bad < std::max(parts, 1u); ++bad) {
    std::vector<int> ran(std::max(parts, 1u), 0);
    try {
      ss::detail::parallel_chunks(n, [&](unsigned k, std::ptrdiff_t, std::ptrdiff_t) {
        ran[k] = 1;
        if (k == bad) throw std::runtime_error("part " + std::to_string(k));
      });
      FAIL() << "no exception from part " << bad;
    } catch (const std::runtime_error& e) {
      EXPECT_EQ(std::string(e.what()), "part " + std::to_string(bad));
    }
    for (unsigned k = 0; k < ran.size(); ++k) EXPECT_EQ(ran[k], 1) << "part " << k;
  }
}
