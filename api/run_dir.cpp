#include "api/run_dir.h"

#include "runtime/checksum.h"
#include "runtime/error.h"
#include "runtime/file_util.h"
#include "runtime/json_file.h"
#include "runtime/log.h"

#include <fmt/format.h>

#include <algorithm>
#include <climits>
#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <fstream>
#include <map>
#include <mutex>
#include <regex>
#include <set>
#include <sstream>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

namespace zo2 {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

std::mutex g_locks_mu;
std::set<fs::path>& held_locks() {
  static std::set<fs::path> s;
  return s;
}

fs::path lock_key(const fs::path& dir) {
  std::error_code ec;
  fs::path p = fs::weakly_canonical(fs::absolute(dir), ec);
  return ec ? fs::absolute(dir).lexically_normal() : p;
}

// Note [Readers of a live run]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// `eval --model RUN` (or generate, forward, a C API or Python load) beside the training run
// writing RUN resolves `current` once and reads that step directory's files for a while; the
// run's next save removed it as the previous checkpoint, and the reader failed midway with
// "no safetensors checkpoint in directory RUN/step-N" (adversarial pass 60: 1 eval in 40
// against a run saving every step). Now a reader holds a shared flock on the step directory
// it resolved, and a save removes a superseded step directory only if it gets the exclusive
// lock; one still read is kept and removed by a later save (or the next writer's start) once
// its readers are gone. A process keeps one such pin per run directory, the newest it
// resolved, until it exits or resolves a newer step (a host that evaluates a live run again
// and again keeps at most one older checkpoint from removal). A reader whose step directory
// went away between reading `current` and taking the lock reads `current` again. The writer
// drops its own pins on the run it writes: it has what it needs in memory.
namespace {

struct ReadPin {
  std::string step;
  int fd = -1;
};
std::mutex g_pins_mu;
std::map<fs::path, ReadPin>& read_pins() {
  static std::map<fs::path, ReadPin> m;
  return m;
}

enum class Pin { held, unpinnable, gone };

std::function<void(const std::string&)> g_current_read_hook;  // set_current_read_hook_for_testing
std::function<int(const char*, const char*)> g_rename_hook;   // set_rename_for_testing

// rename(2), or the test's stand-in: 0, or -1 with errno set.
int rename_entry(const fs::path& from, const fs::path& to) {
  return g_rename_hook ? g_rename_hook(from.c_str(), to.c_str()) : ::rename(from.c_str(), to.c_str());
}

Pin pin_step(const fs::path& dir, const std::string& step) {
  if (g_current_read_hook) g_current_read_hook(step);
  const fs::path key = lock_key(dir);
  {
    std::lock_guard<std::mutex> g(g_pins_mu);
    if (const auto it = read_pins().find(key); it != read_pins().end() && it->second.step == step) return Pin::held;
  }
  const int fd = ::open((dir / step).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return errno == ENOENT ? Pin::gone : Pin::unpinnable;
  if (const FileLock l = try_lock_file(fd, false, dir / step, "a save removing this checkpoint while it is read");
      l != FileLock::held) {
    ::close(fd);
    return l == FileLock::busy ? Pin::gone : Pin::unpinnable;  // busy: the writer is removing it
  }
  struct stat st {};
  if (::fstat(fd, &st) == 0 && st.st_nlink == 0) {  // removed between the open and the lock
    ::close(fd);
    return Pin::gone;
  }
  std::lock_guard<std::mutex> g(g_pins_mu);
  ReadPin& p = read_pins()[key];
  if (p.fd >= 0) ::close(p.fd);
  p = ReadPin{step, fd};
  return Pin::held;
}

void unpin_run(const fs::path& dir) {
  std::lock_guard<std::mutex> g(g_pins_mu);
  if (const auto it = read_pins().find(lock_key(dir)); it != read_pins().end()) {
    if (it->second.fd >= 0) ::close(it->second.fd);
    read_pins().erase(it);
  }
}

// Removes a superseded step directory of a run unless a reader holds it.
void remove_step_dir(const fs::path& p) {
  std::error_code ec;
  const int fd = ::open(p.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC | O_NOFOLLOW);
  if (fd >= 0 && ::flock(fd, LOCK_EX | LOCK_NB) != 0 && errno == EWOULDBLOCK) {
    ::close(fd);
    log_info("{}: kept for now: another process is reading this checkpoint; a later save removes it", p.string());
    return;
  }
  fs::remove_all(p, ec);
  if (fd >= 0) ::close(fd);
  if (ec) log_warn("{}: cannot remove ({}); remove it by hand", p.string(), ec.message());
}

// Note [Run directories need links]
//   A run directory's `current` and its top-level files are symbolic links (Note [Run
//   directory]). Some file systems have none: exFAT and FAT (a USB drive), a CIFS/SMB share
//   without the Unix extensions, some FUSE mounts; symlink(2) answers EPERM, EOPNOTSUPP or
//   ENOSYS there. A run writing to one trained to its first save and failed there ("cannot
//   link to current/config.json"), its hours of steps behind a directory no resume reads
//   (adversarial pass 61). The writer now tries a link when it takes the directory, before
//   any work, and says what to do.
void require_links(const fs::path& dir) {
  const fs::path probe = dir / fmt::format(".zo2-link-probe.tmp.{}", ::getpid());  // clean_run_dir removes a stray one
  const fs::path probe2 = dir / fmt::format(".zo2-link-probe.tmp.{}.b", ::getpid());
  ::unlink(probe.c_str());
  ::unlink(probe2.c_str());
  if (::symlink(kRunLockFile, probe.c_str()) != 0) {
    const int e = errno;
    if (e == EPERM || e == EOPNOTSUPP || e == ENOSYS || e == EINVAL)
      fail(ErrorKind::io,
           "{}: cannot create a symbolic link there ({}): a run directory needs them (its 'current' link names the "
           "newest checkpoint), and this file system has none (as exFAT, FAT and SMB shares without the Unix "
           "extensions): choose a directory on another file system",
           dir.string(), std::strerror(e));
    fail(ErrorKind::io, "{}: cannot create a link there ({}), which a run directory needs", dir.string(),
         std::strerror(e));
  }
  // Each save after the first commits by renaming a new `current` over the old one: a file
  // system whose rename will not replace an entry (some FUSE and network ones) took the
  // first save and failed every later one with "File exists" (adversarial pass 67).
  int e = 0;
  if (::symlink(kRunLockFile, probe2.c_str()) != 0) {
    e = errno;
    ::unlink(probe.c_str());
    fail(ErrorKind::io, "{}: cannot create a second link there ({}), which a save needs", dir.string(), std::strerror(e));
  }
  if (rename_entry(probe2, probe) != 0) e = errno;
  ::unlink(probe2.c_str());
  ::unlink(probe.c_str());
  if (e != 0)
    fail(ErrorKind::io,
         "{}: a rename there cannot replace an existing link ({}): a run directory commits each save by renaming a "
         "new 'current' link over the old one, so every save after the first would fail; choose a directory on "
         "another file system",
         dir.string(), std::strerror(e));
}

// A save writes its files one directory below the run's, each through a temp name: the
// step in the making (make_temp_dir: "." + "step-N" with N up to 2^53, 16 digits, + the
// temp suffix), then a file's temp name ("." + a base name of at most 40 bytes, as
// "model-00001-of-00002.safetensors", + the suffix); the suffix is ".tmp.PID-HOST.COUNT.RAND"
// (a pid up to 7 digits, an 8-digit host tag, a counter up to 20, 8 hex digits). A run
// directory whose own path leaves no room for that under PATH_MAX trained every step and
// failed at its first save with "File name too long" (adversarial pass 64): refused when
// the writer takes it. (The absolute path is measured: zo2 opens most files through it.)
void require_path_room(const fs::path& dir) {
  constexpr std::size_t kSuffix = 5 + 7 + 1 + 8 + 1 + 20 + 1 + 8;
  constexpr std::size_t kDeepest = 1 + (1 + 5 + 16 + kSuffix) + 1 + (1 + 40 + kSuffix);
  std::error_code ec;
  const std::string abs = fs::absolute(dir, ec).lexically_normal().string();
  if (ec || abs.size() + kDeepest < PATH_MAX) return;
  const std::string shown = abs.size() <= 120 ? abs : abs.substr(0, 56) + "…" + abs.substr(abs.size() - 56);
  fail(ErrorKind::io,
       "{}: its path is {} bytes long, and a save writes files up to {} bytes below it: beyond this system's path "
       "limit (PATH_MAX {}) for the longest names, so a save could fail there; choose a directory whose path is "
       "under {} bytes",
       shown, abs.size(), kDeepest, PATH_MAX, PATH_MAX - kDeepest);
}

}  // namespace

void fsync_path(const fs::path& p, bool directory) {
  const int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC | (directory ? O_DIRECTORY : 0));
  if (fd < 0) fail(ErrorKind::io, "{}: cannot open to sync: {}", p.string(), std::strerror(errno));
  const int r = ::fsync(fd);
  const int e = errno;
  ::close(fd);
  // Some file systems (e.g. some FUSE ones) do not sync directories; the data files matter.
  if (r != 0 && !(directory && (e == EINVAL || e == ENOTSUP)))
    fail(ErrorKind::io, "{}: cannot write to disk: {}", p.string(), std::strerror(e));
}

void write_synced(const fs::path& p, const std::string& text) {
  keep_standard_fds_open();
  const int fd = ::open(p.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
  if (fd < 0) fail(ErrorKind::io, "{}: cannot write: {}", p.string(), std::strerror(errno));
  std::size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int e = n < 0 ? errno : EIO;
      ::close(fd);
      fail(ErrorKind::io, "{}: cannot write: {}", p.string(), std::strerror(e));
    }
    done += static_cast<std::size_t>(n);
  }
  const int r = ::fsync(fd);
  const int e = errno;
  ::close(fd);
  if (r != 0) fail(ErrorKind::io, "{}: cannot write to disk: {}", p.string(), std::strerror(e));
}

