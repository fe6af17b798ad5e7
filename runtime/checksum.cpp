#include "runtime/checksum.h"

#include "runtime/error.h"
#include "runtime/file_util.h"

#include <tbb/parallel_for.h>
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <vector>

namespace zo2 {
namespace {

constexpr std::size_t kChunk = std::size_t{8} << 20;  // 8 MiB: big enough that combining is free

// zlib takes uInt lengths: feed it in pieces below 4 GiB.
std::uint32_t crc_serial(std::uint32_t crc, const std::byte* p, std::size_t n) {
  uLong c = crc;
  while (n > 0) {
    const auto piece = static_cast<uInt>(std::min<std::size_t>(n, std::size_t{1} << 30));
    c = ::crc32(c, reinterpret_cast<const Bytef*>(p), piece);
    p += piece;
    n -= piece;
  }
  return static_cast<std::uint32_t>(c);
}

}  // namespace

std::uint32_t crc32_update(std::uint32_t crc, std::span<const std::byte> bytes) {
  if (bytes.size() <= 2 * kChunk) return crc_serial(crc, bytes.data(), bytes.size());
  const std::size_t chunks = (bytes.size() + kChunk - 1) / kChunk;
  std::vector<std::uint32_t> part(chunks);
  tbb::parallel_for(std::size_t{0}, chunks, [&](std::size_t i) {
    const std::size_t b = i * kChunk, n = std::min(kChunk, bytes.size() - b);
    part[i] = crc_serial(0, bytes.data() + b, n);
  });
  uLong c = crc;
  for (std::size_t i = 0; i < chunks; ++i) {
    const std::size_t n = std::min(kChunk, bytes.size() - i * kChunk);
    c = ::crc32_combine(c, part[i], static_cast<z_off_t>(n));
  }
  return static_cast<std::uint32_t>(c);
}

std::uint32_t crc32_combine(std::uint32_t crc_a, std::uint32_t crc_b, std::uint64_t len_b) {
  return static_cast<std::uint32_t>(::crc32_combine(crc_a, crc_b, static_cast<z_off_t>(len_b)));
}

std::uint32_t crc32_file(const std::filesystem::path& path, std::uint64_t limit) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(ErrorKind::io, "{}: cannot open: {}", path.string(), std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int e = errno;
    ::close(fd);
    fail(ErrorKind::io, "{}: cannot stat: {}", path.string(), std::strerror(e));
  }
  const auto size = static_cast<std::uint64_t>(st.st_size);
  const std::uint64_t n = limit == kWholeFile ? size : limit;
  if (n > size) {
    ::close(fd);
    fail(ErrorKind::format, "{}: {} bytes, shorter than the {} bytes recorded for it", path.string(), size, n);
  }
  if (n == 0) {
    ::close(fd);
    return 0;
  }
  // Read, not mapped: a file truncated meanwhile is an error, not a SIGBUS (Note [No mapped
  // reads] in models/safetensors.cpp). Pieces of kChunk are read and summed on every core at
  // once (as the page faults of a mapping were), then combined in order.
  uLong crc = 0;
  try {
    const std::uint64_t chunks = (n + kChunk - 1) / kChunk;
    std::vector<std::uint32_t> part(static_cast<std::size_t>(chunks));
    tbb::parallel_for(std::uint64_t{0}, chunks, [&](std::uint64_t i) {
      const std::uint64_t at = i * kChunk;
      const auto want = static_cast<std::size_t>(std::min<std::uint64_t>(kChunk, n - at));
      std::vector<std::byte> buf(want);
      const std::size_t got = pread_full(fd, buf, at, path.string());
      if (got != want)
        fail(ErrorKind::io, "{}: became shorter while it was read ({} bytes, {} expected)", path.string(), at + got, n);
      part[static_cast<std::size_t>(i)] = crc_serial(0, buf.data(), want);
    });
    for (std::uint64_t i = 0; i < chunks; ++i)
      crc = ::crc32_combine(crc, part[static_cast<std::size_t>(i)],
                            static_cast<z_off_t>(std::min<std::uint64_t>(kChunk, n - i * kChunk)));
  } catch (...) {
    ::close(fd);
    throw;
  }
  ::close(fd);
  return static_cast<std::uint32_t>(crc);
}

}  // namespace zo2
