// CPU kernel of refit::topk_hits: threads over rows. Per row: the scores are
// widened into a buffer (NaN check) with the excluded items blanked, the best
// Kmax items are selected without sorting the row (a threshold from block
// maxima, the few items above it, a branch-free quickselect; O(I) per row),
// and hits, DCG and neighbor hits are read from the ranked list through a
// per-thread table item -> rank. Nothing of size B x I is allocated.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../topk_hits.h"
#include "common.h"
#include "csr_rows.h"
#include "refit/topk_hits.h"

namespace refit {
namespace {

using cpu::AccOf;
using cpu::checked_row;
using cpu::checked_row_of;
using cpu::CsrView;
using cpu::report;
using cpu::view_of;
using topk::Arg;
using topk::RowError;

// Keys that order (score, item) pairs as the ranking rule does, larger first:
// the score's order-preserving code above ~item (refit/topk_hits.h, shared
// with the CUDA kernel; float64 scores need 96 bits). One integer comparison
// decides rank, ties included.
template <typename acc_t> struct KeyOf;
template <> struct KeyOf<float> {
  using type = uint64_t;
  static REFIT_INLINE type key(float x, int64_t item) { return topk::rank_key(x, static_cast<uint32_t>(item)); }
};
template <> struct KeyOf<double> {
  using type = unsigned __int128;
  static REFIT_INLINE type key(double x, int64_t item) {
    x = (x == 0.0) ? 0.0 : x;
    uint64_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    const uint64_t code = (bits >> 63) ? ~bits : (bits | (uint64_t(1) << 63));
    return (static_cast<type>(code) << 32) | static_cast<uint32_t>(~static_cast<uint32_t>(item));
  }
};

template <typename key_t>
REFIT_INLINE uint32_t item_of(key_t key) {
  return ~static_cast<uint32_t>(key);
}

// The k-th largest (1-based, 1 <= k <= n) of a[0, n); clobbers a and
// scratch[0, n). A quickselect whose partition step has no data-dependent
// branch (each value is written to both sides and the side's length grows by
// a comparison), so it costs a few cycles per value and pass instead of the
// branch mispredictions of std::nth_element.
//
// Median-of-three pivots can be driven to O(n^2) by adversarial inputs;
// after 2 log2(n) + 8 passes the rest goes to std::nth_element (O(n log n)
// at worst).
template <typename T>
REFIT_INLINE T kth_largest(T* __restrict__ a, int64_t n, int64_t k, T* __restrict__ scratch) {
  int passes = 8;
  for (int64_t m = n; m > 1; m >>= 1) passes += 2;
  while (n > 24) {
    if (--passes < 0) {
      std::nth_element(a, a + (k - 1), a + n, std::greater<T>());
      return a[k - 1];
    }
    const T p0 = a[0], p1 = a[n / 2], p2 = a[n - 1];
    const T pivot = std::max(std::min(p0, p1), std::min(std::max(p0, p1), p2));  // median of three
    int64_t n_gt = 0, n_lt = 0;
    for (int64_t i = 0; i < n; ++i) {
      const T v = a[i];
      a[n_gt] = v;  // n_gt <= i: never overwrites a value not yet read
      n_gt += v > pivot;
      scratch[n_lt] = v;
      n_lt += v < pivot;
    }
    if (k <= n_gt) {
      n = n_gt;
    } else if (k > n - n_lt) {
      k -= n - n_lt;
      std::copy(scratch, scratch + n_lt, a);
      n = n_lt;
    } else {
      return pivot;
    }
  }
  std::sort(a, a + n, std::greater<T>());
  return a[k - 1];
}

// Maxima of the blocks of 2^log2_block consecutive scores (excluded items,
// NaN, count as -inf). Power-of-two blocks keep the inner loop a plain
// vectorised max.
template <typename acc_t, int64_t kBlock>
REFIT_INLINE int64_t block_maxima_fixed(const acc_t* __restrict__ x, int64_t n, acc_t* __restrict__ out) {
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  int64_t nb = 0, i0 = 0;
  for (; i0 + kBlock <= n; i0 += kBlock) {
    acc_t m = neg_inf;
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < kBlock; ++j) {
      const acc_t v = x[i0 + j];
      m = std::max(m, v == v ? v : neg_inf);
    }
    out[nb++] = m;
  }
  if (i0 < n) {
    acc_t m = neg_inf;
    for (int64_t j = i0; j < n; ++j) m = std::max(m, x[j] == x[j] ? x[j] : neg_inf);
    out[nb++] = m;
  }
  return nb;
}

template <typename acc_t>
REFIT_INLINE int64_t block_maxima(const acc_t* x, int64_t n, int log2_block, acc_t* out) {
  switch (log2_block) {
    case 0: return block_maxima_fixed<acc_t, 1>(x, n, out);
    case 1: return block_maxima_fixed<acc_t, 2>(x, n, out);
    case 2: return block_maxima_fixed<acc_t, 4>(x, n, out);
    case 3: return block_maxima_fixed<acc_t, 8>(x, n, out);
    case 4: return block_maxima_fixed<acc_t, 16>(x, n, out);
    case 5: return block_maxima_fixed<acc_t, 32>(x, n, out);
    default: return block_maxima_fixed<acc_t, 64>(x, n, out);
  }
}

// The ids of the scores >= t, in increasing order, into out (which has room
// for n + 16 entries); NaN is never >= t. Branch-free: every id is written
// and the length grows by the comparison.
template <typename acc_t>
REFIT_INLINE int64_t collect_at_least(const acc_t* __restrict__ x, int64_t n, acc_t t, int32_t* __restrict__ out) {
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) {
    out[count] = static_cast<int32_t>(i);
    count += x[i] >= t;
  }
  return count;
}