json read_json_file(const fs::path& p) {
  const std::string text = read_regular_file(p);  // Note [Reading JSON]: no FIFO, no deep nesting
  try {
    return parse_json_text(text, p.string());
  } catch (const json::exception& e) {  // parse errors, and numbers beyond a double
    fail(ErrorKind::format, "{}: not valid JSON: {}", p.string(), e.what());
  }
}

// A file name a manifest may list: one component, no hidden or relative names.
bool plain_name(const std::string& n) {
  return !n.empty() && n != "." && n != ".." && n.find('/') == std::string::npos && n.find('\0') == std::string::npos;
}

bool is_step_dir_name(const std::string& n) { return n.rfind("step-", 0) == 0; }

// The step directory of DIR a `current` link names: its target "step-N" (or "step-N/"), or an
// absolute path whose parent is DIR itself; empty for any other target. A relative path
// through other directories ("step-1/../../elsewhere/step-1") names something outside DIR,
// which a save would then remove as the previous checkpoint (adversarial pass 52).
std::string current_step_name(const fs::path& dir, const fs::path& target) {
  std::string t = target.string();
  while (t.size() > 1 && t.back() == '/') t.pop_back();
  const fs::path p(t);
  const std::string name = p.filename().string();
  if (!plain_name(name) || !is_step_dir_name(name)) return {};
  if (p.is_absolute() ? !same_directory(p.parent_path(), dir) : !plain_name(t)) return {};
  return name;
}

