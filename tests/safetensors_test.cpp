// safetensors reader/writer: round trips, the exact bytes of the format, atomic and sharded
// saves, and one test per malformed-file case (files crafted byte by byte).
#include "models/safetensors.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <fstream>
#include <functional>
#include <limits>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include "runtime/dtype_convert.h"
#include "runtime/error.h"
#include "tests/test_util.h"

namespace zo2 {
namespace {

using test::read_file;

namespace fs = std::filesystem;
using nlohmann::json;

// ---- helpers -------------------------------------------------------------------------

std::string le64(std::uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
  return s;
}

// 8-byte length + header + data; the length field is header.size() unless given.
std::string raw_file(std::string_view header, std::string_view data = {},
                     std::optional<std::uint64_t> length = std::nullopt) {
  return le64(length.value_or(header.size())) + std::string(header) + std::string(data);
}

void write_bytes(const fs::path& path, std::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

std::vector<std::string> dir_listing(const fs::path& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

using test::error_of;

// Opening `path` fails with `kind`, and the message names the file and contains each word.
void expect_open_error(const fs::path& path, ErrorKind kind,
                       std::initializer_list<std::string_view> words) {
  const Error e = error_of([&] { SafetensorsFile::open(path); });
  EXPECT_EQ(e.kind(), kind) << e.what();
  const std::string msg = e.what();
  EXPECT_NE(msg.find(path.filename().string()), std::string::npos) << msg;
  for (auto w : words) EXPECT_NE(msg.find(w), std::string::npos) << "'" << w << "' not in: " << msg;
}

// Writes a crafted file and expects open() to reject it as malformed.
void expect_malformed(std::string_view bytes, std::initializer_list<std::string_view> words) {
  test::TempDir tmp;
  const fs::path path = tmp / "bad.safetensors";
  write_bytes(path, bytes);
  expect_open_error(path, ErrorKind::format, words);
}

// Opening the checkpoint `dir` fails with `kind`, the message contains each word.
void expect_checkpoint_error(const fs::path& dir, ErrorKind kind,
                             std::initializer_list<std::string_view> words) {
  const Error e = error_of([&] { SafetensorsCheckpoint::open(dir); });
  EXPECT_EQ(e.kind(), kind) << e.what();
  const std::string msg = e.what();
  for (auto w : words) EXPECT_NE(msg.find(w), std::string::npos) << "'" << w << "' not in: " << msg;
}

std::vector<std::byte> pattern(std::size_t n, unsigned seed) {
  std::vector<std::byte> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<std::byte>((i * 131 + seed * 7 + 1) & 0xFF);
  return v;
}

bool same_bytes(std::span<const std::byte> a, std::span<const std::byte> b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size()) == 0);
}

constexpr DType kAllDTypes[] = {DType::f32, DType::bf16,    DType::f16, DType::f8_e4m3,
                                DType::f8_e5m2, DType::f64, DType::i64, DType::i32,
                                DType::i16, DType::i8,      DType::u64, DType::u32,
                                DType::u16, DType::u8,      DType::boolean};

// A tensor F32 [n] named `name` with the given offsets, as a header entry.
std::string f32_entry(std::string_view name, int n, std::uint64_t b, std::uint64_t e) {
  return fmt::format("\"{}\":{{\"dtype\":\"F32\",\"shape\":[{}],\"data_offsets\":[{},{}]}}", name,
                     n, b, e);
}

// ---- round trips and exact bytes --------------------------------------------------------

TEST(SafetensorsWrite, RoundTripsEveryDtypeWithScalarsZeroElementTensorsAndMetadata) {
  test::TempDir tmp;
  std::vector<std::vector<std::byte>> buffers;
  std::vector<TensorToWrite> tensors;
  unsigned seed = 0;
  for (DType dt : kAllDTypes) {
    std::vector<std::int64_t> shape{2, 3};
    buffers.push_back(pattern(6 * dtype_size(dt), seed++));
    tensors.push_back({std::string("t.") + std::string(dtype_safetensors_name(dt)), dt, shape,
                       buffers.back().data(), {}});
  }
  buffers.push_back(pattern(4, seed++));
  tensors.push_back({"scalar", DType::f32, {}, buffers.back().data(), {}});
  tensors.push_back({"empty.a", DType::bf16, {0}, nullptr, {}});
  tensors.push_back({"empty.b", DType::i64, {3, 0, 5}, nullptr, {}});
  const std::map<std::string, std::string> metadata{{"format", "pt"}, {"note", "ünïcödé \"q\""}};
  const fs::path path = tmp / "all.safetensors";
  write_safetensors(path, tensors, metadata);

  const auto f = SafetensorsFile::open(path);
  EXPECT_EQ(f.path(), path);
  EXPECT_EQ(f.metadata(), metadata);
  ASSERT_EQ(f.tensors().size(), tensors.size());
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    SCOPED_TRACE(tensors[i].name);
    const TensorInfo& info = f.at(tensors[i].name);
    EXPECT_EQ(info.name, tensors[i].name);
    EXPECT_EQ(info.dtype, tensors[i].dtype);
    EXPECT_EQ(info.shape, tensors[i].shape);
    EXPECT_EQ(info.nbytes(), info.end - info.begin);
    const auto bytes = f.read(info);
    ASSERT_EQ(bytes.size(), info.nbytes());
    if (tensors[i].data) {
      EXPECT_TRUE(same_bytes(bytes, {static_cast<const std::byte*>(tensors[i].data), bytes.size()}));
    }
  }
  EXPECT_EQ(f.at("scalar").numel(), 1);
  EXPECT_EQ(f.at("empty.a").numel(), 0);
  EXPECT_EQ(f.at("empty.b").nbytes(), 0u);
  EXPECT_EQ(f.find("nope"), nullptr);
  EXPECT_EQ(f.header_size() % 8, 0u);
}

TEST(SafetensorsWrite, WritesTheExactBytesOfTheFormat) {
  test::TempDir tmp;
  const float values[2] = {1.0f, 2.0f};
  const std::vector<TensorToWrite> tensors{{"a", DType::f32, {2}, values, {}}};
  write_safetensors(tmp / "tiny.safetensors", tensors, {{"k", "v"}});

  // 79 bytes of compact JSON, padded with one space to 80 = 0x50.
  const std::string json_text =
      R"({"__metadata__":{"k":"v"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  ASSERT_EQ(json_text.size(), 79u);
  const std::string expected = std::string("\x50\0\0\0\0\0\0\0", 8) + json_text + " " +
                               std::string("\x00\x00\x80\x3f\x00\x00\x00\x40", 8);
  EXPECT_EQ(read_file(tmp / "tiny.safetensors"), expected);
}

TEST(SafetensorsWrite, PadsTheHeaderWithSpacesToAMultipleOfEightAndOmitsEmptyMetadata) {
  test::TempDir tmp;
  const std::uint8_t one = 7;
  const std::vector<TensorToWrite> tensors{{"x", DType::u8, {}, &one, {}}};
  write_safetensors(tmp / "x.safetensors", tensors);
  const std::string json_text = R"({"x":{"dtype":"U8","shape":[],"data_offsets":[0,1]}})";
  ASSERT_EQ(json_text.size(), 52u);
  EXPECT_EQ(read_file(tmp / "x.safetensors"),
            le64(56) + json_text + "    " + std::string(1, '\x07'));
}

TEST(SafetensorsWrite, WritesAFileWithoutTensorsThatReadsBack) {
  test::TempDir tmp;
  write_safetensors(tmp / "e.safetensors", {});
  EXPECT_EQ(read_file(tmp / "e.safetensors"), le64(8) + "{}      ");
  const auto f = SafetensorsFile::open(tmp / "e.safetensors");
  EXPECT_TRUE(f.tensors().empty());
  EXPECT_TRUE(f.metadata().empty());
  EXPECT_EQ(f.data_size(), 0u);
}

TEST(SafetensorsWrite, KeepsTheGivenTensorOrderInTheDataSection) {
  test::TempDir tmp;
  const auto a = pattern(12, 1), b = pattern(4, 2), c = pattern(8, 3);
  const std::vector<TensorToWrite> tensors{{"zeta", DType::f32, {3}, a.data(), {}},
                                           {"alpha", DType::u8, {4}, b.data(), {}},
                                           {"mid", DType::i16, {2, 2}, c.data(), {}}};
  write_safetensors(tmp / "o.safetensors", tensors);
  const auto f = SafetensorsFile::open(tmp / "o.safetensors");
  ASSERT_EQ(f.tensors().size(), 3u);
  EXPECT_EQ(f.tensors()[0].name, "zeta");
  EXPECT_EQ(f.tensors()[0].begin, 0u);
  EXPECT_EQ(f.tensors()[1].name, "alpha");
  EXPECT_EQ(f.tensors()[1].begin, 12u);
  EXPECT_EQ(f.tensors()[2].name, "mid");
  EXPECT_EQ(f.tensors()[2].begin, 16u);
  EXPECT_EQ(f.tensors()[2].end, 24u);
  // The header lists them in the same order.
  const std::string bytes = read_file(tmp / "o.safetensors");
  EXPECT_LT(bytes.find("\"zeta\""), bytes.find("\"alpha\""));
  EXPECT_LT(bytes.find("\"alpha\""), bytes.find("\"mid\""));
}

TEST(SafetensorsWrite, ReadsUnalignedTensorData) {
  test::TempDir tmp;
  const std::uint8_t head[3] = {1, 2, 3};
  const float values[5] = {0.5f, -1.25f, 3.0f, 1e-3f, -7.5f};
  const std::vector<TensorToWrite> tensors{{"head", DType::u8, {3}, head, {}},
                                           {"vals", DType::f32, {5}, values, {}}};
  write_safetensors(tmp / "u.safetensors", tensors);
  const auto f = SafetensorsFile::open(tmp / "u.safetensors");
  const auto bytes = f.read("vals");
  EXPECT_EQ(f.at("vals").begin, 3u);
  float back[5];
  ASSERT_EQ(bytes.size(), sizeof back);
  std::memcpy(back, bytes.data(), sizeof back);
  for (int i = 0; i < 5; ++i) EXPECT_EQ(back[i], values[i]);
  // At an unaligned file offset, converted on the way: the same values.
  double wide[4];
  f.read_converted(f.at("vals"), 1, 4, wide, DType::f64);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(wide[i], static_cast<double>(values[i + 1]));
}

TEST(SafetensorsWrite, FillCallbacksGetExactlyTheirTensorsBytes) {
  test::TempDir tmp;
  std::vector<TensorToWrite> tensors;
  std::atomic<int> calls{0};
  for (int i = 0; i < 64; ++i) {
    const std::int64_t n = 1000 + i * 37;
    tensors.push_back({fmt::format("w{}", i), DType::f32, {n}, nullptr,
                       [i, n, &calls](std::span<std::byte> out, std::uint64_t offset) {
                         ASSERT_EQ(out.size(), static_cast<std::size_t>(n) * 4);  // (one piece)
                         ASSERT_EQ(offset, 0u);
                         for (std::int64_t k = 0; k < n; ++k) {
                           const float v = static_cast<float>(i * 10000 + k);
                           std::memcpy(out.data() + k * 4, &v, 4);
                         }
                         ++calls;
                       }});
  }
  write_safetensors(tmp / "f.safetensors", tensors);
  EXPECT_EQ(calls.load(), 64);
  const auto f = SafetensorsFile::open(tmp / "f.safetensors");
  for (int i = 0; i < 64; ++i) {
    const auto bytes = f.read(fmt::format("w{}", i));
    for (std::size_t k = 0; k < bytes.size() / 4; ++k) {
      float v;
      std::memcpy(&v, bytes.data() + k * 4, 4);
      ASSERT_EQ(v, static_cast<float>(i * 10000 + static_cast<int>(k)));
    }
  }
}

// A fill tensor larger than a piece (32 MiB) is asked for in pieces — each a whole number of
// elements, at most 32 MiB, together exactly the tensor — so a save holds a piece per thread,
// not a copy of the tensor (an fp32 175B embedding saved as bf16 held 1.2 GB more).
TEST(SafetensorsWrite, AFillTensorIsFilledInPiecesOfAtMost32MiB) {
  test::TempDir tmp;
  const std::int64_t n = (21 << 20) + 3;  // bf16: 42 MiB + 6 bytes, two pieces
  std::mutex mutex;
  std::vector<std::pair<std::uint64_t, std::size_t>> pieces;
  const auto value = [](std::int64_t k) { return static_cast<std::uint16_t>((k * 2654435761u) >> 7); };
  const std::vector<TensorToWrite> tensors{
      {"small", DType::f32, {5}, nullptr,
       [](std::span<std::byte> out, std::uint64_t offset) {
         ASSERT_EQ(offset, 0u);
         std::memset(out.data(), 0x3c, out.size());
       }},
      {"big", DType::bf16, {n}, nullptr, [&](std::span<std::byte> out, std::uint64_t offset) {
         {
           const std::lock_guard lock(mutex);
           pieces.emplace_back(offset, out.size());
         }
         for (std::size_t b = 0; b < out.size(); b += 2) {
           const std::uint16_t v = value(static_cast<std::int64_t>((offset + b) / 2));
           std::memcpy(out.data() + b, &v, 2);
         }
       }}};
  write_safetensors(tmp / "p.safetensors", tensors);
  std::sort(pieces.begin(), pieces.end());
  ASSERT_EQ(pieces.size(), 2u);
  std::uint64_t next = 0;
  for (const auto& [offset, size] : pieces) {
    EXPECT_EQ(offset, next);
    EXPECT_LE(size, std::size_t{32} << 20);
    EXPECT_EQ(size % 2, 0u);
    next += size;
  }
  EXPECT_EQ(next, static_cast<std::uint64_t>(n) * 2);
  const auto f = SafetensorsFile::open(tmp / "p.safetensors");
  const auto bytes = f.read("big");
  ASSERT_EQ(bytes.size(), static_cast<std::size_t>(n) * 2);
  for (std::int64_t k = 0; k < n; k += 4099) {
    std::uint16_t v;
    std::memcpy(&v, bytes.data() + k * 2, 2);
    ASSERT_EQ(v, value(k)) << k;
  }
  std::uint16_t last;
  std::memcpy(&last, bytes.data() + (n - 1) * 2, 2);
  EXPECT_EQ(last, value(n - 1));
}

TEST(SafetensorsWrite, CopiesTensorsLargerThanOneCopyChunk) {
  test::TempDir tmp;
  const auto big = pattern((80u << 20) + 12, 9);  // three 32 MiB chunks, the last partial
  const std::vector<TensorToWrite> tensors{
      {"big", DType::u8, {static_cast<std::int64_t>(big.size())}, big.data(), {}}};
  write_safetensors(tmp / "big.safetensors", tensors);
  const auto f = SafetensorsFile::open(tmp / "big.safetensors");
  EXPECT_TRUE(same_bytes(f.read("big"), big));
}

// Note [No mapped reads]: a file truncated by another program after open() is an Error(io)
// naming the file, the tensor and both sizes at the next read — with a mapping it was a
// SIGBUS that killed the process (a host program with it; adversarial pass 57). What lies
// before the cut still reads.
TEST(SafetensorsRead, AFileTruncatedAfterOpenIsAnErrorNamingItNeverASignal) {
  test::TempDir tmp;
  std::vector<std::uint16_t> b(3u << 20);  // 6 MiB of bf16: more than one conversion buffer
  for (std::size_t i = 0; i < b.size(); ++i) b[i] = f32_to_bf16(static_cast<float>(i % 4099) - 2049.5f);
  const auto a = pattern(4000, 3);
  const fs::path path = tmp / "t.safetensors";
  write_safetensors(path, std::vector<TensorToWrite>{{"a", DType::u8, {4000}, a.data(), {}},
                                                     {"b", DType::bf16, {static_cast<std::int64_t>(b.size())}, b.data(), {}}});
  const auto f = SafetensorsFile::open(path);
  const TensorInfo& tb = f.at("b");
  // read_converted: every element as convert() gives it, whole and from an offset.
  std::vector<float> want(b.size()), got(b.size());
  convert(b.data(), DType::bf16, want.data(), DType::f32, b.size());
  f.read_converted(tb, 0, tb.numel(), got.data(), DType::f32);
  EXPECT_EQ(got, want);
  std::vector<float> part(1000);
  f.read_converted(tb, 2'000'000, 1000, part.data(), DType::f32);
  EXPECT_TRUE(std::equal(part.begin(), part.end(), want.begin() + 2'000'000));

  const auto cut = fs::file_size(path) - 1'000'000;
  fs::resize_file(path, cut);  // in place, as another program would
  EXPECT_TRUE(same_bytes(f.read("a"), a));
  for (const auto& read : std::vector<std::function<void()>>{
           [&] { (void)f.read(tb); },
           [&] { f.read_converted(tb, 0, tb.numel(), got.data(), DType::f32); },
           [&] { f.read_converted(tb, tb.numel() - 1, 1, got.data(), DType::f32); }}) {
    const Error e = error_of(read);
    EXPECT_EQ(e.kind(), ErrorKind::io) << e.what();
    for (const std::string& s : {path.string(), std::string("tensor 'b'"), fmt::format("is now {} bytes", cut),
                                 fmt::format("{} bytes when opened", cut + 1'000'000)})
      EXPECT_NE(std::string(e.what()).find(s), std::string::npos) << s << " not in: " << e.what();
  }
}

TEST(SafetensorsWrite, OverwritesAnExistingFile) {
  test::TempDir tmp;
  const std::uint8_t a = 1, b = 2;
  write_safetensors(tmp / "w.safetensors", std::vector<TensorToWrite>{{"a", DType::u8, {}, &a, {}}});
  write_safetensors(tmp / "w.safetensors", std::vector<TensorToWrite>{{"b", DType::u8, {}, &b, {}}});
  const auto f = SafetensorsFile::open(tmp / "w.safetensors");
  EXPECT_EQ(f.find("a"), nullptr);
  EXPECT_EQ(static_cast<int>(f.read("b")[0]), 2);
  EXPECT_EQ(dir_listing(tmp.path()), std::vector<std::string>{"w.safetensors"});
}

TEST(SafetensorsWrite, LeavesTheOldFileIntactAndNoTempFileWhenAFillCallbackThrows) {
  test::TempDir tmp;
  const fs::path path = tmp / "model.safetensors";
  const auto old = pattern(64, 5);
  write_safetensors(path, std::vector<TensorToWrite>{{"w", DType::f32, {16}, old.data(), {}}});
  const std::string before = read_file(path);

  std::vector<TensorToWrite> tensors;
  for (int i = 0; i < 8; ++i)
    tensors.push_back({fmt::format("t{}", i), DType::f32, {1024}, nullptr,
                       [i](std::span<std::byte> out, std::uint64_t) {
                         std::memset(out.data(), 0xAB, out.size() / 2);
                         if (i == 5) throw std::runtime_error("conversion failed");
                         std::memset(out.data(), 0xCD, out.size());
                       }});
  EXPECT_THROW(write_safetensors(path, tensors), std::runtime_error);
  EXPECT_EQ(read_file(path), before);
  EXPECT_EQ(dir_listing(tmp.path()), std::vector<std::string>{"model.safetensors"});
}

TEST(SafetensorsWrite, RejectsBadTensorsBeforeTouchingTheFile) {
  test::TempDir tmp;
  const fs::path path = tmp / "m.safetensors";
  const std::uint8_t x[4] = {};
  write_safetensors(path, std::vector<TensorToWrite>{{"a", DType::u8, {4}, x, {}}});
  const std::string before = read_file(path);
  auto expect_invalid = [&](std::vector<TensorToWrite> t, std::string_view word) {
    const Error e = error_of([&] { write_safetensors(path, t); });
    EXPECT_EQ(e.kind(), ErrorKind::invalid_argument) << e.what();
    EXPECT_NE(std::string(e.what()).find(word), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("m.safetensors"), std::string::npos) << e.what();
  };
  expect_invalid({{"a", DType::u8, {4}, x, {}}, {"a", DType::u8, {4}, x, {}}}, "duplicate");
  expect_invalid({{"a", DType::u8, {-1}, x, {}}}, "negative");
  expect_invalid({{"a", DType::u8, {1ll << 40, 1ll << 40}, x, {}}}, "overflow");
  expect_invalid({{"a", DType::u8, {4}, nullptr, {}}}, "neither");
  expect_invalid({{"a", DType::u8, {4}, x, [](std::span<std::byte>, std::uint64_t) {}}}, "both");
  expect_invalid({{"__metadata__", DType::u8, {4}, x, {}}}, "reserved");
  expect_invalid({{"", DType::u8, {4}, x, {}}}, "empty");
  expect_invalid({{"bad\xff", DType::u8, {4}, x, {}}}, "UTF-8");
  EXPECT_EQ(read_file(path), before);
  EXPECT_EQ(dir_listing(tmp.path()), std::vector<std::string>{"m.safetensors"});
}

TEST(SafetensorsWrite, FailsWithAnIoErrorNamingThePathWhenTheDirectoryIsMissing) {
  test::TempDir tmp;
  const std::uint8_t x = 0;
  const fs::path path = tmp / "no-such-dir" / "m.safetensors";
  const Error e = error_of(
      [&] { write_safetensors(path, std::vector<TensorToWrite>{{"a", DType::u8, {}, &x, {}}}); });
  EXPECT_EQ(e.kind(), ErrorKind::io);
  EXPECT_NE(std::string(e.what()).find("m.safetensors"), std::string::npos) << e.what();
}

// ---- reading valid edge cases -----------------------------------------------------------

TEST(SafetensorsRead, SortsTensorsByDataOffsetWhateverTheHeaderOrder) {
  test::TempDir tmp;
  const std::string header = "{" + f32_entry("b", 1, 4, 8) + "," + f32_entry("a", 1, 8, 12) + "," +
                             f32_entry("c", 1, 0, 4) + "}";
  write_bytes(tmp / "s.safetensors", raw_file(header, std::string(12, 'x')));
  const auto f = SafetensorsFile::open(tmp / "s.safetensors");
  ASSERT_EQ(f.tensors().size(), 3u);
  EXPECT_EQ(f.tensors()[0].name, "c");
  EXPECT_EQ(f.tensors()[1].name, "b");
  EXPECT_EQ(f.tensors()[2].name, "a");
}

TEST(SafetensorsRead, AcceptsZeroElementTensorsAnywhereAndAnUnpaddedHeader) {
  test::TempDir tmp;
  const std::string header = "{" + f32_entry("z0", 0, 0, 0) + "," + f32_entry("a", 1, 0, 4) + "," +
                             f32_entry("z1", 0, 4, 4) + "," + f32_entry("b", 1, 4, 8) + "," +
                             f32_entry("z2", 0, 8, 8) + "}";
  write_bytes(tmp / "z.safetensors", raw_file(header, std::string(8, 'y')));
  const auto f = SafetensorsFile::open(tmp / "z.safetensors");
  ASSERT_EQ(f.tensors().size(), 5u);
  EXPECT_TRUE(f.read("z2").empty());
  EXPECT_EQ(f.read("b").size(), 4u);
}

TEST(SafetensorsRead, AcceptsAnEmptyDataSectionWithOnlyZeroElementTensors) {
  test::TempDir tmp;
  const std::string header = "{\"__metadata__\":{\"a\":\"b\"}," + f32_entry("z", 0, 0, 0) + "}";
  write_bytes(tmp / "e.safetensors", raw_file(header));
  const auto f = SafetensorsFile::open(tmp / "e.safetensors");
  EXPECT_EQ(f.data_size(), 0u);
  EXPECT_TRUE(f.read("z").empty());
  EXPECT_EQ(f.metadata().at("a"), "b");
}

TEST(SafetensorsRead, IgnoresUnknownKeysInATensorEntry) {
  test::TempDir tmp;
  const std::string header =
      R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2],"extra":{"x":[1,2]}}})";
  write_bytes(tmp / "k.safetensors", raw_file(header, "ab"));
  EXPECT_EQ(SafetensorsFile::open(tmp / "k.safetensors").at("a").nbytes(), 2u);
}

