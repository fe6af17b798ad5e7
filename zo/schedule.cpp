#include "zo/schedule.h"

#include "runtime/error.h"

#include <algorithm>
#include <cmath>

namespace zo2 {

double LrSchedule::at(std::int64_t step) const {
  // transformers' get_*_schedule_with_warmup: t / warmup during warmup (0 at step 0).
  if (warmup_steps > 0 && step < warmup_steps)
    return base_lr * static_cast<double>(step) / static_cast<double>(warmup_steps);
  if (kind == LrScheduleKind::constant) return base_lr;
  const double span = static_cast<double>(std::max<std::int64_t>(1, total_steps - warmup_steps));
  const double progress = std::clamp(static_cast<double>(step - warmup_steps) / span, 0.0, 1.0);
  if (kind == LrScheduleKind::linear) return base_lr * (1.0 - progress);
  constexpr double kPi = 3.14159265358979323846;
  return base_lr * 0.5 * (1.0 + std::cos(kPi * progress));
}

LrScheduleKind LrSchedule::parse(std::string_view name) {
  if (name == "constant") return LrScheduleKind::constant;
  if (name == "linear") return LrScheduleKind::linear;
  if (name == "cosine") return LrScheduleKind::cosine;
  fail(ErrorKind::invalid_argument, "unknown learning-rate schedule '{}' (constant, linear, cosine)",
       name);
}

std::string_view LrSchedule::name(LrScheduleKind kind) {
  switch (kind) {
    case LrScheduleKind::constant: return "constant";
    case LrScheduleKind::linear: return "linear";
    case LrScheduleKind::cosine: return "cosine";
  }
  return "constant";
}

}  // namespace zo2
