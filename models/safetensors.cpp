// safetensors reader (pread, validated up front) and atomic writer; see safetensors.h.
//
// What open() checks, each an Error(format) naming the file (and tensor):
//   - the file is at least 8 bytes; the header length is not 0, not above 100 MB and not
//     beyond the end of the file;
//   - the header is valid UTF-8 and JSON, an object, with no duplicate key at any level
//     (nlohmann::json would silently keep the last one) and nesting of at most 64 levels;
//   - "__metadata__", when present, is an object of strings;
//   - every other entry is an object with "dtype" (a known safetensors dtype string),
//     "shape" (an array of non-negative integers whose product fits int64 and whose byte
//     count fits uint64) and "data_offsets" (two non-negative integers, begin <= end <= the
//     size of the data section, end - begin == numel * dtype size); other keys are ignored;
//   - sorted by offset, the tensors cover the data section exactly: no overlap, no hole,
//     no unused byte at the end. Zero-byte tensors (begin == end) are allowed anywhere
//     between two tensors.
#include "models/safetensors.h"

#include "runtime/arena.h"

#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cerrno>
#include <csignal>
#include <cstring>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <sstream>
#include <system_error>
#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>
#include <tbb/task_arena.h>
#include <unordered_set>

#include "runtime/error.h"
#include "runtime/file_util.h"
#include "runtime/json_file.h"
#include "runtime/log.h"

