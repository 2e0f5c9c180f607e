#include <saddlescape/matrix_functions.hpp>

#include "checks.hpp"
#include "lapack.hpp"
#include "memory.hpp"
#include "multiversion.hpp"
#include "parallel.hpp"

#include <Eigen/Eigenvalues>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <exception>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace saddlescape {

namespace {

using detail::concat;

// Square tiles for the transposing passes: two 64 x 64 double tiles stay in L1/L2 while
// the column-side reads stride through memory.
constexpr index_t tile = 64;

template <class T>
bool finite(T x) {
  return std::isfinite(x);
}

// Locates the first non-finite or asymmetric entry for the error message. Only runs on the
// failure path, so it does not need to be fast.
template <class T>
[[noreturn]] void report_bad_matrix(const T* G, index_t d, std::string_view what, double scale) {
  for (index_t i = 0; i < d; ++i)
    for (index_t j = 0; j < d; ++j)
      if (!finite(G[i * d + j]))
        throw invalid_argument(concat(what, " has a non-finite entry ", what, "[", i, ", ", j,
                                      "] = ", G[i * d + j]));
  const double tol = symmetry_tolerance<T>() * scale;
  index_t bi = 0, bj = 0;
  double worst = -1.0;
  for (index_t i = 0; i < d; ++i)
    for (index_t j = 0; j < i; ++j) {
      const double gap = std::abs(static_cast<double>(G[i * d + j]) - G[j * d + i]);
      if (gap > worst) worst = gap, bi = i, bj = j;
    }
  throw invalid_argument(concat(what, " is not symmetric: |", what, "[", bi, ", ", bj, "] - ",
                                what, "[", bj, ", ", bi, "]| = ", worst, " exceeds ",
                                symmetry_tolerance<T>(), " * max|", what, "| = ", tol));
}

// One blocked pass over G: checks finiteness and symmetry and writes (G + G^T) / 2 into out.
// Returns max|G|.
template <class T>
double symmetrize_checked(const T* G, index_t d, std::string_view what, T* out) {
  double max_abs = 0.0, max_gap = 0.0;
  bool all_finite = true;
  for (index_t ib = 0; ib < d; ib += tile) {
    const index_t ie = std::min(ib + tile, d);
    for (index_t jb = 0; jb <= ib; jb += tile) {
      const index_t je = std::min(jb + tile, d);
      for (index_t i = ib; i < ie; ++i) {
        const index_t jend = (jb == ib) ? i + 1 : je;
        for (index_t j = jb; j < jend; ++j) {
          const T a = G[i * d + j], b = G[j * d + i];
          all_finite &= finite(a) & finite(b);
          const double aa = std::abs(static_cast<double>(a));
          max_abs = aa > max_abs ? aa : max_abs;
          const double gap = std::abs(static_cast<double>(a) - static_cast<double>(b));
          max_gap = gap > max_gap ? gap : max_gap;
          // Halves first: a + b may overflow. Equal halves are kept whole: halving a subnormal
          // would lose it.
          const T avg = a == b ? a : a * static_cast<T>(0.5) + b * static_cast<T>(0.5);
          out[i * d + j] = avg;
          out[j * d + i] = avg;
        }
      }
    }
  }
  if (!all_finite || max_gap > symmetry_tolerance<T>() * max_abs)
    report_bad_matrix(G, d, what, max_abs);
  return max_abs;
}

// Copies the lower triangle of the column-major symmetric A into its upper triangle.
template <class T>
void mirror_lower(T* A, index_t d) {
  for (index_t jb = 0; jb < d; jb += tile) {
    const index_t je = std::min(jb + tile, d);
    for (index_t ib = jb; ib < d; ib += tile) {
      const index_t ie = std::min(ib + tile, d);
      for (index_t j = jb; j < je; ++j)
        for (index_t i = std::max(ib, j + 1); i < ie; ++i) A[i * d + j] = A[j * d + i];
    }
  }
}

void check_dim(index_t d, std::string_view what) {
  SADDLESCAPE_EXPECTS(d >= 1, what, " must have dimension d >= 1, got d = ", d);
  SADDLESCAPE_EXPECTS(d <= detail::lapack::max_dim, what, " is too large for 32-bit LAPACK: d = ",
                      d);
}

std::string batch_name(index_t n, index_t i) {
  return n == 1 ? std::string("G") : concat("G[", i, "]");
}

// f(lambda) of root_spec, in double so that float32 input loses nothing extra here. lambda and
// eps are finite and >= 0, but their sum can overflow (both near 1e308) although f is a normal
// number; then both are halved first, f(lambda) = 2^(-1/p) ((lambda + eps) / 2)^(-1/p), rather
// than returning 1 / inf = 0.
double spectral_value(double lambda, const root_spec& spec) {
  if (spec.form == root_form::adam) {
    const double den = std::sqrt(lambda) + spec.eps;
    return std::isfinite(den) ? 1.0 / den : 0.5 / (0.5 * std::sqrt(lambda) + 0.5 * spec.eps);
  }
  double shifted = lambda + spec.eps, scale = 1.0;
  if (!std::isfinite(shifted)) {
    shifted = 0.5 * lambda + 0.5 * spec.eps;
    scale = spec.p == 2 ? 0.70710678118654752440 : std::pow(2.0, -1.0 / spec.p);
  }
  if (spec.p == 2) return scale / std::sqrt(shifted);
  return scale * std::pow(shifted, -1.0 / spec.p);
}

// Checks the eigenvalues of `what` (any order) as eigen_root::factor documents: finite, none
// clearly negative; those within rounding of zero, of either sign, become exactly zero. A
// rank-deficient G (fewer samples than d) computes null-space eigenvalues of +-1e-16 *
// lambda_max, and f would amplify that noise (the adam form's sqrt turns 1e-16 into 1e-8, as
// large as a typical eps). Returns max|lambda|.
template <class T>
double check_and_clip_spectrum(T* lambda, index_t d, std::string_view what) {
  T lo = lambda[0], hi = lambda[0];
  for (index_t i = 1; i < d; ++i) {
    lo = lambda[i] < lo ? lambda[i] : lo;
    hi = lambda[i] > hi ? lambda[i] : hi;
  }
  if (!std::isfinite(lo) || !std::isfinite(hi))
    SADDLESCAPE_NUMERICAL_FAIL("the eigenvalues of ", what, " are not finite (", double(lo), ", ",
                               double(hi), "): its entries are too large for ",
                               detail::type_name<T>());
  const double max_abs = std::max(std::abs(double(lo)), std::abs(double(hi)));
  const double tol = clip_tolerance<T>(d) * max_abs;
  if (lo < -tol)
    throw invalid_argument(concat(what, " is not positive semidefinite: it has the eigenvalue ",
                                  double(lo), ", below the rounding tolerance -", tol,
                                  " (d * machine epsilon * max|eigenvalue|)"));
  for (index_t i = 0; i < d; ++i)
    if (lambda[i] <= tol) lambda[i] = 0;
  return max_abs;
}

// weights[i] = f(lambda[i]) (lambda as left by check_and_clip_spectrum, any order), evaluated in
// double. Throws for a singular G with eps = 0 and for a weight that T cannot represent, naming
// the smallest such eigenvalue (f decreases, so it is the one that overflows first).
template <class T>
void spectral_weights(const T* lambda, index_t d, const root_spec& spec, double lambda_max_abs,
                      std::string_view what, T* weights) {
  T lo = lambda[0];
  for (index_t i = 1; i < d; ++i) lo = lambda[i] < lo ? lambda[i] : lo;
  if (spec.eps == 0.0 && !(lo > 0))
    SADDLESCAPE_NUMERICAL_FAIL(what, " is singular: its smallest eigenvalue is within rounding (",
                               clip_tolerance<T>(d) * lambda_max_abs,
                               ") of zero and eps = 0; pass eps > 0");
  bool ok = true;
  for (index_t i = 0; i < d; ++i) {
    weights[i] = static_cast<T>(spectral_value(static_cast<double>(lambda[i]), spec));
    ok &= finite(weights[i]);
  }
  if (ok) return;
  index_t bad = -1;
  for (index_t i = 0; i < d; ++i)
    if (!finite(weights[i]) && (bad < 0 || lambda[i] < lambda[bad])) bad = i;
  SADDLESCAPE_NUMERICAL_FAIL("the inverse root of ", what, " overflows: f(", lambda[bad], ") = ",
                             spectral_value(static_cast<double>(lambda[bad]), spec),
                             " is not representable; increase eps");
}

// ------------------------------------------------------------------------------------------
// Small matrices: an in-library eigensolver.
//
// Below d ~ 100 the per-call overhead and short scalar loops of LAPACK and Eigen dominate
// (syevd: 330 us at d = 64, where the arithmetic is 50 us; Eigen's SelfAdjointEigenSolver:
// 8 us at d = 16). Both solvers here run the classical algorithm: Householder
// tridiagonalisation, the explicit Q, and implicit QL with the shift of Numerical Recipes' tqli
// (EISPACK's tql2), on G scaled by a power of two to max|G| in [1/2, 1).
// - lockstep_eigen decomposes L matrices together, L = one 256-bit register of T: lane l of
//   every vector belongs to matrix l, and each step is one vector operation over the lanes.
//   Every loop vectorises whatever d is, and the latency chain of a QL sweep (a square root
//   and a division per rotation, which bounds a one-matrix solver at small d) is paid once per
//   L matrices. Each lane runs its own tqli (own deflation and split points); a lane with
//   nothing to do at a step sees the rotation (c, s) = (1, 0) and blends that keep its state.
// - solo_eigen decomposes one matrix, vectorised along its columns, for batches too small to
//   fill the lanes (a single G above all).
// The two perform the same floating-point operations on a matrix, in the same order (sums
// included), so a matrix's result does not depend on which solver ran it, on the other
// matrices of its batch, or on the thread count. eigen_root uses solo_eigen too (for d <=
// small_matrix_limit), so that eigen_root and the batch functions agree to the bit.
//
// Lockstep storage: element (i, j) of lane l at ((i * d + j) * L + l); vectors of length d at
// (i * L + l). The lanes are GCC/Clang vector types (no intrinsics), compiled for AVX2 and the
// baseline; without those compilers every matrix goes through eigen_root's LAPACK or Eigen.

#if defined(__GNUC__) || defined(__clang__)
#define SADDLESCAPE_LOCKSTEP 1
#endif

// x -> x 2^e in double, exactly (up to the rounding of a subnormal result, as ldexp): one
// multiplication when 2^e is a normal double, which it is unless G is within a factor 2^22 of
// the ends of double's range.
class pow2_scale {
 public:
  explicit pow2_scale(int e) : e_(e), f_(e > -1000 && e < 1000 ? std::ldexp(1.0, e) : 0.0) {}
  double operator()(double x) const { return f_ != 0.0 ? x * f_ : std::ldexp(x, e_); }

