#include <saddlescape/diag_step.hpp>

#include <saddlescape/errors.hpp>

#include "checks.hpp"
#include "diag_kernels.hpp"
#include "parallel.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace saddlescape {

namespace {

using detail::concat;

void check_scalars(double lr, double beta, double eps, double weight_decay, double c) {
  SADDLESCAPE_EXPECTS(std::isfinite(lr) && lr >= 0.0, "lr must be finite and >= 0, got ", lr);
  SADDLESCAPE_EXPECTS(beta >= 0.0 && beta < 1.0, "beta must be in [0, 1), got ", beta);
  SADDLESCAPE_EXPECTS(std::isfinite(eps) && eps > 0.0, "eps must be finite and > 0, got ", eps);
  SADDLESCAPE_EXPECTS(std::isfinite(weight_decay) && weight_decay >= 0.0,
                      "weight_decay must be finite and >= 0, got ", weight_decay);
  SADDLESCAPE_EXPECTS(std::isfinite(c) && c >= 1.0,
                      "the bias correction c must be finite and >= 1, got ", c);
}

// Runs fn(begin, end) over [0, n), split over threads when n is long.
template <class F>
void over(index_t n, F&& fn) {
  if (n < detail::parallel_threshold) {
    fn(index_t(0), n);
    return;
  }
  detail::parallel_chunks(n, [&](unsigned, index_t b, index_t e) { fn(b, e); });
}

// max |g + wd x| over a tensor, NaN when an entry is not finite.
template <class T>
double max_gradient(const diag_tensor<T>& t, double wd) {
  std::vector<double> part(detail::pass_threads(), 0.0);
  unsigned used = 1;
  auto body = [&](unsigned k, index_t b, index_t e) {
    if (wd == 0.0) {
      const std::int64_t bits = detail::max_abs_bits(e - b, t.g + b);
      if (bits >= detail::abs_bits_infinity<T>()) {
        part[k] = std::numeric_limits<double>::quiet_NaN();
      } else {
        T m;
        if constexpr (sizeof(T) == 8) {
          std::memcpy(&m, &bits, sizeof m);
        } else {
          const std::int32_t b32 = static_cast<std::int32_t>(bits);
          std::memcpy(&m, &b32, sizeof m);
        }
        part[k] = double(m);
      }
    } else {
      part[k] = detail::max_abs_weighted(e - b, T(wd), t.g + b, t.x + b);
    }
  };
  if (t.n < detail::parallel_threshold)
    body(0, 0, t.n);
  else
    used = detail::parallel_chunks(t.n, body);
  double m = 0.0;
  for (unsigned k = 0; k < used; ++k) {
    if (std::isnan(part[k])) return part[k];
    m = std::max(m, part[k]);
  }
  return m;
}

// Every tensor's gradient finite and (1 - beta) g'^2 representable, else an invalid_argument
// naming the first offender, before anything is written.
template <class T>
void check_tensors(const diag_tensor<T>* ts, std::size_t count, double beta, double wd,
                   bool adam) {
  SADDLESCAPE_EXPECTS(count == 0 || ts != nullptr, "tensors must not be null");
  for (std::size_t k = 0; k < count; ++k) {
    const auto& t = ts[k];
    SADDLESCAPE_EXPECTS(t.n >= 0, "tensor ", k, " has n = ", t.n);
    if (t.n == 0) continue;
    SADDLESCAPE_EXPECTS(t.x && t.g && t.v && (!adam || t.m), "tensor ", k, " has a null buffer");
  }
  for (std::size_t k = 0; k < count; ++k) {
    const auto& t = ts[k];
    if (t.n == 0) continue;
    const double top = max_gradient(t, wd);
    if (std::isnan(top)) {
      for (index_t i = 0; i < t.n; ++i) {
        const double gi = double(t.g[i]) + (wd == 0.0 ? 0.0 : wd * double(t.x[i]));
        if (!std::isfinite(t.g[i]) || !std::isfinite(gi))
          throw invalid_argument(concat("gradient ", k, " has a non-finite entry ",
                                        wd == 0.0 ? "g" : "g + weight_decay x", "[", i, "] = ",
                                        wd == 0.0 ? double(t.g[i]) : gi, "; nothing was changed"));
      }
    }
    if (!((1.0 - beta) * top * top <= double(std::numeric_limits<T>::max())))
      throw invalid_argument(concat("gradient ", k, " has an entry of magnitude ", top,
                                    " whose square overflows the estimate's ",
                                    sizeof(T) == 4 ? "float32" : "float64",
                                    "; nothing was changed"));
  }
}

struct form_terms {
  double inner, outer;
  form_terms(root_form form, double eps)
      : inner(form == root_form::adam ? 0.0 : eps), outer(form == root_form::adam ? eps : 0.0) {}
};

}  // namespace

template <class T>
void diag_rmsprop_step(const diag_tensor<T>* ts, std::size_t count, double lr, double beta,
                       double eps, root_form form, double weight_decay, double c, bool move) {
  check_scalars(lr, beta, eps, weight_decay, c);
  check_tensors(ts, count, beta, weight_decay, false);
  const form_terms f(form, eps);
  const T b = T(beta), a = T(1.0 - beta), wd = T(weight_decay);
  for (std::size_t k = 0; k < count; ++k) {
    const auto& t = ts[k];
    over(t.n, [&](index_t i, index_t e) {
      if (move)
        detail::rmsprop_diag(e - i, b, a, T(lr), T(c), T(f.inner), T(f.outer), wd, t.g + i,
                             t.v + i, t.x + i);
      else
        detail::diag_observe(e - i, b, a, wd, t.g + i, t.x + i, t.v + i);
    });
  }
}

template <class T>
void diag_adam_step(const diag_tensor<T>* ts, std::size_t count, double lr_m, double beta1,
                    double beta2, double eps, root_form form, double weight_decay, double c) {
  check_scalars(lr_m, beta2, eps, weight_decay, c);
  SADDLESCAPE_EXPECTS(beta1 >= 0.0 && beta1 < 1.0, "beta1 must be in [0, 1), got ", beta1);
  check_tensors(ts, count, beta2, weight_decay, true);
  const form_terms f(form, eps);
  for (std::size_t k = 0; k < count; ++k) {
    const auto& t = ts[k];
    over(t.n, [&](index_t i, index_t e) {
      detail::adam_diag(e - i, T(beta1), T(beta2), T(lr_m), T(c), T(f.inner), T(f.outer),
                        T(weight_decay), t.g + i, t.m + i, t.v + i, t.x + i);
    });
  }
}

template void diag_rmsprop_step<float>(const diag_tensor<float>*, std::size_t, double, double,
                                       double, root_form, double, double, bool);
template void diag_rmsprop_step<double>(const diag_tensor<double>*, std::size_t, double, double,
                                        double, root_form, double, double, bool);
template void diag_adam_step<float>(const diag_tensor<float>*, std::size_t, double, double,
                                    double, double, root_form, double, double);
template void diag_adam_step<double>(const diag_tensor<double>*, std::size_t, double, double,
                                     double, double, root_form, double, double);

}  // namespace saddlescape
