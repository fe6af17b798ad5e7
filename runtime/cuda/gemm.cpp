// GEMM on cuBLAS — the twin of gemm in runtime/cpu/kernels.cpp.
//
// Note [Row-major GEMM on column-major cuBLAS]
//   ops.h's matrices are row-major with a leading dimension; cuBLAS's are column-major. A
//   row-major R×C matrix with leading dimension ld is, byte for byte, the column-major C×R
//   matrix Xᵀ with the same ld. So C = op(A)·op(B) (row-major) is computed as
//   Cᵀ = op(B)ᵀ·op(A)ᵀ (column-major): cuBLAS gets B first, then A, with m = N, n = M,
//   and each operand's transpose flag unchanged (the stored Aᵀ already is op(A)ᵀ when
//   trans_a is false; when trans_a is true, cuBLAS transposes it back).
//
// Numerics: fp32 inputs run with CUBLAS_COMPUTE_32F under CUBLAS_DEFAULT_MATH — never TF32,
// so fp32 results match the CPU's to fp32 rounding. bf16/fp16 inputs use the same compute
// type: tensor cores with fp32 accumulation; C is fp32 or the input dtype. The handle (one
// per stream) forbids reduced-precision split-K reductions, and has a fixed workspace from
// the arena, which makes cuBLAS's results deterministic run to run.
//
// Note [GEMM epilogues]
//   A linear layer is a GEMM, a bias add and (OPT's fc1) a ReLU or (the attention output
//   and the MLP's last layer) a residual add: the default Ops::linear writes y, then reads
//   and writes it once or twice more. Here (ZO2_CUDA_GEMM_EPILOGUE unset, "1" or "on"; "0"
//   or "off": gemm, add_bias, relu, add as on the CPU) it is one cuBLASLt matmul whose epilogue adds the bias and
//   applies the ReLU in fp32 before the result is rounded, once, to its dtype
//   (CUBLASLT_EPILOGUE_BIAS, RELU_BIAS or RELU); a residual is its C with β = 1, in place
//   (C = D = the residual; y is not written) — the same value up to that one rounding, and
//   none of the element-wise passes. The ncu profile of an OPT-1.3B resident step on an H200
//   put the element-wise kernels at 17 % of GPU time; bias adds, the ReLU and the residual
//   adds are 9 of an OPT layer's 11 such passes per branch (the two LayerNorms remain).
//   The operands are laid out as in Note [Row-major GEMM on column-major cuBLAS]: yᵀ (N×M,
//   column-major) = wᵀᵀ·xᵀ, so the bias runs along the rows of cuBLASLt's D, which is how
//   its epilogue broadcasts it. Numerics as gemm(): CUBLAS_COMPUTE_32F (never TF32), split-K
//   reductions only in fp32 (the compute type), never in place in y's dtype. Determinism:
//   the algorithm is cublasLtMatmulAlgoGetHeuristic's first answer for the device, shape,
//   leading dimensions, dtype, epilogue, operand alignments and the stream's fixed
//   workspace, cached per such key, so every call of a shape runs the same algorithm. Where
//   cuBLASLt has none (or the bias is not 16-byte aligned), the call returns false and the
//   default path runs.
//   Written without a GPU, first run on an H100 80GB HBM3 at e4931a4 (bench/RESULTS.md):
//   CudaLinearTest and OpsTest passed, compute-sanitizer memcheck found nothing, and the
//   resident fp16 rows at 1 x 2048 tokens gave OPT-1.3B 33.7k tok/s against 31.1k (+8 %)
//   and OPT-6.7B 13.5k against 12.5k (+8 %); the bf16 fc1 shape (2048 x 4096 -> 16384,
//   ReLU) 365 us against 455 us. Hence the default.
#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/kernels.h"
#include "runtime/error.h"

#include <climits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <tuple>
#include <type_traits>

