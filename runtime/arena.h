// A capped device arena (DESIGN.md §3): one region of `capacity` bytes reserved up front,
// sub-allocated best-fit with coalescing. Every device byte zo2 uses comes from here, so
// the cap is a hard limit and the reported peak is the truth.
#pragma once
#include <cstddef>
#include <map>
#include <mutex>
#include <string>
#include <string_view>

namespace zo2 {

class Arena;

// Move-only ownership of one arena allocation; released on destruction.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(DeviceBuffer&& o) noexcept { *this = std::move(o); }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { reset(); }

  void* data() const { return ptr_; }
  template <class T>
  T* as() const { return static_cast<T*>(ptr_); }
  std::size_t bytes() const { return bytes_; }
  explicit operator bool() const { return ptr_ != nullptr; }
  void reset();

 private:
  friend class Arena;
  Arena* arena_ = nullptr;
  void* ptr_ = nullptr;
  std::size_t offset_ = 0;
  std::size_t bytes_ = 0;
};

class Arena {
 public:
  // `base` points at `capacity` bytes that the arena hands out; it does not own them.
  Arena(std::string name, void* base, std::size_t capacity);
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
  ~Arena();

  // Rounds up to kAlignment. Throws Error(out_of_memory) naming the arena, its cap, the
  // request, `what`, and the bytes in use, when the request cannot be placed.
  DeviceBuffer allocate(std::size_t bytes, std::string_view what);

  const std::string& name() const { return name_; }
  std::size_t capacity() const { return capacity_; }
  std::size_t in_use() const;
  std::size_t peak() const;
  void reset_peak();
  std::size_t live_allocations() const;

 private:
  friend class DeviceBuffer;
  void release(std::size_t offset, std::size_t bytes);

  std::string name_;
  std::byte* base_;
  std::size_t capacity_;
  mutable std::mutex mutex_;
  std::map<std::size_t, std::size_t> free_;  // offset -> size, coalesced
  std::size_t in_use_ = 0;
  std::size_t peak_ = 0;
  std::size_t live_ = 0;
};

// "512M", "18G", "1.5GiB", "123456" (bytes) -> bytes. K/M/G/T are powers of 1024
// (as nvidia-smi and ZO2 count GPU memory); a "B"/"iB" suffix is accepted.
std::size_t parse_byte_size(std::string_view text);
// 1536 -> "1.50 KiB"
std::string format_bytes(double bytes);

}  // namespace zo2
