// Uses the installed saddlescape through its public header only, and checks one answer that
// is known in closed form.
//
// G = [[5, 3], [3, 5]] has eigenvalues 8 and 2 with eigenvectors (1, 1)/sqrt(2) and
// (1, -1)/sqrt(2), so for any f applied to its spectrum
//   f(G) = (f(8) + f(2)) / 2 * I + (f(8) - f(2)) / 2 * [[0, 1], [1, 0]].
// With eps = 1 the paper's preconditioner (G + I)^(-1/2) has f(8) = 1/3, f(2) = 1/sqrt(3),
// and the Adam form (G^(1/2) + I)^(-1) has f(8) = 1/(2 sqrt(2) + 1), f(2) = 1/(sqrt(2) + 1).
//
// It also runs the native loop once: diagonal RMSProp on the paper's saddle problem (Sec. 6),
// h = (1, -0.1), noise variances (1, 0.01), from the saddle point 0. The minima are at
// x = (0, +-0.01^(1/8)) with F = -0.05 * 0.1 + 0.1^(5/4) = -0.0126; escaping the saddle and
// settling near a minimum brings F below -0.01.

#include <saddlescape/saddlescape.hpp>

#include <Eigen/Core>

#include <cmath>
#include <cstdio>
#include <exception>
#include <memory>
#include <string>

#ifndef SADDLESCAPE_FOUND_VERSION
#define SADDLESCAPE_FOUND_VERSION "(unknown version)"
#endif

namespace {

using matrix = Eigen::Matrix<double, 2, 2>;

matrix from_spectrum(double f8, double f2) {
  matrix a;
  a << (f8 + f2) / 2, (f8 - f2) / 2, (f8 - f2) / 2, (f8 + f2) / 2;
  return a;
}

// Returns the largest entrywise error and prints it.
double report(const char* name, const saddlescape::row_matrix<double>& got, const matrix& want) {
  const double err = (got - want).cwiseAbs().maxCoeff();
  std::printf("%-28s [[%.12f, %.12f], [%.12f, %.12f]]  max error %.2e\n", name, got(0, 0),
              got(0, 1), got(1, 0), got(1, 1), err);
  return err;
}

}  // namespace

int main() {
  try {
    matrix g;
    g << 5, 3, 3, 5;
    const double eps = 1.0;
    const double s2 = std::sqrt(2.0), s3 = std::sqrt(3.0);

    // Well-conditioned 2 x 2 in double: a few ulps are all the eigensolver may lose.
    const double tol = 1e-13;
    double worst = 0.0;
    worst = std::fmax(worst, report("inv_sqrt(G, 1)", saddlescape::inv_sqrt(g, eps),
                                    from_spectrum(1.0 / 3.0, 1.0 / s3)));
    worst = std::fmax(worst, report("inv_sqrt(G, 1, adam)",
                                    saddlescape::inv_sqrt(g, eps, saddlescape::root_form::adam),
                                    from_spectrum(1.0 / (2 * s2 + 1), 1.0 / (s2 + 1))));
    worst = std::fmax(worst, report("inv_sqrt(G, 0, newton)",
                                    saddlescape::inv_sqrt(g, 0.0, saddlescape::root_form::inv_sqrt,
                                                          saddlescape::root_method::newton),
                                    from_spectrum(1.0 / (2 * s2), 1.0 / s2)));

    // The classes, created and destroyed here: their layout must not depend on the flags this
    // file is compiled with (app_native uses -march=native, the library does not).
    {
      saddlescape::eigen_root<double> root(2);
      const saddlescape::row_matrix<double> gr = g;
      root.factor(gr.data());
      saddlescape::row_matrix<double> a(2, 2);
      root.matrix({2, eps, saddlescape::root_form::inv_sqrt}, a.data());
      worst = std::fmax(worst, report("eigen_root::matrix(G, 1)", a,
                                      from_spectrum(1.0 / 3.0, 1.0 / s3)));
      saddlescape::ema_estimator<double> est(
          2, std::make_shared<saddlescape::constant_schedule>(0.5));
      const double s1[] = {1.0, 1.0}, s2v[] = {1.0, -1.0};
      est.update(s1);
      est.update(s2v);
      saddlescape::row_matrix<double> e(2, 2);
      est.estimate(e.data());
      // G_2 = 0.5 * (0.5 * s1 s1^T) + 0.5 * s2 s2^T = [[0.75, -0.25], [-0.25, 0.75]]
      matrix want;
      want << 0.75, -0.25, -0.25, 0.75;
      worst = std::fmax(worst, report("ema_estimator::estimate", e, want));
    }

    // The typed errors are part of the interface too.
    bool threw = false;
    try {
      saddlescape::inv_sqrt(g, -1.0);
    } catch (const saddlescape::invalid_argument& e) {
      threw = true;
      std::printf("eps = -1 rejected: %s\n", e.what());
    }

    // A native run: saddle problem, diagonal RMSProp, 10000 steps from 0.
    const saddlescape::saddle_problem problem({1.0, -0.1}, {1.0, 0.01});
    const double lr = 0.001;
    saddlescape::rmsprop_options opts;
    opts.layout = saddlescape::structure::diag;
    saddlescape::rmsprop opt(problem.dim(), std::make_shared<saddlescape::constant_schedule>(lr),
                             std::make_shared<saddlescape::constant_schedule>(
                                 saddlescape::beta_from_lr(lr)),
                             opts);
    saddlescape::run_options run_opts;
    run_opts.steps = 10000;
    run_opts.record_every = 10000;
    run_opts.seed = 0;
    const double x0[] = {0.0, 0.0};
    const saddlescape::run_result run = saddlescape::run(problem, opt, x0, run_opts);
    const double f_final = run.f.empty() ? 0.0 : run.f.back();
    const bool escaped = run.status == saddlescape::run_status::completed && f_final < -0.01;
    std::printf("RMSProp on the saddle problem: %s after %lld steps, x = (%.4f, %.4f), "
                "f = %.6f (want < -0.01)\n",
                std::string(saddlescape::to_string(run.status)).c_str(),
                static_cast<long long>(opt.moves()), run.x_final[0], run.x_final[1], f_final);

    if (worst > tol || !threw || !escaped) {
      std::printf("FAILED (max error %.2e, tolerance %.0e, eps < 0 %s, final f %.6f)\n", worst,
                  tol, threw ? "rejected" : "NOT rejected", f_final);
      return 1;
    }
    std::printf("OK: saddlescape %s found through find_package\n", SADDLESCAPE_FOUND_VERSION);
    return 0;
  } catch (const std::exception& e) {
    std::printf("FAILED with exception: %s\n", e.what());
    return 1;
  }
}
