// CRC-32 (zlib's polynomial, as `crc32` in zlib and Python's zlib.crc32) of byte ranges and
// files: the run directory's manifest records one per file (api/run_dir.h) and one for the
// seed log's prefix, so a loader can tell a file that was replaced or torn by name. Large
// inputs are split into chunks hashed in parallel and joined with crc32_combine, so a
// checkpoint of hundreds of GB is checked at memory speed, not at one core's.
#pragma once
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>

namespace zo2 {

// CRC-32 of `bytes` continuing from `crc` (0 for a fresh one).
std::uint32_t crc32_update(std::uint32_t crc, std::span<const std::byte> bytes);

// The CRC-32 of A followed by B, from crc_a = CRC-32 of A, crc_b = CRC-32 of B and B's length
// (zlib's crc32_combine): pieces hashed apart, as they were written, joined in file order.
std::uint32_t crc32_combine(std::uint32_t crc_a, std::uint32_t crc_b, std::uint64_t len_b);

// CRC-32 of the first `limit` bytes of a file (the whole file when limit is npos); Error(io)
// naming the file when it cannot be read or is shorter than `limit`.
inline constexpr std::uint64_t kWholeFile = ~std::uint64_t{0};
std::uint32_t crc32_file(const std::filesystem::path& path, std::uint64_t limit = kWholeFile);

}  // namespace zo2
