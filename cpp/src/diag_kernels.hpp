#pragma once
// The fused elementwise passes of the diagonal preconditioners, shared by the numpy-level
// optimizers (float64, one flat vector) and the multi-tensor steps of diag_step.hpp (float32 or
// float64, on a model's own tensors): one definition, so both give the same bits.
//
// Each is compiled per instruction set (multiversion.hpp); float32 runs in float, twice as
// many lanes per vector as double.

#include <saddlescape/detail/formulas.hpp>

#include "multiversion.hpp"

#include <cstddef>
#include <cstdint>

namespace saddlescape::detail {

/// v <- b v + a g'^2 (subnormals flushed), x <- x - lr g' / den(c v), g' = g + wd x, with
/// den(s) = sqrt(s + inner) + outer. g' is finite and a g'^2 cannot overflow (the caller
/// checked), so v stays finite.
void rmsprop_diag(std::ptrdiff_t n, double b, double a, double lr, double c, double inner,
                  double outer, double wd, const double* g, double* v, double* x);
void rmsprop_diag(std::ptrdiff_t n, float b, float a, float lr, float c, float inner, float outer,
                  float wd, const float* g, float* v, float* x);

/// m <- b1 m + (1 - b1) g', v <- b2 v + (1 - b2) g'^2, x <- x - lr_m m / den(c v).
void adam_diag(std::ptrdiff_t n, double b1, double b2, double lr_m, double c, double inner,
               double outer, double wd, const double* g, double* m, double* v, double* x);
void adam_diag(std::ptrdiff_t n, float b1, float b2, float lr_m, float c, float inner, float outer,
               float wd, const float* g, float* m, float* v, float* x);

/// v <- b v + a g'^2 without moving x (burn-in and hallucinated samples).
void diag_observe(std::ptrdiff_t n, double b, double a, double wd, const double* g, const double* x,
                  double* v);
void diag_observe(std::ptrdiff_t n, float b, float a, float wd, const float* g, const float* x, float* v);

/// max_i |g_i| as a bit pattern (an integer max, which vectorises where a floating max does
/// not); every NaN and Inf gives a pattern >= abs_bits_infinity<T>.
std::int64_t max_abs_bits(std::ptrdiff_t n, const double* g);
std::int64_t max_abs_bits(std::ptrdiff_t n, const float* g);

template <class T>
constexpr std::int64_t abs_bits_infinity() {
  return sizeof(T) == 8 ? 0x7ff0000000000000LL : 0x7f800000LL;
}

/// max_i |g_i + wd x_i|, NaN if any entry is NaN or Inf.
double max_abs_weighted(std::ptrdiff_t n, double wd, const double* g, const double* x);
double max_abs_weighted(std::ptrdiff_t n, float wd, const float* g, const float* x);

}  // namespace saddlescape::detail
