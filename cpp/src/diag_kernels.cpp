#include "diag_kernels.hpp"

#include <cmath>
#include <cstring>
#include <limits>

namespace saddlescape::detail {

namespace {

// The bodies, inlined into each multiversioned entry point. WD = false skips g + wd x, so
// that a step without weight decay rounds exactly as the formula without it (and an Inf in x
// cannot turn 0 * Inf into a NaN gradient).
template <bool WD, class T>
[[gnu::always_inline]] inline void rmsprop_body(std::ptrdiff_t n, T b, T a, T lr, T c, T inner, T outer,
                                                T wd, const T* __restrict g, T* __restrict v,
                                                T* __restrict x) {
  for (std::ptrdiff_t i = 0; i < n; ++i) {
    const T gi = WD ? g[i] + wd * x[i] : g[i];
    const T vi = diag_ema(v[i], gi, b, a);
    v[i] = vi;
    x[i] -= lr * gi / diag_denominator(c * vi, inner, outer);
  }
}

template <bool WD, class T>
[[gnu::always_inline]] inline void adam_body(std::ptrdiff_t n, T b1, T b2, T lr_m, T c, T inner, T outer,
                                             T wd, const T* __restrict g, T* __restrict m,
                                             T* __restrict v, T* __restrict x) {
  for (std::ptrdiff_t i = 0; i < n; ++i) {
    const T gi = WD ? g[i] + wd * x[i] : g[i];
    const T mi = b1 * m[i] + (T(1) - b1) * gi;
    const T vi = diag_ema(v[i], gi, b2, T(1) - b2);
    m[i] = mi;
    v[i] = vi;
    x[i] -= lr_m * mi / diag_denominator(c * vi, inner, outer);
  }
}

template <class T>
[[gnu::always_inline]] inline void observe_body(std::ptrdiff_t n, T b, T a, T wd, const T* __restrict g,
                                                const T* __restrict x, T* __restrict v) {
  if (wd == T(0)) {
    for (std::ptrdiff_t i = 0; i < n; ++i) v[i] = diag_ema(v[i], g[i], b, a);
  } else {
    for (std::ptrdiff_t i = 0; i < n; ++i) v[i] = diag_ema(v[i], g[i] + wd * x[i], b, a);
  }
}

template <class Bits, class T>
[[gnu::always_inline]] inline std::int64_t max_bits_body(std::ptrdiff_t n, const T* __restrict g) {
  constexpr Bits mask = std::numeric_limits<Bits>::max();  // all but the sign bit
  Bits m = 0;
  for (std::ptrdiff_t i = 0; i < n; ++i) {
    Bits b;
    std::memcpy(&b, g + i, sizeof b);
    b &= mask;
    m = b > m ? b : m;
  }
  return static_cast<std::int64_t>(m);
}

template <class T>
[[gnu::always_inline]] inline double max_weighted_body(std::ptrdiff_t n, T wd, const T* __restrict g,
                                                       const T* __restrict x) {
  // A sum, not a max, catches every NaN (a comparison would drop them): finite iff all are.
  T worst = 0, sum = 0;
  for (std::ptrdiff_t i = 0; i < n; ++i) {
    const T a = std::abs(g[i] + wd * x[i]);
    worst = a > worst ? a : worst;
    sum += a * T(0);
  }
  return std::isfinite(sum) ? double(worst) : std::numeric_limits<double>::quiet_NaN();
}

}  // namespace

// One non-template entry per precision: GCC's target_clones (the avx2/default dispatch) does not
// apply to function templates, so the templated bodies are inlined into these overloads.
SADDLESCAPE_MULTIVERSION void rmsprop_diag(std::ptrdiff_t n, double b, double a, double lr, double c,
                                           double inner, double outer, double wd, const double* g,
                                           double* v, double* x) {
  if (wd == 0.0)
    rmsprop_body<false>(n, b, a, lr, c, inner, outer, wd, g, v, x);
  else
    rmsprop_body<true>(n, b, a, lr, c, inner, outer, wd, g, v, x);
}

SADDLESCAPE_MULTIVERSION void rmsprop_diag(std::ptrdiff_t n, float b, float a, float lr, float c,
                                           float inner, float outer, float wd, const float* g,
                                           float* v, float* x) {
  if (wd == 0.0f)
    rmsprop_body<false>(n, b, a, lr, c, inner, outer, wd, g, v, x);
  else
    rmsprop_body<true>(n, b, a, lr, c, inner, outer, wd, g, v, x);
}

SADDLESCAPE_MULTIVERSION void adam_diag(std::ptrdiff_t n, double b1, double b2, double lr_m, double c,
                                        double inner, double outer, double wd, const double* g,
                                        double* m, double* v, double* x) {
  if (wd == 0.0)
    adam_body<false>(n, b1, b2, lr_m, c, inner, outer, wd, g, m, v, x);
  else
    adam_body<true>(n, b1, b2, lr_m, c, inner, outer, wd, g, m, v, x);
}

SADDLESCAPE_MULTIVERSION void adam_diag(std::ptrdiff_t n, float b1, float b2, float lr_m, float c,
                                        float inner, float outer, float wd, const float* g,
                                        float* m, float* v, float* x) {
  if (wd == 0.0f)
    adam_body<false>(n, b1, b2, lr_m, c, inner, outer, wd, g, m, v, x);
  else
    adam_body<true>(n, b1, b2, lr_m, c, inner, outer, wd, g, m, v, x);
}

SADDLESCAPE_MULTIVERSION void diag_observe(std::ptrdiff_t n, double b, double a, double wd,
                                           const double* g, const double* x, double* v) {
  observe_body(n, b, a, wd, g, x, v);
}

SADDLESCAPE_MULTIVERSION void diag_observe(std::ptrdiff_t n, float b, float a, float wd, const float* g,
                                           const float* x, float* v) {
  observe_body(n, b, a, wd, g, x, v);
}

SADDLESCAPE_MULTIVERSION std::int64_t max_abs_bits(std::ptrdiff_t n, const double* g) {
  return max_bits_body<std::int64_t>(n, g);
}

SADDLESCAPE_MULTIVERSION std::int64_t max_abs_bits(std::ptrdiff_t n, const float* g) {
  return max_bits_body<std::int32_t>(n, g);
}

SADDLESCAPE_MULTIVERSION double max_abs_weighted(std::ptrdiff_t n, double wd, const double* g,
                                                 const double* x) {
  return max_weighted_body(n, wd, g, x);
}

SADDLESCAPE_MULTIVERSION double max_abs_weighted(std::ptrdiff_t n, float wd, const float* g,
                                                 const float* x) {
  return max_weighted_body(n, wd, g, x);
}

}  // namespace saddlescape::detail
