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
// halves its nodes (bench/python/sweep_lowrank.py checks the error). Each node is a resolvent
// of diagonal plus rank k, solved by Woodbury:
//   (E^(-1) + Q Q^T)^(-1) y = E y - E Q C^(-1) Q^T E y, C = I + Q^T E Q (k x k, SPD);
// the adam form's exact zeros of D are split off first (lowrank_apply).
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
  std::vector<double> e, omega, sigma, p, pe, qy, r, cw, mk, c, rhs, g, s, a;
  // The adam form's split of a singular D (lowrank_apply): range and null parts, reflectors.
  std::vector<double> dr, qr, yr, zr, qn, yn, zn, tau, rb, work;
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

/// y <- (I - tau v v^T) y for a reflector v of length len with v_0 = 1 (v[0] itself unread).
inline void reflect(const double* v, index_t len, double tau, double* y) {
  double s = y[0];
  for (index_t i = 1; i < len; ++i) s += v[i] * y[i];
  s *= tau;
  y[0] -= s;
  for (index_t i = 1; i < len; ++i) y[i] -= s * v[i];
}

/// Householder QR of the column-major p x k matrix C (in place, LAPACK's layout: R on and above
/// the diagonal of its first min(p, k) rows, the reflectors' v below it with v_0 = 1), tau of
/// min(p, k) entries: H_0 ... H_(min-1) [R; 0] = C with H_j = I - tau_j v_j v_j^T.
inline void householder_qr(double* C, index_t p, index_t k, double* tau) {
  for (index_t j = 0; j < std::min(p, k); ++j) {
    double* x = C + j * p + j;
    const index_t len = p - j;
    double sigma = 0.0;
    for (index_t i = 1; i < len; ++i) sigma += x[i] * x[i];
    double t = 0.0;
    if (sigma > 0.0) {
      const double mu = std::sqrt(x[0] * x[0] + sigma);
      // The sign choice that avoids cancellation: H x = mu e_1 either way.
      const double v0 = x[0] <= 0.0 ? x[0] - mu : -sigma / (x[0] + mu);
      t = 2.0 * v0 * v0 / (sigma + v0 * v0);
      for (index_t i = 1; i < len; ++i) x[i] /= v0;
      x[0] = mu;
      for (index_t a = j + 1; a < k; ++a) reflect(x, len, t, C + a * p + j);  // the columns right
    }
    tau[j] = t;
  }
}

/// y <- H_j y for the reflectors of householder_qr, j descending (H y) or ascending (H^T y).
inline void householder_apply(const double* C, index_t p, index_t kp, const double* tau,
                              bool transpose, double* y) {
  for (index_t step = 0; step < kp; ++step) {
    const index_t j = transpose ? step : kp - 1 - step;
    reflect(C + j * p + j, p - j, tau[j], y + j);
  }
}

/// Cholesky factor, in place, of the row-major SPD k x k matrix A read from its lower triangle
/// (A[i * k + j], i >= j), each pivot clamped to at least `floor` (a known lower bound of A's
/// eigenvalues, below which a pivot is rounding).
inline void cholesky_lower(double* A, index_t k, double floor) {
  for (index_t j = 0; j < k; ++j) {
    double diag = A[j * k + j];
    for (index_t l = 0; l < j; ++l) diag -= A[j * k + l] * A[j * k + l];
    diag = std::sqrt(std::max(diag, floor));
    A[j * k + j] = diag;
    for (index_t i = j + 1; i < k; ++i) {
      double v = A[i * k + j];
      for (index_t l = 0; l < j; ++l) v -= A[i * k + l] * A[j * k + l];
      A[i * k + j] = v / diag;
    }
  }
}

/// v <- (L L^T)^(-1) v for the factor L of cholesky_lower.
inline void cholesky_solve(const double* L, index_t k, double* v) {
  for (index_t i = 0; i < k; ++i) {
    for (index_t l = 0; l < i; ++l) v[i] -= L[i * k + l] * v[l];
    v[i] /= L[i * k + i];
  }
  for (index_t i = k - 1; i >= 0; --i) {
    for (index_t l = i + 1; l < k; ++l) v[i] -= L[l * k + i] * v[l];
    v[i] /= L[i * k + i];
  }
}

