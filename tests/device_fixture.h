// Test helpers for running ops on every available backend: the CPU always, CUDA when a
// device exists (tests on it skip themselves otherwise).
#pragma once
#include "runtime/device.h"
#include "runtime/ops.h"

#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

namespace zo2::test {

// "cpu" and "cuda": parameters of every backend test.
std::vector<std::string> backend_names();

class BackendTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override;
  void TearDown() override;

  // Device memory holding a copy of `host` (the copy is complete on return).
  template <class T>
  DeviceBuffer upload(const std::vector<T>& host) {
    DeviceBuffer b = device->arena().allocate(host.size() * sizeof(T), "test input");
    stream->copy_h2d(b.data(), host.data(), host.size() * sizeof(T));
    stream->synchronize();
    return b;
  }
  DeviceBuffer zeros(std::size_t bytes) {
    DeviceBuffer b = device->arena().allocate(bytes, "test output");
    stream->memset(b.data(), 0, bytes);
    return b;
  }
  template <class T>
  std::vector<T> download(const DeviceBuffer& b, std::size_t n) {
    std::vector<T> host(n);
    stream->copy_d2h(host.data(), b.data(), n * sizeof(T));
    stream->synchronize();
    return host;
  }
  Ops& ops() { return device->ops(); }
  bool is_cpu() const { return GetParam() == "cpu"; }

  std::unique_ptr<Device> device;
  std::unique_ptr<Stream> stream;
};

std::string backend_test_name(const ::testing::TestParamInfo<std::string>& info);

// Rows [r0, r1) of w as a tile (StoredTensor::first_row): data and row scales shifted to row
// r0, as sub-block streaming hands a tile to the ops.
StoredTensor tile(const StoredTensor& w, std::int64_t r0, std::int64_t r1);

}  // namespace zo2::test
