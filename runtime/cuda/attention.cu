// Causal, padding-masked, grouped-query softmax attention — the twin of attention in
// runtime/cpu/kernels.cpp, built the same way: query tiles, two GEMMs around a softmax.
//
// Design (Note [Attention by query chunks]):
//   For a chunk of query rows [q0, q1) and a group of n (batch, head) pairs:
//     1. a tiny kernel writes the batch's pointer arrays (GQA: head h reads kv head
//        h / (heads / kv_heads), so the K/V pointers are not a fixed stride apart);
//     2. S_i = scale · Q_i K_iᵀ  — one cublasGemmBatchedEx, fp32 output, over the keys a
//        row of the chunk can see (causal: [0, q1); otherwise all T);
//     3. a softmax kernel, one block per score row, masks (causal, key padding), takes the
//        row max, Σexp(s − max) in fp32 with a fixed reduction tree, and writes
//        P = exp(s − max)/Σ in the input dtype IN PLACE over S (see below); a row with no
//        visible key gets P = 0, hence a zero output row, as on the CPU;
//     4. O_i = P_i V_i  — a second batched GEMM (fp32 accumulation) writing the output in
//        the input dtype straight into its [tokens, heads·head_dim] place.
//   Each pair's scores start on a 256-byte boundary (kPairAlign floats apart): cuBLAS
//   cannot see the pointers inside a batched call's arrays and assumes them aligned to 16
//   bytes when k % 8 == 0 (cuBLAS docs, cublasGemmBatchedEx), and nq·tk is often odd.
//   Memory: the scores of one chunk live in a scratch owned by the stream (from the arena)
//   whose size is bounded by kScoreBudget however long the sequence: the chunk height and
//   the number of (batch, head) pairs per GEMM are chosen from the shape alone, never
//   B·H·T² for large T. Everything is deterministic: the chunking depends only on the
//   shape, cuBLAS GEMMs are deterministic for a fixed handle, workspace and stream, and
//   the softmax uses no atomics.
//   Why not one fused flash kernel: the GEMMs run on cuBLAS's tensor-core kernels for
//   bf16/fp16 and its exact fp32 SGEMM for fp32 (no TF32, so fp32 matches the CPU to
//   rounding), which a hand-written fused kernel would have to re-derive per head_dim; the
//   price is one round trip of the chunk's scores through L2/HBM.
//
//   In-place P for 16-bit types: P row r is stored at the start of S row r (row stride
//   2·Tk elements of 2 bytes = Tk floats). The softmax reads the whole row in its first two
//   passes (both end at a block barrier) and writes in blockDim-sized chunks with a barrier
//   between the chunk's reads and its writes: chunk c writes bytes [2c, 2c + 2B) of the
//   row, which only the chunk's own, already finished reads (when c = 0) or earlier chunks
//   could touch — never a later chunk's floats at [4c', 4c' + 4B), c' ≥ c + B.
#include "runtime/cuda/kernel_util.cuh"
#include "runtime/cuda/kernels.h"

#include <algorithm>
#include <climits>

namespace zo2::cuda {
namespace {

constexpr std::size_t kScoreBudget = std::size_t{64} << 20;  // bytes of fp32 scores per step
constexpr std::int64_t kMaxChunk = 256;                       // query rows per chunk
constexpr int kSoftmaxThreads = 256;
constexpr std::int64_t kPairAlign = 64;  // floats: 256 bytes between pairs' score blocks

cudaDataType cuda_type(DType dt) {
  switch (dt) {
    case DType::f32: return CUDA_R_32F;
    case DType::bf16: return CUDA_R_16BF;
    default: return CUDA_R_16F;
  }
}

struct PointerArgs {
  const char* q;
  const char* k;
  const char* v;
  char* out;
  float* scores;
  void** arrays;  // [5][n]: K, Q, S (= P), V, O
  int n;          // pairs in this group
  int pair0;      // first (batch·heads + head) index of the group
  int heads;
  int group;  // heads per kv head
  std::int64_t seq;
  std::int64_t q0;
  std::int64_t nq;
  std::int64_t tk;
  std::int64_t pair_stride;  // floats between consecutive pairs' scores
  std::int64_t ldq, ldk, ldv, ldo;  // in elements
  std::int64_t head_dim;
  std::int64_t esize;
};

__global__ void attention_pointers_kernel(PointerArgs a) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= a.n) return;
  const int pair = a.pair0 + i;
  const std::int64_t b = pair / a.heads, h = pair % a.heads, kvh = h / a.group;
  const std::int64_t row0 = b * a.seq;
  a.arrays[i] = const_cast<char*>(a.k + (row0 * a.ldk + kvh * a.head_dim) * a.esize);
  a.arrays[a.n + i] = const_cast<char*>(a.q + ((row0 + a.q0) * a.ldq + h * a.head_dim) * a.esize);
  a.arrays[2 * a.n + i] = a.scores + static_cast<std::int64_t>(i) * a.pair_stride;
  a.arrays[3 * a.n + i] = const_cast<char*>(a.v + (row0 * a.ldv + kvh * a.head_dim) * a.esize);
  a.arrays[4 * a.n + i] = a.out + ((row0 + a.q0) * a.ldo + h * a.head_dim) * a.esize;
}

