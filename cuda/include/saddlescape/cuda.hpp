#pragma once
/// @file cuda.hpp
/// The CUDA backend: batched EMA estimates, batched inverse roots, the fused diagonal RMSProp
/// step and a many-seed runner, on one CUDA device. Built when the library is configured with
/// SADDLESCAPE_ENABLE_CUDA (target saddlescape::cuda). The CPU library stays the reference:
/// every function here computes what its CPU counterpart computes, to rounding.
///
/// Conventions:
/// - Pointers named as device arrays are CUDA device (or managed) memory of the current device;
///   everything else is host memory. Arrays are dense, contiguous and row-major, as on the CPU.
/// - Work is queued on the context's stream. Functions that check their input (finiteness,
///   symmetry, eigenvalues) synchronise with the stream to read the verdict, so their errors
///   are thrown before they return, and an input rejected as invalid leaves every output and
///   state array as it was.
/// - Errors: saddlescape::invalid_argument for bad arguments or input, saddlescape::numerical_error
///   for numerical failure on valid input, saddlescape::cuda::cuda_error for a failure of the CUDA
///   runtime or libraries (no device, out of memory, a launch failure).

#include <saddlescape/errors.hpp>
#include <saddlescape/matrix_functions.hpp>
#include <saddlescape/optimizers.hpp>
#include <saddlescape/problems.hpp>
#include <saddlescape/runner.hpp>

#include <cstdint>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

// The stream type without the CUDA headers: callers that only use the default stream need no
// CUDA toolkit to compile against this header.
struct CUstream_st;

namespace saddlescape::cuda {

using stream_t = CUstream_st*;

/// A CUDA runtime, cuBLAS or cuSOLVER call failed; the message names the call and the error.
class cuda_error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// Whether a CUDA device can be used: the runtime initialises and reports at least one device.
bool is_available() noexcept;
/// Why is_available() is false ("" when it is true).
std::string unavailable_reason();
/// The current device's name, compute capability, SM count and memory, e.g.
/// "NVIDIA H200 (sm_90, 132 SMs, 139 GiB)".
std::string device_description();

/// cuBLAS and cuSOLVER handles for the current device, and the stream work is queued on. Not
/// thread-safe: one context per host thread. It owns no stream-ordered memory, so it may be
/// moved to another stream, and destroyed after a stream it used has been destroyed.
class context {
 public:
  /// @param stream the stream to queue work on (nullptr: the legacy default stream).
  /// @throws cuda_error when no device is available or a handle cannot be created.
  explicit context(stream_t stream = nullptr);
  ~context();
  context(const context&) = delete;
  context& operator=(const context&) = delete;
  stream_t stream() const noexcept;
  /// Queues later work on `stream` instead (cheap: the handles are rebound).
  void set_stream(stream_t stream);
  /// Waits for the work queued so far.
  void synchronize() const;

  struct impl;
  impl& get() noexcept { return *impl_; }

