// C++ benchmark of (G + eps I)^(-1/2), usable without Python:
//
//   bench_inv_sqrt [--rounds R] [d ...]        (default d = 16 64 256 1024 2048)
//
// Times, in one run and interleaved round by round, saddlescape::eigen_root with each eigensolver
// backend (automatic, LAPACK syevd, Eigen) against the baseline a C++ user would write with Eigen
// alone: SelfAdjointEigenSolver, then V diag(lambda^(-1/2)) V^T as a general product. Prints
// median times and the ratio baseline / saddlescape.

#include <saddlescape/saddlescape.hpp>

#include <Eigen/Eigenvalues>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

namespace {

using clock_type = std::chrono::steady_clock;
using matrix = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

double seconds_per_call(const std::function<void()>& fn, int calls) {
  const auto start = clock_type::now();
  for (int i = 0; i < calls; ++i) fn();
  return std::chrono::duration<double>(clock_type::now() - start).count() / calls;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

std::string fmt(double s) {
  char buf[32];
  if (s < 1e-3)
    std::snprintf(buf, sizeof buf, "%.1f us", s * 1e6);
  else
    std::snprintf(buf, sizeof buf, "%.2f ms", s * 1e3);
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  int rounds = 5;
  std::vector<long> sizes;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--rounds" && i + 1 < argc)
      rounds = std::atoi(argv[++i]);
    else
      sizes.push_back(std::atol(argv[i]));
  }
  if (sizes.empty()) sizes = {16, 64, 256, 1024, 2048};

  std::printf("float64, median of %d rounds; ratio = Eigen baseline / saddlescape (automatic)\n\n",
              rounds);
  std::printf("| d | saddlescape | LAPACK backend | Eigen backend | Eigen baseline | ratio |\n");
  std::printf("|---|---|---|---|---|---|\n");
  for (const long d : sizes) {
    std::srand(static_cast<unsigned>(d));
    const matrix x = matrix::Random(d, 2 * d);
    const matrix g = x * x.transpose() / double(2 * d) + 0.05 * matrix::Identity(d, d);
    matrix a(d, d), b(d, d);

    saddlescape::eigen_root<double> automatic(d), lapack(d, saddlescape::eigen_backend::lapack),
        eigen(d, saddlescape::eigen_backend::eigen);
    Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> baseline_solver(d);
    const saddlescape::root_spec spec{};
    auto run = [&](saddlescape::eigen_root<double>& r) {
      return [&] {
        r.factor(g.data());
        r.matrix(spec, a.data());
      };
    };
    const std::vector<std::function<void()>> routes = {
        run(automatic), run(lapack), run(eigen), [&] {
          baseline_solver.compute(g);
          const Eigen::VectorXd f = baseline_solver.eigenvalues().array().rsqrt();
          b.noalias() = baseline_solver.eigenvectors() * f.asDiagonal() *
                        baseline_solver.eigenvectors().transpose();
        }};
    // Same answer first.
    for (const auto& fn : routes) fn();
    run(automatic)();
    const double err = (a - b).norm() / b.norm();
    if (!(err < 1e-8)) {
      std::fprintf(stderr, "routes disagree at d = %ld: relative error %g\n", d, err);
      return 1;
    }
    std::vector<int> calls;
    for (const auto& fn : routes)
      calls.push_back(std::max(1, int(0.05 / std::max(seconds_per_call(fn, 1), 1e-7))));
    std::vector<std::vector<double>> t(routes.size());
    for (int r = 0; r < rounds; ++r)
      for (std::size_t k = 0; k < routes.size(); ++k) {
        const std::size_t j = (k + r) % routes.size();
        t[j].push_back(seconds_per_call(routes[j], calls[j]));
      }
    std::vector<double> m;
    for (auto& v : t) m.push_back(median(v));
    std::printf("| %ld | %s | %s | %s | %s | %.2fx |\n", d, fmt(m[0]).c_str(), fmt(m[1]).c_str(),
                fmt(m[2]).c_str(), fmt(m[3]).c_str(), m[3] / m[0]);
    std::fflush(stdout);
  }
  return 0;
}
