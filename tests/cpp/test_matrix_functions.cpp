// Unit tests of the public matrix-function API (saddlescape/matrix_functions.hpp).
//
// Every numerical result is compared with a float64 reference computed here with Eigen's own
// eigensolvers (independent of the LAPACK syevd the library calls; see `reference`), on inputs that
// are not friendly: random SPD, rank-deficient with eps > 0, ill-conditioned (condition number
// 1e10), d = 1, 2 and 200, float and double.
//
// Tolerances (see `tolerance` below) come from the conditioning of the matrix function, not
// from what happened to pass. Errors are measured in the Frobenius norm, the norm in which the
// bounds are stated:
// - A backward-stable symmetric eigensolver in precision u returns the exact eigenpairs of
//   G + E with ||E||_2 <= delta = d * u * ||G||_2 (Golub and Van Loan, Sec. 8.1; d stands in for
//   the small polynomial p(d) of the theorem), so ||E||_F <= sqrt(d) * delta.
// - By the Daleckii-Krein formula, f(G + E) - f(G) = sum_ij f[lambda_i, lambda_j] (v_i^T E v_j)
//   v_i v_j^T to first order, so its Frobenius norm is at most max |f[lambda_i, lambda_j]| *
//   ||E||_F, and for the monotone f here the largest divided difference is the change of f
//   across [lambda_i - delta, lambda_i + delta] at the eigenvalue nearest zero (divided by delta).
// - Forming A = W W^T (or V F V^T v) from slightly non-orthogonal computed factors adds
//   about 2 d u trace(A) (products of length d: gamma_d || |W| |W^T| ||_F <= d u ||W||_F^2).
// Hence ||A - A_ref||_F <= sqrt(d) max_i |f(lambda_i +- delta) - f(lambda_i)| + 2 d u trace(A),
// times a safety factor of 4 for the handful of roundings in f itself and the reference's own
// (float64) error. Relative to ||A||_2 = f(lambda_min) this is about d^(3/2) u cond(G + eps I)/p:
// it grows with the condition number exactly as the problem's sensitivity does. For the Adam
// form near a zero eigenvalue f = 1/(sqrt(lambda) + eps) is not Lipschitz, and the bound becomes
// about sqrt(d^3 u ||G||) / eps: that is the price of that form, not slack in the test.

#include <saddlescape/saddlescape.hpp>

#include <gtest/gtest.h>

#include "expect_throw.hpp"
#include <Eigen/Dense>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace {

namespace ss = saddlescape;
using ss::index_t;
using ss::root_form;
using ss::root_method;
using ss::root_spec;
using dmat = Eigen::MatrixXd;  // column-major float64: the reference side
using dvec = Eigen::VectorXd;
template <class T>
using rmat = ss::row_matrix<T>;

// ---------------------------------------------------------------------------------------------
// Error checks: EXPECT_INVALID / EXPECT_NUMERICAL from expect_throw.hpp.

// ---------------------------------------------------------------------------------------------
// Inputs.

dmat gaussian(index_t rows, index_t cols, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal;
  dmat x(rows, cols);
  for (index_t j = 0; j < cols; ++j)
    for (index_t i = 0; i < rows; ++i) x(i, j) = normal(rng);
  return x;
}

// (A + A^T) / 2 is exactly symmetric in floating point (a + b == b + a).
dmat symmetric_part(const dmat& a) { return (a + a.transpose()) / 2; }

// Q diag(lambda) Q^T with Q orthogonal, from a Householder QR of a Gaussian matrix.
dmat with_spectrum(const dvec& lambda, std::uint64_t seed) {
  const index_t d = lambda.size();
  const Eigen::HouseholderQR<dmat> qr(gaussian(d, d, seed));
  const dmat q = qr.householderQ() * dmat::Identity(d, d);
  return symmetric_part(q * lambda.asDiagonal() * q.transpose());
}

enum class kind { spd, rank_deficient, ill_conditioned };

const char* name(kind k) {
  switch (k) {
    case kind::spd:
      return "random SPD";
    case kind::rank_deficient:
      return "rank-deficient";
    case kind::ill_conditioned:
      return "ill-conditioned";
  }
  return "?";
}

// spd: a Wishart matrix X X^T / m with m = 2d + 1 (condition number about 34).
// rank_deficient: X X^T / r with X of shape d x r, r = d / 2 (for d = 1 that is G = 0).
// ill_conditioned: spectrum logspace(0, -10, d), so cond(G) = 1e10; for d = 1, G = [1e-10],
//   a test of scale rather than conditioning.
dmat make(kind k, index_t d, std::uint64_t seed) {
  switch (k) {
    case kind::spd: {
      const dmat x = gaussian(d, 2 * d + 1, seed);
      return symmetric_part(x * x.transpose() / double(2 * d + 1));
    }
    case kind::rank_deficient: {
      const index_t r = d / 2;
      if (r == 0) return dmat::Zero(d, d);
      const dmat x = gaussian(d, r, seed);
      return symmetric_part(x * x.transpose() / double(r));
    }
    case kind::ill_conditioned: {
      dvec lambda(d);
      for (index_t i = 0; i < d; ++i)
        lambda[i] = d == 1 ? 1e-10 : std::pow(10.0, -10.0 * double(i) / double(d - 1));
      return with_spectrum(lambda, seed);
    }
  }
  return {};
}

// The matrix as the library sees it in precision T. The reference works on exactly these
// values (float -> double is exact), so it answers the question the library was asked.
template <class T>
rmat<T> as(const dmat& g) {
  return g.cast<T>();
}
template <class T>
dmat to_double(const rmat<T>& g) {
  return g.template cast<double>();
}

// ---------------------------------------------------------------------------------------------
// Reference.