std::uint64_t manifest_uint(const json& obj, const char* key, const fs::path& file, const std::string& what) {
  if (!obj.is_object() || !obj.contains(key) || !obj.at(key).is_number_unsigned())
    fail(ErrorKind::format, "{}: {} field '{}' must be a non-negative integer{}", file.string(), what, key,
         obj.is_object() && obj.contains(key) ? fmt::format(", got {}", obj.at(key).dump()) : " (missing)");
  return obj.at(key).get<std::uint64_t>();
}

// Checks a v2 manifest against the files of its directory.
void check_manifest(const fs::path& dir, const json& m, bool verify, const fs::path& mfile) {
  // Version 3 on carries it; a version-2 manifest (an older zo2's) has none.
  if (m.value("zo2_state", 0) >= 3 && !m.contains("state_crc32"))
    fail(ErrorKind::format, "{}: field 'state_crc32' is missing: the manifest was edited", mfile.string());
  if (verify && m.contains("state_crc32")) {
    const std::uint64_t want = manifest_uint(m, "state_crc32", mfile, "the manifest");
    if (manifest_crc32(m) != want)
      fail(ErrorKind::format,
           "{}: edited since it was saved (its state_crc32 does not match): a resume continues the run as it was "
           "saved; to change a flag, give it on the command line",
           mfile.string());
  }
  if (!m.contains("files") || !m.at("files").is_object() || m.at("files").empty())
    fail(ErrorKind::format, "{}: field 'files' must be an object naming the checkpoint's files", mfile.string());
  for (const auto& [name, rec] : m.at("files").items()) {
    if (!plain_name(name) || name == kRunStateFile)
      fail(ErrorKind::format, "{}: field 'files' lists '{}', which is not a file of the checkpoint", mfile.string(),
           name);
    const std::string what = fmt::format("files['{}']", name);
    const std::uint64_t bytes = manifest_uint(rec, "bytes", mfile, what);
    const std::uint64_t crc = manifest_uint(rec, "crc32", mfile, what);
    const fs::path f = dir / name;
    std::error_code ec;
    const auto st = fs::status(f, ec);
    if (ec || !fs::is_regular_file(st))
      fail(ErrorKind::format, "{}: missing, but {} lists it: the checkpoint is incomplete or was altered",
           f.string(), mfile.string());
    const auto size = fs::file_size(f, ec);
    if (ec || size != bytes)
      fail(ErrorKind::format, "{}: {} bytes, but {} records {}: the file was replaced, cut short or altered",
           f.string(), ec ? 0 : size, mfile.string(), bytes);
    if (verify && crc32_file(f) != crc)
      fail(ErrorKind::format, "{}: CRC-32 {:08x}, but {} records {:08x}: the file was altered or damaged",
           f.string(), crc32_file(f), mfile.string(), static_cast<std::uint32_t>(crc));
  }
}

// Links DIR/<name> -> current/<name> for each name (dangling until `current` names a step
// directory that has it: a save makes them before its switch, so DIR reads as a checkpoint
// from the moment the switch happens, whenever a crash comes).
void add_links(const fs::path& dir, const std::set<std::string>& names, bool replace_files) {
  for (const auto& name : names) {
    const fs::path link = dir / name;
    const fs::path target = fs::path(kRunCurrent) / name;
    std::error_code e2;
    const auto st = fs::symlink_status(link, e2);
    if (fs::is_symlink(st) && fs::read_symlink(link, e2) == target) continue;
    if (fs::is_directory(st)) {
      log_warn("{}: a directory where the run's {} link belongs; left alone", link.string(), name);
      continue;
    }
    // Before the switch, a file of the layout before run directories stays: until `current`
    // exists it is the checkpoint.
    if (!replace_files && fs::is_regular_file(st)) continue;
    const fs::path tmp = dir / ("." + name + ".link.tmp");
    fs::remove(tmp, e2);
    fs::create_symlink(target, tmp, e2);
    if (!e2) fs::rename(tmp, link, e2);
    if (e2) fail(ErrorKind::io, "{}: cannot link to {}: {}", link.string(), target.string(), e2.message());
  }
}