#ifdef REFIT_HAVE_AVX512
#define REFIT_HAVE_AVX512_COLLECT 1
// The same with AVX-512: 16 compares, a compress of the passing ids into a
// register and one store per step (the compress-to-memory form is much slower
// on some CPUs).
__attribute__((target("avx512f"))) int64_t collect_at_least_avx512(const float* __restrict__ x, int64_t n,
                                                                   float t, int32_t* __restrict__ out) {
  const __m512 tv = _mm512_set1_ps(t);
  __m512i ids = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(16);
  int64_t count = 0, i = 0;
  for (; i + 16 <= n; i += 16) {
    const __mmask16 pass = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + i), tv, _CMP_GE_OQ);
    _mm512_storeu_si512(out + count, _mm512_maskz_compress_epi32(pass, ids));
    count += __builtin_popcount(static_cast<unsigned>(pass));
    ids = _mm512_add_epi32(ids, step);
  }
  for (; i < n; ++i) {
    out[count] = static_cast<int32_t>(i);
    count += x[i] >= t;
  }
  return count;
}
#endif

REFIT_INLINE int64_t collect_any(const float* x, int64_t n, float t, int32_t* out) {
#ifdef REFIT_HAVE_AVX512_COLLECT
  if (cpu::has_avx512()) return collect_at_least_avx512(x, n, t, out);
#endif
  return collect_at_least<float>(x, n, t, out);
}
REFIT_INLINE int64_t collect_any(const double* x, int64_t n, double t, int32_t* out) {
  return collect_at_least<double>(x, n, t, out);
}

// Per-thread working memory of the selection, for rows of I items.
template <typename acc_t>
struct SelectBuffers {
  using key_t = typename KeyOf<acc_t>::type;
  std::vector<acc_t> maxima, maxima_scratch;
  std::vector<int32_t> candidates;
  std::vector<key_t> keys, keys_copy, keys_scratch;
  explicit SelectBuffers(int64_t I)
      : maxima(I + 1), maxima_scratch(I + 1), candidates(I + 16), keys(I + 1), keys_copy(I + 1),
        keys_scratch(I + 1) {}
};

