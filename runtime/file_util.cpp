#include "runtime/file_util.h"

#include "runtime/error.h"

#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <system_error>
#include <unistd.h>

namespace zo2 {

void write_file_atomic(const std::filesystem::path& path, std::string_view contents) {
  const std::filesystem::path tmp = path.string() + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail(ErrorKind::io, "{}: cannot write: {}", tmp.string(), std::strerror(errno));
  auto give_up = [&](const char* what, int err) {
    ::close(fd);
    std::error_code ec;
    std::filesystem::remove(tmp, ec);
    fail(ErrorKind::io, "{}: {} failed: {}", tmp.string(), what, std::strerror(err));
  };
  std::size_t done = 0;
  while (done < contents.size()) {
    const ssize_t n = ::write(fd, contents.data() + done, contents.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) give_up("write", n < 0 ? errno : EIO);
    done += static_cast<std::size_t>(n);
  }
  // On disk before the rename publishes it: a crash never leaves an empty file under `path`.
  if (::fsync(fd) != 0) give_up("fsync", errno);
  if (::close(fd) != 0) {
    const int e = errno;
    std::error_code ec;
    std::filesystem::remove(tmp, ec);
    fail(ErrorKind::io, "{}: close failed: {}", tmp.string(), std::strerror(e));
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::error_code removed;  // its own code: the rename's reason is what the message says
    std::filesystem::remove(tmp, removed);
    fail(ErrorKind::io, "{}: cannot rename to {}: {}", tmp.string(), path.string(), ec.message());
  }
}

}  // namespace zo2
