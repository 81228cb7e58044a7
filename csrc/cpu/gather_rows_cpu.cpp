// CPU kernel of refit::gather_rows: threads over output rows, each output row
// zeroed and filled by one thread (no atomics). Every index the kernel will
// use is checked before anything is written, so nothing is written when one
// is out of range: in the same parallel region as the filling (a barrier
// between the two) or, for gathers longer than the matrix, in passes of
// their own (see check_then_fill).
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

#ifdef _OPENMP
#include <omp.h>
#endif

#include "../gather_rows.h"
#include "common.h"
#include "refit/gather_rows.h"

namespace refit {
namespace {

using cpu::grain_for;
using cpu::kStreamBytesPerMs;

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

// Any column id of entries [p0, p1) outside [0, n_cols)? A min / max
// reduction, which vectorises (compiled for AVX-512 and AVX2 as well, picked
// at load time: this pass reads every gathered index once more).
template <typename index_t>
REFIT_INLINE bool any_column_out_of_range(const index_t* __restrict__ indices, int64_t p0, int64_t p1,
                                          int64_t n_cols) {
  index_t lo = 0, hi = 0;
#pragma omp simd reduction(min : lo) reduction(max : hi)
  for (int64_t k = p0; k < p1; ++k) {
    lo = std::min(lo, indices[k]);
    hi = std::max(hi, indices[k]);
  }
  return lo < 0 || (p1 > p0 && static_cast<int64_t>(hi) >= n_cols);
}

REFIT_CPU_CLONES bool columns_out_of_range_i32(const int32_t* indices, int64_t p0, int64_t p1, int64_t n_cols) {
  return any_column_out_of_range<int32_t>(indices, p0, p1, n_cols);
}
REFIT_CPU_CLONES bool columns_out_of_range_i64(const int64_t* indices, int64_t p0, int64_t p1, int64_t n_cols) {
  return any_column_out_of_range<int64_t>(indices, p0, p1, n_cols);
}
REFIT_INLINE bool columns_out_of_range(const int32_t* indices, int64_t p0, int64_t p1, int64_t n_cols) {
  return columns_out_of_range_i32(indices, p0, p1, n_cols);
}
REFIT_INLINE bool columns_out_of_range(const int64_t* indices, int64_t p0, int64_t p1, int64_t n_cols) {
  return columns_out_of_range_i64(indices, p0, p1, n_cols);
}

template <typename index_t>
gr::Problem check_gathered_row(const Csr<index_t>& A, const Batch& g, int64_t j) {
  int64_t p0 = 0, p1 = 0;
  const gr::Problem p = gr::row_extent(A.indptr, A.n_rows, A.nnz, g.rows[j], &p0, &p1);
  if (p != gr::Problem::kNone) return p;
  return columns_out_of_range(A.indices, p0, p1, A.n_cols) ? gr::Problem::kColumn
                                                          : gr::Problem::kNone;
}

constexpr int64_t kNoProblem = std::numeric_limits<int64_t>::max();

// Lowers `first` to j (several threads may report).
REFIT_INLINE void report(std::atomic<int64_t>& first, int64_t j) {
  int64_t seen = first.load();
  while (j < seen && !first.compare_exchange_weak(seen, j)) {
  }
}

// Raises the error of gathered row j, the first one with a problem.
template <typename index_t>
[[noreturn]] void raise_for(const Csr<index_t>& A, const Batch& g, int64_t j) {
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
  TORCH_CHECK(false, "gather_rows: internal error: gathered row ", j, " was reported bad but checks out");
}

// Reads every row id, indptr entry and column id the kernel will use, in
// parallel, and raises for the first gathered row (lowest j) with a problem.
//
// Column ids are checked per gathered row, or, when the gathered rows hold
// more entries than the whole matrix (long segments of neighbors repeat
// rows), in one pass over all of the matrix's column ids instead: a superset
// that costs less. Only if that finds a bad id somewhere are the gathered
// rows checked one by one (the bad id may sit in a row that is not read).
template <typename index_t>
void validate(const Csr<index_t>& A, const Batch& g) {
  std::atomic<int64_t> first_bad{kNoProblem};
  std::atomic<int64_t> entries{0};
  // Grains: about 1 ms of work per task (see cpu::grain_for); a row id check reads ~16 bytes.
  cpu::parallel_for(0, g.n, grain_for(16, kStreamBytesPerMs), [&](int64_t j0, int64_t j1) {
    int64_t sum = 0;
    for (int64_t j = j0; j < j1; ++j) {
      int64_t p0 = 0, p1 = 0;
      if (gr::row_extent(A.indptr, A.n_rows, A.nnz, g.rows[j], &p0, &p1) != gr::Problem::kNone) {
        report(first_bad, j);
        return;  // later rows of this chunk cannot be the first
      }
      sum += p1 - p0;
    }
    entries += sum;
  });
  if (first_bad.load() != kNoProblem) raise_for(A, g, first_bad.load());

  if (entries.load() > A.nnz) {
    std::atomic<bool> matrix_ok{true};
    cpu::parallel_for(0, A.nnz, grain_for(sizeof(index_t), kStreamBytesPerMs), [&](int64_t k0, int64_t k1) {
      if (columns_out_of_range(A.indices, k0, k1, A.n_cols)) matrix_ok = false;
    });
    if (matrix_ok.load()) return;
  }
  const int64_t row_bytes = static_cast<int64_t>(sizeof(index_t)) * std::max<int64_t>(1, A.nnz / std::max<int64_t>(1, A.n_rows));
  cpu::parallel_for(0, g.n, grain_for(row_bytes, kStreamBytesPerMs), [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t r = g.rows[j];
      if (columns_out_of_range(A.indices, A.indptr[r], A.indptr[r + 1], A.n_cols)) {
        report(first_bad, j);
        return;
      }
    }
  });
  if (first_bad.load() != kNoProblem) raise_for(A, g, first_bad.load());
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

// Zeroes and fills output rows [b0, b1). `scratch` (n_cols floats) is used
// for 16-bit outputs, which are accumulated in float32 and rounded once.
template <typename index_t, bool kValues, bool kWeights, typename out_t>
void fill_rows(const Csr<index_t>& A, const Batch& g, out_t* out, int64_t s0, int64_t s1, int64_t b0,
               int64_t b1, float* scratch) {
  const int64_t n_cols = A.n_cols;
  if (n_cols == 0) return;
  for (int64_t b = b0; b < b1; ++b) {
    if constexpr (std::is_same_v<out_t, float>) {
      // float32 output: accumulate in place.
      float* row = out + b * s0;
      if (s1 == 1) {
        std::memset(row, 0, sizeof(float) * n_cols);
        add_segment<index_t, kValues, kWeights>(row, 1, A, g, b);
      } else {
        for (int64_t c = 0; c < n_cols; ++c) row[c * s1] = 0.0f;
        add_segment<index_t, kValues, kWeights>(row, s1, A, g, b);
      }
    } else {
      std::memset(scratch, 0, sizeof(float) * n_cols);
      add_segment<index_t, kValues, kWeights>(scratch, 1, A, g, b);
      out_t* row = out + b * s0;
      for (int64_t c = 0; c < n_cols; ++c) row[c * s1] = static_cast<out_t>(scratch[c]);
    }
  }
}

template <typename index_t, typename out_t>
void fill_rows_dispatch(const Csr<index_t>& A, const Batch& g, out_t* out, int64_t s0, int64_t s1,
                        int64_t b0, int64_t b1, float* scratch) {
  const bool v = A.values != nullptr, w = g.weights != nullptr;
  if (v && w) fill_rows<index_t, true, true>(A, g, out, s0, s1, b0, b1, scratch);
  else if (v) fill_rows<index_t, true, false>(A, g, out, s0, s1, b0, b1, scratch);
  else if (w) fill_rows<index_t, false, true>(A, g, out, s0, s1, b0, b1, scratch);
  else fill_rows<index_t, false, false>(A, g, out, s0, s1, b0, b1, scratch);
}

// Checks gathered rows [j0, j1) in full; reports the first bad one.
template <typename index_t>
void check_rows(const Csr<index_t>& A, const Batch& g, int64_t j0, int64_t j1,
                std::atomic<int64_t>& first_bad) {
  for (int64_t j = j0; j < j1; ++j) {
    if (check_gathered_row(A, g, j) != gr::Problem::kNone) {
      report(first_bad, j);
      return;
    }
  }
}

REFIT_INLINE int64_t segment_begin(const Batch& g, int64_t b) {
  return g.segments == nullptr ? b : g.segments[b];
}

// Output rows per thread task: about 1 ms of zeroing and filling (see
// cpu::grain_for); a row writes n_cols floats.
int64_t row_grain(int64_t n_cols) { return grain_for(4 * n_cols, kStreamBytesPerMs); }

// Validation and filling in one parallel region: every thread checks the
// gathered rows of its own output rows, all meet at a barrier, and only then,
// if nothing was wrong anywhere, fill their rows, whose indices are still in
// their caches. (at::parallel_for has no barrier, hence OpenMP directly; it
// is what at::parallel_for runs on in these builds.)
template <typename index_t, typename out_t>
void check_and_fill(const Csr<index_t>& A, const Batch& g, out_t* out, int64_t s0, int64_t s1) {
  int64_t threads = 1;
#ifdef _OPENMP
  if (!at::in_parallel_region() && !cpu::held_up_recently()) {
    threads = std::clamp<int64_t>(g.B / row_grain(A.n_cols), 1, at::get_num_threads());
  }
#endif
  std::atomic<int64_t> first_bad{kNoProblem};
  const bool scratch_needed = !std::is_same_v<out_t, float>;
  std::vector<float> scratch(scratch_needed ? static_cast<size_t>(threads * A.n_cols) : 0);
  auto task = [&](int64_t t, int64_t n_tasks, bool checking) {
    const int64_t b0 = g.B * t / n_tasks, b1 = g.B * (t + 1) / n_tasks;
    if (checking) {
      check_rows(A, g, segment_begin(g, b0), segment_begin(g, b1), first_bad);
    } else if (first_bad.load() == kNoProblem) {
      fill_rows_dispatch(A, g, out, s0, s1, b0, b1, scratch_needed ? scratch.data() + t * A.n_cols : nullptr);
    }
  };
#ifdef _OPENMP
  cpu::watch::Region region;  // judged only when split (see cpu::parallel_for)
#pragma omp parallel num_threads(static_cast<int>(threads)) if (threads > 1)
  {
    const int64_t t = omp_get_thread_num(), n_tasks = omp_get_num_threads();
    const int64_t t0 = cpu::watch::thread_cpu_ns();
    task(t, n_tasks, true);
    const int64_t t1 = cpu::watch::thread_cpu_ns();
#pragma omp barrier
    // the barrier's spin is CPU time too, but not this task's work: the halves are timed apart
    const int64_t t2 = cpu::watch::thread_cpu_ns();
    task(t, n_tasks, false);
    region.task((t1 - t0) + (cpu::watch::thread_cpu_ns() - t2));
  }
  if (threads > 1) region.done();
#else
  task(0, 1, true);
  task(0, 1, false);
#endif
  if (first_bad.load() != kNoProblem) raise_for(A, g, first_bad.load());
}

template <typename index_t, typename out_t>
void check_then_fill(const Csr<index_t>& A, const Batch& g, out_t* out, int64_t s0, int64_t s1) {
  // More gathered rows than the matrix has (long segments of neighbors, which
  // repeat rows): validate, checking the whole matrix's columns once, then fill.
  if (g.n > A.n_rows) {
    validate(A, g);
    cpu::parallel_for(0, g.B, row_grain(A.n_cols), [&](int64_t b0, int64_t b1) {
      std::vector<float> scratch(std::is_same_v<out_t, float> ? 0 : static_cast<size_t>(A.n_cols));
      fill_rows_dispatch(A, g, out, s0, s1, b0, b1, scratch.data());
    });
    return;
  }
  check_and_fill(A, g, out, s0, s1);
}

template <typename index_t>
void run(const at::Tensor& indptr, const at::Tensor& indices, const at::Tensor& values,
         const Batch& g, int64_t n_cols, const at::Tensor& out) {
  const Csr<index_t> A{indptr.const_data_ptr<index_t>(), indices.const_data_ptr<index_t>(),
                       values.defined() ? values.const_data_ptr<float>() : nullptr,
                       indptr.size(0) - 1, indices.size(0), n_cols};
  const int64_t s0 = out.stride(0), s1 = out.stride(1);
  switch (out.scalar_type()) {
    case at::kFloat: check_then_fill(A, g, out.data_ptr<float>(), s0, s1); break;
    case at::kHalf: check_then_fill(A, g, out.data_ptr<c10::Half>(), s0, s1); break;
    case at::kBFloat16: check_then_fill(A, g, out.data_ptr<c10::BFloat16>(), s0, s1); break;
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
  check_gather_rows_no_alias(out, indptr_in, indices_in, values_in, rows_in, segments_in, weights_in);
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
