// Causal, padding-masked, grouped-query softmax attention — the twin of attention in
// runtime/cpu/kernels.cpp, built the same way: query tiles, two GEMMs around a softmax.
//
// Design (Note [Attention by query chunks]):
//   For a chunk of query rows [q0, q1) and a group of n (batch, head) pairs:
//     1. a tiny kernel writes the batch's pointer arrays (GQA: head h reads kv head
//        h / (heads / kv_heads), so the K/V pointers are not a fixed stride apart);
//     2. S_i = scale · Q_i K_iᵀ  — one cublasGemmBatchedEx, fp32 output, over the keys a
//        row of the chunk can see (causal: [0, q1); otherwise all T);
//     3. a softmax kernel masks (causal, key padding), takes the row max, Σexp(s − max)
//        in fp32 with a fixed reduction tree, and writes P = exp(s − max)/Σ in the input
//        dtype IN PLACE over S (see below); a row with no visible key gets P = 0, hence a
//        zero output row, as on the CPU. One warp per row with the row in registers where
//        it has at most 2048 keys (Note [Row softmax in registers]), else one block per row.
//        The max propagates NaN (max_nan, not fmaxf), so a NaN score makes its row NaN on
//        every path (this one and the fused kernel), as on the CPU and in PyTorch;
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
//   This path is the default for every dtype and head_dim (fp32 runs on cuBLAS's exact
//   SGEMM, no TF32, so it matches the CPU to rounding). Its price is the chunk's fp32
//   scores' round trips through HBM: measured with ncu on an H200 (OPT-1.3B shape, 1×2048
//   tokens, fp16) the block-per-row softmax kernel took 65 µs per chunk of 256 queries ×
//   32 heads, about half of each layer's GPU time — hence the row kernel.
//
// Note [Fused attention]
//   For bf16/fp16 with head_dim 64 or 128 (OPT-1.3B and up, LLaMA) and 16-byte aligned
//   rows, one kernel does it all, FlashAttention-2 style: a block takes 64 query rows of one
//   (batch, head); each of its 4 warps owns 16 of them, held as tensor-core A operands in
//   registers. For every tile of 64 keys up to the block's causal limit, the block stages K
//   (row-major), Vᵀ and the keys' visibility in shared memory; each warp computes
//   S = Q·Kᵀ with mma.sync m16n8k16 (fp32 accumulation) into registers, scales and masks
//   it there (causal, key padding, keys past T), keeps each row's running max m in fp32 and
//   the lane's share of Σp (online softmax: O and the share scale by exp(m_old − m_new) when
//   the max grows), rounds p = exp(s − m) to the input dtype as P — the S accumulators of
//   two 8-key tiles are exactly P's A operand for 16 keys, so P never leaves registers —
//   and accumulates O += P·V with mma.sync into fp32 registers. At the end each row's four
//   lanes add their shares (a fixed butterfly) and O/l is rounded to the input dtype; a row
//   that saw no key (l = 0) is written as zeros, as on the CPU. Memory is O(tile), never T²,
//   and the result is deterministic: the order of every sum is fixed by the shape. It is the
//   twin of cpu::attention like the chunked path (tests compare both with the CPU, and with
//   each other). ptxas (sm_90): 168 registers at head_dim 128, 128 at 64, no spills
//   beyond 4 bytes.
//   It is the default for bf16/fp16 at head_dim 64 and 128 (ZO2_CUDA_ATTENTION unset or
//   "fused"; "chunked" or "chunked-block" pick the chunked path, which also takes fp32 and
//   other head dims). Its first version, with WMMA and S, P and O round-tripping through
//   shared memory, did not pay: on an H200 it gave OPT-1.3B (head_dim 64) 26.8k tok/s
//   against the chunked 26.2k, and OPT-6.7B (head_dim 128) 9.7k against 10.7k. This
//   register-resident version, written without a GPU (its lane algebra checked by
//   tests/sim/fused_attention_lanes.py), was first run on an H100 80GB HBM3 at e4931a4
//   (bench/RESULTS.md): CudaFusedAttentionTest passed, compute-sanitizer racecheck and
//   memcheck found nothing, and zo2-bench's resident fp16 rows at 1 x 2048 tokens gave
//   OPT-1.3B 39.6k tok/s against the chunked path's 31.1k (+27 %) and OPT-6.7B 12.3k
//   against 12.5k (-1.5 %); with the GEMM epilogues as well, 44.3k and 13.5k against the
//   epilogues alone 33.7k and 13.5k. The microbenchmark (bf16, 2048 tokens, 32 heads):
//   308 us against 675 us for the block softmax path. At 56 TFLOP/s it is still far from
//   FlashAttention-2's rate: cp.async double buffering of K/V and ldmatrix loads (and the
//   8-way bank conflict of the transposed V stores) are its next steps.
//
//   In-place P for 16-bit types: P row r is stored at the start of S row r (row stride
//   2·Tk elements of 2 bytes = Tk floats). The softmax reads the whole row in its first two
//   passes (both end at a block barrier) and writes in blockDim-sized chunks with a barrier
//   between the chunk's reads and its writes: chunk c writes bytes [2c, 2c + 2B) of the
//   row, which only the chunk's own, already finished reads (when c = 0) or earlier chunks
//   could touch — never a later chunk's floats at [4c', 4c' + 4B), c' ≥ c + B.
#include "runtime/cuda/kernel_util.cuh"
#include "runtime/cuda/kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <climits>
#include <type_traits>

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
  std::int64_t kv_stride;  // rows between sequences' keys (seq without a KV cache)
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
  const std::int64_t row0 = b * a.seq, key0 = b * a.kv_stride;
  a.arrays[i] = const_cast<char*>(a.k + (key0 * a.ldk + kvh * a.head_dim) * a.esize);
  a.arrays[a.n + i] = const_cast<char*>(a.q + ((row0 + a.q0) * a.ldq + h * a.head_dim) * a.esize);
  a.arrays[2 * a.n + i] = a.scores + static_cast<std::int64_t>(i) * a.pair_stride;
  a.arrays[3 * a.n + i] = const_cast<char*>(a.v + (key0 * a.ldv + kvh * a.head_dim) * a.esize);
  a.arrays[4 * a.n + i] = a.out + ((row0 + a.q0) * a.ldo + h * a.head_dim) * a.esize;
}