TEST(SafetensorsRead, AtNamesTheFileAndTheMissingTensor) {
  test::TempDir tmp;
  write_safetensors(tmp / "n.safetensors", {});
  const auto f = SafetensorsFile::open(tmp / "n.safetensors");
  const Error e = error_of([&] { f.at("decoder.missing.weight"); });
  EXPECT_EQ(e.kind(), ErrorKind::format);
  EXPECT_NE(std::string(e.what()).find("n.safetensors"), std::string::npos) << e.what();
  EXPECT_NE(std::string(e.what()).find("decoder.missing.weight"), std::string::npos) << e.what();
}

TEST(SafetensorsRead, MovingAFileKeepsItsTensorsAndBytesValid) {
  test::TempDir tmp;
  const auto data = pattern(40, 4);
  write_safetensors(tmp / "m.safetensors",
                    std::vector<TensorToWrite>{{"a", DType::f32, {10}, data.data(), {}}});
  auto f = SafetensorsFile::open(tmp / "m.safetensors");
  const TensorInfo* info = f.find("a");
  SafetensorsFile g = std::move(f);
  EXPECT_EQ(g.find("a"), info);
  EXPECT_TRUE(same_bytes(g.read(*info), data));
  f = std::move(g);
  EXPECT_TRUE(same_bytes(f.read("a"), data));
}

