// safetensors (https://github.com/huggingface/safetensors): a reader that
// validates a file completely when it is opened, an atomic writer, and the HF checkpoint
// layouts (one model.safetensors, or shards listed by model.safetensors.index.json).
//
// File format: 8-byte little-endian u64 header length N, N bytes of UTF-8 JSON (an object:
// tensor name -> {"dtype","shape","data_offsets":[begin,end]}, optional "__metadata__":
// string -> string), then the data section. Offsets are relative to the data section, which
// the tensors must cover exactly (no overlap, no hole, no unused byte at the end).
//
// Every problem with a file is a zo2::Error naming the file (and tensor): kind io when the
// file cannot be opened/read/written, kind format when it is malformed, kind
// invalid_argument for bad arguments to the writers.
#pragma once
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "runtime/dtype.h"

namespace zo2 {

// Headers longer than this are rejected (the reference implementation's limit).
inline constexpr std::uint64_t kSafetensorsMaxHeaderBytes = 100'000'000;

struct TensorInfo {
  std::string name;
  DType dtype = DType::f32;
  std::vector<std::int64_t> shape;  // empty: a 0-d tensor (one element)
  std::uint64_t begin = 0, end = 0;  // byte offsets inside the data section

  std::int64_t numel() const;
  std::uint64_t nbytes() const;  // numel() * dtype_size(dtype) == end - begin
};

// One .safetensors file, open for reading and validated when opened. Move-only. Tensors are
// read with pread (Note [No mapped reads] in safetensors.cpp): a file another program
// truncates while it is open is an Error(io) naming it at the next read, never a SIGBUS. All
// const methods are safe to call from several threads.
class SafetensorsFile {
 public:
  // Opens and validates everything up front (see the list in safetensors.cpp).
  static SafetensorsFile open(const std::filesystem::path& path);

  SafetensorsFile(SafetensorsFile&&) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&&) noexcept;
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;
  ~SafetensorsFile();

  const std::filesystem::path& path() const { return path_; }
  // Sorted by data offset (zero-byte tensors before a tensor starting at the same offset;
  // ties broken by name).
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* find(std::string_view name) const;  // nullptr if absent
  // Throws Error(format) naming the file and the tensor when absent.
  const TensorInfo& at(std::string_view name) const;
  // The tensor's bytes, read from the file.
  std::vector<std::byte> read(const TensorInfo& info) const;
  std::vector<std::byte> read(std::string_view name) const { return read(at(name)); }
  // Bytes [offset, offset + dst.size()) of the tensor's data into dst.
  void read(const TensorInfo& info, std::uint64_t offset, std::span<std::byte> dst) const;
  // Elements [first, first + count) of the tensor, converted to dst_dtype, into dst (count
  // elements of dst_dtype); a float tensor to a float dtype. Big ranges use several threads.
  void read_converted(const TensorInfo& info, std::int64_t first, std::int64_t count, void* dst,
                      DType dst_dtype) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }  // "__metadata__"

  std::uint64_t file_size() const { return file_size_; }
  std::uint64_t header_size() const { return header_size_; }  // N, the JSON bytes incl. padding
  std::uint64_t data_size() const { return file_size_ - 8 - header_size_; }

 private:
  SafetensorsFile() = default;
  void close_fd() noexcept;

  std::filesystem::path path_;
  int fd_ = -1;
  std::uint64_t file_size_ = 0;
  std::uint64_t header_size_ = 0;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, std::size_t, std::less<>> by_name_;  // name -> index in tensors_
  std::map<std::string, std::string> metadata_;
};

// An HF model directory: dir/model.safetensors, or dir/model.safetensors.index.json
// ("weight_map": tensor name -> shard file name, relative to the directory). When both exist
// model.safetensors wins, as in transformers (and write_safetensors_sharded relies on it
// for crash consistency). Move-only; Entry pointers stay valid across moves.
class SafetensorsCheckpoint {
 public:
  // dir_or_file: a directory as above, a path to a single .safetensors file, or a path to
  // a *.index.json file. Errors name the directory and what was looked for.
  static SafetensorsCheckpoint open(const std::filesystem::path& dir_or_file);

