#include <saddlescape/matrix_functions.hpp>

#include "checks.hpp"
#include "lapack.hpp"

#include <Eigen/Eigenvalues>

#include <algorithm>
#include <climits>
#include <cmath>
#include <limits>
#include <string>
#include <utility>

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

// f(lambda) of root_spec, in double so that float32 input loses nothing extra here.
double spectral_value(double lambda, const root_spec& spec) {
  if (spec.form == root_form::adam) return 1.0 / (std::sqrt(lambda) + spec.eps);
  const double shifted = lambda + spec.eps;
  if (spec.p == 2) return 1.0 / std::sqrt(shifted);
  return std::pow(shifted, -1.0 / spec.p);
}

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
  Eigen::SelfAdjointEigenSolver<Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>> solver;
  explicit small_solver(index_t d) : solver(d) {}
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
      small_(use_eigen_ ? std::make_unique<small_solver>(dim) : nullptr) {
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
  const index_t d = dim_;
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
  // Both solvers return eigenvalues in ascending order. Those within rounding of zero, of
  // either sign, are set to exactly zero: a rank-deficient G (fewer samples than d) computes
  // null-space eigenvalues of +-1e-16 * lambda_max, and f would amplify that noise (the adam
  // form's sqrt turns 1e-16 into 1e-8, as large as a typical eps).
  const double lo = lambda_[0], hi = lambda_[d - 1];
  if (!std::isfinite(lo) || !std::isfinite(hi))
    SADDLESCAPE_NUMERICAL_FAIL("the eigenvalues of ", what, " are not finite (", lo, ", ", hi,
                               "): its entries are too large for ", detail::type_name<T>());
  lambda_max_abs_ = std::max(std::abs(lo), std::abs(hi));
  const double tol = clip_tolerance<T>(d) * lambda_max_abs_;
  if (lo < -tol)
    throw invalid_argument(concat(what, " is not positive semidefinite: it has the eigenvalue ", lo,
                                  ", below the rounding tolerance -", tol,
                                  " (d * machine epsilon * max|eigenvalue|)"));
  for (index_t i = 0; i < d && lambda_[i] <= tol; ++i) lambda_[i] = 0;
  what_ = std::string(what);
  factored_ = true;
}

template <class T>
void eigen_root<T>::compute_weights(const root_spec& spec) {
  spec.validate();
  SADDLESCAPE_EXPECTS(factored_, "eigen_root: factor(G) must succeed before use");
  const index_t d = dim_;
  if (spec.eps == 0.0 && !(lambda_[0] > 0))
    SADDLESCAPE_NUMERICAL_FAIL(what_, " is singular: its smallest eigenvalue is within rounding (",
                               clip_tolerance<T>(d) * lambda_max_abs_,
                               ") of zero and eps = 0; pass eps > 0");
  for (index_t i = 0; i < d; ++i) {
    const double f = spectral_value(static_cast<double>(lambda_[i]), spec);
    weights_[i] = static_cast<T>(f);
    if (!finite(weights_[i]))
      SADDLESCAPE_NUMERICAL_FAIL("the inverse root of ", what_, " overflows: f(", lambda_[i],
                                 ") = ", f, " is not representable; increase eps");
  }
}

template <class T>
void eigen_root<T>::matrix(const root_spec& spec, T* A) {
  compute_weights(spec);
  const index_t d = dim_;
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
void inv_root_batched(const T* G, index_t n, index_t d, const root_spec& spec, root_method method,
                      const newton_options& opts, T* A) {
  spec.validate();
  opts.validate();
  SADDLESCAPE_EXPECTS(n >= 0, "the batch size must be >= 0, got ", n);
  check_dim(d, "G");
  if (method == root_method::newton) {
    SADDLESCAPE_EXPECTS(spec.form == root_form::inv_sqrt,
                        "method 'newton' computes (G + eps I)^(-1/p) only; form '",
                        to_string(spec.form), "' needs method 'eigh'");
    newton_root<T> solver(d);
    for (index_t i = 0; i < n; ++i)
      solver.compute(G + i * d * d, spec, opts, A + i * d * d, batch_name(n, i));
    return;
  }
  eigen_root<T> solver(d);
  for (index_t i = 0; i < n; ++i) {
    solver.factor(G + i * d * d, batch_name(n, i));
    solver.matrix(spec, A + i * d * d);
  }
}

template <class T>
void inv_root_apply(const T* G, index_t d, const T* v, index_t k, const root_spec& spec,
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
  // float32) would round to zero, so that case goes through double like general p.
  const bool native = spec.eps == 0.0 || eps >= std::numeric_limits<T>::min();
  if (native && spec.form == root_form::adam) {
    for (index_t i = 0; i < n; ++i) out[i] = T(1) / (std::sqrt(v[i]) + eps);
  } else if (native && spec.p == 2) {
    for (index_t i = 0; i < n; ++i) out[i] = T(1) / std::sqrt(v[i] + eps);
  } else {  // general p, or an eps below T's normal range: in double
    for (index_t i = 0; i < n; ++i)
      out[i] = static_cast<T>(spectral_value(static_cast<double>(v[i]), spec));
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
