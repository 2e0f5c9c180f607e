#pragma once
// f(diag(D) + Q Q^T) y for a diagonal D and a thin Q (d x k, k small), exactly to a relative
// tolerance, without an O(d^3) factorisation: the step of the lowrank solvers (rmsprop's full
// lowrank solver and every block of the block engine, in the eigenbasis of their last refresh).
//
// Both forms are Stieltjes functions, f(M) = int_0^inf rho(t) (M + t I)^(-1) dt:
//   inv_sqrt, f(M) = M^(-1/2) (the caller puts eps into D): rho(t) = 1 / (pi sqrt(t));
//   adam, f(M) = (M^(1/2) + eps I)^(-1):                     rho(t) = sqrt(t) / (pi (eps^2 + t)),
// the latter because 1 / (eps + sqrt(z)) is the reciprocal of a complete Bernstein function
// (its density is Im f(-t - i0) / pi). With t = e^(2s) each eigenvalue's integrand is analytic
// in the strip |Im s| < pi / 2 and decays exponentially in |s|, so the trapezoidal rule in s with
// step h errs by about 2 exp(-pi^2 / h) and cutting the tails at distance T beyond the spectrum
// [lo, hi] loses about 2 exp(-T) / pi; inv_sqrt first subtracts two functions with its
// asymptotes and known integrals, so that its tails fall like exp(-3T) (lowrank_nodes), which
// halves its nodes (bench/python/sweep_lowrank.py checks the error). Each node is a resolvent of diagonal plus rank k, solved by
// Woodbury: (E^(-1) + Q Q^T)^(-1) y = E y - E Q C^(-1) Q^T E y, C = I + Q^T E Q (k x k, SPD).
// Every node at once is three matrix products through BLAS (cost k^2 d N / 2 + 3 k d N for N
// nodes) plus N small Cholesky solves.

#include <saddlescape/matrix_functions.hpp>

#include "lapack.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace saddlescape::detail {

struct lowrank_workspace {
  std::vector<double> e, omega, sigma, p, pe, qy, r, cw, mk, c, rhs;
  static void fit(std::vector<double>& v, std::size_t n) {
    if (v.size() < n) v.resize(n);
  }
};

/// Nodes N of the quadrature for a spectrum inside [lo, hi] (lo > 0 for inv_sqrt).
///
/// inv_sqrt integrates F = f - g_lo - g_hi, where f(s) = (2/pi) e^s (M + e^(2s))^(-1) is the
/// integrand in s and
///   g_lo(s) = (2/pi) e^s M^(-1) / (1 + e^(2s) / lo)^2,
///   g_hi(s) = (2/pi) e^(-s) / (1 + (hi/2) e^(-2s))^2
/// share f's asymptotes below and above the spectrum, so that F decays like e^(-3|s|) instead
/// of f's e^(-|s|): the tails to keep shrink by 3x (about 2x fewer nodes). Their integrals are
/// known, int g_lo = (sqrt(lo) / 2) M^(-1) and int g_hi = 1 / (2 sqrt(hi / 2)), and their parts
/// on the nodes are scalar sums, so lowrank_apply adds the difference as one extra node at t = 0
/// (M^(-1) y) and a multiple of y. Per eigenvalue lambda in [lo, hi], relative to
/// lambda^(-1/2): F's tail below s0 = log(lo) / 2 - T is at most (4/pi) e^(-3T), above
/// s1 = log(hi) / 2 + T at most (2 / (3 pi)) e^(-3T); g's double poles on the strip's edges
/// cost the trapezoidal rule the factor pi^2 / h that the adam form's merging poles do.
inline index_t lowrank_nodes(double lo, double hi, root_form form, double eps, double tol,
                             double& s0, double& h) {
  constexpr double pi = 3.14159265358979323846;
  const double log_tol = std::log(tol);
  const double L = std::log(4.0) - log_tol;
  // exp(-pi^2 / h) is the error of simple poles on the strip's edges. The adam form's integrand
  // has two, at t = -lambda and t = -eps^2, which merge into a double pole as lambda -> eps^2;
  // that multiplies the error by about pi^2 / h (seen: 16x the tolerance at lambda = eps^2 = 1).
  // So x = pi^2 / h solves x - log(x) = L there (fixed point x = L + log x, 4 steps suffice);
  // the same for inv_sqrt's double poles of g_lo and g_hi.
  double x = L;
  for (int it = 0; it < 4; ++it) x = L + std::log(x);
  h = pi * pi / x;
  double tail = 0.0;
  if (form == root_form::adam) {  // below eps^2 the integrand's peak stays at log(eps)
    tail = std::log(2.0 / pi) - log_tol + 1.0;
    lo = std::max(lo, eps * eps);
    hi = std::max(hi, eps * eps);
  } else {  // (4/pi) e^(-3T) <= tol / 2, the larger of the two tails
    tail = (std::log(8.0 / pi) - log_tol) / 3.0;
  }
  s0 = 0.5 * std::log(lo) - tail;
  const double s1 = 0.5 * std::log(hi) + tail;
  return static_cast<index_t>(std::ceil((s1 - s0) / h)) + 1;
}

