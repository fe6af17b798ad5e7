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
#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/kernels.h"
#include "runtime/error.h"

#include <climits>

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

}  // namespace

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
