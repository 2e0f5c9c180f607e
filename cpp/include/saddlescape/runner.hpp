#pragma once
/// @file runner.hpp
/// The native loop: T steps of an optimizer on a problem, with a record of what happened.
///
/// One run: x = x0; while the optimizer is burning in (Algorithm 3), g = a stochastic gradient
/// at x0 and step() (x stays at x0); then for t = 0, ..., steps - 1: g_t = a stochastic
/// gradient at x_t, x_(t+1) = step(x_t, g_t), projected onto the problem's feasible set.
/// Records are taken at x_0 and after every record_every-th step, and always after the last.
/// The randomness is the problem's sampler_for(seed) (rng.hpp), so a seed names one result
/// bit for bit, whichever thread runs it.
///
/// A gradient or iterate that is not finite stops the run: the result says `diverged`, the
/// step, and keeps every record taken before. An error raised inside the optimizer
/// (numerical_error, invalid_argument) also stops it, with status `numerical` or `invalid`.
/// Any other exception, from the problem's sampler or a user callable inside the optimizer,
/// stops the run with status `error`: the result keeps the records and the exception
/// (run_result::error), and the caller decides whether to rethrow it.
///
/// Interruption and progress. With run_options::monitor set, the calling thread calls it about
/// every monitor_interval seconds (between steps, so a single step longer than that delays it)
/// with the number of steps done so far (all seeds of run_many together); returning false stops
/// every run at its next step boundary with status `interrupted`, the records up to the last
/// completed step kept. run_many then waits on its worker threads without stepping itself, so
/// that the monitor keeps its rhythm; every worker is joined before it returns.

#include <saddlescape/optimizers.hpp>
#include <saddlescape/problems.hpp>

#include <cstdint>
#include <exception>
#include <functional>
#include <string>
#include <vector>

namespace saddlescape {

struct run_options {
  std::int64_t steps = 0;         ///< >= 0.
  std::uint64_t seed = 0;
  std::int64_t record_every = 1;  ///< >= 1.
  bool record_x = true;           ///< keep the iterate at each record (dim values each).
  /// Called on the calling thread with the steps done so far; false stops the run(s) (status
  /// interrupted). If it throws, run() stops with status error holding that exception, and
  /// run_many() stops every seed (interrupted) and rethrows it once its threads have joined.
  std::function<bool(std::int64_t steps_done)> monitor;
  double monitor_interval = 0.05;  ///< seconds between monitor calls, > 0.
};

enum class run_status {
  completed,  ///< all steps done.
  diverged,   ///< a gradient or iterate became non-finite.
  numerical,  ///< the optimizer raised numerical_error.
  invalid,    ///< the optimizer raised invalid_argument (e.g. a schedule left its range).
  interrupted,  ///< the monitor asked to stop.
  error,      ///< another exception (a user callable's, a sampler's): see run_result::error.
};
std::string_view to_string(run_status s);

struct run_result {
  index_t dim = 0;
  std::vector<std::int64_t> t;     ///< the step count at each record (0 = x0).
  std::vector<double> f;           ///< F(x_t), if the problem has a value; else empty.
  std::vector<double> grad_norm;   ///< ||grad F(x_t)||, if it has a gradient; else empty.
  std::vector<double> lambda_min;  ///< the Hessian's smallest eigenvalue, if it has one.
  std::vector<double> x;           ///< records x dim iterates, row-major, if record_x.
  std::vector<double> x_final;     ///< the iterate where the run ended.
  run_status status = run_status::completed;
  std::int64_t stopped_at = -1;    ///< the step t whose gradient, iterate or update failed.
  std::string message;             ///< why it stopped, when it did.
  std::exception_ptr error;        ///< status error: the exception that stopped the run.
};

/// One run. opt is advanced in place (its state after the run is the run's final state).
/// @throws invalid_argument for a dim mismatch, a non-finite x0, steps < 0 or record_every < 1.
run_result run(const problem& p, optimizer& opt, const double* x0, const run_options& options);

/// Runs seed seeds[i] with optimizer *opts[i] (one object per seed) on up to `threads`
/// threads (0: one per hardware thread). Each result equals run() with that seed; an exception
/// inside a run is that run's status error (the other seeds go on). Seeds not started when the
/// monitor stops them are interrupted at step 0 with only the record at x0.
std::vector<run_result> run_many(const problem& p, const std::vector<optimizer*>& opts,
                                 const double* x0, const run_options& options,
                                 const std::vector<std::uint64_t>& seeds, int threads = 0);

}  // namespace saddlescape