// ---- malformed files: one test per case -------------------------------------------------

TEST(SafetensorsMalformed, MissingFileIsAnIoError) {
  test::TempDir tmp;
  expect_open_error(tmp / "absent.safetensors", ErrorKind::io, {"cannot open"});
}

TEST(SafetensorsMalformed, DirectoryIsAnIoError) {
  test::TempDir tmp;
  fs::create_directory(tmp / "d.safetensors");
  expect_open_error(tmp / "d.safetensors", ErrorKind::io, {"not a regular file"});
}

TEST(SafetensorsMalformed, FileShorterThanEightBytes) {
  expect_malformed(std::string("\x05\0\0\0\0", 5), {"shorter", "5 bytes"});
  expect_malformed("", {"shorter", "0 bytes"});
}

TEST(SafetensorsMalformed, HeaderLengthZero) {
  expect_malformed(raw_file("", "0123456789", 0), {"header length is 0"});
}

TEST(SafetensorsMalformed, HeaderLengthAboveOneHundredMegabytes) {
  expect_malformed(raw_file("{}", "", 100'000'001), {"header length", "limit"});
  expect_malformed(raw_file("{}", "", ~0ull), {"header length", "limit"});
}

TEST(SafetensorsMalformed, HeaderLengthBeyondTheEndOfTheFile) {
  expect_malformed(raw_file("{}      ", "", 100), {"header length 100", "beyond the end"});
  expect_malformed(raw_file("{}      ", "", 9), {"header length 9", "beyond the end"});
}

