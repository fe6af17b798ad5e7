#include "offload/disk_tier.h"

#include "runtime/error.h"
#include "runtime/file_util.h"
#include "runtime/thread.h"
#include "runtime/log.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <exception>
#include <fstream>
#include <iterator>
#include <limits>
#include <mutex>
#include <thread>

namespace zo2 {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

constexpr const char* kDiskTierLock = "zo2-blocks.lock";
constexpr std::uint32_t kPoisoned = std::numeric_limits<std::uint32_t>::max();

// Seconds during which at least one request of a kind was in the kernel.
struct BusyClock {
  int in_flight = 0;
  Clock::time_point since;
  double seconds = 0;
  void start() {
    if (in_flight++ == 0) since = Clock::now();
  }
  void stop() {
    if (--in_flight == 0) seconds += std::chrono::duration<double>(Clock::now() - since).count();
  }
  double take() {
    double s = seconds;
    if (in_flight > 0) {  // count the open interval up to now, and restart it
      const auto now = Clock::now();
      s += std::chrono::duration<double>(now - since).count();
      since = now;
    }
    seconds = 0;
    return s;
  }
};

}  // namespace

struct DiskTier::Impl {
  enum class State { queued, reading, read, writing, released };
  struct UseRec {
    std::int64_t block = 0;
    std::size_t slot = 0;  // the block's place in the file (images 2·slot, 2·slot + 1)
    int staging = 0;
    std::uint32_t stamp = 0;
    bool write_back = false;
    std::uint64_t step = 0;
    State state = State::queued;
  };

  fs::path dir;
  int lock_fd = -1;
  int read_fd = -1;  // buffered, for read_range
  BlockFile file;
  std::vector<std::int64_t> slot_of;  // per model block: its place in the file, or −1
  std::vector<int> newest;            // per slot: which of its two images holds the newest value
  std::vector<std::int64_t> step_of;  // per slot: the step its newest image holds (−1: none)
  bool reused = false;
  std::uint64_t durable = std::numeric_limits<std::uint64_t>::max();  // under mu
  std::size_t image_bytes = 0;
  std::vector<std::byte*> staging;
  HostBuffer counters;  // [read | uploaded | offloaded] × S, registered with the device
  Device* device = nullptr;
  bool registered_counters = false;
  std::vector<bool> registered_staging;

  // Host → I/O thread.
  std::mutex mu;
  std::condition_variable cv;       // the I/O thread: new work or stop
  std::condition_variable drained;  // drain(): a use was released
  std::deque<UseRec> incoming;
  std::uint64_t queued = 0;   // uses queued so far (host)
  std::uint64_t released = 0; // uses released so far (I/O thread, under mu)
  std::exception_ptr error;   // under mu
  bool stop = false;
  std::vector<std::uint32_t> next_stamp;  // host: per staging buffer
  DiskTierStats stats;                    // under mu
  BusyClock read_busy, write_busy;        // I/O thread, taken under mu

  // I/O thread only.
  std::deque<UseRec> uses;     // uses[k] is use number first_use + k
  std::uint64_t first_use = 0;
  std::size_t next_read = 0;   // index into uses: the first use not yet read
  std::thread thread;

  Impl(BlockFile f) : file(std::move(f)) {}

  std::uint32_t* counter(int kind, int u) const {
    return counters.as<std::uint32_t>() + static_cast<std::size_t>(kind) * staging.size() + static_cast<std::size_t>(u);
  }
  static std::uint32_t load(const std::uint32_t* p) {
    return std::atomic_ref<const std::uint32_t>(*p).load(std::memory_order_acquire);
  }
  static void store(std::uint32_t* p, std::uint32_t v) {
    std::atomic_ref<std::uint32_t>(*p).store(v, std::memory_order_release);
  }

  void run();
  bool advance();
  void fail_all(std::exception_ptr e);
};