template <class E>
__global__ void __launch_bounds__(kSoftmaxThreads)
    attention_softmax_kernel(float* scores, std::int64_t rows, std::int64_t nq, std::int64_t tk,
                             std::int64_t pair_stride, std::int64_t q0, bool causal,
                             const std::int32_t* key_mask, std::int64_t seq, int pair0,
                             int heads) {
  __shared__ float smem[32];
  const float kNegInf = -__int_as_float(0x7f800000);
  for (std::int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const std::int64_t local = row / nq, i = row % nq, t = q0 + i;
    const std::int64_t b = (pair0 + local) / heads;
    float* srow = scores + local * pair_stride + i * tk;
    const float* s = srow;
    typename E::T* p = reinterpret_cast<typename E::T*>(srow);
    const std::int32_t* mask = key_mask != nullptr ? key_mask + b * seq : nullptr;
    const std::int64_t last = causal ? t : tk - 1;  // last key this row may see
    auto visible = [&](std::int64_t j) { return j <= last && (mask == nullptr || mask[j] != 0); };

    float mx = kNegInf;
    for (std::int64_t j = threadIdx.x; j < tk; j += blockDim.x)
      if (visible(j)) mx = fmaxf(mx, s[j]);
    mx = block_max(mx, smem);
    const bool empty = mx == kNegInf;  // no visible key: P = 0, a zero output row
    float inv = 0.0f;
    if (!empty) {
      float sum = 0.0f;
      for (std::int64_t j = threadIdx.x; j < tk; j += blockDim.x)
        if (visible(j)) sum = __fadd_rn(sum, expf(__fsub_rn(s[j], mx)));
      sum = block_sum(sum, smem);
      inv = __fdiv_rn(1.0f, sum);
    }
    for (std::int64_t c0 = 0; c0 < tk; c0 += blockDim.x) {
      const std::int64_t j = c0 + threadIdx.x;
      float v = 0.0f;
      if (!empty && j < tk && visible(j)) v = __fmul_rn(expf(__fsub_rn(s[j], mx)), inv);
      if constexpr (sizeof(typename E::T) < sizeof(float)) __syncthreads();
      if (j < tk) p[j] = E::store(v);
    }
    // The next row's passes touch another row, and block_max synchronizes before it
    // reuses smem.
  }
}

}  // namespace

