// Learning-rate schedules: constant, linear decay or cosine decay to zero at the last
// step, each with an optional linear warmup (as transformers' get_scheduler defines them).
#pragma once
#include <cstdint>
#include <string>
#include <string_view>

namespace zo2 {

enum class LrScheduleKind { constant, linear, cosine };

struct LrSchedule {
  LrScheduleKind kind = LrScheduleKind::constant;
  double base_lr = 1e-6;
  std::int64_t warmup_steps = 0;
  std::int64_t total_steps = 1;

  // The learning rate of step t (0-based).
  double at(std::int64_t step) const;
  static LrScheduleKind parse(std::string_view name);  // constant | linear | cosine
  static std::string_view name(LrScheduleKind kind);
};

}  // namespace zo2