template <class E>
__global__ void __launch_bounds__(kSoftmaxThreads)
    attention_softmax_kernel(float* scores, std::int64_t rows, std::int64_t nq, std::int64_t tk,
                             std::int64_t pair_stride, std::int64_t q0, bool causal, int window,
                             float softcap, const std::int32_t* key_mask, std::int64_t seq, int pair0,
                             int heads) {
  __shared__ float smem[32];
  const float kNegInf = -__int_as_float(0x7f800000);
  for (std::int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const std::int64_t local = row / nq, i = row % nq, t = q0 + i;
    const std::int64_t b = (pair0 + local) / heads;
    float* srow = scores + local * pair_stride + i * tk;
    // Soft-capping (AttentionArgs::softcap) at every read: the same value in each pass.
    auto score = [&](std::int64_t j) { return softcap_of(srow[j], softcap); };
    typename E::T* p = reinterpret_cast<typename E::T*>(srow);
    const std::int32_t* mask = key_mask != nullptr ? key_mask + b * seq : nullptr;
    const std::int64_t last = causal ? t : tk - 1;  // last key this row may see
    const std::int64_t first = window > 0 ? t - window + 1 : 0;  // sliding window (AttentionArgs)
    auto visible = [&](std::int64_t j) { return j >= first && j <= last && (mask == nullptr || mask[j] != 0); };

    float mx = kNegInf;
    for (std::int64_t j = threadIdx.x; j < tk; j += blockDim.x)
      if (visible(j)) mx = max_nan(mx, score(j));  // a NaN score makes the row NaN
    mx = block_max_nan(mx, smem);
    const bool empty = mx == kNegInf;  // no visible key: P = 0, a zero output row
    float inv = 0.0f;
    if (!empty) {
      float sum = 0.0f;
      for (std::int64_t j = threadIdx.x; j < tk; j += blockDim.x)
        if (visible(j)) sum = __fadd_rn(sum, expf(__fsub_rn(score(j), mx)));
      sum = block_sum(sum, smem);
      inv = __fdiv_rn(1.0f, sum);
    }
    for (std::int64_t c0 = 0; c0 < tk; c0 += blockDim.x) {
      const std::int64_t j = c0 + threadIdx.x;
      float v = 0.0f;
      if (!empty && j < tk && visible(j)) v = __fmul_rn(expf(__fsub_rn(score(j), mx)), inv);
      if constexpr (sizeof(typename E::T) < sizeof(float)) __syncthreads();
      if (j < tk) p[j] = E::store(v);
    }
    // The next row's passes touch another row, and block_max synchronizes before it
    // reuses smem.
  }
}