TEST(SafetensorsMalformed, HeaderThatIsNotValidUtf8) {
  expect_malformed(raw_file("{\"a\xff\":1}"), {"UTF-8"});
  expect_malformed(raw_file("{\"a\xc0\xaf\":1}"), {"UTF-8"});      // overlong '/'
  expect_malformed(raw_file("{\"a\xed\xa0\x80\":1}"), {"UTF-8"});  // surrogate
  expect_malformed(raw_file("{\"a\xe2\x82\":1}"), {"UTF-8"});      // truncated sequence
}

TEST(SafetensorsMalformed, HeaderThatIsNotJson) {
  expect_malformed(raw_file("{\"a\":"), {"not valid JSON"});
  expect_malformed(raw_file("{} trailing"), {"not valid JSON"});
  expect_malformed(raw_file(std::string("{}\0\0\0\0\0\0", 8)), {"not valid JSON"});
  // nlohmann::json alone would stop at the NUL and accept this.
  expect_malformed(raw_file(std::string("{}\0{\"x\"", 7)), {"not valid JSON", "NUL"});
}

// A header length too large but inside the file takes in tensor bytes: the error was "header
// is not valid UTF-8 (bad byte at header offset 2147)", with no word of the length field.
TEST(SafetensorsMalformed, AHeaderThatIsNotJsonMayHaveAWrongLengthFieldAndTheMessageSaysSo) {
  const std::string header = "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}";
  const std::string data = "\xff\xff\x7f\x7f\0\0\0\0\x01\x02\x03\x04\0\0\x80\x3f";
  expect_malformed(raw_file(header, data, header.size() + 4),
                   {"UTF-8", "(or the header length field, " + std::to_string(header.size() + 4) + ", is wrong)"});
  expect_malformed(raw_file(header, "abcdefghijklmnop", header.size() + 2),
                   {"not valid JSON (or the header length field, " + std::to_string(header.size() + 2) + ", is wrong)"});
  expect_malformed(raw_file(header, std::string(16, '\0'), header.size() + 3),
                   {"NUL", "header length field, " + std::to_string(header.size() + 3)});
}

// A clone without git-lfs holds pointer files in the weights' place; read as a header length,
// "version " was "header length 2336927755350992246 exceeds the limit".
TEST(SafetensorsMalformed, AGitLfsPointerFileIsNamedAsOne) {
  const std::string pointer =
      "version https://git-lfs.github.com/spec/v1\n"
      "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
      "size 988097824\n";
  expect_malformed(pointer, {"Git LFS pointer file", "pointing at 988097824 bytes", "not the weights", "git lfs pull"});
  test::TempDir tmp;
  write_bytes(tmp / "model.safetensors", pointer);
  expect_checkpoint_error(tmp.path(), ErrorKind::format, {"model.safetensors", "Git LFS pointer", "git lfs pull"});
  fs::remove(tmp / "model.safetensors");
  write_bytes(tmp / "model.safetensors.index.json", pointer);
  expect_checkpoint_error(tmp.path(), ErrorKind::format,
                          {"model.safetensors.index.json", "Git LFS pointer", "git lfs pull"});
}

TEST(SafetensorsMalformed, HeaderThatIsNotAnObject) {
  expect_malformed(raw_file("[1,2]   "), {"not a JSON object", "array"});
  expect_malformed(raw_file("\"text\"  "), {"not a JSON object"});
}

TEST(SafetensorsMalformed, HeaderNestedTooDeeply) {
  const std::string deep = "{\"a\":" + std::string(100000, '[') + std::string(100000, ']') + "}";
  expect_malformed(raw_file(deep), {"nested"});
}

TEST(SafetensorsMalformed, TensorEntryThatIsNotAnObject) {
  expect_malformed(raw_file(R"({"w":[1,2]})"), {"tensor 'w'", "not an object"});
  expect_malformed(raw_file(R"({"w":5})"), {"tensor 'w'", "not an object"});
}

TEST(SafetensorsMalformed, MissingDtype) {
  expect_malformed(raw_file(R"({"w":{"shape":[1],"data_offsets":[0,4]}})", "abcd"),
                   {"tensor 'w'", "missing \"dtype\""});
}

TEST(SafetensorsMalformed, DtypeThatIsNotAString) {
  expect_malformed(raw_file(R"({"w":{"dtype":4,"shape":[1],"data_offsets":[0,4]}})", "abcd"),
                   {"tensor 'w'", "\"dtype\" is not a string"});
}

TEST(SafetensorsMalformed, UnknownDtype) {
  expect_malformed(raw_file(R"({"w":{"dtype":"F12","shape":[1],"data_offsets":[0,4]}})", "abcd"),
                   {"tensor 'w'", "unknown dtype", "F12"});
  expect_malformed(raw_file(R"({"w":{"dtype":"f32","shape":[1],"data_offsets":[0,4]}})", "abcd"),
                   {"unknown dtype"});
}

TEST(SafetensorsMalformed, MissingShape) {
  expect_malformed(raw_file(R"({"w":{"dtype":"F32","data_offsets":[0,4]}})", "abcd"),
                   {"tensor 'w'", "missing \"shape\""});
}

TEST(SafetensorsMalformed, ShapeThatIsNotAnArrayOfIntegers) {
  expect_malformed(raw_file(R"({"w":{"dtype":"F32","shape":"1","data_offsets":[0,4]}})", "abcd"),
                   {"tensor 'w'", "\"shape\" is not an array"});
  expect_malformed(raw_file(R"({"w":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}})", "abcd"),
                   {"tensor 'w'", "\"shape\"", "not an integer"});
  expect_malformed(raw_file(R"({"w":{"dtype":"F32","shape":[null],"data_offsets":[0,4]}})", "abcd"),
                   {"tensor 'w'", "not an integer"});
}

TEST(SafetensorsMalformed, NegativeShapeDim) {
  expect_malformed(raw_file(R"({"w":{"dtype":"F32","shape":[2,-1],"data_offsets":[0,4]}})", "abcd"),
                   {"tensor 'w'", "negative dim -1"});
}

TEST(SafetensorsMalformed, NumelOverflow) {
  // 2^32 * 2^32 overflows int64.
  expect_malformed(
      raw_file(R"({"w":{"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,0]}})"),
      {"tensor 'w'", "overflow"});
  // Even with a zero dim elsewhere (the check does not depend on the order of dims).
  expect_malformed(
      raw_file(R"({"w":{"dtype":"U8","shape":[0,4294967296,4294967296],"data_offsets":[0,0]}})"),
      {"overflow"});
  // A dim above INT64_MAX.
  expect_malformed(
      raw_file(R"({"w":{"dtype":"U8","shape":[18446744073709551615],"data_offsets":[0,0]}})"),
      {"overflow"});
  // The element count fits, the byte count does not: 2^62 * 8.
  expect_malformed(
      raw_file(R"({"w":{"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,0]}})"),
      {"overflow"});
}

TEST(SafetensorsMalformed, MissingDataOffsets) {
  expect_malformed(raw_file(R"({"w":{"dtype":"F32","shape":[1]}})", "abcd"),
                   {"tensor 'w'", "missing \"data_offsets\""});
}

TEST(SafetensorsMalformed, DataOffsetsThatAreNotTwoNonNegativeIntegers) {
  const char* bad[] = {
      R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0]}})",
      R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}})",
      R"({"w":{"dtype":"F32","shape":[1],"data_offsets":"0,4"}})",
      R"({"w":{"dtype":"F32","shape":[1],"data_offsets":["0",4]}})",
      R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0.0,4]}})",
      R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,100000000000000000000000]}})",
  };
  for (const char* h : bad) {
    SCOPED_TRACE(h);
    expect_malformed(raw_file(h, "abcd"), {"tensor 'w'", "\"data_offsets\"", "two non-negative"});
  }
}

TEST(SafetensorsMalformed, NegativeDataOffset) {
  expect_malformed(raw_file(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}})", "abcd"),
                   {"tensor 'w'", "negative offset"});
}

TEST(SafetensorsMalformed, DataOffsetsBeginAfterEnd) {
  expect_malformed(raw_file(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}})", "abcd"),
                   {"tensor 'w'", "begin 4 is greater than end 0"});
}

TEST(SafetensorsMalformed, DataOffsetsEndBeyondTheDataSection) {
  expect_malformed(raw_file("{" + f32_entry("w", 2, 0, 8) + "}", "abcd"),
                   {"tensor 'w'", "end 8 is beyond the end of the data section (4 bytes)"});
  expect_malformed(
      raw_file(
          R"({"w":{"dtype":"F32","shape":[0],"data_offsets":[18446744073709551615,18446744073709551615]}})"),
      {"tensor 'w'", "beyond the end of the data section"});
}

TEST(SafetensorsMalformed, ByteSizeThatDoesNotMatchShapeAndDtype) {
  expect_malformed(raw_file("{" + f32_entry("w", 2, 0, 4) + "}", "abcd"),
                   {"tensor 'w'", "mismatch", "needs 8"});
  expect_malformed(raw_file(R"({"w":{"dtype":"BF16","shape":[3],"data_offsets":[0,4]}})", "abcd"),
                   {"tensor 'w'", "mismatch"});
}