double f_ref(double lambda, const root_spec& s) {
  if (s.form == root_form::adam) return 1.0 / (std::sqrt(lambda) + s.eps);
  return std::pow(lambda + s.eps, -1.0 / double(s.p));
}

// Up to this size the reference is Eigen's two-sided Jacobi SVD (the most accurate symmetric
// eigensolver there is, Demmel and Veselic 1992, and cheap at this size); above it, Eigen's
// SelfAdjointEigenSolver (Householder tridiagonalisation + implicit QR). The library uses LAPACK
// syevd (divide and conquer), and a small-matrix fast path in the library would most likely be
// SelfAdjointEigenSolver, so for small d the reference must be yet another algorithm to stay
// independent.
constexpr index_t jacobi_limit = 64;

struct reference {
  dvec lambda;  // ascending, >= 0
  dmat vectors;

  explicit reference(const dmat& g) {
    if (g.rows() <= jacobi_limit) {
      // For a symmetric positive semidefinite G the SVD is the eigendecomposition: the left
      // singular vectors are eigenvectors and the singular values are the eigenvalues (a
      // rounding-level negative eigenvalue comes back as its absolute value, which is as good
      // as the clipped 0). Reversed into ascending order, like the other solvers.
      const Eigen::JacobiSVD<dmat> svd(g, Eigen::ComputeFullU);
      lambda = svd.singularValues().reverse();
      vectors = svd.matrixU().rowwise().reverse();
    } else {
      const Eigen::SelfAdjointEigenSolver<dmat> es(g);
      if (es.info() != Eigen::Success) throw std::runtime_error("reference eigensolver failed");
      lambda = es.eigenvalues().cwiseMax(0.0);
      vectors = es.eigenvectors();
    }
  }

  dmat matrix(const root_spec& s) const {
    dvec w(lambda.size());
    for (index_t i = 0; i < w.size(); ++i) w[i] = f_ref(lambda[i], s);
    return vectors * w.asDiagonal() * vectors.transpose();
  }
};

template <class T>
double unit_roundoff() {
  return double(std::numeric_limits<T>::epsilon());
}

// The bound derived at the top of this file, for a result computed in precision T.
template <class T>
double tolerance(const reference& r, const root_spec& s) {
  const index_t d = r.lambda.size();
  const double u = unit_roundoff<T>();
  const double delta = double(d) * u * r.lambda.maxCoeff();
  double spread = 0.0, trace = 0.0;
  for (index_t i = 0; i < d; ++i) {
    const double l = r.lambda[i], f = f_ref(l, s);
    spread = std::max({spread, std::abs(f_ref(std::max(l - delta, 0.0), s) - f),
                       std::abs(f_ref(l + delta, s) - f)});
    trace += f;
  }
  return 4 * (std::sqrt(double(d)) * spread + 2 * double(d) * u * trace);
}

// The Newton iteration stops at ||M - I||_F / sqrt(d) <= tol_N with M = X^p B, so
// X = B^(-1/p) (I + F)^(1/p) with ||F||_F <= sqrt(d) tol_N: a further ||A||_2 sqrt(d) tol_N / p
// in the Frobenius norm on top of the rounding bound above (the coupled iteration is stable,
// Guo and Higham 2006, so its rounding behaves like that of the eigensolver path).
template <class T>
double newton_tolerance(const reference& r, const root_spec& s) {
  const index_t d = r.lambda.size();
  const double norm_a = f_ref(r.lambda.minCoeff(), s);
  return tolerance<T>(r, s) +
         4 * norm_a * std::sqrt(double(d)) * ss::default_newton_tolerance<T>(d) / double(s.p);
}

// For out = A v: ||A v - A_ref v||_F <= ||A - A_ref||_2 ||v||_F plus the rounding of the
// products through V (length-d sums over |V| f |V^T| |v|), at most 2 d u sqrt(d) max f ||v||_F.
template <class T>
double apply_tolerance(const reference& r, const root_spec& s, double tol_a, const dmat& v) {
  const index_t d = r.lambda.size();
  const double fmax = f_ref(r.lambda.minCoeff(), s);
  return (tol_a + 4 * 2 * double(d) * unit_roundoff<T>() * std::sqrt(double(d)) * fmax) * v.norm();
}

bool verbose() { return std::getenv("SADDLESCAPE_TEST_VERBOSE") != nullptr; }

// ||got - want||_F <= tol, with the ratio printed on request (SADDLESCAPE_TEST_VERBOSE=1) to
// re-derive margins.
template <class Got>
void expect_close(const Got& got, const dmat& want, double tol, const std::string& what) {
  ASSERT_EQ(got.rows(), want.rows()) << what;
  ASSERT_EQ(got.cols(), want.cols()) << what;
  const dmat g = got.template cast<double>();
  ASSERT_TRUE(g.allFinite()) << what;
  const double err = (g - want).norm();
  if (verbose())
    std::printf("  %-72s err %.2e tol %.2e ratio %.3f\n", what.c_str(), err, tol,
                tol > 0 ? err / tol : 0.0);
  EXPECT_LE(err, tol) << what << " (||want||_F = " << want.norm() << ")";
}

std::string describe(kind k, index_t d, const root_spec& s, root_method m) {
  std::ostringstream os;
  os << name(k) << " d=" << d << " p=" << s.p << " eps=" << s.eps << " form=" << to_string(s.form)
     << " method=" << to_string(m);
  return os.str();
}

// Bitwise comparison: "never modified" means not even by an in-place symmetrisation.
template <class A, class B>
bool same_bits(const A& a, const B& b) {
  using T = typename A::Scalar;
  // memcmp must not see the null data() of an empty matrix.
  return a.size() == b.size() &&
         (a.size() == 0 ||
          std::memcmp(a.data(), b.data(), sizeof(T) * static_cast<std::size_t>(a.size())) == 0);
}

// ---------------------------------------------------------------------------------------------
// Typed over float and double.

