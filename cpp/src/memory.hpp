#pragma once
// Up-front checks of large allocations: a construction whose buffers cannot exist fails at once
// with an error naming the bytes, rather than aborting (an uncaught bad_alloc), being killed by
// the out-of-memory killer when the zero-filled pages are touched, or failing halfway.

#include <saddlescape/errors.hpp>

#include <unistd.h>

#include <cstddef>
#include <limits>
#include <new>
#include <string_view>
#include <utility>

namespace saddlescape::detail {

/// The machine's physical memory in bytes (the largest size_t if unknown).
inline std::size_t physical_memory() {
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  if (pages <= 0 || page <= 0) return std::numeric_limits<std::size_t>::max();
  return static_cast<std::size_t>(pages) * static_cast<std::size_t>(page);
}

/// Throws invalid_argument when `bytes` (a double: products of sizes cannot wrap) exceed the
/// physical memory: "<what> needs N bytes (G GiB), more than this machine's M bytes of memory".
inline void expect_memory(double bytes, std::string_view what) {
  const double have = static_cast<double>(physical_memory());
  SADDLESCAPE_EXPECTS(bytes <= have, what, " needs ", bytes, " bytes (", bytes / 1073741824.0,
                      " GiB), more than this machine's ", have, " bytes of memory");
}

/// Runs fn(); a std::bad_alloc from it (a limit below the physical memory: ulimit -v, cgroups)
/// becomes out_of_memory naming `what` and the bytes.
template <class F>
decltype(auto) allocating(double bytes, std::string_view what, F&& fn) {
  try {
    return std::forward<F>(fn)();
  } catch (const out_of_memory&) {
    throw;
  } catch (const std::bad_alloc&) {
    throw out_of_memory(concat(what, " could not allocate its ", bytes, " bytes (",
                               bytes / 1073741824.0, " GiB)"));
  }
}

}  // namespace saddlescape::detail