// One pass over the queued uses: submits what may start, reaps what finished. Returns
// whether anything moved.
bool DiskTier::Impl::advance() {
  bool moved = false;
  {
    std::lock_guard<std::mutex> g(mu);
    while (!incoming.empty()) {
      uses.push_back(incoming.front());
      incoming.pop_front();
      moved = true;
    }
  }
  const std::size_t S = staging.size();
  // Reap finished requests. Tags: 2·use + (0 read, 1 write).
  for (std::uint64_t tag : file.poll()) {
    moved = true;
    const std::uint64_t n = tag / 2;
    UseRec& u = uses[static_cast<std::size_t>(n - first_use)];
    BlockCompletion c;
    try {
      c = file.wait(tag);  // rethrows the request's error
    } catch (const Error& e) {
      fail(e.kind(), "the disk tier's {} of model block {}: {}", tag % 2 ? "write" : "read", u.block, e.what());
    }
    if (c.op == BlockOp::read) {
      u.state = State::read;
      store(counter(0, u.staging), u.stamp);
      std::lock_guard<std::mutex> g(mu);
      read_busy.stop();
      ++stats.reads;
      stats.read_bytes += image_bytes;
    } else {
      newest[u.slot] ^= 1;
      u.state = State::released;
      std::lock_guard<std::mutex> g(mu);
      step_of[u.slot] = static_cast<std::int64_t>(u.step);
      write_busy.stop();
      ++stats.writes;
      stats.write_bytes += image_bytes;
    }
  }
  // Releases: a write-back once its image is home from the device, else once uploaded.
  for (std::size_t k = 0; k < next_read; ++k) {
    UseRec& u = uses[k];
    if (u.state != State::read) continue;
    if (u.write_back) {
      if (load(counter(2, u.staging)) < u.stamp) continue;
      {
        std::lock_guard<std::mutex> g(mu);
        if (durable < u.step) continue;  // Note [Disk tier resume]: the log first
      }
      const std::size_t image = 2 * u.slot + static_cast<std::size_t>(newest[u.slot] ^ 1);
      file.submit_write(image, std::span<const std::byte>(staging[static_cast<std::size_t>(u.staging)], file.padded_bytes()),
                        u.step, 2 * (first_use + k) + 1);
      std::lock_guard<std::mutex> g(mu);
      write_busy.start();
      u.state = State::writing;
      moved = true;
    } else if (load(counter(1, u.staging)) >= u.stamp) {
      u.state = State::released;
      moved = true;
    }
  }
  // Reads, in order: the buffer's previous use released, and no earlier use of the block
  // still to write back.
  while (next_read < uses.size()) {
    UseRec& u = uses[next_read];
    const std::uint64_t n = first_use + next_read;
    if (n >= S) {
      const std::uint64_t prev = n - S;
      if (prev >= first_use && uses[static_cast<std::size_t>(prev - first_use)].state != State::released) break;
    }
    bool blocked = false;
    for (std::size_t k = 0; k < next_read && !blocked; ++k)
      blocked = uses[k].block == u.block && uses[k].write_back && uses[k].state != State::released;
    if (blocked) break;
    const std::size_t image = 2 * u.slot + static_cast<std::size_t>(newest[u.slot]);
    file.submit_read(image, std::span<std::byte>(staging[static_cast<std::size_t>(u.staging)], file.padded_bytes()),
                     2 * n);
    {
      std::lock_guard<std::mutex> g(mu);
      read_busy.start();
    }
    u.state = State::reading;
    ++next_read;
    moved = true;
  }
  // Forget released uses at the front (a use whose buffer's previous use is gone reads it
  // as released).
  std::size_t gone = 0;
  while (!uses.empty() && uses.front().state == State::released) {
    uses.pop_front();
    ++first_use;
    --next_read;
    ++gone;
  }
  if (gone > 0) {
    std::lock_guard<std::mutex> g(mu);
    released += gone;
    drained.notify_all();
  }
  return moved;
}

