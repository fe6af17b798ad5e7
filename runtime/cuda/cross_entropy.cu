// Cross-entropy over vocabulary tiles (online logsumexp) and the mean loss — twins of
// ce_accumulate, ce_finish and loss_mean in runtime/cpu/kernels.cpp.
//
// Design: ce_accumulate runs one block per row of the logits tile: the tile's max and
// Σexp(x − max) in fp32 with a fixed reduction tree, then one thread merges them into the
// row's running state [max, sum, target logit] — the merge in double, as on the CPU. Tiles
// come in a fixed order (the caller's), so the result is deterministic. ce_finish is
// element-wise (log in double, as on the CPU). loss_mean is ONE block: each thread sums a
// fixed strided subset in double, then a fixed tree adds the partials; NaN without a target.
// option_loss (MeZO's multiple-choice loss) is one block too, candidates in order.
#include "runtime/cuda/kernel_util.cuh"
#include "runtime/cuda/kernels.h"

namespace zo2::cuda {
namespace {

constexpr int kThreads = 256;

template <class E>
__global__ void __launch_bounds__(kThreads)
    ce_accumulate_kernel(const typename E::T* logits, std::int64_t ld, std::int64_t rows,
                         std::int64_t cols, std::int64_t col_offset,
                         const std::int32_t* targets, float* state, bool first) {
  __shared__ float smem[32];
  for (std::int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const typename E::T* x = logits + r * ld;
    float mx = -__int_as_float(0x7f800000);
    for (std::int64_t c = threadIdx.x; c < cols; c += blockDim.x) mx = max_nan(mx, E::load(x[c]));
    mx = block_max_nan(mx, smem);  // a NaN logit makes the row's loss NaN
    float sum = 0.0f;
    for (std::int64_t c = threadIdx.x; c < cols; c += blockDim.x)
      sum = __fadd_rn(sum, expf(__fsub_rn(E::load(x[c]), mx)));
    sum = block_sum(sum, smem);
    if (threadIdx.x == 0) {
      float* st = state + 3 * r;
      const std::int64_t t = targets[r] - col_offset;
      const bool has_target = t >= 0 && t < cols;
      if (first) {
        st[0] = mx;
        st[1] = sum;
        st[2] = has_target ? E::load(x[t]) : 0.0f;
      } else {
        const float m_new = max_nan(st[0], mx);
        const double combined =
            static_cast<double>(st[1]) * exp(static_cast<double>(__fsub_rn(st[0], m_new))) +
            static_cast<double>(sum) * exp(static_cast<double>(__fsub_rn(mx, m_new)));
        st[0] = m_new;
        st[1] = static_cast<float>(combined);
        if (has_target) st[2] = E::load(x[t]);
      }
    }
  }
}

__global__ void ce_finish_kernel(const float* state, const std::int32_t* targets,
                                 std::int64_t rows, float* row_loss) {
  for (std::int64_t r = std::int64_t{blockIdx.x} * blockDim.x + threadIdx.x; r < rows;
       r += std::int64_t{gridDim.x} * blockDim.x) {
    const float* st = state + 3 * r;
    row_loss[r] = targets[r] < 0 ? 0.0f
                                 : static_cast<float>(static_cast<double>(st[0]) +
                                                      log(static_cast<double>(st[1])) -
                                                      static_cast<double>(st[2]));
  }
}

__global__ void __launch_bounds__(kThreads)
    loss_mean_kernel(const float* row_loss, const std::int32_t* targets, std::int64_t n,
                     float* out) {
  __shared__ double dsmem[32];
  __shared__ long long csmem[32];
  double sum = 0.0;
  long long count = 0;
  for (std::int64_t i = threadIdx.x; i < n; i += blockDim.x)
    if (targets[i] >= 0) {
      sum += static_cast<double>(row_loss[i]);
      ++count;
    }
  sum = block_sum(sum, dsmem);
  count = block_sum(count, csmem);
  if (threadIdx.x == 0)
    out[0] = count > 0 ? static_cast<float>(sum / static_cast<double>(count))
                       : __int_as_float(0x7fc00000);  // quiet NaN
}

// One block: each candidate's (sum, count) by a fixed strided split and tree; thread 0
// folds the scores into the group's online logsumexp in double, as the CPU twin does.
__global__ void __launch_bounds__(kThreads)
    option_loss_kernel(const float* row_loss, const std::int32_t* targets, int batch, int seq,
                       const std::int32_t* info, float* out) {
  __shared__ double dsmem[32];
  __shared__ long long csmem[32];
  const double inf = __longlong_as_double(0x7ff0000000000000LL);
  double total = 0, mx = -inf, se = 0, label = 0;
  int groups = 0, labels = 0;
  bool ok = true;
  for (int r = 0; r < batch; ++r) {
    double sum = 0;
    long long count = 0;
    for (int t = threadIdx.x; t < seq; t += blockDim.x) {
      const std::int64_t i = static_cast<std::int64_t>(r) * seq + t;
      if (targets[i] >= 0) {
        sum += static_cast<double>(row_loss[i]);
        ++count;
      }
    }
    sum = block_sum(sum, dsmem);
    count = block_sum(count, csmem);
    if (threadIdx.x == 0) {
      ok = ok && count > 0;
      const double score = count > 0 ? -sum / static_cast<double>(count) : 0.0;
      if (score > mx) {
        se = se * exp(mx - score) + 1.0;
        mx = score;
      } else {
        se += exp(score - mx);
      }
      if (info[r] & 1) {
        label = score;
        ++labels;
      }
      if (r + 1 == batch || (info[r + 1] >> 1) != (info[r] >> 1)) {
        ok = ok && labels == 1;
        total += mx + log(se) - label;
        ++groups;
        mx = -inf;
        se = 0;
        labels = 0;
      }
    }
  }
  if (threadIdx.x == 0)
    out[0] = ok && groups > 0 ? static_cast<float>(total / groups) : __int_as_float(0x7fc00000);
}

}  // namespace

void ce_accumulate(KernelStream& s, const Mat& logits, std::int64_t col_offset,
                   const std::int32_t* targets, float* state, bool first) {
  if (logits.rows == 0 || logits.cols == 0) return;
  dispatch_activation(logits.dtype, "ce_accumulate", [&](auto e) {
    using E = decltype(e);
    ce_accumulate_kernel<E>
        <<<grid_blocks(s, logits.rows * kThreads, kThreads), kThreads, 0, s.stream()>>>(
            static_cast<const typename E::T*>(logits.data), logits.ld, logits.rows, logits.cols,
            col_offset, targets, state, first);
    ZO2_CUDA_CHECK_LAUNCH();
  });
}

void ce_finish(KernelStream& s, const float* state, const std::int32_t* targets,
               std::int64_t rows, float* row_loss) {
  if (rows == 0) return;
  ce_finish_kernel<<<grid_blocks(s, rows, kThreads), kThreads, 0, s.stream()>>>(state, targets,
                                                                               rows, row_loss);
  ZO2_CUDA_CHECK_LAUNCH();
}

void loss_mean(KernelStream& s, const float* row_loss, const std::int32_t* targets,
               std::int64_t n, float* out) {
  // One block even for n = 0: it writes the NaN.
  loss_mean_kernel<<<1, kThreads, 0, s.stream()>>>(row_loss, targets, n, out);
  ZO2_CUDA_CHECK_LAUNCH();
}

void option_loss(KernelStream& s, const float* row_loss, const std::int32_t* targets, int batch,
                 int seq, const std::int32_t* info, float* out) {
  option_loss_kernel<<<1, kThreads, 0, s.stream()>>>(row_loss, targets, batch, seq, info, out);
  ZO2_CUDA_CHECK_LAUNCH();
}

}  // namespace zo2::cuda
