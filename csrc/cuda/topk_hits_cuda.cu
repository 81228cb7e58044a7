// CUDA kernel of refit::topk_hits. Plain CUDA: no torch headers, so
// `nvcc -c -arch=sm_90 -I csrc/include` compiles this file on any machine.
//
// One block per row, no sort of the row. Every item has a 64-bit key that
// orders (score, item) pairs as the ranking rule does (refit/topk_hits.h:
// score code in the high word, ~item in the low word), so all keys of a row
// are distinct and "the Kmax best items" is "the Kmax largest keys":
//
//   1. radix select, 8 bits per pass from the top: a shared histogram of the
//      next digit over the items whose higher digits match the prefix found
//      so far (excluded items are counted and then subtracted, so the pass
//      needs no per-item exclusion test); it stops as soon as the items
//      matching the prefix are exactly the ones still needed;
//   2. compaction of the items whose key is at or above the prefix (the only
//      place an item is tested against the exclusion list, by binary search)
//      into shared memory;
//   3. ranks by counting (rank = number of larger selected keys), and the
//      selected items in id order for lookups;
//   4. positives and each neighbor's items, looked up by binary search among
//      the selected items, mark hits per rank; thread 0 sums them per k.
//
// Bad input never leads to an out-of-bounds access: every CSR row is checked
// (indptr range, columns in [0, I), strictly increasing) before it is used,
// and ids before they index anything; the first problem of the row goes into
// its report and the block stops. The host raises from the reports.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "launchers.h"
#include "ranking.cuh"
#include "refit/topk_hits.h"