namespace zo2::cuda {
namespace {

cudaDataType cuda_type(DType dt) {
  switch (dt) {
    case DType::f32: return CUDA_R_32F;
    case DType::bf16: return CUDA_R_16BF;
    case DType::f16: return CUDA_R_16F;
    default: fail(ErrorKind::unsupported, "cuda gemm: {} matrices are not supported", dtype_name(dt));
  }
}

int as_int(std::int64_t v, const char* what) {
  if (v < 0 || v > INT_MAX)
    fail(ErrorKind::unsupported, "cuda gemm: {} = {} does not fit cuBLAS's int arguments", what, v);
  return static_cast<int>(v);
}

// The largest power of two (up to 256) that divides the address: cuBLASLt's alignment
// preferences are in bytes.
std::uint32_t alignment(const void* p) {
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  std::uint32_t al = 256;
  while (al > 1 && a % al != 0) al /= 2;
  return al;
}

template <class T, cublasStatus_t (*Destroy)(T)>
struct LtDeleter {
  void operator()(T h) const noexcept { (void)Destroy(h); }
};
using MatmulDesc = std::unique_ptr<std::remove_pointer_t<cublasLtMatmulDesc_t>,
                                   LtDeleter<cublasLtMatmulDesc_t, cublasLtMatmulDescDestroy>>;
using MatrixLayout = std::unique_ptr<std::remove_pointer_t<cublasLtMatrixLayout_t>,
                                     LtDeleter<cublasLtMatrixLayout_t, cublasLtMatrixLayoutDestroy>>;
using Preference = std::unique_ptr<std::remove_pointer_t<cublasLtMatmulPreference_t>,
                                   LtDeleter<cublasLtMatmulPreference_t, cublasLtMatmulPreferenceDestroy>>;

MatrixLayout layout(cudaDataType type, std::int64_t rows, std::int64_t cols, std::int64_t ld) {
  cublasLtMatrixLayout_t l = nullptr;
  ZO2_CUDA_CHECK(cublasLtMatrixLayoutCreate(&l, type, static_cast<std::uint64_t>(rows),
                                            static_cast<std::uint64_t>(cols), ld));
  return MatrixLayout(l);
}

template <class V>
void set(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t attr, const V& value) {
  ZO2_CUDA_CHECK(cublasLtMatmulDescSetAttribute(d, attr, &value, sizeof(value)));
}
template <class V>
void set(cublasLtMatmulPreference_t p, cublasLtMatmulPreferenceAttributes_t attr, const V& value) {
  ZO2_CUDA_CHECK(cublasLtMatmulPreferenceSetAttribute(p, attr, &value, sizeof(value)));
}

// The cached algorithm of each (device, shape, lds, dtype, epilogue, alignments, workspace);
// β (0, or 1 with a residual) is not an input of the heuristic.
// The heuristic reads the bias pointer's alignment from the descriptor (cublasLt.h), so it
// is part of the key too.
using AlgoKey = std::tuple<int, std::int64_t, std::int64_t, std::int64_t, std::int64_t, std::int64_t,
                           std::int64_t, int, int, std::uint32_t, std::uint32_t, std::uint32_t, std::uint32_t,
                           std::size_t>;
std::mutex algo_mutex;
std::map<AlgoKey, std::optional<cublasLtMatmulAlgo_t>>& algo_cache() {
  static std::map<AlgoKey, std::optional<cublasLtMatmulAlgo_t>> cache;
  return cache;
}

}  // namespace

bool gemm_epilogue_enabled() { return env_choice("ZO2_CUDA_GEMM_EPILOGUE", {"1", "on", "0", "off"}) < 2; }

bool linear_epilogue(KernelStream& s, const Mat& x, const Mat& w, const Mat& y, const void* bias, bool relu,
                     const Mat* residual) {
  const std::int64_t m = x.rows, k = x.cols, n = w.rows;
  if (w.cols != k || y.rows != m || y.cols != n)
    fail(ErrorKind::internal, "cuda linear: shapes do not match (x {}x{}, w {}x{}, y {}x{})", x.rows, x.cols,
         w.rows, w.cols, y.rows, y.cols);
  if (x.dtype != w.dtype || y.dtype != x.dtype) return false;  // gemm() says what is wrong
  if (bias == nullptr && !relu && residual == nullptr) return false;  // nothing to fuse
  // cuBLASLt applies the ReLU after adding C; Ops::linear adds the residual after the ReLU.
  if (relu && residual != nullptr) return false;
  // With a residual, D = C = the residual (in place, β = 1): y, the scratch, is not written.
  const Mat& d_mat = residual != nullptr ? *residual : y;
  if (bias != nullptr && alignment(bias) < 16) return false;
  if (m == 0 || n == 0) return true;
  if (k == 0) return false;  // y = bias (then ReLU): what an epilogue does with K = 0 is not documented
  if (x.ld < x.cols || w.ld < w.cols || d_mat.ld < d_mat.cols)
    fail(ErrorKind::internal, "cuda linear: a leading dimension is smaller than its row");
  as_int(m, "M");
  as_int(n, "N");
  as_int(k, "K");
  const cudaDataType type = cuda_type(x.dtype);
  const cublasLtEpilogue_t epilogue =
      bias == nullptr ? (relu ? CUBLASLT_EPILOGUE_RELU : CUBLASLT_EPILOGUE_DEFAULT)
                      : (relu ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_BIAS);

  cublasLtMatmulDesc_t d = nullptr;
  ZO2_CUDA_CHECK(cublasLtMatmulDescCreate(&d, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const MatmulDesc desc(d);
  set(d, CUBLASLT_MATMUL_DESC_TRANSA, CUBLAS_OP_T);  // w as stored is wᵀ (K×N column-major)
  set(d, CUBLASLT_MATMUL_DESC_TRANSB, CUBLAS_OP_N);  // x as stored is xᵀ (K×M)
  set(d, CUBLASLT_MATMUL_DESC_EPILOGUE, epilogue);
  if (bias != nullptr) set(d, CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias);  // y's dtype (the default)
  const MatrixLayout la = layout(type, k, n, std::max<std::int64_t>(w.ld, 1));
  const MatrixLayout lb = layout(type, k, m, std::max<std::int64_t>(x.ld, 1));
  const MatrixLayout lc = layout(type, n, m, std::max<std::int64_t>(d_mat.ld, 1));

  std::size_t workspace_bytes = 0;
  void* workspace = s.blas_workspace(&workspace_bytes);
  int device = 0;
  ZO2_CUDA_CHECK(cudaGetDevice(&device));
  const std::uint32_t align_a = alignment(w.data), align_b = alignment(x.data), align_c = alignment(d_mat.data);
  const AlgoKey key{device, m, n, k, w.ld, x.ld, d_mat.ld, static_cast<int>(x.dtype), static_cast<int>(epilogue),
                    align_a, align_b, align_c, bias != nullptr ? alignment(bias) : 0u, workspace_bytes};
  std::optional<cublasLtMatmulAlgo_t> algo;
  {
    std::lock_guard lock(algo_mutex);
    auto& cache = algo_cache();
    if (auto it = cache.find(key); it != cache.end()) {
      algo = it->second;
    } else {
      cublasLtMatmulPreference_t p = nullptr;
      ZO2_CUDA_CHECK(cublasLtMatmulPreferenceCreate(&p));
      const Preference pref(p);
      set(p, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, static_cast<std::uint64_t>(workspace_bytes));
      set(p, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
          static_cast<std::uint32_t>(CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE));
      set(p, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_a);
      set(p, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_b);
      set(p, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_c);
      set(p, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_c);
      cublasLtMatmulHeuristicResult_t result{};
      int found = 0;
      const cublasStatus_t status =
          cublasLtMatmulAlgoGetHeuristic(s.blas_lt(), d, la.get(), lb.get(), lc.get(), lc.get(), p, 1, &result, &found);
      if (status == CUBLAS_STATUS_SUCCESS && found > 0 && result.state == CUBLAS_STATUS_SUCCESS &&
          result.workspaceSize <= workspace_bytes)
        algo = result.algo;
      cache.emplace(key, algo);
    }
  }
  if (!algo) return false;
  const float one = 1.0f, beta = residual != nullptr ? 1.0f : 0.0f;
  ZO2_CUDA_CHECK(cublasLtMatmul(s.blas_lt(), d, &one, w.data, la.get(), x.data, lb.get(), &beta, d_mat.data, lc.get(),
                                d_mat.data, lc.get(), &*algo, workspace, workspace_bytes, s.stream()));
  return true;
}

void gemm(KernelStream& s, const Mat& a, bool trans_a, const Mat& b, bool trans_b, const Mat& c,
          float alpha, float beta) {
  const std::int64_t m = trans_a ? a.cols : a.rows;
  const std::int64_t k = trans_a ? a.rows : a.cols;
  const std::int64_t kb = trans_b ? b.cols : b.rows;
  const std::int64_t n = trans_b ? b.rows : b.cols;
  if (kb != k || c.rows != m || c.cols != n)
    fail(ErrorKind::internal, "cuda gemm: shapes do not match (A {}x{}{}, B {}x{}{}, C {}x{})",
         a.rows, a.cols, trans_a ? "ᵀ" : "", b.rows, b.cols, trans_b ? "ᵀ" : "", c.rows, c.cols);
  if (a.dtype != b.dtype)
    fail(ErrorKind::unsupported, "cuda gemm: A is {} but B is {}", dtype_name(a.dtype),
         dtype_name(b.dtype));
  if (c.dtype != DType::f32 && c.dtype != a.dtype)
    fail(ErrorKind::unsupported, "cuda gemm: C must be fp32 or {} (the inputs' dtype), not {}",
         dtype_name(a.dtype), dtype_name(c.dtype));
  // A row-major matrix's ld is its column-major "lda" and must cover its columns.
  if (a.ld < a.cols || b.ld < b.cols || c.ld < c.cols)
    fail(ErrorKind::internal, "cuda gemm: a leading dimension is smaller than its row");
  if (m == 0 || n == 0) return;
  const cudaDataType ta = cuda_type(a.dtype), tc = cuda_type(c.dtype);
  ZO2_CUDA_CHECK(cublasGemmEx(
      s.blas(), trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
      as_int(n, "N"), as_int(m, "M"), as_int(k, "K"), &alpha, b.data, ta,
      as_int(std::max<std::int64_t>(b.ld, 1), "ldb"), a.data, ta,
      as_int(std::max<std::int64_t>(a.ld, 1), "lda"), &beta, c.data, tc,
      as_int(std::max<std::int64_t>(c.ld, 1), "ldc"), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

}  // namespace zo2::cuda