// Selects the best min(kmax, rankable) items of a row and writes their keys,
// best first, to ranked[0, n); returns n. `x` holds the row's scores with
// excluded items set to NaN (never selected; real NaN scores were rejected
// before).
//
// 1. A threshold t that at least kmax rankable scores reach: the kmax-th
//    largest of the maxima of nb >= kmax blocks (kmax blocks hold a score
//    >= t). When t is -inf every rankable item passes.
// 2. The items with score >= t (ties with t included: they may rank before
//    an item above t only by id, which the keys decide), typically ~1.5 kmax.
// 3. Their keys; the kmax-th largest key, and the keys at or above it (keys
//    are distinct, so exactly kmax).
// 4. Ranks: for up to 256 keys, rank = the number of larger keys (a
//    vectorised count, no branches); beyond, a sort.
//
// Inlined into the multiversioned entry points below, so that each clone
// (AVX-512, AVX2, baseline) vectorises it for its instruction set.
template <typename acc_t>
REFIT_INLINE int64_t select_top(const acc_t* __restrict__ x, int64_t n, int64_t kmax, SelectBuffers<acc_t>& w,
                   typename KeyOf<acc_t>::type* __restrict__ ranked) {
  using K = KeyOf<acc_t>;
  using key_t = typename K::type;
  int log2_block = 0;
  while (log2_block < 6 && (int64_t(2) << log2_block) <= n / kmax) ++log2_block;  // nb >= kmax
  const int64_t nb = block_maxima<acc_t>(x, n, log2_block, w.maxima.data());
  const acc_t t = nb >= kmax ? kth_largest(w.maxima.data(), nb, kmax, w.maxima_scratch.data())
                             : -std::numeric_limits<acc_t>::infinity();
  int32_t* cand = w.candidates.data();
  int64_t c = collect_any(x, n, t, cand);
  key_t* keys = w.keys.data();
  for (int64_t j = 0; j < c; ++j) keys[j] = K::key(x[cand[j]], cand[j]);
  if (c > kmax) {
    std::copy(keys, keys + c, w.keys_copy.data());
    const key_t kth = kth_largest(w.keys_copy.data(), c, kmax, w.keys_scratch.data());
    int64_t m = 0;
    for (int64_t j = 0; j < c; ++j) {
      keys[m] = keys[j];
      m += keys[j] >= kth;
    }
    c = m;
  }
  if (c <= 256) {
    for (int64_t j = 0; j < c; ++j) {
      const key_t kj = keys[j];
      int64_t r = 0;
#pragma omp simd reduction(+ : r)
      for (int64_t i = 0; i < c; ++i) r += keys[i] > kj;
      ranked[r] = kj;
    }
  } else {
    std::copy(keys, keys + c, ranked);
    std::sort(ranked, ranked + c, std::greater<key_t>());
  }
  return c;
}

// Widens a row into the working buffer; returns the first NaN column or -1.
template <typename T, typename acc_t>
REFIT_INLINE int64_t load_row(const T* __restrict__ x, acc_t* __restrict__ buf, int64_t n) {
  int nan = 0;
#pragma omp simd reduction(| : nan)
  for (int64_t i = 0; i < n; ++i) {
    const acc_t v = static_cast<acc_t>(static_cast<float>(x[i]));
    buf[i] = v;
    nan |= (v != v);
  }
  if (!nan) return -1;
  for (int64_t i = 0; i < n; ++i)
    if (buf[i] != buf[i]) return i;
  return -1;
}
template <>
REFIT_INLINE int64_t load_row<double, double>(const double* __restrict__ x, double* __restrict__ buf,
                                              int64_t n) {
  int nan = 0;
#pragma omp simd reduction(| : nan)
  for (int64_t i = 0; i < n; ++i) {
    buf[i] = x[i];
    nan |= (x[i] != x[i]);
  }
  if (!nan) return -1;
  for (int64_t i = 0; i < n; ++i)
    if (buf[i] != buf[i]) return i;
  return -1;
}

// Non-template, multiversioned entry points (GCC does not clone templates).
#define REFIT_DEFINE_TOPK_ROWS(T, ACC, SUFFIX)                                                \
  REFIT_CPU_CLONES int64_t load_row_##SUFFIX(const T* x, ACC* buf, int64_t n) {               \
    return load_row<T, ACC>(x, buf, n);                                                       \
  }
REFIT_DEFINE_TOPK_ROWS(float, float, f32)
REFIT_DEFINE_TOPK_ROWS(c10::Half, float, f16)
REFIT_DEFINE_TOPK_ROWS(c10::BFloat16, float, bf16)
REFIT_DEFINE_TOPK_ROWS(double, double, f64)
#undef REFIT_DEFINE_TOPK_ROWS