 private:
  int e_;
  double f_;
};

template <class T>
constexpr int lockstep_lanes = static_cast<int>(32 / sizeof(T));

// Largest d for which the batch functions use these solvers. Measured on an AMD EPYC (Zen 4),
// one thread, per matrix: d = 128 lockstep 0.66 ms (float) / 1.0 ms (double), solo 0.65 /
// 1.3 ms, syevd + syrk 1.0 / 1.5 ms; at d = 256 lockstep 4.3 / 8.4 ms against syevd 4.4 / 6.8.
#ifdef SADDLESCAPE_LOCKSTEP
constexpr index_t lockstep_limit = 128;
#else
constexpr index_t lockstep_limit = 0;
#endif

#ifdef SADDLESCAPE_LOCKSTEP

// The helpers below take and return 256-bit vectors by value; GCC notes that the baseline
// (non-AVX) ABI passes those differently. They are internal and always inlined: no ABI at all.
// (Not popped: GCC reports it at the end of the translation unit.)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

// One vector of L lanes (unaligned and may_alias, like the compilers' own __m256_u, so that it
// loads from any T*), its comparison mask, and the powers of two that bring a tiny 2-vector
// (or Householder column) into the range where its squared norm is neither subnormal nor zero:
// entries below `below` are scaled by `up`, which maps them to at least 2^-59 (float) or 2^-474
// (double) and leaves every entry below 2^50 or 2^300.
template <class T>
struct lanes;
template <>
struct lanes<float> {
  typedef float vec __attribute__((vector_size(32), aligned(4), may_alias));
  typedef std::int32_t mask __attribute__((vector_size(32), aligned(4), may_alias));
  static constexpr float below = 0x1p-40f, up = 0x1p90f, down = 0x1p-90f;
};
template <>
struct lanes<double> {
  typedef double vec __attribute__((vector_size(32), aligned(8), may_alias));
  typedef std::int64_t mask __attribute__((vector_size(32), aligned(8), may_alias));
  static constexpr double below = 0x1p-300, up = 0x1p600, down = 0x1p-600;
};

template <class T>
[[gnu::always_inline]] inline typename lanes<T>::vec& lane(T* p) {
  return *reinterpret_cast<typename lanes<T>::vec*>(p);
}

template <class V>
[[gnu::always_inline]] inline V vabs(V x) {
  return x < V{} ? -x : x;
}

template <class V>
[[gnu::always_inline]] inline V vmax(V x, V y) {
  return x < y ? y : x;
}

template <class V>
[[gnu::always_inline]] inline V vsqrt(V x) {
  V r;
  for (int l = 0; l < static_cast<int>(sizeof(V) / sizeof(x[0])); ++l) r[l] = std::sqrt(x[l]);
  return r;
}

// Decomposes the L symmetric matrices in a (lower triangles read, every entry of magnitude
// <= 1: the caller scales by a power of two) as Z diag(w) Z^T: eigenvalues, unsorted, in w;
// eigenvectors as the columns of z, column k at z + k * d * L. a is overwritten. Scratch e, tau,
// p, v of d * L entries. conv[l] = 1 where lane l's QL iteration converged, else 0.
template <class T>
SADDLESCAPE_MULTIVERSION void lockstep_eigen(index_t d, T* __restrict a, T* __restrict z,
                                             T* __restrict w, T* __restrict e,
                                             T* __restrict tau, T* __restrict p,
                                             T* __restrict v, T* __restrict conv) {
  using V = typename lanes<T>::vec;
  using M = typename lanes<T>::mask;
  constexpr int L = lockstep_lanes<T>;
  const index_t dl = d * L;
  const V zero = V{}, one = zero + T(1), two = zero + T(2);
  const V below = zero + lanes<T>::below, up = zero + lanes<T>::up,
          down = zero + lanes<T>::down, below2 = below * below;
  auto A = [a, d](index_t i, index_t j) -> V& { return lane(a + (i * d + j) * L); };
  auto at = [](T* base, index_t i) -> V& { return lane(base + i * L); };

  // 1. Q^T A Q = tridiag(w, e) by Householder reflections H_k = I - tau_k v v^T (v_(k+1) = 1)
  // on the lower triangle, as LAPACK's sytd2: p = tau A v, w = p - (tau / 2)(p^T v) v,
  // A <- A - v w^T - w v^T. The reflector vectors are kept in a's columns.
  for (index_t k = 0; k + 2 < d; ++k) {
    V mx = zero;
    for (index_t i = k + 1; i < d; ++i) mx = vmax(mx, vabs(A(i, k)));
    const M tiny = mx < below;
    const V sup = tiny ? up : one, sdown = tiny ? down : one;
    V xn = zero;
    for (index_t i = k + 2; i < d; ++i) {
      const V y = A(i, k) * sup;
      xn += y * y;
    }
    // beta = -sign(alpha) ||x|| on the scaled column; tau = (beta - alpha) / beta. A zero tail
    // needs no reflection (tau = 0, v = e_1); its lanes divide by one instead of zero.
    const V as = A(k + 1, k) * sup;
    const V nrm = vsqrt(as * as + xn);
    const V bs = as >= zero ? -nrm : nrm;
    const M none = xn == zero;
    at(e, k) = none ? A(k + 1, k) : bs * sdown;
    const V tk = none ? zero : (bs - as) / (none ? one : bs);
    const V sc = none ? zero : sup / (none ? one : as - bs);
    at(tau, k) = tk;
    A(k + 1, k) = one;
    at(v, k + 1) = one;
    for (index_t i = k + 2; i < d; ++i) {
      const V x = A(i, k) * sc;
      A(i, k) = x;
      at(v, i) = x;
    }
    // p = tau A22 v, p_i = sum_j a_ij v_j over j = k + 1 .. d - 1 in order (a_ij from the
    // lower triangle), the order solo_eigen's column sums have.
    for (index_t i = k + 1; i < d; ++i) {
      V acc = zero;
      for (index_t j = k + 1; j <= i; ++j) acc += A(i, j) * at(v, j);
      for (index_t j = i + 1; j < d; ++j) acc += A(j, i) * at(v, j);
      at(p, i) = acc;
    }
    V dot = zero;
    for (index_t i = k + 1; i < d; ++i) {
      at(p, i) *= tk;
      dot += at(p, i) * at(v, i);
    }
    dot *= (zero + T(-0.5)) * tk;
    for (index_t i = k + 1; i < d; ++i) at(p, i) += dot * at(v, i);
    for (index_t i = k + 1; i < d; ++i) {
      const V vi = at(v, i), pi = at(p, i);
      for (index_t j = k + 1; j <= i; ++j) A(i, j) -= vi * at(p, j) + pi * at(v, j);
    }
  }
  for (index_t i = 0; i < d; ++i) at(w, i) = A(i, i);
  if (d >= 2) at(e, d - 2) = A(d - 1, d - 2);
  at(e, d - 1) = zero;

  // 2. Q = H_0 H_1 ... H_(d-3), accumulated backwards (LAPACK's org2l order): each H_k touches
  // rows and columns k + 1 .. d - 1 only.
  for (index_t c = 0; c < d; ++c)
    for (index_t i = 0; i < d; ++i) lane(z + c * dl + i * L) = i == c ? one : zero;
  for (index_t k = d - 3; k >= 0; --k) {
    for (index_t i = k + 2; i < d; ++i) at(v, i) = A(i, k);
    at(v, k + 1) = one;
    const V tk = at(tau, k);
    for (index_t c = k + 1; c < d; ++c) {
      T* zc = z + c * dl;
      // Row i adds into partial sum i mod L, and the partial sums are added in order: the
      // order of solo_eigen's vector dot product.
      V part[L];
      for (int r = 0; r < L; ++r) part[r] = zero;
      for (index_t i = k + 1; i < d; ++i) part[i % L] += at(v, i) * at(zc, i);
      V dot = zero;
      for (int r = 0; r < L; ++r) dot += part[r];
      dot *= tk;
      for (index_t i = k + 1; i < d; ++i) at(zc, i) -= dot * at(v, i);
    }
  }

  // 3. Implicit QL with tqli's shift. The split test is Eigen's, |e_m| <= u (|w_m| +
  // |w_(m+1)|)^(1/2): with max|a| in [1/2, 1] that is u times the geometric mean of the local
  // and the global scale, so dropping e_m perturbs the matrix by u ||a|| at most (backward
  // stable) and near-zero eigenvalues by O(u^2). The floor |e_m| <= u^2 also deflates an
  // exactly zero diagonal pair.
  // Each lane runs its own tqli: its own deflation point lo and split point m, so that one pass
  // over i performs one QL sweep of every unfinished lane (on the rows lo <= i < m of that
  // lane) and the number of passes is the largest lane's number of sweeps, not the sum over
  // deflation points of the largest per point.
  using I = std::remove_reference_t<decltype(M{}[0])>;
  constexpr T u = std::numeric_limits<T>::epsilon();
  const index_t max_sweeps = 30 * d;
  index_t sweeps[L] = {}, lo[L] = {};
  bool failed[L] = {};
  M* split = reinterpret_cast<M*>(p);  // p is free now: one mask vector per row
  const V uu = zero + u * u, uinv = zero + T(1) / u;
  for (;;) {
    for (index_t i = 0; i + 1 < d; ++i) {
      const V ee = vabs(at(e, i)), se = ee * uinv;
      split[i] = (se * se <= vabs(at(w, i)) + vabs(at(w, i + 1))) | (ee <= uu);
    }
    M m = M{}, l_lo = M{};
    index_t top = -1, bottom = d;
    for (int l = 0; l < L; ++l) {
      index_t mm = d;
      while (!failed[l] && lo[l] < d) {
        for (mm = lo[l]; mm + 1 < d && !split[mm][l]; ++mm) {
        }
        if (mm > lo[l]) break;
        ++lo[l];  // e_lo is negligible: w_lo is an eigenvalue
      }
      if (failed[l] || lo[l] >= d) {
        m[l] = I(0);
        l_lo[l] = I(0);
        continue;
      }
      if (++sweeps[l] > max_sweeps) {
        failed[l] = true;
        m[l] = I(0);
        l_lo[l] = I(0);
        continue;
      }
      m[l] = static_cast<I>(mm);
      l_lo[l] = static_cast<I>(lo[l]);
      top = std::max(top, mm);
      bottom = std::min(bottom, lo[l]);
    }
    if (top < 0) break;
    const M run = m > l_lo;
    V wl, wl1, el, wm;
    for (int l = 0; l < L; ++l) {
      const index_t i = l_lo[l], j = m[l];
      wl[l] = w[i * L + l];
      wl1[l] = w[(i + 1) * L + l];
      el[l] = run[l] ? e[i * L + l] : T(1);  // idle lanes would divide by a zero e
      wm[l] = w[j * L + l];
    }
    V s = one, c = one, pp = zero, g;
    {
      const V g0 = (wl1 - wl) / (two * el);
      const V r = vsqrt(g0 * g0 + one);
      const V g1 = wm - wl + el / (g0 + (g0 >= zero ? r : -r));
      g = run ? g1 : zero;
    }
    M alive = run;
    for (index_t i = top - 1; i >= bottom; --i) {
      const M iv = M{} + static_cast<I>(i);
      const M on = alive & (iv < m) & (iv >= l_lo);
      V& ei = at(e, i);
      V& ei1 = at(e, i + 1);
      V& wi = at(w, i);
      V& wi1 = at(w, i + 1);
      V fs = s * ei, gs = g;
      const V b = c * ei;
      // The rescaling of a tiny (f, g) is off the critical path: a predictable branch, and
      // lanes that are not tiny get exactly the unscaled values.
      V q = fs * fs + gs * gs;
      const M tn = q < below2;
      bool any_tiny = false;
      for (int l = 0; l < L; ++l) any_tiny |= tn[l] != 0;
      if (any_tiny) {
        fs = tn ? fs * up : fs;
        gs = tn ? gs * up : gs;
        q = fs * fs + gs * gs;
      }
      const V rs = vsqrt(q);
      const M zr = rs == zero;
      const V rsafe = zr ? one : rs;
      const V s1 = fs / rsafe, c1 = gs / rsafe;
      const V r = rs * (tn ? down : one);
      const V g1 = wi1 - pp;
      const V r1 = (wi - g1) * s1 + two * c1 * b;
      const V p1 = s1 * r1;
      const M rot = on & ~zr, brk = on & zr;
      // r = 0: the rest of the sweep decouples; tqli undoes the shift at i + 1 and restarts
      // from the split search.
      ei1 = on ? r : ei1;
      wi1 = rot ? g1 + p1 : (brk ? wi1 - pp : wi1);
      s = rot ? s1 : s;
      c = rot ? c1 : c;
      pp = rot ? p1 : pp;
      g = rot ? c1 * r1 - b : g;
      alive &= ~brk;
      bool turn = false;
      for (int l = 0; l < L; ++l) turn |= rot[l] != 0;
      if (!turn) continue;
      const V cs = rot ? c1 : one, sn = rot ? s1 : zero;
      T* zi = z + i * dl;
      T* zi1 = zi + dl;
      for (index_t q = 0; q < d; ++q) {
        const V x = at(zi, q), y = at(zi1, q);
        at(zi1, q) = sn * x + cs * y;
        at(zi, q) = cs * x - sn * y;
      }
    }
    for (int l = 0; l < L; ++l) {
      if (!run[l]) continue;
      if (alive[l]) {
        w[lo[l] * L + l] -= pp[l];
        e[lo[l] * L + l] = g[l];
      }
      e[m[l] * L + l] = T(0);
    }
  }
  for (int l = 0; l < L; ++l) conv[l] = failed[l] ? T(0) : T(1);
}

// out(i, j) = sum_k wt(k, i) wt(k, j) for j <= i: the lower triangle of W W^T, W = wt^T, in
// 2 x 2 tiles (each load feeds two products). Every sum runs over k = 0 .. d - 1 in order.
template <class T>
SADDLESCAPE_MULTIVERSION void lockstep_gram(index_t d, T* __restrict wt, T* __restrict out) {
  using V = typename lanes<T>::vec;
  constexpr int L = lockstep_lanes<T>;
  const index_t dl = d * L;
  for (index_t i0 = 0; i0 < d; i0 += 2) {
    const index_t i1 = std::min(i0 + 1, d - 1);
    for (index_t j0 = 0; j0 <= i0; j0 += 2) {
      const index_t j1 = std::min(j0 + 1, d - 1);
      V s00 = V{}, s01 = V{}, s10 = V{}, s11 = V{};
      for (index_t k = 0; k < d; ++k) {
        T* col = wt + k * dl;
        const V a0 = lane(col + i0 * L), a1 = lane(col + i1 * L);
        const V b0 = lane(col + j0 * L), b1 = lane(col + j1 * L);
        s00 += a0 * b0;
        s01 += a0 * b1;
        s10 += a1 * b0;
        s11 += a1 * b1;
      }
      lane(out + (i0 * d + j0) * L) = s00;
      if (j0 + 1 <= i0) lane(out + (i0 * d + j1) * L) = s01;
      if (i1 > i0) {
        lane(out + (i1 * d + j0) * L) = s10;
        lane(out + (i1 * d + j1) * L) = s11;
      }
    }
  }
}

// The same algorithm for one matrix, vectorised along its columns instead of across matrices:
// for the batches too small to fill the lanes (a single G above all), where the lockstep
// solver would pay for L - 1 empty lanes. a is the full symmetric matrix, column-major with
// leading dimension ld = d rounded up to a multiple of L, padding rows zero, entries of
// magnitude <= 1; z receives the eigenvectors (same layout), w the eigenvalues (unsorted).
// Scratch e, tau, p, v of ld entries. Returns false if QL did not converge.
template <class T>
SADDLESCAPE_MULTIVERSION bool solo_eigen(index_t d, index_t ld, T* __restrict a, T* __restrict z,
                                         T* __restrict w, T* __restrict e, T* __restrict tau,
                                         T* __restrict p, T* __restrict v) {
  using V = typename lanes<T>::vec;
  constexpr int L = lockstep_lanes<T>;
  using ts = lanes<T>;
  auto vec = [](T* base, index_t b) -> V& { return lane(base + b * L); };
  const index_t nb = ld / L;

  // 1. Householder tridiagonalisation on the full symmetric matrix (both triangles updated,
  // so that A v is a sum of columns). Rows <= k of p and v are zero, so the update leaves the
  // finished rows alone; the vector loops start at the vector holding row k + 1.
  for (index_t k = 0; k + 2 < d; ++k) {
    T* x = a + k * ld;
    T mx = 0;
    for (index_t i = k + 1; i < d; ++i) mx = std::max(mx, std::abs(x[i]));
    const bool tiny = mx < ts::below;
    const T sup = tiny ? ts::up : T(1), sdown = tiny ? ts::down : T(1);
    T xn = 0;
    for (index_t i = k + 2; i < d; ++i) xn += (x[i] * sup) * (x[i] * sup);
    const T as = x[k + 1] * sup;
    if (xn == T(0)) {  // nothing to annihilate: H = I
      e[k] = x[k + 1];
      tau[k] = 0;
      x[k + 1] = T(1);
      continue;
    }
    const T nrm = std::sqrt(as * as + xn);
    const T bs = as >= T(0) ? -nrm : nrm;
    const T tk = (bs - as) / bs, sc = sup / (as - bs);
    e[k] = bs * sdown;
    tau[k] = tk;
    x[k + 1] = T(1);
    for (index_t i = k + 2; i < d; ++i) x[i] *= sc;
    const index_t b0 = (k + 1) / L;
    for (index_t i = b0 * L; i < ld; ++i) v[i] = (i > k && i < d) ? x[i] : T(0);
    for (index_t b = b0; b < nb; ++b) vec(p, b) = V{};
    for (index_t j = k + 1; j < d; ++j) {
      const V vj = V{} + v[j];
      T* aj = a + j * ld;
      for (index_t b = b0; b < nb; ++b) vec(p, b) += lane(aj + b * L) * vj;
    }
    for (index_t i = b0 * L; i <= k; ++i) p[i] = T(0);
    T dot = 0;
    for (index_t i = k + 1; i < d; ++i) {
      p[i] *= tk;
      dot += p[i] * v[i];
    }
    const V kv = V{} + T(-0.5) * tk * dot;
    for (index_t b = b0; b < nb; ++b) vec(p, b) += kv * vec(v, b);
    for (index_t j = k + 1; j < d; ++j) {
      const V vj = V{} + v[j], pj = V{} + p[j];
      T* aj = a + j * ld;
      for (index_t b = b0; b < nb; ++b)
        lane(aj + b * L) -= vec(v, b) * pj + vec(p, b) * vj;
    }
  }
  for (index_t i = 0; i < d; ++i) w[i] = a[i * ld + i];
  if (d >= 2) e[d - 2] = a[(d - 2) * ld + d - 1];
  e[d - 1] = 0;

  // 2. Q = H_0 ... H_(d-3), accumulated backwards.
  for (index_t c = 0; c < d; ++c)
    for (index_t i = 0; i < ld; ++i) z[c * ld + i] = i == c ? T(1) : T(0);
  for (index_t k = d - 3; k >= 0; --k) {
    const T tk = tau[k];
    if (tk == T(0)) continue;
    const index_t b0 = (k + 1) / L;
    const T* x = a + k * ld;
    for (index_t i = b0 * L; i < ld; ++i) v[i] = (i > k && i < d) ? x[i] : T(0);
    for (index_t c = k + 1; c < d; ++c) {
      T* zc = z + c * ld;
      V acc = V{};
      for (index_t b = b0; b < nb; ++b) acc += vec(v, b) * lane(zc + b * L);
      T dot = 0;
      for (int l = 0; l < L; ++l) dot += acc[l];
      const V f = V{} + tk * dot;
      for (index_t b = b0; b < nb; ++b) lane(zc + b * L) -= f * vec(v, b);
    }
  }

  // 3. tqli, as in lockstep_eigen.
  constexpr T u = std::numeric_limits<T>::epsilon();
  index_t sweeps = 0;
  for (index_t l0 = 0; l0 < d; ++l0) {
    for (;;) {
      index_t m = l0;
      for (; m + 1 < d; ++m) {
        const T ee = std::abs(e[m]), se = ee / u;
        if (se * se <= std::abs(w[m]) + std::abs(w[m + 1]) || ee <= u * u) break;
      }
      if (m == l0) break;
      if (++sweeps > 30 * d) return false;
      T g = (w[l0 + 1] - w[l0]) / (T(2) * e[l0]);
      T r = std::sqrt(g * g + T(1));
      g = w[m] - w[l0] + e[l0] / (g + (g >= T(0) ? r : -r));
      T s = 1, c = 1, pp = 0;
      bool broke = false;
      for (index_t i = m - 1; i >= l0; --i) {
        T f = s * e[i], gs = g;
        const T b = c * e[i];
        // The rescaling of a tiny (f, g) is off the critical path: a predictable branch.
        T q = f * f + gs * gs;
        const bool tn = q < ts::below * ts::below;
        if (tn) {
          f *= ts::up;
          gs *= ts::up;
          q = f * f + gs * gs;
        }
        const T fs = f, rs = std::sqrt(q);
        if (rs == T(0)) {
          e[i + 1] = 0;
          w[i + 1] -= pp;
          broke = true;
          break;
        }
        e[i + 1] = tn ? rs * ts::down : rs;
        s = fs / rs;
        c = gs / rs;
        const T g1 = w[i + 1] - pp;
        r = (w[i] - g1) * s + T(2) * c * b;
        pp = s * r;
        w[i + 1] = g1 + pp;
        g = c * r - b;
        const V cs = V{} + c, sn = V{} + s;
        T* zi = z + i * ld;
        T* zi1 = zi + ld;
        for (index_t q = 0; q < nb; ++q) {
          const V xq = lane(zi + q * L), yq = lane(zi1 + q * L);
          lane(zi1 + q * L) = sn * xq + cs * yq;
          lane(zi + q * L) = cs * xq - sn * yq;
        }
      }
      if (!broke) {
        w[l0] -= pp;
        e[l0] = g;
      }
      e[m] = 0;
    }
  }
  return true;
}

// a = W W^T for W = z (column-major, leading dimension ld, d columns), full matrix, column by
// column: a(:, j) = sum_k W(j, k) W(:, k), k = 0 .. d - 1 in order, so a(i, j) and a(j, i) are
// the same sum of the same products and a is exactly symmetric.
template <class T>
SADDLESCAPE_MULTIVERSION void solo_gram(index_t d, index_t ld, T* __restrict wt,
                                        T* __restrict a) {
  using V = typename lanes<T>::vec;
  constexpr int L = lockstep_lanes<T>;
  const index_t nb = ld / L;
  for (index_t j = 0; j < d; ++j) {
    T* aj = a + j * ld;
    // Four vectors of the column at a time, accumulated in registers.
    for (index_t b = 0; b < nb; b += 4) {
      const int cnt = static_cast<int>(std::min<index_t>(4, nb - b));
      V s0 = V{}, s1 = V{}, s2 = V{}, s3 = V{};
      for (index_t k = 0; k < d; ++k) {
        T* wk = wt + k * ld + b * L;
        const V x = V{} + wt[k * ld + j];
        s0 += lane(wk) * x;
        if (cnt > 1) s1 += lane(wk + L) * x;
        if (cnt > 2) s2 += lane(wk + 2 * L) * x;
        if (cnt > 3) s3 += lane(wk + 3 * L) * x;
      }
      lane(aj + b * L) = s0;
      if (cnt > 1) lane(aj + (b + 1) * L) = s1;
      if (cnt > 2) lane(aj + (b + 2) * L) = s2;
      if (cnt > 3) lane(aj + (b + 3) * L) = s3;
    }
  }
}

// One matrix at a time with solo_eigen, for the batch functions and for eigen_root: the same
// operations as a lane of the lockstep solver, so that every route computes the same bits.
template <class T>
class solo_solver {
 public:
  static constexpr int L = lockstep_lanes<T>;