/// The quadrature of lowrank_apply on diag(D) + Q Q^T (d x d, D > 0 unless d = 0), optionally
/// bordered by kp more coordinates on which the diagonal is zero and the low-rank factor is
/// R (kp x k, row-major): M = [[R R^T, R Q^T], [Q R^T, D + Q Q^T]], y = [yk; y], z = [zk; z].
/// Each node's resolvent then eliminates the border through its Schur complement
/// S = R (I + C)^(-1) R^T + t I, C = Q^T (D + t)^(-1) Q: no division by the zero diagonal.
inline void lowrank_core(const double* D, index_t d, const double* Q, index_t k, const double* y,
                         root_form form, double eps, double tol, double* z,
                         lowrank_workspace& w, const double* R = nullptr, index_t kp = 0,
                         const double* yk = nullptr, double* zk = nullptr) {
  constexpr double pi = 3.14159265358979323846;
  double lo = d > 0 ? std::numeric_limits<double>::infinity() : 0.0, hi = 0.0;
  for (index_t j = 0; j < d; ++j) {
    lo = std::min(lo, D[j]);
    hi = std::max(hi, D[j]);
  }
  for (index_t i = 0; i < d * k; ++i) hi += Q[i] * Q[i];
  for (index_t i = 0; i < kp * k; ++i) hi += R[i] * R[i];
  if (kp > 0) lo = 0.0;
  if (k == 0) {  // no gradients since the refresh: f is diagonal
    for (index_t j = 0; j < d; ++j)
      z[j] = y[j] *
             (form == root_form::adam ? 1.0 / (std::sqrt(D[j]) + eps) : 1.0 / std::sqrt(D[j]));
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
  // Leading dimensions of 1 where d = 0 (a border alone), which BLAS requires.
  const int n = static_cast<int>(d), ld = std::max(n, 1), nn = static_cast<int>(nodes),
            kk = static_cast<int>(k);
  // Without the low-rank part z = (E omega) .* y.
  lapack::gemm('N', 'N', n, 1, nn, 1.0, E, ld, omega, nn, 0.0, z, ld);
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
  w.fit(w.g, static_cast<std::size_t>(k * kp));
  w.fit(w.s, static_cast<std::size_t>(kp * kp));
  w.fit(w.a, static_cast<std::size_t>(kp));
  if (kp > 0) std::fill(zk, zk + kp, 0.0);
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
  lapack::gemm('T', 'N', np, nn, n, 1.0, P, ld, E, ld, 0.0, w.pe.data(), np);
  lapack::gemm('T', 'N', kk, nn, n, 1.0, w.qy.data(), ld, E, ld, 0.0, w.r.data(), kk);
  double* C = w.c.data();
  double* x = w.rhs.data();
  for (index_t m = 0; m < nodes; ++m) {
    const double* pe = w.pe.data() + m * pairs;
    index_t at = 0;
    for (index_t a = 0; a < k; ++a)
      for (index_t b = a; b < k; ++b, ++at) C[b * k + a] = pe[at] + (a == b ? 1.0 : 0.0);
    // Every pivot of I + (positive semidefinite) is >= 1 in exact arithmetic; a smaller one is
    // rounding, which happens when Q^T E Q is huge and rank-deficient (adam form, a singular
    // estimate and k > rank, at the smallest nodes). Clamping keeps the solve finite; the
    // directions it then gets wrong lie in Q's null space, which the correction E Q c drops.
    cholesky_lower(C, k, 1.0);
    const double* rm = w.r.data() + m * k;
    for (index_t i = 0; i < k; ++i) x[i] = rm[i];
    cholesky_solve(C, k, x);  // x = (I + C)^(-1) r
    if (kp > 0) {
      // With the border: the Schur complement S = R G + t I, G = (I + C)^(-1) R^T, gives the
      // border's a = S^(-1) (yk - R x), and the rest's correction weights become x + G a.
      const double t = std::exp(2.0 * (s0 + static_cast<double>(m) * h));
      double* G = w.g.data();
      double* S = w.s.data();
      double* a = w.a.data();
      for (index_t b = 0; b < kp; ++b) {
        for (index_t i = 0; i < k; ++i) G[b * k + i] = R[b * k + i];
        cholesky_solve(C, k, G + b * k);
      }
      for (index_t b = 0; b < kp; ++b) {
        for (index_t c = 0; c <= b; ++c) {
          double v = b == c ? t : 0.0;
          for (index_t i = 0; i < k; ++i) v += R[b * k + i] * G[c * k + i];
          S[b * kp + c] = v;
        }
        double v = yk[b];
        for (index_t i = 0; i < k; ++i) v -= R[b * k + i] * x[i];
        a[b] = v;
      }
      cholesky_lower(S, kp, t);  // S >= t I exactly: smaller pivots are rounding
      cholesky_solve(S, kp, a);
      for (index_t b = 0; b < kp; ++b) {
        zk[b] += omega[m] * a[b];
        for (index_t i = 0; i < k; ++i) x[i] += G[b * k + i] * a[b];
      }
    }
    for (index_t a = 0; a < k; ++a) w.cw[a * nodes + m] = omega[m] * x[a];
  }
  // The corrections sum to sum_a Q_a .* (E (omega .* c_a)).
  lapack::gemm('N', 'N', n, kk, nn, 1.0, E, ld, w.cw.data(), nn, 0.0, w.mk.data(), ld);
  for (index_t a = 0; a < k; ++a) {
    const double* qa = Q + a * d;
    const double* ma = w.mk.data() + a * d;
    for (index_t j = 0; j < d; ++j) z[j] -= qa[j] * ma[j];
  }
}

/// Gathers the rows of Q (column-major d x k) where D is zero into w.qn (p x k) and the others
/// into w.qr, and D's nonzero entries into w.dr; returns p.
inline index_t lowrank_split(const double* D, index_t d, const double* Q, index_t k,
                             lowrank_workspace& w) {
  index_t p = 0;
  for (index_t j = 0; j < d; ++j) p += D[j] == 0.0 ? 1 : 0;
  const index_t r = d - p;
  lowrank_workspace::fit(w.dr, std::size_t(r));
  lowrank_workspace::fit(w.qr, std::size_t(r * k));
  lowrank_workspace::fit(w.qn, std::size_t(p * k));
  lowrank_workspace::fit(w.tau, std::size_t(std::min(k, p)));
  lowrank_workspace::fit(w.rb, std::size_t(std::min(k, p) * k));
  index_t ir = 0, in = 0;
  for (index_t j = 0; j < d; ++j) {
    if (D[j] == 0.0) {
      for (index_t a = 0; a < k; ++a) w.qn[a * p + in] = Q[a * d + j];
      ++in;
    } else {
      for (index_t a = 0; a < k; ++a) w.qr[a * r + ir] = Q[a * d + j];
      w.dr[ir++] = D[j];
    }
  }
  return p;
}

/// Whether lowrank_apply can meet `tol` for this D and Q. Woodbury subtracts two terms of size
/// E Q Q^T E y to leave one of size (D + Q Q^T + sigma)^(-1) y, so rounding is amplified by up
/// to max_j |Q_j|^2 / (D_j + sigma_min) (row j of Q against its diagonal entry): harmless for
/// the inv_sqrt form (D >= eps). In the adam form the exact zeros of a singular estimate are
/// split off (lowrank_apply): their Schur complement S = R (I + C)^(-1) R^T + t I is formed to
/// about u ||R||^2 absolutely, against its smallest eigenvalue of at least
/// sigma_min(R)^2 / (1 + tr C), so the amplification there is ||R||^2 (1 + tr C) /
/// sigma_min(R)^2 (infinite when new gradients reach the null space in fewer directions than
/// there are of them). A border with ||R||_F^2 <= null_floor is rounding (the new gradients
/// miss the null space): lowrank_apply drops it. A tiny nonzero D_j, or an ill-conditioned
/// border, makes the update unstable; callers then refactor instead.
inline bool lowrank_stable(const double* D, index_t d, const double* Q, index_t k, root_form form,
                           double eps, double tol, double null_floor, lowrank_workspace& w) {
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
  const double limit = 0.01 * tol / std::numeric_limits<double>::epsilon();
  double risk = 0.0, trace_c = 0.0;
  for (index_t j = 0; j < d; ++j) {
    if (form == root_form::adam && D[j] == 0.0) continue;  // the border, below
    double q2 = 0.0;
    for (index_t a = 0; a < k; ++a) q2 += Q[a * d + j] * Q[a * d + j];
    risk = std::max(risk, q2 / (D[j] + sigma_min));
    trace_c += q2 / (D[j] + sigma_min);
  }
  if (risk > limit) return false;
  if (form != root_form::adam) return true;
  const index_t p = lowrank_split(D, d, Q, k, w);
  if (p == 0) return true;
  const index_t kp = std::min(k, p);
  householder_qr(w.qn.data(), p, k, w.tau.data());
  // R R^T (kp x kp, lower) and its smallest eigenvalue.
  lowrank_workspace::fit(w.s, std::size_t(kp * kp));
  double norm2 = 0.0;
  for (index_t b = 0; b < kp; ++b)
    for (index_t c = 0; c <= b; ++c) {
      double v = 0.0;
      for (index_t a = b; a < k; ++a) v += w.qn[a * p + b] * w.qn[a * p + c];
      w.s[b + c * kp] = v;
      if (b == c) norm2 += v;
    }
  if (norm2 <= null_floor) return true;  // they miss the null space, to rounding
  lowrank_workspace::fit(w.a, std::size_t(kp));
  lowrank_workspace::fit(w.work, std::size_t(2 * kp + 1));
  int iwork = 0;
  if (lapack::syevd('N', static_cast<int>(kp), w.s.data(), w.a.data(), w.work.data(),
                    static_cast<int>(2 * kp + 1), &iwork, 1) != 0)
    return false;
  return w.a[0] > 0.0 && norm2 * (1.0 + trace_c) / w.a[0] <= limit;
}

/// z = f(diag(D) + Q Q^T) y with Q column-major d x k (k >= 0). D >= 0 (inv_sqrt: D > 0, eps
/// already added). All entries finite; hi = max D + ||Q||_F^2 must be below about 1e250.
///
/// The adam form's D may be singular (an estimate of low rank). Woodbury would divide by the
/// nodes' t there, and lose the direction to rounding where Q reaches those coordinates, so
/// they are split off exactly: Householder reflectors H turn Q's null rows into [R; 0]; on the
/// last p - min(k, p) coordinates of H's basis M is zero, so f = 1 / eps there, and the first
/// min(k, p) border the rest (lowrank_core's Schur complement). Then the only division is by
/// D's nonzero entries, and lowrank_stable need weigh only those. null_floor: a border with
/// ||R||_F^2 at most this is rounding (the gradients' null components as the caller's precision
/// resolves them), dropped as a dense eigensolver zeroes eigenvalues below its rounding.
inline void lowrank_apply(const double* D, index_t d, const double* Q, index_t k, const double* y,
                          root_form form, double eps, double tol, double null_floor, double* z,
                          lowrank_workspace& w) {
  if (form != root_form::adam || k == 0 || std::find(D, D + d, 0.0) == D + d) {
    lowrank_core(D, d, Q, k, y, form, eps, tol, z, w);
    return;
  }
  const index_t p = lowrank_split(D, d, Q, k, w);
  const index_t r = d - p;
  index_t kp = std::min(k, p);
  lowrank_workspace::fit(w.yr, std::size_t(r));
  lowrank_workspace::fit(w.zr, std::size_t(r));
  lowrank_workspace::fit(w.yn, std::size_t(p));
  lowrank_workspace::fit(w.zn, std::size_t(p));
  index_t ir = 0, in = 0;
  for (index_t j = 0; j < d; ++j) {
    if (D[j] == 0.0)
      w.yn[in++] = y[j];
    else
      w.yr[ir++] = y[j];
  }
  householder_qr(w.qn.data(), p, k, w.tau.data());
  double norm2 = 0.0;
  for (index_t b = 0; b < kp; ++b)  // R, row-major
    for (index_t a = 0; a < k; ++a) {
      w.rb[b * k + a] = a >= b ? w.qn[a * p + b] : 0.0;
      norm2 += w.rb[b * k + a] * w.rb[b * k + a];
    }
  if (norm2 <= null_floor) kp = 0;  // Q reaches the null space only by rounding: no border
  householder_apply(w.qn.data(), p, kp, w.tau.data(), true, w.yn.data());
  lowrank_core(w.dr.data(), r, w.qr.data(), k, w.yr.data(), form, eps, tol, w.zr.data(), w,
               w.rb.data(), kp, w.yn.data(), w.zn.data());
  for (index_t i = kp; i < p; ++i) w.zn[i] = w.yn[i] / eps;
  householder_apply(w.qn.data(), p, kp, w.tau.data(), false, w.zn.data());
  ir = 0;
  in = 0;
  for (index_t j = 0; j < d; ++j) z[j] = D[j] == 0.0 ? w.zn[in++] : w.zr[ir++];
}

}  // namespace saddlescape::detail