template <class T>
class MatrixFunctions : public ::testing::Test {};
using Scalars = ::testing::Types<float, double>;
TYPED_TEST_SUITE(MatrixFunctions, Scalars);

// The specs that make sense for each kind of matrix in precision T. Singular G needs eps > 0.
// In float, cond = 1e10 is past the precision (the smallest eigenvalues are rounding noise), so
// there the ill-conditioned matrix is tested with an eps that makes cond(G + eps I) ~ 1e3 and,
// in Errors.NumericalErrors below, with eps = 0 as a numerical_error.
template <class T>
std::vector<root_spec> specs_for(kind k) {
  const bool single = std::is_same_v<T, float>;
  std::vector<double> epss;
  switch (k) {
    case kind::spd:
      epss = {0.0, 1e-3};
      break;
    case kind::rank_deficient:
      epss = {1e-3, 0.5};
      break;
    case kind::ill_conditioned:
      epss = single ? std::vector<double>{1e-3} : std::vector<double>{0.0, 1e-6};
      break;
  }
  std::vector<root_spec> out;
  for (double eps : epss) {
    for (int p : {1, 2, 3}) out.push_back({p, eps, root_form::inv_sqrt});
    out.push_back({2, eps, root_form::adam});
  }
  return out;
}

TYPED_TEST(MatrixFunctions, BatchedMatchesEigenReference) {
  using T = TypeParam;
  for (kind k : {kind::spd, kind::rank_deficient, kind::ill_conditioned}) {
    for (index_t d : {1, 2, 200}) {
      const rmat<T> g = as<T>(make(k, d, 1000 + d));
      const rmat<T> g_copy = g;
      const reference ref(to_double(g));
      for (const root_spec& s : specs_for<T>(k)) {
        // Newton has no Adam form (tested as an error below).
        for (root_method m : {root_method::eigh, root_method::newton}) {
          if (m == root_method::newton && s.form == root_form::adam) continue;
          const std::string what = describe(k, d, s, m);
          SCOPED_TRACE(what);
          rmat<T> a(d, d);
          ss::inv_root_batched<T>(g.data(), 1, d, s, m, {}, a.data());
          EXPECT_TRUE(same_bits(g, g_copy)) << "input modified";
          const double tol =
              m == root_method::eigh ? tolerance<T>(ref, s) : newton_tolerance<T>(ref, s);
          expect_close(a, ref.matrix(s), tol, what);
          // A is symmetric to the last bit: syrk + mirroring, or the averaged Newton iterate.
          EXPECT_TRUE(a == a.transpose()) << what;
        }
      }
    }
  }
}

TYPED_TEST(MatrixFunctions, EigenRootReusesOneFactorisation) {
  using T = TypeParam;
  const index_t d = 200;
  // Rank-deficient, so that eps = 0 is the one spec that must fail while the others work from
  // the same factors.
  const rmat<T> g = as<T>(make(kind::rank_deficient, d, 7));
  const rmat<T> g_copy = g;
  const reference ref(to_double(g));

  ss::eigen_root<T> er(d);
  EXPECT_EQ(er.dim(), d);
  EXPECT_FALSE(er.factored());
  er.factor(g.data());
  ASSERT_TRUE(er.factored());
  EXPECT_TRUE(same_bits(g, g_copy));

  // Eigenvalues: ascending, clipped at 0, and close to the reference to within delta.
  const auto& lam_vec = er.eigenvalues();
  ASSERT_EQ(static_cast<index_t>(lam_vec.size()), d);
  const Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, 1>> lam(lam_vec.data(), d);
  EXPECT_GE(lam.minCoeff(), T(0));
  for (index_t i = 1; i < d; ++i) EXPECT_LE(lam[i - 1], lam[i]);
  const double delta = double(d) * unit_roundoff<T>() * ref.lambda.maxCoeff();
  EXPECT_LE((lam.template cast<double>() - ref.lambda).cwiseAbs().maxCoeff(), delta);
  // Eigenvectors: column-major, orthonormal to working precision.
  const Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>> v(er.eigenvectors(), d,
                                                                             d);
  const dmat vtv = (v.transpose() * v).template cast<double>();
  EXPECT_LE((vtv - dmat::Identity(d, d)).cwiseAbs().maxCoeff(), double(d) * unit_roundoff<T>());

  // Several specs from the one factorisation: eps, p and form change without refactoring.
  const std::vector<root_spec> specs = {{2, 1e-3, root_form::inv_sqrt},
                                        {2, 0.5, root_form::inv_sqrt},
                                        {3, 1e-3, root_form::inv_sqrt},
                                        {2, 1e-3, root_form::adam},
                                        {1, 0.5, root_form::inv_sqrt}};
  const dmat vs = gaussian(d, 5, 99);
  for (const root_spec& s : specs) {
    const std::string what = describe(kind::rank_deficient, d, s, root_method::eigh);
    SCOPED_TRACE(what);
    rmat<T> a(d, d);
    er.matrix(s, a.data());
    const dmat want = ref.matrix(s);
    const double tol = tolerance<T>(ref, s);
    expect_close(a, want, tol, what + " matrix");

    // apply for k = 0, 1, 5 from the same factors: out = A v without forming A (tolerance:
    // apply_tolerance).
    for (index_t k : {0, 1, 5}) {
      const rmat<T> vk = as<T>(dmat(vs.leftCols(k)));
      const rmat<T> vk_copy = vk;
      rmat<T> out = rmat<T>::Constant(d, k, T(-7));
      er.apply(s, vk.data(), k, out.data());
      EXPECT_TRUE(same_bits(vk, vk_copy));
      const dmat vd = to_double(vk);
      expect_close(out, want * vd, apply_tolerance<T>(ref, s, tol, vd),
                   what + " apply k=" + std::to_string(k));
    }
  }
  // eps = 0 on the singular G fails numerically, and leaves the factorisation usable.
  rmat<T> a(d, d);
  EXPECT_NUMERICAL("singular", er.matrix({2, 0.0, root_form::inv_sqrt}, a.data()));
  EXPECT_TRUE(er.factored());
  er.matrix(specs[0], a.data());
  expect_close(a, ref.matrix(specs[0]), tolerance<T>(ref, specs[0]), "after a failed spec");

  // A new G in the same workspace.
  const rmat<T> g2 = as<T>(make(kind::spd, d, 8));
  const reference ref2(to_double(g2));
  er.factor(g2.data());
  er.matrix(specs[1], a.data());
  expect_close(a, ref2.matrix(specs[1]), tolerance<T>(ref2, specs[1]), "refactored");

  // A failed factor() forgets the previous factorisation rather than leaving it half-valid.
  rmat<T> bad = g2;
  bad(3, 4) = std::numeric_limits<T>::quiet_NaN();
  EXPECT_INVALID("G[3, 4]", er.factor(bad.data()));
  EXPECT_FALSE(er.factored());
  EXPECT_INVALID("factor(G) must succeed", er.matrix(specs[0], a.data()));
  rmat<T> out(d, 1);
  EXPECT_INVALID("factor(G) must succeed",
                 er.apply(specs[0], vs.col(0).template cast<T>().eval().data(), 1, out.data()));
}