void DiskTier::Impl::fail_all(std::exception_ptr e) {
  for (std::size_t u = 0; u < staging.size(); ++u) store(counter(0, static_cast<int>(u)), kPoisoned);
  std::lock_guard<std::mutex> g(mu);
  if (!error) error = e;
  drained.notify_all();
}

void DiskTier::Impl::run() {
  auto pause = std::chrono::microseconds(0);
  for (;;) {
    {
      std::unique_lock<std::mutex> g(mu);
      if (stop) return;
      if (error) {
        cv.wait(g, [&] { return stop; });
        return;
      }
      // Nothing queued or in flight: sleep until the host queues a use.
      if (incoming.empty() && uses.empty()) {
        cv.wait(g, [&] { return stop || !incoming.empty(); });
        if (stop) return;
        pause = std::chrono::microseconds(0);
      }
    }
    try {
      if (advance()) {
        pause = std::chrono::microseconds(0);
        continue;
      }
    } catch (...) {
      fail_all(std::current_exception());
      continue;
    }
    // Waiting on a stream's counter or the kernel: poll with a short backoff.
    if (pause.count() > 0) std::this_thread::sleep_for(pause);
    pause = std::min(std::chrono::microseconds(200), pause + std::chrono::microseconds(10));
  }
}

DiskTier::DiskTier(Device& device, const fs::path& dir, std::vector<std::int64_t> blocks, std::size_t image_bytes,
                   int staging, const BlockFileOptions& file_options, const DiskTierOpen& open)
    : blocks_(std::move(blocks)), image_bytes_(image_bytes) {
  if (blocks_.empty()) fail(ErrorKind::internal, "a disk tier without blocks");
  if (staging < 1) fail(ErrorKind::internal, "a disk tier needs at least one staging buffer, not {}", staging);
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec || !fs::is_directory(dir))
    fail(ErrorKind::io, "--disk-dir {}: cannot create the directory{}{}", dir.string(), ec ? ": " : "",
         ec ? ec.message() : std::string());
  // One process per directory: two would overwrite each other's images.
  const fs::path lock = dir / kDiskTierLock;
  const int lock_fd = open_own_file(lock, O_RDWR | O_CREAT);
  if (try_lock_file(lock_fd, true, lock, "a second process using this disk tier directory") == FileLock::busy) {
    char pid[32] = {};
    const ssize_t n = ::pread(lock_fd, pid, sizeof(pid) - 1, 0);
    ::close(lock_fd);
    std::string holder = n > 0 ? std::string(pid, static_cast<std::size_t>(n)) : "?";
    while (!holder.empty() && (holder.back() == '\n' || holder.back() == ' ')) holder.pop_back();
    if (holder == std::to_string(::getpid()))  // flock is per open file: a session here
      fail(ErrorKind::io,
           "--disk-dir {}: another session of this process is using this directory for its disk tier; two sessions "
           "would overwrite each other's block images — give each its own directory",
           dir.string());
    // A busy directory, as a busy --out: the machine's state, exit 1 (ZO2_ERR_IO).
    fail(ErrorKind::io,
         "--disk-dir {}: another zo2 process (pid {}) is using this directory for its disk tier; two runs would "
         "overwrite each other's block images — choose another --disk-dir",
         dir.string(), holder);
  }
  const std::string me = std::to_string(::getpid()) + "\n";
  if (::ftruncate(lock_fd, 0) != 0 || ::pwrite(lock_fd, me.data(), me.size(), 0) < 0) {
    // The pid is a courtesy for the message above; the lock itself holds.
  }
  const fs::path path = dir / kDiskTierFile;
  const fs::path identity_file = dir / kDiskTierIdentity;
  bool reuse = false;
  if (open.reuse && fs::exists(path) && fs::exists(identity_file)) {
    std::ifstream in(identity_file, std::ios::binary);
    const std::string held{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
    reuse = held == open.identity;
    if (!reuse)
      log_info("--disk-dir {}: the block file there belongs to another run or layout; it is written anew",
               dir.string());
  }
  try {
    if (reuse) {
      // A file that no longer reads (cut short, its header damaged) is a cache lost, not the
      // run's state: the checkpoint and the seed log rebuild it.
      try {
        impl_ = std::make_unique<Impl>(BlockFile::open(path, file_options));
      } catch (const Error& e) {
        if (e.kind() != ErrorKind::format && e.kind() != ErrorKind::io) throw;
        log_warn("--disk-dir {}: the block file there does not read back ({}); it is written anew from the checkpoint",
                 dir.string(), e.what());
        reuse = false;
      }
    }
    if (reuse) {
      if (impl_->file.count() != 2 * blocks_.size() || impl_->file.block_bytes() != image_bytes) {
        log_info("--disk-dir {}: the block file there has another shape; it is written anew", dir.string());
        impl_.reset();
        reuse = false;
      }
    }
    if (!reuse) {
      // The identity goes first: a file without it is never reused (a crash in between
      // leaves a file nobody trusts).
      std::error_code rm;
      fs::remove(identity_file, rm);
      impl_ = std::make_unique<Impl>(BlockFile::create(path, 2 * blocks_.size(), image_bytes, file_options));
      if (!open.identity.empty()) write_file_atomic(identity_file, open.identity);
    }
  } catch (...) {
    ::close(lock_fd);
    throw;
  }
  Impl& m = *impl_;
  m.reused = reuse;
  m.dir = dir;
  m.lock_fd = lock_fd;
  m.device = &device;
  m.image_bytes = image_bytes;
  m.read_fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (m.read_fd < 0) fail(ErrorKind::io, "{}: cannot open for reading: {}", path.string(), std::strerror(errno));
  std::int64_t max_block = *std::max_element(blocks_.begin(), blocks_.end());
  m.slot_of.assign(static_cast<std::size_t>(max_block + 1), -1);
  for (std::size_t d = 0; d < blocks_.size(); ++d) m.slot_of[static_cast<std::size_t>(blocks_[d])] = static_cast<std::int64_t>(d);
  m.newest.assign(blocks_.size(), 0);
  m.step_of.assign(blocks_.size(), -1);
  // Staging buffers: aligned for O_DIRECT, pinned through the device where it can.
  for (int u = 0; u < staging; ++u) {
    staging_.push_back(host_alloc_disk_aligned(m.file.padded_bytes()));
    m.registered_staging.push_back(device.register_host(staging_.back().data(), staging_.back().bytes()));
    m.staging.push_back(staging_.back().as<std::byte>());
  }
  m.counters = host_alloc_disk_aligned(3 * static_cast<std::size_t>(staging) * sizeof(std::uint32_t));
  m.registered_counters = device.register_host(m.counters.data(), m.counters.bytes());
  m.next_stamp.assign(static_cast<std::size_t>(staging), 0);
  if (reuse) {
    // Note [Disk tier resume]: each block's newest image that reads back whole (header and
    // payload checksums); a torn newest image leaves the other, a block with neither is -1.
    for (std::size_t d = 0; d < blocks_.size(); ++d) {
      std::optional<std::uint64_t> st[2];
      for (int k = 0; k < 2; ++k) st[k] = m.file.stored_step(2 * d + static_cast<std::size_t>(k));
      int order[2] = {0, 1};
      if (st[1] && (!st[0] || *st[1] > *st[0])) std::swap(order[0], order[1]);
      for (int k : order) {
        if (!st[k]) continue;
        if (open.max_step >= 0 && *st[k] > static_cast<std::uint64_t>(open.max_step)) {
          log_warn("--disk-dir {}: block {}'s image holds step {}, past the seed log's end (step {}): the log was cut "
                   "short or replaced; {}",
                   dir.string(), blocks_[d], *st[k], open.max_step,
                   k == order[0] && st[order[1]] ? "its previous image is tried" : "it is rebuilt");
          continue;
        }
        try {
          m.file.submit_read(2 * d + static_cast<std::size_t>(k),
                             std::span<std::byte>(m.staging[0], m.file.padded_bytes()), 0);
          m.file.wait(0);
        } catch (const Error& e) {
          log_warn("--disk-dir {}: block {}'s image of step {} does not read back ({}); {}", dir.string(), blocks_[d],
                   *st[k], e.what(), k == order[0] && st[order[1]] ? "its previous image is used" : "it is rebuilt");
          continue;
        }
        m.newest[d] = k;
        m.step_of[d] = static_cast<std::int64_t>(*st[k]);
        break;
      }
    }
  }
  m.thread = start_thread("the disk tier's I/O thread", [&m] { m.run(); });
}

