// Device helpers shared by the CUDA kernels of the ranking ops (topk_hits,
// target_rank), one block per scores row: scores widened to float, and CSR
// rows checked before they are used, the first problem going into the row's
// report (the layout of refit/topk_hits.h). Plain CUDA, no torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "launchers.h"
#include "refit/topk_hits.h"

namespace refit {
namespace cuda {

using topk::Arg;
using topk::RowError;

// Calls launch(T()) with T the element type of `dtype`, among the score types
// a kernel takes (double only when kWithDouble); kBadDType for the others.
template <bool kWithDouble, typename Launch>
LaunchStatus for_score_dtype(DType dtype, Launch&& launch) {
  switch (dtype) {
    case DType::kFloat32: return launch(float());
    case DType::kFloat16: return launch(__half());
    case DType::kBFloat16: return launch(__nv_bfloat16());
    case DType::kFloat64:
      if constexpr (kWithDouble) return launch(double());
      return LaunchStatus::kBadDType;
    default: return LaunchStatus::kBadDType;
  }
}

// 16-bit scores widen to float exactly, so comparisons keep their order and ties.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ inline void report(int64_t* rep, RowError code, Arg arg, int64_t row, int64_t detail) {
  rep[0] = static_cast<int64_t>(code);
  rep[1] = static_cast<int64_t>(arg);
  rep[2] = row;
  rep[3] = detail;
}

// Block-wide: the first position j in [lo, hi) whose column is out of
// [0, I) or not above the previous one; hi when there is none. Every thread
// of the block must call it (it synchronises); all get the same answer.
__device__ inline int64_t first_bad_column(const int64_t* __restrict__ idx, int64_t lo, int64_t hi,
                                           int64_t items, unsigned long long* s_first) {
  if (threadIdx.x == 0) *s_first = static_cast<unsigned long long>(hi);
  __syncthreads();
  for (int64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) {
    const int64_t c = idx[j];
    if (c < 0 || c >= items || (j > lo && c <= idx[j - 1])) {
      atomicMin(s_first, static_cast<unsigned long long>(j));
    }
  }
  __syncthreads();
  const int64_t first = static_cast<int64_t>(*s_first);
  __syncthreads();  // all have read it before the next use overwrites it
  return first;
}

// Checks CSR row r and gives its [lo, hi); on a problem thread 0 reports it
// and every thread gets false. Block-wide, like first_bad_column.
__device__ inline bool checked_row(const TopKCsrView& m, int64_t r, int64_t items, Arg arg, int64_t* rep,
                                   int64_t* lo, int64_t* hi, unsigned long long* s_first) {
  const int64_t a = m.indptr[r], b = m.indptr[r + 1];
  if (!(0 <= a && a <= b && b <= m.nnz)) {
    if (threadIdx.x == 0) report(rep, RowError::kBadIndptr, arg, r, 0);
    return false;
  }
  const int64_t first = first_bad_column(m.indices, a, b, items, s_first);
  if (first < b) {
    if (threadIdx.x == 0) {
      const int64_t c = m.indices[first];
      report(rep, (c < 0 || c >= items) ? RowError::kColumnOutOfRange : RowError::kUnsorted, arg, r, c);
    }
    return false;
  }
  *lo = a;
  *hi = b;
  return true;
}

// Block-wide: checks CSR row u = users[b] (in range, then as checked_row
// does) and gives its [lo, hi); on a problem thread 0 reports it and every
// thread gets false.
__device__ inline bool checked_user_row(const TopKCsrView& m, int64_t u, int64_t items, Arg arg, int64_t* rep,
                                        int64_t* lo, int64_t* hi, unsigned long long* s_first) {
  if (u < 0 || u >= m.rows) {
    if (threadIdx.x == 0) report(rep, RowError::kUserOutOfRange, arg, 0, u);
    return false;
  }
  return checked_row(m, u, items, arg, rep, lo, hi, s_first);
}

// Whether `item` is among the sorted indices [lo, hi).
__device__ inline bool contains(const int64_t* __restrict__ idx, int64_t lo, int64_t hi, int64_t item) {
  const int64_t end = hi;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (idx[mid] < item) lo = mid + 1;
    else hi = mid;
  }
  return lo < end && idx[lo] == item;
}

}  // namespace cuda
}  // namespace refit
