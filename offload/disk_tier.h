// The disk tier (DESIGN.md §12, issue 21): the block images that do not fit under
// --host-mem live in one block file (offload/disk_file.h) in --disk-dir, and stream
// disk → pinned staging buffer → device slot → staging buffer → disk.
//
// Note [Disk tier pipeline]
//   The scheduler enqueues its streamed uses in order (Note [Window slot lifecycle]); a use
//   of a disk block takes staging buffer n mod S (S = staging_count()) and its k-th use of
//   that buffer has the stamp k + 1. Per staging buffer three 32-bit counters in pinned,
//   registered host memory order the streams and the tier's I/O thread without any stream
//   or the host ever blocking on another (Note [Stream value waits] in runtime/device.h):
//     read[u]      the I/O thread stores the stamp once the image is in the buffer;
//                  the upload stream waits for it (wait_value) before copying to the slot
//     uploaded[u]  the upload stream stores the stamp after its copies (write_value)
//     offloaded[u] the offload stream stores the stamp after copying the updated slot back
//   The I/O thread submits the read of use n as soon as the buffer's previous use (n − S) is
//   released and every earlier use of the same block that writes back has finished its
//   write (so a read always sees the newest image); it releases use n when `uploaded`
//   reaches its stamp (no write-back) or, for a write-back, when `offloaded` does and the
//   write has completed. So up to S reads run ahead of compute, writes overlap reads, and
//   the disk, the link and compute all work at once.
//   Each block has two images in the file (2d, 2d + 1) and is written to the one that does
//   not hold its newest value, so a torn write (a crash, a full disk) costs only the write
//   in progress; the header of each image records the step it holds.
//   Crash consistency (Note [Disk tier resume]): a write-back of an image holding step h waits
//   until the seed log is durable up to step h (set_durable), so after a kill every image is
//   at or behind the durable log; a resume reopens the file (its identity in
//   zo2-blocks.json must match), takes each block's newest image that reads back whole, and
//   applies the log's updates from that image's step on.
//   A failed read or write stops the tier: the error is kept, every `read` counter is set
//   to its maximum so no stream waits forever, and check()/drain() rethrow it — the
//   scheduler calls check() before it hands out any step's result, so nothing computed
//   from a failed read reaches the seed log or a checkpoint.
#pragma once
#include "offload/disk_file.h"
#include "runtime/device.h"

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <vector>

namespace zo2 {

inline constexpr const char* kDiskTierFile = "zo2-blocks.img";
inline constexpr const char* kDiskTierIdentity = "zo2-blocks.json";

// How a tier opens its directory.
struct DiskTierOpen {
  // What the images belong to (the run, the model's shape, the storage dtype, the blocks on
  // disk), written beside the file as zo2-blocks.json; a reuse needs it to match exactly.
  std::string identity;
  // Reuse the images already there (a resume) when the identity matches; otherwise, or when
  // false, the file is created anew.
  bool reuse = false;
  // The newest step an image may hold (a resume: the seed log's end; −1: no limit). An image
  // past it holds updates the log no longer has (a log cut short or replaced by hand): it is
  // not reused, as a torn one is not.
  std::int64_t max_step = -1;
};

struct DiskTierStats {
  std::int64_t reads = 0, writes = 0;
  std::size_t read_bytes = 0, write_bytes = 0;
  // Seconds with at least one read (write) in the kernel.
  double read_busy_s = 0, write_busy_s = 0;
};

class DiskTier {
 public:
  // The block file DIR/zo2-blocks.img for `blocks` (the model's block indices on disk),
  // each image `image_bytes`, with `staging` pinned staging buffers. DIR is created; a second
  // process using DIR is refused (Error(invalid_argument) naming DIR and the pid).
  DiskTier(Device& device, const std::filesystem::path& dir, std::vector<std::int64_t> blocks,
           std::size_t image_bytes, int staging, const BlockFileOptions& file = {}, const DiskTierOpen& open = {});
  ~DiskTier();
  DiskTier(const DiskTier&) = delete;
  DiskTier& operator=(const DiskTier&) = delete;

  bool holds(std::int64_t block) const;
  const std::vector<std::int64_t>& blocks() const { return blocks_; }
  const std::filesystem::path& path() const;
  DiskIo io() const;  // what moves its bytes: io_uring or worker threads (Note [Disk I/O without io_uring])
  int staging_count() const { return static_cast<int>(staging_.size()); }
  std::size_t image_bytes() const { return image_bytes_; }
  // Pinned host bytes the tier holds (staging buffers and counters).
  std::size_t host_bytes() const;
  // Bytes of the block file on disk.
  std::size_t file_bytes() const;

  // Whether the images of a previous run were reused (DiskTierOpen::reuse and a matching
  // identity), and the step each block's image holds: read back when reused (−1 for a block
  // with no image that reads back whole: the caller writes one), else the step written.
  bool reused() const;
  std::int64_t image_step(std::int64_t block) const;

  // Note [Disk tier resume]: write-backs of images holding a step above `step` wait until
  // the seed log is durable that far (the session calls this after each fdatasync of the
  // log; a session without a seed log sets it to the maximum).
  void set_durable(std::uint64_t step);

  // ---- outside the pipeline (load, save, checks): the pipeline must be idle (drain()) ----
  // Writes one image (copied into an aligned buffer) holding `step`, and waits.
  void write_now(std::int64_t block, const void* image, std::uint64_t step);
  // Reads the newest image of `block` (image_bytes) into dst, checked, and waits.
  void read_now(std::int64_t block, void* dst);
  // Reads bytes [offset, offset + bytes) of the newest image of `block` through a buffered
  // descriptor (not checksummed: the payload was checked when written). Thread-safe.
  void read_range(std::int64_t block, std::size_t offset, std::size_t bytes, void* dst) const;

  // ---- the pipeline (Note [Disk tier pipeline]) ----
  struct Use {
    int staging = 0;
    std::uint32_t stamp = 0;
    std::byte* buffer = nullptr;
  };
  // Queues one streamed use of `block`; with write_back the updated image (holding `step`)
  // goes back to disk. Never blocks.
  Use begin_use(std::int64_t block, bool write_back, std::uint64_t step);
  std::uint32_t* read_counter(int u) const;
  std::uint32_t* uploaded_counter(int u) const;
  std::uint32_t* offloaded_counter(int u) const;
  // Blocks until every queued use is released (its write, if any, complete); rethrows the
  // I/O thread's error.
  void drain();
  // Rethrows the I/O thread's error, if any.
  void check() const;
  // The counts and busy times since the last call.
  DiskTierStats take_stats();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::vector<std::int64_t> blocks_;
  std::size_t image_bytes_ = 0;
  std::vector<HostBuffer> staging_;
};

}  // namespace zo2
