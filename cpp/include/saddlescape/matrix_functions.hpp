#pragma once
/// @file matrix_functions.hpp
/// Inverse matrix roots of symmetric positive semidefinite matrices: the preconditioners
/// A = (G + eps I)^(-1/p) of the paper (Sec. 3, 4) and the Adam form (G^(1/2) + eps I)^(-1).
///
/// Conventions shared by every function here:
/// - Matrices are dense, contiguous and row-major; a symmetric matrix has the same layout in
///   row- and column-major order, so LAPACK reads it as it is.
/// - G must be finite and symmetric up to `symmetry_tolerance<T>() * max|G|`; its two triangles are
///   averaged before use, so a tiny asymmetry from rounding is harmless.
/// - Eigenvalues of G that are negative only through rounding (>= -clip_tolerance * lambda_max,
///   clip_tolerance = d * machine epsilon of T) are clipped to zero. A clearly negative eigenvalue
///   is an invalid_argument naming it.
/// - With eps = 0 a (numerically) singular G, one whose smallest eigenvalue is at most
///   clip_tolerance * lambda_max, has no inverse root: numerical_error.
/// - Results are checked to be finite; overflow is a numerical_error.
/// - Inputs are never modified.

#include <saddlescape/errors.hpp>

#include <Eigen/Core>

#include <cstddef>
#include <memory>
#include <string_view>
#include <vector>

namespace saddlescape {

using index_t = std::ptrdiff_t;

template <class T>
using row_matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using column_vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;

/// Which matrix function of G a preconditioner is.
enum class root_form {
  inv_sqrt,  ///< (G + eps I)^(-1/p): the form analysed in the paper (p = 2 for RMSProp).
  adam,      ///< (G^(1/2) + eps I)^(-1): the form Adam and RMSProp implement; p must be 2.
};

/// How the matrix function is computed.
enum class root_method {
  eigh,    ///< LAPACK symmetric eigendecomposition (divide and conquer), then V f(Lambda) V^T.
  newton,  ///< Matmul-only coupled Newton iteration (Guo and Higham, 2006); form inv_sqrt only.
};

/// Parses "inv_sqrt" / "adam". @throws invalid_argument naming any other string.
root_form parse_root_form(std::string_view name);
/// Parses "eigh" / "newton". @throws invalid_argument naming any other string.
root_method parse_root_method(std::string_view name);
std::string_view to_string(root_form form);
std::string_view to_string(root_method method);

/// The scalar function f applied to the eigenvalues lambda of G:
/// f(lambda) = (lambda + eps)^(-1/p) for root_form::inv_sqrt, 1 / (sqrt(lambda) + eps) for adam.
struct root_spec {
  int p = 2;         ///< The root; >= 1. adam requires p == 2.
  double eps = 0.0;  ///< Damping; finite and >= 0.
  root_form form = root_form::inv_sqrt;

  /// @throws invalid_argument if p < 1, eps < 0 or non-finite, or adam with p != 2.
  void validate() const;
};

/// Stopping rule of the Newton iteration.
struct newton_options {
  /// Stop when ||M_k - I||_F / sqrt(d) <= tol, where M_k -> I is the coupled iterate.
  /// 0 selects default_newton_tolerance<T>(d).
  double tol = 0.0;
  /// More iterations than this is a numerical_error (never a silent partial result).
  int max_iter = 100;

  /// @throws invalid_argument if tol < 0 or max_iter < 1.
  void validate() const;
};

/// Relative asymmetry max|G - G^T| / max|G| above which G is rejected.
template <class T>
constexpr double symmetry_tolerance() {
  return 1000.0 * static_cast<double>(Eigen::NumTraits<T>::epsilon());
}

/// Eigenvalues below clip_tolerance<T>(d) * lambda_max count as rounding noise around zero.
template <class T>
double clip_tolerance(index_t d) {
  return static_cast<double>(d) * static_cast<double>(Eigen::NumTraits<T>::epsilon());
}

/// The Newton tolerance used when newton_options::tol is 0: 100 * machine epsilon * sqrt(d),
/// roughly the rounding floor of the residual after one d x d product.
template <class T>
double default_newton_tolerance(index_t d);

/// Which eigensolver eigen_root uses.
enum class eigen_backend {
  automatic,  ///< Eigen for d <= small_matrix_limit (no call overhead), LAPACK above.
  lapack,     ///< LAPACK syevd (divide and conquer, multithreaded BLAS-3 back-transformation).
  eigen,      ///< Eigen's SelfAdjointEigenSolver (tridiagonal QR), single-threaded.
};

/// Largest d for which eigen_backend::automatic picks Eigen's solver; measured by
/// bench/cpp/bench_inv_sqrt (see bench/RESULTS.md).
constexpr index_t small_matrix_limit = 48;

/// Eigendecomposition-based inverse roots with a workspace sized once for dimension d.
///
/// factor(G) computes G = V diag(lambda) V^T (LAPACK syevd on the averaged triangles) and
/// checks positive semidefiniteness. Afterwards any number of matrix functions
/// A = V diag(f(lambda)) V^T, or their action A v, are evaluated without refactoring: this
/// is what lets an estimator reuse one decomposition for several steps.
/// The matrix is formed as W W^T with W = V diag(f(lambda)^(1/2)), one symmetric rank-d
/// update (BLAS syrk), half the work of a general product.
///
/// Not thread-safe: each thread needs its own object.
template <class T>
class eigen_root {
 public:
  /// @param[in] dim d >= 1. @throws invalid_argument otherwise.
  explicit eigen_root(index_t dim, eigen_backend backend = eigen_backend::automatic);
  ~eigen_root();
  eigen_root(eigen_root&&) noexcept;
  eigen_root& operator=(eigen_root&&) noexcept;