/// Whether lowrank_apply can meet `tol` for this D and Q. Woodbury subtracts two terms of size
/// E Q Q^T E y to leave one of size (D + Q Q^T + sigma)^(-1) y, so rounding is amplified by up
/// to max_j |Q_j|^2 / (D_j + sigma_min) (row j of Q against its diagonal entry): harmless for
/// the inv_sqrt form (D >= eps), but in the adam form a singular estimate (D_j = 0) that the
/// new gradients reach makes it unbounded. Callers then refactor instead.
inline bool lowrank_stable(const double* D, index_t d, const double* Q, index_t k, root_form form,
                           double eps, double tol) {
  if (k == 0) return true;
  double lo = std::numeric_limits<double>::infinity(), hi = 0.0;
  for (index_t j = 0; j < d; ++j) {
    lo = std::min(lo, D[j]);
    hi = std::max(hi, D[j]);
  }
  for (index_t i = 0; i < d * k; ++i) hi += Q[i] * Q[i];
  double s0 = 0.0, h = 0.0;
  lowrank_nodes(lo, hi, form, eps, tol, s0, h);
  // inv_sqrt solves at t = 0 too (its extra node M^(-1) y); there D >= eps > 0.
  const double sigma_min = form == root_form::inv_sqrt ? 0.0 : std::exp(2.0 * s0);
  double risk = 0.0;
  for (index_t j = 0; j < d; ++j) {
    double q2 = 0.0;
    for (index_t a = 0; a < k; ++a) q2 += Q[a * d + j] * Q[a * d + j];
    risk = std::max(risk, q2 / (D[j] + sigma_min));
  }
  return risk * std::numeric_limits<double>::epsilon() <= 0.01 * tol;
}

