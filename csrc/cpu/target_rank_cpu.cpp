// CPU kernel of refit::target_rank: threads over rows; one pass over each
// row's scores, no selection and no sort of the row.
//
// Per row: the row's exclude and positives rows are checked, the positives'
// scores read, then the row is streamed once and, for each positive, the
// items that beat it are counted without a branch: items before the
// positive win ties (s >= sp), items after it do not (s > sp). The first
// positive's count also looks for NaN, in the same loop. 16-bit scores are
// widened to float kBlock items at a time, and rows with several positives
// go in blocks too, so that every positive re-reads the block from L1.
// Excluded items are taken off afterwards, in a pass over the (short)
// exclude row, which keeps the main loop free of any exclusion test.
//
// Rows with more than kDirect positives would pay kDirect compares per item;
// for them the positives are sorted once (worst first) and each item finds,
// by binary search, how many positives it beats: a histogram of those counts
// gives every positive's rank by suffix sums. Still one pass over the row.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../target_rank.h"
#include "common.h"
#include "csr_rows.h"
#include "refit/target_rank.h"

namespace refit {
namespace {

using cpu::AccOf;
using cpu::checked_row_of;
using cpu::CsrView;
using cpu::report;
using cpu::view_of;
using target_rank::beats;
using topk::Arg;
using topk::RowError;

// Items per block: 4 KiB of float scores, re-read from L1 by every positive.
constexpr int64_t kBlock = 1024;
// Up to this many positives in a row, each counts its own beaters (kDirect
// branch-free compares per item); beyond, the sorted path (a binary search
// per item).
constexpr int64_t kDirect = 16;

// x[0, n) as acc_t: the row itself when it already is, else widened into buf.
template <typename T, typename acc_t>
REFIT_INLINE const acc_t* widened(const T* __restrict__ x, acc_t* __restrict__ buf, int64_t n) {
  if constexpr (std::is_same_v<T, acc_t>) {
    return x;
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(x[i]);
    return buf;
  }
}

// Whether x[0, n) holds a NaN (one vectorised test), and the first one's offset.
template <typename acc_t>
REFIT_INLINE bool any_nan(const acc_t* __restrict__ x, int64_t n) {
  int nan = 0;
#pragma omp simd reduction(| : nan)
  for (int64_t i = 0; i < n; ++i) nan |= (x[i] != x[i]);
  return nan != 0;
}
template <typename acc_t>
REFIT_INLINE int64_t first_nan(const acc_t* __restrict__ x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (x[i] != x[i]) return i;
  return -1;
}

// How many of x[0, n) beat a positive of score sp at offset `at` of the block
// (target_rank::beats split at the positive: before it ties win, from it on
// they do not, and the positive never beats itself). Branch-free; with
// kNaN it also ORs "x[i] is NaN" into *nan, in the same pass.
template <bool kNaN, typename acc_t>
REFIT_INLINE int32_t count_beating(const acc_t* __restrict__ x, int64_t n, acc_t sp, int64_t at, int* nan) {
  const int64_t split = std::clamp<int64_t>(at, 0, n);
  int32_t c = 0;
  int bad = 0;
#pragma omp simd reduction(+ : c) reduction(| : bad)
  for (int64_t i = 0; i < split; ++i) {
    c += x[i] >= sp;
    if constexpr (kNaN) bad |= (x[i] != x[i]);
  }
#pragma omp simd reduction(+ : c) reduction(| : bad)
  for (int64_t i = split; i < n; ++i) {
    c += x[i] > sp;
    if constexpr (kNaN) bad |= (x[i] != x[i]);
  }
  if constexpr (kNaN) *nan |= bad;
  return c;
}

#ifdef REFIT_HAVE_AVX512
// count_beating<true> on float scores, by hand with AVX-512: per 16 scores a
// compare and a masked add for the count, and the NaN test kept in a mask
// register (four operations, where the compiler's form of the loop takes
// six: at L3 speed the loop is bound by them, not by the reads).
template <int kPred>
__attribute__((target("avx512f"), always_inline)) inline void count_span_avx512(const float* __restrict__ x,
                                                                               int64_t lo, int64_t hi, __m512 sp,
                                                                               __m512i* acc, __mmask16* nan) {
  const __m512i one = _mm512_set1_epi32(1);
  int64_t i = lo;
  for (; i + 16 <= hi; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    *acc = _mm512_mask_add_epi32(*acc, _mm512_cmp_ps_mask(v, sp, kPred), *acc, one);
    *nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  }
  if (i < hi) {  // the tail under a mask: nothing past hi is read
    const __mmask16 live = static_cast<__mmask16>((1u << (hi - i)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(live, x + i);
    *acc = _mm512_mask_add_epi32(*acc, _mm512_mask_cmp_ps_mask(live, v, sp, kPred), *acc, one);
    *nan |= _mm512_mask_cmp_ps_mask(live, v, v, _CMP_UNORD_Q);
  }
}

__attribute__((target("avx512f"))) int32_t count_beating_nan_avx512(const float* __restrict__ x, int64_t n, float sp,
                                                                    int64_t at, int* nan) {
  const int64_t split = std::clamp<int64_t>(at, 0, n);
  const __m512 spv = _mm512_set1_ps(sp);
  __m512i acc = _mm512_setzero_si512();
  __mmask16 bad = 0;
  count_span_avx512<_CMP_GE_OQ>(x, 0, split, spv, &acc, &bad);
  count_span_avx512<_CMP_GT_OQ>(x, split, n, spv, &acc, &bad);
  *nan |= bad != 0;
  alignas(64) int32_t lanes[16];
  _mm512_store_si512(lanes, acc);
  int32_t c = 0;
  for (int32_t v : lanes) c += v;
  return c;
}
#endif

// count_beating<true>, by the AVX-512 loop where the CPU has one.
REFIT_INLINE int32_t count_beating_nan(const float* x, int64_t n, float sp, int64_t at, int* nan) {
#ifdef REFIT_HAVE_AVX512
  if (cpu::has_avx512()) return count_beating_nan_avx512(x, n, sp, at, nan);
#endif
  return count_beating<true>(x, n, sp, at, nan);
}
REFIT_INLINE int32_t count_beating_nan(const double* x, int64_t n, double sp, int64_t at, int* nan) {
  return count_beating<true>(x, n, sp, at, nan);
}

// Per-thread working memory of the sorted path.
template <typename acc_t>
struct SortedScratch {
  std::vector<int64_t> order;  // positives, worst first
  std::vector<acc_t> score;    // their scores, in that order
  std::vector<int64_t> item;   // their ids, in that order
  std::vector<int32_t> hist;   // hist[q]: items that beat exactly the q worst positives
  void resize(int64_t np) {
    order.resize(np);
    score.resize(np);
    item.resize(np);
    hist.assign(np + 1, 0);
  }
};

// How many of the np sorted (worst first) positives item i of score s beats:
// they are a prefix of that order.
template <typename acc_t>
REFIT_INLINE int64_t beaten_prefix(acc_t s, int64_t i, const acc_t* score, const int64_t* item, int64_t np) {
  int64_t lo = 0, len = np;
  while (len > 0) {
    const int64_t half = len / 2;
    if (beats(s, i, score[lo + half], item[lo + half])) {
      lo += half + 1;
      len -= half + 1;
    } else {
      len = half;
    }
  }
  return lo;
}

// The ranks of the np positives pos[0, np) of row x[0, n), whose excluded
// items are excl[0, ne) (both sorted), into cnt[0, np): the items that beat
// each, less the excluded ones that do, or kExcludedRank. Returns the row's
// first NaN column (the ranks are then meaningless) or -1.
template <typename T>
REFIT_INLINE int64_t count_row(const T* __restrict__ x, int64_t n, const int64_t* __restrict__ pos, int64_t np,
                               const int64_t* __restrict__ excl, int64_t ne, int32_t* __restrict__ cnt,
                               SortedScratch<typename AccOf<T>::type>& w) {
  using acc_t = typename AccOf<T>::type;
  alignas(64) acc_t buf[kBlock];
  const auto score_of = [x](int64_t i) { return static_cast<acc_t>(x[i]); };  // exact: acc_t holds every T
  if (np <= kDirect) {
    acc_t sp[kDirect];
    for (int64_t k = 0; k < np; ++k) {
      sp[k] = score_of(pos[k]);
      cnt[k] = 0;
    }
    // Blocks keep widened or re-read scores in L1; a float row read by one
    // positive needs neither, and is taken whole.
    const int64_t block = (std::is_same_v<T, acc_t> && np <= 1) ? std::max<int64_t>(n, 1) : kBlock;
    for (int64_t start = 0; start < n; start += block) {
      const int64_t len = std::min(block, n - start);
      const acc_t* xb = widened(x + start, buf, len);
      // The first positive's pass also looks for NaN.
      int nan = 0;
      if (np == 0) {
        nan = any_nan(xb, len);
      } else {
        cnt[0] += count_beating_nan(xb, len, sp[0], pos[0] - start, &nan);
      }
      if (nan) return start + first_nan(xb, len);
      for (int64_t k = 1; k < np; ++k) cnt[k] += count_beating<false>(xb, len, sp[k], pos[k] - start, &nan);
    }
    // The excluded items that beat each positive are taken off, and an
    // excluded positive is spotted, in one branch-free pass over the exclusions.
    for (int64_t k = 0; k < np; ++k) {
      const acc_t s_k = sp[k];
      const int64_t p_k = pos[k];
      int32_t c = 0;
      int excluded = 0;
#pragma omp simd reduction(+ : c) reduction(| : excluded)
      for (int64_t j = 0; j < ne; ++j) {
        const int64_t e = excl[j];
        c += beats(score_of(e), e, s_k, p_k);
        excluded |= (e == p_k);
      }
      cnt[k] = excluded ? static_cast<int32_t>(target_rank::kExcludedRank) : cnt[k] - c;
    }
    return -1;
  }

  w.resize(np);
  std::iota(w.order.begin(), w.order.end(), int64_t(0));
  std::sort(w.order.begin(), w.order.end(), [&](int64_t a, int64_t b) {
    return beats(score_of(pos[b]), pos[b], score_of(pos[a]), pos[a]);
  });
  for (int64_t m = 0; m < np; ++m) {
    w.item[m] = pos[w.order[m]];
    w.score[m] = score_of(w.item[m]);
  }
  const acc_t* ps = w.score.data();
  const int64_t* pi = w.item.data();
  int32_t* hist = w.hist.data();
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t len = std::min(kBlock, n - start);
    const acc_t* xb = widened(x + start, buf, len);
    if (any_nan(xb, len)) return start + first_nan(xb, len);
    for (int64_t i = 0; i < len; ++i) ++hist[beaten_prefix(xb[i], start + i, ps, pi, np)];
  }
  for (int64_t j = 0; j < ne; ++j) --hist[beaten_prefix(score_of(excl[j]), excl[j], ps, pi, np)];
  // Positive m (worst first) is beaten by the items that beat more than m positives.
  int32_t above = 0;
  for (int64_t m = np - 1; m >= 0; --m) {
    above += hist[m + 1];
    cnt[w.order[m]] = above;
  }
  // Both rows are sorted: one merge finds the positives that are excluded.
  for (int64_t k = 0, j = 0; k < np; ++k) {
    while (j < ne && excl[j] < pos[k]) ++j;
    if (j < ne && excl[j] == pos[k]) cnt[k] = static_cast<int32_t>(target_rank::kExcludedRank);
  }
  return -1;
}

// Non-template, multiversioned entry points (GCC does not clone templates).
#define REFIT_DEFINE_COUNT_ROW(T, SUFFIX)                                                                \
  REFIT_CPU_CLONES int64_t count_row_##SUFFIX(const T* x, int64_t n, const int64_t* pos, int64_t np,      \
                                              const int64_t* excl, int64_t ne, int32_t* cnt,             \
                                              SortedScratch<AccOf<T>::type>& w) {                        \
    return count_row<T>(x, n, pos, np, excl, ne, cnt, w);                                                \
  }                                                                                                      \
  REFIT_INLINE int64_t count_row_any(const T* x, int64_t n, const int64_t* pos, int64_t np,             \
                                     const int64_t* excl, int64_t ne, int32_t* cnt,                     \
                                     SortedScratch<AccOf<T>::type>& w) {                                \
    return count_row_##SUFFIX(x, n, pos, np, excl, ne, cnt, w);                                          \
  }
REFIT_DEFINE_COUNT_ROW(float, f32)
REFIT_DEFINE_COUNT_ROW(c10::Half, f16)
REFIT_DEFINE_COUNT_ROW(c10::BFloat16, bf16)
REFIT_DEFINE_COUNT_ROW(double, f64)
#undef REFIT_DEFINE_COUNT_ROW

template <typename T>
void target_rank_rows(const TargetRankArgs& a, int64_t* out, const int64_t* starts, std::vector<int64_t>& errors) {
  using acc_t = typename AccOf<T>::type;
  const int64_t B = a.B, I = a.I;
  const T* scores = a.scores.const_data_ptr<T>();
  const int64_t row_stride = a.scores.stride(0);
  const int64_t* users = a.users.defined() ? a.users.const_data_ptr<int64_t>() : nullptr;
  const CsrView excl = view_of(a.exclude), pos = view_of(a.positives);

  // About 1 ms of scores per task (see cpu::grain_for), so small batches stay on one thread.
  const int64_t grain = cpu::grain_for(I, cpu::kScoresRankedPerMs);
  cpu::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    SortedScratch<acc_t> work;
    std::vector<int32_t> cnt;
    for (int64_t b = b0; b < b1; ++b) {
      int64_t* err = errors.data() + b * topk::kErrorFields;
      int64_t ex_lo = 0, ex_hi = 0;
      if (excl.defined() && !checked_row_of(excl, users, b, I, Arg::kExclude, err, &ex_lo, &ex_hi)) continue;
      // The positives are needed before the pass, but a problem with them is
      // reported after the scores' (NaN), the order every backend checks in.
      int64_t pending[topk::kErrorFields] = {0, 0, 0, 0};
      int64_t lo = 0, hi = 0;
      const bool pos_ok = checked_row_of(pos, users, b, I, Arg::kPositives, pending, &lo, &hi);
      const int64_t np = pos_ok ? hi - lo : 0;
      cnt.resize(static_cast<size_t>(np));
      const int64_t* p = pos.indices + lo;
      const int64_t* e = excl.defined() ? excl.indices + ex_lo : nullptr;
      const int64_t nan_at = count_row_any(scores + b * row_stride, I, p, np, e, ex_hi - ex_lo, cnt.data(), work);
      if (nan_at >= 0) {
        report(err, RowError::kNaN, Arg::kScores, 0, nan_at);
        continue;
      }
      if (!pos_ok) {
        std::copy(pending, pending + topk::kErrorFields, err);
        continue;
      }
      std::copy(cnt.begin(), cnt.end(), out + (starts ? starts[b] : lo));
    }
  });
}

}  // namespace

at::Tensor target_rank_cpu(const at::Tensor& scores, const std::optional<at::Tensor>& users,
                           const std::optional<at::Tensor>& exclude_indptr,
                           const std::optional<at::Tensor>& exclude_indices, const at::Tensor& positives_indptr,
                           const at::Tensor& positives_indices) {
  const TargetRankArgs a =
      check_target_rank_args(scores, users, exclude_indptr, exclude_indices, positives_indptr, positives_indices);
  TORCH_CHECK_VALUE(scores.device().is_cpu(), "target_rank (cpu): scores must be a CPU tensor, got ",
                    scores.device());
  TargetRankOutput out = target_rank_output(a);
  std::vector<int64_t> errors(static_cast<size_t>(a.B * topk::kErrorFields), 0);
  const int64_t* starts = out.starts.defined() ? out.starts.const_data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scores.scalar_type(), "target_rank_cpu", [&] {
    target_rank_rows<scalar_t>(a, out.ranks.data_ptr<int64_t>(), starts, errors);
  });
  raise_target_rank_row_error(errors.data(), a);
  return out.ranks;
}

TORCH_LIBRARY_IMPL(refit, CPU, m) { m.impl("target_rank", &target_rank_cpu); }

}  // namespace refit
