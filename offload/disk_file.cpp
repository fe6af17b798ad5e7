// BlockFile (disk_file.h): block images on disk through io_uring (or threads), and the disk probe.
#include "offload/disk_file.h"
#include "runtime/file_util.h"

#include "runtime/arena.h"
#include "runtime/checksum.h"
#include "runtime/common.h"
#include "runtime/error.h"
#include "runtime/log.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/statvfs.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <random>
#include <thread>
#include <unordered_map>
#include <utility>

// Note [Block file format]
//   One file, little-endian, every region a multiple of 4096 bytes so that each request of
//   O_DIRECT is aligned in offset and length:
//
//     offset 0      file header, one 4096-byte sector (the rest zero):
//                     char[8] magic "ZO2BLKFL" · u32 version (1) · u32 CRC-32 of these 48
//                     bytes with this field 0 · u64 count · u64 block_bytes ·
//                     u64 image_stride (4096 + padded) · u64 first_image (4096)
//     first_image + i · image_stride      image i, for i in [0, count):
//                   4096-byte image header (the rest zero):
//                     char[8] magic "ZO2IMAGE" · u32 version (1) · u32 CRC-32 of these 48
//                     bytes with this field 0 · u64 index (= i) · u64 step ·
//                     u64 payload_bytes (= block_bytes) · u32 CRC-32 of the payload's
//                     first block_bytes bytes · u32 0
//                   payload: padded = block_bytes rounded up to 4096; the padding is
//                     written as the caller's buffer holds it and not checked
//
//   A write puts header and payload down in one request (pwritev of two buffers), a read
//   takes both in one (preadv); the reader checks the header (magic, its CRC, the index,
//   the size) and the payload's CRC. Whatever part of a write a crash or a kill left on
//   disk — header new and payload old, payload half new, header torn — one of the checks
//   fails and the reader names the block: a torn image is never mistaken for a value. An
//   image never written reads as zeros: "never written". Writes are durable only after a
//   sync (submit_sync/sync: fdatasync, ordered after the writes before it): with
//   preallocation the file's extents exist from the start, but on ext4 a direct write into
//   them still needs its journal commit, which fdatasync forces.
//
//   What the format does not do by itself: keep the previous value of a block whose write
//   tore. A caller that needs it (the disk tier's crash consistency, issue 21) alternates
//   each block between two images and reads the valid one with the newer step.

namespace zo2 {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

static_assert(std::endian::native == std::endian::little, "the block file format is little-endian");

constexpr std::uint32_t kVersion = 1;
constexpr char kFileMagic[8] = {'Z', 'O', '2', 'B', 'L', 'K', 'F', 'L'};
constexpr char kImageMagic[8] = {'Z', 'O', '2', 'I', 'M', 'A', 'G', 'E'};
constexpr std::size_t kHeaderBytes = kDiskAlignment;  // each header takes one aligned sector

struct FileHeader {
  char magic[8];
  std::uint32_t version;
  std::uint32_t crc;
  std::uint64_t count;
  std::uint64_t block_bytes;
  std::uint64_t image_stride;
  std::uint64_t first_image;
};
static_assert(sizeof(FileHeader) == 48);

struct ImageHeader {
  char magic[8];
  std::uint32_t version;
  std::uint32_t crc;
  std::uint64_t index;
  std::uint64_t step;
  std::uint64_t payload_bytes;
  std::uint32_t payload_crc;
  std::uint32_t reserved;
};
static_assert(sizeof(ImageHeader) == 48);

template <class H>
std::uint32_t header_crc(H h) {
  h.crc = 0;
  return crc32_update(0, std::as_bytes(std::span(&h, 1)));
}

std::size_t round_up(std::size_t n, std::size_t a) { return (n + a - 1) / a * a; }

// strerror, and what it means for the disk tier where that is not obvious.
std::string describe_errno(int e) {
  std::string s = std::strerror(e);
  switch (e) {
    case ENOSPC: return s + " — the disk is full";
    case EDQUOT: return s + " — the disk quota is exhausted";
    case EFBIG: return s + " — the file size limit (ulimit -f) or the filesystem's largest file is exceeded";
    case EINVAL: return s + " (with O_DIRECT: a misaligned request, or a filesystem that refuses direct I/O)";
    default: return s;
  }
}

std::string filesystem_name(const fs::path& path) {
  struct statfs st {};
  if (::statfs(path.c_str(), &st) != 0) return "unknown";
  switch (static_cast<std::uint64_t>(st.f_type)) {
    case 0xEF53: return "ext4";  // ext2/3/4 share the magic
    case 0x58465342: return "xfs";
    case 0x9123683E: return "btrfs";
    case 0x01021994: return "tmpfs";
    case 0x794C7630: return "overlay";
    case 0xF2F52010: return "f2fs";
    case 0x2FC12FC1: return "zfs";
    case 0x6969: return "nfs";
    case 0x65735546: return "fuse";
    default: return fmt::format("0x{:x}", static_cast<std::uint64_t>(st.f_type));
  }
}

std::string free_space(const fs::path& path) {
  struct statvfs st {};
  if (::statvfs(path.c_str(), &st) != 0) return "unknown";
  return format_bytes(static_cast<double>(st.f_bavail) * static_cast<double>(st.f_frsize));
}

// Opens `path` with O_DIRECT when asked and the filesystem allows it, else buffered (with a
// warning when O_DIRECT was asked for). Sets *direct to what it got.
int open_maybe_direct(const fs::path& path, int flags, bool want_direct, bool refuse_direct, bool* direct) {
  *direct = false;
  int fd = -1, e = 0;
  if (want_direct) {
    fd = refuse_direct ? -1 : ::open(path.c_str(), flags | O_DIRECT | O_NOFOLLOW | O_CLOEXEC, 0666);
    e = refuse_direct ? EINVAL : errno;
    *direct = fd >= 0;
    if (fd < 0 && e == EINVAL)
      log_warn("{}: the filesystem ({}) refuses O_DIRECT; reading and writing through the page cache instead",
               path.string(), filesystem_name(path.parent_path().empty() ? fs::path(".") : path.parent_path()));
  }
  if (fd < 0 && (!want_direct || e == EINVAL)) {
    fd = ::open(path.c_str(), flags | O_NOFOLLOW | O_CLOEXEC, 0666);
    e = errno;
  }
  // A link, or something other than a regular file: open_own_file (runtime/file_util.h)
  // refuses it, saying what is there.
  if (fd < 0 && e == ELOOP) return open_own_file(path, flags);
  if (fd < 0) fail(ErrorKind::io, "{}: cannot open: {}", path.string(), describe_errno(e));
  if (struct stat st {}; ::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return open_own_file(path, flags);
  }
  return fd;
}

// Synchronous whole-buffer pread/pwrite (headers, the probe's setup): short transfers
// continue; 0 from a read means the file ends early.
void pread_all(int fd, std::byte* p, std::size_t n, std::uint64_t offset, const fs::path& path, const char* what) {
  for (std::size_t done = 0; done < n;) {
    const ssize_t r = ::pread(fd, p + done, n - done, static_cast<off_t>(offset + done));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0)
      fail(ErrorKind::io, "{}: reading {} ({} bytes at offset {}): {}", path.string(), what, n, offset,
           describe_errno(errno));
    if (r == 0)
      fail(ErrorKind::format, "{}: reading {} ({} bytes at offset {}): the file ends at {} (truncated?)", path.string(),
           what, n, offset, offset + done);
    done += static_cast<std::size_t>(r);
  }
}

