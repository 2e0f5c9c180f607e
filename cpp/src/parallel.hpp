#pragma once
// Splitting long elementwise passes over the machine's cores. The diagonal optimizer steps are
// bound by the FP divider (a sqrt and a division per entry: about 1.6 ns per entry on one
// core, slower than memory), so at d ~ 10^7 one core cannot reach the memory bandwidth; two can.
// Results do not depend on the split: every pass is elementwise or an order-free reduction.

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <exception>
#include <cstdlib>
#include <system_error>
#include <thread>
#include <type_traits>
#include <vector>

namespace saddlescape::detail {

// Below this many entries a pass runs on the calling thread: starting threads costs tens of
// microseconds, about what one core needs for 2^17 entries.
constexpr std::ptrdiff_t parallel_threshold = std::ptrdiff_t(1) << 18;

// Threads for long passes: SADDLESCAPE_NUM_THREADS if set (>= 1), else the hardware's count.
inline unsigned pass_threads() {
  static const unsigned count = [] {
    if (const char* env = std::getenv("SADDLESCAPE_NUM_THREADS")) {
      const long v = std::strtol(env, nullptr, 10);
      if (v >= 1) return static_cast<unsigned>(std::min(v, 256L));
    }
    return std::max(1u, std::thread::hardware_concurrency());
  }();
  return count;
}

// Calls fn(part, begin, end) on disjoint ranges covering [0, n), part = 0, 1, ..., parts - 1,
// and returns parts. Chunk boundaries are multiples of 64 entries (whole cache lines). An
// exception from fn is rethrown on the calling thread once every thread has joined (the one of
// the lowest-numbered failing part), never std::terminate; the other parts still run.
template <class F>
unsigned parallel_chunks(std::ptrdiff_t n, F&& fn) {
  const unsigned parts = n < parallel_threshold ? 1u : pass_threads();
  if (parts <= 1) {
    fn(0u, std::ptrdiff_t(0), n);
    return 1;
  }
  const std::ptrdiff_t chunk = ((n + parts - 1) / parts + 63) / 64 * 64;
  std::vector<std::exception_ptr> errors(parts);
  auto run = [&fn, &errors, n, chunk](unsigned k) {
    try {
      fn(k, std::min(n, k * chunk), std::min(n, (k + 1) * chunk));
    } catch (...) {
      errors[k] = std::current_exception();
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(parts - 1);
  unsigned k = 1;
  try {
    for (; k < parts; ++k) pool.emplace_back(run, k);
  } catch (const std::system_error&) {
    // No more threads to be had: this thread takes the chunks not started.
  }
  for (unsigned j = k; j < parts; ++j) run(j);
  run(0u);
  for (auto& t : pool) t.join();
  for (const auto& e : errors)
    if (e) std::rethrow_exception(e);
  return parts;
}


// Runs fn(task), or fn(task, worker) with worker < threads the index of the running thread (for
// per-thread workspaces), for task = 0 .. n - 1 on up to `threads` threads (the caller's among them), each
// thread taking the next unstarted task, so that tasks of unequal cost balance out. Every task
// runs exactly once whatever the thread count, so results that depend only on the task are
// independent of it. An exception stops the remaining tasks from starting; the one from the
// lowest-numbered failing task is rethrown after every thread has joined.
template <class F>
void parallel_tasks(std::ptrdiff_t n, unsigned threads, F&& fn) {
  if (n <= 0) return;
  threads = static_cast<unsigned>(std::min<std::ptrdiff_t>(std::max(1u, threads), n));
  std::atomic<std::ptrdiff_t> next{0};
  std::atomic<bool> failed{false};
  std::vector<std::exception_ptr> errors(threads);
  std::vector<std::ptrdiff_t> error_task(threads, n);
  auto work = [&](unsigned k) {
    for (;;) {
      if (failed.load(std::memory_order_relaxed)) return;
      const std::ptrdiff_t t = next.fetch_add(1, std::memory_order_relaxed);
      if (t >= n) return;
      try {
        if constexpr (std::is_invocable_v<F&, std::ptrdiff_t, unsigned>)
          fn(t, k);
        else
          fn(t);
      } catch (...) {
        if (t < error_task[k]) {
          errors[k] = std::current_exception();
          error_task[k] = t;
        }
        failed.store(true, std::memory_order_relaxed);
      }
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  try {
    for (unsigned k = 1; k < threads; ++k) pool.emplace_back(work, k);
  } catch (const std::system_error&) {
    // No more threads to be had: the ones started and this one share the tasks.
  }
  work(0u);
  for (auto& t : pool) t.join();
  std::ptrdiff_t first = n;
  std::exception_ptr error;
  for (unsigned k = 0; k < threads; ++k)
    if (errors[k] && error_task[k] < first) first = error_task[k], error = errors[k];
  if (error) std::rethrow_exception(error);
}

}  // namespace saddlescape::detail