// Note [Row softmax in registers]
//   The softmax above spends its time on synchronization, not bytes: a block of 256
//   threads per row of ~1–2k keys does three passes (max, sum, write) with two block
//   reductions and, for 16-bit P, a barrier per 256 written elements. ncu on an H200
//   (OPT-1.3B, 1×2048 tokens, fp16) put it at 38 % of the GPU time of a resident step —
//   65 µs per chunk that moves ~57 MB, a fifth of what HBM could do in that time.
//   This kernel gives each row to one warp. Lane l holds keys l, l + 32, … in kPer registers
//   (32·kPer ≥ tk; rows of up to kRowMaxKeys keys), so the row is read from memory once;
//   the max and the sum are warp shuffles (warp_max / warp_sum: a fixed tree, so the bits
//   do not depend on timing), and no __syncthreads is needed. An invisible key (causal, key
//   padding, or past tk) is marked in a 64-bit mask per lane and held as −inf for the max;
//   it adds exactly 0 to the sum and gets P = 0 — even where a NaN score makes 1/Σ NaN —
//   as the block kernel's skip does; a row with no visible key (max = −inf) gets P = 0.
//   Score and mask are loaded independently, so a row's loads are all in flight at once.
//   The sum is taken in another order than the block kernel's (lane-major, then the
//   shuffle tree), so the two differ in the last bits; both are tested against the CPU twin. In place: every lane has read its keys before the
//   warp's max (which needs all of them) exists, and P's writes come after it; P row r
//   overlays only S row r, which belongs to this warp alone.
//   Rows longer than kRowMaxKeys keys (sequences past 2048 tokens) keep the block kernel,
//   as does ZO2_CUDA_ATTENTION=chunked-block (for measuring one against the other).
//   ptxas (sm_90): 40–128 registers per lane, no spills except 4 bytes at kPer = 64.
//   Written without a GPU; on an H100 80GB HBM3 at e4931a4 CudaAttentionTest and
//   CudaFusedAttentionTest passed, and the resident fp16 rows (chunked path, 1 x 2048) gave
//   OPT-1.3B 31.1k tok/s against the block kernel's 28.4k and OPT-6.7B 12.5k against 11.8k.
constexpr int kRowWarps = 8;  // rows per block of 256 threads
constexpr std::int64_t kRowMaxKeys = 32 * 64;