  // One allocation, left uninitialised: every buffer is written before it is read.
  explicit solo_solver(index_t d) : d_(d), ld_((d + L - 1) / L * L) {
    const std::size_t mat = static_cast<std::size_t>(ld_ * d), vec = static_cast<std::size_t>(ld_),
                      dd = static_cast<std::size_t>(d * d), dn = static_cast<std::size_t>(d);
    buf_.reset(new T[3 * mat + 5 * vec + dd + 2 * dn]);
    T* q = buf_.get();
    for (T** b : {&a_, &z_, &scaled_}) *b = q, q += mat;
    for (T** b : {&w_, &e_, &tau_, &p_, &v_}) *b = q, q += vec;
    sym_ = q, q += dd;
    lambda_ = q, q += dn;
    weights_ = q;
  }

  // Checks and decomposes the row-major G as eigen_root::factor does; returns max|lambda|.
  // Then lambda() holds the clipped eigenvalues in the solver's order (not sorted), and
  // vector(k) the eigenvector of lambda()[k] (ld entries, zero past d).
  double factor(const T* G, std::string_view what) {
    const index_t d = d_, ld = ld_;
    const double max_abs = symmetrize_checked(G, d, what, sym_);
    int ex = 0;
    std::frexp(max_abs, &ex);
    // Scaled by 2^-e, max|G| = m 2^e with m in [1/2, 1): exact, and it keeps the solver's
    // squares away from overflow and underflow. Symmetric, so the row-major average is also
    // the column-major one.
    const pow2_scale down(-ex), up(ex);
    for (index_t j = 0; j < d; ++j)
      for (index_t r = 0; r < ld; ++r)
        a_[j * ld + r] = r < d ? static_cast<T>(down(double(sym_[j * d + r]))) : T(0);
    if (!solo_eigen<T>(d, ld, a_, z_, w_, e_, tau_, p_, v_))
      SADDLESCAPE_NUMERICAL_FAIL("the eigensolver (tridiagonal QL) did not converge for ", what);
    for (index_t k = 0; k < d; ++k) lambda_[k] = static_cast<T>(up(double(w_[k])));
    return check_and_clip_spectrum(lambda_, d, what);
  }

