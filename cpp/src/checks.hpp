#pragma once
// Finiteness checks shared by the library's sources: a branch-free pass for the common case,
// and a second pass on the failure path that names the first offending entry.

#include <saddlescape/errors.hpp>

#include <cmath>
#include <cstddef>
#include <string_view>

namespace saddlescape::detail {

template <class T>
bool all_finite(const T* x, std::ptrdiff_t n) {
  bool ok = true;
  for (std::ptrdiff_t i = 0; i < n; ++i) ok &= static_cast<bool>(std::isfinite(x[i]));
  return ok;
}

/// Throws invalid_argument naming the first non-finite entry of the row-major (rows, cols)
/// array x: as name[i] (flat index) for a vector, as name[r, c] otherwise. Returns if none.
template <class T>
void report_non_finite(const T* x, std::ptrdiff_t rows, std::ptrdiff_t cols, std::string_view name,
                       bool vector) {
  for (std::ptrdiff_t i = 0; i < rows * cols; ++i)
    if (!std::isfinite(x[i])) {
      if (vector)
        throw invalid_argument(concat(name, " has a non-finite entry ", name, "[", i, "] = ", x[i]));
      throw invalid_argument(concat(name, " has a non-finite entry ", name, "[", i / cols, ", ",
                                    i % cols, "] = ", x[i]));
    }
}

/// all_finite, then report_non_finite on failure.
template <class T>
void check_finite(const T* x, std::ptrdiff_t rows, std::ptrdiff_t cols, std::string_view name,
                  bool vector) {
  if (!all_finite(x, rows * cols)) report_non_finite(x, rows, cols, name, vector);
}

}  // namespace saddlescape::detail
