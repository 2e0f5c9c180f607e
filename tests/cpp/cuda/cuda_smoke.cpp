// The CUDA library as a C++ caller links and loads it: built whenever the backend is (so CI,
// which has nvcc but no GPU, proves that libsaddlescape_cuda and its cuBLAS/cuSOLVER load and
// that a missing GPU is a clear error, not a crash). On a machine with a GPU it also runs a
// diagonal step and a many-seed run and compares them with the CPU library.

#include <saddlescape/cuda.hpp>
#include <saddlescape/saddlescape.hpp>

#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

namespace ss = saddlescape;
namespace sc = saddlescape::cuda;

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  failures += ok ? 0 : 1;
}

ss::schedule_ptr constant(double v) { return std::make_shared<ss::constant_schedule>(v); }

void without_gpu() {
  check(!sc::unavailable_reason().empty(), "unavailable_reason: " + sc::unavailable_reason());
  try {
    sc::context ctx;
    check(false, "context() without a GPU throws");
  } catch (const sc::cuda_error& e) {
    check(std::string(e.what()).find("no CUDA device") != std::string::npos,
          std::string("context() throws cuda_error: ") + e.what());
  }
}

void with_gpu() {
  std::printf("device: %s\n", sc::device_description().c_str());
  sc::context ctx;
  // The diagonal step against the CPU formula, entry by entry.
  const std::int64_t n = 1000;
  std::vector<double> x(n), g(n), v(n);
  for (std::int64_t i = 0; i < n; ++i) {
    x[i] = std::sin(0.1 * i);
    g[i] = std::cos(0.37 * i) * (i % 7 == 0 ? 1e-170 : 1.0);  // some g^2 underflow: flushed
    v[i] = i % 3 == 0 ? 0.0 : 0.5 + 0.001 * i;
  }
  double *dx = nullptr, *dg = nullptr, *dv = nullptr;
  cudaMalloc(&dx, n * sizeof(double));
  cudaMalloc(&dg, n * sizeof(double));
  cudaMalloc(&dv, n * sizeof(double));
  cudaMemcpy(dx, x.data(), n * sizeof(double), cudaMemcpyHostToDevice);
  cudaMemcpy(dg, g.data(), n * sizeof(double), cudaMemcpyHostToDevice);
  cudaMemcpy(dv, v.data(), n * sizeof(double), cudaMemcpyHostToDevice);
  sc::rmsprop_diag_step(ctx, dx, dg, dv, n, 0.01, 0.9, 1e-8, ss::root_form::inv_sqrt);
  std::vector<double> gx(n), gv(n);
  cudaMemcpy(gx.data(), dx, n * sizeof(double), cudaMemcpyDeviceToHost);
  cudaMemcpy(gv.data(), dv, n * sizeof(double), cudaMemcpyDeviceToHost);
  double worst = 0.0;
  for (std::int64_t i = 0; i < n; ++i) {
    const double nv = ss::detail::diag_ema(v[i], g[i], 0.9, 1.0 - 0.9);
    const double nx = x[i] - 0.01 * g[i] / ss::detail::diag_denominator(nv, 1e-8, 0.0);
    worst = std::max({worst, std::abs(gv[i] - nv) / std::max(1e-300, std::abs(nv)),
                      std::abs(gx[i] - nx) / std::max(1.0, std::abs(nx))});
  }
  check(worst < 1e-14, "rmsprop_diag_step matches the CPU formula (worst " +
                           std::to_string(worst) + ")");
  cudaFree(dx);
  cudaFree(dg);
  cudaFree(dv);

  // The many-seed runner against run(), seed by seed.
  const ss::saddle_problem p({1.0, -0.1}, {1.0, 0.01}, 1000, 10, 0);
  ss::rmsprop_options o;
  o.layout = ss::structure::diag;
  const double x0[2] = {0.0, 0.0};
  std::vector<std::uint64_t> seeds;
  for (std::uint64_t s = 0; s < 64; ++s) seeds.push_back(s);
  sc::seed_run_options so;
  so.steps = 5000;
  so.escape_radius = 0.3;
  const auto got = sc::run_seeds(ctx, p, ss::rmsprop(2, constant(0.01), constant(0.95), o), x0,
                                 seeds, so);
  double err = 0.0;
  for (std::size_t i = 0; i < seeds.size(); ++i) {
    ss::rmsprop opt(2, constant(0.01), constant(0.95), o);
    ss::run_options ro;
    ro.steps = so.steps;
    ro.seed = seeds[i];
    ro.record_x = false;
    const auto want = ss::run(p, opt, x0, ro);
    for (int j = 0; j < 2; ++j)
      err = std::max(err, std::abs(got.x_final[2 * i + j] - want.x_final[j]) /
                              std::max(1.0, std::abs(want.x_final[j])));
  }
  check(err < 1e-8, "run_seeds matches run() for 64 seeds (worst " + std::to_string(err) + ")");
}

}  // namespace

int main() {
  try {
    if (sc::is_available()) {
      with_gpu();
    } else {
      without_gpu();
    }
  } catch (const std::exception& e) {
    check(false, std::string("unexpected exception: ") + e.what());
  }
  return failures == 0 ? 0 : 1;
}
