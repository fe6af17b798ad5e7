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
//        it has at most 2048 keys (Note [Row softmax in registers]), else one block per row;
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
//   rows, one kernel does it all in shared memory, flash-attention style: a block takes 64
//   query rows of one (batch, head); each of its 4 warps owns 16 of them. For every tile of
//   64 keys up to the block's causal limit, the block stages K and V in shared memory, and
//   each warp computes S = scale·QKᵀ with tensor-core WMMA (fp32 accumulation), masks
//   it (causal, key padding, keys past T), keeps its rows' running max m and sum l in fp32
//   (online softmax: O and l scale by exp(m_old − m_new) when the max grows), rounds
//   p = exp(s − m) to the input dtype as P, and accumulates O += P·V with WMMA into an fp32
//   tile in shared memory. At the end O/l is rounded to the input dtype; a row that saw no
//   key (l = 0) is written as zeros, as on the CPU. Memory is O(tile), never T², and the
//   result is deterministic: the order of every sum is fixed by the shape. It is the twin
//   of cpu::attention like the chunked path (tests compare both with the CPU, and with each
//   other).
//   It is opt-in (ZO2_CUDA_ATTENTION=fused; "chunked" or unset: the chunked path) because
//   it did not pay: measured on an H200 (zo2-bench, resident, fp16, 1×2048 tokens, the
//   same build) it gave OPT-1.3B (head_dim 64) 26.8k tok/s against the chunked 26.2k, and
//   OPT-6.7B (head_dim 128) 9.7k against 10.7k. This simple WMMA kernel round-trips S and O
//   through shared memory and runs 4 warps per block (2 blocks per SM at head_dim 128);
//   a faster one needs register-resident accumulators (mma.sync/wgmma) and pipelined
//   K/V loads, i.e. FlashAttention-2/3's design.
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
#include <mma.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <string_view>
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
//   NOT YET MEASURED OR RUN ON A GPU (written in a session without one): the first GPU
//   session must run CudaAttentionTest and CudaFusedAttentionTest, which compare it with
//   the CPU and with the block kernel, and the resident rows of scripts/gpu-check.sh.
constexpr int kRowWarps = 8;  // rows per block of 256 threads
constexpr std::int64_t kRowMaxKeys = 32 * 64;

template <class E, int kPer>
__global__ void __launch_bounds__(kRowWarps * 32)
    attention_softmax_rows_kernel(float* scores, std::int64_t rows, std::int64_t nq, std::int64_t tk,
                                  std::int64_t pair_stride, std::int64_t q0, bool causal,
                                  const std::int32_t* key_mask, std::int64_t seq, int pair0, int heads) {
  const float kNegInf = -__int_as_float(0x7f800000);
  const int lane = threadIdx.x & 31;
  const std::int64_t stride = std::int64_t{gridDim.x} * kRowWarps;
  for (std::int64_t row = std::int64_t{blockIdx.x} * kRowWarps + (threadIdx.x >> 5); row < rows; row += stride) {
    const std::int64_t local = row / nq, i = row % nq, t = q0 + i;
    const std::int64_t b = (pair0 + local) / heads;
    float* srow = scores + local * pair_stride + i * tk;
    const std::int32_t* mask = key_mask != nullptr ? key_mask + b * seq : nullptr;
    const std::int64_t last = causal ? t : tk - 1;  // last key this row may see

    float v[kPer];
    std::uint64_t seen = 0;  // bit k: key lane + 32·k is visible
    float mx = kNegInf;
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      const std::int64_t j = lane + 32 * k;
      // The score and the mask are independent loads (neither waits for the other).
      const bool in = j < tk && j <= last;
      const float x = in ? srow[j] : kNegInf;
      const bool keep = in && (mask == nullptr || mask[j] != 0);
      v[k] = keep ? x : kNegInf;
      seen |= keep ? std::uint64_t{1} << k : std::uint64_t{0};
      mx = fmaxf(mx, v[k]);
    }
    mx = warp_max(mx);  // every lane's loads are done once this exists
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
                         std::int64_t pair_stride, std::int64_t q0, bool causal, const std::int32_t* key_mask,
                         std::int64_t seq, int pair0, int heads) {
  const int blocks = grid_blocks(s, rows * 32, kRowWarps * 32);
  auto go = [&](auto per) {
    attention_softmax_rows_kernel<E, decltype(per)::value><<<blocks, kRowWarps * 32, 0, s.stream()>>>(
        scores, rows, nq, tk, pair_stride, q0, causal, key_mask, seq, pair0, heads);
  };
  if (tk <= 32 * 8) go(std::integral_constant<int, 8>{});
  else if (tk <= 32 * 16) go(std::integral_constant<int, 16>{});
  else if (tk <= 32 * 32) go(std::integral_constant<int, 32>{});
  else go(std::integral_constant<int, 64>{});
  ZO2_CUDA_CHECK_LAUNCH();
}