void pwrite_all(int fd, const std::byte* p, std::size_t n, std::uint64_t offset, const fs::path& path,
                const char* what) {
  for (std::size_t done = 0; done < n;) {
    const ssize_t r = ::pwrite(fd, p + done, n - done, static_cast<off_t>(offset + done));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0)
      fail(ErrorKind::io, "{}: writing {} ({} bytes at offset {}): {}", path.string(), what, n, offset,
           r < 0 ? describe_errno(errno) : std::string("the kernel wrote nothing"));
    done += static_cast<std::size_t>(r);
  }
}

struct AlignedFree {
  void operator()(std::byte* p) const { std::free(p); }
};
using AlignedBytes = std::unique_ptr<std::byte[], AlignedFree>;

AlignedBytes aligned_bytes(std::size_t n) {
  const std::size_t size = round_up(n == 0 ? 1 : n, kDiskAlignment);
  auto* p = static_cast<std::byte*>(std::aligned_alloc(kDiskAlignment, size));
  if (p == nullptr) fail(ErrorKind::out_of_memory, "cannot allocate {} of aligned host memory", format_bytes(double(size)));
  std::memset(p, 0, size);
  return AlignedBytes(p);
}

}  // namespace

HostBuffer host_alloc_disk_aligned(std::size_t bytes) {
  const std::size_t size = round_up(bytes == 0 ? 1 : bytes, kDiskAlignment);
  void* p = std::aligned_alloc(kDiskAlignment, size);
  if (p == nullptr)
    fail(ErrorKind::out_of_memory, "cannot allocate {} of host memory", format_bytes(static_cast<double>(size)));
  std::memset(p, 0, size);
  return HostBuffer(p, size, false, [](void* q) { std::free(q); });
}

// ---- BlockFile ----

struct BlockFile::Impl {
  // One request from submit to wait. Pointers to it are the queue's user data, so it
  // lives on the heap and never moves.
  struct Op {
    BlockOp kind = BlockOp::read;
    std::uint64_t tag = 0;
    std::size_t index = 0;
    std::uint64_t step = 0;
    std::uint64_t offset = 0;  // of the image in the file
    int header_slot = -1;      // in Impl::headers (reads and writes)
    std::byte* payload = nullptr;
    std::size_t total = 0, done = 0;  // bytes of header + payload; done so far
    iovec iov[2]{};                   // what remains, handed to the kernel
    int inject_errno = 0;             // tests: the first completion reports this
    std::vector<Op*> syncs;           // write: the syncs ordered after it
    std::size_t waiting_writes = 0;   // sync: writes before it still running
    std::string failed_write;         // sync: the first of them that failed
    bool finished = false;
    std::exception_ptr error;
    BlockCompletion result;
  };
  struct Busy {
    int readers = 0;
    bool writer = false;
  };