template <class E, int kPer>
__global__ void __launch_bounds__(kRowWarps * 32)
    attention_softmax_rows_kernel(float* scores, std::int64_t rows, std::int64_t nq, std::int64_t tk,
                                  std::int64_t pair_stride, std::int64_t q0, bool causal, int window,
                                  float softcap, const std::int32_t* key_mask, std::int64_t seq, int pair0,
                                  int heads) {
  const float kNegInf = -__int_as_float(0x7f800000);
  const int lane = threadIdx.x & 31;
  const std::int64_t stride = std::int64_t{gridDim.x} * kRowWarps;
  for (std::int64_t row = std::int64_t{blockIdx.x} * kRowWarps + (threadIdx.x >> 5); row < rows; row += stride) {
    const std::int64_t local = row / nq, i = row % nq, t = q0 + i;
    const std::int64_t b = (pair0 + local) / heads;
    float* srow = scores + local * pair_stride + i * tk;
    const std::int32_t* mask = key_mask != nullptr ? key_mask + b * seq : nullptr;
    const std::int64_t last = causal ? t : tk - 1;  // last key this row may see
    const std::int64_t first = window > 0 ? t - window + 1 : 0;  // sliding window (AttentionArgs)

    float v[kPer];
    std::uint64_t seen = 0;  // bit k: key lane + 32·k is visible
    float mx = kNegInf;
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      const std::int64_t j = lane + 32 * k;
      // The score and the mask are independent loads (neither waits for the other).
      const bool in = j < tk && j <= last && j >= first;
      const float x = in ? softcap_of(srow[j], softcap) : kNegInf;  // AttentionArgs::softcap
      const bool keep = in && (mask == nullptr || mask[j] != 0);
      v[k] = keep ? x : kNegInf;
      seen |= keep ? std::uint64_t{1} << k : std::uint64_t{0};
      mx = max_nan(mx, v[k]);  // a NaN score makes the row NaN
    }
    mx = warp_max_nan(mx);  // every lane's loads are done once this exists
    const bool empty = mx == kNegInf;
    float sum = 0.0f;
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      v[k] = empty || ((seen >> k) & 1u) == 0 ? 0.0f : expf(__fsub_rn(v[k], mx));
      sum = __fadd_rn(sum, v[k]);
    }
    sum = warp_sum(sum);
    const float inv = empty ? 0.0f : __fdiv_rn(1.0f, sum);
    typename E::T* p = reinterpret_cast<typename E::T*>(srow);
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      const std::int64_t j = lane + 32 * k;
      const float pk = ((seen >> k) & 1u) != 0 ? __fmul_rn(v[k], inv) : 0.0f;
      if (j < tk) p[j] = E::store(pk);
    }
  }
}

// Launches the row kernel with the fewest registers per lane that hold a row of tk keys.
template <class E>
void launch_softmax_rows(KernelStream& s, float* scores, std::int64_t rows, std::int64_t nq, std::int64_t tk,
                         std::int64_t pair_stride, std::int64_t q0, bool causal, int window, float softcap,
                         const std::int32_t* key_mask, std::int64_t seq, int pair0, int heads) {
  const int blocks = grid_blocks(s, rows * 32, kRowWarps * 32);
  auto go = [&](auto per) {
    attention_softmax_rows_kernel<E, decltype(per)::value><<<blocks, kRowWarps * 32, 0, s.stream()>>>(
        scores, rows, nq, tk, pair_stride, q0, causal, window, softcap, key_mask, seq, pair0, heads);
  };
  if (tk <= 32 * 8) go(std::integral_constant<int, 8>{});
  else if (tk <= 32 * 16) go(std::integral_constant<int, 16>{});
  else if (tk <= 32 * 32) go(std::integral_constant<int, 32>{});
  else go(std::integral_constant<int, 64>{});
  ZO2_CUDA_CHECK_LAUNCH();
}

// ZO2_CUDA_ATTENTION: fused (default; Note [Fused attention], where it applies, else the
// chunked path), chunked (the row softmax where rows fit in registers), chunked-block (the
// chunked path with the block-per-row softmax everywhere).
enum class Path { fused, chunked, chunked_block };

// ZO2_CUDA_ATTENTION, read at every call (tests switch it between calls).
Path path_from_env() {
  return static_cast<Path>(env_choice("ZO2_CUDA_ATTENTION", {"fused", "chunked", "chunked-block"}));
}

// ---- the fused kernel (Note [Fused attention]) ----