bool DiskTier::reused() const { return impl_->reused; }

std::int64_t DiskTier::image_step(std::int64_t block) const {
  const Impl& m = *impl_;
  if (block < 0 || static_cast<std::size_t>(block) >= m.slot_of.size() || m.slot_of[static_cast<std::size_t>(block)] < 0)
    fail(ErrorKind::internal, "block {} is not on the disk tier", block);
  std::lock_guard<std::mutex> g(impl_->mu);  // step_of changes on the I/O thread at a write's completion
  return m.step_of[static_cast<std::size_t>(m.slot_of[static_cast<std::size_t>(block)])];
}

void DiskTier::set_durable(std::uint64_t step) {
  std::lock_guard<std::mutex> g(impl_->mu);
  impl_->durable = step;
}

DiskTier::~DiskTier() {
  if (!impl_) return;
  Impl& m = *impl_;
  {
    std::lock_guard<std::mutex> g(m.mu);
    m.stop = true;
  }
  m.cv.notify_all();
  if (m.thread.joinable()) m.thread.join();
  {
    // Closing the file waits for the requests still in the kernel (into the staging
    // buffers, which must outlive them).
    BlockFile closing = std::move(m.file);
  }
  for (std::size_t u = 0; u < staging_.size(); ++u)
    if (m.registered_staging[u]) m.device->unregister_host(staging_[u].data());
  if (m.registered_counters) m.device->unregister_host(m.counters.data());
  if (m.read_fd >= 0) ::close(m.read_fd);
  if (m.lock_fd >= 0) ::close(m.lock_fd);
}

