// CUDA kernel of refit::target_rank. Plain CUDA: no torch headers, so
// `nvcc -c -arch=sm_90 -I csrc/include` compiles this file on any machine.
//
// One block per row, one pass over the row for up to kChunk positives: the
// positives' scores and ids sit in every thread's registers, each thread
// streams its share of the row (coalesced) and counts, per positive, the
// items that beat it (refit/target_rank.h), then takes off the excluded
// items of its share of the exclude row; the block sums the counts in
// shared memory. A row with more positives takes one pass per kChunk of
// them (the row is then read again from L2). No selection, no sort.
//
// Bad input never leads to an out-of-bounds access: both CSR rows are
// checked before any id in them indexes the scores (ranking.cuh), and the
// first problem of the row goes into its report in the order every backend
// checks (exclude, NaN, positives). The host raises from the reports.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "launchers.h"
#include "ranking.cuh"
#include "refit/target_rank.h"
#include "refit/topk_hits.h"

namespace refit {
namespace cuda {
namespace {

thread_local cudaError_t g_target_rank_error = cudaSuccess;

constexpr int kThreads = 256;
// Positives counted per pass over the row (their counters live in registers).
constexpr int kChunk = 8;

// Scores as compared: 16-bit and float as float (exact), double as double.
template <typename T>
__device__ __forceinline__ float score_of(T v) { return to_float(v); }
__device__ __forceinline__ double score_of(double v) { return v; }

template <typename T>
__global__ void __launch_bounds__(kThreads) target_rank_kernel(const TargetRankParams p) {
  using acc_t = decltype(score_of(T()));
  __shared__ unsigned long long s_first;
  __shared__ int64_t s_pending[topk::kErrorFields];  // the positives' problem, reported after NaN
  __shared__ int s_cnt[kChunk];

  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x;
  const int64_t I = p.items;
  int64_t* rep = p.report + b * topk::kErrorFields;
  const T* row = static_cast<const T*>(p.scores) + b * p.score_row_stride;
  const int64_t u = p.users ? p.users[b] : b;  // the same value in every thread

  // 1. The exclusion row.
  int64_t ex_lo = 0, ex_hi = 0;
  if (p.exclude.indptr && !checked_user_row(p.exclude, u, I, Arg::kExclude, rep, &ex_lo, &ex_hi, &s_first)) return;

  // 2. The positives: needed for the pass, reported only after the scores.
  int64_t lo = 0, hi = 0;
  const bool pos_ok = checked_user_row(p.positives, u, I, Arg::kPositives, s_pending, &lo, &hi, &s_first);
  const int64_t np = pos_ok ? hi - lo : 0;
  const int64_t* pos = p.positives.indices + lo;
  int64_t* out = p.ranks + (p.starts ? p.starts[b] : lo);

  // 3. The pass (at least one, which finds NaN), kChunk positives at a time.
  if (tid == 0) s_first = static_cast<unsigned long long>(I);
  for (int64_t c0 = 0; c0 == 0 || c0 < np; c0 += kChunk) {
    const int nc = static_cast<int>(np - c0 < kChunk ? np - c0 : kChunk);
    acc_t sp[kChunk];
    int64_t pi[kChunk];
    int cnt[kChunk];
#pragma unroll
    for (int k = 0; k < kChunk; ++k) {
      pi[k] = k < nc ? pos[c0 + k] : 0;
      sp[k] = k < nc ? score_of(row[pi[k]]) : acc_t(0);
      cnt[k] = 0;
    }
    if (tid < kChunk) s_cnt[tid] = 0;
    __syncthreads();  // s_first set and s_cnt zeroed before any thread updates them
    for (int64_t i = tid; i < I; i += blockDim.x) {
      const acc_t s = score_of(row[i]);
      if (c0 == 0 && isnan(s)) atomicMin(&s_first, static_cast<unsigned long long>(i));
#pragma unroll
      for (int k = 0; k < kChunk; ++k) {
        if (k < nc) cnt[k] += target_rank::beats(s, i, sp[k], pi[k]);
      }
    }
    for (int64_t j = ex_lo + tid; j < ex_hi; j += blockDim.x) {
      const int64_t e = p.exclude.indices[j];
      const acc_t s = score_of(row[e]);
#pragma unroll
      for (int k = 0; k < kChunk; ++k) {
        if (k < nc) cnt[k] -= target_rank::beats(s, e, sp[k], pi[k]);
      }
    }
#pragma unroll
    for (int k = 0; k < kChunk; ++k) {
      if (cnt[k] != 0) atomicAdd(&s_cnt[k], cnt[k]);
    }
    __syncthreads();
    if (tid < nc) {
      const bool excluded = ex_hi > ex_lo && contains(p.exclude.indices, ex_lo, ex_hi, pi[tid]);
      out[c0 + tid] = excluded ? target_rank::kExcludedRank : static_cast<int64_t>(s_cnt[tid]);
    }
    __syncthreads();  // s_cnt read before the next chunk zeroes it
  }

  // 4. The report, in the order every backend checks.
  const int64_t nan_at = static_cast<int64_t>(s_first);
  if (tid == 0) {
    if (nan_at < I) {
      report(rep, RowError::kNaN, Arg::kScores, 0, nan_at);
    } else if (!pos_ok) {
      for (int f = 0; f < topk::kErrorFields; ++f) rep[f] = s_pending[f];
    }
  }
}

template <typename T>
LaunchStatus launch(const TargetRankParams& p, cudaStream_t stream) {
  target_rank_kernel<T><<<static_cast<unsigned>(p.rows), kThreads, 0, stream>>>(p);
  g_target_rank_error = cudaGetLastError();
  return g_target_rank_error == cudaSuccess ? LaunchStatus::kOk : LaunchStatus::kCudaError;
}

}  // namespace

LaunchStatus target_rank(DType dtype, const TargetRankParams& params, void* stream) {
  if (params.rows < 0 || params.rows > 0x7fffffff || params.items < 0 || params.items > 0x7fffffff ||
      params.positives.indptr == nullptr) {
    return LaunchStatus::kBadShape;
  }
  if (params.rows == 0) return LaunchStatus::kOk;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  return for_score_dtype<true>(dtype, [&](auto t) { return launch<decltype(t)>(params, st); });
}

const char* target_rank_error_string() { return cudaGetErrorString(g_target_rank_error); }

}  // namespace cuda
}  // namespace refit
