// CPU kernel of refit::topk_hits: threads over rows. Per row: the scores are
// widened into a buffer (NaN check) with the excluded items blanked, the best
// Kmax items are selected without sorting the row (a threshold from the
// maxima of strided groups, the few items above it, ranked by counting;
// O(I) per row), and hits, DCG and neighbor hits are read from the ranked
// list through a per-thread table item -> rank. Nothing of size B x I is
// allocated.
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

// One partition pass of kth_largest over a[from, n): values > pivot are
// appended to a[0, n_gt) (n_gt <= i: never overwrites a value not yet read),
// values < pivot to scratch[0, n_lt). No data-dependent branch: each value is
// written to both sides and the side's length grows by a comparison.
template <typename T>
REFIT_INLINE void partition_tail(T* __restrict__ a, int64_t from, int64_t n, T pivot, T* __restrict__ scratch,
                                 int64_t& n_gt, int64_t& n_lt) {
  for (int64_t i = from; i < n; ++i) {
    const T v = a[i];
    a[n_gt] = v;
    n_gt += v > pivot;
    scratch[n_lt] = v;
    n_lt += v < pivot;
  }
}

// The k-th largest (1-based, 1 <= k <= n) of a[0, n); clobbers a and
// scratch[0, n). A quickselect whose partition passes (`partition(a, n,
// pivot, scratch, n_gt, n_lt)`, branch-free) cost a few cycles per value
// instead of the branch mispredictions of std::nth_element.
//
// Median-of-three pivots can be driven to O(n^2) by adversarial inputs;
// after 2 log2(n) + 8 passes the rest goes to std::nth_element (O(n log n)
// at worst).
template <typename T, typename Partition>
REFIT_INLINE T kth_largest_by(T* __restrict__ a, int64_t n, int64_t k, T* __restrict__ scratch,
                              const Partition& partition) {
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
    partition(a, n, pivot, scratch, n_gt, n_lt);
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

template <typename T>
REFIT_INLINE T kth_largest(T* __restrict__ a, int64_t n, int64_t k, T* __restrict__ scratch) {
  return kth_largest_by(a, n, k, scratch, [](T* x, int64_t m, T pivot, T* tmp, int64_t& n_gt, int64_t& n_lt) {
    partition_tail(x, 0, m, pivot, tmp, n_gt, n_lt);
  });
}

// Maxima of the nb strided groups of a row: group g holds the items g, g + nb,
// g + 2 nb, ... (excluded items, NaN, count as -inf); nb is a multiple of 16
// and out has room for nb values. Any partition into groups serves the
// threshold (kmax groups whose maximum reaches t hold kmax distinct items that
// reach it); strided groups make the pass a column-wise max of the row seen as
// an (n / nb, nb) matrix, one vector max per 16 scores and no horizontal
// reduction.
template <typename acc_t>
REFIT_INLINE void strided_maxima(const acc_t* __restrict__ x, int64_t n, int64_t nb, acc_t* __restrict__ out) {
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const int64_t first = std::min(n, nb);
#pragma omp simd
  for (int64_t g = 0; g < first; ++g) {
    const acc_t v = x[g];
    out[g] = v == v ? v : neg_inf;
  }
  for (int64_t g = first; g < nb; ++g) out[g] = neg_inf;
  // v > m is false for NaN, so NaN never replaces a maximum.
  int64_t i0 = nb;
  for (; i0 + nb <= n; i0 += nb) {
#pragma omp simd
    for (int64_t g = 0; g < nb; ++g) {
      const acc_t v = x[i0 + g], m = out[g];
      out[g] = v > m ? v : m;
    }
  }
  for (int64_t g = 0; i0 + g < n; ++g) {
    const acc_t v = x[i0 + g], m = out[g];
    out[g] = v > m ? v : m;
  }
}

// The number of groups for rows of n items and a top kmax: about 4 kmax, so
// that the threshold lets through little more than kmax items (about 1.1
// kmax for scores in random order), and never more groups than items (rounded
// up to 16).
REFIT_INLINE int64_t group_count(int64_t n, int64_t kmax) {
  const int64_t want = std::min(n, 4 * kmax);
  return std::max<int64_t>(16, (want + 15) / 16 * 16);
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

#ifdef REFIT_HAVE_AVX512
// kth_largest's partition pass for float32 with AVX-512: 16 values per step,
// moved by two compress stores. The in-place store of the larger values
// writes a[n_gt, n_gt + 16) with n_gt <= i: only values already loaded.
// scratch has room for n + 16 values.
__attribute__((target("avx512f"))) void partition_f32_avx512(float* __restrict__ a, int64_t n, float pivot,
                                                            float* __restrict__ scratch, int64_t& n_gt,
                                                            int64_t& n_lt) {
  const __m512 pv = _mm512_set1_ps(pivot);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(a + i);
    const __mmask16 gt = _mm512_cmp_ps_mask(v, pv, _CMP_GT_OQ);
    const __mmask16 lt = _mm512_cmp_ps_mask(v, pv, _CMP_LT_OQ);
    _mm512_storeu_ps(a + n_gt, _mm512_maskz_compress_ps(gt, v));
    _mm512_storeu_ps(scratch + n_lt, _mm512_maskz_compress_ps(lt, v));
    n_gt += __builtin_popcount(static_cast<unsigned>(gt));
    n_lt += __builtin_popcount(static_cast<unsigned>(lt));
  }
  partition_tail(a, i, n, pivot, scratch, n_gt, n_lt);
}
#endif

REFIT_INLINE float kth_largest_any(float* a, int64_t n, int64_t k, float* scratch) {
#ifdef REFIT_HAVE_AVX512
  if (cpu::has_avx512()) return kth_largest_by(a, n, k, scratch, partition_f32_avx512);
#endif
  return kth_largest(a, n, k, scratch);
}
REFIT_INLINE double kth_largest_any(double* a, int64_t n, int64_t k, double* scratch) {
  return kth_largest(a, n, k, scratch);
}

// The order-preserving code of a score (refit/topk_hits.h): 32 bits for
// float, 64 for double. No score has code 0.
REFIT_INLINE uint32_t code_of(float x) { return topk::score_code(x); }
REFIT_INLINE uint64_t code_of(double x) {
  x = (x == 0.0) ? 0.0 : x;
  uint64_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return (bits >> 63) ? ~bits : (bits | (uint64_t(1) << 63));
}
template <typename acc_t> using CodeOf = decltype(code_of(acc_t()));

// at[j] = #{i < c : code[i] >= code[j]} - 1 for every j < c: the rank of
// candidate j when no other candidate ties with it. code[c, c + 16) is zero
// (below every code).
template <typename code_t>
REFIT_INLINE void ranks_at_least(const code_t* __restrict__ code, int64_t c, int32_t* __restrict__ at) {
  for (int64_t j = 0; j < c; ++j) {
    const code_t cj = code[j];
    int32_t r = 0;
#pragma omp simd reduction(+ : r)
    for (int64_t i = 0; i < c; ++i) r += code[i] >= cj;
    at[j] = r - 1;
  }
}

#ifdef REFIT_HAVE_AVX512
// The same for 32-bit codes with AVX-512: four candidates at a time against
// 16 codes per compare, counted by popcount (four independent sums).
__attribute__((target("avx512f,popcnt"))) void ranks_at_least_avx512(const uint32_t* __restrict__ code, int64_t c,
                                                                    int32_t* __restrict__ at) {
  const int64_t nv = (c + 15) / 16;  // the zero padding never counts
  int64_t j = 0;
  for (; j + 4 <= c; j += 4) {
    const __m512i b0 = _mm512_set1_epi32(static_cast<int>(code[j]));
    const __m512i b1 = _mm512_set1_epi32(static_cast<int>(code[j + 1]));
    const __m512i b2 = _mm512_set1_epi32(static_cast<int>(code[j + 2]));
    const __m512i b3 = _mm512_set1_epi32(static_cast<int>(code[j + 3]));
    int32_t r0 = 0, r1 = 0, r2 = 0, r3 = 0;
    for (int64_t v = 0; v < nv; ++v) {
      const __m512i x = _mm512_loadu_si512(code + 16 * v);
      r0 += __builtin_popcount(static_cast<unsigned>(_mm512_cmpge_epu32_mask(x, b0)));
      r1 += __builtin_popcount(static_cast<unsigned>(_mm512_cmpge_epu32_mask(x, b1)));
      r2 += __builtin_popcount(static_cast<unsigned>(_mm512_cmpge_epu32_mask(x, b2)));
      r3 += __builtin_popcount(static_cast<unsigned>(_mm512_cmpge_epu32_mask(x, b3)));
    }
    at[j] = r0 - 1;
    at[j + 1] = r1 - 1;
    at[j + 2] = r2 - 1;
    at[j + 3] = r3 - 1;
  }
  for (; j < c; ++j) {
    const __m512i b = _mm512_set1_epi32(static_cast<int>(code[j]));
    int32_t r = 0;
    for (int64_t v = 0; v < nv; ++v)
      r += __builtin_popcount(static_cast<unsigned>(_mm512_cmpge_epu32_mask(_mm512_loadu_si512(code + 16 * v), b)));
    at[j] = r - 1;
  }
}
#endif

REFIT_INLINE void ranks_any(const uint32_t* code, int64_t c, int32_t* at) {
#ifdef REFIT_HAVE_AVX512
  if (cpu::has_avx512()) return ranks_at_least_avx512(code, c, at);
#endif
  ranks_at_least(code, c, at);
}
REFIT_INLINE void ranks_any(const uint64_t* code, int64_t c, int32_t* at) { ranks_at_least(code, c, at); }

// Candidates ranked by counting (ranks_at_least) up to this many; beyond, and
// whenever two of them tie on the score, by their keys.
constexpr int64_t kMaxCounted = 512;

// Per-thread working memory of the selection, for rows of I items.
template <typename acc_t>
struct SelectBuffers {
  using key_t = typename KeyOf<acc_t>::type;
  std::vector<acc_t> maxima, maxima_scratch;
  std::vector<int32_t> candidates, at;
  std::vector<CodeOf<acc_t>> codes;
  std::vector<uint8_t> filled;
  std::vector<key_t> keys, keys_copy, keys_scratch;
  // Groups: at most I rounded up to 16 (and at least 16); the vector kth and
  // counts read or write 16 values past their end.
  SelectBuffers(int64_t I, int64_t kmax)
      : maxima(I + 48), maxima_scratch(I + 48), candidates(I + 16), at(kMaxCounted), codes(kMaxCounted + 16),
        filled(static_cast<size_t>(kmax)), keys(I + 1), keys_copy(I + 1), keys_scratch(I + 1) {}
};

// Selects the best min(kmax, rankable) items of a row and writes their keys,
// best first, to ranked[0, n); returns n. `x` holds the row's scores with
// excluded items set to NaN (never selected; real NaN scores were rejected
// before).
//
// 1. A threshold t that at least kmax rankable scores reach: the kmax-th
//    largest of the maxima of nb >= kmax strided groups (kmax groups hold a
//    score >= t). When t is -inf every rankable item passes.
// 2. The c items with score >= t, in increasing id (ties with t included:
//    they may rank before an item above t only by id), typically ~1.1 kmax.
// 3. Up to kMaxCounted candidates: each one's rank is the number of other
//    candidates whose score code is at least its own (a vectorised count, no
//    branches, no sort). That is its rank exactly when no candidate ties with
//    it; a tie gives its members one shared count, so the top kmax positions
//    are then not all filled exactly once, and the row is ranked by step 4.
// 4. Otherwise: their keys (score code above ~id, distinct), the kmax-th
//    largest key, and the keys at or above it; ranks by counting larger keys
//    (up to 256) or a sort.
//
// Inlined into the multiversioned entry points below, so that each clone
// (AVX-512, AVX2, baseline) vectorises it for its instruction set.
template <typename acc_t>
REFIT_INLINE int64_t select_top(const acc_t* __restrict__ x, int64_t n, int64_t kmax, SelectBuffers<acc_t>& w,
                   typename KeyOf<acc_t>::type* __restrict__ ranked) {
  using K = KeyOf<acc_t>;
  using key_t = typename K::type;
  using code_t = CodeOf<acc_t>;
  const int64_t nb = group_count(n, kmax);
  strided_maxima<acc_t>(x, n, nb, w.maxima.data());
  const acc_t t = nb >= kmax ? kth_largest_any(w.maxima.data(), nb, kmax, w.maxima_scratch.data())
                             : -std::numeric_limits<acc_t>::infinity();
  int32_t* cand = w.candidates.data();
  int64_t c = collect_any(x, n, t, cand);
  const int64_t n_top = std::min(c, kmax);

  if (c <= kMaxCounted) {
    code_t* codes = w.codes.data();
    for (int64_t j = 0; j < c; ++j) codes[j] = code_of(x[cand[j]]);
    std::fill(codes + c, codes + c + 16, code_t(0));
    int32_t* at = w.at.data();
    ranks_any(codes, c, at);
    uint8_t* filled = w.filled.data();
    std::fill(filled, filled + kmax, uint8_t(0));
    int64_t stored = 0;
    bool distinct = true;
    for (int64_t j = 0; j < c; ++j) {
      const int64_t r = at[j];
      if (r >= kmax) continue;
      distinct &= !filled[r];
      filled[r] = 1;
      ranked[r] = K::key(x[cand[j]], cand[j]);
      ++stored;
    }
    if (distinct && stored == n_top) return n_top;
  }

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
    SelectBuffers<acc_t> work(I, kmax);
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
