#include "tests/test_util.h"
#include "tests/fault/seccomp_deny.h"

#include "runtime/dtype_convert.h"

#include <nlohmann/json.hpp>

#include <array>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
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

void poke_safetensors(const std::filesystem::path& file, const std::string& tensor, std::int64_t element,
                      float value) {
  std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
  if (!f) throw std::runtime_error("poke_safetensors: cannot open " + file.string());
  std::uint64_t header_len = 0;
  f.read(reinterpret_cast<char*>(&header_len), 8);
  std::string header(header_len, '\0');
  f.read(header.data(), static_cast<std::streamsize>(header_len));
  const auto j = nlohmann::json::parse(header);
  if (!j.contains(tensor)) throw std::runtime_error("poke_safetensors: no tensor " + tensor + " in " + file.string());
  const std::string dtype = j[tensor]["dtype"];
  const std::uint64_t begin = j[tensor]["data_offsets"][0];
  std::array<char, 4> bytes{};
  std::size_t size = 4;
  if (dtype == "F32") {
    std::memcpy(bytes.data(), &value, 4);
  } else if (dtype == "BF16" || dtype == "F16") {
    const std::uint16_t h = dtype == "BF16" ? f32_to_bf16(value) : f32_to_f16(value);
    std::memcpy(bytes.data(), &h, 2);
    size = 2;
  } else {
    throw std::runtime_error("poke_safetensors: tensor " + tensor + " is " + dtype);
  }
  f.seekp(static_cast<std::streamoff>(8 + header_len + begin + static_cast<std::uint64_t>(element) * size));
  f.write(bytes.data(), static_cast<std::streamsize>(size));
  if (!f) throw std::runtime_error("poke_safetensors: cannot write " + file.string());
}

std::filesystem::path zo2_tune_path() {
  if (const char* env = std::getenv("ZO2_TUNE"); env && *env) return env;
  std::filesystem::path p = ZO2_TUNE_PATH;
  if (!std::filesystem::exists(p)) p = "zo2-tune";  // the GPU pack puts it on PATH
  return p;
}

std::int64_t hidden_size(const std::filesystem::path& dir) {
  std::ifstream in(dir / "config.json");
  return nlohmann::json::parse(in).at("hidden_size").get<std::int64_t>();
}

void copy_with_filled_tensor(const std::filesystem::path& from, const std::filesystem::path& to,
                             const std::string& tensor, float value) {
  std::filesystem::copy(from, to);
  for (std::int64_t e = 0; e < hidden_size(to); ++e) poke_safetensors(to / "model.safetensors", tensor, e, value);
}

int in_child(const std::function<int()>& fn) {
  const pid_t child = ::fork();
  if (child == 0) {
    int rc = 98;
    try {
      rc = fn();
    } catch (...) {
    }
    ::_exit(rc);
  }
  int status = 0;
  if (child < 0 || ::waitpid(child, &status, 0) != child) return 97;
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

bool deny_syscalls(std::initializer_list<std::pair<long, int>> calls) {
  std::vector<long> nrs;
  std::vector<int> errs;
  for (const auto& [nr, err] : calls) {
    nrs.push_back(nr);
    errs.push_back(err);
  }
  return zo2_deny_syscalls(nrs.data(), errs.data(), static_cast<int>(nrs.size())) == 0;
}

std::string read_file(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_file(const std::filesystem::path& p, std::string_view text) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out << text;
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
