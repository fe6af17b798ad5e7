// The disk tier's file (DESIGN.md §12, issue 21): fixed-size block images in one file, read
// and written asynchronously with io_uring, O_DIRECT where the filesystem allows it, into
// the caller's 4096-aligned buffers (pinned staging memory in a run). Each image carries a
// header with the step it holds and the CRC-32 of its bytes, so a reader tells a torn or
// corrupt image by its block index instead of training on it. The format: Note [Block file
// format] in disk_file.cpp.
//
// What this file is not (yet): the placement of blocks between RAM and disk, the pipeline
// disk → host → device, lagging images and the seed-log ordering of issue 21 — those
// belong to the scheduler and build on this class. For crash consistency a caller that
// must never lose the previous image writes each block to one of two images (2i, 2i+1)
// alternately and trusts the valid one with the newer step: one image is rewritten at a
// time, so a torn write costs only the write in progress.
#pragma once
#include "offload/io_queue.h"
#include "runtime/device.h"

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace zo2 {

// O_DIRECT wants the memory, the length and the file offset of each request aligned to the
// device's logical block (512 or 4096 bytes): 4096 suits every device. Note that
// host_alloc_aligned (runtime/device.h) aligns to kAlignment = 256 only, and so does the
// CPU backend's Device::alloc_host, which returns it; CUDA's pinned memory is page-aligned,
// and host_alloc_disk_aligned below is aligned for any device.
inline constexpr std::size_t kDiskAlignment = 4096;

// Zero-filled host memory aligned to kDiskAlignment, `bytes` rounded up to a multiple of it
// (what BlockFile reads into and writes from when no pinned buffer is at hand).
HostBuffer host_alloc_disk_aligned(std::size_t bytes);

struct BlockFileOptions {
  unsigned queue_depth = 32;  // requests in the kernel at most; a submit beyond it first waits for one
  bool direct = true;         // O_DIRECT; where the filesystem refuses it, buffered I/O with a logged note
  bool preallocate = true;    // fallocate the whole file at create: a full disk is found then, not mid-run
  // Tests only: the k-th read or write request (0-based, counted from open) completes with
  // ENOSPC / EIO instead of its result; < 0 = never.
  std::int64_t test_fail_write_at = -1;
  std::int64_t test_fail_read_at = -1;
  bool test_refuse_direct = false;  // behave as if open(O_DIRECT) failed with EINVAL
  // io_uring, else worker threads (Note [Disk I/O without io_uring]); tests and the probe pick one.
  DiskIo io = DiskIo::automatic;
  // Tests: hand the kernel at most this many bytes per request (a multiple of 4096), so that
  // every read and write of an image completes short and its rest is resubmitted; 0 = off.
  std::size_t test_max_request = 0;
};

enum class BlockOp { read, write, sync };

// What wait() returns for a finished request.
struct BlockCompletion {
  std::uint64_t tag = 0;
  BlockOp op = BlockOp::read;
  std::size_t index = 0;   // the block (0 for a sync)
  std::uint64_t step = 0;  // the step the image holds: read from its header, or written into it
};

// Not thread-safe: one thread submits and reaps (the disk tier's I/O thread). Every method
// that finds an error throws Error(io) naming the file, the block, the byte offset and
// strerror (ENOSPC says the disk is full); a corrupt or torn image throws Error(format).
class BlockFile {
 public:
  // A new file of `count` images of `block_bytes` each at `path` (replacing any file there),
  // its header written and made durable; with preallocate, every byte reserved.
  static BlockFile create(const std::filesystem::path& path, std::size_t count, std::size_t block_bytes,
                          const BlockFileOptions& options = {});
  // An existing file: its header is checked (Error(format) naming the file otherwise).
  static BlockFile open(const std::filesystem::path& path, const BlockFileOptions& options = {});

  BlockFile(BlockFile&&) noexcept;
  BlockFile& operator=(BlockFile&&) noexcept;
  BlockFile(const BlockFile&) = delete;
  BlockFile& operator=(const BlockFile&) = delete;
  // Waits for every request still in the kernel (their buffers are the caller's), never throws.
  ~BlockFile();

  const std::filesystem::path& path() const;
  std::size_t count() const;
  std::size_t block_bytes() const;   // the bytes of one image that the checksum covers
  std::size_t padded_bytes() const;  // block_bytes rounded up to 4096: what a read or a write moves
  bool direct() const;               // false when the filesystem refused O_DIRECT (or options.direct)
  DiskIo io() const;                 // io_uring or threads: what the queue under it is
  // Where image `index`'s payload begins in the file (after its header): for a reader of
  // part of an image through another descriptor, once no write of it is in flight.
  std::uint64_t payload_offset(std::size_t index) const;
  std::size_t in_flight() const;     // requests submitted and not yet finished

  // Start reading image `index` into dst (kDiskAlignment-aligned, at least padded_bytes();
  // the caller keeps it alive and untouched until the request finishes) and return. `tag`
  // names the request in poll() and wait(); it must not name a request still unwaited.
  // The image is checked when it arrives: wait() throws Error(format) naming the block when
  // its CRC-32 or header does not match (a torn write) or it was never written.
  void submit_read(std::size_t index, std::span<std::byte> dst, std::uint64_t tag);
  // Start writing src (aligned, at least padded_bytes(); block_bytes() of it are checksummed
  // now, on the calling thread) as image `index` holding `step`. A read or write of the same
  // index must not be in flight. The bytes between block_bytes() and padded_bytes() are
  // written as src holds them and not checked.
  void submit_write(std::size_t index, std::span<const std::byte> src, std::uint64_t step, std::uint64_t tag);
  // Start an fdatasync ordered after every write submitted before it: it reaches the kernel
  // only once those writes are complete (short writes resubmitted included), so when it
  // finishes they are durable. It fails when any of them failed, naming that write.
  void submit_sync(std::uint64_t tag);

  // Reaps finished requests without blocking; returns the tags that finished since the last
  // poll() (each once), successful or not: wait(tag) then returns at once.
  std::vector<std::uint64_t> poll();
  // Blocks until request `tag` finishes and forgets it; rethrows its error.
  BlockCompletion wait(std::uint64_t tag);
  // submit_sync and wait: every write submitted so far is durable on return.
  void sync();

  // The step recorded in image `index`'s header, read synchronously (the resume scan);
  // nullopt when the image was never written or its header is corrupt. Says nothing about
  // the payload: a full read checks that.
  std::optional<std::uint64_t> stored_step(std::size_t index);

 private:
  struct Impl;
  explicit BlockFile(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// ---- the disk probe (zo2-bench --disk-probe) ----

// Sequential rates of the disk under `dir` through the path the disk tier uses: io_uring,
// O_DIRECT (so the page cache cannot flatter a read), `queue_depth` requests of
// `request_bytes` in flight per direction over a file of `bytes` (created in dir, removed at
// the end). After an untimed pass that writes the whole file, best of 3: writing it (up to
// a final fdatasync), reading it, and reading its first half while writing its second half
// — each direction's half over the time it took, the one done first starting over so that
// the other never runs alone.
struct DiskRates {
  std::filesystem::path dir;
  std::string filesystem;  // "ext4", "xfs", "tmpfs", ... (statfs), or its magic number
  bool direct = false;     // false: the filesystem refused O_DIRECT; the rates are the page cache's
  std::size_t bytes = 0, request_bytes = 0;
  unsigned queue_depth = 0;
  DiskIo io = DiskIo::io_uring;  // what moved the bytes (io_uring, or threads where it is refused)
  double write_gb_s = 0, read_gb_s = 0;            // each alone
  double both_write_gb_s = 0, both_read_gb_s = 0;  // at once
};
DiskRates probe_disk(const std::filesystem::path& dir, std::size_t bytes, std::size_t request_bytes,
                     unsigned queue_depth, DiskIo io = DiskIo::automatic);

}  // namespace zo2
