#include "tests/device_fixture.h"

namespace zo2::test {

std::vector<std::string> backend_names() { return {"cpu", "cuda"}; }

std::string backend_test_name(const ::testing::TestParamInfo<std::string>& info) {
  return info.param == "cpu" ? "Cpu" : "Cuda";
}

void BackendTest::SetUp() {
  if (GetParam() == "cuda" && cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  DeviceOptions o;
  o.kind = GetParam() == "cpu" ? DeviceKind::cpu : DeviceKind::cuda;
  o.mem_cap = std::size_t{512} << 20;
  device = make_device(o);
  stream = device->make_stream("test");
}

void BackendTest::TearDown() {
  if (stream) stream->synchronize();
  stream.reset();
}

StoredTensor tile(const StoredTensor& w, std::int64_t r0, std::int64_t r1) {
  StoredTensor t = w;
  t.data = static_cast<char*>(w.data) + r0 * w.cols * static_cast<std::int64_t>(dtype_size(w.dtype));
  if (w.row_scales != nullptr) t.row_scales = w.row_scales + r0;
  t.rows = r1 - r0;
  t.first_row = w.first_row + r0;
  return t;
}

}  // namespace zo2::test