std::set<std::string> files_of(const fs::path& d) {
  std::set<std::string> names;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(d, ec))
    if (e.is_regular_file()) names.insert(e.path().filename().string());
  if (ec) fail(ErrorKind::io, "{}: cannot list: {}", d.string(), ec.message());
  return names;
}

// The links of the current checkpoint's files, and none other: links into current/ the
// current checkpoint does not have, and an older layout's checkpoint files, are removed.
void refresh_links(const fs::path& dir) {
  const fs::path cur = dir / kRunCurrent;
  std::error_code ec;
  if (!fs::is_symlink(fs::symlink_status(cur, ec))) return;
  // The link's text, never the link followed (Note [Writers never follow current]).
  const std::string step = current_step_name(dir, fs::read_symlink(cur, ec));
  if (ec || step.empty() || !fs::is_directory(fs::symlink_status(dir / step, ec))) return;
  const std::set<std::string> names = files_of(dir / step);
  add_links(dir, names, /*replace_files=*/true);
  static const std::regex old_ckpt(R"(model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json)");
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    if (names.count(name)) continue;
    std::error_code e2;
    if (e.is_symlink(e2)) {
      const fs::path t = fs::read_symlink(e.path(), e2);
      if (!e2 && t.begin() != t.end() && *t.begin() == kRunCurrent) fs::remove(e.path(), e2);
    } else if (e.is_regular_file(e2) && std::regex_match(name, old_ckpt)) {
      fs::remove(e.path(), e2);  // a file of the layout before run directories
    }
  }
}

// Points DIR/current at step directory `name` atomically (a link beside it, renamed over
// it), then makes the switch durable: the commit point of a checkpoint. A failure leaves the
// previous link and is returned.
std::error_code switch_current(const fs::path& dir, const std::string& name) {
  std::error_code ec;
  const fs::path cur_tmp = dir / ".current.tmp";
  fs::remove(cur_tmp, ec);
  ec.clear();
  fs::create_symlink(name, cur_tmp, ec);
  if (!ec && rename_entry(cur_tmp, dir / kRunCurrent) != 0) ec = std::error_code(errno, std::system_category());
  if (ec) {
    std::error_code e2;
    fs::remove(cur_tmp, e2);
    return ec;
  }
  try {
    fsync_path(dir, true);
  } catch (const Error& e) {  // the switch happened: say so, not only that the sync failed
    fail(ErrorKind::io, "{} (the checkpoint was committed: {} points at {}, and a resume continues from it; the "
         "switch may not survive a power cut)", e.what(), (dir / kRunCurrent).string(), name);
  }
  return ec;
}

// What an interrupted save leaves: hidden step directories, temporary files and links, step
// directories `current` does not name.
//
// A complete checkpoint is never removed unless `current` names another one: a `current`
// that is not a link, or that names no step directory of DIR, stops the writer with nothing
// removed; with no `current` at all (a first save cut short before its commit, a link
// deleted by hand, a step directory copied into a new directory), the newest complete step
// directory becomes current — it was written whole, after the seed log lines it needs, so
// committing it is the commit the save did not get to (tests/fault/sigkill.sh counts those
// resumes).
void clean_run_dir(const fs::path& dir) {
  static const std::regex zo2_tmp(R"(.*\.(json|jsonl|txt|model|bpe)\.tmp)");
  std::error_code ec;
  std::string current;
  const fs::path cur = dir / kRunCurrent;
  const fs::file_status cur_status = fs::symlink_status(cur, ec);
  if (fs::is_symlink(cur_status)) {
    // "step-N", or an absolute or trailing-slash spelling of it: the directory it names.
    const fs::path target = fs::read_symlink(cur, ec);
    current = current_step_name(dir, target);
    // Note [Writers never follow current]
    //   The link's text names the step directory, which is checked as a directory of DIR;
    //   `current` itself is not followed. On a mount with nosymfollow following it fails
    //   (ELOOP), and every resume was refused as "not one of the run's step directories"
    //   (adversarial pass 67).
    if (current.empty() || !fs::is_directory(fs::symlink_status(dir / current, ec)))
      fail(ErrorKind::format,
           "{} points at {}, not one of the run's step directories: nothing was removed; point it at the "
           "checkpoint to continue from (ln -sfn step-NNNNNNNN {})",
           cur.string(), target.string(), cur.string());
  } else if (fs::exists(cur_status)) {
    fail(ErrorKind::format,
         "{} is not a link (was the run directory copied with links followed, as cp -rL and scp -r do?): nothing "
         "was removed; replace it by a link to the step directory it copies (rm -r {} && ln -s step-NNNNNNNN {})",
         cur.string(), cur.string(), cur.string());
  } else {
    std::string newest;
    for (const auto& e : fs::directory_iterator(dir, ec)) {
      const std::string name = e.path().filename().string();
      std::error_code e2;
      if (e.is_directory(e2) && !e.is_symlink(e2) && is_step_dir_name(name) && fs::exists(e.path() / kRunStateFile, e2) &&
          name > newest)  // step-%08d: the names sort as the steps
        newest = name;
    }
    if (!newest.empty()) {
      log_warn("{}: no '{}' link; {} is the newest complete checkpoint and becomes current", dir.string(), kRunCurrent,
               newest);
      if (const std::error_code e = switch_current(dir, newest))
        fail(ErrorKind::io, "{}: cannot point at {}: {}", cur.string(), newest, e.message());
      current = newest;
    }
  }
  std::vector<fs::path> doomed;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    std::error_code e2;
    const bool is_dir = e.is_directory(e2) && !e.is_symlink(e2);
    if (is_dir && name.rfind(".step-", 0) == 0) doomed.push_back(e.path());
    else if (is_dir && is_step_dir_name(name) && !current.empty() && name != current)
      doomed.push_back(e.path());  // a previous checkpoint, one whose removal was cut short, or an uncommitted one
    else if (!is_dir && name.rfind(".", 0) == 0 && name.find(".tmp") != std::string::npos)
      doomed.push_back(e.path());  // the links', the switch's and write_safetensors' temporaries
    else if (!is_dir && std::regex_match(name, zo2_tmp))
      doomed.push_back(e.path());  // write_file_atomic's, of the seed log and an older layout's files
  }
  unpin_run(dir);  // this process writes DIR now (Note [Readers of a live run])
  for (const auto& p : doomed) {
    if (is_step_dir_name(p.filename().string())) {  // a previous checkpoint: kept while read
      remove_step_dir(p);
      continue;
    }
    log_debug("{}: removing what an interrupted save left", p.string());
    std::error_code e2;
    fs::remove_all(p, e2);
    if (e2) log_warn("{}: cannot remove ({}); remove it by hand", p.string(), e2.message());
  }
  if (!current.empty()) refresh_links(dir);
}

