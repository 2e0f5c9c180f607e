#include <saddlescape/schedules.hpp>

#include <saddlescape/detail/formulas.hpp>

#include <cmath>
#include <utility>

namespace saddlescape {

using detail::concat;

constant_schedule::constant_schedule(double value) : value_(value) {
  SADDLESCAPE_EXPECTS(std::isfinite(value), "a constant schedule needs a finite value, got ",
                      value);
}

std::string constant_schedule::describe() const { return concat("constant(", value_, ")"); }

inverse_sqrt_schedule::inverse_sqrt_schedule(double eta0) : eta0_(eta0) {
  SADDLESCAPE_EXPECTS(std::isfinite(eta0) && eta0 > 0, "eta0 must be finite and > 0, got ", eta0);
}

double inverse_sqrt_schedule::operator()(std::int64_t t) const {
  return detail::inverse_sqrt_lr(eta0_, t);
}

std::string inverse_sqrt_schedule::describe() const {
  return concat("inverse_sqrt(eta0=", eta0_, ")");
}

namespace {
void check_beta_args(double C, double floor) {
  SADDLESCAPE_EXPECTS(std::isfinite(C) && C > 0, "C must be finite and > 0, got ", C);
  SADDLESCAPE_EXPECTS(floor >= 0 && floor < 1, "floor must be in [0, 1), got ", floor);
}
}  // namespace

double beta_from_lr(double lr, double C, double floor) {
  SADDLESCAPE_EXPECTS(std::isfinite(lr) && lr > 0, "lr must be finite and > 0, got ", lr);
  check_beta_args(C, floor);
  return detail::clipped_beta(lr, C, floor);
}

beta_from_lr_schedule::beta_from_lr_schedule(schedule_ptr lr, double C, double floor)
    : lr_(std::move(lr)), c_(C), floor_(floor) {
  SADDLESCAPE_EXPECTS(lr_ != nullptr, "beta_from_lr_schedule needs a step-size schedule");
  check_beta_args(C, floor);
  // A constant step size can be checked now rather than at the first step.
  if (auto c = std::dynamic_pointer_cast<const constant_schedule>(lr_))
    SADDLESCAPE_EXPECTS(c->value() > 0, "lr must be finite and > 0, got ", c->value());
}

double beta_from_lr_schedule::operator()(std::int64_t t) const {
  const double lr = (*lr_)(t);
  // A step-size schedule that reaches 0 or goes negative cannot define beta.
  if (!(std::isfinite(lr) && lr > 0))
    throw invalid_argument(concat("beta_from_lr_schedule: lr_", t, " = ", lr,
                                  " from ", lr_->describe(), " must be finite and > 0"));
  return detail::clipped_beta(lr, c_, floor_);
}

std::string beta_from_lr_schedule::describe() const {
  return concat("beta_from_lr(", lr_->describe(), ", C=", c_, ", floor=", floor_, ")");
}

}  // namespace saddlescape
