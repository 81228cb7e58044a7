// CSR rows as the CPU kernels of the ranking ops (topk_hits, target_rank)
// read them: every row is checked before it is used, and the first problem
// goes into the scores row's error report (the layout of refit/topk_hits.h).
#pragma once

#include <cstdint>

#include "../topk_hits.h"
#include "refit/topk_hits.h"

namespace refit {
namespace cpu {

// A CSR argument as raw pointers (indptr == nullptr when it is absent).
struct CsrView {
  const int64_t* indptr = nullptr;
  const int64_t* indices = nullptr;
  int64_t rows = 0, nnz = 0;
  bool defined() const { return indptr != nullptr; }
};

inline CsrView view_of(const TopKCsr& m) {
  if (!m.defined()) return {};
  return {m.indptr.const_data_ptr<int64_t>(), m.indices.const_data_ptr<int64_t>(), m.rows(), m.nnz()};
}

REFIT_INLINE void report(int64_t* err, topk::RowError code, topk::Arg arg, int64_t row, int64_t detail) {
  err[0] = static_cast<int64_t>(code);
  err[1] = static_cast<int64_t>(arg);
  err[2] = row;
  err[3] = detail;
}

// Checks CSR row r (its indptr range, then its columns in order: in [0, I)
// and strictly increasing) and returns [lo, hi); false after reporting.
inline bool checked_row(const CsrView& m, int64_t r, int64_t I, topk::Arg arg, int64_t* err, int64_t* lo,
                        int64_t* hi) {
  using topk::RowError;
  const int64_t a = m.indptr[r], b = m.indptr[r + 1];
  if (!(0 <= a && a <= b && b <= m.nnz)) {
    report(err, RowError::kBadIndptr, arg, r, 0);
    return false;
  }
  // A strictly increasing row whose ends lie in [0, I) is what every row
  // should be: one branch-free pass says so, and only a row that fails is
  // walked again to name its first problem.
  const int64_t* idx = m.indices;
  int bad = b > a && (idx[a] < 0 || idx[b - 1] >= I);
#pragma omp simd reduction(| : bad)
  for (int64_t j = a + 1; j < b; ++j) bad |= (idx[j] <= idx[j - 1]);
  if (!bad) {
    *lo = a;
    *hi = b;
    return true;
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
REFIT_INLINE int64_t csr_row_of(const CsrView& m, const int64_t* users, int64_t b, topk::Arg arg, int64_t* err) {
  const int64_t u = users ? users[b] : b;
  if (u < 0 || u >= m.rows) {
    report(err, topk::RowError::kUserOutOfRange, arg, 0, u);
    return -1;
  }
  return u;
}

// Checks the CSR row of scores row b (users[b], or b) and gives its [lo, hi);
// false after reporting its first problem.
inline bool checked_row_of(const CsrView& m, const int64_t* users, int64_t b, int64_t I, topk::Arg arg,
                           int64_t* err, int64_t* lo, int64_t* hi) {
  const int64_t r = csr_row_of(m, users, b, arg, err);
  return r >= 0 && checked_row(m, r, I, arg, err, lo, hi);
}

}  // namespace cpu
}  // namespace refit