TEST(SafetensorsMalformed, OverlappingTensors) {
  expect_malformed(raw_file("{" + f32_entry("a", 2, 0, 8) + "," + f32_entry("b", 2, 4, 12) + "}",
                            std::string(12, 'x')),
                   {"'a'", "'b'", "overlap"});
  // The same range twice.
  expect_malformed(raw_file("{" + f32_entry("a", 1, 0, 4) + "," + f32_entry("b", 1, 0, 4) + "}",
                            std::string(4, 'x')),
                   {"overlap"});
  // A zero-element tensor pointing inside another one.
  expect_malformed(raw_file("{" + f32_entry("a", 2, 0, 8) + "," + f32_entry("z", 0, 4, 4) + "}",
                            std::string(8, 'x')),
                   {"'z'", "overlap"});
}

TEST(SafetensorsMalformed, HoleBetweenTensors) {
  expect_malformed(raw_file("{" + f32_entry("a", 1, 0, 4) + "," + f32_entry("b", 1, 8, 12) + "}",
                            std::string(12, 'x')),
                   {"hole of 4 bytes", "'a'", "'b'", "fully indexed"});
}

TEST(SafetensorsMalformed, HoleAtTheStartOfTheDataSection) {
  expect_malformed(raw_file("{" + f32_entry("a", 1, 4, 8) + "}", std::string(8, 'x')),
                   {"hole of 4 bytes", "start", "'a'"});
}

TEST(SafetensorsMalformed, UnusedBytesAtTheEndOfTheDataSection) {
  expect_malformed(raw_file("{" + f32_entry("a", 1, 0, 4) + "}", std::string(8, 'x')),
                   {"4 unused bytes", "end of the data section"});
  expect_malformed(raw_file("{}", "abc"), {"3 unused bytes"});
}

TEST(SafetensorsMalformed, DuplicateTensorNames) {
  expect_malformed(raw_file("{" + f32_entry("w", 1, 0, 4) + "," + f32_entry("w", 1, 4, 8) + "}",
                            std::string(8, 'x')),
                   {"duplicate tensor name 'w'"});
}

TEST(SafetensorsMalformed, DuplicateKeyInsideATensorEntryOrTheMetadata) {
  expect_malformed(
      raw_file(R"({"w":{"dtype":"F32","dtype":"F16","shape":[1],"data_offsets":[0,4]}})", "abcd"),
      {"duplicate key 'dtype'"});
  expect_malformed(raw_file(R"({"__metadata__":{"k":"a","k":"b"}})"), {"duplicate key 'k'"});
  expect_malformed(raw_file(R"({"__metadata__":{},"__metadata__":{}})"),
                   {"duplicate key '__metadata__'"});
}

TEST(SafetensorsMalformed, MetadataThatIsNotAnObject) {
  expect_malformed(raw_file(R"({"__metadata__":"format=pt"})"), {"__metadata__", "not an object"});
  expect_malformed(raw_file(R"({"__metadata__":["a"]})"), {"__metadata__", "not an object"});
}

TEST(SafetensorsMalformed, MetadataWithANonStringValue) {
  expect_malformed(raw_file(R"({"__metadata__":{"format":"pt","step":3}})"),
                   {"__metadata__", "'step'", "not a string"});
  expect_malformed(raw_file(R"({"__metadata__":{"nested":{"a":"b"}}})"),
                   {"__metadata__", "'nested'", "not a string"});
}

TEST(SafetensorsMalformed, TruncatedOrCorruptedFilesNeverCrashOnlyThrow) {
  test::TempDir tmp;
  const float x[3] = {1, 2, 3};
  const std::uint8_t y = 9;
  write_safetensors(tmp / "good.safetensors",
                    std::vector<TensorToWrite>{{"a.w", DType::f32, {3}, x, {}},
                                               {"b", DType::u8, {1, 1}, &y, {}},
                                               {"z", DType::bf16, {0}, nullptr, {}}},
                    {{"k", "v"}});
  const std::string good = read_file(tmp / "good.safetensors");
  int accepted = 0, rejected = 0;
  auto try_open = [&](const std::string& bytes) {
    // A fresh file each time: rewriting one in place waits for its writeback on ext4.
    const fs::path path = tmp / fmt::format("mutant{}.safetensors", accepted + rejected);
    write_bytes(path, bytes);
    try {
      const auto f = SafetensorsFile::open(path);
      for (const auto& t : f.tensors()) {
        const auto b = f.read(t);
        ASSERT_EQ(b.size(), t.nbytes());
      }
      ++accepted;
    } catch (const Error& e) {
      ASSERT_TRUE(e.kind() == ErrorKind::format) << e.what();
      ++rejected;
    }
  };
  for (std::size_t len = 0; len < good.size(); ++len) try_open(good.substr(0, len));
  for (std::size_t i = 0; i < good.size(); ++i)
    for (char c : {'\0', '\xff', '"', '9', '[', '{', ',', '-', ' '}) {
      std::string m = good;
      if (m[i] == c) continue;
      m[i] = c;
      try_open(m);
    }
  EXPECT_GT(rejected, 0);
  EXPECT_GT(accepted, 0);  // e.g. a changed metadata character or a changed data byte
}

// ---- sharded checkpoints ----------------------------------------------------------------

struct Model {
  std::vector<std::vector<std::byte>> buffers;
  std::vector<TensorToWrite> tensors;
  void add(std::string name, DType dt, std::vector<std::int64_t> shape) {
    std::size_t n = dtype_size(dt);
    for (auto d : shape) n *= static_cast<std::size_t>(d);
    buffers.push_back(pattern(n, static_cast<unsigned>(buffers.size())));
    tensors.push_back({std::move(name), dt, std::move(shape), buffers.back().data(), {}});
  }
};

void expect_checkpoint_matches(const SafetensorsCheckpoint& ck, const Model& m) {
  std::vector<std::string> names;
  for (const auto& t : m.tensors) names.push_back(t.name);
  std::sort(names.begin(), names.end());
  EXPECT_EQ(ck.names(), names);
  std::uint64_t total = 0;
  for (std::size_t i = 0; i < m.tensors.size(); ++i) {
    const auto& e = ck.at(m.tensors[i].name);
    EXPECT_EQ(e.info->dtype, m.tensors[i].dtype);
    EXPECT_EQ(e.info->shape, m.tensors[i].shape);
    EXPECT_TRUE(same_bytes(e.file->read(*e.info), m.buffers[i])) << m.tensors[i].name;
    total += m.buffers[i].size();
  }
  EXPECT_EQ(ck.total_bytes(), total);
}

json read_json(const fs::path& p) { return json::parse(read_file(p)); }

TEST(SafetensorsSharded, WritesOneModelSafetensorsWhenEverythingFits) {
  test::TempDir tmp;
  Model m;
  m.add("a", DType::f32, {100});
  m.add("b", DType::bf16, {10, 10});
  write_safetensors_sharded(tmp.path(), m.tensors, 600, {{"step", "3"}});
  EXPECT_EQ(dir_listing(tmp.path()), std::vector<std::string>{"model.safetensors"});
  const auto ck = SafetensorsCheckpoint::open(tmp.path());
  EXPECT_FALSE(ck.sharded());
  ASSERT_EQ(ck.num_files(), 1u);
  // transformers needs "format" in the metadata; the caller's entries are kept.
  EXPECT_EQ(ck.file(0).metadata(),
            (std::map<std::string, std::string>{{"format", "pt"}, {"step", "3"}}));
  expect_checkpoint_matches(ck, m);
}

TEST(SafetensorsSharded, SplitsIntoShardsInOrderAndWritesTheIndex) {
  test::TempDir tmp;
  Model m;
  m.add("e.weight", DType::f32, {100});  // 400 bytes each
  m.add("d.weight", DType::f32, {100});
  m.add("empty", DType::f16, {0, 8});
  m.add("c.weight", DType::f32, {100});
  m.add("b.weight", DType::f32, {100});
  m.add("a.weight", DType::f32, {100});
  write_safetensors_sharded(tmp.path(), m.tensors, 1000, {{"format", "pt"}});

  EXPECT_EQ(dir_listing(tmp.path()),
            (std::vector<std::string>{"model-00001-of-00003.safetensors",
                                      "model-00002-of-00003.safetensors",
                                      "model-00003-of-00003.safetensors",
                                      "model.safetensors.index.json"}));
  const json index = read_json(tmp / "model.safetensors.index.json");
  const json expected = {
      {"metadata", {{"total_size", 2000}}},
      {"weight_map",
       {{"e.weight", "model-00001-of-00003.safetensors"},
        {"d.weight", "model-00001-of-00003.safetensors"},
        {"empty", "model-00001-of-00003.safetensors"},
        {"c.weight", "model-00002-of-00003.safetensors"},
        {"b.weight", "model-00002-of-00003.safetensors"},
        {"a.weight", "model-00003-of-00003.safetensors"}}}};
  EXPECT_EQ(index, expected);
  // Indented with sorted keys and a final newline, as transformers writes it.
  EXPECT_EQ(read_file(tmp / "model.safetensors.index.json"), expected.dump(2) + "\n");

  // Each shard keeps the given order.
  const auto s1 = SafetensorsFile::open(tmp / "model-00001-of-00003.safetensors");
  ASSERT_EQ(s1.tensors().size(), 3u);
  EXPECT_EQ(s1.tensors()[0].name, "e.weight");
  EXPECT_EQ(s1.tensors()[1].name, "d.weight");
  EXPECT_EQ(s1.metadata().at("format"), "pt");

  const auto ck = SafetensorsCheckpoint::open(tmp.path());
  EXPECT_TRUE(ck.sharded());
  EXPECT_EQ(ck.num_files(), 3u);
  expect_checkpoint_matches(ck, m);
  EXPECT_EQ(ck.at("a.weight").file->path().filename(), "model-00003-of-00003.safetensors");
  // The index file itself can be opened too.
  expect_checkpoint_matches(SafetensorsCheckpoint::open(tmp / "model.safetensors.index.json"), m);
}

