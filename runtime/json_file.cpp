#include "runtime/json_file.h"

#include "runtime/error.h"

#include <cerrno>
#include <fcntl.h>
#include <sys/stat.h>
#include <system_error>
#include <unistd.h>

namespace zo2 {
namespace {

// Note [Reading JSON]: nlohmann's DOM builder, refusing (returning false, which stops the
// parse) at the first array or object deeper than max_depth. nlohmann's parser calls the
// handler's members through its static type, so these hide the base's.
template <class Json>
class DepthLimitedBuilder : public nlohmann::detail::json_sax_dom_parser<Json> {
  using Base = nlohmann::detail::json_sax_dom_parser<Json>;

 public:
  DepthLimitedBuilder(Json& root, int max_depth) : Base(root, /*allow_exceptions_=*/true), max_depth_(max_depth) {}

  bool start_object(std::size_t n) { return deeper() && Base::start_object(n); }
  bool end_object() {
    --depth_;
    return Base::end_object();
  }
  bool start_array(std::size_t n) { return deeper() && Base::start_array(n); }
  bool end_array() {
    --depth_;
    return Base::end_array();
  }

  bool too_deep() const { return too_deep_; }

 private:
  bool deeper() {
    if (++depth_ <= max_depth_) return true;
    too_deep_ = true;
    return false;
  }

  int max_depth_;
  int depth_ = 0;
  bool too_deep_ = false;
};

template <class Json>
Json parse_limited(std::string_view text, std::string_view where, int max_depth) {
  Json j;
  DepthLimitedBuilder<Json> builder(j, max_depth);
  // Syntax errors throw from the builder (allow_exceptions); false comes only from the limit.
  const bool ok = Json::sax_parse(text.begin(), text.end(), &builder, nlohmann::detail::input_format_t::json,
                                  /*strict=*/true, /*ignore_comments=*/false);
  if (!ok || builder.too_deep()) fail(ErrorKind::format, "{}: nested deeper than {} levels", where, max_depth);
  return j;
}

const char* file_type_name(mode_t m) {
  if (S_ISFIFO(m)) return "a FIFO";
  if (S_ISSOCK(m)) return "a socket";
  if (S_ISCHR(m)) return "a character device";
  if (S_ISBLK(m)) return "a block device";
  return "not a plain file";
}

}  // namespace

nlohmann::json parse_json_text(std::string_view text, std::string_view where, int max_depth) {
  return parse_limited<nlohmann::json>(text, where, max_depth);
}

nlohmann::ordered_json parse_ordered_json_text(std::string_view text, std::string_view where, int max_depth) {
  return parse_limited<nlohmann::ordered_json>(text, where, max_depth);
}

std::string read_regular_file(const std::filesystem::path& path, std::string_view hint) {
  const std::string p = path.string();
  // O_NONBLOCK: opening a FIFO must not wait for a writer; no effect on a regular file.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    const int e = errno;
    fail(ErrorKind::io, "{}: cannot open: {}{}", p, std::system_category().message(e), hint);
  }
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int e = errno;
    fail(ErrorKind::io, "{}: cannot stat: {}", p, std::system_category().message(e));
  }
  if (S_ISDIR(st.st_mode)) fail(ErrorKind::io, "{}: is a directory, not a file", p);
  if (!S_ISREG(st.st_mode)) fail(ErrorKind::io, "{}: is {}, not a regular file", p, file_type_name(st.st_mode));
  std::string out;
  if (st.st_size > 0) out.reserve(static_cast<std::size_t>(st.st_size));
  char buf[1 << 16];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n > 0) {
      out.append(buf, static_cast<std::size_t>(n));
    } else if (n == 0) {
      break;
    } else if (errno != EINTR) {
      const int e = errno;
      fail(ErrorKind::io, "{}: cannot read: {}", p, std::system_category().message(e));
    }
  }
  return out;
}

}  // namespace zo2