TYPED_TEST(MatrixFunctions, BatchesIncludingEmpty) {
  using T = TypeParam;
  const index_t d = 6, n = 3;
  // Three different kinds back to back, so that a workspace reused across the batch cannot
  // leak one matrix into the next unnoticed.
  const std::vector<dmat> gs = {make(kind::spd, d, 1), make(kind::rank_deficient, d, 2),
                                make(kind::ill_conditioned, d, 3)};
  rmat<T> batch(n * d, d);  // n row-major d x d blocks back to back
  for (index_t i = 0; i < n; ++i) batch.middleRows(i * d, d) = gs[i].cast<T>();
  const rmat<T> batch_copy = batch;
  const root_spec s{2, 1e-3, root_form::inv_sqrt};

  for (root_method m : {root_method::eigh, root_method::newton}) {
    rmat<T> a(n * d, d);
    ss::inv_root_batched<T>(batch.data(), n, d, s, m, {}, a.data());
    EXPECT_TRUE(same_bits(batch, batch_copy));
    for (index_t i = 0; i < n; ++i) {
      const reference ref(to_double<T>(batch.middleRows(i * d, d)));
      const double tol =
          m == root_method::eigh ? tolerance<T>(ref, s) : newton_tolerance<T>(ref, s);
      expect_close(rmat<T>(a.middleRows(i * d, d)), ref.matrix(s), tol,
                   "batch item " + std::to_string(i) + " " + std::string(to_string(m)));
    }
  }
  // The adam form in a batch (eigh only).
  {
    const root_spec sa{2, 1e-3, root_form::adam};
    rmat<T> a(n * d, d);
    ss::inv_root_batched<T>(batch.data(), n, d, sa, root_method::eigh, {}, a.data());
    for (index_t i = 0; i < n; ++i) {
      const reference ref(to_double<T>(batch.middleRows(i * d, d)));
      expect_close(rmat<T>(a.middleRows(i * d, d)), ref.matrix(sa), tolerance<T>(ref, sa),
                   "adam batch item " + std::to_string(i));
    }
  }

  // n = 0: nothing is read or written; null pointers are fine.
  for (root_method m : {root_method::eigh, root_method::newton}) {
    rmat<T> untouched = rmat<T>::Constant(d, d, T(-7));
    EXPECT_NO_THROW(ss::inv_root_batched<T>(nullptr, 0, d, s, m, {}, nullptr));
    EXPECT_NO_THROW(ss::inv_root_batched<T>(batch.data(), 0, d, s, m, {}, untouched.data()));
    EXPECT_TRUE((untouched.array() == T(-7)).all());
  }

  // A bad matrix in the middle of a batch is named by its index.
  rmat<T> bad = batch;
  bad(1 * d + 2, 2) = -std::numeric_limits<T>::infinity();
  rmat<T> a(n * d, d);
  EXPECT_INVALID("G[1]",
                 ss::inv_root_batched<T>(bad.data(), n, d, s, root_method::eigh, {}, a.data()));
  EXPECT_INVALID("G[1]",
                 ss::inv_root_batched<T>(bad.data(), n, d, s, root_method::newton, {}, a.data()));
  EXPECT_INVALID("got -1",
                 ss::inv_root_batched<T>(batch.data(), -1, d, s, root_method::eigh, {}, a.data()));
}

TYPED_TEST(MatrixFunctions, ApplyMatchesReference) {
  using T = TypeParam;
  for (index_t d : {1, 2, 200}) {
    const rmat<T> g = as<T>(make(kind::ill_conditioned, d, 11));
    const rmat<T> g_copy = g;
    const reference ref(to_double(g));
    const root_spec s{2, std::is_same_v<T, float> ? 1e-3 : 1e-6, root_form::inv_sqrt};
    const dmat want_a = ref.matrix(s);
    for (root_method m : {root_method::eigh, root_method::newton}) {
      const double tol_a =
          m == root_method::eigh ? tolerance<T>(ref, s) : newton_tolerance<T>(ref, s);
      for (index_t k : {0, 1, 5}) {
        const rmat<T> v = as<T>(gaussian(d, k, 5));
        const rmat<T> v_copy = v;
        rmat<T> out = rmat<T>::Constant(d, k, T(-7));
        ss::inv_root_apply<T>(g.data(), d, v.data(), k, s, m, {}, out.data());
        EXPECT_TRUE(same_bits(g, g_copy));
        EXPECT_TRUE(same_bits(v, v_copy));
        const dmat vd = to_double(v);
        expect_close(out, want_a * vd, apply_tolerance<T>(ref, s, tol_a, vd),
                     "apply d=" + std::to_string(d) + " k=" + std::to_string(k) + " " +
                         std::string(to_string(m)));
      }
    }
  }
}

