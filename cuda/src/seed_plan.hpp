#pragma once
// What run_seeds sends to the device: the problem, rule and run options of a CPU problem and
// optimizer, turned into plain data (simulate.hpp) with host copies of the arrays they point
// to. Host-only code, compiled into the CUDA library and into the C++ tests, which run the
// plan on the host against run().

#include "simulate.hpp"

#include <saddlescape/cuda.hpp>

#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

namespace saddlescape::cuda::detail {

struct seed_plan {
  problem_params problem;  // its pointers point into the vectors below
  method_params method;
  run_params run;
  std::vector<double> h, b, mean, H, factor, x0;

  seed_plan() = default;
  seed_plan(const seed_plan&) = delete;
  seed_plan& operator=(const seed_plan&) = delete;
};

/// @throws invalid_argument for a problem, optimizer, schedule or option run_seeds does not
///   support (naming it), a dim mismatch or a non-finite x0.
void make_seed_plan(const problem& p, const optimizer& opt, const double* x0,
                    const seed_run_options& options, seed_plan& plan);

/// Calls f(std::integral_constant<int, d>{}) for 1 <= d <= max_seed_dim: each dimension is
/// its own instantiation of simulate().
template <int D = 1, class F>
decltype(auto) with_dim(int d, F&& f) {
  if constexpr (D < max_seed_dim) {
    if (d > D) return with_dim<D + 1>(d, std::forward<F>(f));
  }
  return f(std::integral_constant<int, D>{});
}

/// Fills result's arrays for `count` seeds (sizes only).
void size_result(seed_run_result& result, std::int64_t dim, const std::vector<std::uint64_t>& seeds);

/// Stores one seed's outcome in result row i.
void store_outcome(seed_run_result& result, std::size_t i, const seed_outcome& o);

/// The plan run on the host, seed after seed: the reference the device kernel is held to.
seed_run_result run_seeds_on_host(const seed_plan& plan, const std::vector<std::uint64_t>& seeds);

}  // namespace saddlescape::cuda::detail
