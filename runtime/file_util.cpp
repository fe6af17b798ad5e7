#include "runtime/file_util.h"

#include "runtime/error.h"

#include <fstream>
#include <system_error>

namespace zo2 {

void write_file_atomic(const std::filesystem::path& path, std::string_view contents) {
  const std::filesystem::path tmp = path.string() + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) fail(ErrorKind::io, "{}: cannot write", tmp.string());
    out.write(contents.data(), static_cast<std::streamsize>(contents.size()));
    if (!out.flush()) {
      std::error_code ec;
      std::filesystem::remove(tmp, ec);
      fail(ErrorKind::io, "{}: write failed", tmp.string());
    }
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::filesystem::remove(tmp, ec);
    fail(ErrorKind::io, "{}: cannot rename to {}: {}", tmp.string(), path.string(), ec.message());
  }
}

}  // namespace zo2
