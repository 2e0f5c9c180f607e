#include <saddlescape/runner.hpp>

#include "checks.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <system_error>
#include <thread>

namespace saddlescape {

std::string_view to_string(run_status s) {
  switch (s) {
    case run_status::completed: return "completed";
    case run_status::diverged: return "diverged";
    case run_status::numerical: return "numerical";
    case run_status::invalid: return "invalid";
    case run_status::interrupted: return "interrupted";
    case run_status::error: return "error";
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
  SADDLESCAPE_EXPECTS(!o.monitor || (std::isfinite(o.monitor_interval) && o.monitor_interval > 0),
                      "monitor_interval must be finite and > 0, got ", o.monitor_interval);
}

using clock_type = std::chrono::steady_clock;

// How one run learns that it should stop: from its own monitor (run() on the calling thread),
// or from a flag that run_many's calling thread sets (workers). Progress goes to a shared
// counter in batches, so that threads do not contend for it at every step.
struct stop_source {
  const run_options* o = nullptr;  // monitor owner (run() only)
  const std::atomic<bool>* flag = nullptr;
  std::atomic<std::int64_t>* done = nullptr;
  clock_type::time_point next_poll{};
  std::int64_t pending = 0;
  std::exception_ptr monitor_error;
  // run() ends an interrupted run's records at its last step; run_many keeps every seed on
  // the shared record grid instead.
  bool record_at_stop = false;

  // Whether to stop before step t; `steps` is the count of steps completed by this run.
  bool should_stop(std::int64_t steps) {
    if (done && ++pending >= 64) flush();
    if (flag && flag->load(std::memory_order_relaxed)) return true;
    if (!o || !o->monitor) return false;
    const auto now = clock_type::now();
    if (now < next_poll) return false;
    next_poll = now + std::chrono::duration_cast<clock_type::duration>(
                          std::chrono::duration<double>(o->monitor_interval));
    try {
      return !o->monitor(steps);
    } catch (...) {
      monitor_error = std::current_exception();
      return true;
    }
  }
  void flush() {
    if (done && pending) done->fetch_add(pending, std::memory_order_relaxed);
    pending = 0;
  }
};

class recorder {
 public:
  recorder(const problem& p, const run_options& o, run_result& r)
      : p_(p), o_(o), r_(r), g_(static_cast<std::size_t>(p.dim())) {
    // Capped: a run of 10^9 steps may well be interrupted long before its end, and reserving
    // for all of it up front could fail; past the cap the vectors grow as usual.
    const auto n = static_cast<std::size_t>(std::min<std::int64_t>(o.steps / o.record_every + 2,
                                                                   std::int64_t(1) << 16));
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

namespace {

run_result run_impl(const problem& p, optimizer& opt, const double* x0, const run_options& o,
                    stop_source& stopper) {
  const index_t d = p.dim();
  run_result r;
  r.dim = d;
  r.x_final.assign(x0, x0 + d);
  double* x = r.x_final.data();
  std::vector<double> g(static_cast<std::size_t>(d));
  const auto src = p.sampler_for(o.seed);
  recorder record(p, o, r);

  // Anything a user's code throws (a Python oracle, a callable preconditioner) also stops the
  // run at the step it came from, so that the records taken so far survive with it.
  auto foreign = [&](std::int64_t t) {
    r.error = std::current_exception();
    std::string what = "an exception was raised";
    try {
      throw;
    } catch (const std::exception& e) {
      what = e.what();
      // pybind11 appends the Python traceback; the message keeps the first line.
      what = what.substr(0, what.find('\n'));
    } catch (...) {
    }
    stop(r, run_status::error, t, detail::concat("at step ", t, ": ", what));
    return false;
  };
  auto gradient_ok = [&](std::int64_t t) {
    try {
      src->sample(x, g.data());
    } catch (...) {
      return foreign(t);
    }
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
    } catch (...) {
      return foreign(t);
    }
    return true;
  };
  std::int64_t completed = 0;  // steps done, burn-in included
  auto interrupted = [&](std::int64_t t) {
    if (!stopper.should_stop(completed)) return false;
    if (stopper.monitor_error) {
      r.error = stopper.monitor_error;
      stop(r, run_status::error, t, detail::concat("the monitor raised before step ", t));
    } else {
      stop(r, run_status::interrupted, t, detail::concat("interrupted before step ", t));
      // The records then end at the last completed step, whatever record_every says.
      if (stopper.record_at_stop && r.t.back() != t) record(t, x);
    }
    return true;
  };

  // x0 is recorded first: burn-in leaves x where it is, and a failure during burn-in
  // (reported at step 0, the message saying so) then keeps that record.
  record(0, x);
  for (std::int64_t k = 0; opt.burn_in_remaining() > 0; ++k, ++completed)
    if (interrupted(0) || !gradient_ok(0) || !step_ok(0)) {
      r.message = detail::concat("during burn-in (sample ", k, "): ", r.message);
      return r;
    }
  for (std::int64_t t = 0; t < o.steps; ++t, ++completed) {
    if (interrupted(t) || !gradient_ok(t) || !step_ok(t)) return r;
    src->project(x);
    if (!detail::all_finite(x, d)) {
      stop(r, run_status::diverged, t, detail::concat("the iterate became non-finite at step ", t));
      return r;
    }
    if ((t + 1) % o.record_every == 0 || t + 1 == o.steps) record(t + 1, x);
  }
  return r;
}

}  // namespace

run_result run(const problem& p, optimizer& opt, const double* x0, const run_options& o) {
  check_run_args(p, opt, x0, o);
  stop_source stopper;
  stopper.o = &o;
  stopper.record_at_stop = true;
  return run_impl(p, opt, x0, o, stopper);
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
  std::atomic<bool> stop_flag{false};
  std::atomic<std::int64_t> done{0};
  std::atomic<unsigned> running{0};
  std::mutex m;
  std::condition_variable finished;
  const bool monitored = static_cast<bool>(o.monitor);
  auto worker = [&](bool counted) {
    for (std::size_t i = next++; i < n; i = next++) {
      run_options oi = o;
      oi.seed = seeds[i];
      oi.monitor = nullptr;  // the calling thread monitors
      stop_source stopper;
      stopper.flag = &stop_flag;
      if (monitored) stopper.done = &done;
      try {
        results[i] = run_impl(p, *opts[i], x0, oi, stopper);
      } catch (...) {
        errors[i] = std::current_exception();
      }
      stopper.flush();
    }
    if (counted) {
      std::lock_guard<std::mutex> lock(m);
      --running;
      finished.notify_all();
    }
  };
  unsigned count = threads > 0 ? static_cast<unsigned>(threads)
                               : std::max(1u, std::thread::hardware_concurrency());
  count = static_cast<unsigned>(std::min<std::size_t>(count, std::max<std::size_t>(n, 1)));
  std::vector<std::thread> pool;
  // Monitored, the calling thread only watches (its monitor is what notices Ctrl-C), so all
  // `count` workers are new threads; otherwise it is one of them.
  const unsigned first = monitored ? 0u : 1u;
  try {
    for (unsigned k = first; k < count; ++k) {
      if (monitored) ++running;
      try {
        pool.emplace_back(worker, monitored);
      } catch (...) {
        if (monitored) --running;
        throw;
      }
    }
  } catch (const std::system_error&) {
    // The system refused more threads: the ones started (and this one) share the work.
  }
  std::exception_ptr monitor_error;
  if (!monitored || pool.empty()) {
    worker(false);
  } else {
    const auto interval = std::chrono::duration_cast<clock_type::duration>(
        std::chrono::duration<double>(o.monitor_interval));
    std::unique_lock<std::mutex> lock(m);
    while (running > 0) {
      finished.wait_for(lock, interval, [&] { return running == 0; });
      if (running == 0 || stop_flag.load()) continue;
      lock.unlock();
      bool go_on = false;
      try {
        go_on = o.monitor(done.load(std::memory_order_relaxed));
      } catch (...) {
        monitor_error = std::current_exception();
      }
      if (!go_on) stop_flag.store(true);
      lock.lock();
    }
  }
  for (auto& th : pool) th.join();
  if (monitor_error) std::rethrow_exception(monitor_error);
  for (const auto& e : errors)
    if (e) std::rethrow_exception(e);
  return results;
}

}  // namespace saddlescape