REFIT_CPU_CLONES int64_t select_top_f32(const float* x, int64_t n, int64_t kmax, SelectBuffers<float>& w,
                                        uint64_t* ranked) {
  return select_top<float>(x, n, kmax, w, ranked);
}
REFIT_CPU_CLONES int64_t select_top_f64(const double* x, int64_t n, int64_t kmax, SelectBuffers<double>& w,
                                        unsigned __int128* ranked) {
  return select_top<double>(x, n, kmax, w, ranked);
}
REFIT_INLINE int64_t load_row_any(const float* x, float* buf, int64_t n) { return load_row_f32(x, buf, n); }
REFIT_INLINE int64_t load_row_any(const c10::Half* x, float* buf, int64_t n) { return load_row_f16(x, buf, n); }
REFIT_INLINE int64_t load_row_any(const c10::BFloat16* x, float* buf, int64_t n) { return load_row_bf16(x, buf, n); }
REFIT_INLINE int64_t load_row_any(const double* x, double* buf, int64_t n) { return load_row_f64(x, buf, n); }
REFIT_INLINE int64_t select_top_any(const float* x, int64_t n, int64_t k, SelectBuffers<float>& w, uint64_t* r) {
  return select_top_f32(x, n, k, w, r);
}
REFIT_INLINE int64_t select_top_any(const double* x, int64_t n, int64_t k, SelectBuffers<double>& w,
                                    unsigned __int128* r) {
  return select_top_f64(x, n, k, w, r);
}

template <typename T>
void topk_hits_rows(const TopKHitsArgs& a, at::Tensor& hits, at::Tensor& dcg, at::Tensor& nbr_hits,
                    at::Tensor& first_hit, at::Tensor& indices, std::vector<int64_t>& errors) {
  using acc_t = typename AccOf<T>::type;
  const int64_t B = a.B, I = a.I, kmax = a.kmax, n_k = static_cast<int64_t>(a.ks.size());
  const T* scores = a.scores.const_data_ptr<T>();
  const int64_t row_stride = a.scores.stride(0);
  const int64_t* users = a.users.defined() ? a.users.const_data_ptr<int64_t>() : nullptr;
  const CsrView excl = view_of(a.exclude), pos = view_of(a.positives), sets = view_of(a.neighbor_sets);
  const int64_t* nbrs = a.neighbors.defined() ? a.neighbors.const_data_ptr<int64_t>() : nullptr;
  const int64_t M = a.neighbors.defined() ? a.neighbors.size(1) : 0;
  int64_t* out_hits = hits.data_ptr<int64_t>();
  float* out_dcg = dcg.data_ptr<float>();
  float* out_nbr = nbr_hits.data_ptr<float>();
  int64_t* out_first = first_hit.data_ptr<int64_t>();
  int64_t* out_idx = a.return_indices ? indices.data_ptr<int64_t>() : nullptr;
  const int64_t* ks = a.ks.data();

  std::vector<double> disc(static_cast<size_t>(kmax));
  for (int64_t r = 0; r < kmax; ++r) disc[r] = topk::discount(r);

  // About 1 ms of scores per task (see cpu::grain_for), so small batches stay on one thread.
  const int64_t grain = cpu::grain_for(I, cpu::kScoresSelectedPerMs);
  cpu::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> buf(static_cast<size_t>(I));
    std::vector<int32_t> rank(static_cast<size_t>(I), -1);
    std::vector<typename KeyOf<acc_t>::type> keys(static_cast<size_t>(kmax));
    SelectBuffers<acc_t> work(I);
    std::vector<uint8_t> hit(static_cast<size_t>(kmax));
    std::vector<int64_t> cnt(static_cast<size_t>(kmax));
    for (int64_t b = b0; b < b1; ++b) {
      int64_t* err = errors.data() + b * topk::kErrorFields;
      int64_t lo = 0, hi = 0;
      // Exclusions: check the row, then load the scores and blank the excluded ones.
      int64_t ex_lo = 0, ex_hi = 0;
      if (excl.defined() && !checked_row_of(excl, users, b, I, Arg::kExclude, err, &ex_lo, &ex_hi)) continue;
      const int64_t nan_at = load_row_any(scores + b * row_stride, buf.data(), I);
      if (nan_at >= 0) {
        report(err, RowError::kNaN, Arg::kScores, 0, nan_at);
        continue;
      }
      for (int64_t j = ex_lo; j < ex_hi; ++j) buf[excl.indices[j]] = std::numeric_limits<acc_t>::quiet_NaN();

      const int64_t n_sel = select_top_any(buf.data(), I, kmax, work, keys.data());
      for (int64_t r = 0; r < n_sel; ++r) rank[item_of(keys[r])] = static_cast<int32_t>(r);
      std::fill(hit.begin(), hit.end(), uint8_t(0));
      std::fill(cnt.begin(), cnt.end(), int64_t(0));

      bool ok = true;
      if (pos.defined()) {
        ok = checked_row_of(pos, users, b, I, Arg::kPositives, err, &lo, &hi);
        for (int64_t j = lo; ok && j < hi; ++j) {
          const int32_t at = rank[pos.indices[j]];
          if (at >= 0) hit[at] = 1;
        }
      }
      int64_t n_valid = 0;
      for (int64_t m = 0; ok && m < M; ++m) {
        const int64_t v = nbrs[b * M + m];
        if (v == -1) continue;
        if (v < -1 || v >= sets.rows) {
          report(err, RowError::kNeighborOutOfRange, Arg::kNeighbors, m, v);
          ok = false;
          break;
        }
        if (!checked_row(sets, v, I, Arg::kNeighborSets, err, &lo, &hi)) {
          ok = false;
          break;
        }
        ++n_valid;
        for (int64_t j = lo; j < hi; ++j) {
          const int32_t at = rank[sets.indices[j]];
          if (at >= 0) ++cnt[at];
        }
      }
      for (int64_t r = 0; r < n_sel; ++r) rank[item_of(keys[r])] = -1;
      if (!ok) continue;

      int64_t h = 0, c = 0, first = -1, jk = 0;
      double d = 0.0;
      for (int64_t r = 0; r < kmax; ++r) {
        if (hit[r]) {
          ++h;
          d += disc[r];
          if (first < 0) first = r;
        }
        c += cnt[r];
        if (r + 1 == ks[jk]) {
          out_hits[b * n_k + jk] = h;
          out_dcg[b * n_k + jk] = static_cast<float>(d);
          out_nbr[b * n_k + jk] =
              n_valid > 0 ? static_cast<float>(static_cast<double>(c) / static_cast<double>(n_valid)) : 0.0f;
          ++jk;
        }
      }
      out_first[b] = first;
      if (out_idx) {
        int64_t* o = out_idx + b * kmax;
        for (int64_t r = 0; r < n_sel; ++r) o[r] = item_of(keys[r]);
        for (int64_t r = n_sel; r < kmax; ++r) o[r] = -1;
      }
    }
  });
}

}  // namespace

