#include "runtime/file_util.h"

#include "runtime/arena.h"
#include "runtime/checksum.h"
#include "runtime/error.h"
#include "runtime/log.h"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <climits>
#include <csignal>
#include <cstring>
#include <fcntl.h>
#include <mutex>
#include <set>
#include <sys/file.h>
#include <random>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <system_error>
#include <unistd.h>
#include <utility>

namespace zo2 {
namespace fs = std::filesystem;

namespace {

std::string errno_message(int e) { return std::system_category().message(e); }

// 8 hex digits of an FNV-1a hash of the host name (Note [Temp files]).
const std::string& host_tag() {
  static const std::string tag = [] {
    char name[HOST_NAME_MAX + 1] = {};
    if (::gethostname(name, sizeof name - 1) != 0) name[0] = '\0';
    std::uint32_t h = 2166136261u;
    for (const char* c = name; *c; ++c) h = (h ^ static_cast<unsigned char>(*c)) * 16777619u;
    return fmt::format("{:08x}", h);
  }();
  return tag;
}

// The temp name for `base` with the given unique suffix, `base` cut to fit NAME_MAX.
std::string temp_name(std::string_view base, std::string_view suffix) {
  std::string stem(base);
  if (1 + stem.size() + suffix.size() > NAME_MAX) {
    std::size_t keep = NAME_MAX - 1 - suffix.size();
    while (keep > 0 && (static_cast<unsigned char>(stem[keep]) & 0xC0) == 0x80) --keep;
    stem.resize(keep);
  }
  return "." + stem + std::string(suffix);
}

}  // namespace

std::size_t pread_full(int fd, std::span<std::byte> dst, std::uint64_t offset, const std::string& path) {
  std::size_t done = 0;
  while (done < dst.size()) {
    // Linux moves at most 0x7ffff000 bytes per call.
    const std::size_t want = std::min<std::size_t>(dst.size() - done, std::size_t{1} << 30);
    const ssize_t n = ::pread(fd, dst.data() + done, want, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      const int e = errno;
      fail(ErrorKind::io, "{}: cannot read {} bytes at offset {}: {}", path, want, offset + done, errno_message(e));
    }
    if (n == 0) break;  // end of file
    done += static_cast<std::size_t>(n);
  }
  return done;
}

namespace {
std::atomic<std::uint64_t> g_temp_counter{0};

// Where a temp of `target` goes (its directory) and the name it is made from.
std::pair<fs::path, std::string> temp_place(const fs::path& target) {
  fs::path dir = target.parent_path();
  if (dir.empty()) dir = ".";
  std::string base = target.filename().string();
  if (base.empty() || base == "." || base == "..")
    fail(ErrorKind::invalid_argument, "cannot write '{}': not a file name", target.string());
  return {dir, base};
}

std::string temp_suffix() {
  std::random_device rd;
  return fmt::format(".tmp.{}-{}.{}.{:08x}", ::getpid(), host_tag(), g_temp_counter++, rd());
}
}  // namespace

fs::path make_temp_dir(const fs::path& target) {
  const auto [dir, base] = temp_place(target);
  for (int attempt = 0;; ++attempt) {
    const fs::path p = dir / temp_name(base, temp_suffix());
    if (::mkdir(p.c_str(), 0777) == 0) return p;
    const int e = errno;
    if (e != EEXIST || attempt > 100)
      fail(ErrorKind::io, "cannot write '{}': cannot create a temp directory in '{}': {}", target.string(), dir.string(),
           errno_message(e));
  }
}

void keep_standard_fds_open() noexcept {
  for (int fd = 0; fd <= 2; ++fd) {
    if (::fcntl(fd, F_GETFD) != -1 || errno != EBADF) continue;
    const int null = ::open("/dev/null", O_RDWR);  // (no O_CLOEXEC: a standard descriptor is inherited)
    if (null < 0) return;
    if (null != fd) {  // another thread took `fd` meanwhile: leave it to them
      if (null > 2) ::close(null);
    }
  }
}

AtomicFile::AtomicFile(const fs::path& target) : target_(target) {
  keep_standard_fds_open();
  const auto [dir, base] = temp_place(target);
  for (int attempt = 0;; ++attempt) {
    tmp_ = dir / temp_name(base, temp_suffix());
    fd_ = ::open(tmp_.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd_ >= 0) break;
    const int e = errno;
    if (e != EEXIST || attempt > 100)
      fail(ErrorKind::io, "cannot write '{}': cannot create a temp file in '{}': {}", target.string(),
           dir.string(), errno_message(e));
  }
}

AtomicFile::~AtomicFile() {
  if (fd_ >= 0) ::close(fd_);
  if (!committed_) ::unlink(tmp_.c_str());
}

void AtomicFile::reserve(std::uint64_t size) {
  ZO2_CHECK(fd_ >= 0);
  if (size == 0) return;
  // A full disk is an error here rather than after gigabytes were written. File systems
  // without fallocate (EINVAL, EOPNOTSUPP) skip it: the writes say what is wrong.
  if (int e = ::posix_fallocate(fd_, 0, static_cast<off_t>(size)); e != 0) {
    if (e != EINVAL && e != EOPNOTSUPP && e != ENOSYS) io_fail("fallocate", e);
  }
}

void AtomicFile::write_at(std::span<const std::byte> bytes, std::uint64_t offset) {
  ZO2_CHECK(fd_ >= 0);
  if (bytes.empty()) return;
  std::size_t done = 0;
  while (done < bytes.size()) {
    // Linux moves at most 0x7ffff000 bytes per call.
    const std::size_t want = std::min<std::size_t>(bytes.size() - done, std::size_t{1} << 30);
    const ssize_t n = ::pwrite(fd_, bytes.data() + done, want, static_cast<off_t>(offset + done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) io_fail("write", n < 0 ? errno : EIO);
    done += static_cast<std::size_t>(n);
  }
  const std::uint32_t crc = crc32_update(0, bytes);  // of what was meant (Note [Writes, not mappings])
  std::lock_guard<std::mutex> g(pieces_mu_);
  pieces_.push_back({offset, bytes.size(), crc});
}

void AtomicFile::write(std::string_view bytes) {
  const std::uint64_t at = append_at_;
  append_at_ += bytes.size();
  write_at(std::as_bytes(std::span<const char>(bytes.data(), bytes.size())), at);
}

void AtomicFile::commit() {
  ZO2_CHECK(fd_ >= 0 && !committed_);
  // What was written, joined in file order: the bytes from 0 with no hole and no overlap.
  std::optional<WrittenFile> w;
  {
    std::lock_guard<std::mutex> g(pieces_mu_);
    std::sort(pieces_.begin(), pieces_.end(), [](const Piece& a, const Piece& b) { return a.offset < b.offset; });
    WrittenFile all;
    bool whole = true;
    for (const Piece& p : pieces_) {
      if (p.offset != all.bytes) {
        whole = false;
        break;
      }
      all.crc32 = crc32_combine(all.crc32, p.crc32, p.bytes);
      all.bytes += p.bytes;
    }
    if (whole) w = all;
  }
  // On disk before the rename publishes it: a crash never leaves an empty file under target.
  if (::fsync(fd_) != 0) io_fail("fsync", errno);
  if (w) {
    struct stat st {};
    if (::fstat(fd_, &st) != 0) io_fail("fstat", errno);
    if (static_cast<std::uint64_t>(st.st_size) != w->bytes)
      fail(ErrorKind::io, "cannot write '{}': the file system holds {} bytes of it, but {} were written",
           target_.string(), static_cast<std::uint64_t>(st.st_size), w->bytes);
  }
  const int fd = fd_;
  fd_ = -1;
  if (::close(fd) != 0) io_fail("close", errno);
  if (::rename(tmp_.c_str(), target_.c_str()) != 0) io_fail("rename", errno);
  committed_ = true;
  written_ = w;
  if (w) WrittenFileLog::record(target_, *w);
  // Make the rename durable. Some filesystems refuse fsync on a directory: not an error.
  fs::path dir = target_.parent_path();
  if (dir.empty()) dir = ".";
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    if (::fsync(dfd) != 0 && errno != EINVAL && errno != EROFS)
      log_warn("fsync of directory '{}' failed: {}", dir.string(), errno_message(errno));
    ::close(dfd);
  }
  remove_abandoned_temps(target_);
}

namespace {
std::mutex g_written_mu;
std::vector<WrittenFileLog*>& written_logs() {
  static std::vector<WrittenFileLog*> v;
  return v;
}
}  // namespace

WrittenFileLog::WrittenFileLog(const fs::path& dir) {
  struct stat st {};
  if (::stat(dir.c_str(), &st) == 0) {
    dev_ = static_cast<std::uint64_t>(st.st_dev);
    ino_ = static_cast<std::uint64_t>(st.st_ino);
    valid_ = true;
  }
  std::lock_guard<std::mutex> g(g_written_mu);
  written_logs().push_back(this);
}

WrittenFileLog::~WrittenFileLog() {
  std::lock_guard<std::mutex> g(g_written_mu);
  auto& v = written_logs();
  v.erase(std::remove(v.begin(), v.end(), this), v.end());
}

std::optional<WrittenFile> WrittenFileLog::find(const std::string& name) const {
  std::lock_guard<std::mutex> g(g_written_mu);
  const auto it = files_.find(name);
  if (it == files_.end()) return std::nullopt;
  return it->second;
}

void WrittenFileLog::record(const fs::path& target, const WrittenFile& w) {
  {
    std::lock_guard<std::mutex> g(g_written_mu);
    if (written_logs().empty()) return;
  }
  fs::path dir = target.parent_path();
  if (dir.empty()) dir = ".";
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0) return;
  std::lock_guard<std::mutex> g(g_written_mu);
  for (WrittenFileLog* l : written_logs())
    if (l->valid_ && l->dev_ == static_cast<std::uint64_t>(st.st_dev) &&
        l->ino_ == static_cast<std::uint64_t>(st.st_ino))
      l->files_[target.filename().string()] = w;
}