namespace fused {

constexpr int kBQ = 64;  // query rows per block: 16 per warp
constexpr int kBK = 64;  // keys per tile
constexpr int kWarps = kBQ / 16;
constexpr int kThreads = kWarps * 32;
static_assert(kBQ == kBK, "load_rows stages Q, K and V tiles of the same height");

struct Args {
  const std::uint16_t* q;
  const std::uint16_t* k;
  const std::uint16_t* v;
  std::uint16_t* out;
  const std::int32_t* mask;
  std::int64_t ldq, ldk, ldv, ldo;  // in elements
  int seq, group;
  float scale;
  bool causal;
  int window;  // sliding window (AttentionArgs; 0: none)
  float softcap;  // AttentionArgs::softcap (0: none)
};

// Shared memory: Q and K tiles row-major ([row][d], rows padded to D + 8 elements), the V
// tile transposed ([d][key], rows padded to kBK + 8), and the tile's key visibility. The
// padding puts the 32 lanes' 4-byte fragment loads (row g = lane/4, column pair lane%4) in
// 32 different banks: a row of D + 8 or kBK + 8 16-bit elements is 4 banks past the last.
template <int D>
struct Layout {
  static constexpr int kLdh = D + 8;    // 16-bit elements per Q/K row
  static constexpr int kLdv = kBK + 8;  // 16-bit elements per Vᵀ row
  static constexpr std::size_t q = 0;
  static constexpr std::size_t k = q + std::size_t{kBQ} * kLdh * 2;
  static constexpr std::size_t vt = k + std::size_t{kBK} * kLdh * 2;
  static constexpr std::size_t keep = vt + std::size_t{D} * kLdv * 2;
  static constexpr std::size_t bytes = keep + std::size_t{kBK} * sizeof(int);
  static_assert(k % 16 == 0 && vt % 16 == 0 && keep % 16 == 0 && (kLdh * 2) % 16 == 0);
};

// Rows [row0, row0 + 64) of a [seq, D] slice (row stride ld) into shared memory, 16 bytes
// at a time from global memory; rows at or past `rows` are zeros. Row-major (dst[r][d],
// row stride kLdh) or, kTransposed, dst[d][r] (row stride kLdv: V's tile for the B operand).
template <int D, bool kTransposed>
__device__ __forceinline__ void load_rows(std::uint16_t* dst, const std::uint16_t* src, std::int64_t ld,
                                          int row0, int rows) {
  constexpr int kChunks = D / 8;
  for (int c = threadIdx.x; c < kBQ * kChunks; c += kThreads) {
    const int r = c / kChunks, x = (c % kChunks) * 8;
    uint4 val = make_uint4(0, 0, 0, 0);
    if (row0 + r < rows) val = *reinterpret_cast<const uint4*>(src + static_cast<std::int64_t>(row0 + r) * ld + x);
    if constexpr (!kTransposed) {
      *reinterpret_cast<uint4*>(dst + r * Layout<D>::kLdh + x) = val;
    } else {
      const std::uint32_t w[4] = {val.x, val.y, val.z, val.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        dst[(x + 2 * i) * Layout<D>::kLdv + r] = static_cast<std::uint16_t>(w[i] & 0xffffu);
        dst[(x + 2 * i + 1) * Layout<D>::kLdv + r] = static_cast<std::uint16_t>(w[i] >> 16);
      }
    }
  }
}

// Two adjacent 16-bit elements as one register (the lower column in the low half, as mma
// operands take them).
__device__ __forceinline__ std::uint32_t ld32(const std::uint16_t* p) {
  return *reinterpret_cast<const std::uint32_t*>(p);
}
template <class E>
__device__ __forceinline__ std::uint32_t pack(float lo, float hi) {
  return static_cast<std::uint32_t>(E::store(lo)) | (static_cast<std::uint32_t>(E::store(hi)) << 16);
}

// C (16×8, fp32) += A (16×16) · B (16×8), one warp: mma.sync m16n8k16, fp32 accumulation.
// Operand layout (PTX ISA, "Matrix fragments for mma.m16n8k16"), g = lane / 4, c = lane % 4:
//   A: a0 = (row g, cols 2c, 2c+1), a1 = (g + 8, 2c..), a2 = (g, 2c+8..), a3 = (g + 8, 2c+8..)
//   B: b0 = (rows k = 2c, 2c+1; col g), b1 = (k = 2c+8, 2c+9; col g)
//   C: c0, c1 = (row g, cols 2c, 2c+1), c2, c3 = (row g + 8, cols 2c, 2c+1)
template <class E>
__device__ __forceinline__ void mma(float (&c)[4], const std::uint32_t (&a)[4], std::uint32_t b0, std::uint32_t b1) {
  if constexpr (std::is_same_v<E, BF16>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    static_assert(std::is_same_v<E, F16>);
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

template <class E, int D>
__global__ void __launch_bounds__(kThreads) flash_attention_kernel(Args a) {
  using L = Layout<D>;
  extern __shared__ __align__(16) unsigned char smem[];
  auto* sq = reinterpret_cast<std::uint16_t*>(smem + L::q);
  auto* sk = reinterpret_cast<std::uint16_t*>(smem + L::k);
  auto* svt = reinterpret_cast<std::uint16_t*>(smem + L::vt);
  auto* skeep = reinterpret_cast<int*>(smem + L::keep);
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int g = lane >> 2, c = lane & 3;
  const float kNegInf = -__int_as_float(0x7f800000);

  // Causal blocks near the end see the most keys: start them first.
  const int q0 = static_cast<int>(gridDim.x - 1 - blockIdx.x) * kBQ, h = static_cast<int>(blockIdx.y);
  const std::int64_t row_base = static_cast<std::int64_t>(blockIdx.z) * a.seq;
  const int kvh = h / a.group;
  const std::uint16_t* q = a.q + row_base * a.ldq + static_cast<std::int64_t>(h) * D;
  const std::uint16_t* k = a.k + row_base * a.ldk + static_cast<std::int64_t>(kvh) * D;
  const std::uint16_t* v = a.v + row_base * a.ldv + static_cast<std::int64_t>(kvh) * D;
  const std::int32_t* mask = a.mask != nullptr ? a.mask + row_base : nullptr;

  // The warp's 16 query rows as A operands, kept in registers for every key tile.
  load_rows<D, false>(sq, q, a.ldq, q0, a.seq);
  __syncthreads();
  std::uint32_t qf[D / 16][4];
  {
    const std::uint16_t* r0 = sq + (warp * 16 + g) * L::kLdh + 2 * c;
    const std::uint16_t* r8 = r0 + 8 * L::kLdh;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      qf[kk][0] = ld32(r0 + 16 * kk);
      qf[kk][1] = ld32(r8 + 16 * kk);
      qf[kk][2] = ld32(r0 + 16 * kk + 8);
      qf[kk][3] = ld32(r8 + 16 * kk + 8);
    }
  }
  // This lane's rows: t[0] = query of row g, t[1] = of row g + 8; their running max m, and
  // l = this lane's part of Σp (its columns 2c, 2c+1 of every 8), summed over the row's four
  // lanes at the end. O accumulates in registers: o[n] holds columns 8n + 2c, 8n + 2c + 1.
  const int t[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
  float m[2] = {kNegInf, kNegInf}, l[2] = {0.0f, 0.0f};
  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;

  const int key_end = a.causal ? min(q0 + kBQ, a.seq) : a.seq;  // keys [0, key_end) matter
  // With a sliding window no row of the block sees a key before q0 − window + 1: the key
  // tiles wholly before it are skipped.
  const int key_begin = a.window > 0 ? max(0, q0 - a.window + 1) / kBK * kBK : 0;
  for (int k0 = key_begin; k0 < key_end; k0 += kBK) {
    __syncthreads();  // every warp is done with the previous tile (and with sq)
    load_rows<D, false>(sk, k, a.ldk, k0, a.seq);
    load_rows<D, true>(svt, v, a.ldv, k0, a.seq);
    for (int j = static_cast<int>(threadIdx.x); j < kBK; j += kThreads)
      skeep[j] = k0 + j < a.seq && (mask == nullptr || mask[k0 + j] != 0);
    __syncthreads();
    // S = Q·Kᵀ: n-tile n covers keys k0 + 8n … + 7; B[k = d][n = key] = K[key][d], so b0/b1
    // are two adjacent d of K row 8n + g.
    float s[kBK / 8][4];
#pragma unroll
    for (int n = 0; n < kBK / 8; ++n) {
      s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
      const std::uint16_t* kr = sk + (8 * n + g) * L::kLdh + 2 * c;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) mma<E>(s[n], qf[kk], ld32(kr + 16 * kk), ld32(kr + 16 * kk + 8));
    }
    // Scale and mask (causal, key padding, keys past T); the tile's row max over the four
    // lanes of the row (lanes 4g … 4g + 3: xor 1 and 2).
    float tile_max[2] = {kNegInf, kNegInf};
#pragma unroll
    for (int n = 0; n < kBK / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1, j = 8 * n + 2 * c + (e & 1);
        const bool visible = skeep[j] != 0 && (!a.causal || k0 + j <= t[r]) &&
                             (a.window <= 0 || k0 + j > t[r] - a.window);
        s[n][e] = visible ? softcap_of(__fmul_rn(s[n][e], a.scale), a.softcap) : kNegInf;
        tile_max[r] = max_nan(tile_max[r], s[n][e]);  // a NaN score makes the row NaN
      }
    }
    float corr[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tile_max[r] = max_nan(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
      tile_max[r] = max_nan(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
      const float m_new = max_nan(m[r], tile_max[r]);
      corr[r] = m_new == kNegInf ? 1.0f : expf(__fsub_rn(m[r], m_new));  // m = −inf: 0
      m[r] = m_new;
      l[r] = __fmul_rn(l[r], corr[r]);
    }
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      o[n][0] = __fmul_rn(o[n][0], corr[0]);
      o[n][1] = __fmul_rn(o[n][1], corr[0]);
      o[n][2] = __fmul_rn(o[n][2], corr[1]);
      o[n][3] = __fmul_rn(o[n][3], corr[1]);
    }
    // p = exp(s − m) (0 where masked), summed unrounded into l and rounded to E as P. The
    // S accumulators of n-tiles 2j and 2j + 1 are exactly the A operand of keys 16j … 16j + 15.
    std::uint32_t pf[kBK / 16][4];
#pragma unroll
    for (int n = 0; n < kBK / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        s[n][e] = s[n][e] == kNegInf ? 0.0f : expf(__fsub_rn(s[n][e], m[r]));
        l[r] = __fadd_rn(l[r], s[n][e]);
      }
      pf[n / 2][(n % 2) * 2 + 0] = pack<E>(s[n][0], s[n][1]);
      pf[n / 2][(n % 2) * 2 + 1] = pack<E>(s[n][2], s[n][3]);
    }
    // O += P·V: B[k = key][n = d] = V[key][d] = Vᵀ[d][key], so b0/b1 are two adjacent keys
    // of Vᵀ row 8n + g.
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      const std::uint16_t* vr = svt + (8 * n + g) * L::kLdv + 2 * c;
#pragma unroll
      for (int j = 0; j < kBK / 16; ++j) mma<E>(o[n], pf[j], ld32(vr + 16 * j), ld32(vr + 16 * j + 8));
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] = __fadd_rn(l[r], __shfl_xor_sync(0xffffffffu, l[r], 1));
    l[r] = __fadd_rn(l[r], __shfl_xor_sync(0xffffffffu, l[r], 2));
    if (t[r] >= a.seq) continue;
    const float inv = l[r] > 0.0f ? __fdiv_rn(1.0f, l[r]) : 0.0f;  // no visible key: zeros
    std::uint16_t* out = a.out + (row_base + t[r]) * a.ldo + static_cast<std::int64_t>(h) * D + 2 * c;
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
      *reinterpret_cast<std::uint32_t*>(out + 8 * n) =
          pack<E>(__fmul_rn(o[n][2 * r], inv), __fmul_rn(o[n][2 * r + 1], inv));
  }
}

