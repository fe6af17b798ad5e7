// Helpers shared by the tests: where the shared data lives, temporary directories.
#pragma once
#include "runtime/error.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <exception>
#include <filesystem>
#include <functional>
#include <initializer_list>
#include <string>
#include <string_view>
#include <utility>

namespace zo2::test {

// ../shared by default (set by CMake), or $ZO2_SHARED_DIR when set.
std::filesystem::path shared_dir();
// A fresh empty directory under the system temp dir, removed when the object dies.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }

 private:
  std::filesystem::path path_;
};
// The zo2-tune executable built beside the tests.
std::filesystem::path zo2_tune_path();
// Runs fn, which must throw zo2::Error; returns it (a test failure otherwise).
template <class F>
Error error_of(F&& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "threw a non-zo2 exception: " << e.what();
    return Error(ErrorKind::internal, "<wrong exception>");
  }
  ADD_FAILURE() << "expected a zo2::Error";
  return Error(ErrorKind::internal, "<no error thrown>");
}

// Overwrites element `element` of tensor `tensor` (F32, BF16 or F16) in the safetensors file
// `file` with `value`, in place (a NaN or an infinity injected into a checkpoint).
void poke_safetensors(const std::filesystem::path& file, const std::string& tensor, std::int64_t element,
                      float value);

// hidden_size of the checkpoint in `dir` (its config.json).
std::int64_t hidden_size(const std::filesystem::path& dir);

// A copy of the checkpoint `from` (model.safetensors) at `to` whose tensor `tensor`, of
// hidden_size elements (a norm's weight), holds `value` in every element: finite weights
// that overflow the forward pass.
void copy_with_filled_tensor(const std::filesystem::path& from, const std::filesystem::path& to,
                             const std::string& tensor, float value);

// A whole file's bytes ("" when it cannot be opened), and a file made to hold exactly `text`.
std::string read_file(const std::filesystem::path& p);
void write_file(const std::filesystem::path& p, std::string_view text);

// Runs a shell command, returns its exit status; stdout+stderr go to *output if given.
int run_command(const std::string& command, std::string* output = nullptr);

// Runs fn in a forked child (for process-wide state a test must not leave behind: a locale,
// an rlimit) and returns its result as the child's exit status: 98 when fn threw, 128 + the
// signal when the child was killed.
int in_child(const std::function<int()>& fn);

// From now on, each call {number, errno} of this process and its children fails with that
// errno, as a container's seccomp profile or a file system without the feature makes it
// fail (tests/fault/seccomp_deny.h). Irreversible: call it in in_child. False where the
// kernel has no seccomp filters (the test skips).
bool deny_syscalls(std::initializer_list<std::pair<long, int>> calls);

// Sets an environment variable for one scope and unsets it at the end (also when an
// assertion returns early): the backends read their kernel switches (ZO2_CUDA_ATTENTION,
// ZO2_CUDA_GEMM_EPILOGUE, ZO2_CPU_NOISE) at every call.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) { ::setenv(name, value, 1); }
  ~ScopedEnv() { ::unsetenv(name_); }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  const char* name_;
};

}  // namespace zo2::test
