#pragma once
// Error checks shared by the C++ tests. GTest::gmock (and so testing::HasSubstr) is not part of
// every GoogleTest install (Debian's libgtest-dev lacks it), so messages are searched with
// std::string::find.

#include <saddlescape/errors.hpp>

#include <gtest/gtest.h>

#include <exception>
#include <string>
#include <string_view>

namespace saddlescape_test {

template <class Expected, class F>
void expect_throw_with(F&& f, std::string_view needle, const char* expr) {
  try {
    f();
    ADD_FAILURE() << expr << " did not throw";
  } catch (const Expected& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find(needle), std::string::npos)
        << expr << ": message \"" << what << "\" lacks \"" << needle << "\"";
  } catch (const std::exception& e) {
    ADD_FAILURE() << expr << " threw the wrong type: " << e.what();
  }
}

}  // namespace saddlescape_test

// The exception type, a substring of its message, and (through the catch order above) that it
// is not some other exception. The needle comes first so that the statement may contain braced
// initialisers, whose commas the preprocessor does not protect.
#define EXPECT_INVALID(needle, ...)                                            \
  ::saddlescape_test::expect_throw_with<::saddlescape::invalid_argument>(      \
      [&] { __VA_ARGS__; }, needle, #__VA_ARGS__)
#define EXPECT_NUMERICAL(needle, ...)                                          \
  ::saddlescape_test::expect_throw_with<::saddlescape::numerical_error>(       \
      [&] { __VA_ARGS__; }, needle, #__VA_ARGS__)