  index_t dim() const noexcept { return dim_; }

  /// Factors the d x d row-major G.
  /// @throws invalid_argument if G is non-finite, asymmetric or has a clearly negative eigenvalue.
  /// @throws numerical_error if the eigensolver fails to converge.
  /// On failure the previous factorisation is lost (factored() is false).
  void factor(const T* G, std::string_view what = "G");

  /// Takes a factorisation computed elsewhere (e.g. a float64 retry of a float32 matrix): the
  /// column-major d x d eigenvectors and the d ascending eigenvalues, both rounded to T, with
  /// the eigenvalue checks of factor() at T's precision.
  /// @throws numerical_error if an eigenvalue is not finite in T; invalid_argument if one is
  ///   clearly negative. On failure factored() is false.
  void assign(const double* vectors, const double* lambda, std::string_view what);

  bool factored() const noexcept { return factored_; }

  /// Eigenvalues of the last factor(), ascending; those within rounding of zero
  /// (|lambda| <= clip_tolerance * max|lambda|) are exactly 0.
  const std::vector<T>& eigenvalues() const { return lambda_; }
  /// Eigenvectors of the last factor(), as the columns of a column-major d x d matrix.
  const T* eigenvectors() const { return vectors_.data(); }

  /// Writes A = V diag(f(lambda)) V^T into the d x d buffer A.
  /// @throws invalid_argument for a bad spec or if nothing is factored.
  /// @throws numerical_error if f(lambda) is infinite (singular G with eps = 0, or overflow).
  void matrix(const root_spec& spec, T* A);

  /// Writes out = A v for v of shape (d, k), row-major, without forming A:
  /// out = V (f(Lambda) (V^T v)), two products of cost 2 d^2 k each.
  void apply(const root_spec& spec, const T* v, index_t k, T* out);

 private:
  /// Fills weights_ with f(lambda), throws if any is not finite.
  void compute_weights(const root_spec& spec);

  // No Eigen object is a member: their layout and allocator depend on the vectorisation flags
  // a caller compiles with (-mavx2 vs not), which must not change this class's ABI. Eigen's
  // solver lives behind a pointer, created and destroyed inside the library.
  struct small_solver;
  index_t dim_;
  bool use_eigen_;
  bool factored_ = false;
  bool assigned_ = false;  // the factorisation came from assign(), not from small_'s solver
  std::unique_ptr<small_solver> small_;
  std::vector<T> vectors_;   // column-major eigenvectors
  std::vector<T> lambda_;    // eigenvalues
  std::vector<T> weights_;
  std::vector<T> scaled_;    // W, or V^T v for apply
  std::vector<T> work_;
  std::vector<int> iwork_;
  double lambda_max_abs_ = 0.0;
  std::string what_;
};

/// Matmul-only inverse p-th root (G + eps I)^(-1/p) by the coupled Newton iteration of
/// Guo and Higham (2006): with c >= lambda_max(B), B = G + eps I,
///   X_0 = c^(-1/p) I, M_0 = B / c,
///   T_k = ((p + 1) I - M_k) / p,  X_(k+1) = X_k T_k,  M_(k+1) = T_k^p M_k,
/// so that M_k = X_k^p B -> I and X_k -> B^(-1/p). Converges for every symmetric positive
/// definite B; the number of iterations grows like log(cond(B)).
/// Only root_form::inv_sqrt (with any p) is supported: the adam form has no such iteration.
template <class T>
class newton_root {
 public:
  explicit newton_root(index_t dim);

  index_t dim() const noexcept { return dim_; }

  /// Writes (G + eps I)^(-1/p) into A (d x d, row-major, symmetric).
  /// @throws invalid_argument for bad input, a bad spec, the adam form, or (found on the failure
  ///   path by an eigenvalue check) a G with a clearly negative eigenvalue.
  /// @throws numerical_error if the iteration does not reach opts.tol within opts.max_iter, or
  ///   diverges; the message names the residual reached and whether G is singular.
  void compute(const T* G, const root_spec& spec, const newton_options& opts, T* A,
               std::string_view what = "G");

