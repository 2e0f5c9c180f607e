#pragma once
/// @file errors.hpp
/// The two exception types every saddlescape function may throw.
///
/// Precondition failures (bad shapes, NaN input, a negative eps) throw
/// `saddlescape::invalid_argument`; the Python layer sees them as `ValueError`.
/// Numerical failures on valid input (a singular matrix with eps = 0, an iteration
/// that did not converge, a result that overflowed) throw `saddlescape::numerical_error`,
/// which Python sees as `saddlescape.NumericalError`, a subclass of `ArithmeticError`.
/// Buffers larger than the machine's memory are an `invalid_argument` naming the bytes, found
/// before anything is allocated; an allocation that fails below that (a memory limit) throws
/// `saddlescape::out_of_memory`, a `std::bad_alloc` naming the bytes (Python: `MemoryError`).

#include <new>
#include <sstream>
#include <type_traits>
#include <stdexcept>
#include <string>
#include <utility>

namespace saddlescape {

/// A caller broke a documented precondition. Derives from std::invalid_argument so that
/// pybind11 maps it onto ValueError without extra registration.
class invalid_argument : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

/// A computation on valid input failed numerically.
class numerical_error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// An allocation failed. A std::bad_alloc (so existing handlers and pybind11's MemoryError
/// mapping see it) whose message names what was being allocated and its size.
class out_of_memory : public std::bad_alloc {
 public:
  explicit out_of_memory(std::string message) : message_(std::move(message)) {}
  const char* what() const noexcept override { return message_.c_str(); }

 private:
  std::string message_;
};

namespace detail {

/// Writes one part of a message. Numbers print with 15 significant digits (9 for float): enough
/// to name a rejected value exactly (beta = 1.000000000001, not "1"), few enough that computed
/// values do not show rounding noise (-0.5, not -0.4999999999999998).
template <class Part>
void put(std::ostringstream& os, const Part& part) {
  os.precision(std::is_same_v<Part, float> ? 9 : 15);
  os << part;
}

/// Concatenates its arguments, so that messages can name the offending value:
/// `concat("eps must be >= 0, got ", eps)`.
template <class... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream os;
  (put(os, parts), ...);
  return os.str();
}

/// "float32" / "float64", for messages.
template <class T>
constexpr const char* type_name() {
  return sizeof(T) == 4 ? "float32" : "float64";
}

}  // namespace detail
}  // namespace saddlescape

/// Throws saddlescape::invalid_argument with the concatenated message unless `cond` holds.
#define SADDLESCAPE_EXPECTS(cond, ...)                                             \
  do {                                                                             \
    if (!(cond)) throw ::saddlescape::invalid_argument(                           \
        ::saddlescape::detail::concat(__VA_ARGS__));                               \
  } while (0)

/// Throws saddlescape::numerical_error with the concatenated message.
#define SADDLESCAPE_NUMERICAL_FAIL(...) \
  throw ::saddlescape::numerical_error(::saddlescape::detail::concat(__VA_ARGS__))