// ZO2_CUDA_ATTENTION: chunked (default; the row softmax where rows fit in registers),
// chunked-block (the chunked path with the block-per-row softmax everywhere), fused.
enum class Path { chunked, chunked_block, fused };

// ZO2_CUDA_ATTENTION, read at every call (tests switch it between calls).
Path path_from_env() {
  const char* env = std::getenv("ZO2_CUDA_ATTENTION");
  if (env == nullptr || *env == '\0') return Path::chunked;
  const std::string_view choice(env);
  if (choice == "chunked") return Path::chunked;
  if (choice == "chunked-block") return Path::chunked_block;
  if (choice == "fused") return Path::fused;
  throw_unsupported("ZO2_CUDA_ATTENTION='" + std::string(choice) +
                    "': expected 'chunked', 'chunked-block' or 'fused'");
}

// ---- the fused kernel (Note [Fused attention]) ----

namespace fused {

constexpr int kBQ = 64;  // query rows per block
constexpr int kBK = 64;  // keys per tile
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
static_assert(kBQ == kBK, "load_tile stages Q, K and V tiles of the same height");

template <class E>
struct Wmma;  // the type WMMA takes for E's bits
template <>
struct Wmma<BF16> {
  using T = __nv_bfloat16;
};
template <>
struct Wmma<F16> {
  using T = __half;
};

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
};

// Shared-memory layout. Row strides are padded (fewer bank conflicts) and keep every WMMA
// pointer 32-byte aligned: 16-row blocks and 16-column offsets of each array start at
// multiples of 32 bytes.
template <int D>
struct Layout {
  static constexpr int kLdh = D + 8;    // 16-bit elements per Q/K/V row
  static constexpr int kLds = kBK + 4;  // floats per S row
  static constexpr int kLdp = kBK + 8;  // 16-bit elements per P row
  static constexpr int kLdo = D + 4;    // floats per O row
  static constexpr std::size_t q = 0;
  static constexpr std::size_t k = q + std::size_t{kBQ} * kLdh * 2;
  static constexpr std::size_t v = k + std::size_t{kBK} * kLdh * 2;
  static constexpr std::size_t s = v + std::size_t{kBK} * kLdh * 2;
  static constexpr std::size_t p = s + std::size_t{kWarps} * 16 * kLds * 4;
  static constexpr std::size_t o = p + std::size_t{kWarps} * 16 * kLdp * 2;
  static constexpr std::size_t bytes = o + std::size_t{kWarps} * 16 * kLdo * 4;
  static_assert(k % 32 == 0 && v % 32 == 0 && s % 32 == 0 && p % 32 == 0 && o % 32 == 0);
  static_assert((16 * kLdh * 2) % 32 == 0 && (16 * kLds * 4) % 32 == 0 && (16 * kLdp * 2) % 32 == 0 &&
                (16 * kLdo * 4) % 32 == 0);
};

// Rows [row0, row0 + 64) of a [seq, D] slice (row stride ld) into shared memory, 16 bytes
// at a time; rows at or past `rows` are zeros.
template <int D>
__device__ __forceinline__ void load_tile(std::uint16_t* dst, const std::uint16_t* src, std::int64_t ld,
                                          int row0, int rows) {
  constexpr int kChunks = D / 8;
  for (int c = threadIdx.x; c < kBQ * kChunks; c += kThreads) {
    const int r = c / kChunks, x = (c % kChunks) * 8;
    uint4 val = make_uint4(0, 0, 0, 0);
    if (row0 + r < rows) val = *reinterpret_cast<const uint4*>(src + static_cast<std::int64_t>(row0 + r) * ld + x);
    *reinterpret_cast<uint4*>(dst + r * Layout<D>::kLdh + x) = val;
  }
}