TEST(SafetensorsSharded, GivesATensorLargerThanTheLimitAShardOfItsOwn) {
  test::TempDir tmp;
  Model m;
  m.add("small1", DType::u8, {40});
  m.add("huge", DType::u8, {400});
  m.add("small2", DType::u8, {40});
  m.add("small3", DType::u8, {40});
  write_safetensors_sharded(tmp.path(), m.tensors, 100);
  const auto ck = SafetensorsCheckpoint::open(tmp.path());
  ASSERT_EQ(ck.num_files(), 3u);
  EXPECT_EQ(ck.at("small1").file->tensors().size(), 1u);
  EXPECT_EQ(ck.at("huge").file->tensors().size(), 1u);
  EXPECT_EQ(ck.at("small2").file, ck.at("small3").file);
  expect_checkpoint_matches(ck, m);
}

TEST(SafetensorsSharded, ResavingWithFewerShardsRemovesTheStaleOnes) {
  test::TempDir tmp;
  Model m;
  for (int i = 0; i < 6; ++i) m.add(fmt::format("w{}", i), DType::f32, {25});  // 100 bytes
  write_bytes(tmp / "notes.txt", "keep me");
  write_bytes(tmp / "model-extra.bin", "keep me too");
  write_safetensors_sharded(tmp.path(), m.tensors, 100);  // 6 shards
  EXPECT_TRUE(fs::exists(tmp / "model-00006-of-00006.safetensors"));
  write_safetensors_sharded(tmp.path(), m.tensors, 300);  // 2 shards
  EXPECT_EQ(dir_listing(tmp.path()),
            (std::vector<std::string>{"model-00001-of-00002.safetensors",
                                      "model-00002-of-00002.safetensors", "model-extra.bin",
                                      "model.safetensors.index.json", "notes.txt"}));
  expect_checkpoint_matches(SafetensorsCheckpoint::open(tmp.path()), m);
}

// A writer killed mid-save leaves ".<name>.tmp.<pid>.…": the next save removes those of a
// pid that is gone, and leaves a live writer's alone.
TEST(SafetensorsSharded, ASaveRemovesTheTemporariesOfAKilledWriterOnly) {
  test::TempDir tmp;
  Model m;
  m.add("w", DType::f32, {25});
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) _exit(0);
  ASSERT_EQ(waitpid(child, nullptr, 0), child);  // a pid now gone
  const std::string dead = fmt::format(".model-00003-of-00014.safetensors.tmp.{}.9.73fc6965", child);
  const std::string live = fmt::format(".model.safetensors.tmp.{}.1.00000000", getpid());
  write_bytes(tmp / dead, "partial");
  write_bytes(tmp / live, "in progress");
  write_safetensors_sharded(tmp.path(), m.tensors, 1000);
  EXPECT_FALSE(fs::exists(tmp / dead));
  EXPECT_TRUE(fs::exists(tmp / live));
}

// Every shard stays open while a checkpoint is read (Note [No mapped reads]): more shards
// than the soft open-file limit raise it to the hard one instead of failing with EMFILE. In
// a child, whose limit the test lowers.
TEST(SafetensorsSharded, MoreShardsThanTheSoftOpenFileLimitStillOpen) {
  test::TempDir tmp;
  Model m;
  for (int i = 0; i < 80; ++i) m.add(fmt::format("w{}", i), DType::f32, {25});
  write_safetensors_sharded(tmp.path(), m.tensors, 100);  // one shard per tensor
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    struct rlimit rl {};
    if (::getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_max < 200) _exit(3);  // cannot show it here
    rl.rlim_cur = 40;
    if (::setrlimit(RLIMIT_NOFILE, &rl) != 0) _exit(4);
    try {
      const auto ck = SafetensorsCheckpoint::open(tmp.path());
      _exit(ck.num_files() == 80 ? 0 : 5);
    } catch (...) {
      _exit(6);
    }
  }
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status));
  if (WEXITSTATUS(status) == 3) GTEST_SKIP() << "the hard open-file limit is below 200 here";
  EXPECT_EQ(WEXITSTATUS(status), 0);
}

TEST(SafetensorsSharded, ResavingAsOneFileRemovesTheIndexAndShardsAndBack) {
  test::TempDir tmp;
  Model m;
  for (int i = 0; i < 4; ++i) m.add(fmt::format("w{}", i), DType::f32, {25});
  write_safetensors_sharded(tmp.path(), m.tensors, 200);
  write_safetensors_sharded(tmp.path(), m.tensors, 1 << 20);
  EXPECT_EQ(dir_listing(tmp.path()), std::vector<std::string>{"model.safetensors"});
  expect_checkpoint_matches(SafetensorsCheckpoint::open(tmp.path()), m);
  write_safetensors_sharded(tmp.path(), m.tensors, 200);
  EXPECT_EQ(dir_listing(tmp.path()),
            (std::vector<std::string>{"model-00001-of-00002.safetensors",
                                      "model-00002-of-00002.safetensors",
                                      "model.safetensors.index.json"}));
  expect_checkpoint_matches(SafetensorsCheckpoint::open(tmp.path()), m);
}

TEST(SafetensorsSharded, CreatesTheDirectoryAndRejectsAZeroShardLimit) {
  test::TempDir tmp;
  Model m;
  m.add("a", DType::u8, {3});
  write_safetensors_sharded(tmp / "new" / "dir", m.tensors, 100);
  expect_checkpoint_matches(SafetensorsCheckpoint::open(tmp / "new" / "dir"), m);
  const Error e = error_of([&] { write_safetensors_sharded(tmp / "x", m.tensors, 0); });
  EXPECT_EQ(e.kind(), ErrorKind::invalid_argument);
}

TEST(SafetensorsSharded, KeepsTheOldCheckpointWhenAFillCallbackThrows) {
  test::TempDir tmp;
  Model m;
  m.add("a", DType::f32, {25});
  m.add("b", DType::f32, {25});
  write_safetensors_sharded(tmp.path(), m.tensors, 1000);
  const std::string before = read_file(tmp / "model.safetensors");
  std::vector<TensorToWrite> failing{
      {"a", DType::f32, {25}, nullptr, [](std::span<std::byte>, std::uint64_t) { throw std::runtime_error("x"); }}};
  EXPECT_THROW(write_safetensors_sharded(tmp.path(), failing, 1000), std::runtime_error);
  EXPECT_EQ(dir_listing(tmp.path()), std::vector<std::string>{"model.safetensors"});
  EXPECT_EQ(read_file(tmp / "model.safetensors"), before);
}

// ---- checkpoint directories: opening and malformed indexes ------------------------------

// A valid two-shard checkpoint to break in various ways: shard1 has a, b; shard2 has c.
void make_two_shards(const fs::path& dir) {
  const float x[2] = {1, 2};
  write_safetensors(dir / "s1.safetensors", std::vector<TensorToWrite>{
                                                {"a", DType::f32, {2}, x, {}},
                                                {"b", DType::f32, {2}, x, {}}});
  write_safetensors(dir / "s2.safetensors",
                    std::vector<TensorToWrite>{{"c", DType::f32, {2}, x, {}}});
}

void write_index(const fs::path& dir, std::string_view text) {
  write_bytes(dir / "model.safetensors.index.json", text);
}

TEST(SafetensorsCheckpoint, OpensAHandWrittenIndexWithCustomShardNames) {
  test::TempDir tmp;
  make_two_shards(tmp.path());
  write_index(tmp.path(),
              R"({"metadata":{"total_size":24},"weight_map":{"a":"s1.safetensors","b":"s1.safetensors","c":"s2.safetensors"}})");
  const auto ck = SafetensorsCheckpoint::open(tmp.path());
  EXPECT_EQ(ck.names(), (std::vector<std::string>{"a", "b", "c"}));
  EXPECT_EQ(ck.total_bytes(), 24u);
  EXPECT_EQ(ck.find("zzz"), nullptr);
  EXPECT_EQ(ck.at("c").file->path(), tmp / "s2.safetensors");
}