template <class E, int D>
void launch(KernelStream& s, const AttentionArgs& a) {
  auto kernel = flash_attention_kernel<E, D>;
  // More than 48 KiB of dynamic shared memory (head_dim 128) needs this opt-in, which is a
  // setting of the current device: made before every launch (a host call of about a
  // microsecond), so a process that uses several GPUs never launches unconfigured.
  ZO2_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(Layout<D>::bytes)));
  const Args args{static_cast<const std::uint16_t*>(a.q.data),
                  static_cast<const std::uint16_t*>(a.k.data),
                  static_cast<const std::uint16_t*>(a.v.data),
                  static_cast<std::uint16_t*>(a.out.data),
                  a.key_mask,
                  a.q.ld,
                  a.k.ld,
                  a.v.ld,
                  a.out.ld,
                  a.seq,
                  a.heads / a.kv_heads,
                  a.scale,
                  a.causal,
                  a.window,
                  a.softcap};
  const dim3 grid(static_cast<unsigned>(ceil_div(std::int64_t{a.seq}, kBQ)), static_cast<unsigned>(a.heads),
                  static_cast<unsigned>(a.batch));
  kernel<<<grid, kThreads, Layout<D>::bytes, s.stream()>>>(args);
  ZO2_CUDA_CHECK_LAUNCH();
}