  const T* lambda() const { return lambda_; }
  const T* vector(index_t k) const { return z_ + k * ld_; }

  // Writes Z diag(weights) Z^T (weights in lambda()'s order) into the row-major d x d out.
  void matrix(const T* weights, T* out, std::string_view what) {
    const index_t d = d_, ld = ld_;
    for (index_t k = 0; k < d; ++k) {
      const T sk = std::sqrt(weights[k]);
      for (index_t r = 0; r < ld; ++r) scaled_[k * ld + r] = z_[k * ld + r] * sk;
    }
    solo_gram<T>(d, ld, scaled_, a_);
    for (index_t j = 0; j < d; ++j)
      for (index_t r = 0; r < d; ++r) out[j * d + r] = a_[j * ld + r];
    if (!detail::all_finite(out, d * d))
      SADDLESCAPE_NUMERICAL_FAIL("the inverse root of ", what,
                                 " overflows in reconstruction; increase eps");
  }

  // out = f(G) in one go.
  void run(const T* G, const root_spec& spec, T* out, std::string_view what) {
    const double lmax = factor(G, what);
    spectral_weights(lambda_, d_, spec, lmax, what, weights_);
    matrix(weights_, out, what);
  }

 private:
  index_t d_, ld_;
  std::unique_ptr<T[]> buf_;
  T *a_, *z_, *scaled_, *w_, *e_, *tau_, *p_, *v_, *sym_, *lambda_, *weights_;
};

// Inverse roots of small matrices L at a time with the lockstep solver; one per thread.
template <class T>
class small_batch {
 public:
  static constexpr int L = lockstep_lanes<T>;

