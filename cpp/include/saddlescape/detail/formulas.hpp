#pragma once
/// @file formulas.hpp
/// The scalar formulas that the CPU library and the CUDA backend must evaluate identically:
/// one definition each, compiled for the host by the C++ compiler and for the device by nvcc
/// (SADDLESCAPE_HD), so that a GPU run follows the CPU reference operation for operation.

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define SADDLESCAPE_HD __host__ __device__
#else
#define SADDLESCAPE_HD
#endif

namespace saddlescape::detail {

/// x^k for a small integer k >= 0 by repeated squaring: exact to rounding, and much cheaper
/// than std::pow in the inner loop of the saddle problem's gradient.
SADDLESCAPE_HD inline double ipow(double x, int k) {
  double r = 1.0;
  while (k > 0) {
    if (k & 1) r *= x;
    x *= x;
    k >>= 1;
  }
  return r;
}

/// g = H x + power x^(power - 1) + shift for the diagonal H = diag(h): the saddle problem's
/// gradient, with shift a component b_i (stochastic) or their mean (exact).
template <class Index>
SADDLESCAPE_HD inline void saddle_gradient(const double* h, const double* shift, const double* x,
                                           Index d, int power, double* g) {
  for (Index j = 0; j < d; ++j) g[j] = h[j] * x[j] + power * ipow(x[j], power - 1) + shift[j];
}

/// The smallest positive normal number of T (std::numeric_limits is not usable on the device).
template <class T>
SADDLESCAPE_HD constexpr T smallest_normal() {
  return sizeof(T) == 4 ? static_cast<T>(0x1p-126f) : static_cast<T>(0x1p-1022);
}

/// The largest double below 1.
constexpr double below_one = 0x1.fffffffffffffp-1;

/// beta = 1 - C lr^(2/3) clipped into [floor, below_one]. lr^(2/3) is cbrt(lr)^2: lr * lr
/// would overflow or underflow.
SADDLESCAPE_HD inline double clipped_beta(double lr, double C, double floor) {
  const double r = std::cbrt(lr);
  const double beta = 1.0 - C * r * r;
  return beta < floor ? floor : (beta > below_one ? below_one : beta);
}

/// eta0 / sqrt(t + 1).
SADDLESCAPE_HD inline double inverse_sqrt_lr(double eta0, std::int64_t t) {
  return eta0 / std::sqrt(static_cast<double>(t) + 1.0);
}

/// One entry of the diagonal EMA: b v + a g^2, flushed to 0 below the smallest normal number
/// of T (an entry whose g stays 0 decays; subnormals are 50x slower).
template <class T>
SADDLESCAPE_HD inline T diag_ema(T v, T g, T b, T a) {
  const T vi = b * v + a * (g * g);
  return vi < smallest_normal<T>() ? T(0) : vi;
}

/// The diagonal preconditioner's denominator for both forms: sqrt(v + inner) + outer, with
/// (inner, outer) = (eps, 0) for inv_sqrt and (0, eps) for adam. Adding a zero is exact, so
/// each form gets exactly its own formula's rounding.
template <class T>
SADDLESCAPE_HD inline T diag_denominator(T v, T inner, T outer) {
  return std::sqrt(v + inner) + outer;
}

}  // namespace saddlescape::detail
