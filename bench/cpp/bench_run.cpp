// C++ benchmark of the native loop on the paper's 2-D saddle problem (Sec. 6), usable without
// Python:
//
//   bench_run [--rounds R] [--steps N]
//
// Times saddlescape::run with diagonal and full-matrix RMSProp (closed-form 2 x 2 root) and SGD,
// against a baseline a C++ user would write by hand for the diagonal case: the same update in a
// plain loop with std::mt19937_64 component sampling (an upper bound on what the library's
// indirection can cost). Prints median steps/s over R rounds and the ratio.

#include <saddlescape/saddlescape.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

namespace {

using clock_type = std::chrono::steady_clock;

double median_seconds(const std::function<void()>& fn, int rounds) {
  std::vector<double> t;
  fn();  // warm-up
  for (int r = 0; r < rounds; ++r) {
    const auto start = clock_type::now();
    fn();
    t.push_back(std::chrono::duration<double>(clock_type::now() - start).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  int rounds = 7;
  std::int64_t steps = 5'000'000;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--rounds") rounds = std::atoi(argv[i + 1]);
    if (a == "--steps") steps = std::atoll(argv[i + 1]);
  }
  using namespace saddlescape;
  const saddle_problem p({1.0, -0.1}, {1.0, 0.01});
  const double lr_value = 1e-3, beta_value = beta_from_lr(lr_value);
  auto lr = std::make_shared<constant_schedule>(lr_value);
  auto beta = std::make_shared<constant_schedule>(beta_value);
  const std::vector<double> x0(2, 0.0);
  const run_options options{steps, 0, steps, false};
  volatile double sink = 0;

  auto native = [&](structure s) {
    return [&, s] {
      rmsprop_options o;
      o.layout = s;
      rmsprop opt(2, lr, beta, o);
      sink = run(p, opt, x0.data(), options).x_final[0];
    };
  };
  auto plain_sgd = [&] {
    sgd opt(2, lr);
    sink = run(p, opt, x0.data(), options).x_final[0];
  };
  // The hand-written diagonal RMSProp: the same arithmetic, no virtual calls, no checks.
  auto by_hand = [&] {
    std::mt19937_64 gen(0);
    std::uniform_int_distribution<std::size_t> pick(0, static_cast<std::size_t>(p.n() - 1));
    const double* b = p.b().data();
    double x[2] = {0, 0}, v[2] = {0, 0};
    for (std::int64_t t = 0; t < steps; ++t) {
      const double* bi = b + 2 * pick(gen);
      for (int j = 0; j < 2; ++j) {
        const double x8 = std::pow(x[j], 8);
        const double g = p.h()[j] * x[j] + 10 * x8 * x[j] + bi[j];
        v[j] = beta_value * v[j] + (1 - beta_value) * g * g;
        x[j] -= lr_value * g / std::sqrt(v[j] + 1e-8);
      }
    }
    sink = x[0];
  };

  std::printf("run() on the 2-D saddle problem, %lld steps per timing, median of %d rounds\n\n",
              static_cast<long long>(steps), rounds);
  std::printf("| route | steps/s |\n|---|---|\n");
  const double hand = median_seconds(by_hand, rounds);
  const struct {
    const char* name;
    std::function<void()> fn;
  } routes[] = {{"RMSProp diag", native(structure::diag)},
                {"RMSProp full (closed-form 2 x 2)", native(structure::full)},
                {"SGD", plain_sgd}};
  for (const auto& r : routes) {
    const double s = median_seconds(r.fn, rounds);
    std::printf("| saddlescape::run, %s | %.1f M |\n", r.name, steps / s / 1e6);
  }
  std::printf("| hand-written diagonal RMSProp loop (no checks, no records) | %.1f M |\n",
              steps / hand / 1e6);
  (void)sink;
  return 0;
}