std::string pid_of_lock(int fd) {
  char buf[32] = {};
  const ssize_t n = ::pread(fd, buf, sizeof buf - 1, 0);
  std::string s = n > 0 ? std::string(buf, static_cast<std::size_t>(n)) : std::string();
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s.empty() ? "unknown" : s;
}

}  // namespace

std::uint32_t manifest_crc32(nlohmann::json manifest) {
  manifest.erase("state_crc32");
  // Paths that are not UTF-8 (a directory named in Latin-1) are written with U+FFFD.
  const std::string text = manifest.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  return crc32_update(0, std::as_bytes(std::span<const char>(text.data(), text.size())));
}

RunDirLock::RunDirLock(const fs::path& dir) {
  require_path_room(dir);
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec || !fs::is_directory(dir))
    fail(ErrorKind::io, "{}: cannot create the output directory{}{}", dir.string(), ec ? ": " : "",
         ec ? ec.message() : std::string());
  key_ = lock_key(dir);
  {
    std::lock_guard<std::mutex> g(g_locks_mu);
    if (held_locks().count(key_))
      fail(ErrorKind::io, "{}: this process is already writing this directory; a second writer would mix two runs",
           dir.string());
  }
  const fs::path file = dir / kRunLockFile;
  fd_ = open_own_file(file, O_RDWR | O_CREAT);
  if (try_lock_file(fd_, true, file, "a second zo2 process writing this run directory") == FileLock::busy) {
    const std::string pid = pid_of_lock(fd_);
    ::close(fd_);
    fd_ = -1;
    fail(ErrorKind::io,
         "{}: another zo2 process (pid {}) is writing this directory (it holds {}); two writers would mix their "
         "checkpoints and seed logs — wait for it, or choose another --out",
         dir.string(), pid, file.string());
  }
  const std::string me = fmt::format("{}\n", ::getpid());
  if (::ftruncate(fd_, 0) != 0 || ::pwrite(fd_, me.data(), me.size(), 0) < 0) {
    // The pid is a courtesy for the message above; the lock itself holds.
  }
  {
    std::lock_guard<std::mutex> g(g_locks_mu);
    held_locks().insert(key_);
  }
  try {
    require_links(dir);
    clean_run_dir(dir);
  } catch (...) {
    std::lock_guard<std::mutex> g(g_locks_mu);
    held_locks().erase(key_);
    ::close(fd_);
    throw;
  }
}

RunDirLock::~RunDirLock() {
  if (fd_ < 0) return;
  {
    std::lock_guard<std::mutex> g(g_locks_mu);
    held_locks().erase(key_);
  }
  ::close(fd_);  // releases the flock; the file stays (removing it would race a new writer)
}

bool RunDirLock::held(const fs::path& dir) {
  std::lock_guard<std::mutex> g(g_locks_mu);
  return held_locks().count(lock_key(dir)) > 0;
}

void require_room_for_save(const fs::path& dir, const SaveRoom& room) {
  if (room.bytes == 0) return;
  // Note [Room for a save] (runtime/file_util.h): one new checkpoint must fit beside the
  // previous one, which stays on the disk (and in the free space statvfs reports) until the
  // new one is published.
  require_free_space(dir, room.bytes, room.what.empty() ? std::string("a checkpoint") : room.what,
                     fmt::format("; a save keeps the previous checkpoint until the new one is published, so each "
                                 "save needs this much free{}{}",
                                 room.ways_out.empty() ? "" : ": ", room.ways_out));
}

