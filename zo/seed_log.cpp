#include "zo/seed_log.h"

#include "runtime/checksum.h"
#include "runtime/dtype.h"
#include "runtime/error.h"
#include "runtime/file_util.h"
#include "runtime/json_file.h"
#include "runtime/log.h"
#include "runtime/philox.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <fstream>
#include <limits>
#include <mutex>
#include <set>
#include <sstream>
#include <unistd.h>

namespace zo2 {
namespace {

using json = nlohmann::json;

// JSON has no NaN/inf; the log writes them as strings so skipped updates replay as skipped.
json float_json(float v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  return v;
}

// A field of a log line, typed; every message names file:line and the field.
struct Line {
  const json& j;
  const std::string& where;

  const json& at(const char* key) const {
    if (!j.contains(key)) fail(ErrorKind::format, "{}: field '{}' is missing", where, key);
    return j.at(key);
  }
  std::int64_t integer(const char* key) const {
    const json& v = at(key);
    if (!v.is_number_integer() || (v.is_number_unsigned() && v.get<std::uint64_t>() > std::uint64_t{INT64_MAX}))
      fail(ErrorKind::format, "{}: field '{}' must be an integer, got {}", where, key, v.dump());
    return v.get<std::int64_t>();
  }
  std::uint64_t unsigned_integer(const char* key) const {
    const json& v = at(key);
    // nlohmann stores a non-negative integer literal as unsigned; -1, 1.5 and 2^70 are not.
    if (!v.is_number_unsigned() && !(v.is_number_integer() && v.get<std::int64_t>() >= 0))
      fail(ErrorKind::format, "{}: field '{}' must be an integer in [0, 2^64), got {}", where, key, v.dump());
    return v.get<std::uint64_t>();
  }
  // A float the run wrote: a JSON number inside float's range (or, with markers, the
  // strings a skipped update's g is written as).
  float real(const char* key, bool markers = false) const {
    const json& v = at(key);
    if (v.is_number()) {
      const double d = v.get<double>();
      if (!std::isfinite(d) || std::fabs(d) > static_cast<double>(std::numeric_limits<float>::max()))
        fail(ErrorKind::format, "{}: field '{}' = {} is outside the range of a float", where, key, v.dump());
      return static_cast<float>(d);
    }
    if (markers && v.is_string()) {
      const auto s = v.get<std::string>();
      if (s == "nan") return std::numeric_limits<float>::quiet_NaN();
      if (s == "inf") return std::numeric_limits<float>::infinity();
      if (s == "-inf") return -std::numeric_limits<float>::infinity();
    }
    fail(ErrorKind::format, "{}: field '{}' expected a number{}, got {}", where, key,
         markers ? " (or \"nan\"/\"inf\"/\"-inf\" for a skipped update)" : "", v.dump());
  }
  std::string text(const char* key) const {
    const json& v = at(key);
    if (!v.is_string()) fail(ErrorKind::format, "{}: field '{}' must be a string, got {}", where, key, v.dump());
    return v.get<std::string>();
  }
};

std::string header_line(const SeedLogHeader& h) {
  json j{{"zo2_seed_log", 1},
         {"run_seed", h.run_seed},
         {"storage_dtype", h.storage_dtype},
         {"base_model", h.base_model},
         {"first_step", h.first_step}};
  if (!h.base_fingerprint.empty()) j["base_fingerprint"] = h.base_fingerprint;
  if (h.rule != RuleConfig{}) j["optimizer"] = rule_to_json(h.rule);  // a zo-sgd log keeps its old bytes
  if (h.peft.any()) j["peft"] = peft_to_json(h.peft);
  if (!h.adapter.empty()) {
    j["adapter"] = h.adapter;
    j["adapter_fingerprint"] = h.adapter_fingerprint;
  }
  if (!h.run_flags.empty()) j["run"] = parse_json_text(h.run_flags, "the seed log header's run flags");
  return j.dump(-1, ' ', false, json::error_handler_t::replace);  // a path that is not UTF-8: U+FFFD (the fingerprint decides)
}

std::string entry_line(const SeedLogEntry& e, const RuleConfig& rule) {
  json j{{"step", e.step}, {"seed", e.seed}, {"g", float_json(e.g)}, {"lr", e.lr},
         {"eps", e.eps},   {"wd", e.wd},     {"g_double", std::isfinite(e.g_double) ? json(e.g_double) : json(nullptr)}};
  if (rule.directions > 1) {
    ZO2_CHECK(static_cast<int>(e.gs.size()) == rule.directions);
    json gs = json::array();
    for (float g : e.gs) gs.push_back(float_json(g));
    j["gs"] = std::move(gs);
  }
  if (rule.kind == RuleKind::cons) j["choice"] = e.choice;
  if (!e.loaded_as.empty()) j["loaded_as"] = e.loaded_as;
  if (!e.run_flags.empty()) j["run"] = parse_json_text(e.run_flags, "a seed log line's run flags");
  return j.dump() + "\n";
}

std::span<const std::byte> bytes_of(const std::string& s) {
  return {reinterpret_cast<const std::byte*>(s.data()), s.size()};
}

}  // namespace

namespace {
// The logs this process's writers hold, by file (Note [One writer per seed log]).
std::mutex g_live_logs_mu;
std::set<std::pair<dev_t, ino_t>>& live_logs() {
  static std::set<std::pair<dev_t, ino_t>> s;
  return s;
}

[[noreturn]] void fail_written_here(const std::filesystem::path& path) {
  fail(ErrorKind::io,
       "{}: another session of this process is writing this seed log; two writers would cut and mix each other's "
       "steps — close that session first (zo2_session_free; from Python Session.close() or its with block — a "
       "session that a caught exception's traceback still references, as a notebook keeps the last one, stays "
       "open until that traceback is gone), or give this one another seed log",
       path.string());
}

[[noreturn]] void fail_written_elsewhere(const std::filesystem::path& path) {
  fail(ErrorKind::io,
       "{}: another process is writing this seed log; two writers would cut and mix each other's steps — close "
       "that session first, or give this one another seed log",
       path.string());
}

// A live log is refused as such whatever this writer would do with it (Note [One writer per
// seed log]): before, a new log's writer told to "continue it (append) or remove it" the log
// another session was writing — and the append it suggested was then refused (pass 63).
void refuse_if_live(const std::filesystem::path& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return;  // (what cannot be opened is said by what follows)
  bool here = false;
  if (struct stat st {}; ::fstat(fd, &st) == 0) {
    std::lock_guard<std::mutex> g(g_live_logs_mu);
    here = live_logs().contains({st.st_dev, st.st_ino});
  }
  const FileLock l = here ? FileLock::held : try_lock_file(fd, false, path, "a second session writing this seed log");
  ::close(fd);
  if (here) fail_written_here(path);
  if (l == FileLock::busy) fail_written_elsewhere(path);
}
}  // namespace

SeedLogWriter::SeedLogWriter(const std::filesystem::path& path, const SeedLogHeader& header,
                             bool append, std::int64_t keep_until_step)
    : path_(path), rule_(header.rule) {
  keep_standard_fds_open();  // Note [The standard descriptors] (runtime/file_util.h)
  std::error_code ec;
  absolute_path_ = std::filesystem::absolute(path, ec);
  if (ec) absolute_path_ = path;
  try {
    open(header, append, keep_until_step);
  } catch (...) {
    release();  // a refused open leaves no lock behind (no destructor runs)
    throw;
  }
}

void SeedLogWriter::open(const SeedLogHeader& header, bool append, std::int64_t keep_until_step) {
  const std::filesystem::path& path = path_;
  if (append && std::filesystem::exists(path)) {
    // Locked before it is read or cut: a second session continuing a live run's log would cut
    // off the steps the live one wrote (Note [One writer per seed log]).
    open_locked();
    const SeedLog old = SeedLog::read(path);
    if (!(old.header.peft == header.peft))
      fail(ErrorKind::invalid_argument, "{}: the seed log's run trained {}, not {}; appending would make it replay neither",
           path.string(), old.header.peft.describe(), header.peft.describe());
    if (old.header.rule != header.rule)
      fail(ErrorKind::invalid_argument,
           "{}: the seed log's run used the update rule {}, not {}; appending would make it replay neither",
           path.string(), old.header.rule.describe(), header.rule.describe());
    if (old.header.run_seed != header.run_seed || old.header.storage_dtype != header.storage_dtype)
      fail(ErrorKind::invalid_argument,
           "{}: the seed log belongs to another run (run seed {}, storage {}), not this one (run seed {}, storage "
           "{}); appending would make it replay neither",
           path.string(), old.header.run_seed, old.header.storage_dtype, header.run_seed, header.storage_dtype);
    if (keep_until_step < old.header.first_step || old.next_step() < keep_until_step)
      fail(ErrorKind::invalid_argument,
           "{}: the seed log holds steps {}..{}, so it cannot continue at step {}: it is not this run's log or was "
           "cut short",
           path.string(), old.header.first_step, old.next_step() - 1, keep_until_step);
    const std::uint64_t keep = old.bytes_before(keep_until_step);
    if (keep < old.valid_bytes || old.torn_tail) {
      // One truncate: a crash leaves either the old file or the cut one, both readable.
      if (::ftruncate(fd_, static_cast<off_t>(keep)) != 0)
        fail(ErrorKind::io, "{}: cannot cut the seed log back to step {}: {}", path.string(), keep_until_step,
             std::strerror(errno));
    }
    pos_.next_step = keep_until_step;
    pos_.bytes = keep;
    pos_.crc32 = crc32_file(path, keep);
  } else {
    // A new log never replaces a file without a word: not a model's weights or a data file
    // named by mistake (they would be lost), nor another run's seed log (its run could no
    // longer be replayed or resumed). An empty file is taken.
    if (std::error_code ec; std::filesystem::exists(path, ec)) {
      if (!std::filesystem::is_regular_file(path, ec))
        fail(ErrorKind::invalid_argument, "{}: not a regular file; the seed log cannot be written there",
             path.string());
      if (std::filesystem::file_size(path, ec) > 0 && !ec) {
        refuse_if_live(path);
        std::ifstream in(path, std::ios::binary);
        std::string first;
        std::getline(in, first);
        const json j = json::parse(first, nullptr, /*allow_exceptions=*/false);
        if (!(j.is_object() && j.contains("zo2_seed_log")))
          fail(ErrorKind::invalid_argument,
               "{}: exists and is not a seed log; a new seed log there would replace it: choose another path",
               path.string());
        fail(ErrorKind::invalid_argument,
             "{}: already holds a seed log (another run's, or this one's from before): continue it (append, as a "
             "resume does) or remove it first",
             path.string());
      }
    }
    const std::string text = header_line(header) + "\n";
    write_file_atomic(path, text);  // the old log survives a failure here
    pos_.next_step = header.first_step;
    pos_.bytes = text.size();
    pos_.crc32 = crc32_update(0, bytes_of(text));
    open_locked();
  }
  // What was opened and locked is still what the path names and holds what was read or written
  // (a writer that replaced or cut it between the open and the lock is caught here, not at the
  // first step).
  check_still_ours();
}

SeedLogWriter::~SeedLogWriter() { release(); }


void SeedLogWriter::release() {
  if (registered_) {
    std::lock_guard<std::mutex> g(g_live_logs_mu);
    live_logs().erase(file_);
    registered_ = false;
  }
  if (fd_ >= 0) ::close(fd_);  // releases the lock
  fd_ = -1;
}

// Note [One writer per seed log]
//   A log has one writer at a time. Two sessions on one path (a host resuming a run's last
//   checkpoint into the log while the run still writes it, the same script started twice)
//   used to be seen only afterwards: the second cut the first's steps off on open, and the
//   first failed at its next step with checkpoints whose steps the log no longer held
//   (adversarial pass 60). The writer holds an exclusive flock on the file for its life, so
//   the second is refused before it reads or changes anything. flock, not fcntl: its locks
//   belong to the open file, so two sessions in one process exclude each other too, and
//   closing any other descriptor of the file does not drop it. A CLI run's log is inside its
//   run directory, which RunDirLock already guards; this covers logs the C API and Python
//   name anywhere. Within one process a registry of the files the writers hold says so
//   first, with what closes the other session (adversarial pass 61): a notebook cell that
//   raised keeps its session alive through the traceback IPython holds, and the next cell's
//   session on the same log met the lock; the registry also holds where the file system
//   refuses locks (Note [File systems without locks]).
void SeedLogWriter::open_locked() {
  fd_ = ::open(path_.c_str(), O_WRONLY | O_APPEND | O_CLOEXEC);
  if (fd_ < 0)
    fail(ErrorKind::io, "{}: cannot open the seed log for appending: {}", path_.string(), std::strerror(errno));
  if (struct stat st {}; ::fstat(fd_, &st) == 0) {
    std::lock_guard<std::mutex> g(g_live_logs_mu);
    if (live_logs().contains({st.st_dev, st.st_ino})) {
      ::close(fd_);
      fd_ = -1;
      fail_written_here(path_);
    }
    file_ = {st.st_dev, st.st_ino};
    live_logs().insert(file_);
    registered_ = true;
  }
  if (try_lock_file(fd_, true, path_, "a second session writing this seed log") == FileLock::busy) {
    release();
    fail_written_elsewhere(path_);
  }
}

// Note [The seed log stays this writer's]
//   The writer appends through one descriptor; another program that deletes, replaces,
//   truncates or appends to the file meanwhile (a second session opened on the same path,
//   a cleanup script) would have the lines go to a deleted file, or two runs' lines mix,
//   and a save record a prefix the file no longer holds — seen only at a resume
//   (adversarial pass 57). Each append and sync first checks that the path still names
//   the file opened and that it holds exactly what this writer wrote.
void SeedLogWriter::check_still_ours() const {
  struct stat mine {}, named {};
  if (::fstat(fd_, &mine) != 0) return;  // (cannot tell: the write says what is wrong)
  const char* fix = "; the run continues from its last checkpoint with the log it was saved with (restore it)";
  if (::stat(absolute_path_.c_str(), &named) != 0)
    fail(ErrorKind::io, "{}: the seed log was removed since this session opened it ({}){}", path_.string(),
         std::strerror(errno), fix);
  if (named.st_dev != mine.st_dev || named.st_ino != mine.st_ino)
    fail(ErrorKind::io, "{}: the seed log was replaced by another file since this session opened it{}", path_.string(),
         fix);
  if (static_cast<std::uint64_t>(mine.st_size) != pos_.bytes)
    fail(ErrorKind::io,
         "{}: the seed log holds {} bytes but this session wrote {}: another program (a second session on the same "
         "log?) changed it; the run continues from its last checkpoint: a resume cuts the log back to the bytes "
         "that checkpoint records (its zo2_state.json, \"seed_log\": \"bytes\"), or `truncate -s BYTES {}` does",
         path_.string(), static_cast<std::uint64_t>(mine.st_size), pos_.bytes, path_.string());
}

void SeedLogWriter::append(const SeedLogEntry& e) {
  check_still_ours();
  const bool mark = !loaded_as_.empty() || !run_flags_.empty();
  SeedLogEntry marked;
  if (mark) {
    marked = e;
    marked.loaded_as = loaded_as_;
    marked.run_flags = run_flags_;
  }
  const std::string line = entry_line(mark ? marked : e, rule_);
  std::size_t done = 0;
  while (done < line.size()) {
    const ssize_t n = ::write(fd_, line.data() + done, line.size() - done);
    if (n > 0) {
      done += static_cast<std::size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    const int err = n < 0 ? errno : EIO;
    // Leave no torn line behind: the log stays what it was before this step.
    const bool cut = ::ftruncate(fd_, static_cast<off_t>(pos_.bytes)) == 0;
    fail(ErrorKind::io, "{}: cannot append step {} to the seed log: {}{}", path_.string(), e.step,
         std::strerror(err), cut ? "" : " (and the partial line could not be removed; it is ignored when read)");
  }
  pos_.bytes += line.size();
  pos_.crc32 = crc32_update(pos_.crc32, bytes_of(line));
  pos_.next_step = e.step + 1;
  loaded_as_.clear();
  run_flags_.clear();
}

void SeedLogWriter::sync() {
  check_still_ours();
  if (::fdatasync(fd_) != 0)
    fail(ErrorKind::io, "{}: cannot write the seed log to disk: {}", path_.string(), std::strerror(errno));
}

std::uint64_t SeedLog::bytes_before(std::int64_t step) const {
  std::uint64_t end = header_end;
  for (const auto& e : entries) {
    if (e.step >= step) break;
    end = e.end_offset;
  }
  return end;
}

SeedLog SeedLog::read(const std::filesystem::path& path, bool header_only) {
  if (std::error_code ec; std::filesystem::is_directory(path, ec))
    fail(ErrorKind::invalid_argument, "{}: a directory, not a seed log (a run's is DIR/seed_log.jsonl)", path.string());
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(ErrorKind::io, "{}: cannot open the seed log", path.string());
  // Line by line: the whole text held (twice, with its stream's copy) beside the entries made a
  // resume of a long run peak at ~600 bytes a step (adversarial pass 50).
  SeedLog log;
  std::int64_t lineno = 0;
  bool have_header = false;
  std::uint64_t pos = 0;
  std::string line_text;
  while (std::getline(in, line_text)) {
    ++lineno;
    const std::string where = fmt::format("{}:{}", path.string(), lineno);
    if (in.eof()) {
      // A last line without its newline: a crash or a full disk in the middle of an append.
      log_warn("{}: the last line is incomplete (a write cut short); it is ignored", where);
      log.torn_tail = true;
      break;
    }
    const std::string_view line(line_text);
    pos += line_text.size() + 1;
    if (line.empty()) {
      log.valid_bytes = pos;
      if (log.entries.empty() && have_header) log.header_end = pos;
      continue;
    }
    json j;
    try {
      j = parse_json_text(line, where);  // Note [Reading JSON]: refused past kMaxJsonDepth
    } catch (const json::exception& e) {  // parse_error, or out_of_range for a number like 1e400
      fail(ErrorKind::format, "{}: not valid JSON: {}", where, e.what());
    }
    if (!j.is_object()) fail(ErrorKind::format, "{}: expected a JSON object", where);
    const Line f{j, where};
    if (!have_header) {
      if (!j.contains("zo2_seed_log"))
        fail(ErrorKind::format, "{}: not a zo2 seed log (the first line has no \"zo2_seed_log\")", where);
      if (f.integer("zo2_seed_log") != 1)
        fail(ErrorKind::format, "{}: seed log version {} is not one this zo2 reads (1)", where,
             j.at("zo2_seed_log").dump());
      log.header.run_seed = f.unsigned_integer("run_seed");
      log.header.storage_dtype = j.contains("storage_dtype") ? f.text("storage_dtype") : "fp32";
      if (!dtype_from_name(log.header.storage_dtype))
        fail(ErrorKind::format, "{}: field 'storage_dtype' = '{}' is not a dtype", where, log.header.storage_dtype);
      log.header.base_model = j.contains("base_model") ? f.text("base_model") : "";
      log.header.base_fingerprint = j.contains("base_fingerprint") ? f.text("base_fingerprint") : "";
      log.header.first_step = j.contains("first_step") ? f.integer("first_step") : 0;
      if (log.header.first_step < 0)
        fail(ErrorKind::format, "{}: field 'first_step' = {} is negative", where, log.header.first_step);
      if (log.header.first_step > kMaxSeedLogStep)
        fail(ErrorKind::format, "{}: field 'first_step' = {} is beyond any step a run reaches (at most 2^53 = {})",
             where, log.header.first_step, kMaxSeedLogStep);
      if (j.contains("optimizer")) log.header.rule = rule_from_json(j.at("optimizer"), where);
      if (j.contains("peft")) log.header.peft = peft_from_json(j.at("peft"), where);
      log.header.adapter = j.contains("adapter") ? f.text("adapter") : "";
      log.header.adapter_fingerprint = j.contains("adapter_fingerprint") ? f.text("adapter_fingerprint") : "";
      if (!log.header.adapter.empty() && (!log.header.peft.any() || log.header.adapter_fingerprint.empty()))
        fail(ErrorKind::format, "{}: field 'adapter' = '{}' needs 'peft' and 'adapter_fingerprint' beside it", where,
             log.header.adapter);
      if (j.contains("run")) {
        if (!j.at("run").is_object())
          fail(ErrorKind::format, "{}: field 'run' is {}, not an object of the run's flags", where,
               j.at("run").type_name());
        log.header.run_flags = j.at("run").dump(-1, ' ', false, json::error_handler_t::replace);
      }
      have_header = true;
      log.header_end = log.valid_bytes = pos;
      if (header_only) break;
      continue;
    }
    SeedLogEntry e;
    e.step = f.integer("step");
    if (e.step < 0 || e.step > kMaxSeedLogStep)  // and so next_step() cannot overflow
      fail(ErrorKind::format, "{}: field 'step' = {} is not a step a run reaches (0 to 2^53 = {})", where, e.step,
           kMaxSeedLogStep);
    const std::int64_t expected = log.next_step();
    if (e.step != expected) {
      if (log.entries.empty())
        fail(ErrorKind::format, "{}: step {} is not the log's first step {} (its header's first_step)", where,
             e.step, expected);
      // Two writers at once (where the file system refuses locks, Note [File systems without
      // locks]) leave lines that repeat or skip steps after the last good one: the lines before
      // this one are a log, which a resume checks against its checkpoint's record and cuts
      // back to it (adversarial pass 67: the message did not say how to recover).
      fail(ErrorKind::format,
           "{}: step {} does not follow step {} (a seed log has one line per step, in order): the lines from byte {} "
           "on do not continue the log (two sessions wrote it at once?); `truncate -s {} {}` keeps the {} lines "
           "before them, and a resume then checks them against its checkpoint",
           where, e.step, log.entries.back().step, log.valid_bytes, log.valid_bytes, path.string(), lineno - 1);
    }
    e.seed = f.unsigned_integer("seed");
    const std::uint64_t derived = derive_step_seed(log.header.run_seed, static_cast<std::uint64_t>(e.step));
    if (e.seed != derived)
      fail(ErrorKind::format,
           "{}: field 'seed' = {} is not the seed run seed {} gives step {} ({}): the line was edited or comes from "
           "another run",
           where, e.seed, log.header.run_seed, e.step, derived);
    e.g = f.real("g", /*markers=*/true);
    e.lr = f.real("lr");
    e.eps = f.real("eps");
    e.wd = j.contains("wd") ? f.real("wd") : 0.0f;
    if (!(e.lr >= 0)) fail(ErrorKind::format, "{}: field 'lr' = {} is negative", where, e.lr);
    if (!(e.eps > 0)) fail(ErrorKind::format, "{}: field 'eps' = {} is not positive", where, e.eps);
    if (!(e.wd >= 0)) fail(ErrorKind::format, "{}: field 'wd' = {} is negative (weight decay is >= 0)", where, e.wd);
    if (j.contains("g_double") && j.at("g_double").is_number()) {
      e.g_double = j.at("g_double").get<double>();
      // Both come from the step's two losses (g rounded to float): a line whose g disagrees
      // was edited, and a resume past the checkpoint (the disk tier applies such lines
      // without running their steps again) must not take it.
      if (std::isfinite(e.g) && std::isfinite(e.g_double) &&
          !(std::fabs(static_cast<double>(e.g) - e.g_double) <= 1e-5 * std::fabs(e.g_double) + 1e-30))
        fail(ErrorKind::format, "{}: field 'g' = {} disagrees with field 'g_double' = {}: the line was edited", where,
             e.g, e.g_double);
    }
    const RuleConfig& rule = log.header.rule;
    if (rule.directions > 1) {
      const json& gs = f.at("gs");
      if (!gs.is_array() || static_cast<int>(gs.size()) != rule.directions)
        fail(ErrorKind::format, "{}: field 'gs' must list the {} directions' projected gradients, got {}", where,
             rule.directions, gs.dump());
      for (std::size_t k = 0; k < gs.size(); ++k) {
        const json one{{"gs", gs[k]}};
        e.gs.push_back(Line{one, where}.real("gs", /*markers=*/true));
      }
      const bool same = std::isnan(e.gs[0]) ? std::isnan(e.g) : e.gs[0] == e.g;
      if (!same) fail(ErrorKind::format, "{}: field 'gs'[0] = {} is not field 'g' = {}", where, e.gs[0], e.g);
    }
    if (rule.kind == RuleKind::cons) {
      const std::int64_t c = f.integer("choice");
      if (c < -1 || c > 1) fail(ErrorKind::format, "{}: field 'choice' = {} is not -1, 0 or 1", where, c);
      e.choice = static_cast<int>(c);
    } else if (j.contains("choice")) {
      fail(ErrorKind::format, "{}: field 'choice' belongs to zo-sgd-cons logs, not {}", where, rule_name(rule.kind));
    }
    if (j.contains("loaded_as")) {
      const json& l = j.at("loaded_as");
      if (!l.is_array() || l.empty() || l.size() > 16)
        fail(ErrorKind::format, "{}: field 'loaded_as' = {} is not a list of the dtypes the weights were rounded to",
             where, l.dump(-1, ' ', false, json::error_handler_t::replace));
      for (const json& d : l) {
        const std::optional<DType> dt = d.is_string() ? dtype_from_name(d.get<std::string>()) : std::nullopt;
        if (!dt || !(*dt == DType::bf16 || *dt == DType::f16))
          fail(ErrorKind::format, "{}: field 'loaded_as' holds {}, not bf16 or fp16 (the dtypes a checkpoint rounds to)",
               where, d.dump(-1, ' ', false, json::error_handler_t::replace));
        e.loaded_as.push_back(d.get<std::string>());
      }
      if (log.header.peft.any())
        fail(ErrorKind::format, "{}: field 'loaded_as' in a {} log (adapters are saved in fp32)", where,
             log.header.peft.describe());
    }
    if (j.contains("run")) {
      if (!j.at("run").is_object())
        fail(ErrorKind::format, "{}: field 'run' is {}, not an object of the run's flags", where, j.at("run").type_name());
      e.run_flags = j.at("run").dump(-1, ' ', false, json::error_handler_t::replace);
    }
    e.end_offset = log.valid_bytes = pos;
    log.entries.push_back(e);
  }
  if (in.bad()) fail(ErrorKind::io, "{}: cannot read the seed log", path.string());
  if (!have_header) fail(ErrorKind::format, "{}: empty seed log", path.string());
  return log;
}

}  // namespace zo2
