#pragma once
// One seed of run() for the small problems and rules the many-seed runner supports, written
// once for the host and the device (SADDLESCAPE_HD). The CUDA kernel runs it one thread per
// seed; the C++ tests run it on the host against run() itself, which is how its agreement with
// the CPU reference is checked on machines without a GPU. Everything a seed needs lives in
// registers: D is the dimension, a compile-time constant (problem_params::d == D), so that
// every loop unrolls and the arrays stay out of local memory on the device.

#include <saddlescape/detail/formulas.hpp>
#include <saddlescape/rng.hpp>

#include <cstdint>

namespace saddlescape::cuda::detail {

using saddlescape::detail::clipped_beta;
using saddlescape::detail::diag_denominator;
using saddlescape::detail::diag_ema;
using saddlescape::detail::inverse_sqrt_lr;
using saddlescape::detail::ipow;
using saddlescape::detail::saddle_gradient;

// The schedules the runner knows, as plain data: constant(a), inverse_sqrt(a), and
// beta_from_lr(inverse_sqrt(a), C, floor) (beta_from_lr of a constant is a constant).
enum class schedule_kind : int { constant = 0, inverse_sqrt = 1, beta_of_inverse_sqrt = 2 };

struct schedule_params {
  schedule_kind kind = schedule_kind::constant;
  double a = 0.0, C = 1.0, floor = 0.0;
};

SADDLESCAPE_HD inline double evaluate(const schedule_params& s, std::int64_t t) {
  switch (s.kind) {
    case schedule_kind::inverse_sqrt:
      return inverse_sqrt_lr(s.a, t);
    case schedule_kind::beta_of_inverse_sqrt: {
      // An lr_t that underflows to 0 defines no beta: the CPU schedule throws (status invalid).
      const double lr = inverse_sqrt_lr(s.a, t);
      return lr > 0.0 ? clipped_beta(lr, s.C, s.floor) : 0.0 / 0.0;
    }
    default:
      return s.a;
  }
}

enum class problem_kind : int { saddle = 0, counterexample = 1, quadratic = 2 };

struct problem_params {
  problem_kind kind = problem_kind::saddle;
  int d = 0;
  // saddle: h (d), components b (n x d), their mean (d), power.
  const double* h = nullptr;
  const double* b = nullptr;
  const double* mean = nullptr;
  std::uint64_t n = 0;
  int power = 2;
  // counterexample: f = C x with probability p, else -x; F = zeta x; x in [-1, 1].
  double C = 0.0, zeta = 0.0, p = 0.0;
  // quadratic: H (d x d), noise factor (d standard deviations, or d x d L).
  const double* H = nullptr;
  const double* factor = nullptr;
  bool diagonal = true;
};

enum class method_kind : int { sgd = 0, rmsprop = 1 };

struct method_params {
  method_kind kind = method_kind::sgd;
  schedule_params lr, beta;
  double inner = 0.0, outer = 0.0;  // diag_denominator's (inner, outer) for the form
  std::int64_t burn_in = 0;
  // Algorithm 4: step size r at the moving steps t with t mod t_thresh == 0 (0: off).
  double r = 0.0;
  std::int64_t t_thresh = 0;
};

struct run_params {
  std::int64_t steps = 0;
  double escape_radius = 0.0;  // 0: off
  double escape_value = 0.0;
  bool use_escape_value = false;
};

// Status codes as run_status (completed, diverged, numerical, invalid).
enum : int { status_completed = 0, status_diverged = 1, status_numerical = 2, status_invalid = 3 };

struct seed_outcome {
  std::int64_t escape_step = -1;
  double f = 0.0;
  int status = status_completed;
  std::int64_t stopped_at = -1;
};

template <int D>
struct seed_state {
  double x[D];
  double v[D];
  double g[D];
};

SADDLESCAPE_HD inline bool finite(double a) { return a - a == 0.0; }

template <int D>
SADDLESCAPE_HD inline void sample(const problem_params& p, rng& r, const double* x, double* g) {
  constexpr int d = D;
  switch (p.kind) {
    case problem_kind::saddle:
      saddle_gradient(p.h, p.b + static_cast<std::uint64_t>(r.below(p.n)) * d, x, d, p.power, g);
      return;
    case problem_kind::counterexample:
      g[0] = r.uniform() < p.p ? p.C : -1.0;
      return;
    case problem_kind::quadratic: {
      for (int i = 0; i < d; ++i) {
        double s = 0.0;
        for (int j = 0; j < d; ++j) s += p.H[i * d + j] * x[j];
        g[i] = s;
      }
      if (p.diagonal) {
        for (int i = 0; i < d; ++i) g[i] += p.factor[i] * r.normal();
        return;
      }
      double z[D];
      for (int i = 0; i < d; ++i) z[i] = r.normal();
      for (int i = 0; i < d; ++i) {
        double s = 0.0;
        for (int j = 0; j < d; ++j) s += p.factor[i * d + j] * z[j];
        g[i] += s;
      }
      return;
    }
  }
}

SADDLESCAPE_HD inline void project(const problem_params& p, double* x) {
  if (p.kind == problem_kind::counterexample) x[0] = x[0] < -1.0 ? -1.0 : (x[0] > 1.0 ? 1.0 : x[0]);
}

template <int D>
SADDLESCAPE_HD inline double value(const problem_params& p, const double* x) {
  constexpr int d = D;
  double f = 0.0;
  switch (p.kind) {
    case problem_kind::saddle:
      for (int j = 0; j < d; ++j)
        f += 0.5 * p.h[j] * x[j] * x[j] + p.mean[j] * x[j] + ipow(x[j], p.power);
      return f;
    case problem_kind::counterexample:
      return p.zeta * x[0];
    case problem_kind::quadratic:
      for (int i = 0; i < d; ++i) {
        double s = 0.0;
        for (int j = 0; j < d; ++j) s += p.H[i * d + j] * x[j];
        f += x[i] * s;
      }
      return 0.5 * f;
  }
  return f;
}

// The optimizer's update of v with g (burn-in and moving steps); false if g^2 overflows,
// which the CPU rule refuses as a numerical_error before changing anything.
template <int D>
SADDLESCAPE_HD inline bool observe(double b, const double* g, double* v) {
  for (int j = 0; j < D; ++j)
    if (!(g[j] * g[j] <= 1.7976931348623157e308)) return false;
  for (int j = 0; j < D; ++j) v[j] = diag_ema(v[j], g[j], b, 1.0 - b);
  return true;
}

template <int D>
SADDLESCAPE_HD inline bool escaped(const problem_params& p, const run_params& o, const double* x,
                                   const double* x0) {
  if (o.escape_radius > 0.0) {
    double s = 0.0;
    for (int j = 0; j < D; ++j) s += (x[j] - x0[j]) * (x[j] - x0[j]);
    if (s >= o.escape_radius * o.escape_radius) return true;
  }
  return o.use_escape_value && value<D>(p, x) <= o.escape_value;
}

// One seed: burn-in at x0, then `steps` steps, each projected; stops at the first non-finite
// gradient or iterate (diverged), an overflowing g^2 (numerical) or an invalid step size or
// beta (invalid), as run() does. x_out receives the last iterate.
template <int D>
SADDLESCAPE_HD seed_outcome simulate(const problem_params& p, const method_params& m,
                                     const run_params& o, const double* x0, std::uint64_t seed,
                                     double* x_out) {
  constexpr int d = D;
  seed_outcome out;
  rng r(seed);
  double x[D], v[D], g[D] = {};
  for (int j = 0; j < d; ++j) {
    x[j] = x0[j];
    v[j] = 0.0;
  }
  auto stop = [&](int status, std::int64_t t) {
    out.status = status;
    out.stopped_at = t;
  };
  auto gradient_ok = [&]() {
    for (int j = 0; j < d; ++j)
      if (!finite(g[j])) return false;
    return true;
  };
  std::int64_t updates = 0;
  const bool rms = m.kind == method_kind::rmsprop;
  if (escaped<D>(p, o, x, x0)) out.escape_step = 0;
  for (std::int64_t k = 0; rms && k < m.burn_in && out.status == status_completed; ++k) {
    sample<D>(p, r, x, g);
    if (!gradient_ok()) {
      stop(status_diverged, 0);
    } else {
      const double b = evaluate(m.beta, updates);
      if (!(b >= 0.0 && b < 1.0)) stop(status_invalid, 0);
      else if (!observe<D>(b, g, v)) stop(status_numerical, 0);
      else ++updates;
    }
  }
  // Algorithm 4's large steps are those with t mod t_thresh == 0, counted down rather than
  // taken modulo: a 64-bit division per step would cost more than the rest of the step.
  std::int64_t until_large = 0;
  for (std::int64_t t = 0; t < o.steps && out.status == status_completed; ++t) {
    sample<D>(p, r, x, g);
    if (!gradient_ok()) {
      stop(status_diverged, t);
      break;
    }
    const bool large = m.t_thresh > 0 && until_large == 0;
    if (m.t_thresh > 0) until_large = (until_large == 0 ? m.t_thresh : until_large) - 1;
    const double lr = large ? m.r : evaluate(m.lr, t);
    if (!(finite(lr) && lr >= 0.0)) {
      stop(status_invalid, t);
      break;
    }
    if (rms) {
      const double b = evaluate(m.beta, updates);
      if (!(b >= 0.0 && b < 1.0)) {
        stop(status_invalid, t);
        break;
      }
      if (!observe<D>(b, g, v)) {
        stop(status_numerical, t);
        break;
      }
      ++updates;
      for (int j = 0; j < d; ++j) x[j] -= lr * g[j] / diag_denominator(v[j], m.inner, m.outer);
    } else {
      for (int j = 0; j < d; ++j) x[j] -= lr * g[j];
    }
    project(p, x);
    bool ok = true;
    for (int j = 0; j < d; ++j) ok = ok && finite(x[j]);
    if (!ok) {
      stop(status_diverged, t);
      break;
    }
    if (out.escape_step < 0 && escaped<D>(p, o, x, x0)) out.escape_step = t + 1;
  }
  for (int j = 0; j < d; ++j) x_out[j] = x[j];
  bool ok = true;
  for (int j = 0; j < d; ++j) ok = ok && finite(x[j]);
  out.f = ok ? value<D>(p, x) : 0.0 / 0.0;
  return out;
}

}  // namespace saddlescape::cuda::detail