void AtomicFile::io_fail(const char* op, int e) {
  fail(ErrorKind::io, "cannot write '{}': {} failed: {}", target_.string(), op, errno_message(e));
}

int open_own_file(const std::filesystem::path& path, int flags, unsigned mode) {
  keep_standard_fds_open();
  const int fd = ::open(path.c_str(), flags | O_NOFOLLOW | O_CLOEXEC, static_cast<mode_t>(mode));
  if (fd < 0) {
    const int e = errno;
    std::error_code ec;
    if (e == ELOOP && std::filesystem::is_symlink(std::filesystem::symlink_status(path, ec)))
      fail(ErrorKind::io,
           "{}: is a symbolic link (to {}); zo2 writes this file itself and never through a link: remove the link",
           path.string(), std::filesystem::read_symlink(path, ec).string());
    fail(ErrorKind::io, "{}: cannot open: {}", path.string(), std::strerror(e));
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(ErrorKind::io, "{}: is not a regular file; zo2 keeps its own file of this name here: remove it",
         path.string());
  }
  return fd;
}

FileLock try_lock_file(int fd, bool exclusive, const fs::path& path, std::string_view guards) {
  int e = 0;
  do e = ::flock(fd, (exclusive ? LOCK_EX : LOCK_SH) | LOCK_NB) == 0 ? 0 : errno;
  while (e == EINTR);
  if (e == 0) return FileLock::held;
  if (e == EWOULDBLOCK) return FileLock::busy;
  // Note [File systems without locks]: a warning once per file system (st_dev).
  static std::mutex mu;
  static std::set<dev_t> warned;
  struct stat st {};
  const dev_t dev = ::fstat(fd, &st) == 0 ? st.st_dev : dev_t{};
  bool first = false;
  {
    std::lock_guard<std::mutex> g(mu);
    first = warned.insert(dev).second;
  }
  if (first)
    log_warn("{}: the file system refuses file locks ({}), so {} is not refused here; zo2 goes on unlocked (on "
             "Lustre, mount with -o flock; on NFS, run the lock daemon)",
             path.string(), std::strerror(e), guards);
  else
    log_debug("{}: no file lock ({}): {} is not refused here", path.string(), std::strerror(e), guards);
  return FileLock::unsupported;
}