  fs::path path;
  int fd = -1;
  bool direct = false;
  BlockFileOptions options;
  std::size_t count = 0, block_bytes = 0, padded = 0;
  std::uint64_t stride = 0, first_image = kHeaderBytes;
  std::unique_ptr<IoQueue> queue;  // io_uring, or threads (Note [Disk I/O without io_uring])
  unsigned kernel_requests = 0;     // requests submitted and not yet reaped
  AlignedBytes headers;          // queue_depth image headers, one per read/write in the kernel
  std::vector<int> free_headers;
  AlignedBytes scratch;          // one header for stored_step()
  std::unordered_map<std::uint64_t, std::unique_ptr<Op>> ops;  // by tag, until waited
  std::vector<std::uint64_t> unpolled;                         // finished, not yet returned by poll()
  std::vector<Op*> ready_syncs;                                // syncs whose writes are done, waiting for room
  std::unordered_map<std::size_t, Busy> busy;                  // indices with a read or write in flight
  std::int64_t reads_submitted = 0, writes_submitted = 0;

  ~Impl() {
    queue.reset();  // lets every request end: the kernel may still use the callers' buffers and the headers
    if (fd >= 0) ::close(fd);
  }

  std::byte* header(int slot) const { return headers.get() + static_cast<std::size_t>(slot) * kHeaderBytes; }
  std::uint64_t image_offset(std::size_t index) const { return first_image + index * stride; }

  void setup_queue() {
    queue = IoQueue::open(options.io, options.queue_depth, path);
    headers = aligned_bytes(std::size_t{options.queue_depth} * kHeaderBytes);
    for (int i = static_cast<int>(options.queue_depth) - 1; i >= 0; --i) free_headers.push_back(i);
    scratch = aligned_bytes(kHeaderBytes);
  }

  std::string where(std::size_t index) const {
    return fmt::format("{}: image {} at offset {}", path.string(), index, image_offset(index));
  }

  void check_request(std::size_t index, const void* buffer, std::size_t size, std::uint64_t tag, const char* what) {
    if (index >= count)
      fail(ErrorKind::invalid_argument, "{}: image {} is out of range (the file holds {} images)", path.string(), index,
           count);
    if (reinterpret_cast<std::uintptr_t>(buffer) % kDiskAlignment != 0)
      fail(ErrorKind::invalid_argument,
           "{}: image {}: the {} buffer at {} is not aligned to {} bytes, which O_DIRECT needs (host_alloc_aligned "
           "and the CPU backend's alloc_host give only {}; CUDA's pinned memory and host_alloc_disk_aligned are aligned)",
           path.string(), index, what, buffer, kDiskAlignment, kAlignment);
    if (size < padded)
      fail(ErrorKind::invalid_argument,
           "{}: image {}: the {} buffer holds {} bytes, less than the {} of an image ({} rounded up to {})",
           path.string(), index, what, size, padded, block_bytes, kDiskAlignment);
    if (ops.contains(tag))
      fail(ErrorKind::invalid_argument, "{}: tag {} already names a request that was not waited for", path.string(),
           tag);
  }

  // Reaps completions until the kernel has room for one more request.
  void make_room() {
    while (kernel_requests >= options.queue_depth) reap(true);
  }

  // Hands the rest of a read or write to the kernel.
  void start(Op& op) {
    const std::size_t header_left = op.done < kHeaderBytes ? kHeaderBytes - op.done : 0;
    const std::size_t payload_done = op.done > kHeaderBytes ? op.done - kHeaderBytes : 0;
    unsigned n = 0;
    if (header_left > 0) op.iov[n++] = {header(op.header_slot) + op.done, header_left};
    op.iov[n++] = {op.payload + payload_done, padded - payload_done};
    if (options.test_max_request > 0) {  // tests: a short transfer at every request
      std::size_t left = options.test_max_request;
      for (unsigned k = 0; k < n; ++k) {
        op.iov[k].iov_len = std::min(op.iov[k].iov_len, left);
        left -= op.iov[k].iov_len;
        if (op.iov[k].iov_len == 0) n = k;
      }
    }
    if (op.kind == BlockOp::write)
      queue->writev(fd, op.iov, n, op.offset + op.done, &op);
    else
      queue->readv(fd, op.iov, n, op.offset + op.done, &op);
    ++kernel_requests;
  }

  void start_sync(Op& op) {
    if (!op.failed_write.empty()) {
      finish(op, std::make_exception_ptr(Error(
                     ErrorKind::io, fmt::format("{}: not synced: a write before the sync failed: {}", path.string(),
                                                op.failed_write))));
      return;
    }
    queue->fdatasync(fd, &op);
    ++kernel_requests;
  }