namespace zo2 {
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// Tensors are written (and read) in pieces of this size so that one big tensor uses every
// core, and a fill tensor needs a buffer of a piece, not of itself; a conversion on read goes
// through buffers of kConvertChunk bytes.
constexpr std::uint64_t kCopyChunk = 32ull << 20;
constexpr std::size_t kConvertChunk = 4u << 20;
constexpr DType kLastDType = DType::boolean;

std::string errno_message(int e) { return std::system_category().message(e); }

// A checkpoint keeps each shard open while it is read (Note [No mapped reads]); one of more
// shards than the soft limit on open files (often 1024) raises that limit to the hard one,
// once, as a server would. Returns whether it went up.
bool raise_open_file_limit() {
  struct rlimit rl {};
  if (::getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur >= rl.rlim_max) return false;
  const rlim_t was = rl.rlim_cur;
  rl.rlim_cur = rl.rlim_max;
  if (::setrlimit(RLIMIT_NOFILE, &rl) != 0) return false;
  log_debug("raised the open-file limit from {} to {} to read a checkpoint's shards", was, rl.rlim_max);
  return true;
}

bool valid_dtype(DType dt) {
  return static_cast<unsigned>(dt) <= static_cast<unsigned>(kLastDType);
}

// Strict UTF-8 (no overlong forms, no surrogates, nothing above U+10FFFF). Returns the
// offset of the first bad byte, or npos.
std::size_t find_invalid_utf8(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const std::size_t n = s.size();
  std::size_t i = 0;
  while (i < n) {
    const unsigned c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    std::size_t len;
    std::uint32_t cp, min;
    if ((c & 0xE0) == 0xC0) {
      len = 2, cp = c & 0x1F, min = 0x80;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3, cp = c & 0x0F, min = 0x800;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4, cp = c & 0x07, min = 0x10000;
    } else {
      return i;
    }
    if (n - i < len) return i;
    for (std::size_t k = 1; k < len; ++k) {
      if ((p[i + k] & 0xC0) != 0x80) return i;
      cp = (cp << 6) | (p[i + k] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return i;
    i += len;
  }
  return std::string_view::npos;
}

struct DuplicateKey {
  std::string key;
  int depth;  // 1: a key of the top-level object
};
struct TooDeep {};

// nlohmann::json::parse, but a duplicate key in any object throws DuplicateKey and nesting
// deeper than kMaxJsonDepth (runtime/json_file.h, Note [Reading JSON]) throws TooDeep; json::parse_error for invalid JSON (out_of_range
// for a number beyond a double).
json parse_json_strict(std::string_view text) {
  std::vector<std::unordered_set<std::string>> keys;
  json::parser_callback_t cb = [&keys](int depth, json::parse_event_t event, json& parsed) {
    switch (event) {
      case json::parse_event_t::object_start:
        if (depth >= kMaxJsonDepth) throw TooDeep{};
        keys.emplace_back();
        break;
      case json::parse_event_t::array_start:
        if (depth >= kMaxJsonDepth) throw TooDeep{};
        break;
      case json::parse_event_t::key: {
        const auto& k = parsed.get_ref<const std::string&>();
        if (!keys.back().insert(k).second) throw DuplicateKey{k, depth};
        break;
      }
      case json::parse_event_t::object_end:
        keys.pop_back();
        break;
      default:
        break;
    }
    return true;
  };
  return json::parse(text.begin(), text.end(), cb, /*allow_exceptions=*/true,
                     /*ignore_comments=*/false);
}

std::string shape_string(std::span<const std::int64_t> shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ',';
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

// Element count, or nullopt on overflow. Order-independent: the product of the non-zero
// dims must fit int64 even when another dim is 0.
std::optional<std::int64_t> checked_numel(std::span<const std::int64_t> shape) {
  std::int64_t prod = 1;
  bool zero = false;
  for (std::int64_t d : shape) {
    if (d == 0) {
      zero = true;
      continue;
    }
    if (__builtin_mul_overflow(prod, d, &prod)) return std::nullopt;
  }
  return zero ? 0 : prod;
}

std::optional<std::uint64_t> checked_nbytes(std::int64_t numel, DType dt) {
  std::uint64_t out;
  if (__builtin_mul_overflow(static_cast<std::uint64_t>(numel),
                             static_cast<std::uint64_t>(dtype_size(dt)), &out))
    return std::nullopt;
  return out;
}

[[noreturn]] void bad_file(const std::string& p, std::string_view why) {
  fail(ErrorKind::format, "safetensors file '{}': {}", p, why);
}
[[noreturn]] void bad_tensor(const std::string& p, std::string_view name, std::string_view why) {
  fail(ErrorKind::format, "safetensors file '{}': tensor '{}': {}", p, name, why);
}
[[noreturn]] void bad_index(const std::string& p, std::string_view why) {
  fail(ErrorKind::format, "checkpoint index '{}': {}", p, why);
}
[[noreturn]] void bad_write(const fs::path& p, std::string_view name, std::string_view why) {
  fail(ErrorKind::invalid_argument, "cannot write '{}': tensor '{}': {}", p.string(), name, why);
}

// The first line of a Git LFS pointer file (https://github.com/git-lfs/git-lfs/blob/main/docs/spec.md).
constexpr std::string_view kGitLfsPointer = "version https://git-lfs.github.com/spec/v1";

// ", pointing at N bytes" from a pointer's "size N" line; "" when it has none.
std::string git_lfs_size(std::string_view pointer) {
  const auto at = pointer.find("\nsize ");
  if (at == std::string_view::npos) return "";
  std::string_view digits = pointer.substr(at + 6);
  digits = digits.substr(0, std::min(digits.find_first_not_of("0123456789"), digits.size()));
  return digits.empty() ? "" : fmt::format(", pointing at {} bytes", digits);
}

// A FIFO or a directory in the file's place is refused by name, never waited on.
std::string read_text_file(const fs::path& path, std::string_view what) {
  return read_regular_file(path, fmt::format(" (the {})", what));
}

// ---------------------------------------------------------------------------------------
// Writer internals.

struct WriteItem {
  const TensorToWrite* t;
  std::uint64_t nbytes;
};

// Validates the tensors (names unique among them) and returns their sizes.
std::vector<WriteItem> validate_tensors(std::span<const TensorToWrite> tensors,
                                        const std::map<std::string, std::string>& metadata,
                                        const fs::path& where) {
  std::vector<WriteItem> items;
  items.reserve(tensors.size());
  std::unordered_set<std::string_view> seen;
  for (const auto& t : tensors) {
    auto bad = [&](std::string_view why) { bad_write(where, t.name, why); };
    if (t.name.empty()) bad("empty tensor name");
    if (t.name == "__metadata__") bad("'__metadata__' is reserved and cannot name a tensor");
    if (find_invalid_utf8(t.name) != std::string_view::npos) bad("name is not valid UTF-8");
    if (!seen.insert(t.name).second) bad("duplicate tensor name");
    if (!valid_dtype(t.dtype)) bad("invalid dtype value");
    std::uint64_t nb;
    try {
      nb = safetensors_tensor_nbytes(t.dtype, t.shape);
    } catch (const Error& e) {
      bad_write(where, t.name, e.what());
    }
    if (t.data && t.fill) bad("both data and fill are set");
    if (nb > 0 && !t.data && !t.fill) bad("neither data nor fill is set");
    items.push_back({&t, nb});
  }
  for (const auto& [k, v] : metadata)
    if (find_invalid_utf8(k) != std::string_view::npos ||
        find_invalid_utf8(v) != std::string_view::npos)
      fail(ErrorKind::invalid_argument, "cannot write '{}': metadata entry is not valid UTF-8",
           where.string());
  return items;
}

std::string json_quote(std::string_view s) { return json(s).dump(); }

// Writes one safetensors file atomically from validated items.
void write_items(const fs::path& path, std::span<const WriteItem> items,
                 const std::map<std::string, std::string>& metadata) {
  // The header, built by hand (linear time; ordered_json's insertion is quadratic):
  // compact like serde_json, "__metadata__" first, then the tensors in data order.
  std::string header = "{";
  if (!metadata.empty()) header += "\"__metadata__\":" + json(metadata).dump();
  std::vector<std::uint64_t> offsets(items.size());
  std::uint64_t data_bytes = 0;
  for (std::size_t i = 0; i < items.size(); ++i) {
    const auto& t = *items[i].t;
    offsets[i] = data_bytes;
    const std::uint64_t end = data_bytes + items[i].nbytes;
    if (end < data_bytes)
      fail(ErrorKind::invalid_argument, "cannot write '{}': total size overflows", path.string());
    if (header.size() > 1) header += ',';
    header += fmt::format("{}:{{\"dtype\":\"{}\",\"shape\":{},\"data_offsets\":[{},{}]}}",
                          json_quote(t.name), dtype_safetensors_name(t.dtype),
                          shape_string(t.shape), data_bytes, end);
    data_bytes = end;
  }
  header += '}';
  header.append((8 - header.size() % 8) % 8, ' ');
  if (header.size() > kSafetensorsMaxHeaderBytes)
    fail(ErrorKind::invalid_argument,
         "cannot write '{}': the header would be {} bytes, above the limit of {} (too many "
         "tensors or too much metadata)",
         path.string(), header.size(), kSafetensorsMaxHeaderBytes);
  const std::uint64_t data_start = 8 + header.size();
  const std::uint64_t file_size = data_start + data_bytes;
  if (file_size < data_bytes)
    fail(ErrorKind::invalid_argument, "cannot write '{}': total size overflows", path.string());

  AtomicFile file(path);
  file.reserve(file_size);
  // Note [Writes, not mappings] (runtime/file_util.h): pwrite from memory, so that a write the
  // file system fails is an error here, and the file's CRC-32 is that of the bytes meant.
  {
    std::string head(8, '\0');
    const std::uint64_t n = header.size();
    for (int i = 0; i < 8; ++i) head[static_cast<std::size_t>(i)] = static_cast<char>((n >> (8 * i)) & 0xFF);
    head += header;
    file.write_at(std::as_bytes(std::span<const char>(head.data(), head.size())), 0);
  }

  // Work: every tensor in pieces of at most kCopyChunk bytes — a data tensor's written
  // straight from the caller's memory, a fill tensor's filled into a buffer of the piece's
  // size, then written — so a save converting every tensor (an fp32 run saved as bf16) holds
  // a piece per thread at most, never a second copy of a tensor or of the model.
  // (kCopyChunk is a multiple of every element size: a piece never splits an element.)
  static_assert(kCopyChunk % 8 == 0);
  struct Work {
    std::size_t item;
    std::uint64_t off, len;  // inside the tensor
  };
  std::vector<Work> work;
  for (std::size_t i = 0; i < items.size(); ++i)
    for (std::uint64_t o = 0, nb = items[i].nbytes; o < nb; o += kCopyChunk)
      work.push_back({i, o, std::min(kCopyChunk, nb - o)});
  // At most kMaxWriters pieces at once, whatever the host's cores: each fill piece holds a
  // buffer (a disk block's also its source bytes), and a 128-thread host would otherwise hold
  // 128 of them (review of this change: ~12 GiB outside --host-mem).
  constexpr int kMaxWriters = 16;
  tbb::task_arena writers(std::max(1, std::min(kMaxWriters, tbb::this_task_arena::max_concurrency())));
  writers.execute([&] {
    tbb::parallel_for(tbb::blocked_range<std::size_t>(0, work.size(), 1), [&](const tbb::blocked_range<std::size_t>& r) {
      for (std::size_t w = r.begin(); w != r.end(); ++w) {
        const Work& wk = work[w];
        const TensorToWrite& t = *items[wk.item].t;
        const std::uint64_t at = data_start + offsets[wk.item] + wk.off;
        const auto len = static_cast<std::size_t>(wk.len);
        if (t.fill) {
          std::unique_ptr<std::byte[]> buf(new std::byte[len]);  // (not zeroed: fill writes it all)
          t.fill(std::span<std::byte>(buf.get(), len), wk.off);
          file.write_at(std::span<const std::byte>(buf.get(), len), at);
        } else {
          file.write_at(std::span<const std::byte>(static_cast<const std::byte*>(t.data) + wk.off, len), at);
        }
      }
    });
  });
  file.commit();
}

bool is_hf_checkpoint_file(const std::string& name) {
  if (name == "model.safetensors" || name == "model.safetensors.index.json") return true;
  // model-<digits>-of-<digits>.safetensors
  constexpr std::string_view prefix = "model-", mid = "-of-", suffix = ".safetensors";
  std::string_view s = name;
  if (!s.starts_with(prefix) || !s.ends_with(suffix)) return false;
  s = s.substr(prefix.size(), s.size() - prefix.size() - suffix.size());
  auto digits = [](std::string_view d) {
    return !d.empty() && std::all_of(d.begin(), d.end(), [](char c) { return c >= '0' && c <= '9'; });
  };
  const auto pos = s.find(mid);
  return pos != std::string_view::npos && digits(s.substr(0, pos)) &&
         digits(s.substr(pos + mid.size()));
}

}  // namespace

// ---------------------------------------------------------------------------------------
// TensorInfo

std::int64_t TensorInfo::numel() const {
  std::int64_t n = 1;
  for (std::int64_t d : shape) n *= d;
  return n;
}

std::uint64_t TensorInfo::nbytes() const {
  return static_cast<std::uint64_t>(numel()) * dtype_size(dtype);
}

std::uint64_t safetensors_tensor_nbytes(DType dtype, std::span<const std::int64_t> shape) {
  for (std::int64_t d : shape)
    if (d < 0)
      fail(ErrorKind::invalid_argument, "negative dim in shape {}", shape_string(shape));
  const auto numel = checked_numel(shape);
  const auto nb = numel ? checked_nbytes(*numel, dtype) : std::nullopt;
  if (!nb)
    fail(ErrorKind::invalid_argument, "shape {} overflows the element or byte count",
         shape_string(shape));
  return *nb;
}

// ---------------------------------------------------------------------------------------
// SafetensorsFile

SafetensorsFile::SafetensorsFile(SafetensorsFile&& o) noexcept
    : path_(std::move(o.path_)),
      fd_(std::exchange(o.fd_, -1)),
      file_size_(std::exchange(o.file_size_, 0)),
      header_size_(std::exchange(o.header_size_, 0)),
      tensors_(std::move(o.tensors_)),
      by_name_(std::move(o.by_name_)),
      metadata_(std::move(o.metadata_)) {}

SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&& o) noexcept {
  if (this != &o) {
    close_fd();
    path_ = std::move(o.path_);
    fd_ = std::exchange(o.fd_, -1);
    file_size_ = std::exchange(o.file_size_, 0);
    header_size_ = std::exchange(o.header_size_, 0);
    tensors_ = std::move(o.tensors_);
    by_name_ = std::move(o.by_name_);
    metadata_ = std::move(o.metadata_);
  }
  return *this;
}

SafetensorsFile::~SafetensorsFile() { close_fd(); }

void SafetensorsFile::close_fd() noexcept {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

SafetensorsFile SafetensorsFile::open(const fs::path& path) {
  const std::string p = path.string();

  SafetensorsFile f;
  f.path_ = path;
  // O_NONBLOCK: opening a FIFO by mistake must not hang; no effect on regular files.
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0 && errno == EMFILE && raise_open_file_limit())
    fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    const int e = errno;
    fail(ErrorKind::io, "cannot open safetensors file '{}': {}{}", p, errno_message(e),
         e == EMFILE ? " (every shard of a checkpoint stays open while it is read: raise `ulimit -n`)" : "");
  }
  f.fd_ = fd;  // closed by ~SafetensorsFile if validation throws
  struct stat st {};
  if (::fstat(fd, &st) != 0)
    fail(ErrorKind::io, "cannot stat safetensors file '{}': {}", p, errno_message(errno));
  if (!S_ISREG(st.st_mode))
    fail(ErrorKind::io, "safetensors file '{}' is not a regular file", p);
  const auto size = static_cast<std::uint64_t>(st.st_size);
  if (size < 8)
    bad_file(p, fmt::format("file is {} bytes, shorter than the 8-byte header length", size));
  f.file_size_ = size;
  // Note [No mapped reads]: the header and every tensor are read with pread.
  std::string first(static_cast<std::size_t>(std::min<std::uint64_t>(size, 1024)), '\0');
  if (pread_full(fd, std::as_writable_bytes(std::span(first)), 0, p) != first.size())
    fail(ErrorKind::io, "safetensors file '{}' became shorter while it was opened", p);
  const auto* base = reinterpret_cast<const unsigned char*>(first.data());
  // A clone without git-lfs holds the pointer file in the weights' place; read as a header
  // length, its "version " is 2336927755350992246 bytes.
  if (const std::string_view head(first); head.starts_with(kGitLfsPointer))
    bad_file(p, fmt::format("is a Git LFS pointer file ({} bytes{}), not the weights: run `git lfs pull` in its "
                            "repository (or download the file itself)",
                            size, git_lfs_size(head)));

  std::uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<std::uint64_t>(base[i]) << (8 * i);
  if (n == 0) bad_file(p, "header length is 0");
  if (n > kSafetensorsMaxHeaderBytes)
    bad_file(p, fmt::format("header length {} exceeds the limit of {} bytes", n,
                    kSafetensorsMaxHeaderBytes));
  if (n > size - 8)
    bad_file(p, fmt::format("header length {} goes beyond the end of the file ({} bytes)", n, size));
  f.header_size_ = n;
  const std::uint64_t data_size = size - 8 - n;
  std::string header_text(static_cast<std::size_t>(n), '\0');
  if (pread_full(fd, std::as_writable_bytes(std::span(header_text)), 8, p) != header_text.size())
    fail(ErrorKind::io, "safetensors file '{}' became shorter while its header was read", p);
  const std::string_view text(header_text);
  // A header that is not JSON may be one whose length field is wrong (too long, it takes in
  // tensor bytes: "bad byte at header offset 2147"), which the message says too.
  const std::string length_note = fmt::format(" (or the header length field, {}, is wrong)", n);
  if (auto at = find_invalid_utf8(text); at != std::string_view::npos)
    bad_file(p, fmt::format("header is not valid UTF-8 (bad byte at header offset {}){}", at, length_note));
  // nlohmann's lexer takes a NUL byte for the end of the input and would ignore what follows;
  // raw NUL is never valid JSON (inside strings it must be escaped).
  if (auto at = text.find('\0'); at != std::string_view::npos)
    bad_file(p, fmt::format("header is not valid JSON: NUL byte at header offset {}{}", at, length_note));
  json header;
  try {
    header = parse_json_strict(text);
  } catch (const json::exception& e) {  // parse_error, or out_of_range for a number like 1e400
    bad_file(p, fmt::format("header is not valid JSON{}: {}", length_note, e.what()));
  } catch (const DuplicateKey& d) {
    if (d.depth == 1 && d.key != "__metadata__")
      bad_file(p, fmt::format("duplicate tensor name '{}' in the header", d.key));
    bad_file(p, fmt::format("duplicate key '{}' in the header", d.key));
  } catch (const TooDeep&) {
    bad_file(p, fmt::format("header JSON is nested deeper than {} levels", kMaxJsonDepth));
  }
  if (!header.is_object())
    bad_file(p, fmt::format("header is not a JSON object (it is {})", header.type_name()));

  std::vector<TensorInfo> tensors;
  tensors.reserve(header.size());
  for (auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      if (!entry.is_object())
        bad_file(p, fmt::format("__metadata__ is not an object of strings (it is {})", entry.type_name()));
      for (auto& [k, v] : entry.items()) {
        if (!v.is_string())
          bad_file(p, fmt::format("__metadata__ entry '{}' is not a string (it is {})", k, v.type_name()));
        f.metadata_.emplace(k, v.get<std::string>());
      }
      continue;
    }
    if (!entry.is_object())
      bad_tensor(p, name, fmt::format("entry is not an object (it is {})", entry.type_name()));
    TensorInfo t;
    t.name = name;

    auto dt = entry.find("dtype");
    if (dt == entry.end()) bad_tensor(p, name, "missing \"dtype\"");
    if (!dt->is_string()) bad_tensor(p, name, fmt::format("\"dtype\" is not a string (it is {})", dt->type_name()));
    const auto& dts = dt->get_ref<const std::string&>();
    const auto parsed = dtype_from_safetensors_name(dts);
    if (!parsed) bad_tensor(p, name, fmt::format("unknown dtype \"{}\"", dts));
    t.dtype = *parsed;

    auto sh = entry.find("shape");
    if (sh == entry.end()) bad_tensor(p, name, "missing \"shape\"");
    if (!sh->is_array()) bad_tensor(p, name, fmt::format("\"shape\" is not an array (it is {})", sh->type_name()));
    for (const auto& d : *sh) {
      if (d.is_number_unsigned()) {
        const auto v = d.get<std::uint64_t>();
        if (v > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
          bad_tensor(p, name, fmt::format("shape dim {} overflows int64 (numel overflow)", v));
        t.shape.push_back(static_cast<std::int64_t>(v));
      } else if (d.is_number_integer()) {
        bad_tensor(p, name, fmt::format("negative dim {} in \"shape\"", d.get<std::int64_t>()));
      } else {
        bad_tensor(p, name, fmt::format("\"shape\" has an element that is not an integer: {}", d.dump()));
      }
    }
    const auto numel = checked_numel(t.shape);
    const auto need = numel ? checked_nbytes(*numel, t.dtype) : std::nullopt;
    if (!need)
      bad_tensor(p, name, fmt::format("shape {} overflows the element or byte count (numel overflow)",
                        shape_string(t.shape)));

    auto off = entry.find("data_offsets");
    if (off == entry.end()) bad_tensor(p, name, "missing \"data_offsets\"");
    if (!off->is_array() || off->size() != 2 || !(*off)[0].is_number_integer() ||
        !(*off)[1].is_number_integer())
      bad_tensor(p, name, fmt::format("\"data_offsets\" is not two non-negative integers: {}", off->dump()));
    if (!(*off)[0].is_number_unsigned() || !(*off)[1].is_number_unsigned())
      bad_tensor(p, name, fmt::format("\"data_offsets\" has a negative offset: {}", off->dump()));
    t.begin = (*off)[0].get<std::uint64_t>();
    t.end = (*off)[1].get<std::uint64_t>();
    if (t.begin > t.end)
      bad_tensor(p, name, fmt::format("\"data_offsets\" begin {} is greater than end {}", t.begin, t.end));
    if (t.end > data_size)
      bad_tensor(p, name, fmt::format("\"data_offsets\" end {} is beyond the end of the data section ({} bytes)",
                        t.end, data_size));
    if (t.end - t.begin != *need)
      bad_tensor(p, name, fmt::format("byte size mismatch: \"data_offsets\" span {} bytes but {} {} needs {}",
                        t.end - t.begin, dts, shape_string(t.shape), *need));
    tensors.push_back(std::move(t));
  }

  std::sort(tensors.begin(), tensors.end(), [](const TensorInfo& a, const TensorInfo& b) {
    if (a.begin != b.begin) return a.begin < b.begin;
    if (a.end != b.end) return a.end < b.end;
    return a.name < b.name;
  });
  // Exact cover of the data section.
  std::uint64_t expected = 0;
  const TensorInfo* prev = nullptr;  // the tensor that ends at `expected`
  for (const auto& t : tensors) {
    if (t.begin < expected)
      bad_file(p, fmt::format("tensors '{}' [{}, {}) and '{}' [{}, {}) overlap", prev->name, prev->begin,
                      prev->end, t.name, t.begin, t.end));
    if (t.begin > expected) {
      if (prev)
        bad_file(p, fmt::format("hole of {} bytes between tensors '{}' and '{}' (the data section must "
                        "be fully indexed)",
                        t.begin - expected, prev->name, t.name));
      bad_file(p, fmt::format("hole of {} bytes at the start of the data section before tensor '{}' "
                      "(the data section must be fully indexed)",
                      t.begin, t.name));
    }
    if (t.end > expected || !prev) {
      expected = t.end;
      prev = &t;
    }
  }
  if (expected != data_size)
    bad_file(p, fmt::format("{} unused bytes at the end of the data section (the data section must be "
                    "fully indexed)",
                    data_size - expected));

  for (std::size_t i = 0; i < tensors.size(); ++i) f.by_name_.emplace(tensors[i].name, i);
  f.tensors_ = std::move(tensors);
  return f;
}

const TensorInfo* SafetensorsFile::find(std::string_view name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : &tensors_[it->second];
}

const TensorInfo& SafetensorsFile::at(std::string_view name) const {
  if (const TensorInfo* t = find(name)) return *t;
  fail(ErrorKind::format, "safetensors file '{}' has no tensor '{}'", path_.string(), name);
}

// Note [No mapped reads]
// ~~~~~~~~~~~~~~~~~~~~~~
// Tensors are read with pread, never through a mapping of the file. A mapped file that
// another program truncates in place (a download tool rewriting a checkpoint, `cp` over it,
// a full disk on a network filesystem) makes the next touch of a lost page raise SIGBUS,
// which kills the process — and with libzo2 the host program — with nothing said (adversarial
// pass 57). A read past the new end is a short read instead, which becomes an Error(io)
// naming the file, the tensor and both sizes. The cost is one copy from the page cache,
// which a mapping pays as a page fault per page; loading stays bound by the disk. A file
// rewritten in place at the same size is not detected (zo2's own writers never do that:
// they write a temp file and rename it over).
void SafetensorsFile::read(const TensorInfo& info, std::uint64_t offset, std::span<std::byte> dst) const {
  ZO2_CHECK(fd_ >= 0 && info.begin <= info.end && info.end <= data_size() && offset <= info.end - info.begin &&
            dst.size() <= info.end - info.begin - offset);
  const std::uint64_t at = 8 + header_size_ + info.begin + offset;
  auto piece = [&](std::size_t b, std::size_t n) {
    if (pread_full(fd_, dst.subspan(b, n), at + b, path_.string()) == n) return;
    struct stat st {};
    const std::string now = ::fstat(fd_, &st) == 0 ? fmt::format("{} bytes", st.st_size) : std::string("unknown");
    fail(ErrorKind::io,
         "safetensors file '{}': tensor '{}' cannot be read: the file is now {}, it was {} bytes when opened (another "
         "program truncated or rewrote it; replace a checkpoint by writing a new file and renaming it over)",
         path_.string(), info.name, now, file_size_);
  };
  const std::size_t chunks = (dst.size() + kCopyChunk - 1) / kCopyChunk;
  if (chunks <= 1) {
    if (!dst.empty()) piece(0, dst.size());
    return;
  }
  // Big tensors in pieces, several at once: from the page cache, one core copies ~10 GB/s.
  tbb::parallel_for(std::size_t{0}, chunks, [&](std::size_t c) {
    const std::size_t b = c * kCopyChunk;
    piece(b, std::min<std::size_t>(kCopyChunk, dst.size() - b));
  });
}

std::vector<std::byte> SafetensorsFile::read(const TensorInfo& info) const {
  std::vector<std::byte> out(static_cast<std::size_t>(info.end - info.begin));
  read(info, 0, out);
  return out;
}

void SafetensorsFile::read_converted(const TensorInfo& info, std::int64_t first, std::int64_t count, void* dst,
                                     DType dst_dtype) const {
  ZO2_CHECK(first >= 0 && count >= 0 && first + count <= info.numel());
  const std::size_t es = dtype_size(info.dtype), ds = dtype_size(dst_dtype);
  auto* out = static_cast<std::byte*>(dst);
  if (info.dtype == dst_dtype) {
    read(info, static_cast<std::uint64_t>(first) * es, {out, static_cast<std::size_t>(count) * es});
    return;
  }
  // Through a buffer of kConvertChunk source bytes per task.
  const auto per = static_cast<std::int64_t>(std::max<std::size_t>(kConvertChunk / es, 1));
  const std::int64_t chunks = (count + per - 1) / per;
  tbb::parallel_for(std::int64_t{0}, chunks, [&](std::int64_t c) {
    const std::int64_t b = c * per, n = std::min(per, count - b);
    std::vector<std::byte> buf(static_cast<std::size_t>(n) * es);
    read(info, static_cast<std::uint64_t>(first + b) * es, buf);
    convert(buf.data(), info.dtype, out + static_cast<std::size_t>(b) * ds, dst_dtype, static_cast<std::size_t>(n));
  });
}

// ---------------------------------------------------------------------------------------
// SafetensorsCheckpoint

SafetensorsCheckpoint::SafetensorsCheckpoint(SafetensorsCheckpoint&&) noexcept = default;
SafetensorsCheckpoint& SafetensorsCheckpoint::operator=(SafetensorsCheckpoint&&) noexcept = default;
SafetensorsCheckpoint::~SafetensorsCheckpoint() = default;

SafetensorsCheckpoint SafetensorsCheckpoint::open(const fs::path& dir_or_file) {
  SafetensorsCheckpoint ck;
  ck.path_ = dir_or_file;
  const std::string p = dir_or_file.string();
  std::error_code ec;
  const auto st = fs::status(dir_or_file, ec);
  if (!fs::exists(st))
    fail(ErrorKind::io,
         "checkpoint '{}' does not exist (expected a directory with model.safetensors or "
         "model.safetensors.index.json, or a .safetensors file)",
         p);

  fs::path single, index, dir;
  if (fs::is_directory(st)) {
    dir = dir_or_file;
    if (fs::exists(dir / "model.safetensors", ec))
      single = dir / "model.safetensors";
    else if (fs::exists(dir / "model.safetensors.index.json", ec))
      index = dir / "model.safetensors.index.json";
    else
      fail(ErrorKind::io,
           "no safetensors checkpoint in directory '{}': looked for model.safetensors and "
           "model.safetensors.index.json",
           p);
  } else if (dir_or_file.filename().string().ends_with(".index.json")) {
    index = dir_or_file;
    dir = dir_or_file.parent_path();
  } else {
    single = dir_or_file;
  }

  if (!single.empty()) {
    ck.files_.push_back(std::make_unique<SafetensorsFile>(SafetensorsFile::open(single)));
    const SafetensorsFile* file = ck.files_.back().get();
    for (const auto& t : file->tensors()) ck.entries_.emplace(t.name, Entry{file, &t});
    return ck;
  }

  ck.sharded_ = true;
  const std::string ip = index.string();
  const std::string text = read_text_file(index, "checkpoint index");
  if (text.starts_with(kGitLfsPointer))
    bad_index(ip, "is a Git LFS pointer file, not the index: run `git lfs pull` in its repository");
  if (auto at = find_invalid_utf8(text); at != std::string_view::npos)
    bad_index(ip, fmt::format("not valid UTF-8 (bad byte at offset {})", at));
  if (auto at = text.find('\0'); at != std::string_view::npos)
    bad_index(ip, fmt::format("not valid JSON: NUL byte at offset {}", at));
  json j;
  try {
    j = parse_json_strict(text);
  } catch (const json::exception& e) {  // parse_error, or out_of_range for a number like 1e400
    bad_index(ip, fmt::format("not valid JSON: {}", e.what()));
  } catch (const DuplicateKey& d) {
    bad_index(ip, fmt::format("duplicate key '{}' in the JSON (a tensor listed twice in weight_map?)", d.key));
  } catch (const TooDeep&) {
    bad_index(ip, fmt::format("JSON nested deeper than {} levels", kMaxJsonDepth));
  }
  if (!j.is_object()) bad_index(ip, fmt::format("not a JSON object (it is {})", j.type_name()));
  auto wm = j.find("weight_map");
  if (wm == j.end()) bad_index(ip, "missing \"weight_map\"");
  if (!wm->is_object())
    bad_index(ip, fmt::format("\"weight_map\" is not an object (it is {})", wm->type_name()));

  // shard file name -> tensors the index puts there
  std::map<std::string, std::vector<std::string>> shards;
  for (auto& [name, v] : wm->items()) {
    if (!v.is_string())
      bad_index(ip, fmt::format("weight_map entry '{}' is not a string shard file name (it is {})", name,
                      v.type_name()));
    const auto& shard = v.get_ref<const std::string&>();
    const fs::path sp(shard);
    bool dotdot = false;
    for (const auto& part : sp)
      if (part == "..") dotdot = true;
    if (shard.empty() || shard.find('\0') != std::string::npos)
      bad_index(ip, fmt::format("weight_map entry '{}': invalid shard file name \"{}\"", name, shard));
    if (sp.is_absolute())
      bad_index(ip, fmt::format("weight_map entry '{}': shard file name \"{}\" is absolute (it must be "
                      "relative to the checkpoint directory)",
                      name, shard));
    if (dotdot)
      bad_index(ip, fmt::format("weight_map entry '{}': shard file name \"{}\" contains \"..\" (it must "
                      "stay inside the checkpoint directory)",
                      name, shard));
    // One shard may be spelled "./model-00001-of-00002.safetensors" and
    // "model-00001-of-00002.safetensors": grouped as one file, not "two shards".
    shards[sp.lexically_normal().string()].push_back(name);
  }

  std::map<std::string, std::string, std::less<>> shard_of;  // tensor -> shard, from the files
  for (const auto& [shard, names] : shards) {
    const fs::path sp = dir / shard;
    std::error_code sec;
    if (!fs::exists(sp, sec))
      bad_index(ip, fmt::format("shard file \"{}\" (holding tensor '{}') is missing: '{}'", shard,
                      names.front(), sp.string()));
    ck.files_.push_back(std::make_unique<SafetensorsFile>(SafetensorsFile::open(sp)));
    const SafetensorsFile* file = ck.files_.back().get();
    for (const auto& name : names)
      if (!file->find(name))
        bad_index(ip, fmt::format("weight_map puts tensor '{}' in shard \"{}\", but '{}' has no such tensor",
                        name, shard, sp.string()));
    std::size_t extra = 0;
    for (const auto& t : file->tensors()) {
      auto [it, inserted] = ck.entries_.emplace(t.name, Entry{file, &t});
      if (!inserted)
        bad_index(ip, fmt::format("tensor '{}' is in two shards: \"{}\" and \"{}\"", t.name,
                        shard_of[t.name], shard));
      shard_of.emplace(t.name, shard);
      if (!wm->contains(t.name)) ++extra;
    }
    if (extra)
      log_warn("checkpoint index '{}': shard \"{}\" holds {} tensors that weight_map does not "
               "list; they are loaded too",
               ip, shard, extra);
  }
  return ck;
}

const SafetensorsCheckpoint::Entry* SafetensorsCheckpoint::find(std::string_view name) const {
  auto it = entries_.find(name);
  return it == entries_.end() ? nullptr : &it->second;
}

const SafetensorsCheckpoint::Entry& SafetensorsCheckpoint::at(std::string_view name) const {
  if (const Entry* e = find(name)) return *e;
  fail(ErrorKind::format, "checkpoint '{}' has no tensor '{}'", path_.string(), name);
}

std::vector<std::string> SafetensorsCheckpoint::names() const {
  std::vector<std::string> out;
  out.reserve(entries_.size());
  for (const auto& [name, e] : entries_) out.push_back(name);
  return out;
}

std::uint64_t SafetensorsCheckpoint::total_bytes() const {
  std::uint64_t total = 0;
  for (const auto& [name, e] : entries_) total += e.info->nbytes();
  return total;
}

// ---------------------------------------------------------------------------------------
// Writers

void write_safetensors(const fs::path& path, std::span<const TensorToWrite> tensors,
                       const std::map<std::string, std::string>& metadata) {
  const auto items = validate_tensors(tensors, metadata, path);
  write_items(path, items, metadata);
}

void write_safetensors_sharded(const fs::path& dir, std::span<const TensorToWrite> tensors,
                               std::uint64_t max_shard_bytes,
                               const std::map<std::string, std::string>& metadata) {
  if (max_shard_bytes == 0)
    fail(ErrorKind::invalid_argument, "cannot save checkpoint '{}': max_shard_bytes is 0",
         dir.string());
  const auto items = validate_tensors(tensors, metadata, dir);
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec || !fs::is_directory(dir))
    fail(ErrorKind::io, "cannot save checkpoint: cannot create directory '{}': {}", dir.string(),
         ec ? ec.message() : "not a directory");
  auto md = metadata;
  md.emplace("format", "pt");

