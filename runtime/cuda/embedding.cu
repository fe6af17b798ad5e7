// Embedding gather with the perturbation fused in — the twin of embedding in
// runtime/cpu/kernels.cpp.
//
// Design: one block per output row (grid-stride over rows). A thread takes one group of
// four table elements at a time (Note [Noise stream layout] in runtime/philox.h: one
// Philox call gives the normals of elements 4q .. 4q+3 of the tensor), so the noise costs
// one noise_normal4 per four elements even when a row's length is not a multiple of four
// (a group straddling two table rows is simply evaluated by both rows' blocks). The value
// is load_element(...) and perturbed(w, z, sign·eps) from runtime/element.h — the CPU's
// own functions — so the rows equal the CPU's bit for bit. Ids outside the table give a
// zero row.
#include "runtime/cuda/kernel_util.cuh"
#include "runtime/cuda/kernels.h"
#include "runtime/element.h"

namespace zo2::cuda {
namespace {

constexpr int kThreads = 128;

template <class E>
__global__ void __launch_bounds__(kThreads)
    embedding_kernel(const void* table, DType table_dtype, const float* row_scales,
                     std::int64_t table_rows, std::int64_t cols, std::uint64_t key,
                     const std::int32_t* ids, std::int64_t n, typename E::T* out,
                     std::int64_t ldo, bool noise, std::uint64_t seed, float signed_eps) {
  for (std::int64_t r = blockIdx.x; r < n; r += gridDim.x) {
    const std::int64_t id = ids[r];
    typename E::T* orow = out + r * ldo;
    if (id < 0 || id >= table_rows) {
      for (std::int64_t c = threadIdx.x; c < cols; c += blockDim.x) orow[c] = E::store(0.0f);
      continue;
    }
    const float scale = row_scales != nullptr ? row_scales[id] : 1.0f;
    const std::int64_t base = id * cols, end = base + cols;
    for (std::int64_t q = base / 4 + threadIdx.x; q * 4 < end; q += blockDim.x) {
      Normal4 z{};
      if (noise) z = noise_normal4(seed, key, static_cast<std::uint64_t>(q));
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const std::int64_t e = q * 4 + j;
        if (e < base || e >= end) continue;
        float w = load_element(table, table_dtype, e, scale);
        if (noise) w = perturbed(w, z.v[j], signed_eps);
        orow[e - base] = E::store(w);
      }
    }
  }
}

}  // namespace

void embedding(KernelStream& s, const StoredTensor& table, const std::int32_t* ids,
               std::int64_t n, const Mat& out, const NoiseArgs* noise, float sign) {
  if (n == 0 || table.cols == 0) return;
  // sign·eps rounded once on the host, as the CPU kernel computes it.
  const float signed_eps = noise != nullptr ? sign * noise->eps : 0.0f;
  dispatch_activation(out.dtype, "embedding", [&](auto e) {
    using E = decltype(e);
    embedding_kernel<E><<<grid_blocks(s, n * kThreads, kThreads), kThreads, 0, s.stream()>>>(
        table.data, table.dtype, table.row_scales, table.rows, table.cols, table.key, ids, n,
        static_cast<typename E::T*>(out.data), out.ld, noise != nullptr,
        noise != nullptr ? noise->seed : 0, signed_eps);
    ZO2_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace zo2::cuda