  void finish(Op& op, std::exception_ptr error) {
    op.finished = true;
    op.error = error;
    unpolled.push_back(op.tag);
    if (op.header_slot >= 0) {
      free_headers.push_back(op.header_slot);
      op.header_slot = -1;
    }
    if (op.kind == BlockOp::sync) return;
    auto it = busy.find(op.index);
    if (op.kind == BlockOp::write)
      it->second.writer = false;
    else
      --it->second.readers;
    if (it->second.readers == 0 && !it->second.writer) busy.erase(it);
    for (Op* s : op.syncs) {
      if (error && s->failed_write.empty()) {
        try {
          std::rethrow_exception(error);
        } catch (const std::exception& e) {
          s->failed_write = e.what();
        }
      }
      if (--s->waiting_writes == 0) ready_syncs.push_back(s);
    }
    op.syncs.clear();
  }

  // Forgets a request the kernel never took.
  void abandon(Op& op) {
    finish(op, nullptr);
    std::erase(unpolled, op.tag);
    ops.erase(op.tag);
  }

  // Starts the syncs whose writes have all finished, as far as the kernel has room.
  void pump() {
    while (!ready_syncs.empty() && kernel_requests < options.queue_depth) {
      Op* s = ready_syncs.front();
      ready_syncs.erase(ready_syncs.begin());
      try {
        start_sync(*s);
      } catch (const Error&) {
        finish(*s, std::current_exception());
      }
    }
  }

  // Checks an image that has arrived; throws Error(format) naming the block.
  void verify(Op& op) {
    ImageHeader h{};
    std::memcpy(&h, header(op.header_slot), sizeof h);
    const std::byte* raw = header(op.header_slot);
    if (std::all_of(raw, raw + sizeof h, [](std::byte b) { return b == std::byte{0}; }))
      fail(ErrorKind::format, "{}: the image was never written", where(op.index));
    if (std::memcmp(h.magic, kImageMagic, sizeof h.magic) != 0 || h.crc != header_crc(h))
      fail(ErrorKind::format, "{}: the image header is corrupt (a torn write?): its CRC-32 or magic does not match",
           where(op.index));
    if (h.version != kVersion)
      fail(ErrorKind::format, "{}: image format version {}, this zo2 reads {}", where(op.index), h.version, kVersion);
    if (h.index != op.index || h.payload_bytes != block_bytes)
      fail(ErrorKind::format, "{}: the header describes block {} of {} bytes, not block {} of {}", where(op.index),
           h.index, h.payload_bytes, op.index, block_bytes);
    const std::uint32_t crc = crc32_update(0, std::span<const std::byte>(op.payload, block_bytes));
    if (crc != h.payload_crc)
      fail(ErrorKind::format,
           "{} (step {}): the CRC-32 of its {} bytes is {:08x}, the header records {:08x}: a torn or corrupt image",
           where(op.index), h.step, block_bytes, crc, h.payload_crc);
    op.result.step = h.step;
  }

  void complete(Op& op, int res) {
    if (op.kind == BlockOp::sync) {
      finish(op, res < 0 ? std::make_exception_ptr(Error(ErrorKind::io, fmt::format("{}: fdatasync: {}", path.string(),
                                                                                     describe_errno(-res))))
                         : nullptr);
      return;
    }
    if (op.inject_errno != 0) {
      res = -op.inject_errno;
      op.inject_errno = 0;
    }
    const char* verb = op.kind == BlockOp::write ? "writing" : "reading";
    if (res == -EINTR || res == -EAGAIN) {
      try {
        start(op);
      } catch (const Error&) {
        finish(op, std::current_exception());
      }
      return;
    }
    if (res <= 0) {
      std::string why;
      if (res < 0)
        why = describe_errno(-res);
      else if (op.kind == BlockOp::read)
        why = fmt::format("the file ends at offset {} (truncated?)", op.offset + op.done);
      else
        why = "the kernel wrote nothing";
      finish(op, std::make_exception_ptr(Error(
                     res < 0 ? ErrorKind::io : ErrorKind::format,
                     fmt::format("{}: {} block {} ({} bytes at offset {}): {}", path.string(), verb, op.index,
                                 op.total - op.done, op.offset + op.done, why))));
      return;
    }
    op.done += static_cast<std::size_t>(res);
    if (op.done < op.total) {  // a short transfer: the rest goes back to the kernel
      try {
        start(op);
      } catch (const Error&) {
        finish(op, std::current_exception());
      }
      return;
    }
    std::exception_ptr error;
    if (op.kind == BlockOp::read) {
      try {
        verify(op);
      } catch (const Error&) {
        error = std::current_exception();
      }
    }
    finish(op, error);
  }

  // Processes one completion; false when `block` is false and none is ready.
  bool reap(bool block) {
    void* user = nullptr;
    int res = 0;
    if (!queue->next(&user, &res, block)) return false;
    --kernel_requests;
    complete(*static_cast<Op*>(user), res);
    pump();
    return true;
  }

  Op& add_op(BlockOp kind, std::uint64_t tag) {
    auto op = std::make_unique<Op>();
    op->kind = kind;
    op->tag = tag;
    op->result.tag = tag;
    op->result.op = kind;
    Op& ref = *op;
    ops.emplace(tag, std::move(op));
    return ref;
  }
};

