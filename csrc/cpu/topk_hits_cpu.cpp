// CPU kernel of refit::topk_hits: threads over rows; per row one pass over
// the scores that keeps the best Kmax items in a heap (O(I log Kmax), and
// O(I) comparisons when, as usual, few items displace the heap's worst), then
// hits, DCG and neighbor hits from the ranked list through a per-thread table
// item -> rank. Nothing of size B x I is allocated.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../topk_hits.h"
#include "common.h"
#include "refit/topk_hits.h"

namespace refit {
namespace {

using topk::Arg;
using topk::RowError;

template <typename acc_t>
struct Cand {
  acc_t score;
  int32_t item;
};

// The ranking rule on candidates: a ranks before b.
template <typename acc_t>
REFIT_INLINE bool before(const Cand<acc_t>& a, const Cand<acc_t>& b) {
  return a.score > b.score || (a.score == b.score && a.item < b.item);
}

// heap[0] is the worst candidate kept (ranks after every other one).
template <typename acc_t>
REFIT_INLINE void sift_down(Cand<acc_t>* heap, int64_t size, int64_t pos) {
  const Cand<acc_t> moving = heap[pos];
  for (;;) {
    int64_t child = 2 * pos + 1;
    if (child >= size) break;
    if (child + 1 < size && before(heap[child], heap[child + 1])) ++child;  // the worse child
    if (!before(moving, heap[child])) break;  // moving is worse than both: it stays
    heap[pos] = heap[child];
    pos = child;
  }
  heap[pos] = moving;
}

// Selects the best min(kmax, rankable) items of a row and sorts them best
// first. `x` holds the row's scores with excluded items set to NaN (NaN never
// compares greater, so it is never selected; real NaN scores were rejected
// before). Returns the number selected.
template <typename acc_t>
REFIT_INLINE int64_t select_top(const acc_t* __restrict__ x, int64_t n, int64_t kmax,
                                Cand<acc_t>* __restrict__ heap) {
  int64_t size = 0, i = 0;
  for (; i < n && size < kmax; ++i) {
    if (x[i] == x[i]) heap[size++] = {x[i], static_cast<int32_t>(i)};
  }
  if (size == kmax) {
    for (int64_t p = size / 2 - 1; p >= 0; --p) sift_down(heap, size, p);
    // Items are visited in increasing id order, so an item ties with a kept
    // one only to rank after it: it enters exactly when its score is greater
    // than the worst kept score. Most blocks hold no such item, and the test
    // for that is a vectorised compare.
    acc_t threshold = heap[0].score;
    constexpr int64_t kBlock = 64;
    while (i < n) {
      const int64_t end = std::min(n, (i / kBlock + 1) * kBlock);
      int any = 0;
#pragma omp simd reduction(| : any)
      for (int64_t j = i; j < end; ++j) any |= (x[j] > threshold);
      if (any) {
        for (int64_t j = i; j < end; ++j) {
          if (x[j] > threshold) {
            heap[0] = {x[j], static_cast<int32_t>(j)};
            sift_down(heap, size, 0);
            threshold = heap[0].score;
          }
        }
      }
      i = end;
    }
  }
  std::sort(heap, heap + size, before<acc_t>);
  return size;
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

REFIT_CPU_CLONES int64_t select_top_f32(const float* x, int64_t n, int64_t kmax, Cand<float>* heap) {
  return select_top<float>(x, n, kmax, heap);
}
REFIT_CPU_CLONES int64_t select_top_f64(const double* x, int64_t n, int64_t kmax, Cand<double>* heap) {
  return select_top<double>(x, n, kmax, heap);
}

REFIT_INLINE int64_t load_row_any(const float* x, float* buf, int64_t n) { return load_row_f32(x, buf, n); }
REFIT_INLINE int64_t load_row_any(const c10::Half* x, float* buf, int64_t n) { return load_row_f16(x, buf, n); }
REFIT_INLINE int64_t load_row_any(const c10::BFloat16* x, float* buf, int64_t n) { return load_row_bf16(x, buf, n); }
REFIT_INLINE int64_t load_row_any(const double* x, double* buf, int64_t n) { return load_row_f64(x, buf, n); }
REFIT_INLINE int64_t select_top_any(const float* x, int64_t n, int64_t k, Cand<float>* h) { return select_top_f32(x, n, k, h); }
REFIT_INLINE int64_t select_top_any(const double* x, int64_t n, int64_t k, Cand<double>* h) { return select_top_f64(x, n, k, h); }

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

struct CsrView {
  const int64_t* indptr = nullptr;
  const int64_t* indices = nullptr;
  int64_t rows = 0, nnz = 0;
  bool defined() const { return indptr != nullptr; }
};

CsrView view_of(const TopKCsr& m) {
  if (!m.defined()) return {};
  return {m.indptr.const_data_ptr<int64_t>(), m.indices.const_data_ptr<int64_t>(), m.rows(), m.nnz()};
}

REFIT_INLINE void report(int64_t* err, RowError code, Arg arg, int64_t row, int64_t detail) {
  err[0] = static_cast<int64_t>(code);
  err[1] = static_cast<int64_t>(arg);
  err[2] = row;
  err[3] = detail;
}

// Checks CSR row r (its indptr range, then its columns in order: in [0, I)
// and strictly increasing) and returns [lo, hi); false after reporting.
bool checked_row(const CsrView& m, int64_t r, int64_t I, Arg arg, int64_t* err, int64_t* lo,
                 int64_t* hi) {
  const int64_t a = m.indptr[r], b = m.indptr[r + 1];
  if (!(0 <= a && a <= b && b <= m.nnz)) {
    report(err, RowError::kBadIndptr, arg, r, 0);
    return false;
  }
  for (int64_t j = a; j < b; ++j) {
    const int64_t c = m.indices[j];
    if (c < 0 || c >= I) {
      report(err, RowError::kColumnOutOfRange, arg, r, c);
      return false;
    }
    if (j > a && c <= m.indices[j - 1]) {
      report(err, RowError::kUnsorted, arg, r, c);
      return false;
    }
  }
  *lo = a;
  *hi = b;
  return true;
}

// The CSR row of scores row b, or -1 after reporting users[b] out of range.
REFIT_INLINE int64_t csr_row_of(const CsrView& m, const int64_t* users, int64_t b, Arg arg, int64_t* err) {
  const int64_t u = users ? users[b] : b;
  if (u < 0 || u >= m.rows) {
    report(err, RowError::kUserOutOfRange, arg, 0, u);
    return -1;
  }
  return u;
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

  // At least ~64K scores per task, so small batches stay on one thread.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(I, 1));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> buf(static_cast<size_t>(I));
    std::vector<int32_t> rank(static_cast<size_t>(I), -1);
    std::vector<Cand<acc_t>> heap(static_cast<size_t>(kmax));
    std::vector<uint8_t> hit(static_cast<size_t>(kmax));
    std::vector<int64_t> cnt(static_cast<size_t>(kmax));
    for (int64_t b = b0; b < b1; ++b) {
      int64_t* err = errors.data() + b * topk::kErrorFields;
      int64_t lo = 0, hi = 0;
      // Exclusions: check the row, then load the scores and blank the excluded ones.
      int64_t ex_lo = 0, ex_hi = 0;
      if (excl.defined()) {
        const int64_t r = csr_row_of(excl, users, b, Arg::kExclude, err);
        if (r < 0 || !checked_row(excl, r, I, Arg::kExclude, err, &ex_lo, &ex_hi)) continue;
      }
      const int64_t nan_at = load_row_any(scores + b * row_stride, buf.data(), I);
      if (nan_at >= 0) {
        report(err, RowError::kNaN, Arg::kScores, 0, nan_at);
        continue;
      }
      for (int64_t j = ex_lo; j < ex_hi; ++j) buf[excl.indices[j]] = std::numeric_limits<acc_t>::quiet_NaN();

      const int64_t n_sel = select_top_any(buf.data(), I, kmax, heap.data());
      for (int64_t r = 0; r < n_sel; ++r) rank[heap[r].item] = static_cast<int32_t>(r);
      std::fill(hit.begin(), hit.end(), uint8_t(0));
      std::fill(cnt.begin(), cnt.end(), int64_t(0));

      bool ok = true;
      if (pos.defined()) {
        const int64_t r = csr_row_of(pos, users, b, Arg::kPositives, err);
        ok = r >= 0 && checked_row(pos, r, I, Arg::kPositives, err, &lo, &hi);
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
      for (int64_t r = 0; r < n_sel; ++r) rank[heap[r].item] = -1;
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
        for (int64_t r = 0; r < n_sel; ++r) o[r] = heap[r].item;
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