void publish_checkpoint(const fs::path& dir, const PublishRequest& r) {
  ZO2_CHECK(r.write);
  std::optional<RunDirLock> lock;
  if (!RunDirLock::held(dir)) lock.emplace(dir);
  // Before the hidden step directory: a save the file system cannot hold writes nothing, and
  // DIR keeps its previous checkpoint (Note [Room for a save] in runtime/file_util.h).
  require_room_for_save(dir, r.room);
  std::error_code ec;
  const fs::path cur = dir / kRunCurrent;
  const auto cur_st = fs::symlink_status(cur, ec);
  if (fs::exists(cur_st) && !fs::is_symlink(cur_st))
    fail(ErrorKind::io, "{}: exists and is not zo2's link to the current checkpoint; move it away", cur.string());
  const fs::path tmp = dir / fmt::format(".step-{}.tmp-{}", r.step, ::getpid());
  fs::remove_all(tmp, ec);
  fs::create_directory(tmp, ec);
  if (ec) fail(ErrorKind::io, "{}: cannot create: {}", tmp.string(), ec.message());
  std::string name;  // the step directory's name
  const bool first_save = !fs::exists(cur_st);
  try {
    // Note [Writes, not mappings] (runtime/file_util.h): what the writer meant each file to
    // hold, from memory, is what the manifest records.
    WrittenFileLog meant(tmp);
    r.write(tmp);
    json m = r.state.is_object() ? r.state : json::object();
    m["zo2_state"] = m.contains("eval_owed_after_step") ? 4 : 3;  // Note [State versions]
    m["written_by"] = "zo2 " ZO2_VERSION_STRING;
    m["step"] = r.step;
    m["next_step"] = r.step;
    json files = json::object();
    std::vector<fs::path> written;
    for (const auto& e : fs::directory_iterator(tmp)) written.push_back(e.path());
    std::sort(written.begin(), written.end());
    for (const auto& p : written) {
      const std::string name = p.filename().string();
      if (!fs::is_regular_file(p) || name == kRunStateFile) continue;
      fsync_path(p, false);
      const std::uint64_t bytes = fs::file_size(p);
      const std::uint32_t crc = crc32_file(p);
      // A file system that lost a write without an error (a FUSE backend that failed it after
      // the bytes were taken) is caught here when reading back shows it, and otherwise by the
      // CRC-32 of what was meant, at the next resume.
      if (const auto w = meant.find(name); w && (w->bytes != bytes || w->crc32 != crc))
        fail(ErrorKind::io,
             "{}: the file system holds other bytes than were written to it ({} bytes, CRC-32 {:08x}; written: {} "
             "bytes, CRC-32 {:08x}): a write failed without an error (a FUSE or network file system whose backend "
             "failed, or a full or failing disk); nothing was saved",
             p.string(), bytes, crc, w->bytes, w->crc32);
      else if (w)
        files[name] = {{"bytes", w->bytes}, {"crc32", w->crc32}};
      else
        files[name] = {{"bytes", bytes}, {"crc32", crc}};
    }
    m["files"] = files;
    if (!r.seed_log.empty()) {
      const fs::path rel =
          same_directory(r.seed_log.parent_path().empty() ? "." : r.seed_log.parent_path(), dir)
              ? r.seed_log.filename()
              : fs::absolute(r.seed_log);
      m["seed_log"] = {{"path", rel.string()},
                       {"bytes", r.seed_log_position.bytes},
                       {"crc32", r.seed_log_position.crc32},
                       {"next_step", r.seed_log_position.next_step}};
    }
    m["state_crc32"] = manifest_crc32(m);
    write_synced(tmp / kRunStateFile, m.dump(2, ' ', false, json::error_handler_t::replace) + "\n");
    fsync_path(tmp, true);
    name = fmt::format("step-{:08d}", r.step);
    for (int k = 2; fs::exists(fs::symlink_status(dir / name, ec)); ++k) name = fmt::format("step-{:08d}.{}", r.step, k);
    fs::rename(tmp, dir / name, ec);
    if (ec) fail(ErrorKind::io, "{}: cannot rename to {}: {}", tmp.string(), (dir / name).string(), ec.message());
  } catch (...) {
    std::error_code e2;
    fs::remove_all(tmp, e2);
    throw;
  }
  add_links(dir, files_of(dir / name), /*replace_files=*/false);
  fsync_path(dir, true);
  if (const std::error_code e = switch_current(dir, name)) {  // the commit point
    // With a previous checkpoint DIR goes back to it. A first save's complete step directory
    // is the only checkpoint: it stays, and the next writer (a resume) makes it current, as
    // it does after a crash at this point (clean_run_dir); removing it lost the save
    // (adversarial pass 67: `current` failed for want of an inode).
    if (first_save)
      fail(ErrorKind::io,
           "{}: cannot point at {}: {}; the checkpoint is complete and kept in {}: once the cause is fixed, `train "
           "--resume {}` makes it current and continues from it",
           cur.string(), name, e.message(), (dir / name).string(), dir.string());
    std::error_code e2;
    fs::remove_all(dir / name, e2);
    fail(ErrorKind::io, "{}: cannot point at {}: {}", cur.string(), name, e.message());
  }
  refresh_links(dir);
  // The previous checkpoint goes, and any kept earlier while a reader held it (Note [Readers
  // of a live run]).
  unpin_run(dir);
  std::vector<fs::path> superseded;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string n = e.path().filename().string();
    std::error_code e2;
    if (n != name && is_step_dir_name(n) && e.is_directory(e2) && !e.is_symlink(e2)) superseded.push_back(e.path());
  }
  for (const auto& p : superseded) remove_step_dir(p);
}