/// z = f(diag(D) + Q Q^T) y with Q column-major d x k (k >= 0). D >= 0 (inv_sqrt: D > 0, eps
/// already added). All entries finite; hi = max D + ||Q||_F^2 must be below about 1e250.
inline void lowrank_apply(const double* D, index_t d, const double* Q, index_t k, const double* y,
                          root_form form, double eps, double tol, double* z,
                          lowrank_workspace& w) {
  constexpr double pi = 3.14159265358979323846;
  double lo = std::numeric_limits<double>::infinity(), hi = 0.0;
  for (index_t j = 0; j < d; ++j) {
    lo = std::min(lo, D[j]);
    hi = std::max(hi, D[j]);
  }
  for (index_t i = 0; i < d * k; ++i) hi += Q[i] * Q[i];
  if (k == 0) {  // no gradients since the refresh: f is diagonal
    for (index_t j = 0; j < d; ++j)
      z[j] = y[j] * (form == root_form::adam ? 1.0 / (std::sqrt(D[j]) + eps) : 1.0 / std::sqrt(D[j]));
    return;
  }
  double s0 = 0.0, h = 0.0;
  const index_t steps = lowrank_nodes(lo, hi, form, eps, tol, s0, h);
  // inv_sqrt: one more node, at t = 0, carries g_lo's correction (see lowrank_nodes).
  const bool split = form == root_form::inv_sqrt;
  const index_t nodes = steps + (split ? 1 : 0);
  const auto dn = static_cast<std::size_t>(d * nodes);
  w.fit(w.e, dn);
  w.fit(w.omega, static_cast<std::size_t>(nodes));
  double* E = w.e.data();
  double* omega = w.omega.data();
  const double c_hi = 0.5 * hi;
  double sum_lo = 0.0, sum_hi = 0.0;  // g_lo's and g_hi's scalar factors on the nodes
  for (index_t m = 0; m < steps; ++m) {
    const double s = s0 + static_cast<double>(m) * h;
    const double sigma = std::exp(2.0 * s);
    omega[m] = form == root_form::adam ? (2.0 / pi) * h * std::exp(3.0 * s) / (eps * eps + sigma)
                                       : (2.0 / pi) * h * std::exp(s);
    if (split) {
      const double a = 1.0 + sigma / lo, b = 1.0 + c_hi / sigma;
      sum_lo += omega[m] / (a * a);
      sum_hi += (2.0 / pi) * h * std::exp(-s) / (b * b);
    }
    double* col = E + m * d;
    for (index_t j = 0; j < d; ++j) col[j] = 1.0 / (D[j] + sigma);
  }
  double alpha_hi = 0.0;
  if (split) {
    omega[steps] = 0.5 * std::sqrt(lo) - sum_lo;
    alpha_hi = 0.5 / std::sqrt(c_hi) - sum_hi;
    double* col = E + steps * d;
    for (index_t j = 0; j < d; ++j) col[j] = 1.0 / D[j];
  }
  const int n = static_cast<int>(d), nn = static_cast<int>(nodes), kk = static_cast<int>(k);
  // Without the low-rank part z = (E omega) .* y.
  lapack::gemm('N', 'N', n, 1, nn, 1.0, E, n, omega, nn, 0.0, z, n);
  for (index_t j = 0; j < d; ++j) z[j] = (z[j] + alpha_hi) * y[j];

  // C_m = I + Q^T E_m Q for every node from one product: column pair(a, b) of P is
  // Q_a .* Q_b (a <= b), and column m of P^T E holds C_m's entries. Likewise Q^T E_m y is
  // column m of (Q .* y)^T E.
  const index_t pairs = k * (k + 1) / 2;
  w.fit(w.p, static_cast<std::size_t>(d * pairs));
  w.fit(w.pe, static_cast<std::size_t>(pairs * nodes));
  w.fit(w.qy, static_cast<std::size_t>(d * k));
  w.fit(w.r, static_cast<std::size_t>(k * nodes));
  w.fit(w.cw, static_cast<std::size_t>(nodes * k));
  w.fit(w.mk, static_cast<std::size_t>(d * k));
  w.fit(w.c, static_cast<std::size_t>(k * k));
  w.fit(w.rhs, static_cast<std::size_t>(k));
  double* P = w.p.data();
  index_t col = 0;
  for (index_t a = 0; a < k; ++a)
    for (index_t b = a; b < k; ++b, ++col) {
      const double* qa = Q + a * d;
      const double* qb = Q + b * d;
      double* pc = P + col * d;
      for (index_t j = 0; j < d; ++j) pc[j] = qa[j] * qb[j];
    }
  for (index_t a = 0; a < k; ++a)
    for (index_t j = 0; j < d; ++j) w.qy[a * d + j] = Q[a * d + j] * y[j];
  const int np = static_cast<int>(pairs);
  lapack::gemm('T', 'N', np, nn, n, 1.0, P, n, E, n, 0.0, w.pe.data(), np);
  lapack::gemm('T', 'N', kk, nn, n, 1.0, w.qy.data(), n, E, n, 0.0, w.r.data(), kk);
  double* C = w.c.data();
  double* x = w.rhs.data();
  for (index_t m = 0; m < nodes; ++m) {
    const double* pe = w.pe.data() + m * pairs;
    index_t at = 0;
    for (index_t a = 0; a < k; ++a)
      for (index_t b = a; b < k; ++b, ++at) C[b * k + a] = pe[at] + (a == b ? 1.0 : 0.0);
    // Cholesky of C (lower, C[i * k + j] for i >= j); C >= I, so every pivot is >= 1.
    for (index_t j = 0; j < k; ++j) {
      double diag = C[j * k + j];
      for (index_t l = 0; l < j; ++l) diag -= C[j * k + l] * C[j * k + l];
      // Every pivot of I + (positive semidefinite) is >= 1 in exact arithmetic; a smaller one is
      // rounding, which happens when Q^T E Q is huge and rank-deficient (adam form, a singular
      // estimate and k > rank, at the smallest nodes). Clamping keeps the solve finite; the
      // directions it then gets wrong lie in Q's null space, which the correction E Q c drops.
      diag = std::sqrt(std::max(diag, 1.0));
      C[j * k + j] = diag;
      for (index_t i = j + 1; i < k; ++i) {
        double v = C[i * k + j];
        for (index_t l = 0; l < j; ++l) v -= C[i * k + l] * C[j * k + l];
        C[i * k + j] = v / diag;
      }
    }
    const double* rm = w.r.data() + m * k;
    for (index_t i = 0; i < k; ++i) {  // L x = r
      double v = rm[i];
      for (index_t l = 0; l < i; ++l) v -= C[i * k + l] * x[l];
      x[i] = v / C[i * k + i];
    }
    for (index_t i = k - 1; i >= 0; --i) {  // L^T c = x
      double v = x[i];
      for (index_t l = i + 1; l < k; ++l) v -= C[l * k + i] * x[l];
      x[i] = v / C[i * k + i];
    }
    for (index_t a = 0; a < k; ++a) w.cw[a * nodes + m] = omega[m] * x[a];
  }
  // The corrections sum to sum_a Q_a .* (E (omega .* c_a)).
  lapack::gemm('N', 'N', n, kk, nn, 1.0, E, n, w.cw.data(), nn, 0.0, w.mk.data(), n);
  for (index_t a = 0; a < k; ++a) {
    const double* qa = Q + a * d;
    const double* ma = w.mk.data() + a * d;
    for (index_t j = 0; j < d; ++j) z[j] -= qa[j] * ma[j];
  }
}

}  // namespace saddlescape::detail
