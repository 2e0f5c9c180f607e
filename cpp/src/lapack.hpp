#pragma once
// Private declarations of the few Fortran BLAS/LAPACK routines the library calls, with typed
// C++ overloads on top. We declare them ourselves rather than include the vendor's lapack.h so
// that any LP64 BLAS works; BLAS_SYMBOL_PREFIX (scipy_ for the scipy-openblas32 wheel, empty
// for a system OpenBLAS) is pasted onto every name.

#include <climits>
#include <cstddef>
#include <vector>

#ifndef BLAS_SYMBOL_PREFIX
#define BLAS_SYMBOL_PREFIX
#endif
#define SADDLESCAPE_PASTE_(a, b) a##b
#define SADDLESCAPE_PASTE(a, b) SADDLESCAPE_PASTE_(a, b)
#define SADDLESCAPE_FORTRAN(name) SADDLESCAPE_PASTE(BLAS_SYMBOL_PREFIX, name##_)

extern "C" {
// OpenBLAS's thread count (not Fortran: no trailing underscore, no hidden lengths).
int SADDLESCAPE_PASTE(BLAS_SYMBOL_PREFIX, openblas_get_num_threads)(void);
void SADDLESCAPE_PASTE(BLAS_SYMBOL_PREFIX, openblas_set_num_threads)(int);
// Trailing size_t arguments are the hidden lengths of the character arguments (gfortran ABI).
void SADDLESCAPE_FORTRAN(dsyevd)(const char* jobz, const char* uplo, const int* n, double* a,
                                 const int* lda, double* w, double* work, const int* lwork,
                                 int* iwork, const int* liwork, int* info, std::size_t,
                                 std::size_t);
void SADDLESCAPE_FORTRAN(ssyevd)(const char* jobz, const char* uplo, const int* n, float* a,
                                 const int* lda, float* w, float* work, const int* lwork,
                                 int* iwork, const int* liwork, int* info, std::size_t,
                                 std::size_t);
void SADDLESCAPE_FORTRAN(dpotrf)(const char* uplo, const int* n, double* a, const int* lda,
                                 int* info, std::size_t);
void SADDLESCAPE_FORTRAN(spotrf)(const char* uplo, const int* n, float* a, const int* lda,
                                 int* info, std::size_t);
void SADDLESCAPE_FORTRAN(dsyr)(const char* uplo, const int* n, const double* alpha, const double* x,
                               const int* incx, double* a, const int* lda, std::size_t);
void SADDLESCAPE_FORTRAN(ssyr)(const char* uplo, const int* n, const float* alpha, const float* x,
                               const int* incx, float* a, const int* lda, std::size_t);
void SADDLESCAPE_FORTRAN(dsyrk)(const char* uplo, const char* trans, const int* n, const int* k,
                                const double* alpha, const double* a, const int* lda,
                                const double* beta, double* c, const int* ldc, std::size_t,
                                std::size_t);
void SADDLESCAPE_FORTRAN(ssyrk)(const char* uplo, const char* trans, const int* n, const int* k,
                                const float* alpha, const float* a, const int* lda,
                                const float* beta, float* c, const int* ldc, std::size_t,
                                std::size_t);
void SADDLESCAPE_FORTRAN(dgemm)(const char* transa, const char* transb, const int* m,
                                const int* n, const int* k, const double* alpha, const double* a,
                                const int* lda, const double* b, const int* ldb,
                                const double* beta, double* c, const int* ldc, std::size_t,
                                std::size_t);
void SADDLESCAPE_FORTRAN(dgemv)(const char* trans, const int* m, const int* n, const double* alpha,
                                const double* a, const int* lda, const double* x, const int* incx,
                                const double* beta, double* y, const int* incy, std::size_t);
void SADDLESCAPE_FORTRAN(sgemv)(const char* trans, const int* m, const int* n, const float* alpha,
                                const float* a, const int* lda, const float* x, const int* incx,
                                const float* beta, float* y, const int* incy, std::size_t);
void SADDLESCAPE_FORTRAN(dsytrd)(const char* uplo, const int* n, double* a, const int* lda,
                                 double* d, double* e, double* tau, double* work,
                                 const int* lwork, int* info, std::size_t);
void SADDLESCAPE_FORTRAN(dormtr)(const char* side, const char* uplo, const char* trans,
                                 const int* m, const int* n, const double* a, const int* lda,
                                 const double* tau, double* c, const int* ldc, double* work,
                                 const int* lwork, int* info, std::size_t, std::size_t,
                                 std::size_t);
void SADDLESCAPE_FORTRAN(dstedc)(const char* compz, const int* n, double* d, double* e,
                                 double* z, const int* ldz, double* work, const int* lwork,
                                 int* iwork, const int* liwork, int* info, std::size_t);
void SADDLESCAPE_FORTRAN(sgemm)(const char* transa, const char* transb, const int* m,
                                const int* n, const int* k, const float* alpha, const float* a,
                                const int* lda, const float* b, const int* ldb,
                                const float* beta, float* c, const int* ldc, std::size_t,
                                std::size_t);
}