std::vector<std::string> checkpoint_roundings(const nlohmann::json& state, DType storage) {
  std::vector<std::string> out;
  if (!state.is_object() || (state.contains("peft") && !state.at("peft").is_null())) return out;
  auto narrow = [&](const nlohmann::json& v) -> std::optional<std::string> {
    if (!v.is_string()) return std::nullopt;
    const std::optional<DType> d = dtype_from_name(v.get<std::string>());
    if (!d || !(*d == DType::bf16 || *d == DType::f16) || *d == storage) return std::nullopt;
    return std::string(dtype_name(*d));
  };
  if (const auto p = state.find("rounded_pending"); p != state.end() && p->is_array())
    for (const nlohmann::json& v : *p)
      if (const auto d = narrow(v)) out.push_back(*d);
  if (const auto s = state.find("save_dtype"); s != state.end())
    if (const auto d = narrow(*s)) out.push_back(*d);
  return out;
}

void set_current_read_hook_for_testing(std::function<void(const std::string& step)> hook) {
  g_current_read_hook = std::move(hook);
}

void set_rename_for_testing(std::function<int(const char* from, const char* to)> rename) {
  g_rename_hook = std::move(rename);
}

OpenedCheckpoint open_checkpoint(const fs::path& dir, bool verify) {
  std::error_code ec;
  if (const fs::file_status st = fs::status(dir, ec); !fs::is_directory(st)) {
    if (fs::exists(st)) fail(ErrorKind::io, "{}: not a directory", dir.string());
    // A path that is there but cannot be followed (a symbolic link loop: ELOOP, a directory
    // without search permission) is not "no such directory": say what stat said.
    if (ec && ec != std::errc::no_such_file_or_directory && ec != std::errc::not_a_directory)
      fail(ErrorKind::io, "{}: cannot open the directory: {}", dir.string(), ec.message());
    fail(ErrorKind::io, "{}: no such directory", dir.string());
  }
  OpenedCheckpoint o;
  o.dir = dir;
  const fs::path cur = dir / kRunCurrent;
  if (fs::is_symlink(fs::symlink_status(cur, ec))) {
    fs::path target = fs::read_symlink(cur, ec);
    if (ec || !plain_name(target.string()) || !is_step_dir_name(target.string()))
      fail(ErrorKind::format, "{}: names '{}', not one of the run's step directories", cur.string(), target.string());
    // Note [Readers of a live run]: held while this process reads it; a save that removed it
    // first moved `current` on, so read the link again.
    for (int tries = 0; pin_step(dir, target.string()) == Pin::gone; ++tries) {
      const fs::path again = fs::read_symlink(cur, ec);
      if (tries == 100 || ec || again == target) break;  // not a save moving on: the check below says what is wrong
      target = again;
      if (!plain_name(target.string()) || !is_step_dir_name(target.string()))
        fail(ErrorKind::format, "{}: names '{}', not one of the run's step directories", cur.string(), target.string());
    }
    o.dir = dir / target;
    o.run_dir = dir;
    if (!fs::is_directory(o.dir, ec))
      fail(ErrorKind::format, "{}: names {}, which is missing: the run directory was damaged", cur.string(),
           o.dir.string());
    const fs::path mfile = o.dir / kRunStateFile;
    if (!fs::exists(mfile, ec))
      fail(ErrorKind::format, "{}: missing: the checkpoint {} names has no manifest", mfile.string(), cur.string());
  }
  const fs::path mfile = o.dir / kRunStateFile;
  if (!fs::exists(mfile, ec)) return o;  // a plain HF checkpoint
  o.state = read_json_file(mfile);
  if (!o.state.is_object() || !o.state.contains("zo2_state"))
    fail(ErrorKind::format, "{}: not a zo2 state file (no \"zo2_state\")", mfile.string());
  const json& v = o.state.at("zo2_state");
  if (!v.is_number_unsigned() || v.get<std::uint64_t>() < 1 || v.get<std::uint64_t>() > kRunStateVersion)
    fail(ErrorKind::format, "{}: field 'zo2_state' = {} is not a state version this zo2 ({}) reads (1 to {}){}",
         mfile.string(), v.dump(), ZO2_VERSION_STRING, kRunStateVersion,
         o.state.contains("written_by") && o.state.at("written_by").is_string()
             ? fmt::format(": it was written by {}", o.state.at("written_by").get<std::string>())
             : std::string());
  if (v.get<int>() == 1) {  // written by a zo2 before run directories: no manifest to check
    if (fs::exists(o.dir / kRunSeedLog, ec)) o.seed_log = o.dir / kRunSeedLog;
    return o;
  }
  if (!o.state.contains("step") || !o.state.at("step").is_number_unsigned() ||
      o.state.at("step").get<std::uint64_t>() > std::uint64_t{INT64_MAX})
    fail(ErrorKind::format, "{}: field 'step' must be a non-negative integer", mfile.string());
  o.step = o.state.at("step").get<std::int64_t>();
  check_manifest(o.dir, o.state, verify, mfile);
  if (o.state.contains("seed_log")) {
    const json& s = o.state.at("seed_log");
    if (!s.is_object() || !s.contains("path") || !s.at("path").is_string() || s.at("path").get<std::string>().empty())
      fail(ErrorKind::format, "{}: field 'seed_log' must name the seed log's path", mfile.string());
    (void)manifest_uint(s, "bytes", mfile, "seed_log");
    (void)manifest_uint(s, "crc32", mfile, "seed_log");
    const fs::path p = s.at("path").get<std::string>();
    // A relative path is the run directory's: the step directory's parent, or DIR itself
    // when DIR is a run directory copied with its links followed (cp -rL, scp -r, a copy to
    // exFAT: `current` a directory, the checkpoint's files copied beside it), which
    // resolved DIR/../seed_log.jsonl (adversarial pass 67).
    fs::path base = o.run_dir;
    if (base.empty()) {
      const fs::file_status cst = fs::symlink_status(dir / kRunCurrent, ec);
      base = fs::is_directory(cst) && !fs::is_symlink(cst) ? dir : o.dir / "..";
    }
    o.seed_log = p.is_absolute() ? p : base / p;
  }
  return o;
}

