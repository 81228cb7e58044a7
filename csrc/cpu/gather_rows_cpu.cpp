// CPU kernel of refit::gather_rows: threads over output rows, each output row
// written by one thread (no atomics), after a validation pass that reads every
// index the kernel will use, so nothing is written when any is out of range.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <vector>

#include "../gather_rows.h"
#include "common.h"
#include "refit/gather_rows.h"

namespace refit {
namespace {

template <typename index_t>
struct Csr {
  const index_t* indptr;
  const index_t* indices;
  const float* values;  // null: all ones
  int64_t n_rows, nnz, n_cols;
};

struct Batch {
  const int64_t* rows;
  const int64_t* segments;  // null: one gathered row per output row
  const float* weights;     // null: all ones
  int64_t n;                // gathered rows
  int64_t B;                // output rows
};

void check_segments(const Batch& g) {
  if (g.segments == nullptr) return;
  const int64_t* seg = g.segments;
  TORCH_CHECK_VALUE(seg[0] == 0 && seg[g.B] == g.n,
                    "gather_rows: segments must start at 0 and end at len(rows) = ", g.n,
                    ", got ", seg[0], " .. ", seg[g.B]);
  for (int64_t b = 0; b < g.B; ++b) {
    TORCH_CHECK_VALUE(seg[b] <= seg[b + 1], "gather_rows: segments must be non-decreasing, got ",
                      "segments[", b, "] = ", seg[b], " > segments[", b + 1, "] = ", seg[b + 1]);
  }
}

// Any column id of entries [p0, p1) outside [0, n_cols)? One unsigned
// comparison per entry and an OR reduction, which vectorises.
template <typename index_t>
bool any_column_out_of_range(const index_t* __restrict__ indices, int64_t p0, int64_t p1,
                             int64_t n_cols) {
  const uint64_t n = static_cast<uint64_t>(n_cols);
  int bad = 0;
#pragma omp simd reduction(| : bad)
  for (int64_t k = p0; k < p1; ++k) {
    bad |= static_cast<int>(static_cast<uint64_t>(static_cast<int64_t>(indices[k])) >= n);
  }
  return bad != 0;
}

template <typename index_t>
gr::Problem check_gathered_row(const Csr<index_t>& A, const Batch& g, int64_t j) {
  int64_t p0 = 0, p1 = 0;
  const gr::Problem p = gr::row_extent(A.indptr, A.n_rows, A.nnz, g.rows[j], &p0, &p1);
  if (p != gr::Problem::kNone) return p;
  return any_column_out_of_range(A.indices, p0, p1, A.n_cols) ? gr::Problem::kColumn
                                                             : gr::Problem::kNone;
}

// Reads every row id, indptr entry and column id the kernel will use, in
// parallel; raises for the first gathered row (lowest j) with a problem.
template <typename index_t>
void validate(const Csr<index_t>& A, const Batch& g) {
  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
  at::parallel_for(0, g.n, 64, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      if (check_gathered_row(A, g, j) != gr::Problem::kNone) {
        int64_t seen = first_bad.load();
        while (j < seen && !first_bad.compare_exchange_weak(seen, j)) {
        }
        return;  // later rows of this chunk cannot be the first
      }
    }
  });
  const int64_t j = first_bad.load();
  if (j == std::numeric_limits<int64_t>::max()) return;
  const int64_t r = g.rows[j];
  switch (check_gathered_row(A, g, j)) {
    case gr::Problem::kRowId:
      TORCH_CHECK_INDEX(false, "gather_rows: rows[", j, "] = ", r,
                        " is out of range for a matrix with ", A.n_rows, " rows");
    case gr::Problem::kIndptr:
      TORCH_CHECK_VALUE(false, "gather_rows: matrix indptr of row ", r, " (rows[", j, "]) gives ",
                        "the entries ", static_cast<int64_t>(A.indptr[r]), " .. ",
                        static_cast<int64_t>(A.indptr[r + 1]), ", not a range inside [0, nnz = ",
                        A.nnz, "]");
    case gr::Problem::kColumn: {
      const int64_t p0 = A.indptr[r], p1 = A.indptr[r + 1];
      for (int64_t k = p0; k < p1; ++k) {
        const int64_t c = A.indices[k];
        TORCH_CHECK_INDEX(gr::in_range(c, A.n_cols), "gather_rows: matrix has column index ", c,
                          " (indices[", k, "], in row ", r, " = rows[", j,
                          "]) out of range for n_cols = ", A.n_cols);
      }
      break;
    }
    case gr::Problem::kNone:
      break;
  }
}

// acc[c] += w[j] * A[rows[j], c] over the segment of output row b, in the
// order of its rows, then of each row's entries. Indices are validated.
template <typename index_t, bool kValues, bool kWeights>
REFIT_INLINE void add_segment(float* __restrict__ acc, int64_t col_stride, const Csr<index_t>& A,
                              const Batch& g, int64_t b) {
  int64_t j0, j1;
  gr::segment_of(g.segments, b, &j0, &j1);
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t r = g.rows[j];
    const int64_t p0 = A.indptr[r], p1 = A.indptr[r + 1];
    const float w = kWeights ? g.weights[j] : 1.0f;
    const index_t* __restrict__ cols = A.indices;
    if (kValues) {
      const float* __restrict__ vals = A.values;
      for (int64_t k = p0; k < p1; ++k) acc[cols[k] * col_stride] += w * vals[k];
    } else {
      for (int64_t k = p0; k < p1; ++k) acc[cols[k] * col_stride] += w;
    }
  }
}