void write_file_atomic(const fs::path& path, std::string_view contents) {
  AtomicFile f(path);
  f.write(contents);
  f.commit();
}

std::optional<std::string> abandoned_temp_target(std::string_view name) {
  // ".<name>.tmp.<pid>-<host>.<n>.<random>" or, from 0.2.0 and older, ".<name>.tmp.<pid>.…"
  const std::size_t t = name.rfind(".tmp.");
  if (!name.starts_with(".") || t == std::string_view::npos || t < 2) return std::nullopt;
  std::string_view rest = name.substr(t + 5);
  std::uint64_t pid = 0;
  std::size_t i = 0;
  while (i < rest.size() && rest[i] >= '0' && rest[i] <= '9' && pid < (1u << 30))
    pid = pid * 10 + static_cast<unsigned>(rest[i++] - '0');
  if (i == 0 || pid == 0 || pid >= (1u << 30) || i == rest.size()) return std::nullopt;
  if (rest[i] == '-') {
    if (rest.substr(i + 1, 8) != host_tag() || rest.size() < i + 10 || rest[i + 9] != '.') return std::nullopt;
  } else if (rest[i] != '.') {
    return std::nullopt;
  }
  if (pid == static_cast<std::uint64_t>(::getpid())) return std::nullopt;
  if (::kill(static_cast<pid_t>(pid), 0) == 0 || errno != ESRCH) return std::nullopt;  // alive, or not ours to tell
  return std::string(name.substr(1, t - 1));
}