fs::path resolve_model_dir(const fs::path& dir) { return open_checkpoint(dir, false).dir; }

void release_read_pin(const fs::path& dir) { unpin_run(dir); }

void remove_run(const fs::path& dir) {
  ZO2_CHECK(RunDirLock::held(dir));
  std::error_code ec;
  fs::remove(dir / kRunCurrent, ec);
  static const std::regex ckpt_file(
      R"(model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|config\.json|zo2_state\.json|seed_log\.jsonl)");
  const bool old_run = fs::exists(dir / kRunStateFile, ec) && !fs::is_symlink(fs::symlink_status(dir / kRunStateFile, ec));
  std::vector<fs::path> doomed;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    std::error_code e2;
    if (e.is_symlink(e2)) {
      const fs::path t = fs::read_symlink(e.path(), e2);
      if (!e2 && t.begin() != t.end() && *t.begin() == kRunCurrent) doomed.push_back(e.path());
    } else if (e.is_directory(e2) && (is_step_dir_name(name) || name.rfind(".step-", 0) == 0)) {
      doomed.push_back(e.path());
    } else if (name == kRunSeedLog || (old_run && std::regex_match(name, ckpt_file))) {
      doomed.push_back(e.path());
    }
  }
  for (const auto& p : doomed) {
    fs::remove_all(p, ec);
    if (ec) fail(ErrorKind::io, "{}: cannot remove: {}", p.string(), ec.message());
  }
}

bool holds_run(const fs::path& dir) {
  std::error_code ec;
  return fs::is_symlink(fs::symlink_status(dir / kRunCurrent, ec)) || fs::exists(dir / kRunStateFile, ec) ||
         fs::exists(dir / kRunSeedLog, ec);
}

std::vector<std::string> foreign_checkpoint_files(const fs::path& dir) {
  static const std::regex ckpt_file(
      R"(model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|config\.json|adapter_model\.safetensors|)"
      R"(adapter_config\.json)");
  std::vector<std::string> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    std::error_code e2;
    if (e.is_symlink(e2)) continue;  // a run's links into its checkpoint
    if (name == kRunCurrent || (e.is_regular_file(e2) && std::regex_match(name, ckpt_file))) out.push_back(name);
  }
  std::sort(out.begin(), out.end());
  return out;
}

fs::path run_of_checkpoint(const fs::path& dir) {
  std::error_code ec;
  const fs::path p = fs::weakly_canonical(fs::absolute(dir, ec), ec);
  if (ec || p.filename().empty()) return {};
  // current resolves to step-N; a path written through `current` ends in its name.
  const std::string name = p.filename().string();
  const std::string given = fs::absolute(dir, ec).lexically_normal().filename().string();
  const bool checkpoint_name = is_step_dir_name(name) || name.rfind(".step-", 0) == 0 || given == kRunCurrent;
  if (!checkpoint_name) return {};
  const fs::path run = p.parent_path();
  return holds_run(run) || fs::exists(run / kRunSeedLog, ec) ? run : fs::path();
}

fs::path training_run_of_checkpoint(const fs::path& dir) {
  std::error_code ec;
  const fs::path run = run_of_checkpoint(dir);
  return !run.empty() && fs::exists(run / kRunSeedLog, ec) ? run : fs::path();
}

bool removed_with_run(const fs::path& p, const fs::path& dir) {
  std::error_code ec1, ec2;
  const fs::path cp = fs::weakly_canonical(fs::absolute(p, ec1), ec1);
  const fs::path cd = fs::weakly_canonical(fs::absolute(dir, ec2), ec2);
  if (ec1 || ec2) return false;
  const fs::path rel = cp.lexically_relative(cd);
  if (rel.empty() || rel.begin() == rel.end()) return false;
  const std::string first = rel.begin()->string();
  return first == "." || is_step_dir_name(first) || first.rfind(".step-", 0) == 0 || first == kRunCurrent ||
         first == kRunSeedLog;
}

bool same_directory(const fs::path& a, const fs::path& b) {
  std::error_code ec;
  const bool same = fs::equivalent(a, b, ec);
  return !ec && same;
}

}  // namespace zo2
