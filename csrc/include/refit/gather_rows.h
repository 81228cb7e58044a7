// Index arithmetic and checks of refit::gather_rows, shared by the CPU and
// CUDA kernels (see DESIGN.md, "Op 3"):
//
//   out[b, :] = sum over j in [seg[b], seg[b+1]) of  w[j] * A[rows[j], :]
//
// A is CSR (indptr, indices, optional values); without segments output row b
// is gathered row b alone; without weights or values they are ones. Sums run
// in float32 in the order of the segment's rows, then of each row's entries.
#pragma once

#include "refit/common.h"

namespace refit {
namespace gr {

// What the validation of one gathered row found, in the order it is reported.
enum class Problem : int32_t {
  kNone = 0,
  kRowId = 1,    // rows[j] is not in [0, n_rows)
  kIndptr = 2,   // indptr[r] .. indptr[r+1] is not a range inside [0, nnz]
  kColumn = 3,   // a column id of the row is not in [0, n_cols)
};

// 0 <= i < n with one comparison: a negative i wraps to a huge unsigned value.
REFIT_HOST_DEVICE REFIT_INLINE bool in_range(int64_t i, int64_t n) {
  return static_cast<uint64_t>(i) < static_cast<uint64_t>(n);
}

// The gathered rows [*begin, *end) that output row b sums.
REFIT_HOST_DEVICE REFIT_INLINE void segment_of(const int64_t* segments, int64_t b, int64_t* begin,
                                               int64_t* end) {
  if (segments == nullptr) {
    *begin = b;
    *end = b + 1;
  } else {
    *begin = segments[b];
    *end = segments[b + 1];
  }
}

// Checks gathered row j's row id and its entries' extent; on success stores
// the extent [*p0, *p1) of its entries in indices / values. Everything a
// kernel reads for row j is inside arrays of the sizes given once this holds.
template <typename index_t>
REFIT_HOST_DEVICE REFIT_INLINE Problem row_extent(const index_t* indptr, int64_t n_rows, int64_t nnz,
                                                  int64_t r, int64_t* p0, int64_t* p1) {
  if (!in_range(r, n_rows)) return Problem::kRowId;
  const int64_t a = static_cast<int64_t>(indptr[r]);
  const int64_t b = static_cast<int64_t>(indptr[r + 1]);
  if (a < 0 || a > b || b > nnz) return Problem::kIndptr;
  *p0 = a;
  *p1 = b;
  return Problem::kNone;
}

// Weight of gathered row j and value of entry k: ones when absent.
REFIT_HOST_DEVICE REFIT_INLINE float weight_of(const float* weights, int64_t j) {
  return weights == nullptr ? 1.0f : weights[j];
}
REFIT_HOST_DEVICE REFIT_INLINE float value_of(const float* values, int64_t k) {
  return values == nullptr ? 1.0f : values[k];
}

}  // namespace gr
}  // namespace refit