template <typename index_t, bool kValues, bool kWeights, typename out_t>
void fill(const Csr<index_t>& A, const Batch& g, out_t* out, int64_t s0, int64_t s1) {
  const int64_t n_cols = A.n_cols;
  if (g.B == 0 || n_cols == 0) return;
  // Tasks of at least ~32K output elements: thread start-up costs more than
  // zeroing and filling a few short rows.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / n_cols);
  constexpr bool kFloatOut = std::is_same_v<out_t, float>;
  at::parallel_for(0, g.B, grain, [&](int64_t b0, int64_t b1) {
    if (kFloatOut) {
      // float32 output: accumulate in place, no scratch row.
      for (int64_t b = b0; b < b1; ++b) {
        float* row = reinterpret_cast<float*>(out) + b * s0;
        if (s1 == 1) {
          std::memset(row, 0, sizeof(float) * n_cols);
          add_segment<index_t, kValues, kWeights>(row, 1, A, g, b);
        } else {
          for (int64_t c = 0; c < n_cols; ++c) row[c * s1] = 0.0f;
          add_segment<index_t, kValues, kWeights>(row, s1, A, g, b);
        }
      }
    } else {
      // 16-bit output: accumulate a float32 row, round each element once.
      std::vector<float> acc(static_cast<size_t>(n_cols));
      for (int64_t b = b0; b < b1; ++b) {
        std::fill(acc.begin(), acc.end(), 0.0f);
        add_segment<index_t, kValues, kWeights>(acc.data(), 1, A, g, b);
        out_t* row = out + b * s0;
        for (int64_t c = 0; c < n_cols; ++c) row[c * s1] = static_cast<out_t>(acc[c]);
      }
    }
  });
}

template <typename index_t, typename out_t>
void fill_dispatch(const Csr<index_t>& A, const Batch& g, out_t* out, int64_t s0, int64_t s1) {
  const bool v = A.values != nullptr, w = g.weights != nullptr;
  if (v && w) fill<index_t, true, true>(A, g, out, s0, s1);
  else if (v) fill<index_t, true, false>(A, g, out, s0, s1);
  else if (w) fill<index_t, false, true>(A, g, out, s0, s1);
  else fill<index_t, false, false>(A, g, out, s0, s1);
}

template <typename index_t>
void run(const at::Tensor& indptr, const at::Tensor& indices, const at::Tensor& values,
         const Batch& g, int64_t n_cols, const at::Tensor& out) {
  const Csr<index_t> A{indptr.const_data_ptr<index_t>(), indices.const_data_ptr<index_t>(),
                       values.defined() ? values.const_data_ptr<float>() : nullptr,
                       indptr.size(0) - 1, indices.size(0), n_cols};
  validate(A, g);
  const int64_t s0 = out.stride(0), s1 = out.stride(1);
  switch (out.scalar_type()) {
    case at::kFloat: fill_dispatch(A, g, out.data_ptr<float>(), s0, s1); break;
    case at::kHalf: fill_dispatch(A, g, out.data_ptr<c10::Half>(), s0, s1); break;
    case at::kBFloat16: fill_dispatch(A, g, out.data_ptr<c10::BFloat16>(), s0, s1); break;
    default: TORCH_CHECK_TYPE(false, "gather_rows: unsupported output dtype ", out.scalar_type());
  }
}

at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

}  // namespace

void gather_rows_out_cpu(const at::Tensor& indptr_in, const at::Tensor& indices_in,
                         const std::optional<at::Tensor>& values_in, const at::Tensor& rows_in,
                         const std::optional<at::Tensor>& segments_in,
                         const std::optional<at::Tensor>& weights_in, int64_t n_cols,
                         const at::Tensor& out) {
  const int64_t B = check_gather_rows_args(indptr_in, indices_in, values_in, rows_in, segments_in,
                                           weights_in, n_cols);
  check_gather_rows_out(out, B, n_cols, indptr_in.device());
  TORCH_CHECK_VALUE(indptr_in.device().is_cpu(),
                    "gather_rows (cpu): the matrix must be on the CPU, got ", indptr_in.device());
  const at::Tensor indptr = indptr_in.contiguous(), indices = indices_in.contiguous();
  const at::Tensor rows = rows_in.contiguous();
  const at::Tensor values = contiguous_or_undefined(values_in);
  const at::Tensor segments = contiguous_or_undefined(segments_in);
  const at::Tensor weights = contiguous_or_undefined(weights_in);
  const Batch g{rows.const_data_ptr<int64_t>(),
                segments.defined() ? segments.const_data_ptr<int64_t>() : nullptr,
                weights.defined() ? weights.const_data_ptr<float>() : nullptr, rows.size(0), B};
  check_segments(g);
  if (indptr.scalar_type() == at::kInt) {
    run<int32_t>(indptr, indices, values, g, n_cols, out);
  } else {
    run<int64_t>(indptr, indices, values, g, n_cols, out);
  }
}

at::Tensor gather_rows_cpu(const at::Tensor& indptr, const at::Tensor& indices,
                           const std::optional<at::Tensor>& values, const at::Tensor& rows,
                           const std::optional<at::Tensor>& segments,
                           const std::optional<at::Tensor>& weights, int64_t n_cols,
                           c10::ScalarType dtype) {
  check_gather_rows_dtype(dtype);
  const int64_t B = check_gather_rows_args(indptr, indices, values, rows, segments, weights, n_cols);
  at::Tensor out = cpu::empty_for_overwrite({B, n_cols}, indptr.options().dtype(dtype));
  gather_rows_out_cpu(indptr, indices, values, rows, segments, weights, n_cols, out);
  return out;
}

TORCH_LIBRARY_IMPL(refit, CPU, m) {
  m.impl("gather_rows", &gather_rows_cpu);
  m.impl("gather_rows_out", &gather_rows_out_cpu);
}

}  // namespace refit