TopKHitsResult topk_hits_cpu(const at::Tensor& scores, at::IntArrayRef ks,
                             const std::optional<at::Tensor>& users,
                             const std::optional<at::Tensor>& exclude_indptr,
                             const std::optional<at::Tensor>& exclude_indices,
                             const std::optional<at::Tensor>& positives_indptr,
                             const std::optional<at::Tensor>& positives_indices,
                             const std::optional<at::Tensor>& neighbors,
                             const std::optional<at::Tensor>& neighbor_sets_indptr,
                             const std::optional<at::Tensor>& neighbor_sets_indices,
                             bool return_indices) {
  const TopKHitsArgs a = check_topk_hits_args(scores, ks, users, exclude_indptr, exclude_indices,
                                              positives_indptr, positives_indices, neighbors,
                                              neighbor_sets_indptr, neighbor_sets_indices,
                                              return_indices);
  TORCH_CHECK_VALUE(scores.device().is_cpu(), "topk_hits (cpu): scores must be a CPU tensor, got ",
                    scores.device());
  const int64_t B = a.B, n_k = static_cast<int64_t>(a.ks.size());
  const auto opts = scores.options();
  at::Tensor hits = at::empty({B, n_k}, opts.dtype(at::kLong));
  at::Tensor dcg = at::empty({B, n_k}, opts.dtype(at::kFloat));
  at::Tensor nbr_hits = at::empty({B, n_k}, opts.dtype(at::kFloat));
  at::Tensor first_hit = at::empty({B}, opts.dtype(at::kLong));
  at::Tensor indices = at::empty({B, return_indices ? a.kmax : 0}, opts.dtype(at::kLong));
  std::vector<int64_t> errors(static_cast<size_t>(B * topk::kErrorFields), 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scores.scalar_type(), "topk_hits_cpu", [&] {
    topk_hits_rows<scalar_t>(a, hits, dcg, nbr_hits, first_hit, indices, errors);
  });
  raise_topk_row_error(errors.data(), a);
  return {hits, dcg, nbr_hits, first_hit, indices};
}

TORCH_LIBRARY_IMPL(refit, CPU, m) { m.impl("topk_hits", &topk_hits_cpu); }

}  // namespace refit