  /// Iterations taken and residual ||M - I||_F / sqrt(d) reached by the last compute().
  int iterations() const noexcept { return iterations_; }
  double residual() const noexcept { return residual_; }

 private:
  index_t dim_;
  std::vector<T> m_, x_, t_, w_;  // M_k, X_k, T_k and a product scratch
  int iterations_ = 0;
  double residual_ = 0.0;
};

/// A = f(G) for a batch of n row-major d x d matrices stored back to back (n may be 0).
/// One workspace serves the whole batch. Messages name the offending matrix as G[i].
template <class T>
void inv_root_batched(const T* G, index_t n, index_t d, const root_spec& spec,
                      root_method method, const newton_options& opts, T* A);

/// out = f(G) v for one d x d G and v of shape (d, k), row-major.
template <class T>
void inv_root_apply(const T* G, index_t d, const T* v, index_t k, const root_spec& spec,
                    root_method method, const newton_options& opts, T* out);

/// The diagonal case, elementwise: out_i = f(v_i) for v_i >= 0.
/// @throws invalid_argument for a negative or non-finite entry (named with its index).
/// @throws numerical_error for a zero entry with eps = 0, or overflow.
template <class T>
void diag_inv_root(const T* v, index_t n, const root_spec& spec, T* out);

// ---------------------------------------------------------------------------------------------
// Eigen-facing conveniences. They evaluate their argument into a contiguous row-major matrix
// (free when it already is one) and call the pointer functions above.

namespace detail {
/// f(G) for any square Eigen expression G, evaluated into a contiguous row-major matrix.
template <class Derived>
row_matrix<typename Derived::Scalar> inv_root_of(const Eigen::MatrixBase<Derived>& G,
                                                 const root_spec& spec, root_method method,
                                                 const newton_options& opts) {
  using T = typename Derived::Scalar;
  const row_matrix<T> g = G;
  SADDLESCAPE_EXPECTS(g.rows() == g.cols(), "G must be square, got ", g.rows(), " x ",
                      g.cols());
  row_matrix<T> a(g.rows(), g.cols());
  inv_root_batched<T>(g.data(), 1, g.rows(), spec, method, opts, a.data());
  return a;
}
}  // namespace detail

/// (G + eps I)^(-1/2), or (G^(1/2) + eps I)^(-1) with root_form::adam.
template <class Derived>
row_matrix<typename Derived::Scalar> inv_sqrt(const Eigen::MatrixBase<Derived>& G,
                                              double eps = 0.0,
                                              root_form form = root_form::inv_sqrt,
                                              root_method method = root_method::eigh,
                                              const newton_options& opts = {}) {
  return detail::inv_root_of(G, root_spec{2, eps, form}, method, opts);
}

/// (G + eps I)^(-1/p) for an integer p >= 1.
template <class Derived>
row_matrix<typename Derived::Scalar> inv_root(const Eigen::MatrixBase<Derived>& G, int p,
                                              double eps = 0.0,
                                              root_method method = root_method::eigh,
                                              const newton_options& opts = {}) {
  return detail::inv_root_of(G, root_spec{p, eps, root_form::inv_sqrt}, method, opts);
}

/// A V for A = inv_sqrt(G, eps, form) and V of shape (d, k), without forming A.
template <class DerivedG, class DerivedV>
row_matrix<typename DerivedG::Scalar> inv_sqrt_apply(const Eigen::MatrixBase<DerivedG>& G,
                                                     const Eigen::MatrixBase<DerivedV>& V,
                                                     double eps = 0.0,
                                                     root_form form = root_form::inv_sqrt) {
  using T = typename DerivedG::Scalar;
  const row_matrix<T> g = G;
  const row_matrix<T> v = V;
  SADDLESCAPE_EXPECTS(g.rows() == g.cols(), "G must be square, got ", g.rows(), " x ",
                      g.cols());
  SADDLESCAPE_EXPECTS(v.rows() == g.rows(), "v must have ", g.rows(), " rows to match G, got ",
                      v.rows());
  row_matrix<T> out(v.rows(), v.cols());
  inv_root_apply<T>(g.data(), g.rows(), v.data(), v.cols(), root_spec{2, eps, form},
                    root_method::eigh, {}, out.data());
  return out;
}

/// Elementwise (v + eps)^(-1/2), or 1 / (sqrt(v) + eps) with root_form::adam.
template <class Derived>
column_vector<typename Derived::Scalar> diag_inv_sqrt(const Eigen::MatrixBase<Derived>& v,
                                                      double eps = 0.0,
                                                      root_form form = root_form::inv_sqrt) {
  using T = typename Derived::Scalar;
  const column_vector<T> x = v;
  column_vector<T> out(x.size());
  diag_inv_root<T>(x.data(), x.size(), root_spec{2, eps, form}, out.data());
  return out;
}

}  // namespace saddlescape