  SafetensorsCheckpoint(SafetensorsCheckpoint&&) noexcept;
  SafetensorsCheckpoint& operator=(SafetensorsCheckpoint&&) noexcept;
  SafetensorsCheckpoint(const SafetensorsCheckpoint&) = delete;
  SafetensorsCheckpoint& operator=(const SafetensorsCheckpoint&) = delete;
  ~SafetensorsCheckpoint();

  struct Entry {
    const SafetensorsFile* file;
    const TensorInfo* info;
  };
  const Entry* find(std::string_view name) const;  // nullptr if absent
  // Throws Error(format) naming the checkpoint and the tensor when absent.
  const Entry& at(std::string_view name) const;
  std::vector<std::string> names() const;  // sorted
  std::uint64_t total_bytes() const;       // sum of the tensors' nbytes

  // What was opened: the directory, or the file given.
  const std::filesystem::path& path() const { return path_; }
  bool sharded() const { return sharded_; }
  // The files in the order of their names (one for a single-file checkpoint).
  std::size_t num_files() const { return files_.size(); }
  const SafetensorsFile& file(std::size_t i) const { return *files_.at(i); }

 private:
  SafetensorsCheckpoint() = default;

  std::filesystem::path path_;
  bool sharded_ = false;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, Entry, std::less<>> entries_;
};

struct TensorToWrite {
  std::string name;
  DType dtype = DType::f32;
  std::vector<std::int64_t> shape;
  // Either data (nbytes bytes, any alignment) or fill, which writes the tensor's bytes
  // [offset, offset + out.size()) into `out`, all of them. The writer asks for a tensor in
  // pieces of at most 32 MiB, each a whole number of elements (an element's bytes are never
  // split), in any order and in parallel (on TBB worker threads), so a save converting a
  // tensor of gigabytes (an fp32 175B embedding saved as bf16) holds 32 MiB of it per thread,
  // not a copy of it. A zero-byte tensor needs neither. Setting both is an error.
  const void* data = nullptr;
  std::function<void(std::span<std::byte> out, std::uint64_t offset)> fill;
};

// The exact number of data bytes of a tensor; throws Error(invalid_argument) for a negative
// dim or an overflow.
std::uint64_t safetensors_tensor_nbytes(DType dtype, std::span<const std::int64_t> shape);

// Writes one file atomically (runtime/file_util.h, Note [Temp files]): a temp file beside it,
// fallocate, header (compact JSON: "__metadata__" first if not empty, then the tensors in the
// given order; padded with spaces to a multiple of 8), the tensor data contiguously in the
// given order (in parallel, with pwrite from memory: never through a mapping, Note [Writes,
// not mappings]; a fill tensor in pieces of at most 32 MiB, each through a buffer of its own, at
// most 16 pieces at once),
// fsync, rename over `path`, fsync of the directory. A write error is an Error(io) at once. On any error — including an exception from a fill callback, which is
// rethrown unchanged — the temp file is removed and `path` is untouched. Names must be
// unique, valid UTF-8 and not "__metadata__" (else Error(invalid_argument)).
void write_safetensors(const std::filesystem::path& path, std::span<const TensorToWrite> tensors,
                       const std::map<std::string, std::string>& metadata = {});

// HF sharding. Creates dir if needed. If the total data bytes <= max_shard_bytes writes
// dir/model.safetensors, else dir/model-00001-of-0000N.safetensors ... (greedy in the given
// order: a new shard starts when the next tensor would overflow the current one; a tensor
// never spans shards, and one larger than the limit gets a shard of its own) plus
// dir/model.safetensors.index.json ({"metadata":{"total_size":N},"weight_map":{...}},
// indented, keys sorted, as transformers writes it). Each file is written atomically, the
// index last. Every file gets `metadata` plus "format":"pt" unless metadata sets "format"
// (transformers refuses a file whose metadata lacks a known format). Afterwards removes the
// files of a previous save that the new one does not use — only model.safetensors,
// model.safetensors.index.json and model-<digits>-of-<digits>.safetensors; other files are
// left alone. A reader sees either the old or the new checkpoint at every moment unless the
// new save has the same number of shards (>1) as the old one: shards are then replaced
// one by one (the HF naming leaves no way around it).
void write_safetensors_sharded(const std::filesystem::path& dir,
                               std::span<const TensorToWrite> tensors,
                               std::uint64_t max_shard_bytes,
                               const std::map<std::string, std::string>& metadata = {});

}  // namespace zo2
