#include "runtime/arena.h"

#include <charconv>

#include "runtime/common.h"
#include "runtime/error.h"

#include <cctype>
#include <cmath>
#include <string>

namespace zo2 {

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
  if (this != &o) {
    reset();
    arena_ = o.arena_;
    ptr_ = o.ptr_;
    offset_ = o.offset_;
    bytes_ = o.bytes_;
    o.arena_ = nullptr;
    o.ptr_ = nullptr;
    o.bytes_ = 0;
  }
  return *this;
}

void DeviceBuffer::reset() {
  if (arena_) arena_->release(offset_, bytes_);
  arena_ = nullptr;
  ptr_ = nullptr;
  bytes_ = 0;
}

Arena::Arena(std::string name, void* base, std::size_t capacity)
    : name_(std::move(name)), base_(static_cast<std::byte*>(base)), capacity_(capacity) {
  if (capacity_ > 0) free_.emplace(0, capacity_);
}

Arena::~Arena() = default;

DeviceBuffer Arena::allocate(std::size_t bytes, std::string_view what) {
  const std::size_t size = align_up(bytes == 0 ? 1 : bytes);
  std::lock_guard lock(mutex_);
  auto best = free_.end();
  for (auto it = free_.begin(); it != free_.end(); ++it)
    if (it->second >= size && (best == free_.end() || it->second < best->second)) best = it;
  if (best == free_.end()) {
    std::size_t largest = 0;
    for (const auto& [off, sz] : free_) largest = std::max(largest, sz);
    fail(ErrorKind::out_of_memory,
         "{}: cannot allocate {} ({}) within the cap of {}: {} in use, largest free block {}",
         name_, format_bytes(static_cast<double>(size)), what,
         format_bytes(static_cast<double>(capacity_)), format_bytes(static_cast<double>(in_use_)),
         format_bytes(static_cast<double>(largest)));
  }
  const std::size_t offset = best->first;
  const std::size_t remaining = best->second - size;
  free_.erase(best);
  if (remaining > 0) free_.emplace(offset + size, remaining);
  in_use_ += size;
  ++live_;
  if (in_use_ > peak_) peak_ = in_use_;
  DeviceBuffer buf;
  buf.arena_ = this;
  buf.ptr_ = base_ + offset;
  buf.offset_ = offset;
  buf.bytes_ = size;
  return buf;
}

void Arena::release(std::size_t offset, std::size_t bytes) {
  std::lock_guard lock(mutex_);
  in_use_ -= bytes;
  --live_;
  auto next = free_.lower_bound(offset);
  std::size_t start = offset, size = bytes;
  if (next != free_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == offset) {
      start = prev->first;
      size += prev->second;
      free_.erase(prev);
    }
  }
  if (next != free_.end() && offset + bytes == next->first) {
    size += next->second;
    free_.erase(next);
  }
  free_.emplace(start, size);
}

std::size_t Arena::in_use() const {
  std::lock_guard lock(mutex_);
  return in_use_;
}
std::size_t Arena::peak() const {
  std::lock_guard lock(mutex_);
  return peak_;
}
void Arena::reset_peak() {
  std::lock_guard lock(mutex_);
  peak_ = in_use_;
}
std::size_t Arena::live_allocations() const {
  std::lock_guard lock(mutex_);
  return live_;
}

std::size_t parse_byte_size(std::string_view text) {
  // Locale-independent throughout (a host's setlocale(LC_ALL, "de_DE.UTF-8") made "1.5G" an
  // unknown unit '.5G' and "1,5G" a size; Turkish casing made "MiB" unknown): the number by
  // from_chars (decimal only: not hex, which stod took), the unit by ASCII rules.
  auto blank = [](char c) { return c == ' ' || c == '\t'; };
  std::string_view s = text;
  while (!s.empty() && blank(s.front())) s.remove_prefix(1);
  if (!s.empty() && s.front() == '+') s.remove_prefix(1);
  double value = 0;
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), value, std::chars_format::general);
  if (ec == std::errc::invalid_argument || end == s.data())
    fail(ErrorKind::invalid_argument, "'{}' is not a size (examples: 512M, 18G, 1.5GiB, 4096)", text);
  if (ec == std::errc::result_out_of_range) fail(ErrorKind::invalid_argument, "'{}' is out of a size's range", text);
  std::string unit;
  for (const char* c = end; c != s.data() + s.size(); ++c)
    if (!blank(*c)) unit += *c >= 'a' && *c <= 'z' ? static_cast<char>(*c - 'a' + 'A') : *c;
  double mult = 1;
  if (unit.empty() || unit == "B") mult = 1;
  else if (unit == "K" || unit == "KB" || unit == "KIB") mult = 1024.0;
  else if (unit == "M" || unit == "MB" || unit == "MIB") mult = 1024.0 * 1024;
  else if (unit == "G" || unit == "GB" || unit == "GIB") mult = 1024.0 * 1024 * 1024;
  else if (unit == "T" || unit == "TB" || unit == "TIB") mult = 1024.0 * 1024 * 1024 * 1024;
  else
    fail(ErrorKind::invalid_argument, "'{}': unknown size unit '{}' (use K, M, G or T)", text,
         unit);
  if (!(value >= 0) || !std::isfinite(value))
    fail(ErrorKind::invalid_argument, "'{}' is not a non-negative size", text);
  const double bytes = value * mult;
  if (bytes >= 9.0e18) fail(ErrorKind::invalid_argument, "'{}' is too large a size", text);
  return static_cast<std::size_t>(std::llround(bytes));
}

std::string format_bytes(double bytes) {
  static constexpr const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (bytes >= 1024.0 && u < 4) {
    bytes /= 1024.0;
    ++u;
  }
  return u == 0 ? fmt::format("{:.0f} B", bytes) : fmt::format("{:.2f} {}", bytes, kUnits[u]);
}

}  // namespace zo2