  // One allocation, left uninitialised: every buffer is written before it is read.
  explicit small_batch(index_t d) : d_(d) {
    const std::size_t mat = static_cast<std::size_t>(d * d * L),
                      vec = static_cast<std::size_t>(d * L),
                      dd = static_cast<std::size_t>(d * d), dn = static_cast<std::size_t>(d);
    buf_.reset(new T[2 * mat + 5 * vec + dd + 2 * dn]);
    T* q = buf_.get();
    for (T** b : {&a_, &z_}) *b = q, q += mat;
    for (T** b : {&w_, &e_, &tau_, &p_, &v_}) *b = q, q += vec;
    sym_ = q, q += dd;
    lambda_ = q, q += dn;
    weights_ = q;
  }

  // A_i = f(G_i) for i = first .. first + count - 1 (count <= L) of the batch of n. Errors
  // name the lowest-numbered bad matrix of the group, as a one-at-a-time loop would.
  void run(const T* G, index_t n, index_t first, int count, const root_spec& spec, T* A) {
    const index_t d = d_, dd = d * d;
    std::exception_ptr pending;
    int good = count;
    for (int l = 0; l < count; ++l) {
      try {
        load(G + (first + l) * dd, l, batch_name(n, first + l));
      } catch (...) {
        pending = std::current_exception();
        good = l;
        break;
      }
    }
    for (int l = good; l < L; ++l) clear(l);
    T conv[L];
    lockstep_eigen<T>(d, a_, z_, w_, e_, tau_, p_,
                      v_, conv);
    // Eigenvalues and weights, lane by lane; a failing lane ends the group there.
    for (int l = 0; l < good; ++l) {
      try {
        const std::string what = batch_name(n, first + l);
        if (conv[l] == T(0))
          SADDLESCAPE_NUMERICAL_FAIL("the eigensolver (tridiagonal QL) did not converge for ",
                                     what);
        const pow2_scale up(exponent_[l]);
        for (index_t k = 0; k < d; ++k) lambda_[k] = static_cast<T>(up(double(w_[k * L + l])));
        const double lmax = check_and_clip_spectrum(lambda_, d, what);
        spectral_weights(lambda_, d, spec, lmax, what, weights_);
        for (index_t k = 0; k < d; ++k) w_[k * L + l] = std::sqrt(weights_[k]);
      } catch (...) {
        pending = std::current_exception();
        good = l;
        break;
      }
    }
    for (int l = good; l < L; ++l)
      for (index_t k = 0; k < d; ++k) w_[k * L + l] = T(0);
    scale_columns();
    lockstep_gram<T>(d, z_, a_);
    for (int l = 0; l < good; ++l) {
      T* out = A + (first + l) * dd;
      for (index_t i = 0; i < d; ++i)
        for (index_t j = 0; j <= i; ++j) {
          const T x = a_[(i * d + j) * L + l];
          out[i * d + j] = x;
          out[j * d + i] = x;
        }
      if (!detail::all_finite(out, dd))
        SADDLESCAPE_NUMERICAL_FAIL("the inverse root of ", batch_name(n, first + l),
                                   " overflows in reconstruction; increase eps");
    }
    if (pending) std::rethrow_exception(pending);
  }

 private:
  // Checks G, and stores its averaged lower triangle scaled by 2^-e, max|G| = m 2^e with
  // m in [1/2, 1): exact, and it keeps the solver's squares away from overflow and underflow.
  void load(const T* G, int l, std::string_view what) {
    const index_t d = d_;
    const double max_abs = symmetrize_checked(G, d, what, sym_);
    int ex = 0;
    std::frexp(max_abs, &ex);
    exponent_[l] = ex;
    const pow2_scale down(-ex);
    for (index_t i = 0; i < d; ++i)
      for (index_t j = 0; j <= i; ++j)
        a_[(i * d + j) * L + l] = static_cast<T>(down(double(sym_[i * d + j])));
  }

  void clear(int l) {
    for (index_t i = 0; i < d_ * d_; ++i) a_[i * L + l] = T(0);
    exponent_[l] = 0;
  }

  // Column k of z times w_k = f(lambda_k)^(1/2), so that A = Z diag(f) Z^T = W W^T.
  void scale_columns() {
    const index_t d = d_;
    for (index_t k = 0; k < d; ++k) {
      T* zk = z_ + k * d * L;
      const T* s = w_ + k * L;
      for (index_t i = 0; i < d; ++i)
        for (int l = 0; l < L; ++l) zk[i * L + l] *= s[l];
    }
  }

  index_t d_;
  std::unique_ptr<T[]> buf_;
  T *a_, *z_, *w_, *e_, *tau_, *p_, *v_, *sym_, *lambda_, *weights_;
  int exponent_[L] = {};
};

#endif  // SADDLESCAPE_LOCKSTEP

}  // namespace

// ------------------------------------------------------------------------------------------

root_form parse_root_form(std::string_view name) {
  if (name == "inv_sqrt") return root_form::inv_sqrt;
  if (name == "adam") return root_form::adam;
  throw invalid_argument(concat("form must be 'inv_sqrt' or 'adam', got '", name, "'"));
}

root_method parse_root_method(std::string_view name) {
  if (name == "eigh") return root_method::eigh;
  if (name == "newton") return root_method::newton;
  throw invalid_argument(concat("method must be 'eigh' or 'newton', got '", name, "'"));
}

std::string_view to_string(root_form form) {
  return form == root_form::adam ? "adam" : "inv_sqrt";
}

