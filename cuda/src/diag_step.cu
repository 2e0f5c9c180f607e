// The fused diagonal RMSProp step: one pass over x, g and v, the formulas of the CPU step
// (detail::diag_ema, detail::diag_denominator).

#include "common.cuh"

#include <saddlescape/detail/formulas.hpp>

#include <cmath>
#include <limits>

namespace saddlescape::cuda {

namespace {

constexpr unsigned int block = 256;
// Entries per thread per sweep: independent loads in flight, which a streaming kernel needs to
// cover memory latency.
constexpr int unroll = 4;

template <class T>
__global__ void rmsprop_diag_kernel(T* __restrict x, const T* __restrict g, T* __restrict v,
                                    std::int64_t n, T b, T a, T lr, T inner, T outer) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x * unroll;
  for (std::int64_t base = blockIdx.x * static_cast<std::int64_t>(blockDim.x) * unroll +
                           threadIdx.x;
       base < n; base += stride) {
    T gi[unroll], vi[unroll], xi[unroll];
#pragma unroll
    for (int u = 0; u < unroll; ++u) {
      const std::int64_t i = base + u * static_cast<std::int64_t>(blockDim.x);
      if (i < n) {
        gi[u] = g[i];
        vi[u] = v[i];
        xi[u] = x[i];
      }
    }
#pragma unroll
    for (int u = 0; u < unroll; ++u) {
      const std::int64_t i = base + u * static_cast<std::int64_t>(blockDim.x);
      if (i < n) {
        const T nv = saddlescape::detail::diag_ema(vi[u], gi[u], b, a);
        v[i] = nv;
        x[i] = xi[u] - lr * gi[u] / saddlescape::detail::diag_denominator(nv, inner, outer);
      }
    }
  }
}

}  // namespace

template <class T>
void rmsprop_diag_step(context& ctx, T* x, const T* g, T* v, std::int64_t n, double lr,
                       double beta, double eps, root_form form, bool check) {
  SADDLESCAPE_EXPECTS(n >= 0, "n must be >= 0, got ", n);
  SADDLESCAPE_EXPECTS(std::isfinite(lr) && lr >= 0.0, "lr must be finite and >= 0, got ", lr);
  SADDLESCAPE_EXPECTS(beta >= 0.0 && beta < 1.0, "beta must be in [0, 1), got ", beta);
  SADDLESCAPE_EXPECTS(std::isfinite(eps) && eps > 0.0, "eps must be finite and > 0, got ", eps);
  // In float32 the scalars must survive the conversion: an eps that rounds to 0 would divide
  // 0 by 0 where g = v = 0, and an lr beyond the float range would become Inf.
  SADDLESCAPE_EXPECTS(static_cast<T>(eps) > 0 && std::isfinite(static_cast<T>(lr)),
                      "eps = ", eps, " and lr = ", lr, " must be representable in ",
                      saddlescape::detail::type_name<T>(), " (eps > 0 after rounding)");
  if (n == 0) return;
  context::impl& c = detail::enter(ctx);
  detail::expect_device_pointer(x, "x");
  detail::expect_device_pointer(g, "g");
  detail::expect_device_pointer(v, "v");
  if (check) {
    const detail::scan_result s = detail::scan(c, g, n);
    SADDLESCAPE_EXPECTS(s.first_bad < 0, "g must be finite; entry ", s.first_bad,
                        " is not (x and v are unchanged)");
    const double top = static_cast<double>(std::numeric_limits<T>::max());
    if (!(s.max_abs * s.max_abs <= top))
      SADDLESCAPE_NUMERICAL_FAIL("max|g| = ", s.max_abs, " is too large, g^2 overflows ",
                                 saddlescape::detail::type_name<T>(),
                                 "; x and v are unchanged");
  }
  const T inner = static_cast<T>(form == root_form::adam ? 0.0 : eps);
  const T outer = static_cast<T>(form == root_form::adam ? eps : 0.0);
  rmsprop_diag_kernel<T><<<detail::grid_for(c, (n + unroll - 1) / unroll, block), block, 0,
                           c.stream>>>(x, g, v, n, static_cast<T>(beta),
                                       static_cast<T>(1.0 - beta), static_cast<T>(lr), inner,
                                       outer);
  SADDLESCAPE_LAUNCHED();
}

template void rmsprop_diag_step<float>(context&, float*, const float*, float*, std::int64_t,
                                       double, double, double, root_form, bool);
template void rmsprop_diag_step<double>(context&, double*, const double*, double*, std::int64_t,
                                        double, double, double, root_form, bool);

}  // namespace saddlescape::cuda
