// Uses the installed saddlescape through its public header only, and checks one answer that
// is known in closed form.
//
// G = [[5, 3], [3, 5]] has eigenvalues 8 and 2 with eigenvectors (1, 1)/sqrt(2) and
// (1, -1)/sqrt(2), so for any f applied to its spectrum
//   f(G) = (f(8) + f(2)) / 2 * I + (f(8) - f(2)) / 2 * [[0, 1], [1, 0]].
// With eps = 1 the paper's preconditioner (G + I)^(-1/2) has f(8) = 1/3, f(2) = 1/sqrt(3),
// and the Adam form (G^(1/2) + I)^(-1) has f(8) = 1/(2 sqrt(2) + 1), f(2) = 1/(sqrt(2) + 1).

#include <saddlescape/saddlescape.hpp>

#include <Eigen/Core>

#include <cmath>
#include <cstdio>
#include <exception>
#include <memory>

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

    if (worst > tol || !threw) {
      std::printf("FAILED (max error %.2e, tolerance %.0e, eps < 0 %s)\n", worst, tol,
                  threw ? "rejected" : "NOT rejected");
      return 1;
    }
    std::printf("OK: saddlescape %s found through find_package\n", SADDLESCAPE_FOUND_VERSION);
    return 0;
  } catch (const std::exception& e) {
    std::printf("FAILED with exception: %s\n", e.what());
    return 1;
  }
}