namespace saddlescape::detail::lapack {

/// LAPACK takes 32-bit sizes; every caller checks its dimensions against this first.
constexpr std::ptrdiff_t max_dim = INT_MAX;

inline int syevd(char jobz, int n, double* a, double* w, double* work, int lwork, int* iwork,
                 int liwork) {
  int info = 0;
  const char uplo = 'L';
  SADDLESCAPE_FORTRAN(dsyevd)(&jobz, &uplo, &n, a, &n, w, work, &lwork, iwork, &liwork, &info, 1,
                              1);
  return info;
}
inline int syevd(char jobz, int n, float* a, float* w, float* work, int lwork, int* iwork,
                 int liwork) {
  int info = 0;
  const char uplo = 'L';
  SADDLESCAPE_FORTRAN(ssyevd)(&jobz, &uplo, &n, a, &n, w, work, &lwork, iwork, &liwork, &info, 1,
                              1);
  return info;
}

/// Cholesky factorisation of the lower triangle; info > 0 when A is not positive definite.
inline int potrf_lower(int n, double* a) {
  int info = 0;
  const char uplo = 'L';
  SADDLESCAPE_FORTRAN(dpotrf)(&uplo, &n, a, &n, &info, 1);
  return info;
}
inline int potrf_lower(int n, float* a) {
  int info = 0;
  const char uplo = 'L';
  SADDLESCAPE_FORTRAN(spotrf)(&uplo, &n, a, &n, &info, 1);
  return info;
}

/// A (lower triangle, column-major n x n) += alpha * x x^T.
inline void syr_lower(int n, double alpha, const double* x, double* a) {
  const char uplo = 'L';
  const int one = 1;
  SADDLESCAPE_FORTRAN(dsyr)(&uplo, &n, &alpha, x, &one, a, &n, 1);
}
inline void syr_lower(int n, float alpha, const float* x, float* a) {
  const char uplo = 'L';
  const int one = 1;
  SADDLESCAPE_FORTRAN(ssyr)(&uplo, &n, &alpha, x, &one, a, &n, 1);
}

/// C (lower triangle) = alpha * A A^T + beta * C, A column-major n x k.
inline void syrk_lower(int n, int k, double alpha, const double* a, int lda, double beta,
                       double* c, int ldc) {
  const char uplo = 'L', trans = 'N';
  SADDLESCAPE_FORTRAN(dsyrk)(&uplo, &trans, &n, &k, &alpha, a, &lda, &beta, c, &ldc, 1, 1);
}
inline void syrk_lower(int n, int k, float alpha, const float* a, int lda, float beta, float* c,
                       int ldc) {
  const char uplo = 'L', trans = 'N';
  SADDLESCAPE_FORTRAN(ssyrk)(&uplo, &trans, &n, &k, &alpha, a, &lda, &beta, c, &ldc, 1, 1);
}

/// Column-major C (m x n) = alpha * op(A) op(B) + beta * C.
inline void gemm(char ta, char tb, int m, int n, int k, double alpha, const double* a, int lda,
                 const double* b, int ldb, double beta, double* c, int ldc) {
  SADDLESCAPE_FORTRAN(dgemm)(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc, 1,
                             1);
}
inline void gemm(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda,
                 const float* b, int ldb, float beta, float* c, int ldc) {
  SADDLESCAPE_FORTRAN(sgemm)(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc, 1,
                             1);
}

/// Reduces the symmetric A (lower triangle, column-major) to tridiagonal form Q^T A Q = T.
inline int sytrd_lower(int n, double* a, double* d, double* e, double* tau, double* work,
                       int lwork) {
  const char uplo = 'L';
  int info = 0;
  SADDLESCAPE_FORTRAN(dsytrd)(&uplo, &n, a, &n, d, e, tau, work, &lwork, &info, 1);
  return info;
}

/// C (n x k, column-major) <- Q C (trans 'N') or Q^T C (trans 'T'), Q from sytrd_lower.
inline int ormtr_left_lower(char trans, int n, int k, const double* a, const double* tau,
                            double* c, double* work, int lwork) {
  const char side = 'L', uplo = 'L';
  int info = 0;
  SADDLESCAPE_FORTRAN(dormtr)(&side, &uplo, &trans, &n, &k, a, &n, tau, c, &n, work, &lwork,
                              &info, 1, 1, 1);
  return info;
}

/// Eigenvalues (ascending, in d) and eigenvectors (z, column-major) of the tridiagonal
/// matrix with diagonal d and off-diagonal e, by divide and conquer.
inline int stedc_vectors(int n, double* d, double* e, double* z, double* work, int lwork,
                         int* iwork, int liwork) {
  const char compz = 'I';
  int info = 0;
  SADDLESCAPE_FORTRAN(dstedc)(&compz, &n, d, e, z, &n, work, &lwork, iwork, &liwork, &info, 1);
  return info;
}

/// y = alpha * op(A) x + beta * y, A column-major m x n.
inline void gemv(char trans, int m, int n, double alpha, const double* a, int lda, const double* x,
                 double beta, double* y) {
  const int one = 1;
  SADDLESCAPE_FORTRAN(dgemv)(&trans, &m, &n, &alpha, a, &lda, x, &one, &beta, y, &one, 1);
}
// Matrix times vector goes through gemv, not gemm with one column: OpenBLAS's small-matrix gemm
// kernel for that shape (transposed) took 3x gemv's time, 11% of a block step.
inline void gemv(char trans, int m, int n, float alpha, const float* a, int lda, const float* x,
                 float beta, float* y) {
  const int one = 1;
  SADDLESCAPE_FORTRAN(sgemv)(&trans, &m, &n, &alpha, a, &lda, x, &one, &beta, y, &one, 1);
}

/// syevd's documented minimum workspace for jobz = 'V' (1 + 6n + 2n^2 and 3 + 5n entries).
/// Callers pass these, never the size of a reused buffer: the tridiagonal reduction picks its
/// block size from lwork, so a buffer grown by an earlier, larger call would change the
/// rounding, making a result depend on what the thread computed before (which block engine
/// thread took which block, or whether a state was just loaded into fresh buffers).
/// Counted in 64 bits: n above 32766 (beyond the callers' limits) gets INT_MAX, which LAPACK
/// refuses as too small (info < 0), instead of a wrapped-around count.
inline int syevd_lwork(int n) {
  const long long w = 1 + 6LL * n + 2LL * n * n;
  return w > INT_MAX ? INT_MAX : static_cast<int>(w);
}
inline int syevd_liwork(int n) { return 3 + 5 * n; }

/// Eigendecomposition in double of scale S + shift I, S an n x n column-major matrix of any
/// floating type read from its lower triangle: the float64 retry of a failed float32
/// factorisation. M gets the eigenvectors (column-major, leading dimension n), lambda the n
/// ascending eigenvalues; M, work and iwork grow as needed. Returns LAPACK's info.
template <class T>
int syevd_in_double(const T* S, int n, double scale, double shift, std::vector<double>& M,
                    double* lambda, std::vector<double>& work, std::vector<int>& iwork) {
  const auto nn = static_cast<std::size_t>(n) * static_cast<std::size_t>(n);
  const auto lwork = static_cast<std::size_t>(syevd_lwork(n));
  const auto liwork = static_cast<std::size_t>(syevd_liwork(n));
  if (M.size() < nn) M.resize(nn);
  if (work.size() < lwork) work.resize(lwork);
  if (iwork.size() < liwork) iwork.resize(liwork);
  for (int j = 0; j < n; ++j) {
    for (int i = j; i < n; ++i) M[i + j * n] = scale * double(S[i + j * n]);
    M[j + j * n] += shift;
  }
  return syevd('V', n, M.data(), lambda, work.data(), syevd_lwork(n), iwork.data(),
               syevd_liwork(n));
}

/// OpenBLAS single-threaded for the scope's lifetime: inside the library's own worker threads
/// its threads would oversubscribe the cores, and its thread count could change the rounding
/// of a result. The count is process-wide, so it is restored on exit.
class single_threaded_scope {
 public:
  single_threaded_scope() : previous_(SADDLESCAPE_PASTE(BLAS_SYMBOL_PREFIX, openblas_get_num_threads)()) {
    SADDLESCAPE_PASTE(BLAS_SYMBOL_PREFIX, openblas_set_num_threads)(1);
  }
  ~single_threaded_scope() { SADDLESCAPE_PASTE(BLAS_SYMBOL_PREFIX, openblas_set_num_threads)(previous_); }
  single_threaded_scope(const single_threaded_scope&) = delete;
  single_threaded_scope& operator=(const single_threaded_scope&) = delete;

 private:
  int previous_;
};

}  // namespace saddlescape::detail::lapack
