#pragma once
/// @file diag_step.hpp
/// Diagonal RMSProp and Adam steps over many tensors at once, in place on the caller's buffers
/// (a model's parameters, gradients and moment estimates), float32 or float64: what an
/// optimizer over a network calls once per parameter group and step.
///
/// Per tensor, with g' = g + weight_decay x and every operation in T:
///   RMSProp: v <- beta v + (1 - beta) g'^2 (results below the smallest normal number flushed
///            to 0), and if move: x <- x - lr g' / den(c v);
///   Adam:    m <- beta1 m + (1 - beta1) g', v as RMSProp's with beta2, x <- x - lr_m m / den(c v);
/// den(s) = sqrt(s + eps) (root_form::inv_sqrt) or sqrt(s) + eps (root_form::adam); c is the
/// bias correction 1 / (1 - prod beta) (1 for none), lr_m Adam's lr / (1 - beta1^t).
/// In float64 with weight_decay = 0 and c = 1 this is exactly the step of saddlescape::rmsprop
/// with structure diag (and of saddlescape::adam), bit for bit.
///
/// Atomic: every gradient is checked (finite, (1 - beta) g'^2 finite in T) before anything is
/// written; on any error nothing has changed. Long tensors are split over
/// SADDLESCAPE_NUM_THREADS threads; the result does not depend on the split.

#include <saddlescape/matrix_functions.hpp>

#include <cstddef>

namespace saddlescape {

template <class T>
struct diag_tensor {
  T* x = nullptr;        ///< the parameter, n entries, updated in place
  const T* g = nullptr;  ///< its gradient
  T* v = nullptr;        ///< the second-moment estimate, updated in place
  T* m = nullptr;        ///< Adam's first moment (unused by RMSProp)
  index_t n = 0;
};

/// @throws invalid_argument for lr < 0 or non-finite, beta outside [0, 1), eps <= 0,
///   weight_decay < 0, c < 1 or non-finite, a null buffer, n < 0, and (naming the tensor and
///   the entry) a gradient that is not finite or whose square overflows. Nothing changes then.
template <class T>
void diag_rmsprop_step(const diag_tensor<T>* tensors, std::size_t count, double lr, double beta,
                       double eps, root_form form, double weight_decay, double c, bool move);

/// As diag_rmsprop_step, for Adam (beta1 in [0, 1) too; m must be given).
template <class T>
void diag_adam_step(const diag_tensor<T>* tensors, std::size_t count, double lr_m, double beta1,
                    double beta2, double eps, root_form form, double weight_decay, double c);

}  // namespace saddlescape
