#include <saddlescape/runner.hpp>

#include "checks.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <exception>
#include <system_error>
#include <thread>

namespace saddlescape {

std::string_view to_string(run_status s) {
  switch (s) {
    case run_status::completed: return "completed";
    case run_status::diverged: return "diverged";
    case run_status::numerical: return "numerical";
    case run_status::invalid: return "invalid";
  }
  return "?";
}

namespace {

void check_run_args(const problem& p, const optimizer& opt, const double* x0,
                    const run_options& o) {
  SADDLESCAPE_EXPECTS(opt.dim() == p.dim(), "the optimizer has dim ", opt.dim(),
                      " but the problem has dim ", p.dim());
  SADDLESCAPE_EXPECTS(o.steps >= 0, "steps must be >= 0, got ", o.steps);
  SADDLESCAPE_EXPECTS(o.record_every >= 1, "record_every must be >= 1, got ", o.record_every);
  detail::check_finite(x0, 1, p.dim(), "x0", true);
}

class recorder {
 public:
  recorder(const problem& p, const run_options& o, run_result& r)
      : p_(p), o_(o), r_(r), g_(static_cast<std::size_t>(p.dim())) {
    const auto n = static_cast<std::size_t>(o.steps / o.record_every + 2);
    r.t.reserve(n);
    if (p.has_value()) r.f.reserve(n);
    if (p.has_gradient()) r.grad_norm.reserve(n);
    if (p.has_hessian()) r.lambda_min.reserve(n);
    if (o.record_x) r.x.reserve(n * g_.size());
  }
  void operator()(std::int64_t t, const double* x) {
    r_.t.push_back(t);
    if (p_.has_value()) r_.f.push_back(p_.value(x));
    if (p_.has_gradient()) {
      p_.gradient(x, g_.data());
      double s = 0.0;
      for (const double v : g_) s += v * v;
      r_.grad_norm.push_back(std::sqrt(s));
    }
    if (p_.has_hessian()) r_.lambda_min.push_back(p_.lambda_min(x));
    if (o_.record_x) r_.x.insert(r_.x.end(), x, x + p_.dim());
  }

 private:
  const problem& p_;
  const run_options& o_;
  run_result& r_;
  std::vector<double> g_;
};

void stop(run_result& r, run_status s, std::int64_t t, std::string message) {
  r.status = s;
  r.stopped_at = t;
  r.message = std::move(message);
}

}  // namespace

run_result run(const problem& p, optimizer& opt, const double* x0, const run_options& o) {
  check_run_args(p, opt, x0, o);
  const index_t d = p.dim();
  run_result r;
  r.dim = d;
  r.x_final.assign(x0, x0 + d);
  double* x = r.x_final.data();
  std::vector<double> g(static_cast<std::size_t>(d));
  const auto src = p.sampler_for(o.seed);
  recorder record(p, o, r);

  auto gradient_ok = [&](std::int64_t t) {
    src->sample(x, g.data());
    if (detail::all_finite(g.data(), d)) return true;
    stop(r, run_status::diverged, t,
         detail::concat("the stochastic gradient at step ", t, " is not finite"));
    return false;
  };
  // The optimizer's own errors stop the run like divergence does, so that the records survive.
  auto step_ok = [&](std::int64_t t) {
    try {
      opt.step(x, g.data(), src.get());
    } catch (const non_finite_gradient& e) {
      stop(r, run_status::diverged, t, e.what());
      return false;
    } catch (const numerical_error& e) {
      stop(r, run_status::numerical, t, e.what());
      return false;
    } catch (const invalid_argument& e) {
      stop(r, run_status::invalid, t, e.what());
      return false;
    }
    return true;
  };

  // x0 is recorded first: burn-in leaves x where it is, and a failure during burn-in
  // (reported at step 0, the message saying so) then keeps that record.
  record(0, x);
  for (std::int64_t k = 0; opt.burn_in_remaining() > 0; ++k)
    if (!gradient_ok(0) || !step_ok(0)) {
      r.message = detail::concat("during burn-in (sample ", k, "): ", r.message);
      return r;
    }
  for (std::int64_t t = 0; t < o.steps; ++t) {
    if (!gradient_ok(t) || !step_ok(t)) return r;
    src->project(x);
    if (!detail::all_finite(x, d)) {
      stop(r, run_status::diverged, t, detail::concat("the iterate became non-finite at step ", t));
      return r;
    }
    if ((t + 1) % o.record_every == 0 || t + 1 == o.steps) record(t + 1, x);
  }
  return r;
}

std::vector<run_result> run_many(const problem& p, const std::vector<optimizer*>& opts,
                                 const double* x0, const run_options& o,
                                 const std::vector<std::uint64_t>& seeds, int threads) {
  SADDLESCAPE_EXPECTS(opts.size() == seeds.size(), "need one optimizer per seed: ", opts.size(),
                      " optimizers for ", seeds.size(), " seeds");
  SADDLESCAPE_EXPECTS(threads >= 0, "threads must be >= 0, got ", threads);
  for (std::size_t i = 0; i < opts.size(); ++i) {
    SADDLESCAPE_EXPECTS(opts[i] != nullptr, "optimizer ", i, " is null");
    check_run_args(p, *opts[i], x0, o);
  }
  std::vector<const optimizer*> sorted(opts.begin(), opts.end());
  std::sort(sorted.begin(), sorted.end());
  SADDLESCAPE_EXPECTS(std::adjacent_find(sorted.begin(), sorted.end()) == sorted.end(),
                      "two seeds have the same optimizer object; each seed needs its own");
  const std::size_t n = seeds.size();
  std::vector<run_result> results(n);
  std::vector<std::exception_ptr> errors(n);
  std::atomic<std::size_t> next{0};
  auto worker = [&] {
    for (std::size_t i = next++; i < n; i = next++) {
      run_options oi = o;
      oi.seed = seeds[i];
      try {
        results[i] = run(p, *opts[i], x0, oi);
      } catch (...) {
        errors[i] = std::current_exception();
      }
    }
  };
  unsigned count = threads > 0 ? static_cast<unsigned>(threads)
                               : std::max(1u, std::thread::hardware_concurrency());
  count = static_cast<unsigned>(std::min<std::size_t>(count, std::max<std::size_t>(n, 1)));
  std::vector<std::thread> pool;
  try {
    for (unsigned k = 1; k < count; ++k) pool.emplace_back(worker);
  } catch (const std::system_error&) {
    // The system refused more threads: the ones started and this one share the work.
  }
  worker();
  for (auto& th : pool) th.join();
  for (const auto& e : errors)
    if (e) std::rethrow_exception(e);
  return results;
}

}  // namespace saddlescape
