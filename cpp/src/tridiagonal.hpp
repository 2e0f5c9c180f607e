#pragma once
// f(G) v for one vector v without the eigenvectors of G, for the exact per-step direction of
// full-matrix RMSProp. With G = Q T Q^T (Householder tridiagonalisation) and T = Z L Z^T:
//   f(G) v = Q Z f(L) Z^T Q^T v.
// An eigendecomposition of G (syevd) spends over half its time forming Q Z, a d x d x d
// product; here Q is only ever applied to one vector (O(d^2)), and Z, the eigenvectors of the
// tridiagonal T, comes from divide and conquer. The result equals V f(L) V^T v to rounding.

#include <saddlescape/errors.hpp>
#include <saddlescape/matrix_functions.hpp>

#include "lapack.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace saddlescape::detail {

class tridiagonal_apply {
 public:
  explicit tridiagonal_apply(index_t dim) : n_(static_cast<int>(dim)) {
    const auto n = static_cast<std::size_t>(dim);
    a_.resize(n * n);
    z_.resize(n * n);
    d_.resize(n);
    e_.resize(n);
    tau_.resize(n);
    y_.resize(n);
    w_.resize(n);
    // Workspace queries (lwork = -1) for the three routines; the largest answer is kept.
    double q = 0;
    int iq = 0;
    lapack::sytrd_lower(n_, a_.data(), d_.data(), e_.data(), tau_.data(), &q, -1);
    std::size_t lwork = static_cast<std::size_t>(q);
    lapack::ormtr_left_lower('T', n_, 1, a_.data(), tau_.data(), y_.data(), &q, -1);
    lwork = std::max(lwork, static_cast<std::size_t>(q));
    lapack::stedc_vectors(n_, d_.data(), e_.data(), z_.data(), &q, -1, &iq, -1);
    lwork = std::max(lwork, static_cast<std::size_t>(q));
    work_.resize(lwork + 1);
    iwork_.resize(static_cast<std::size_t>(iq) + 1);
  }

  /// The d x d buffer (column-major) the caller fills with G before apply(); only the lower
  /// triangle is read.
  double* matrix() noexcept { return a_.data(); }

  /// out = f(G) v with f of spec, G as left in matrix() (which apply() overwrites).
  void apply(const root_spec& spec, const double* v, double* out, const char* what) {
    const int n = n_;
    const int lwork = static_cast<int>(work_.size()), liwork = static_cast<int>(iwork_.size());
    // Scale G into [rmin, rmax] first, as LAPACK's syevd does: sytrd's norms would overflow
    // for entries near 1e154 and lose accuracy below 1e-146. f is applied to the unscaled
    // eigenvalues, which may then round to 0 or Inf (f(Inf) = 0), never to NaN.
    const std::size_t nn = a_.size();
    double anrm = 0.0;
    for (std::size_t i = 0; i < nn; ++i) anrm = std::max(anrm, std::abs(a_[i]));
    const double small = std::numeric_limits<double>::min() / std::numeric_limits<double>::epsilon();
    const double rmin = std::sqrt(small), rmax = std::sqrt(1.0 / small);
    double sigma = 1.0;
    if (anrm > 0.0 && anrm < rmin) sigma = rmin / anrm;
    if (anrm > rmax) sigma = rmax / anrm;
    if (sigma != 1.0)
      for (std::size_t i = 0; i < nn; ++i) a_[i] *= sigma;
    int info = lapack::sytrd_lower(n, a_.data(), d_.data(), e_.data(), tau_.data(),
                                   work_.data(), lwork);
    if (info != 0) SADDLESCAPE_NUMERICAL_FAIL("LAPACK sytrd failed for ", what, ", info = ", info);
    std::copy(v, v + n, y_.data());
    lapack::ormtr_left_lower('T', n, 1, a_.data(), tau_.data(), y_.data(), work_.data(), lwork);
    info = lapack::stedc_vectors(n, d_.data(), e_.data(), z_.data(), work_.data(), lwork,
                                 iwork_.data(), liwork);
    if (info != 0)
      SADDLESCAPE_NUMERICAL_FAIL("the eigensolver (LAPACK stedc) did not converge for ", what,
                                 " (info = ", info, ")");
    // The same rounding rule as eigen_root: eigenvalues within d u max|lambda| of zero are zero.
    for (auto& l : d_) l /= sigma;
    const double lo = d_.front(), hi = d_.back();
    if (std::isnan(lo) || std::isnan(hi))
      SADDLESCAPE_NUMERICAL_FAIL("the eigenvalues of ", what, " are not numbers");
    const double tol = clip_tolerance<double>(n) * std::max(std::abs(lo), std::abs(hi));
    if (lo < -tol)
      throw invalid_argument(concat(what, " is not positive semidefinite: it has the eigenvalue ",
                                    lo, ", below the rounding tolerance -", tol));
    lapack::gemv('T', n, n, 1.0, z_.data(), n, y_.data(), 0.0, w_.data());
    for (int i = 0; i < n; ++i) {
      const double l = d_[static_cast<std::size_t>(i)] <= tol ? 0.0 : d_[static_cast<std::size_t>(i)];
      if (spec.eps == 0.0 && l == 0.0)
        SADDLESCAPE_NUMERICAL_FAIL(what, " is singular and eps = 0; pass eps > 0");
      w_[static_cast<std::size_t>(i)] *= spec.form == root_form::adam
                                             ? 1.0 / (std::sqrt(l) + spec.eps)
                                             : 1.0 / std::sqrt(l + spec.eps);
    }
    lapack::gemv('N', n, n, 1.0, z_.data(), n, w_.data(), 0.0, out);
    lapack::ormtr_left_lower('N', n, 1, a_.data(), tau_.data(), out, work_.data(), lwork);
  }

 private:
  int n_;
  std::vector<double> a_, z_, d_, e_, tau_, y_, w_, work_;
  std::vector<int> iwork_;
};

}  // namespace saddlescape::detail