TYPED_TEST(MatrixFunctions, NewtonRootReportsIterations) {
  using T = TypeParam;
  const index_t d = 50;
  const rmat<T> g = as<T>(make(kind::spd, d, 21));
  const reference ref(to_double(g));
  ss::newton_root<T> nr(d);
  EXPECT_EQ(nr.dim(), d);
  for (int p : {1, 2, 3}) {
    const root_spec s{p, 0.0, root_form::inv_sqrt};
    rmat<T> a(d, d);
    nr.compute(g.data(), s, {}, a.data());
    EXPECT_GE(nr.iterations(), 1);
    EXPECT_LE(nr.residual(), ss::default_newton_tolerance<T>(d));
    expect_close(a, ref.matrix(s), newton_tolerance<T>(ref, s),
                 "newton_root p=" + std::to_string(p));
    // An explicit, looser tol stops no later than the default.
    const int default_iters = nr.iterations();
    nr.compute(g.data(), s, {1e-2, 100}, a.data());
    EXPECT_LE(nr.iterations(), default_iters);
    EXPECT_LE(nr.residual(), 1e-2);
  }
}

TYPED_TEST(MatrixFunctions, DiagonalMatchesFormula) {
  using T = TypeParam;
  // Zeros (eps > 0 only), tiny, moderate and large second moments.
  const std::vector<T> v = {T(0), T(1e-12), T(3e-4), T(0.25), T(1), T(7), T(1e6), T(0)};
  const auto n = static_cast<index_t>(v.size());
  const std::vector<T> v_copy = v;
  for (double eps : {1e-8, 1e-3, 0.5}) {
    for (const root_spec& s :
         {root_spec{1, eps, root_form::inv_sqrt}, root_spec{2, eps, root_form::inv_sqrt},
          root_spec{3, eps, root_form::inv_sqrt}, root_spec{2, eps, root_form::adam}}) {
      std::vector<T> out(v.size());
      ss::diag_inv_root<T>(v.data(), n, s, out.data());
      EXPECT_EQ(v, v_copy);
      for (index_t i = 0; i < n; ++i) {
        // Elementwise: a few roundings of a well-conditioned scalar function (f'(x) x / f(x)
        // <= 1 for every form here), plus eps rounded to T.
        const double want = f_ref(double(v[i]), s);
        EXPECT_NEAR(double(out[i]), want, 8 * unit_roundoff<T>() * want)
            << "v[" << i << "] = " << v[i] << " p=" << s.p << " eps=" << eps
            << " form=" << to_string(s.form);
      }
    }
  }
  // eps = 0 with strictly positive entries.
  const std::vector<T> pos = {T(1e-12), T(2), T(1e6)};
  std::vector<T> out(pos.size());
  ss::diag_inv_root<T>(pos.data(), 3, {2, 0.0, root_form::inv_sqrt}, out.data());
  for (std::size_t i = 0; i < pos.size(); ++i)
    EXPECT_NEAR(double(out[i]), 1 / std::sqrt(double(pos[i])),
                4 * unit_roundoff<T>() / std::sqrt(double(pos[i])));
  // n = 0.
  EXPECT_NO_THROW(ss::diag_inv_root<T>(nullptr, 0, {2, 0.0, root_form::inv_sqrt}, nullptr));

  // The Eigen convenience, on an expression (not a plain vector).
  Eigen::Matrix<T, Eigen::Dynamic, 1> col(3);
  col << T(4), T(0), T(9);
  const auto r = ss::diag_inv_sqrt(col * T(1), 1.0);
  ASSERT_EQ(r.size(), 3);
  EXPECT_NEAR(double(r[0]), 1 / std::sqrt(5.0), 4 * unit_roundoff<T>());
  EXPECT_NEAR(double(r[1]), 1.0, 4 * unit_roundoff<T>());
  const auto ra = ss::diag_inv_sqrt(col, 1.0, root_form::adam);
  EXPECT_NEAR(double(ra[2]), 0.25, 4 * unit_roundoff<T>());

  // Errors name the entry.
  std::vector<T> bad = {T(1), T(2), T(-1)};
  EXPECT_INVALID("v[2] = -1",
                 ss::diag_inv_root<T>(bad.data(), 3, {2, 1e-3, root_form::inv_sqrt}, out.data()));
  bad[2] = std::numeric_limits<T>::quiet_NaN();
  EXPECT_INVALID("v[2] = nan",
                 ss::diag_inv_root<T>(bad.data(), 3, {2, 1e-3, root_form::inv_sqrt}, out.data()));
  bad[2] = std::numeric_limits<T>::infinity();
  EXPECT_INVALID("v[2] = inf",
                 ss::diag_inv_root<T>(bad.data(), 3, {2, 1e-3, root_form::inv_sqrt}, out.data()));
  const std::vector<T> zero = {T(1), T(0)};
  EXPECT_NUMERICAL("v[1] = 0",
                   ss::diag_inv_root<T>(zero.data(), 2, {2, 0.0, root_form::inv_sqrt}, out.data()));
  EXPECT_NUMERICAL("v[1] = 0",
                   ss::diag_inv_root<T>(zero.data(), 2, {2, 0.0, root_form::adam}, out.data()));
  // The smallest subnormal's inverse overflows T.
  const std::vector<T> tiny = {std::numeric_limits<T>::denorm_min()};
  EXPECT_NUMERICAL("overflows",
                   ss::diag_inv_root<T>(tiny.data(), 1, {1, 0.0, root_form::inv_sqrt}, out.data()));
  EXPECT_INVALID("got -0.001",
                 ss::diag_inv_root<T>(pos.data(), 3, {2, -1e-3, root_form::inv_sqrt}, out.data()));
}