bool DiskTier::holds(std::int64_t block) const {
  const auto& s = impl_->slot_of;
  return block >= 0 && static_cast<std::size_t>(block) < s.size() && s[static_cast<std::size_t>(block)] >= 0;
}

const fs::path& DiskTier::path() const { return impl_->file.path(); }
DiskIo DiskTier::io() const { return impl_->file.io(); }

std::size_t DiskTier::host_bytes() const {
  std::size_t n = impl_->counters.bytes();
  for (const auto& s : staging_) n += s.bytes();
  return n;
}

std::size_t DiskTier::file_bytes() const {
  return kDiskAlignment + impl_->file.count() * (kDiskAlignment + impl_->file.padded_bytes());
}

namespace {
std::size_t slot_checked(const std::vector<std::int64_t>& slot_of, std::int64_t block) {
  if (block < 0 || static_cast<std::size_t>(block) >= slot_of.size() || slot_of[static_cast<std::size_t>(block)] < 0)
    fail(ErrorKind::internal, "block {} is not on the disk tier", block);
  return static_cast<std::size_t>(slot_of[static_cast<std::size_t>(block)]);
}
}  // namespace

void DiskTier::write_now(std::int64_t block, const void* image, std::uint64_t step) {
  drain();
  Impl& m = *impl_;
  const std::size_t d = slot_checked(m.slot_of, block);
  std::memcpy(m.staging[0], image, image_bytes_);
  const std::size_t target = 2 * d + static_cast<std::size_t>(m.newest[d] ^ 1);
  std::lock_guard<std::mutex> g(m.mu);  // the I/O thread is idle (drained) and stays so while we hold mu
  m.file.submit_write(target, std::span<const std::byte>(m.staging[0], m.file.padded_bytes()), step,
                      std::numeric_limits<std::uint64_t>::max());
  m.file.wait(std::numeric_limits<std::uint64_t>::max());
  m.newest[d] ^= 1;
  m.step_of[d] = static_cast<std::int64_t>(step);
  ++m.stats.writes;
  m.stats.write_bytes += image_bytes_;
}

