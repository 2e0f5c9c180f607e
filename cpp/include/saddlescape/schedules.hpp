#pragma once
/// @file schedules.hpp
/// Step-size and EMA-weight schedules, evaluated natively so that loops stay in C++.
///
/// A schedule maps the step counter t = 0, 1, 2, ... to a value. Step t is the t-th call of
/// the estimator's or optimizer's update, counted from 0.

#include <saddlescape/errors.hpp>

#include <cstdint>
#include <memory>
#include <string>

namespace saddlescape {

/// A value that depends on the step t >= 0. Immutable after construction, so one schedule
/// may be shared by many estimators and threads.
class schedule {
 public:
  virtual ~schedule() = default;
  /// The value at step t (t >= 0).
  virtual double operator()(std::int64_t t) const = 0;
  /// A short description, e.g. "constant(0.99)".
  virtual std::string describe() const = 0;
};

using schedule_ptr = std::shared_ptr<const schedule>;

/// v_t = value.
class constant_schedule final : public schedule {
 public:
  /// @throws invalid_argument if value is not finite.
  explicit constant_schedule(double value);
  double operator()(std::int64_t) const override { return value_; }
  std::string describe() const override;
  double value() const noexcept { return value_; }

 private:
  double value_;
};

/// eta_t = eta0 / sqrt(t + 1): the decaying step size of the paper's Sec. 5.4 experiments.
class inverse_sqrt_schedule final : public schedule {
 public:
  /// @throws invalid_argument unless eta0 is finite and > 0.
  explicit inverse_sqrt_schedule(double eta0);
  double operator()(std::int64_t t) const override;
  std::string describe() const override;
  double eta0() const noexcept { return eta0_; }

 private:
  double eta0_;
};

/// beta = 1 - C * lr^(2/3) (Theorem 4.1, Sec. 5.4), clipped into [floor, 1).
///
/// The upper clip keeps beta < 1 (beta = 1 would freeze the estimate) when C * lr^(2/3) is
/// below rounding: the largest double below 1 is returned. The lower clip, `floor` (default 0),
/// keeps beta a convex weight when C * lr^(2/3) >= 1.
/// @throws invalid_argument unless lr > 0, C > 0 (finite) and 0 <= floor < 1.
double beta_from_lr(double lr, double C = 1.0, double floor = 0.0);

/// beta_t = beta_from_lr(lr_t, C, floor) for a step-size schedule lr_t.
class beta_from_lr_schedule final : public schedule {
 public:
  /// @throws invalid_argument if lr is null, or for a bad C or floor (see beta_from_lr).
  beta_from_lr_schedule(schedule_ptr lr, double C = 1.0, double floor = 0.0);
  double operator()(std::int64_t t) const override;
  std::string describe() const override;
  const schedule_ptr& lr() const noexcept { return lr_; }
  double C() const noexcept { return c_; }
  double floor() const noexcept { return floor_; }

 private:
  schedule_ptr lr_;
  double c_, floor_;
};

}  // namespace saddlescape