TYPED_TEST(MatrixFunctions, EigenConveniences) {
  using T = TypeParam;
  using cmat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;  // column-major on purpose
  const index_t d = 40;
  const dmat gd = make(kind::spd, d, 31);
  const cmat g = gd.cast<T>();
  const cmat g_copy = g;
  const reference ref(g.template cast<double>());

  const root_spec s2{2, 1e-3, root_form::inv_sqrt};
  expect_close(ss::inv_sqrt(g, 1e-3), ref.matrix(s2), tolerance<T>(ref, s2), "inv_sqrt");
  const root_spec sa{2, 1e-3, root_form::adam};
  expect_close(ss::inv_sqrt(g, 1e-3, root_form::adam), ref.matrix(sa), tolerance<T>(ref, sa),
               "inv_sqrt adam");
  expect_close(ss::inv_sqrt(g, 1e-3, root_form::inv_sqrt, root_method::newton), ref.matrix(s2),
               newton_tolerance<T>(ref, s2), "inv_sqrt newton");
  const root_spec s3{3, 0.0, root_form::inv_sqrt};
  expect_close(ss::inv_root(g, 3), ref.matrix(s3), tolerance<T>(ref, s3), "inv_root p=3");
  expect_close(ss::inv_root(g, 3, 0.0, root_method::newton), ref.matrix(s3),
               newton_tolerance<T>(ref, s3), "inv_root p=3 newton");
  // An expression argument is evaluated first.
  expect_close(ss::inv_sqrt(g.transpose() * T(1), 1e-3), ref.matrix(s2), tolerance<T>(ref, s2),
               "inv_sqrt of an expression");
  const cmat v = gaussian(d, 5, 32).cast<T>();
  const dmat vd = v.template cast<double>();
  expect_close(ss::inv_sqrt_apply(g, v, 1e-3), ref.matrix(s2) * vd,
               apply_tolerance<T>(ref, s2, tolerance<T>(ref, s2), vd), "inv_sqrt_apply");
  EXPECT_TRUE(same_bits(g, g_copy));

  EXPECT_INVALID("2 x 3", ss::inv_sqrt(cmat(2, 3)));
  EXPECT_INVALID("3 x 2", ss::inv_root(cmat(3, 2), 2));
  EXPECT_INVALID("got 41", ss::inv_sqrt_apply(g, cmat(d + 1, 2)));
  EXPECT_INVALID("got -0.001", ss::inv_sqrt(g, -1e-3));
  EXPECT_INVALID("got 0", ss::inv_root(g, 0));
}

TYPED_TEST(MatrixFunctions, TinyAsymmetryIsAveragedNotRejected) {
  using T = TypeParam;
  const index_t d = 5;
  rmat<T> g = as<T>(make(kind::spd, d, 41));
  // A rounding-sized asymmetry, well inside 1000 u max|G|.
  g(0, 1) = std::nextafter(g(0, 1), T(10));
  g(3, 2) = std::nextafter(std::nextafter(g(3, 2), T(-10)), T(-10));
  const rmat<T> g_copy = g;
  const rmat<T> avg =
      ((g.template cast<double>() + g.transpose().template cast<double>()) / 2).template cast<T>();
  const reference ref(to_double<T>(avg));
  const root_spec s{2, 0.0, root_form::inv_sqrt};
  for (root_method m : {root_method::eigh, root_method::newton}) {
    rmat<T> a(d, d);
    ss::inv_root_batched<T>(g.data(), 1, d, s, m, {}, a.data());
    EXPECT_TRUE(same_bits(g, g_copy)) << "the averaging must not be done in place";
    expect_close(a, ref.matrix(s),
                 m == root_method::eigh ? tolerance<T>(ref, s) : newton_tolerance<T>(ref, s),
                 "averaged " + std::string(to_string(m)));
  }
}

// ---------------------------------------------------------------------------------------------
// Errors.

TEST(ParseAndNames, RoundTripAndRejectUnknown) {
  EXPECT_EQ(ss::parse_root_form("inv_sqrt"), root_form::inv_sqrt);
  EXPECT_EQ(ss::parse_root_form("adam"), root_form::adam);
  EXPECT_EQ(ss::parse_root_method("eigh"), root_method::eigh);
  EXPECT_EQ(ss::parse_root_method("newton"), root_method::newton);
  for (root_form f : {root_form::inv_sqrt, root_form::adam})
    EXPECT_EQ(ss::parse_root_form(ss::to_string(f)), f);
  for (root_method m : {root_method::eigh, root_method::newton})
    EXPECT_EQ(ss::parse_root_method(ss::to_string(m)), m);

  // Exact, case-sensitive names; the message quotes what was given.
  EXPECT_INVALID("'sqrt'", ss::parse_root_form("sqrt"));
  EXPECT_INVALID("'Adam'", ss::parse_root_form("Adam"));
  EXPECT_INVALID("''", ss::parse_root_form(""));
  EXPECT_INVALID("'eig'", ss::parse_root_method("eig"));
  EXPECT_INVALID("'newton '", ss::parse_root_method("newton "));
  // Also catchable as the standard type (what pybind11 maps onto ValueError).
  EXPECT_THROW(ss::parse_root_method("cholesky"), std::invalid_argument);
}