void attention(KernelStream& s, const AttentionArgs& a) {
  const std::int64_t T = a.seq, D = a.head_dim;
  const std::int64_t pairs = std::int64_t{a.batch} * a.heads;
  if (T == 0 || pairs == 0 || D == 0) return;
  const int group = a.heads / a.kv_heads;
  const DType dt = a.q.dtype;
  const std::int64_t esize = static_cast<std::int64_t>(dtype_size(dt));
  // P's row stride in elements: it overlays the fp32 score row (Note above).
  const std::int64_t p_per_float = static_cast<std::int64_t>(sizeof(float)) / esize;

  // Chunk shape from the shape alone: Tq query rows × n pairs × T keys ≤ kScoreBudget.
  const std::int64_t budget = static_cast<std::int64_t>(kScoreBudget / sizeof(float));
  std::int64_t tq = std::min<std::int64_t>(T, kMaxChunk);
  tq = std::max<std::int64_t>(1, std::min(tq, budget / T));
  const std::int64_t per_pair = ceil_div(tq * T, kPairAlign) * kPairAlign;  // padded (Note above)
  const std::int64_t nb = std::clamp<std::int64_t>(budget / per_pair, 1, std::min<std::int64_t>(pairs, INT_MAX / 8));
  if (T > INT_MAX / p_per_float || D > INT_MAX || a.q.ld > INT_MAX || a.k.ld > INT_MAX ||
      a.v.ld > INT_MAX || a.out.ld > INT_MAX)
    throw_unsupported("cuda attention: a dimension does not fit cuBLAS's int arguments");
  const std::size_t pointer_bytes = align_up(5 * static_cast<std::size_t>(nb) * sizeof(void*));
  const std::size_t score_bytes = static_cast<std::size_t>(nb * per_pair) * sizeof(float);
  char* scratch = static_cast<char*>(s.scratch(pointer_bytes + score_bytes));
  void** arrays = reinterpret_cast<void**>(scratch);
  float* scores = reinterpret_cast<float*>(scratch + pointer_bytes);

  const cudaDataType type = cuda_type(dt);
  cublasHandle_t blas = s.blas();
  const float scale = a.scale, one = 1.0f, zero = 0.0f;
  for (std::int64_t q0 = 0; q0 < T; q0 += tq) {
    const std::int64_t nq = std::min(tq, T - q0);
    const std::int64_t tk = a.causal ? q0 + nq : T;  // keys any row of the chunk can see
    for (std::int64_t p0 = 0; p0 < pairs; p0 += nb) {
      const int n = static_cast<int>(std::min(nb, pairs - p0));
      PointerArgs pa{static_cast<const char*>(a.q.data),
                     static_cast<const char*>(a.k.data),
                     static_cast<const char*>(a.v.data),
                     static_cast<char*>(a.out.data),
                     scores,
                     arrays,
                     n,
                     static_cast<int>(p0),
                     a.heads,
                     group,
                     T,
                     q0,
                     nq,
                     tk,
                     ceil_div(nq * tk, kPairAlign) * kPairAlign,
                     a.q.ld,
                     a.k.ld,
                     a.v.ld,
                     a.out.ld,
                     D,
                     esize};
      attention_pointers_kernel<<<static_cast<unsigned>(ceil_div(n, 128)), 128, 0, s.stream()>>>(pa);
      ZO2_CUDA_CHECK_LAUNCH();
      // Row-major S [nq, tk] = Q [nq, D] · K [tk, D]ᵀ. cuBLAS sees a row-major matrix as its
      // transpose in column-major order (gemm.cpp), so it computes Sᵀ (tk × nq) = K · Qᵀ:
      // K as stored (D × tk column-major) transposed, times Qᵀ as stored (D × nq).
      ZO2_CUDA_CHECK(cublasGemmBatchedEx(
          blas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(tk), static_cast<int>(nq),
          static_cast<int>(D), &scale, arrays, type, static_cast<int>(a.k.ld), arrays + n, type,
          static_cast<int>(a.q.ld), &zero, arrays + 2 * n, CUDA_R_32F, static_cast<int>(tk), n,
          CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
      const std::int64_t rows = std::int64_t{n} * nq;
      dispatch_activation(dt, "attention", [&](auto e) {
        using E = decltype(e);
        attention_softmax_kernel<E>
            <<<grid_blocks(s, rows * kSoftmaxThreads, kSoftmaxThreads), kSoftmaxThreads, 0,
               s.stream()>>>(scores, rows, nq, tk, pa.pair_stride, q0, a.causal, a.key_mask, T,
                             static_cast<int>(p0), a.heads);
        ZO2_CUDA_CHECK_LAUNCH();
      });
      // O [nq, D] = P [nq, tk] · V [tk, D]; column-major: Oᵀ (D × nq) = Vᵀ (D × tk) · Pᵀ (tk × nq).
      ZO2_CUDA_CHECK(cublasGemmBatchedEx(
          blas, CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(D), static_cast<int>(nq),
          static_cast<int>(tk), &one, arrays + 3 * n, type, static_cast<int>(a.v.ld),
          arrays + 2 * n, type, static_cast<int>(tk * p_per_float), &zero, arrays + 4 * n, type,
          static_cast<int>(a.out.ld), n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    }
  }
}

}  // namespace zo2::cuda