namespace refit {
namespace cuda {
namespace {

thread_local cudaError_t g_topk_error = cudaSuccess;

constexpr int kThreads = 256;
constexpr int kMaxK = static_cast<int>(kTopKMaxK);

template <typename T>
__device__ __forceinline__ uint64_t key_at(const T* row, int64_t item) {
  return topk::rank_key(to_float(row[item]), static_cast<uint32_t>(item));
}

// The rank of `item` among the n selected items (given in id order), or -1.
__device__ int rank_of(const int32_t* by_id, const int32_t* rank_by_id, int n, int64_t item) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (by_id[mid] < item) lo = mid + 1;
    else hi = mid;
  }
  return (lo < n && by_id[lo] == item) ? rank_by_id[lo] : -1;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) topk_hits_kernel(const TopKHitsParams p) {
  __shared__ unsigned long long s_sel[kMaxK];  // selected keys, in no order
  __shared__ int32_t s_ranked[kMaxK];          // item at rank r
  __shared__ int32_t s_by_id[kMaxK];           // selected items in increasing id order
  __shared__ int32_t s_rank_by_id[kMaxK];      // rank of s_by_id[j]
  __shared__ int32_t s_hit[kMaxK];             // 1 where rank r holds a positive
  __shared__ int32_t s_cnt[kMaxK];             // neighbors whose set holds rank r's item
  __shared__ unsigned int s_hist[256];
  __shared__ unsigned long long s_first;
  __shared__ int s_count;
  __shared__ int s_digit;
  __shared__ unsigned int s_above, s_equal;

  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x;
  const int64_t I = p.items;
  const int64_t kmax = p.kmax;
  int64_t* rep = p.report + b * topk::kErrorFields;
  const T* row = static_cast<const T*>(p.scores) + b * p.score_row_stride;
  const int64_t u = p.users ? p.users[b] : b;  // the same value in every thread

  // 1. The exclusion row.
  int64_t ex_lo = 0, ex_hi = 0;
  if (p.exclude.indptr && !checked_user_row(p.exclude, u, I, Arg::kExclude, rep, &ex_lo, &ex_hi, &s_first)) return;

  // 2. NaN anywhere in the row is an error.
  if (tid == 0) s_first = static_cast<unsigned long long>(I);
  __syncthreads();
  for (int64_t i = tid; i < I; i += blockDim.x) {
    if (isnan(to_float(row[i]))) atomicMin(&s_first, static_cast<unsigned long long>(i));
  }
  __syncthreads();
  const int64_t nan_at = static_cast<int64_t>(s_first);
  __syncthreads();
  if (nan_at < I) {
    if (tid == 0) report(rep, RowError::kNaN, Arg::kScores, 0, nan_at);
    return;
  }

  // 3. Radix select of the `need` largest keys among the rankable items.
  const int64_t rankable = I - (ex_hi - ex_lo);
  const int need = static_cast<int>(rankable < kmax ? rankable : kmax);
  if (need > 0) {
    uint64_t prefix = 0, mask = 0;
    unsigned int remaining = static_cast<unsigned int>(need);
    for (int shift = 56; shift >= 0; shift -= 8) {
      for (int d = tid; d < 256; d += blockDim.x) s_hist[d] = 0;
      __syncthreads();
      for (int64_t i = tid; i < I; i += blockDim.x) {
        const uint64_t key = key_at(row, i);
        if ((key & mask) == prefix) atomicAdd(&s_hist[(key >> shift) & 0xFF], 1u);
      }
      for (int64_t j = ex_lo + tid; j < ex_hi; j += blockDim.x) {
        const uint64_t key = key_at(row, p.exclude.indices[j]);
        if ((key & mask) == prefix) atomicSub(&s_hist[(key >> shift) & 0xFF], 1u);
      }
      __syncthreads();
      if (tid == 0) {
        // The digit of the remaining-th largest key: the counts of the digits
        // above it sum to less than `remaining`.
        unsigned int above = 0;
        int d = 255;
        for (; d > 0; --d) {
          if (above + s_hist[d] >= remaining) break;
          above += s_hist[d];
        }
        s_digit = d;
        s_above = above;
        s_equal = s_hist[d];
      }
      __syncthreads();
      prefix |= static_cast<uint64_t>(s_digit) << shift;
      mask |= uint64_t(0xFF) << shift;
      remaining -= s_above;
      // Every item matching the prefix is needed: the selection is
      // "key & mask >= prefix". (Keys are distinct, so this holds at the
      // latest when all 64 bits are fixed.)
      if (s_equal == remaining) break;
    }

    // 4. Compaction.
    if (tid == 0) s_count = 0;
    __syncthreads();
    for (int64_t i = tid; i < I; i += blockDim.x) {
      const uint64_t key = key_at(row, i);
      if ((key & mask) >= prefix && !(ex_hi > ex_lo && contains(p.exclude.indices, ex_lo, ex_hi, i))) {
        const int slot = atomicAdd(&s_count, 1);
        if (slot < need) s_sel[slot] = key;
      }
    }
    __syncthreads();
    if (s_count != need) {
      if (tid == 0) report(rep, RowError::kInternal, Arg::kScores, 0, s_count);
      return;
    }

    // 5. Ranks by counting: keys are distinct, so ranks are a permutation.
    for (int j = tid; j < need; j += blockDim.x) {
      const uint64_t key = s_sel[j];
      const uint32_t item = topk::item_of_key(key);
      int r = 0, pos = 0;
      for (int t = 0; t < need; ++t) {
        const uint64_t other = s_sel[t];
        r += other > key;
        pos += topk::item_of_key(other) < item;
      }
      s_ranked[r] = static_cast<int32_t>(item);
      s_by_id[pos] = static_cast<int32_t>(item);
      s_rank_by_id[pos] = r;
    }
  }
  for (int r = tid; r < kmax; r += blockDim.x) {
    s_hit[r] = 0;
    s_cnt[r] = 0;
  }
  __syncthreads();

  // 6. Positives and neighbors.
  int64_t lo = 0, hi = 0;
  if (p.positives.indptr) {
    if (!checked_user_row(p.positives, u, I, Arg::kPositives, rep, &lo, &hi, &s_first)) return;
    for (int64_t j = lo + tid; j < hi; j += blockDim.x) {
      const int r = rank_of(s_by_id, s_rank_by_id, need, p.positives.indices[j]);
      if (r >= 0) s_hit[r] = 1;
    }
  }
  int64_t n_valid = 0;
  if (p.neighbors) {
    for (int64_t m = 0; m < p.n_neighbors; ++m) {
      const int64_t v = p.neighbors[b * p.n_neighbors + m];
      if (v == -1) continue;
      if (v < -1 || v >= p.neighbor_sets.rows) {
        if (tid == 0) report(rep, RowError::kNeighborOutOfRange, Arg::kNeighbors, m, v);
        return;
      }
      if (!checked_row(p.neighbor_sets, v, I, Arg::kNeighborSets, rep, &lo, &hi, &s_first)) return;
      ++n_valid;
      for (int64_t j = lo + tid; j < hi; j += blockDim.x) {
        const int r = rank_of(s_by_id, s_rank_by_id, need, p.neighbor_sets.indices[j]);
        if (r >= 0) atomicAdd(&s_cnt[r], 1);
      }
    }
  }
  __syncthreads();

  // 7. Per-k sums, in rank order (the CPU kernel's order), by one thread.
  if (tid == 0) {
    int64_t h = 0, c = 0, first = -1, jk = 0;
    double d = 0.0;
    for (int64_t r = 0; r < kmax; ++r) {
      if (s_hit[r]) {
        ++h;
        d += topk::discount(r);
        if (first < 0) first = r;
      }
      c += s_cnt[r];
      if (jk < p.n_ks && r + 1 == p.ks[jk]) {
        const int64_t o = b * p.n_ks + jk;
        p.hits[o] = h;
        p.dcg[o] = static_cast<float>(d);
        p.neighbor_hits[o] =
            n_valid > 0 ? static_cast<float>(static_cast<double>(c) / static_cast<double>(n_valid)) : 0.0f;
        ++jk;
      }
    }
    p.first_hit[b] = first;
  }
  if (p.indices) {
    for (int64_t r = tid; r < kmax; r += blockDim.x) p.indices[b * kmax + r] = r < need ? s_ranked[r] : -1;
  }
}

template <typename T>
LaunchStatus launch(const TopKHitsParams& p, cudaStream_t stream) {
  topk_hits_kernel<T><<<static_cast<unsigned>(p.rows), kThreads, 0, stream>>>(p);
  g_topk_error = cudaGetLastError();
  return g_topk_error == cudaSuccess ? LaunchStatus::kOk : LaunchStatus::kCudaError;
}

}  // namespace

LaunchStatus topk_hits(DType dtype, const TopKHitsParams& params, void* stream) {
  if (params.rows < 0 || params.rows > 0x7fffffff || params.kmax < 1 || params.kmax > kTopKMaxK ||
      params.items < params.kmax || params.items > 0x7fffffff) {
    return LaunchStatus::kBadShape;
  }
  if (params.rows == 0) return LaunchStatus::kOk;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  return for_score_dtype<false>(dtype, [&](auto t) { return launch<decltype(t)>(params, st); });
}

const char* topk_hits_error_string() { return cudaGetErrorString(g_topk_error); }

}  // namespace cuda
}  // namespace refit