template <class E, int D>
__global__ void __launch_bounds__(kThreads) flash_attention_kernel(Args a) {
  using namespace nvcuda;
  using W = typename Wmma<E>::T;
  using L = Layout<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  auto* sq = reinterpret_cast<std::uint16_t*>(smem + L::q);
  auto* sk = reinterpret_cast<std::uint16_t*>(smem + L::k);
  auto* sv = reinterpret_cast<std::uint16_t*>(smem + L::v);
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  float* ss = reinterpret_cast<float*>(smem + L::s) + warp * 16 * L::kLds;
  auto* sp = reinterpret_cast<std::uint16_t*>(smem + L::p) + warp * 16 * L::kLdp;
  float* so = reinterpret_cast<float*>(smem + L::o) + warp * 16 * L::kLdo;
  const float kNegInf = -__int_as_float(0x7f800000);

  const int q0 = static_cast<int>(blockIdx.x) * kBQ, h = static_cast<int>(blockIdx.y);
  const std::int64_t row_base = static_cast<std::int64_t>(blockIdx.z) * a.seq;
  const int kvh = h / a.group;
  const std::uint16_t* q = a.q + row_base * a.ldq + static_cast<std::int64_t>(h) * D;
  const std::uint16_t* k = a.k + row_base * a.ldk + static_cast<std::int64_t>(kvh) * D;
  const std::uint16_t* v = a.v + row_base * a.ldv + static_cast<std::int64_t>(kvh) * D;
  const std::int32_t* mask = a.mask != nullptr ? a.mask + row_base : nullptr;

  load_tile<D>(sq, q, a.ldq, q0, a.seq);
  for (int i = lane; i < 16 * L::kLdo; i += 32) so[i] = 0.0f;
  // Lane pair (2r, 2r + 1) owns row r of the warp's 16: query t; each lane half its columns.
  const int r = lane >> 1, half = lane & 1;
  const int t = q0 + warp * 16 + r;
  float m = kNegInf, l = 0.0f;
  __syncthreads();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, W, wmma::row_major> qf[D / 16];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)
    wmma::load_matrix_sync(qf[kk], reinterpret_cast<const W*>(sq + warp * 16 * L::kLdh + kk * 16), L::kLdh);

  const int key_end = a.causal ? min(q0 + kBQ, a.seq) : a.seq;  // keys [0, key_end) matter
  for (int k0 = 0; k0 < key_end; k0 += kBK) {
    __syncthreads();  // every warp is done with the previous tile's K and V
    load_tile<D>(sk, k, a.ldk, k0, a.seq);
    load_tile<D>(sv, v, a.ldv, k0, a.seq);
    __syncthreads();
    // S = Q·Kᵀ for the warp's 16 rows: Kᵀ is K's row-major tile read as column-major.
#pragma unroll
    for (int n = 0; n < kBK / 16; ++n) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> sf;
      wmma::fill_fragment(sf, 0.0f);
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, W, wmma::col_major> kf;
        wmma::load_matrix_sync(kf, reinterpret_cast<const W*>(sk + n * 16 * L::kLdh + kk * 16), L::kLdh);
        wmma::mma_sync(sf, qf[kk], kf, sf);
      }
      wmma::store_matrix_sync(ss + n * 16, sf, L::kLds, wmma::mem_row_major);
    }
    __syncwarp();
    // Online softmax of row r over this tile's columns [32·half, 32·half + 32).
    const float* srow = ss + r * L::kLds + half * 32;
    float sc[32];
    float tile_max = kNegInf;
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      const int key = k0 + half * 32 + j;
      const bool visible = t < a.seq && key < a.seq && (!a.causal || key <= t) && (mask == nullptr || mask[key] != 0);
      sc[j] = visible ? __fmul_rn(srow[j], a.scale) : kNegInf;
      tile_max = fmaxf(tile_max, sc[j]);
    }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    const float m_new = fmaxf(m, tile_max);
    const float corr = m_new == kNegInf ? 1.0f : expf(__fsub_rn(m, m_new));  // m = −inf: 0
    float psum = 0.0f;
    std::uint16_t* prow = sp + r * L::kLdp + half * 32;
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      const float pj = sc[j] == kNegInf ? 0.0f : expf(__fsub_rn(sc[j], m_new));
      psum = __fadd_rn(psum, pj);
      prow[j] = E::store(pj);
    }
    psum = __fadd_rn(psum, __shfl_xor_sync(0xffffffffu, psum, 1));
    l = __fadd_rn(__fmul_rn(l, corr), psum);
    m = m_new;
    float* orow = so + r * L::kLdo + half * (D / 2);