std::string_view to_string(root_method method) {
  return method == root_method::newton ? "newton" : "eigh";
}

void root_spec::validate() const {
  SADDLESCAPE_EXPECTS(p >= 1, "p must be an integer >= 1, got ", p);
  SADDLESCAPE_EXPECTS(std::isfinite(eps) && eps >= 0.0, "eps must be a finite number >= 0, got ",
                      eps);
  SADDLESCAPE_EXPECTS(form == root_form::inv_sqrt || p == 2,
                      "form 'adam' is (G^(1/2) + eps I)^(-1) and needs p = 2, got p = ", p);
}

void newton_options::validate() const {
  SADDLESCAPE_EXPECTS(std::isfinite(tol) && tol >= 0.0,
                      "tol must be a finite number >= 0 (0 for the default), got ", tol);
  SADDLESCAPE_EXPECTS(max_iter >= 1, "max_iter must be >= 1, got ", max_iter);
}

template <class T>
double default_newton_tolerance(index_t d) {
  return 100.0 * static_cast<double>(Eigen::NumTraits<T>::epsilon()) *
         std::sqrt(static_cast<double>(d));
}

// ------------------------------------------------------------------------------------------
// eigen_root

template <class T>
struct eigen_root<T>::small_solver {
  // eigen_backend::automatic: solo_solver, so that eigen_root and the batch functions compute
  // the same bits; eigen_backend::eigen: Eigen's solver.
  Eigen::SelfAdjointEigenSolver<Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>> solver;
#ifdef SADDLESCAPE_LOCKSTEP
  std::optional<solo_solver<T>> solo;
  std::vector<index_t> order;  // lambda_[i] is solo->lambda()[order[i]]
  std::vector<T> weights;      // weights_ in solo's order
#endif
  small_solver(index_t d, bool use_solo) : solver(use_solo ? 0 : d) {
#ifdef SADDLESCAPE_LOCKSTEP
    if (!use_solo) return;
    solo.emplace(d);
    order.resize(static_cast<std::size_t>(d));
    weights.resize(static_cast<std::size_t>(d));
#else
    (void)use_solo;
#endif
  }
};

template <class T>
eigen_root<T>::~eigen_root() = default;
template <class T>
eigen_root<T>::eigen_root(eigen_root&&) noexcept = default;
template <class T>
eigen_root<T>& eigen_root<T>::operator=(eigen_root&&) noexcept = default;

template <class T>
eigen_root<T>::eigen_root(index_t dim, eigen_backend backend)
    : dim_((check_dim(dim, "G"), dim)),
      use_eigen_(backend == eigen_backend::eigen ||
                 (backend == eigen_backend::automatic && dim <= small_matrix_limit)),
      small_(use_eigen_ ? std::make_unique<small_solver>(dim, backend != eigen_backend::eigen)
                        : nullptr) {
  const auto n = static_cast<std::size_t>(dim);
  vectors_.resize(n * n);
  scaled_.resize(n * n);
  lambda_.resize(dim);
  weights_.resize(dim);
  if (use_eigen_) return;
  // syevd needs 1 + 6d + 2d^2 workspace entries, counted in a 32-bit int.
  SADDLESCAPE_EXPECTS(1.0 + 6.0 * double(dim) + 2.0 * double(dim) * double(dim) <= double(INT_MAX),
                      "d = ", dim, " is too large for 32-bit LAPACK's eigensolver workspace "
                      "(d <= 32766)");
  // Workspace query: LAPACK reports the optimal sizes for jobz = 'V'.
  T work_size = 0;
  int iwork_size = 0;
  const int info = detail::lapack::syevd('V', static_cast<int>(dim), vectors_.data(),
                                         lambda_.data(), &work_size, -1, &iwork_size, -1);
  if (info != 0) SADDLESCAPE_NUMERICAL_FAIL("LAPACK syevd workspace query failed, info = ", info);
  work_.resize(static_cast<std::size_t>(work_size) + 1);
  iwork_.resize(static_cast<std::size_t>(iwork_size) + 1);
}

template <class T>
void eigen_root<T>::factor(const T* G, std::string_view what) {
  factored_ = false;
  assigned_ = false;
  const index_t d = dim_;
#ifdef SADDLESCAPE_LOCKSTEP
  if (use_eigen_ && small_->solo) {
    auto& solo = *small_->solo;
    lambda_max_abs_ = solo.factor(G, what);
    // Ascending, as eigenvalues() promises; ties keep the solver's order.
    auto& order = small_->order;
    const T* lam = solo.lambda();
    for (index_t i = 0; i < d; ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(),
                     [lam](index_t x, index_t y) { return lam[x] < lam[y]; });
    for (index_t i = 0; i < d; ++i) {
      lambda_[i] = lam[order[i]];
      std::copy(solo.vector(order[i]), solo.vector(order[i]) + d, vectors_.data() + i * d);
    }
    what_ = std::string(what);
    factored_ = true;
    return;
  }
#endif
  symmetrize_checked(G, d, what, vectors_.data());
  if (use_eigen_) {
    auto& es = small_->solver;
    es.compute(Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>>(
        vectors_.data(), d, d));
    if (es.info() != Eigen::Success)
      SADDLESCAPE_NUMERICAL_FAIL("the eigensolver (Eigen) did not converge for ", what);
    std::copy(es.eigenvalues().data(), es.eigenvalues().data() + d, lambda_.data());
    std::copy(es.eigenvectors().data(), es.eigenvectors().data() + d * d, vectors_.data());
  } else {
    const int info = detail::lapack::syevd('V', static_cast<int>(d), vectors_.data(),
                                           lambda_.data(), work_.data(),
                                           static_cast<int>(work_.size()), iwork_.data(),
                                           static_cast<int>(iwork_.size()));
    if (info < 0) SADDLESCAPE_NUMERICAL_FAIL("LAPACK syevd rejected argument ", -info);
    if (info > 0)
      SADDLESCAPE_NUMERICAL_FAIL("the eigensolver (LAPACK syevd) did not converge for ", what,
                                 " (info = ", info, ")");
  }
  // Both solvers return eigenvalues in ascending order, which eigenvalues() promises.
  lambda_max_abs_ = check_and_clip_spectrum(lambda_.data(), d, what);
  what_ = std::string(what);
  factored_ = true;
}

template <class T>
void eigen_root<T>::assign(const double* vectors, const double* lambda, std::string_view what) {
  factored_ = false;
  const index_t d = dim_;
  for (index_t i = 0; i < d * d; ++i) vectors_[i] = static_cast<T>(vectors[i]);
  for (index_t i = 0; i < d; ++i) lambda_[i] = static_cast<T>(lambda[i]);
  // At T's tolerance: a float32 matrix's rounding shows as negative eigenvalues of order
  // float32's epsilon, which double's tolerance would call clearly negative.
  lambda_max_abs_ = check_and_clip_spectrum(lambda_.data(), d, what);
  what_ = std::string(what);
  assigned_ = true;
  factored_ = true;
}

template <class T>
void eigen_root<T>::compute_weights(const root_spec& spec) {
  spec.validate();
  SADDLESCAPE_EXPECTS(factored_, "eigen_root: factor(G) must succeed before use");
  spectral_weights(lambda_.data(), dim_, spec, lambda_max_abs_, what_, weights_.data());
}

template <class T>
void eigen_root<T>::matrix(const root_spec& spec, T* A) {
  compute_weights(spec);
  const index_t d = dim_;
#ifdef SADDLESCAPE_LOCKSTEP
  if (use_eigen_ && small_->solo && !assigned_) {
    // In the solver's order, as the batch functions sum.
    for (index_t i = 0; i < d; ++i) small_->weights[small_->order[i]] = weights_[i];
    small_->solo->matrix(small_->weights.data(), A, what_);
    return;
  }
#endif
  // W = V diag(f^(1/2)), column by column (columns are contiguous in column-major V).
  for (index_t j = 0; j < d; ++j) {
    const T s = std::sqrt(weights_[j]);
    const T* v = vectors_.data() + j * d;
    T* w = scaled_.data() + j * d;
    for (index_t i = 0; i < d; ++i) w[i] = s * v[i];
  }
  const int n = static_cast<int>(d);
  detail::lapack::syrk_lower(n, n, T(1), scaled_.data(), n, T(0), A, n);
  mirror_lower(A, d);
  if (!detail::all_finite(A, d * d))
    SADDLESCAPE_NUMERICAL_FAIL("the inverse root of ", what_,
                               " overflows in reconstruction; increase eps");
}

