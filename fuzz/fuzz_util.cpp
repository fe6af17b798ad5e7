#include "fuzz/fuzz_util.h"

#include "runtime/log.h"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <fstream>

namespace zo2::fuzz {

namespace {
std::filesystem::path make_scratch() {
  std::string tmpl = (std::filesystem::temp_directory_path() / "zo2-fuzz-XXXXXX").string();
  if (!mkdtemp(tmpl.data())) {
    std::perror("zo2 fuzz: mkdtemp");
    std::abort();
  }
  return tmpl;
}

struct Scratch {
  std::filesystem::path dir = make_scratch();
  ~Scratch() {
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }
};
}  // namespace

const std::filesystem::path& scratch_dir() {
  static Scratch s;
  return s.dir;
}

void write_file(const std::filesystem::path& path, std::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out.close();
  if (!out) {
    std::fprintf(stderr, "zo2 fuzz: cannot write %s\n", path.c_str());
    std::abort();
  }
}

std::filesystem::path scratch_file(const std::string& name, std::string_view bytes) {
  auto path = scratch_dir() / name;
  write_file(path, bytes);
  return path;
}

std::vector<std::string_view> split_input(const std::uint8_t* data, std::size_t size, std::size_t count) {
  std::string_view rest(reinterpret_cast<const char*>(data), size);
  std::vector<std::string_view> parts;
  while (parts.size() + 1 < count) {
    const auto nul = rest.find('\0');
    if (nul == std::string_view::npos) break;
    parts.push_back(rest.substr(0, nul));
    rest.remove_prefix(nul + 1);
  }
  parts.push_back(rest);
  parts.resize(count);
  return parts;
}

void rejected(const std::exception& e) {
  static const bool verbose = std::getenv("ZO2_FUZZ_VERBOSE") != nullptr;
  if (verbose) std::fprintf(stderr, "rejected: %s\n", e.what());
}

void silence_log() {
  log_set_sink([](LogLevel, std::string_view) {});
}

std::filesystem::path source_dir() { return ZO2_FUZZ_SOURCE_DIR; }

}  // namespace zo2::fuzz