TEST(SafetensorsCheckpoint, OpensAPathToASingleSafetensorsFile) {
  test::TempDir tmp;
  make_two_shards(tmp.path());
  const auto ck = SafetensorsCheckpoint::open(tmp / "s1.safetensors");
  EXPECT_FALSE(ck.sharded());
  EXPECT_EQ(ck.names(), (std::vector<std::string>{"a", "b"}));
}

TEST(SafetensorsCheckpoint, PrefersModelSafetensorsOverAnIndexAsTransformersDoes) {
  test::TempDir tmp;
  const std::uint8_t v = 1;
  write_safetensors(tmp / "model.safetensors",
                    std::vector<TensorToWrite>{{"single", DType::u8, {}, &v, {}}});
  write_index(tmp.path(), "not json at all");
  EXPECT_EQ(SafetensorsCheckpoint::open(tmp.path()).names(), std::vector<std::string>{"single"});
}

TEST(SafetensorsCheckpoint, NamesTheDirectoryAndWhatItLookedForWhenEmpty) {
  test::TempDir tmp;
  expect_checkpoint_error(tmp.path(), ErrorKind::io,
                          {tmp.path().string(), "model.safetensors", "model.safetensors.index.json"});
  expect_checkpoint_error(tmp / "nope", ErrorKind::io, {"nope", "does not exist"});
}

TEST(SafetensorsCheckpoint, AtNamesTheCheckpointAndTheMissingTensor) {
  test::TempDir tmp;
  make_two_shards(tmp.path());
  const auto ck = SafetensorsCheckpoint::open(tmp / "s2.safetensors");
  const Error e = error_of([&] { ck.at("lm_head.weight"); });
  EXPECT_EQ(e.kind(), ErrorKind::format);
  EXPECT_NE(std::string(e.what()).find("s2.safetensors"), std::string::npos) << e.what();
  EXPECT_NE(std::string(e.what()).find("lm_head.weight"), std::string::npos) << e.what();
}

TEST(SafetensorsCheckpoint, RejectsAnIndexThatIsNotJson) {
  test::TempDir tmp;
  make_two_shards(tmp.path());
  write_index(tmp.path(), R"({"weight_map":{"a":"s1.safetensors")");
  expect_checkpoint_error(tmp.path(), ErrorKind::format,
                          {"model.safetensors.index.json", "not valid JSON"});
  write_index(tmp.path(), R"(["weight_map"])");
  expect_checkpoint_error(tmp.path(), ErrorKind::format,
                          {"model.safetensors.index.json", "not a JSON object"});
}

TEST(SafetensorsCheckpoint, RejectsAnIndexWithoutAWeightMap) {
  test::TempDir tmp;
  make_two_shards(tmp.path());
  write_index(tmp.path(), R"({"metadata":{"total_size":24}})");
  expect_checkpoint_error(tmp.path(), ErrorKind::format,
                          {"model.safetensors.index.json", "missing \"weight_map\""});
  write_index(tmp.path(), R"({"weight_map":["s1.safetensors"]})");
  expect_checkpoint_error(tmp.path(), ErrorKind::format, {"\"weight_map\" is not an object"});
  write_index(tmp.path(), R"({"weight_map":{"a":1}})");
  expect_checkpoint_error(tmp.path(), ErrorKind::format, {"weight_map entry 'a'", "not a string"});
}

TEST(SafetensorsCheckpoint, RejectsAMissingShardFile) {
  test::TempDir tmp;
  make_two_shards(tmp.path());
  write_index(tmp.path(),
              R"({"weight_map":{"a":"s1.safetensors","b":"s1.safetensors","c":"s3.safetensors"}})");
  expect_checkpoint_error(tmp.path(), ErrorKind::format,
                          {"model.safetensors.index.json", "s3.safetensors", "missing", "'c'"});
}

TEST(SafetensorsCheckpoint, RejectsAWeightMapEntryAbsentFromItsShard) {
  test::TempDir tmp;
  make_two_shards(tmp.path());
  write_index(tmp.path(),
              R"({"weight_map":{"a":"s1.safetensors","b":"s1.safetensors","c":"s1.safetensors"}})");
  expect_checkpoint_error(tmp.path(), ErrorKind::format,
                          {"model.safetensors.index.json", "tensor 'c'", "s1.safetensors",
                           "no such tensor"});
}

TEST(SafetensorsCheckpoint, RejectsTheSameTensorInTwoShards) {
  test::TempDir tmp;
  const float x[2] = {1, 2};
  make_two_shards(tmp.path());
  write_safetensors(tmp / "s2.safetensors", std::vector<TensorToWrite>{
                                                {"b", DType::f32, {2}, x, {}},
                                                {"c", DType::f32, {2}, x, {}}});
  write_index(tmp.path(),
              R"({"weight_map":{"a":"s1.safetensors","b":"s1.safetensors","c":"s2.safetensors"}})");
  expect_checkpoint_error(tmp.path(), ErrorKind::format,
                          {"tensor 'b'", "two shards", "s1.safetensors", "s2.safetensors"});
}

