// run_seeds: simulate() one thread per seed. The plan (seed_plan.cpp) is built on the host from
// the CPU objects; its arrays are copied to the device and its pointers redirected there.

#include "common.cuh"
#include "seed_plan.hpp"

#include <vector>

namespace saddlescape::cuda {

namespace {

template <int D>
__global__ void seeds_kernel(detail::problem_params p, detail::method_params m,
                             detail::run_params o, const double* __restrict x0,
                             const std::uint64_t* __restrict seeds, std::int64_t count,
                             detail::seed_outcome* __restrict outcomes, double* __restrict x_out) {
  const std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  if (i >= count) return;
  outcomes[i] = detail::simulate<D>(p, m, o, x0, seeds[i], x_out + i * D);
}

// A device copy of a host vector (nothing for an empty one).
detail::device_buffer<double> upload(const std::vector<double>& v, cudaStream_t stream) {
  detail::device_buffer<double> b(v.size(), stream);
  b.upload(v.data(), v.size());
  return b;
}

}  // namespace

seed_run_result run_seeds(context& ctx, const problem& p, const optimizer& opt, const double* x0,
                          const std::vector<std::uint64_t>& seeds,
                          const seed_run_options& options) {
  detail::seed_plan plan;
  detail::make_seed_plan(p, opt, x0, options, plan);
  cudaStream_t stream = detail::enter(ctx).stream;
  seed_run_result result;
  const int d = plan.problem.d;
  detail::size_result(result, d, seeds);
  const auto count = static_cast<std::int64_t>(seeds.size());
  if (count == 0) return result;

  const auto h = upload(plan.h, stream), b = upload(plan.b, stream),
             mean = upload(plan.mean, stream), H = upload(plan.H, stream),
             factor = upload(plan.factor, stream), start = upload(plan.x0, stream);
  detail::device_buffer<std::uint64_t> dev_seeds(seeds.size(), stream);
  dev_seeds.upload(seeds.data(), seeds.size());
  detail::device_buffer<detail::seed_outcome> outcomes(seeds.size(), stream);
  detail::device_buffer<double> x_out(result.x_final.size(), stream);

  detail::problem_params q = plan.problem;
  q.h = h.get();
  q.b = b.get();
  q.mean = mean.get();
  q.H = H.get();
  q.factor = factor.get();
  // Small blocks: a seed's registers are many (its whole state), and a grid of many blocks
  // spreads 10^5 seeds over every SM.
  constexpr unsigned int threads = 128;
  const std::int64_t blocks = (count + threads - 1) / threads;
  SADDLESCAPE_EXPECTS(blocks <= 0x7fffffff, "too many seeds for one launch: ", count);
  detail::with_dim(d, [&](auto bound) {
    constexpr int D = decltype(bound)::value;
    seeds_kernel<D><<<static_cast<unsigned int>(blocks), threads, 0, stream>>>(
        q, plan.method, plan.run, start.get(), dev_seeds.get(), count, outcomes.get(), x_out.get());
  });
  SADDLESCAPE_LAUNCHED();

  std::vector<detail::seed_outcome> host(seeds.size());
  SADDLESCAPE_CUDA(cudaMemcpyAsync(host.data(), outcomes.get(),
                                   host.size() * sizeof(detail::seed_outcome),
                                   cudaMemcpyDeviceToHost, stream));
  SADDLESCAPE_CUDA(cudaMemcpyAsync(result.x_final.data(), x_out.get(),
                                   result.x_final.size() * sizeof(double), cudaMemcpyDeviceToHost,
                                   stream));
  SADDLESCAPE_CUDA(cudaStreamSynchronize(stream));
  for (std::size_t i = 0; i < host.size(); ++i) detail::store_outcome(result, i, host[i]);
  return result;
}

}  // namespace saddlescape::cuda