BlockFile::BlockFile(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
BlockFile::BlockFile(BlockFile&&) noexcept = default;
BlockFile& BlockFile::operator=(BlockFile&&) noexcept = default;
BlockFile::~BlockFile() = default;

BlockFile BlockFile::create(const fs::path& path, std::size_t count, std::size_t block_bytes,
                            const BlockFileOptions& options) {
  if (block_bytes == 0) fail(ErrorKind::invalid_argument, "{}: block images of 0 bytes", path.string());
  if (options.queue_depth == 0 || options.queue_depth > 4096)
    fail(ErrorKind::invalid_argument, "{}: queue depth {} (1 to 4096)", path.string(), options.queue_depth);
  auto impl = std::make_unique<Impl>();
  impl->path = path;
  impl->options = options;
  impl->count = count;
  impl->block_bytes = block_bytes;
  impl->padded = round_up(block_bytes, kDiskAlignment);
  impl->stride = kHeaderBytes + impl->padded;
  impl->fd = open_maybe_direct(path, O_RDWR | O_CREAT | O_TRUNC, options.direct, options.test_refuse_direct,
                               &impl->direct);
  const std::uint64_t size = impl->first_image + count * impl->stride;
  const fs::path dir = path.parent_path().empty() ? fs::path(".") : path.parent_path();
  if (options.preallocate) {
    int r = 0;
    do r = ::fallocate(impl->fd, 0, 0, static_cast<off_t>(size));
    while (r != 0 && errno == EINTR);
    if (r != 0 && (errno == EOPNOTSUPP || errno == ENOSYS)) {
      r = ::ftruncate(impl->fd, static_cast<off_t>(size));  // no preallocation here: a sparse file
    }
    if (r != 0) {
      const int e = errno;
      const std::string free = free_space(dir);
      ::unlink(path.c_str());  // give back what a partial fallocate took
      fail(ErrorKind::io, "{}: reserving {} for {} block images of {}: {} ({} free there)", path.string(),
           format_bytes(static_cast<double>(size)), count, format_bytes(static_cast<double>(block_bytes)),
           describe_errno(e), free);
    }
  } else if (::ftruncate(impl->fd, static_cast<off_t>(size)) != 0) {
    fail(ErrorKind::io, "{}: setting the size to {}: {}", path.string(), format_bytes(static_cast<double>(size)),
         describe_errno(errno));
  }
  FileHeader h{};
  std::memcpy(h.magic, kFileMagic, sizeof h.magic);
  h.version = kVersion;
  h.count = count;
  h.block_bytes = block_bytes;
  h.image_stride = impl->stride;
  h.first_image = impl->first_image;
  h.crc = header_crc(h);
  AlignedBytes sector = aligned_bytes(kHeaderBytes);
  std::memcpy(sector.get(), &h, sizeof h);
  pwrite_all(impl->fd, sector.get(), kHeaderBytes, 0, path, "the file header");
  if (::fdatasync(impl->fd) != 0)
    fail(ErrorKind::io, "{}: fdatasync: {}", path.string(), describe_errno(errno));
  // The file's name is durable once its directory is synced.
  if (const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC); dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
  impl->setup_queue();
  return BlockFile(std::move(impl));
}

BlockFile BlockFile::open(const fs::path& path, const BlockFileOptions& options) {
  if (options.queue_depth == 0 || options.queue_depth > 4096)
    fail(ErrorKind::invalid_argument, "{}: queue depth {} (1 to 4096)", path.string(), options.queue_depth);
  auto impl = std::make_unique<Impl>();
  impl->path = path;
  impl->options = options;
  impl->fd = open_maybe_direct(path, O_RDWR, options.direct, options.test_refuse_direct, &impl->direct);
  AlignedBytes sector = aligned_bytes(kHeaderBytes);
  pread_all(impl->fd, sector.get(), kHeaderBytes, 0, path, "the file header");
  FileHeader h{};
  std::memcpy(&h, sector.get(), sizeof h);
  if (std::memcmp(h.magic, kFileMagic, sizeof h.magic) != 0)
    fail(ErrorKind::format, "{}: not a zo2 block file (no ZO2BLKFL magic)", path.string());
  if (h.crc != header_crc(h)) fail(ErrorKind::format, "{}: the file header is corrupt (CRC-32 mismatch)", path.string());
  if (h.version != kVersion)
    fail(ErrorKind::format, "{}: block file format version {}, this zo2 reads {}", path.string(), h.version, kVersion);
  const std::size_t padded = round_up(h.block_bytes, kDiskAlignment);
  if (h.block_bytes == 0 || h.image_stride != kHeaderBytes + padded || h.first_image != kHeaderBytes)
    fail(ErrorKind::format, "{}: the file header's geometry is inconsistent (block {} bytes, stride {}, first image {})",
         path.string(), h.block_bytes, h.image_stride, h.first_image);
  impl->count = h.count;
  impl->block_bytes = h.block_bytes;
  impl->padded = padded;
  impl->stride = h.image_stride;
  struct stat st {};
  if (::fstat(impl->fd, &st) != 0) fail(ErrorKind::io, "{}: cannot stat: {}", path.string(), describe_errno(errno));
  const std::uint64_t size = impl->first_image + impl->count * impl->stride;
  if (static_cast<std::uint64_t>(st.st_size) < size)
    fail(ErrorKind::format, "{}: {} bytes, but its {} images of {} need {} (truncated?)", path.string(), st.st_size,
         impl->count, impl->block_bytes, size);
  impl->setup_queue();
  return BlockFile(std::move(impl));
}

const fs::path& BlockFile::path() const { return impl_->path; }
std::size_t BlockFile::count() const { return impl_->count; }
std::size_t BlockFile::block_bytes() const { return impl_->block_bytes; }
std::size_t BlockFile::padded_bytes() const { return impl_->padded; }
bool BlockFile::direct() const { return impl_->direct; }
DiskIo BlockFile::io() const { return impl_->queue->kind(); }
std::uint64_t BlockFile::payload_offset(std::size_t index) const {
  if (index >= impl_->count)
    fail(ErrorKind::internal, "{}: image {} of {}", impl_->path.string(), index, impl_->count);
  return impl_->image_offset(index) + kHeaderBytes;
}
std::size_t BlockFile::in_flight() const {
  return static_cast<std::size_t>(
      std::count_if(impl_->ops.begin(), impl_->ops.end(), [](const auto& kv) { return !kv.second->finished; }));
}

void BlockFile::submit_read(std::size_t index, std::span<std::byte> dst, std::uint64_t tag) {
  Impl& m = *impl_;
  m.check_request(index, dst.data(), dst.size(), tag, "destination");
  if (auto it = m.busy.find(index); it != m.busy.end() && it->second.writer)
    fail(ErrorKind::invalid_argument, "{}: image {}: a write of it is still in flight", m.path.string(), index);
  m.make_room();
  Impl::Op& op = m.add_op(BlockOp::read, tag);
  op.index = op.result.index = index;
  op.offset = m.image_offset(index);
  op.payload = dst.data();
  op.total = kHeaderBytes + m.padded;
  op.header_slot = m.free_headers.back();
  m.free_headers.pop_back();
  if (m.reads_submitted++ == m.options.test_fail_read_at) op.inject_errno = EIO;
  ++m.busy[index].readers;
  try {
    m.start(op);
  } catch (...) {
    m.abandon(op);
    throw;
  }
}

void BlockFile::submit_write(std::size_t index, std::span<const std::byte> src, std::uint64_t step,
                             std::uint64_t tag) {
  Impl& m = *impl_;
  m.check_request(index, src.data(), src.size(), tag, "source");
  if (m.busy.contains(index))
    fail(ErrorKind::invalid_argument, "{}: image {}: a read or write of it is still in flight", m.path.string(), index);
  ImageHeader h{};
  std::memcpy(h.magic, kImageMagic, sizeof h.magic);
  h.version = kVersion;
  h.index = index;
  h.step = step;
  h.payload_bytes = m.block_bytes;
  h.payload_crc = crc32_update(0, src.first(m.block_bytes));  // before taking a slot: the CRC may be long
  h.crc = header_crc(h);
  m.make_room();
  Impl::Op& op = m.add_op(BlockOp::write, tag);
  op.index = op.result.index = index;
  op.step = op.result.step = step;
  op.offset = m.image_offset(index);
  op.payload = const_cast<std::byte*>(src.data());  // iovec is not const; the kernel only reads it
  op.total = kHeaderBytes + m.padded;
  op.header_slot = m.free_headers.back();
  m.free_headers.pop_back();
  std::byte* hdr = m.header(op.header_slot);
  std::memset(hdr, 0, kHeaderBytes);
  std::memcpy(hdr, &h, sizeof h);
  if (m.writes_submitted++ == m.options.test_fail_write_at) op.inject_errno = ENOSPC;
  m.busy[index].writer = true;
  try {
    m.start(op);
  } catch (...) {
    m.abandon(op);
    throw;
  }
}

void BlockFile::submit_sync(std::uint64_t tag) {
  Impl& m = *impl_;
  if (m.ops.contains(tag))
    fail(ErrorKind::invalid_argument, "{}: tag {} already names a request that was not waited for", m.path.string(),
         tag);
  Impl::Op& op = m.add_op(BlockOp::sync, tag);
  for (auto& [t, other] : m.ops)
    if (other->kind == BlockOp::write && !other->finished) {
      other->syncs.push_back(&op);
      ++op.waiting_writes;
    }
  if (op.waiting_writes > 0) return;  // made ready by the last of those writes to finish
  m.ready_syncs.push_back(&op);
  m.pump();
}

std::vector<std::uint64_t> BlockFile::poll() {
  Impl& m = *impl_;
  while (m.kernel_requests > 0 && m.reap(false)) {
  }
  return std::exchange(m.unpolled, {});
}

BlockCompletion BlockFile::wait(std::uint64_t tag) {
  Impl& m = *impl_;
  auto it = m.ops.find(tag);
  if (it == m.ops.end())
    fail(ErrorKind::invalid_argument, "{}: no request with tag {} to wait for", m.path.string(), tag);
  Impl::Op& op = *it->second;
  while (!op.finished) {
    m.pump();
    if (op.finished) break;
    ZO2_CHECK(m.kernel_requests > 0);  // an unfinished request is in the kernel or waits on one that is
    m.reap(true);
  }
  std::erase(m.unpolled, tag);
  const std::exception_ptr error = op.error;
  const BlockCompletion result = op.result;
  m.ops.erase(it);
  if (error) std::rethrow_exception(error);
  return result;
}

void BlockFile::sync() {
  // A tag no caller's request can hold while this runs: the largest free one.
  std::uint64_t tag = ~std::uint64_t{0};
  while (impl_->ops.contains(tag)) --tag;
  submit_sync(tag);
  wait(tag);
}

std::optional<std::uint64_t> BlockFile::stored_step(std::size_t index) {
  Impl& m = *impl_;
  if (index >= m.count)
    fail(ErrorKind::invalid_argument, "{}: image {} is out of range (the file holds {} images)", m.path.string(), index,
         m.count);
  if (auto it = m.busy.find(index); it != m.busy.end() && it->second.writer)
    fail(ErrorKind::invalid_argument, "{}: image {}: a write of it is still in flight", m.path.string(), index);
  pread_all(m.fd, m.scratch.get(), kHeaderBytes, m.image_offset(index), m.path,
            fmt::format("the header of block {}", index).c_str());
  ImageHeader h{};
  std::memcpy(&h, m.scratch.get(), sizeof h);
  if (std::memcmp(h.magic, kImageMagic, sizeof h.magic) != 0 || h.crc != header_crc(h) || h.version != kVersion ||
      h.index != index || h.payload_bytes != m.block_bytes)
    return std::nullopt;
  return h.step;
}

// ---- the disk probe ----

namespace {

// The probe's file: removed when the probe ends, however it ends.
struct ProbeFile {
  fs::path path;
  int fd = -1;
  ~ProbeFile() {
    if (fd >= 0) ::close(fd);
    if (!path.empty()) ::unlink(path.c_str());
  }
};

struct PassTimes {
  double write_s = 0, read_s = 0;  // each direction's seconds to move its region once (0 = not run)
};
}  // namespace

DiskRates probe_disk(const fs::path& dir, std::size_t bytes, std::size_t request_bytes, unsigned queue_depth,
                     DiskIo io) {
  if (request_bytes == 0 || request_bytes % kDiskAlignment != 0)
    fail(ErrorKind::invalid_argument, "disk probe: request size {} is not a positive multiple of {}", request_bytes,
         kDiskAlignment);
  if (queue_depth == 0 || queue_depth > 1024)
    fail(ErrorKind::invalid_argument, "disk probe: queue depth {} (1 to 1024)", queue_depth);
  bytes = bytes / (2 * request_bytes) * (2 * request_bytes);  // halves of whole requests
  if (bytes == 0)
    fail(ErrorKind::invalid_argument, "disk probe: the file must hold at least two requests of {}",
         format_bytes(static_cast<double>(request_bytes)));
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) fail(ErrorKind::io, "disk probe: {} is not a directory", dir.string());
  DiskRates r;
  r.dir = dir;
  r.filesystem = filesystem_name(dir);
  r.bytes = bytes;
  r.request_bytes = request_bytes;
  r.queue_depth = queue_depth;
  // Never fill the disk: the file must fit the free space with room to spare (a tenth of
  // it, or 1 GiB, left over for everything else on it).
  if (const fs::space_info sp = fs::space(dir, ec); !ec) {
    const std::uintmax_t spare = std::max<std::uintmax_t>(sp.available / 10, std::uintmax_t{1} << 30);
    if (bytes + spare > sp.available)
      fail(ErrorKind::invalid_argument,
           "disk probe: a {} file does not fit the free space of {} ({} free; the probe leaves {} of it): choose a "
           "smaller --disk-probe-bytes",
           format_bytes(static_cast<double>(bytes)), dir.string(), format_bytes(static_cast<double>(sp.available)),
           format_bytes(static_cast<double>(spare)));
  }
  ProbeFile file;
  file.path = dir / fmt::format(".zo2-disk-probe-{}", ::getpid());
  file.fd = open_maybe_direct(file.path, O_RDWR | O_CREAT | O_TRUNC, true, false, &r.direct);
  // Unlinked at once: the open descriptor keeps the blocks, and whatever ends the process
  // (Ctrl-C, a kill, a crash) gives them back; no file is left behind.
  ::unlink(file.path.c_str());
  // Random bytes: some drives compress or deduplicate zeros.
  std::vector<AlignedBytes> wbuf, rbuf;
  std::mt19937_64 rng(42);
  for (unsigned i = 0; i < queue_depth; ++i) {
    wbuf.push_back(aligned_bytes(request_bytes));
    rbuf.push_back(aligned_bytes(request_bytes));
    auto* w = reinterpret_cast<std::uint64_t*>(wbuf.back().get());
    for (std::size_t k = 0; k < request_bytes / 8; ++k) w[k] = rng();
  }
  std::vector<iovec> iovs(2 * std::size_t{queue_depth});  // what a request hands over, one per slot
  // Declared after the buffers: destroyed first, it lets every request end before they go.
  const std::unique_ptr<IoQueue> queue = IoQueue::open(io, 2 * queue_depth, file.path);
  r.io = queue->kind();

  // Writes over [w0, w1) and reads over [r0, r1) at once, queue_depth requests each. A
  // direction that has moved its region once while the other still runs starts over, so
  // that neither ever runs alone: each one's time to its region is measured under the
  // other's load throughout. With sync_writes the write time ends with an fdatasync.
  auto pass = [&](std::uint64_t w0, std::uint64_t w1, std::uint64_t r0, std::uint64_t r1, bool sync_writes) {
    struct Side {
      bool write = false;
      std::uint64_t start = 0, end = 0, next = 0, done = 0;
      unsigned in_flight = 0;
      std::vector<unsigned> free_slots;
      bool finished = false;  // moved its region once
      double end_s = 0;
    };
    Side sides[2];
    sides[0].write = true;
    sides[0].start = sides[0].next = w0;
    sides[0].end = w1;
    sides[1].start = sides[1].next = r0;
    sides[1].end = r1;
    struct Req {
      unsigned side = 0, slot = 0;
      std::uint64_t offset = 0;
      std::size_t done = 0;
    };
    std::vector<Req> reqs(2 * std::size_t{queue_depth});
    for (Side& s : sides) {
      for (unsigned i = 0; i < queue_depth; ++i) s.free_slots.push_back(i);
      s.finished = s.start == s.end;
    }
    auto issue = [&](Req& q) {
      const Side& s = sides[q.side];
      iovec& v = iovs[std::size_t{q.side} * queue_depth + q.slot];
      v = {(s.write ? wbuf : rbuf)[q.slot].get() + q.done, request_bytes - q.done};
      if (s.write)
        queue->writev(file.fd, &v, 1, q.offset + q.done, &q);
      else
        queue->readv(file.fd, &v, 1, q.offset + q.done, &q);
    };
    const auto t0 = Clock::now();
    for (;;) {
      const bool all_finished = sides[0].finished && sides[1].finished;
      for (unsigned si = 0; si < 2; ++si) {
        Side& s = sides[si];
        while (!all_finished && s.start < s.end && !s.free_slots.empty()) {
          if (s.next >= s.end) {
            if (!s.finished) break;  // the last requests of its first round are still running
            s.next = s.start;        // finished: start over while the other direction runs
          }
          const unsigned slot = s.free_slots.back();
          s.free_slots.pop_back();
          Req& q = reqs[si * queue_depth + slot];
          q = {si, slot, s.next, 0};
          s.next += request_bytes;
          ++s.in_flight;
          issue(q);
        }
      }
      if (sides[0].in_flight + sides[1].in_flight == 0) break;
      void* user = nullptr;
      int res = 0;
      queue->next(&user, &res, true);
      Req& q = *static_cast<Req*>(user);
      Side& s = sides[q.side];
      if (res < 0 && res != -EINTR && res != -EAGAIN)
        fail(ErrorKind::io, "{}: {} {} at offset {}: {}", file.path.string(), s.write ? "writing" : "reading",
             format_bytes(static_cast<double>(request_bytes)), q.offset + q.done, describe_errno(-res));
      if (res == 0 && !s.write)
        fail(ErrorKind::io, "{}: reading at offset {}: the file ends early", file.path.string(), q.offset + q.done);
      if (res > 0) q.done += static_cast<std::size_t>(res);
      if (q.done < request_bytes) {  // short, or to retry: the rest again
        issue(q);
        continue;
      }
      s.done += request_bytes;
      --s.in_flight;
      s.free_slots.push_back(q.slot);
      if (!s.finished && s.done >= s.end - s.start) {
        if (s.write && sync_writes && ::fdatasync(file.fd) != 0)
          fail(ErrorKind::io, "{}: fdatasync: {}", file.path.string(), describe_errno(errno));
        s.finished = true;
        s.end_s = std::chrono::duration<double>(Clock::now() - t0).count();
      }
    }
    return PassTimes{sides[0].end_s, sides[1].end_s};
  };

  const double gb = 1e9;
  pass(0, bytes, 0, 0, true);  // untimed: allocates the file's blocks and gives the reads data
  const std::uint64_t half = bytes / 2;
  for (int rep = 0; rep < 3; ++rep) {
    r.write_gb_s = std::max(r.write_gb_s, static_cast<double>(bytes) / pass(0, bytes, 0, 0, true).write_s / gb);
    r.read_gb_s = std::max(r.read_gb_s, static_cast<double>(bytes) / pass(0, 0, 0, bytes, false).read_s / gb);
    const PassTimes both = pass(half, bytes, 0, half, false);
    const double bw = static_cast<double>(half) / both.write_s / gb;
    const double br = static_cast<double>(half) / both.read_s / gb;
    // one pair: the repetition whose slower direction was fastest (as the link probe)
    if (std::min(bw, br) > std::min(r.both_write_gb_s, r.both_read_gb_s)) {
      r.both_write_gb_s = bw;
      r.both_read_gb_s = br;
    }
  }
  return r;
}

}  // namespace zo2