void remove_abandoned_temps(const fs::path& target) noexcept {
  try {
    fs::path dir = target.parent_path();
    if (dir.empty()) dir = ".";
    const std::string base = target.filename().string();
    std::error_code ec;
    for (const auto& de : fs::directory_iterator(dir, ec)) {
      const std::string name = de.path().filename().string();
      const auto of = abandoned_temp_target(name);
      // The temp name may have cut the target's name (NAME_MAX).
      if (!of || of->empty() || !base.starts_with(*of)) continue;
      const std::size_t suffix = name.size() - 1 - of->size();
      if (*of != base && 1 + base.size() + suffix <= NAME_MAX) continue;  // another file's
      std::error_code rec;
      // A temp directory (make_temp_dir) goes whole; nothing else (a link is not followed).
      if (de.is_directory(rec) && !de.is_symlink(rec)) {
        if (fs::remove_all(de.path(), rec) > 0 && !rec)
          log_debug("removed '{}', left by a writer of '{}' that is gone", de.path().string(), target.string());
        continue;
      }
      if (!de.is_regular_file(rec)) continue;
      if (fs::remove(de.path(), rec))
        log_debug("removed '{}', left by a writer of '{}' that is gone", de.path().string(), target.string());
      else if (rec)
        log_debug("cannot remove '{}': {}", de.path().string(), rec.message());
    }
  } catch (...) {
  }
}

namespace {
std::function<int(const char*, struct statvfs*)> g_statvfs_hook;
}  // namespace

void set_statvfs_for_testing(std::function<int(const char* path, struct statvfs* st)> statvfs) {
  g_statvfs_hook = std::move(statvfs);
}

std::optional<std::uint64_t> free_bytes(const fs::path& path) {
  // The nearest existing ancestor: a run directory not made yet lands on its parent's file system.
  std::error_code ec;
  fs::path p = path.empty() ? fs::path(".") : fs::absolute(path, ec);
  if (ec) p = path;
  while (!fs::exists(p, ec) && p.has_relative_path()) p = p.parent_path();
  struct statvfs st {};
  // Note [Room for a save]: a failed statvfs, or one that reports no blocks (FUSE, some
  // network file systems fill every field with 0), says nothing of the space: never a refusal.
  if ((g_statvfs_hook ? g_statvfs_hook(p.c_str(), &st) : ::statvfs(p.c_str(), &st)) != 0) {
    log_debug("{}: statvfs failed ({}); the free space is not checked", p.string(), errno_message(errno));
    return std::nullopt;
  }
  if (st.f_blocks == 0) {
    log_debug("{}: the file system reports no blocks; the free space is not checked", p.string());
    return std::nullopt;
  }
  const std::uint64_t unit = st.f_frsize != 0 ? st.f_frsize : st.f_bsize;
  const std::uint64_t avail = st.f_bavail;
  if (unit != 0 && avail > UINT64_MAX / unit) return UINT64_MAX;
  return avail * unit;
}

void require_free_space(const fs::path& path, std::uint64_t bytes, std::string_view what, std::string_view ways_out) {
  const std::optional<std::uint64_t> free = free_bytes(path);
  if (!free || *free >= bytes) return;
  fail(ErrorKind::io, "{}: not enough free space for {}: it needs {}, but the file system there has {} free{}",
       path.string(), what, format_bytes(static_cast<double>(bytes)), format_bytes(static_cast<double>(*free)),
       ways_out);
}

}  // namespace zo2