TEST(Validation, SpecAndOptions) {
  EXPECT_NO_THROW((root_spec{1, 0.0, root_form::inv_sqrt}.validate()));
  EXPECT_NO_THROW((root_spec{2, 1e-8, root_form::adam}.validate()));
  EXPECT_INVALID("got 0", (root_spec{0, 0.0, root_form::inv_sqrt}.validate()));
  EXPECT_INVALID("got -2", (root_spec{-2, 0.0, root_form::inv_sqrt}.validate()));
  EXPECT_INVALID("got -0.001", (root_spec{2, -1e-3, root_form::inv_sqrt}.validate()));
  EXPECT_INVALID("got nan", (root_spec{2, std::nan(""), root_form::inv_sqrt}.validate()));
  EXPECT_INVALID("got inf", (root_spec{2, HUGE_VAL, root_form::inv_sqrt}.validate()));
  EXPECT_INVALID("p = 3", (root_spec{3, 0.0, root_form::adam}.validate()));
  EXPECT_INVALID("p = 1", (root_spec{1, 0.0, root_form::adam}.validate()));
  EXPECT_NO_THROW((ss::newton_options{0.0, 1}.validate()));
  EXPECT_INVALID("got -1e-06", (ss::newton_options{-1e-6, 10}.validate()));
  EXPECT_INVALID("got 0", (ss::newton_options{0.0, 0}.validate()));
}

template <class T>
class Errors : public ::testing::Test {};
TYPED_TEST_SUITE(Errors, Scalars);

TYPED_TEST(Errors, InvalidArguments) {
  using T = TypeParam;
  const index_t d = 4;
  const rmat<T> good = as<T>(make(kind::spd, d, 51));
  rmat<T> a(d, d);
  const root_spec s{2, 1e-3, root_form::inv_sqrt};
  auto batched = [&](const rmat<T>& g, const root_spec& sp, root_method m,
                     ss::newton_options o = {}) {
    ss::inv_root_batched<T>(g.data(), 1, g.rows(), sp, m, o, a.data());
  };

  for (root_method m : {root_method::eigh, root_method::newton}) {
    SCOPED_TRACE(std::string(to_string(m)));
    // Non-finite entries, named by position and value. Only G[1, 2] is bad, so the report
    // also cannot have been produced by the mirrored entry.
    rmat<T> g = good;
    g(1, 2) = std::numeric_limits<T>::quiet_NaN();
    const rmat<T> g_copy = g;
    EXPECT_INVALID("G[1, 2] = nan", batched(g, s, m));
    EXPECT_TRUE(same_bits(g, g_copy));
    g = good;
    g(3, 0) = std::numeric_limits<T>::infinity();
    EXPECT_INVALID("G[3, 0] = inf", batched(g, s, m));
    // Also catchable as the standard type.
    EXPECT_THROW(batched(g, s, m), std::invalid_argument);

    // Asymmetry beyond 1000 u max|G|: the pair and the gap are named.
    g = good;
    g(0, 1) += T(0.25);
    EXPECT_INVALID("not symmetric", batched(g, s, m));
    EXPECT_INVALID("G[1, 0]", batched(g, s, m));
    EXPECT_INVALID("= 0.25", batched(g, s, m));

    // A clearly negative eigenvalue: -0.5 is the smallest eigenvalue of Q diag(...) Q^T.
    // (Newton finds it on its failure path.)
    dvec lam(d);
    lam << -0.5, 1, 2, 3;
    const rmat<T> indefinite = as<T>(with_spectrum(lam, 52));
    EXPECT_INVALID("not positive semidefinite", batched(indefinite, s, m));
    EXPECT_INVALID("eigenvalue -0.5", batched(indefinite, s, m));

    // Bad specs and options.
    EXPECT_INVALID("got -0.001", batched(good, {2, -1e-3, root_form::inv_sqrt}, m));
    EXPECT_INVALID("got 0", batched(good, {0, 1e-3, root_form::inv_sqrt}, m));
    EXPECT_INVALID("got -1", batched(good, s, m, {-1.0, 10}));
    EXPECT_INVALID("max_iter must be >= 1, got 0", batched(good, s, m, {0.0, 0}));
    // d = 0.
    EXPECT_INVALID("d = 0", ss::inv_root_batched<T>(good.data(), 1, 0, s, m, {}, a.data()));
  }
  // adam needs p = 2 (eigh), and is not available with newton at all.
  EXPECT_INVALID("p = 3", batched(good, {3, 1e-3, root_form::adam}, root_method::eigh));
  EXPECT_INVALID("needs method 'eigh'",
                 batched(good, {2, 1e-3, root_form::adam}, root_method::newton));
  ss::newton_root<T> nr(d);
  EXPECT_INVALID("needs method 'eigh'",
                 nr.compute(good.data(), {2, 1e-3, root_form::adam}, {}, a.data()));
  rmat<T> v(d, 1);
  v.setOnes();
  rmat<T> out(d, 1);
  EXPECT_INVALID("needs method 'eigh'",
                 ss::inv_root_apply<T>(good.data(), d, v.data(), 1, {2, 1e-3, root_form::adam},
                                       root_method::newton, {}, out.data()));

  // Workspaces reject d = 0 (and negative d).
  EXPECT_INVALID("d = 0", ss::eigen_root<T>(0));
  EXPECT_INVALID("d = 0", ss::newton_root<T>(0));
  EXPECT_INVALID("d = -3", ss::eigen_root<T>(-3));
  EXPECT_INVALID("d = 0", ss::inv_root_apply<T>(good.data(), 0, v.data(), 1, s, root_method::eigh,
                                                {}, out.data()));

  // apply: non-finite v, negative k.
  v(2, 0) = std::numeric_limits<T>::quiet_NaN();
  for (root_method m : {root_method::eigh, root_method::newton})
    EXPECT_INVALID("non-finite",
                   ss::inv_root_apply<T>(good.data(), d, v.data(), 1, s, m, {}, out.data()));
  EXPECT_INVALID("got -1", ss::inv_root_apply<T>(good.data(), d, v.data(), -1, s, root_method::eigh,
                                                 {}, out.data()));
  ss::eigen_root<T> er(d);
  er.factor(good.data());
  EXPECT_INVALID("non-finite", er.apply(s, v.data(), 1, out.data()));
}

