#pragma once
// A schedule read from a table (the last value repeats), shared by the C++ tests: it can leave
// [0, 1) at a chosen step, which none of the library's schedules does, and it makes the counter
// a schedule is evaluated at visible in the results.

#include <saddlescape/schedules.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace saddlescape_test {

class table_schedule final : public saddlescape::schedule {
 public:
  explicit table_schedule(std::vector<double> v) : v_(std::move(v)) {}
  double operator()(std::int64_t t) const override {
    return t < static_cast<std::int64_t>(v_.size()) ? v_[static_cast<std::size_t>(t)] : v_.back();
  }
  std::string describe() const override { return "table"; }

 private:
  std::vector<double> v_;
};

}  // namespace saddlescape_test