// weight_map may spell one shard "./s1.safetensors" and "s1.safetensors": one file, not
// "tensor 'a' is in two shards".
TEST(SafetensorsCheckpoint, OneShardSpelledTwoWaysIsOneShard) {
  test::TempDir tmp;
  make_two_shards(tmp.path());
  write_index(tmp.path(),
              R"({"weight_map":{"a":"./s1.safetensors","b":"s1.safetensors","c":".//s2.safetensors"}})");
  const auto ck = SafetensorsCheckpoint::open(tmp.path());
  EXPECT_EQ(ck.names(), (std::vector<std::string>{"a", "b", "c"}));
  EXPECT_EQ(ck.num_files(), 2u);
  EXPECT_EQ(ck.at("a").file, ck.at("b").file);
}

TEST(SafetensorsCheckpoint, RejectsATensorListedTwiceInTheWeightMap) {
  test::TempDir tmp;
  make_two_shards(tmp.path());
  write_index(tmp.path(),
              R"({"weight_map":{"a":"s1.safetensors","b":"s1.safetensors","c":"s2.safetensors","a":"s2.safetensors"}})");
  expect_checkpoint_error(tmp.path(), ErrorKind::format, {"duplicate key 'a'"});
}

TEST(SafetensorsCheckpoint, RejectsAnAbsoluteShardFileName) {
  test::TempDir tmp;
  make_two_shards(tmp.path());
  write_index(tmp.path(), fmt::format(R"({{"weight_map":{{"a":"{}","b":"s1.safetensors"}}}})",
                                      (tmp / "s1.safetensors").string()));
  expect_checkpoint_error(tmp.path(), ErrorKind::format,
                          {"model.safetensors.index.json", "'a'", "absolute"});
}

TEST(SafetensorsCheckpoint, RejectsAShardFileNameWithDotDot) {
  test::TempDir tmp;
  fs::create_directory(tmp / "ck");
  make_two_shards(tmp.path());
  write_index(tmp / "ck", R"({"weight_map":{"a":"../s1.safetensors"}})");
  expect_checkpoint_error(tmp / "ck", ErrorKind::format,
                          {"model.safetensors.index.json", "'a'", "\"..\""});
  write_index(tmp / "ck", R"({"weight_map":{"a":"sub/../../s1.safetensors"}})");
  expect_checkpoint_error(tmp / "ck", ErrorKind::format, {"\"..\""});
}

TEST(SafetensorsCheckpoint, ReportsAMalformedShardByItsOwnPath) {
  test::TempDir tmp;
  make_two_shards(tmp.path());
  write_bytes(tmp / "s2.safetensors", raw_file("{}", "junk"));
  write_index(tmp.path(),
              R"({"weight_map":{"a":"s1.safetensors","b":"s1.safetensors","c":"s2.safetensors"}})");
  expect_checkpoint_error(tmp.path(), ErrorKind::format, {"s2.safetensors", "unused bytes"});
}

// ---- the golden checkpoints written by Hugging Face safetensors -------------------------

TEST(SafetensorsGolden, ReadsTheOptTinyCheckpoint) {
  const fs::path dir = test::shared_dir() / "golden" / "opt-tiny";
  if (!fs::exists(dir / "model.safetensors")) GTEST_SKIP() << "no golden data at " << dir;
  const auto ck = SafetensorsCheckpoint::open(dir);
  EXPECT_FALSE(ck.sharded());
  EXPECT_EQ(ck.names().size(), 36u);
  EXPECT_EQ(ck.file(0).metadata().at("format"), "pt");
  const auto& emb = *ck.at("model.decoder.embed_tokens.weight").info;
  EXPECT_EQ(emb.dtype, DType::f32);
  EXPECT_EQ(emb.shape, (std::vector<std::int64_t>{512, 64}));
  const auto& pos = *ck.at("model.decoder.embed_positions.weight").info;
  EXPECT_EQ(pos.shape, (std::vector<std::int64_t>{66, 64}));
  EXPECT_EQ(pos.begin, 0u);
  EXPECT_EQ(ck.total_bytes(), ck.file(0).data_size());
  EXPECT_EQ(ck.total_bytes() + 8 + ck.file(0).header_size(), fs::file_size(dir / "model.safetensors"));
  // Every tensor's bytes are finite floats (a sanity check that the offsets are right).
  for (const auto& t : ck.file(0).tensors()) {
    const auto b = ck.file(0).read(t);
    for (std::size_t i = 0; i < b.size(); i += 4) {
      float v;
      std::memcpy(&v, b.data() + i, 4);
      ASSERT_TRUE(std::isfinite(v)) << t.name;
    }
  }
}

TEST(SafetensorsGolden, OpensEveryGoldenFile) {
  const fs::path root = test::shared_dir() / "golden";
  if (!fs::exists(root)) GTEST_SKIP() << "no golden data at " << root;
  int files = 0;
  for (const auto& d : fs::directory_iterator(root)) {
    if (!d.is_directory()) continue;
    SCOPED_TRACE(d.path().string());
    EXPECT_GT(SafetensorsCheckpoint::open(d.path()).names().size(), 0u);
    const auto golden = SafetensorsFile::open(d.path() / "golden.safetensors");
    EXPECT_NE(golden.find("logits"), nullptr);
    EXPECT_EQ(golden.at("input_ids").dtype, DType::i64);
    ++files;
  }
  EXPECT_GE(files, 3);
}

TEST(SafetensorsGolden, RewritingAGoldenModelReproducesItByteForByte) {
  const fs::path root = test::shared_dir() / "golden";
  if (!fs::exists(root)) GTEST_SKIP() << "no golden data at " << root;
  test::TempDir tmp;
  for (const char* name : {"opt-tiny", "opt-tiny-postln", "llama-tiny"}) {
    SCOPED_TRACE(name);
    const fs::path src = root / name / "model.safetensors";
    const auto f = SafetensorsFile::open(src);
    std::vector<TensorToWrite> tensors;
    std::vector<std::vector<std::byte>> data;  // what the tensors point at
    data.reserve(f.tensors().size());
    for (const auto& t : f.tensors())
      tensors.push_back({t.name, t.dtype, t.shape, data.emplace_back(f.read(t)).data(), {}});
    const fs::path out = tmp / (std::string(name) + ".safetensors");
    write_safetensors(out, tensors, f.metadata());
    EXPECT_EQ(read_file(out), read_file(src));
  }
}


// ---- fp8 e5m2 checkpoints --------------------------------------------------------------

// A copy of the model directory `from` as `to` whose tensor `name` is replaced by `bytes` of
// dtype dt (same shape).
void replace_tensor(const fs::path& from, const fs::path& to, const std::string& name, DType dt,
                    const std::vector<std::uint8_t>& bytes) {
  fs::copy(from, to, fs::copy_options::recursive);
  const SafetensorsFile f = SafetensorsFile::open(from / "model.safetensors");
  std::vector<TensorToWrite> tensors;
  std::vector<std::vector<std::byte>> data;  // what the tensors point at
  data.reserve(f.tensors().size());
  for (const TensorInfo& t : f.tensors()) {
    if (t.name == name)
      tensors.push_back({t.name, dt, t.shape, bytes.data(), {}});
    else
      tensors.push_back({t.name, t.dtype, t.shape, data.emplace_back(f.read(t)).data(), {}});
  }
  write_safetensors(to / "model.safetensors", tensors, f.metadata());
}

// opt-tiny (seed 1) in tmp/base and 8 rows of synthetic data beside it.
struct TinyCheckpoint {
  test::TempDir tmp;
  std::string tune = test::zo2_tune_path().string();
  fs::path base = tmp / "base";
  std::string data = (tmp / "d.safetensors").string();
  TinyCheckpoint() {
    std::string out;
    EXPECT_EQ(test::run_command(tune + " init --preset opt-tiny --out " + base.string() + " --seed 1 -q", &out), 0) << out;
    EXPECT_EQ(test::run_command(tune + " synth-data --model " + base.string() + " --out " + data + " --rows 8 --seq 16 -q",
                                &out),
              0)
        << out;
  }
};

// README: a checkpoint may hold any float dtype. An F8_E5M2 tensor was refused with "no
// conversion from fp8_e5m2 to fp32", naming neither file nor tensor. It loads into every
// storage dtype, exactly as the same values in F32 do, and its infinity and NaN encodings
// are refused like any non-finite weight, naming the tensor and the element.
TEST(SafetensorsCheckpoint, AnF8E5m2TensorIsReadExactlyAndItsNonFiniteCodesAreRefusedByName) {
  TinyCheckpoint w;
  const fs::path& tmp = w.tmp.path();
  const std::string& tune = w.tune;
  const fs::path& base = w.base;
  const std::string& data = w.data;
  std::string out;
  const std::string name = "model.decoder.layers.0.fc1.weight";
  std::int64_t n = 0, cols = 0;
  {
    const SafetensorsFile f = SafetensorsFile::open(base / "model.safetensors");
    n = f.at(name).numel();
    cols = f.at(name).shape.back();
  }
  // Weights of 2^-8 .. 1.75·2^-5 in magnitude, both signs, and a few subnormals and zeros.
  std::vector<std::uint8_t> e5(static_cast<std::size_t>(n));
  std::vector<float> f32(e5.size());
  for (std::size_t i = 0; i < e5.size(); ++i) {
    const auto code = static_cast<std::uint8_t>(i % 97 == 0 ? i % 4 : 0x1c + (i * 7) % 16);
    e5[i] = static_cast<std::uint8_t>(code | (i % 3 == 0 ? 0x80 : 0));
    f32[i] = e5m2_to_f32(e5[i]);
  }
  std::vector<std::uint8_t> f32_bytes(f32.size() * 4);
  std::memcpy(f32_bytes.data(), f32.data(), f32_bytes.size());
  replace_tensor(base, tmp / "e5", name, DType::f8_e5m2, e5);
  replace_tensor(base, tmp / "f32", name, DType::f32, f32_bytes);
  auto eval = [&](const fs::path& model, const std::string& storage, std::string* o) {
    o->clear();
    return test::run_command(tune + " eval --model " + model.string() + " --data " + data + " --storage-dtype " + storage,
                             o);
  };
  for (const char* sd : {"fp32", "bf16", "fp16", "fp8"}) {
    std::string a, b;
    ASSERT_EQ(eval(tmp / "e5", sd, &a), 0) << sd << ": " << a;
    ASSERT_EQ(eval(tmp / "f32", sd, &b), 0) << sd << ": " << b;
    EXPECT_NE(a.find("eval: loss "), std::string::npos) << a;
    EXPECT_EQ(a, b) << sd << ": the e5m2 values are read exactly";
  }
  // 0x7C is +inf, 0xFF a NaN: refused at load, naming the tensor and the element.
  for (const std::uint8_t bad : {std::uint8_t{0x7c}, std::uint8_t{0xff}}) {
    std::vector<std::uint8_t> b = e5;
    b[static_cast<std::size_t>(cols + 5)] = bad;
    const fs::path m = tmp / ("bad" + std::to_string(bad));
    replace_tensor(base, m, name, DType::f8_e5m2, b);
    for (const char* sd : {"fp32", "bf16", "fp8"}) {
      EXPECT_EQ(eval(m, sd, &out), 1) << sd << ": " << out;
      EXPECT_NE(out.find("tensor '" + name + "' in model.safetensors holds a non-finite weight (element [1, 5] = " +
                         (bad == 0x7c ? "inf" : "") ),
                std::string::npos)
          << sd << ": " << out;
    }
  }
}


// A finite weight that the storage dtype cannot hold is refused naming the storage's true
// largest value (bf16's is 3.3895313892515355e38, not 3.4e38) and a storage that holds it.
TEST(SafetensorsCheckpoint, AWeightBeyondTheStorageRangeIsRefusedWithTheTrueMaximum) {
  TinyCheckpoint w;
  const std::string& tune = w.tune;
  const fs::path& base = w.base;
  const std::string& data = w.data;
  std::string out;
  const std::string name = "model.decoder.layers.0.fc2.weight";
  test::poke_safetensors(base / "model.safetensors", name, 5, std::numeric_limits<float>::max());
  auto eval = [&](const std::string& storage) {
    out.clear();
    return test::run_command(tune + " eval --model " + base.string() + " --data " + data + " --storage-dtype " + storage,
                             &out);
  };
  EXPECT_EQ(eval("bf16"), 1) << out;
  EXPECT_NE(out.find("tensor '" + name + "' in model.safetensors: element [0, 5] = 3.4028234663852886e+38 overflows "
                     "bf16 storage (max 3.3895313892515355e+38); fp32 storage holds it"),
            std::string::npos)
      << out;
  EXPECT_EQ(eval("fp16"), 1) << out;
  EXPECT_NE(out.find("overflows fp16 storage (max 65504); fp32 storage holds it"), std::string::npos) << out;
  EXPECT_EQ(eval("fp32"), 0) << out;
  test::poke_safetensors(base / "model.safetensors", name, 5, 1e6f);  // bf16 holds this one
  EXPECT_EQ(eval("fp16"), 1) << out;
  EXPECT_NE(out.find("element [0, 5] = 1000000 overflows fp16 storage (max 65504); fp32 or bf16 storage holds it"),
            std::string::npos)
      << out;
}

}  // namespace
}  // namespace zo2