void DiskTier::read_now(std::int64_t block, void* dst) {
  drain();
  Impl& m = *impl_;
  const std::size_t d = slot_checked(m.slot_of, block);
  std::lock_guard<std::mutex> g(m.mu);
  m.file.submit_read(2 * d + static_cast<std::size_t>(m.newest[d]), std::span<std::byte>(m.staging[0], m.file.padded_bytes()),
                     std::numeric_limits<std::uint64_t>::max());
  m.file.wait(std::numeric_limits<std::uint64_t>::max());
  std::memcpy(dst, m.staging[0], image_bytes_);
  ++m.stats.reads;
  m.stats.read_bytes += image_bytes_;
}

void DiskTier::read_range(std::int64_t block, std::size_t offset, std::size_t bytes, void* dst) const {
  const Impl& m = *impl_;
  const std::size_t d = slot_checked(m.slot_of, block);
  if (offset + bytes > image_bytes_)
    fail(ErrorKind::internal, "bytes [{}, {}) of a {}-byte block image", offset, offset + bytes, image_bytes_);
  const std::uint64_t base = m.file.payload_offset(2 * d + static_cast<std::size_t>(m.newest[d])) + offset;
  auto* out = static_cast<char*>(dst);
  std::size_t done = 0;
  while (done < bytes) {
    const ssize_t n = ::pread(m.read_fd, out + done, bytes - done, static_cast<off_t>(base + done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0)
      fail(ErrorKind::io, "{}: reading block {} at offset {}: {}", m.file.path().string(), block, base + done,
           n < 0 ? std::strerror(errno) : "unexpected end of file");
    done += static_cast<std::size_t>(n);
  }
}

DiskTier::Use DiskTier::begin_use(std::int64_t block, bool write_back, std::uint64_t step) {
  Impl& m = *impl_;
  Impl::UseRec u;
  u.block = block;
  u.slot = slot_checked(m.slot_of, block);
  u.write_back = write_back;
  u.step = step;
  std::unique_lock<std::mutex> g(m.mu);
  u.staging = static_cast<int>(m.queued % staging_.size());
  u.stamp = ++m.next_stamp[static_cast<std::size_t>(u.staging)];
  ++m.queued;
  m.incoming.push_back(u);
  g.unlock();
  m.cv.notify_one();
  return Use{u.staging, u.stamp, m.staging[static_cast<std::size_t>(u.staging)]};
}

std::uint32_t* DiskTier::read_counter(int u) const { return impl_->counter(0, u); }
std::uint32_t* DiskTier::uploaded_counter(int u) const { return impl_->counter(1, u); }
std::uint32_t* DiskTier::offloaded_counter(int u) const { return impl_->counter(2, u); }

void DiskTier::drain() {
  Impl& m = *impl_;
  std::unique_lock<std::mutex> g(m.mu);
  m.drained.wait(g, [&] { return m.error || m.released == m.queued; });
  if (m.error) std::rethrow_exception(m.error);
}

void DiskTier::check() const {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> g(m.mu);
  if (m.error) std::rethrow_exception(m.error);
}

DiskTierStats DiskTier::take_stats() {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> g(m.mu);
  DiskTierStats s = m.stats;
  m.stats = {};
  // The busy clocks belong to the I/O thread; reading them here is approximate only while
  // requests are in flight (a step's result is read after its own I/O is done).
  s.read_busy_s = m.read_busy.take();
  s.write_busy_s = m.write_busy.take();
  return s;
}

}  // namespace zo2