bool aligned16(const Mat& m) {
  return reinterpret_cast<std::uintptr_t>(m.data) % 16 == 0 && m.ld % 8 == 0;
}

// Whether the fused kernel takes this call: unless ZO2_CUDA_ATTENTION asks for the chunked
// path, for bf16/fp16 at head_dim 64 or 128 with 16-byte aligned operands.
bool applies(const AttentionArgs& a, Path path) {
  if (path != Path::fused) return false;
  const DType dt = a.q.dtype;
  // Queries and keys the same rows (no KV cache; decoding takes the chunked path).
  const bool same_rows = a.keys() == a.seq && a.key_stride() == a.seq;
  return same_rows && (dt == DType::bf16 || dt == DType::f16) && (a.head_dim == 64 || a.head_dim == 128) &&
         aligned16(a.q) && aligned16(a.k) && aligned16(a.v) && aligned16(a.out) && a.batch <= 65535 &&
         a.heads <= 65535;
}

}  // namespace fused

}  // namespace

void attention(KernelStream& s, const AttentionArgs& a) {
  const std::int64_t T = a.seq, D = a.head_dim;
  // With a KV cache (AttentionArgs): S keys per sequence, KS rows apart; query i of a
  // sequence sits at key position off + i. Without one S = KS = T and off = 0.
  const std::int64_t S = a.keys(), KS = a.key_stride(), off = a.query_offset();
  const std::int64_t pairs = std::int64_t{a.batch} * a.heads;
  if (T == 0 || pairs == 0 || D == 0) return;
  if (S < T || KS < S) throw_unsupported("cuda attention: fewer keys than queries per sequence");
  const Path path = path_from_env();
  if (fused::applies(a, path)) {
    dispatch_activation(a.q.dtype, "attention", [&](auto e) {
      using E = decltype(e);
      if constexpr (!std::is_same_v<E, F32>) {
        if (a.head_dim == 64) fused::launch<E, 64>(s, a);
        else fused::launch<E, 128>(s, a);
      }
    });
    return;
  }
  const int group = a.heads / a.kv_heads;
  const DType dt = a.q.dtype;
  const std::int64_t esize = static_cast<std::int64_t>(dtype_size(dt));
  // P's row stride in elements: it overlays the fp32 score row (Note above).
  const std::int64_t p_per_float = static_cast<std::int64_t>(sizeof(float)) / esize;

  // Chunk shape from the shape alone: Tq query rows × n pairs × S keys ≤ kScoreBudget.
  const std::int64_t budget = static_cast<std::int64_t>(kScoreBudget / sizeof(float));
  std::int64_t tq = std::min<std::int64_t>(T, kMaxChunk);
  tq = std::max<std::int64_t>(1, std::min(tq, budget / S));
  const std::int64_t per_pair = ceil_div(tq * S, kPairAlign) * kPairAlign;  // padded (Note above)
  const std::int64_t nb = std::clamp<std::int64_t>(budget / per_pair, 1, std::min<std::int64_t>(pairs, INT_MAX / 8));
  if (S > INT_MAX / p_per_float || D > INT_MAX || a.q.ld > INT_MAX || a.k.ld > INT_MAX ||
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
    const std::int64_t tk = a.causal ? off + q0 + nq : S;  // keys any row of the chunk can see
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
                     KS,
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
        if (tk <= kRowMaxKeys && path != Path::chunked_block) {  // Note [Row softmax in registers]
          launch_softmax_rows<E>(s, scores, rows, nq, tk, pa.pair_stride, off + q0, a.causal, a.window, a.softcap, a.key_mask, KS,
                                 static_cast<int>(p0), a.heads);
          return;
        }
        attention_softmax_kernel<E>
            <<<grid_blocks(s, rows * kSoftmaxThreads, kSoftmaxThreads), kSoftmaxThreads, 0,
               s.stream()>>>(scores, rows, nq, tk, pa.pair_stride, off + q0, a.causal, a.window, a.softcap, a.key_mask, KS,
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