TYPED_TEST(Errors, NumericalErrors) {
  using T = TypeParam;
  const index_t d = 200;
  rmat<T> a(d, d);
  const root_spec s0{2, 0.0, root_form::inv_sqrt};

  // Singular G with eps = 0: no inverse root exists. The message names the smallest eigenvalue
  // and the remedy.
  const rmat<T> singular = as<T>(make(kind::rank_deficient, d, 61));
  for (root_method m : {root_method::eigh, root_method::newton}) {
    SCOPED_TRACE(std::string(to_string(m)));
    EXPECT_NUMERICAL("singular",
                     ss::inv_root_batched<T>(singular.data(), 1, d, s0, m, {}, a.data()));
    EXPECT_NUMERICAL("eps > 0",
                     ss::inv_root_batched<T>(singular.data(), 1, d, s0, m, {}, a.data()));
    // numerical_error is a std::runtime_error, and not an invalid_argument.
    EXPECT_THROW(ss::inv_root_batched<T>(singular.data(), 1, d, s0, m, {}, a.data()),
                 std::runtime_error);
  }
  // d = 1: G = [0].
  const T zero[1] = {T(0)};
  T one_out[1];
  EXPECT_NUMERICAL("singular",
                   ss::inv_root_batched<T>(zero, 1, 1, s0, root_method::eigh, {}, one_out));
  EXPECT_NUMERICAL("singular",
                   ss::inv_root_batched<T>(zero, 1, 1, s0, root_method::newton, {}, one_out));
  // The adam form with eps = 0 is singular the same way.
  EXPECT_NUMERICAL("singular",
                   ss::inv_root_batched<T>(singular.data(), 1, d, {2, 0.0, root_form::adam},
                                           root_method::eigh, {}, a.data()));

  // Non-convergence: one Newton step cannot reach the tolerance on cond(G) = 1e10 (or, in
  // float, on cond(G + eps I) = 1e3). The message names the iterations and the residual.
  const rmat<T> ill = as<T>(make(kind::ill_conditioned, d, 62));
  const root_spec s_ill{2, std::is_same_v<T, float> ? 1e-3 : 0.0, root_form::inv_sqrt};
  ss::newton_root<T> nr(d);
  EXPECT_NUMERICAL("did not converge", nr.compute(ill.data(), s_ill, {0.0, 1}, a.data()));
  EXPECT_NUMERICAL("after 1 iteration", nr.compute(ill.data(), s_ill, {0.0, 1}, a.data()));
  EXPECT_NUMERICAL("residual", nr.compute(ill.data(), s_ill, {0.0, 1}, a.data()));
  EXPECT_EQ(nr.iterations(), 1);
  EXPECT_GT(nr.residual(), ss::default_newton_tolerance<T>(d));
  EXPECT_NUMERICAL(
      "did not converge",
      ss::inv_root_batched<T>(ill.data(), 1, d, s_ill, root_method::newton, {0.0, 1}, a.data()));

  // In float, cond = 1e10 is numerically singular: its small eigenvalues are rounding noise
  // below the clip tolerance d u lambda_max = 2.4e-5.
  if (std::is_same_v<T, float>) {
    EXPECT_NUMERICAL(
        "singular", ss::inv_root_batched<T>(ill.data(), 1, d, s0, root_method::eigh, {}, a.data()));
    EXPECT_NUMERICAL("singular", ss::inv_root_batched<T>(ill.data(), 1, d, s0, root_method::newton,
                                                         {}, a.data()));
  }

  // Overflow of f(lambda): G = [16 * the smallest subnormal] is positive definite, but its
  // inverse (p = 1) is beyond the largest T.
  const T tiny[1] = {16 * std::numeric_limits<T>::denorm_min()};
  EXPECT_NUMERICAL("overflows", ss::inv_root_batched<T>(tiny, 1, 1, {1, 0.0, root_form::inv_sqrt},
                                                        root_method::eigh, {}, one_out));
}

}  // namespace

namespace {

// A rank-deficient G computes null-space eigenvalues of about +-1e-16 * lambda_max. They are
// rounding noise and count as zero; otherwise the adam form's sqrt would turn them into about
// 1e-8, as large as eps, and the null-space eigenvalue of A would be far from 1 / eps.
TEST(RoundingNoise, AdamNullSpaceOfRankOneMatrixIsOneOverEps) {
  const Eigen::Vector3d x(1.0, 2.0, 3.0);
  const ss::row_matrix<double> g = x * x.transpose();
  const double eps = 1e-8;
  const auto a = ss::inv_sqrt(g, eps, root_form::adam);
  const Eigen::Vector3d null_vec = Eigen::Vector3d(2.0, -1.0, 0.0).normalized();
  EXPECT_NEAR((a * null_vec).dot(null_vec) * eps, 1.0, 1e-6);
  const Eigen::Vector3d u = x.normalized();
  // ||A|| = 1 / eps = 1e8, so rounding in the reconstruction is about 1e8 * 1e-16 per entry.
  EXPECT_NEAR((a * u).dot(u), 1.0 / (std::sqrt(x.squaredNorm()) + eps), 1e-6);
}

// Newton must reject an indefinite G even when eps makes G + eps I positive definite, as eigh does.
TEST(NewtonValidation, RejectsIndefiniteEvenWhenEpsHidesIt) {
  ss::row_matrix<double> g(2, 2);
  g << -0.5, 0.0, 0.0, 1.0;
  try {
    (void)ss::inv_sqrt(g, 1.0, root_form::inv_sqrt, root_method::newton);
    FAIL() << "no exception";
  } catch (const ss::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("-0.5"), std::string::npos) << e.what();
  }
}

}  // namespace