  std::uint64_t total = 0;
  for (const auto& it : items) total += it.nbytes;
  // Before the first byte: a checkpoint the file system cannot hold fails now, not after
  // hours of writing (the older files it replaces go only once it is whole).
  // Note [Room for a save] (runtime/file_util.h): a file system that reports no blocks (FUSE)
  // or fails statvfs is not refused.
  if (const std::optional<std::uint64_t> free = free_bytes(dir); free && *free < total)
    fail(ErrorKind::io, "cannot save checkpoint '{}': it needs {}, but the file system has {} free",
         dir.string(), format_bytes(static_cast<double>(total)), format_bytes(static_cast<double>(*free)));

  std::set<std::string> keep;
  if (total <= max_shard_bytes) {
    write_items(dir / "model.safetensors", items, md);
    keep.insert("model.safetensors");
  } else {
    std::vector<std::vector<WriteItem>> groups;
    std::uint64_t cur = 0;
    for (const auto& it : items) {
      if (groups.empty() || (!groups.back().empty() && cur + it.nbytes > max_shard_bytes)) {
        groups.emplace_back();
        cur = 0;
      }
      groups.back().push_back(it);
      cur += it.nbytes;
    }
    const std::size_t count = groups.size();
    json weight_map = json::object();
    for (std::size_t g = 0; g < count; ++g) {
      const std::string name = fmt::format("model-{:05d}-of-{:05d}.safetensors", g + 1, count);
      write_items(dir / name, groups[g], md);
      keep.insert(name);
      for (const auto& it : groups[g]) weight_map[it.t->name] = name;
    }
    json index = {{"metadata", {{"total_size", total}}}, {"weight_map", std::move(weight_map)}};
    write_file_atomic(dir / "model.safetensors.index.json", index.dump(2) + "\n");
    keep.insert("model.safetensors.index.json");
  }

  // The new checkpoint is complete: remove what is left of an older save — its files, and
  // the temporaries of a writer that was killed (Note [Temp files] in runtime/file_util.h).
  for (const auto& de : fs::directory_iterator(dir, ec)) {
    const std::string name = de.path().filename().string();
    if (name.starts_with(".")) {
      std::error_code rec;
      if (const auto of = abandoned_temp_target(name); of && is_hf_checkpoint_file(*of) && de.is_regular_file(rec))
        fs::remove(de.path(), rec);
      continue;
    }
    if (keep.count(name) || !is_hf_checkpoint_file(name)) continue;
    std::error_code rec;
    if (!de.is_regular_file(rec)) continue;
    if (!fs::remove(de.path(), rec) || rec)
      log_warn("cannot remove stale checkpoint file '{}': {}", de.path().string(), rec.message());
    else
      log_debug("removed stale checkpoint file '{}'", de.path().string());
  }
  if (ec) log_warn("cannot list '{}' to remove stale files: {}", dir.string(), ec.message());
}

}  // namespace zo2