template <class T>
void eigen_root<T>::apply(const root_spec& spec, const T* v, index_t k, T* out) {
  SADDLESCAPE_EXPECTS(k >= 0 && k <= detail::lapack::max_dim, "v has a bad number of columns: ", k);
  compute_weights(spec);
  if (k == 0) return;
  const index_t d = dim_;
  detail::check_finite(v, d, k, "v", k == 1);
  const auto need = static_cast<std::size_t>(d * k);
  if (scaled_.size() < need) scaled_.resize(need);
  // Row-major v (d x k) is column-major v^T (k x d); likewise out. So out^T = v^T V F V^T.
  const int n = static_cast<int>(d), kk = static_cast<int>(k);
  T* tmp = scaled_.data();
  detail::lapack::gemm('N', 'N', kk, n, n, T(1), v, kk, vectors_.data(), n, T(0), tmp, kk);
  for (index_t j = 0; j < d; ++j) {
    const T f = weights_[j];
    for (index_t i = 0; i < k; ++i) tmp[j * k + i] *= f;
  }
  detail::lapack::gemm('N', 'T', kk, n, n, T(1), tmp, kk, vectors_.data(), n, T(0), out, kk);
  if (!detail::all_finite(out, d * k))
    SADDLESCAPE_NUMERICAL_FAIL("A v overflows for ", what_, "; increase eps or rescale v");
}

// ------------------------------------------------------------------------------------------
// newton_root

template <class T>
newton_root<T>::newton_root(index_t dim) : dim_(dim) {
  check_dim(dim, "G");
  const auto n = static_cast<std::size_t>(dim) * static_cast<std::size_t>(dim);
  for (auto* buf : {&m_, &x_, &t_, &w_}) buf->resize(n);
}

template <class T>
void newton_root<T>::compute(const T* G, const root_spec& spec, const newton_options& opts, T* A,
                             std::string_view what) {
  spec.validate();
  opts.validate();
  SADDLESCAPE_EXPECTS(spec.form == root_form::inv_sqrt,
                      "method 'newton' computes (G + eps I)^(-1/p) only; form '",
                      to_string(spec.form), "' needs method 'eigh'");
  const index_t d = dim_;
  const int n = static_cast<int>(d);
  const std::size_t nn = static_cast<std::size_t>(d) * static_cast<std::size_t>(d);
  iterations_ = 0;
  residual_ = std::numeric_limits<double>::infinity();

  if (!(spec.eps <= static_cast<double>(std::numeric_limits<T>::max())))
    SADDLESCAPE_NUMERICAL_FAIL("eps = ", spec.eps, " is not representable in ",
                               detail::type_name<T>(), "; method 'eigh' evaluates it in double");
  T* M = m_.data();
  symmetrize_checked(G, d, what, M);
  for (index_t i = 0; i < d; ++i) M[i * d + i] += static_cast<T>(spec.eps);

  // c >= lambda_max(B) puts the spectrum of M_0 = B / c in (0, 1], inside the region of
  // convergence (0, p + 1). min(Frobenius, infinity norm) is a cheap, usually tight bound; the
  // Frobenius sum is taken relative to max|B| so that tiny or huge matrices neither underflow
  // nor overflow.
  double max_entry = 0.0;
  for (std::size_t i = 0; i < nn; ++i) max_entry = std::max(max_entry, std::abs(double(M[i])));
  double fro = 0.0, inf = 0.0;
  for (index_t i = 0; i < d && max_entry > 0; ++i) {
    double row = 0.0;
    for (index_t j = 0; j < d; ++j) {
      const double x = M[i * d + j] / max_entry;
      fro += x * x;
      row += std::abs(x);
    }
    inf = std::max(inf, row);
  }
  const double c = max_entry * std::min(std::sqrt(fro), inf);
  const double tol = opts.tol > 0 ? opts.tol : default_newton_tolerance<T>(d);

  // The iteration itself would happily invert G + eps I for an indefinite G whenever eps hides
  // the negative eigenvalue, and converge for a G that is singular up to rounding. A Cholesky
  // factorisation, a sixth of one iteration, rejects what method 'eigh' rejects: with eps > 0,
  // of G + delta I (fails only if G has an eigenvalue below -delta); with eps = 0, of G - delta I
  // (fails if G has an eigenvalue below +delta), delta the rounding tolerance of eigen_root.
  {
    T* L = w_.data();
    std::copy(M, M + nn, L);
    const double delta = clip_tolerance<T>(d) * c;
    const double shift = (spec.eps > 0 ? delta : -delta) - spec.eps;
    for (index_t i = 0; i < d; ++i) L[i * d + i] += static_cast<T>(shift);
    if (detail::lapack::potrf_lower(n, L) != 0) {
      eigen_root<T> eig(d);
      eig.factor(G, what);  // throws invalid_argument naming a negative eigenvalue
      if (spec.eps == 0.0 && !(eig.eigenvalues()[0] > 0))
        SADDLESCAPE_NUMERICAL_FAIL(what, " is singular: its smallest eigenvalue is within rounding (",
                                   clip_tolerance<T>(d) * c, ") of zero and eps = 0; pass eps > 0");
    }
  }

  auto fail = [&](const char* how) {
    // Diagnose on the failure path only: an eigendecomposition tells a negative eigenvalue
    // (invalid input) from singularity or slow convergence (numerical).
    eigen_root<T> eig(d);
    eig.factor(G, what);  // throws invalid_argument for a clearly negative eigenvalue
    const auto& lam = eig.eigenvalues();
    const double lmax = std::max(std::abs(double(lam[0])), std::abs(double(lam[d - 1])));
    if (spec.eps == 0.0 && !(lam[0] > clip_tolerance<T>(d) * lmax))
      SADDLESCAPE_NUMERICAL_FAIL(what, " is singular (smallest eigenvalue ", lam[0],
                                 ") and eps = 0: the Newton iteration cannot converge; pass eps > 0");
    SADDLESCAPE_NUMERICAL_FAIL("the Newton iteration for ", what, " ", how, " after ", iterations_,
                               " iterations (residual ", residual_, ", tol ", tol,
                               "); raise max_iter or use method 'eigh'");
  };
  if (!(c > 0.0) || !std::isfinite(c)) fail("could not be scaled");

  // In double: 1 / c itself may not be representable in T (float G of size 1e-39).
  for (std::size_t i = 0; i < nn; ++i) M[i] = static_cast<T>(static_cast<double>(M[i]) / c);
  T* X = x_.data();
  std::fill(X, X + nn, T(0));
  const T x0 = static_cast<T>(std::pow(c, -1.0 / spec.p));
  for (index_t i = 0; i < d; ++i) X[i * d + i] = x0;

  const T p = static_cast<T>(spec.p);
  T* Tk = t_.data();
  T* W = w_.data();
  double first_residual = -1.0;
  while (iterations_ < opts.max_iter) {
    ++iterations_;
    for (std::size_t i = 0; i < nn; ++i) Tk[i] = -M[i] / p;
    for (index_t i = 0; i < d; ++i) Tk[i * d + i] += (p + T(1)) / p;
    detail::lapack::gemm('N', 'N', n, n, n, T(1), X, n, Tk, n, T(0), W, n);
    std::swap(X, W);
    // M <- T^p M by p products; T and M commute (both are polynomials in B).
    for (int r = 0; r < spec.p; ++r) {
      detail::lapack::gemm('N', 'N', n, n, n, T(1), Tk, n, M, n, T(0), W, n);
      std::swap(M, W);
    }
    double r2 = 0.0;
    for (index_t i = 0; i < d; ++i)
      for (index_t j = 0; j < d; ++j) {
        const double e = static_cast<double>(M[i * d + j]) - (i == j ? 1.0 : 0.0);
        r2 += e * e;
      }
    residual_ = std::sqrt(r2 / static_cast<double>(d));
    if (first_residual < 0) first_residual = residual_;
    if (!std::isfinite(residual_) || residual_ > 10.0 * first_residual + 10.0) fail("diverged");
    if (residual_ <= tol) break;
  }
  if (!(residual_ <= tol)) fail("did not converge");

  // X is symmetric in exact arithmetic; average away the rounding asymmetry.
  for (index_t i = 0; i < d; ++i)
    for (index_t j = 0; j <= i; ++j) {
      const T avg = static_cast<T>(0.5) * (X[i * d + j] + X[j * d + i]);
      A[i * d + j] = avg;
      A[j * d + i] = avg;
    }
  if (!detail::all_finite(A, d * d))
    SADDLESCAPE_NUMERICAL_FAIL("the inverse root of ", what, " overflows; increase eps");
}

// ------------------------------------------------------------------------------------------
// free functions