 private:
  std::unique_ptr<impl> impl_;
};

// ---------------------------------------------------------------------------------------------
// Estimators

/// k EMA steps on n same-size blocks at once: for each block b (device arrays G: (n, d, d),
/// gs: (n, k, d)), G_b <- (prod_i beta_i) G_b + sum_i w_i g_bi g_bi^T with
/// w_i = (1 - beta_i) prod_(j>i) beta_j, which is k calls of ema_estimator::update() with
/// beta_0, ..., beta_(k-1) (host array, k values). k = 1 is the rank-1 update. Both triangles
/// of G_b are written, so G_b stays exactly symmetric; entries below the smallest normal
/// number are flushed to zero, as on the CPU.
/// @throws invalid_argument for n < 0, d < 1, k < 1, a beta outside [0, 1), or a non-finite
///   entry of gs (named by block, row and index; G is then unchanged).
/// @throws numerical_error when a g_bi^2 would overflow T (G unchanged).
template <class T>
void ema_update_batched(context& ctx, T* G, std::int64_t n, std::int64_t d, const T* gs,
                        std::int64_t k, const double* betas);

// ---------------------------------------------------------------------------------------------
// Inverse roots

/// How a batch of inverse roots is computed on the device.
enum class root_method {
  automatic,       ///< jacobi for d <= 32; batched_qr for n > 1 and d <= 512; divide_conquer
                   ///< otherwise (untuned until timed on a GPU).
  jacobi,          ///< cuSOLVER's batched Jacobi eigensolver (syevjBatched); d <= 32.
  batched_qr,      ///< cuSOLVER's batched symmetric eigensolver (XsyevBatched), any d.
  divide_conquer,  ///< cuSOLVER's divide-and-conquer eigensolver (Xsyevd), one block at a time.
  newton,          ///< matmul-only coupled Newton iteration (Guo and Higham), batched GEMMs;
                   ///< form inv_sqrt only. float32 may use the tensor cores (tf32).
};
root_method parse_root_method(std::string_view name);
std::string_view to_string(root_method m);

/// Options of the device routes.
struct root_options {
  root_method method = root_method::automatic;
  /// newton: the stopping rule (tolerance 0: the CPU's default for T and d).
  newton_options newton;
  /// newton, float32: let cuBLAS use TF32 tensor cores. Faster, with about 1e-3 relative error
  /// per product, so only for tolerances that allow it.
  bool allow_tf32 = false;
};

/// A_b = f(G_b) for n blocks (device arrays G and A, each (n, d, d)), f of `spec`, with the
/// CPU's conventions (matrix_functions.hpp): triangles averaged, eigenvalues within
/// d * epsilon * lambda_max of zero clipped to zero, clearly negative ones rejected.
/// @throws invalid_argument for bad sizes or spec, a non-finite or asymmetric block, a clearly
///   negative eigenvalue (each naming the block G[b]), or the jacobi route with d > 32 or the
///   newton route with the adam form. Unlike the CPU's block-by-block loop, a non-finite entry
///   anywhere in the batch is reported before the other checks (NaN never reaches cuSOLVER),
///   and overflow in the result is found after every block has passed its checks.
/// @throws numerical_error for a singular block with eps = 0, an eigensolver that does not
///   converge, a Newton iteration that does not reach its tolerance, or overflow.
template <class T>
void inv_root_batched(context& ctx, const T* G, std::int64_t n, std::int64_t d,
                      const root_spec& spec, const root_options& opts, T* A);

/// out_b = f(G_b) V_b for n blocks (device arrays G: (n, d, d), V and out: (n, d, k)), without
/// forming f(G_b) on the eigensolver routes: out_b = Q_b (f(Lambda_b) (Q_b^T V_b)).
/// Same conventions and errors as inv_root_batched.
template <class T>
void inv_root_apply_batched(context& ctx, const T* G, std::int64_t n, std::int64_t d,
                            const T* V, std::int64_t k, const root_spec& spec,
                            const root_options& opts, T* out);

// ---------------------------------------------------------------------------------------------
// The fused diagonal step

/// One diagonal RMSProp step on device arrays x, g, v of n entries, in one pass:
/// v <- beta v + (1 - beta) g^2 (subnormals flushed), x <- x - lr g / (sqrt(v + eps)) (form
/// inv_sqrt) or x - lr g / (sqrt(v) + eps) (form adam): rmsprop's diagonal step, to rounding.
/// With check (the default) g is first read once to verify that it is finite and that g^2
/// cannot overflow; a bad g is an invalid_argument (numerical_error for overflow) and x, v are
/// unchanged. Without check the step is a single pass (40 bytes per float64 entry instead of
/// 48) and a bad g leaves NaN or Inf in x and v: for callers that check g themselves.
/// @throws invalid_argument for n < 0, lr not finite or < 0, eps not finite or <= 0, beta
///   outside [0, 1), or a pointer that is not device memory of the current device.
template <class T>
void rmsprop_diag_step(context& ctx, T* x, const T* g, T* v, std::int64_t n, double lr,
                       double beta, double eps, root_form form, bool check = true);

// ---------------------------------------------------------------------------------------------
// Many seeds at once

/// Options of run_seeds.
struct seed_run_options {
  std::int64_t steps = 0;  ///< >= 0.
  /// A seed has escaped at the first t (0 <= t <= steps) with ||x_t - x0||_2 >= escape_radius
  /// (0: not used) or F(x_t) <= escape_value (NaN: not used).
  double escape_radius = 0.0;
  double escape_value = std::numeric_limits<double>::quiet_NaN();
};

/// What each seed ended with.
struct seed_run_result {
  std::int64_t dim = 0;
  std::vector<std::uint64_t> seeds;
  std::vector<std::int64_t> escape_step;  ///< the first escaping t, or -1.
  std::vector<double> f_final;            ///< F at the last iterate (NaN if it is not finite).
  std::vector<double> x_final;            ///< seeds x dim, row-major.
  std::vector<run_status> status;         ///< completed, diverged, numerical or invalid.
  std::vector<std::int64_t> stopped_at;   ///< the step where a run stopped, or -1.
};

/// The largest dimension run_seeds handles (each seed's state lives in registers).
constexpr std::int64_t max_seed_dim = 16;

/// Runs `seeds` runs of `opt` on `p` from x0 (host, p.dim() entries) on the device, one thread
/// per seed. Each seed follows run() with that seed: the same random stream (rng.hpp), the same
/// burn-in, steps, projection and failure rules; results agree with run() to rounding (the
/// device may fuse multiply-adds). Supported:
/// - problems: saddle_problem, reddi_counterexample, noisy_quadratic, with dim <= 16;
/// - optimizers: sgd, rmsprop with structure diag (either form, with burn-in), and
///   saddle_escape over those with hallucinate = 0; each fresh (no steps taken);
/// - schedules: constant, inverse_sqrt, and beta_from_lr of either.
/// opt itself is not advanced.
/// @throws invalid_argument for anything else, naming it, or a dim mismatch, a non-finite x0,
///   steps < 0, a negative or non-finite escape_radius.
seed_run_result run_seeds(context& ctx, const problem& p, const optimizer& opt, const double* x0,
                          const std::vector<std::uint64_t>& seeds, const seed_run_options& options);

}  // namespace saddlescape::cuda
