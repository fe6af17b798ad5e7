#include "tests/test_util.h"

#include <array>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <sys/wait.h>

namespace zo2::test {

std::filesystem::path shared_dir() {
  if (const char* env = std::getenv("ZO2_SHARED_DIR"); env && *env) return env;
  return ZO2_DEFAULT_SHARED_DIR;
}

TempDir::TempDir() {
  std::random_device rd;
  auto base = std::filesystem::temp_directory_path();
  for (;;) {
    path_ = base / ("zo2-test-" + std::to_string(rd()));
    if (std::filesystem::create_directory(path_)) break;
  }
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

std::filesystem::path zo2_tune_path() {
  if (const char* env = std::getenv("ZO2_TUNE"); env && *env) return env;
  std::filesystem::path p = ZO2_TUNE_PATH;
  if (!std::filesystem::exists(p)) p = "zo2-tune";  // the GPU pack puts it on PATH
  return p;
}

int run_command(const std::string& command, std::string* output) {
  std::string cmd = command + " 2>&1";
  FILE* pipe = popen(cmd.c_str(), "r");
  if (!pipe) return -1;
  std::array<char, 4096> buf;
  std::size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), pipe)) > 0)
    if (output) output->append(buf.data(), n);
  int status = pclose(pipe);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

}  // namespace zo2::test