template <class T>
void inv_root_batched_body(const T* G, index_t n, index_t d, const root_spec& spec,
                           root_method method, const newton_options& opts, T* A) {
  spec.validate();
  opts.validate();
  SADDLESCAPE_EXPECTS(n >= 0, "the batch size must be >= 0, got ", n);
  check_dim(d, "G");
  if (method == root_method::newton)
    SADDLESCAPE_EXPECTS(spec.form == root_form::inv_sqrt,
                        "method 'newton' computes (G + eps I)^(-1/p) only; form '",
                        to_string(spec.form), "' needs method 'eigh'");
  if (n == 0) return;
  const index_t dd = d * d;
  // Threads over the matrices once the work (about n d^3 flops) pays for starting them. The
  // choice depends on n and d only, and every matrix is computed by the same code whatever the
  // thread count, so results do not depend on it. Workspaces are per worker thread; tasks are
  // taken in increasing order, so the lowest-numbered failing task (whose error parallel_tasks
  // rethrows) holds the lowest-numbered bad matrix.
  const bool threaded =
      n > 1 && double(n) * double(d) * double(dd) >= double(detail::parallel_threshold);
  const unsigned threads = threaded ? detail::pass_threads() : 1u;
  auto run = [&](index_t tasks, bool uses_lapack, auto&& fn) {
    if (!threaded) {
      for (index_t t = 0; t < tasks; ++t) fn(t, 0u);
      return;
    }
    // OpenBLAS single-threaded even when `threads` is 1, so that its thread count cannot
    // change a result either.
    std::optional<detail::lapack::single_threaded_scope> single;
    if (uses_lapack) single.emplace();
    detail::parallel_tasks(tasks, threads, fn);
  };

  if (method == root_method::newton) {
    std::vector<std::optional<newton_root<T>>> ws(threads);
    run(n, true, [&](index_t i, unsigned k) {
      if (!ws[k]) ws[k].emplace(d);
      ws[k]->compute(G + i * dd, spec, opts, A + i * dd, batch_name(n, i));
    });
    return;
  }
#ifdef SADDLESCAPE_LOCKSTEP
  if (d <= lockstep_limit) {
    // Groups of L consecutive matrices, aligned at multiples of L whatever the split.
    constexpr int L = lockstep_lanes<T>;
    // A group costs about what L / 2 solo matrices cost (the lanes' extra sweeps). Both
    // solvers compute the same bits, so the choice changes only the time.
    if (2 * n < L) {
      std::vector<std::optional<solo_solver<T>>> ws(threads);
      run(n, false, [&](index_t i, unsigned k) {
        if (!ws[k]) ws[k].emplace(d);
        ws[k]->run(G + i * dd, spec, A + i * dd, batch_name(n, i));
      });
      return;
    }
    std::vector<std::optional<small_batch<T>>> ws(threads);
    run((n + L - 1) / L, false, [&](index_t b, unsigned k) {
      if (!ws[k]) ws[k].emplace(d);
      ws[k]->run(G, n, b * L, static_cast<int>(std::min<index_t>(L, n - b * L)), spec, A);
    });
    return;
  }
#endif
  std::vector<std::optional<eigen_root<T>>> ws(threads);
  run(n, true, [&](index_t i, unsigned k) {
    if (!ws[k]) ws[k].emplace(d);
    ws[k]->factor(G + i * dd, batch_name(n, i));
    ws[k]->matrix(spec, A + i * dd);
  });
}

template <class T>
void inv_root_apply_body(const T* G, index_t d, const T* v, index_t k, const root_spec& spec,
                         root_method method, const newton_options& opts, T* out) {
  spec.validate();
  opts.validate();
  check_dim(d, "G");
  SADDLESCAPE_EXPECTS(k >= 0, "v must have >= 0 columns, got ", k);
  detail::check_finite(v, d, k, "v", k == 1);
  if (method == root_method::eigh) {
    eigen_root<T> solver(d);
    solver.factor(G, "G");
    solver.apply(spec, v, k, out);
    return;
  }
  std::vector<T> a(static_cast<std::size_t>(d * d));
  newton_root<T>(d).compute(G, spec, opts, a.data(), "G");
  if (k == 0) return;
  const int n = static_cast<int>(d), kk = static_cast<int>(k);
  // out^T = v^T A in column-major terms (A is symmetric).
  detail::lapack::gemm('N', 'N', kk, n, n, T(1), v, kk, a.data(), n, T(0), out, kk);
}

// The workspaces of one eigensolver or Newton iteration for d x d (a few d^2 buffers: G's
// copy, the eigenvectors, the result's factor, LAPACK's syevd workspace of 1 + 6d + 2d^2), one
// per thread: what the next two functions name when an allocation fails.
template <class T>
double workspace_bytes(index_t d, unsigned threads) {
  return 6.0 * static_cast<double>(d) * static_cast<double>(d) * sizeof(T) * threads;
}

template <class T>
void inv_root_batched(const T* G, index_t n, index_t d, const root_spec& spec, root_method method,
                      const newton_options& opts, T* A) {
  const double bytes = workspace_bytes<T>(d, n > 1 ? detail::pass_threads() : 1u);
  const std::string what = concat("the inverse root of ", n, " matrices of ", d, " x ", d, " (",
                                  detail::type_name<T>(), ", its solvers' workspaces)");
  if (d >= 1 && d <= detail::lapack::max_dim) detail::expect_memory(bytes, what);
  detail::allocating(bytes, what, [&] { inv_root_batched_body(G, n, d, spec, method, opts, A); });
}

template <class T>
void inv_root_apply(const T* G, index_t d, const T* v, index_t k, const root_spec& spec,
                    root_method method, const newton_options& opts, T* out) {
  const double bytes = workspace_bytes<T>(d, 1u);
  const std::string what = concat("the inverse root of a ", d, " x ", d, " matrix (",
                                  detail::type_name<T>(), ", its solver's workspace)");
  if (d >= 1 && d <= detail::lapack::max_dim) detail::expect_memory(bytes, what);
  detail::allocating(bytes, what, [&] { inv_root_apply_body(G, d, v, k, spec, method, opts, out); });
}

template <class T>
void diag_inv_root(const T* v, index_t n, const root_spec& spec, T* out) {
  spec.validate();
  SADDLESCAPE_EXPECTS(n >= 0, "v must have >= 0 entries, got ", n);
  // Validation first, in one branch-free pass, so the common case stays vectorisable.
  bool ok = true;
  const T big = std::numeric_limits<T>::max();
  for (index_t i = 0; i < n; ++i) ok &= (v[i] >= T(0)) & (v[i] <= big);
  if (!ok) {
    for (index_t i = 0; i < n; ++i)
      if (!(v[i] >= T(0) && v[i] <= big))
        throw invalid_argument(concat("v must be finite and >= 0 (a diagonal second moment), got v[",
                                      i, "] = ", v[i]));
  }
  if (spec.eps == 0.0) {
    for (index_t i = 0; i < n; ++i)
      if (v[i] == T(0))
        SADDLESCAPE_NUMERICAL_FAIL("v[", i, "] = 0 and eps = 0: the inverse root is infinite; "
                                   "pass eps > 0");
  }
  const T eps = static_cast<T>(spec.eps);
  // T arithmetic when eps is representable in T; an eps below T's normal range (1e-50 in
  // float32) would round to zero, and one above it (1e39 in float32) to infinity, so those
  // cases go through double like general p.
  const bool native = spec.eps == 0.0 || (eps >= std::numeric_limits<T>::min() && eps <= big);
  if (native && spec.form == root_form::adam) {
    for (index_t i = 0; i < n; ++i) out[i] = T(1) / (std::sqrt(v[i]) + eps);
  } else if (native && spec.p == 2) {
    for (index_t i = 0; i < n; ++i) out[i] = T(1) / std::sqrt(v[i] + eps);
  } else {  // general p, or an eps below T's normal range: in double
    for (index_t i = 0; i < n; ++i)
      out[i] = static_cast<T>(spectral_value(static_cast<double>(v[i]), spec));
  }
  // f > 0 for every finite v and eps; a 0 from T arithmetic means v + eps (or sqrt(v) + eps)
  // overflowed, and double (with spectral_value's halving) gets the representable answer.
  bool positive = true;
  for (index_t i = 0; i < n; ++i) positive &= out[i] > T(0);
  if (!positive) {
    for (index_t i = 0; i < n; ++i)
      if (!(out[i] > T(0))) out[i] = static_cast<T>(spectral_value(static_cast<double>(v[i]), spec));
  }
  if (!detail::all_finite(out, n)) {
    for (index_t i = 0; i < n; ++i)
      if (!finite(out[i]))
        SADDLESCAPE_NUMERICAL_FAIL("the inverse root of v[", i, "] = ", v[i],
                                   " overflows; increase eps");
  }
}

#define SADDLESCAPE_INSTANTIATE(T)                                                              \
  template double default_newton_tolerance<T>(index_t);                                         \
  template class eigen_root<T>;                                                                 \
  template class newton_root<T>;                                                                \
  template void inv_root_batched<T>(const T*, index_t, index_t, const root_spec&, root_method,  \
                                    const newton_options&, T*);                                 \
  template void inv_root_apply<T>(const T*, index_t, const T*, index_t, const root_spec&,       \
                                  root_method, const newton_options&, T*);                      \
  template void diag_inv_root<T>(const T*, index_t, const root_spec&, T*);

SADDLESCAPE_INSTANTIATE(float)
SADDLESCAPE_INSTANTIATE(double)

}  // namespace saddlescape