#pragma unroll 8
    for (int c = 0; c < D / 2; ++c) orow[c] = __fmul_rn(orow[c], corr);
    __syncwarp();
    // O += P·V.
    wmma::fragment<wmma::matrix_a, 16, 16, 16, W, wmma::row_major> pf[kBK / 16];
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk)
      wmma::load_matrix_sync(pf[kk], reinterpret_cast<const W*>(sp + kk * 16), L::kLdp);
#pragma unroll
    for (int n = 0; n < D / 16; ++n) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> of;
      wmma::load_matrix_sync(of, so + n * 16, L::kLdo, wmma::mem_row_major);
#pragma unroll
      for (int kk = 0; kk < kBK / 16; ++kk) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, W, wmma::row_major> vf;
        wmma::load_matrix_sync(vf, reinterpret_cast<const W*>(sv + kk * 16 * L::kLdh + n * 16), L::kLdh);
        wmma::mma_sync(of, pf[kk], vf, of);
      }
      wmma::store_matrix_sync(so + n * 16, of, L::kLdo, wmma::mem_row_major);
    }
    __syncwarp();
  }
  if (t < a.seq) {
    const float inv = l > 0.0f ? __fdiv_rn(1.0f, l) : 0.0f;
    std::uint16_t* o = a.out + (row_base + t) * a.ldo + static_cast<std::int64_t>(h) * D + half * (D / 2);
    const float* orow = so + r * L::kLdo + half * (D / 2);
    for (int c = 0; c < D / 2; ++c) o[c] = E::store(__fmul_rn(orow[c], inv));
  }
}

template <class E, int D>
void launch(KernelStream& s, const AttentionArgs& a) {
  auto kernel = flash_attention_kernel<E, D>;
  static const bool configured = [&] {  // once per instantiation (thread-safe static init)
    ZO2_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(Layout<D>::bytes)));
    return true;
  }();
  (void)configured;
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
                  a.causal};
  const dim3 grid(static_cast<unsigned>(ceil_div(std::int64_t{a.seq}, kBQ)), static_cast<unsigned>(a.heads),
                  static_cast<unsigned>(a.batch));
  kernel<<<grid, kThreads, Layout<D>::bytes, s.stream()>>>(args);
  ZO2_CUDA_CHECK_LAUNCH();
}

bool aligned16(const Mat& m) {
  return reinterpret_cast<std::uintptr_t>(m.data) % 16 == 0 && m.ld % 8 == 0;
}

// Whether the fused kernel takes this call: only when ZO2_CUDA_ATTENTION=fused asks for it
// (Note [Fused attention] says why the chunked path is the default).
bool applies(const AttentionArgs& a, Path path) {
  if (path != Path::fused) return false;
  const DType dt = a.q.dtype;
  return (dt == DType::bf16 || dt == DType::f16) && (a.head_dim == 64 || a.head_dim == 128) &&
         aligned16(a.q) && aligned16(a.k) && aligned16(a.v) && aligned16(a.out) && a.batch <= 65535 &&
         a.heads <= 65535;
}

}  // namespace fused

}  // namespace

void attention(KernelStream& s, const AttentionArgs& a) {
  const std::int64_t T = a.seq, D = a.head_dim;
  const std::int64_t pairs = std::int64_t{a.batch} * a.heads;
  if (T == 0 || pairs == 0 || D == 0) return;
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
        if (tk <= kRowMaxKeys && path != Path::chunked_block) {  // Note [Row softmax in registers]
          launch_softmax_rows<E>(s, scores, rows, nq, tk, pa.pair_stride, q0, a.causal, a.key_mask, T,
                                 static_cast<int>(p0), a.heads);
          return;
        }
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
