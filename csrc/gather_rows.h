// Torch-side declarations and argument checks of refit::gather_rows, shared
// by the CPU kernel and the CUDA host code.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <utility>

namespace refit {

// The CSR matrix A is (indptr, indices, values?) with n_cols columns; rows
// (n,) int64; segments (B+1,) int64 or none (then B = n); weights (n,)
// float32 or none. The functional form returns a new (B, n_cols) tensor of
// `dtype` (float32, float16 or bfloat16); the out form zeroes and fills
// `out` ((B, n_cols), one of those dtypes, any strides) in place.
at::Tensor gather_rows_cpu(const at::Tensor& indptr, const at::Tensor& indices,
                           const std::optional<at::Tensor>& values, const at::Tensor& rows,
                           const std::optional<at::Tensor>& segments,
                           const std::optional<at::Tensor>& weights, int64_t n_cols,
                           c10::ScalarType dtype);
void gather_rows_out_cpu(const at::Tensor& indptr, const at::Tensor& indices,
                         const std::optional<at::Tensor>& values, const at::Tensor& rows,
                         const std::optional<at::Tensor>& segments,
                         const std::optional<at::Tensor>& weights, int64_t n_cols,
                         const at::Tensor& out);

inline bool is_gather_output_dtype(c10::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// The structural checks every backend makes (the data checks, row ids and
// column ids in range, are the kernels'), with the messages of the Python
// front end: TORCH_CHECK_TYPE raises TypeError and TORCH_CHECK_VALUE
// ValueError in Python. Returns B, the number of output rows.
inline int64_t check_gather_rows_args(const at::Tensor& indptr, const at::Tensor& indices,
                                      const std::optional<at::Tensor>& values,
                                      const at::Tensor& rows,
                                      const std::optional<at::Tensor>& segments,
                                      const std::optional<at::Tensor>& weights, int64_t n_cols) {
  TORCH_CHECK_TYPE(indptr.scalar_type() == at::kInt || indptr.scalar_type() == at::kLong,
                   "gather_rows: matrix indptr must be int32 or int64, got ", indptr.scalar_type());
  TORCH_CHECK_TYPE(indices.scalar_type() == indptr.scalar_type(),
                   "gather_rows: matrix indices must have indptr's dtype ", indptr.scalar_type(),
                   ", got ", indices.scalar_type());
  TORCH_CHECK_VALUE(indptr.dim() == 1 && indptr.size(0) >= 1,
                    "gather_rows: matrix indptr must be 1-D with n_rows + 1 >= 1 entries, got shape ",
                    indptr.sizes());
  TORCH_CHECK_VALUE(indices.dim() == 1, "gather_rows: matrix indices must be 1-D, got shape ",
                    indices.sizes());
  TORCH_CHECK_VALUE(n_cols >= 0, "gather_rows: n_cols must be >= 0, got ", n_cols);
  const auto device = indptr.device();
  TORCH_CHECK_VALUE(indices.device() == device, "gather_rows: matrix indices is on ",
                    indices.device(), " but indptr is on ", device);
  if (values.has_value()) {
    TORCH_CHECK_TYPE(values->scalar_type() == at::kFloat,
                     "gather_rows: matrix values must be float32, got ", values->scalar_type());
    TORCH_CHECK_VALUE(values->dim() == 1 && values->size(0) == indices.size(0),
                      "gather_rows: matrix values must have the shape of indices (",
                      indices.size(0), ",), got ", values->sizes());
    TORCH_CHECK_VALUE(values->device() == device, "gather_rows: matrix values is on ",
                      values->device(), " but indptr is on ", device);
  }
  TORCH_CHECK_TYPE(rows.scalar_type() == at::kLong, "gather_rows: rows must be int64, got ",
                   rows.scalar_type());
  TORCH_CHECK_VALUE(rows.dim() == 1, "gather_rows: rows must be 1-D, got shape ", rows.sizes());
  TORCH_CHECK_VALUE(rows.device() == device, "gather_rows: rows is on ", rows.device(),
                    " but the matrix is on ", device);
  int64_t B = rows.size(0);
  if (segments.has_value()) {
    TORCH_CHECK_TYPE(segments->scalar_type() == at::kLong,
                     "gather_rows: segments must be int64, got ", segments->scalar_type());
    TORCH_CHECK_VALUE(segments->dim() == 1 && segments->size(0) >= 1,
                      "gather_rows: segments must be 1-D offsets (B + 1,) with B >= 0, got shape ",
                      segments->sizes());
    TORCH_CHECK_VALUE(segments->device() == device, "gather_rows: segments is on ",
                      segments->device(), " but the matrix is on ", device);
    B = segments->size(0) - 1;
  }
  if (weights.has_value()) {
    TORCH_CHECK_TYPE(weights->scalar_type() == at::kFloat,
                     "gather_rows: weights must be float32, got ", weights->scalar_type());
    TORCH_CHECK_VALUE(weights->dim() == 1 && weights->size(0) == rows.size(0),
                      "gather_rows: weights must have the shape of rows (", rows.size(0),
                      ",), got ", weights->sizes());
    TORCH_CHECK_VALUE(weights->device() == device, "gather_rows: weights is on ",
                      weights->device(), " but the matrix is on ", device);
  }
  return B;
}

inline void check_gather_rows_dtype(c10::ScalarType dtype) {
  TORCH_CHECK_TYPE(is_gather_output_dtype(dtype),
                   "gather_rows: dtype must be float32, float16 or bfloat16, got ", dtype);
}

inline void check_gather_rows_out(const at::Tensor& out, int64_t B, int64_t n_cols,
                                  const at::Device& device) {
  TORCH_CHECK_TYPE(is_gather_output_dtype(out.scalar_type()),
                   "gather_rows: out must be float32, float16 or bfloat16, got ",
                   out.scalar_type());
  TORCH_CHECK_VALUE(out.dim() == 2 && out.size(0) == B && out.size(1) == n_cols,
                    "gather_rows: out must have shape (B, n_cols) = (", B, ", ", n_cols,
                    "), got ", out.sizes());
  TORCH_CHECK_VALUE(out.device() == device, "gather_rows: out is on ", out.device(),
                    " but the matrix is on ", device);
  // Each element is written by one thread: elements sharing memory would race.
  TORCH_CHECK_VALUE(at::has_internal_overlap(out) != at::MemOverlap::Yes,
                    "gather_rows: out has elements that share memory (an expanded tensor?); "
                    "pass a tensor whose elements are distinct");
}

// The addresses [first, last) of the bytes a tensor's elements span (first ==
// last when it has none). Strides are never negative in torch.
inline std::pair<uintptr_t, uintptr_t> byte_span(const at::Tensor& t) {
  if (t.numel() == 0) return {0, 0};
  int64_t extent = 1;
  for (int64_t d = 0; d < t.dim(); ++d) extent += (t.size(d) - 1) * t.stride(d);
  const auto first = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  return {first, first + static_cast<uintptr_t>(extent) * t.element_size()};
}

// `out` must not overlap an input: it is zeroed and written while the inputs
// are still being read. Address ranges, not storages, are compared, so views
// of one buffer through different storages count too (the same test as
// refit_kernels/_checks.py, with the same message).
inline void check_gather_rows_no_alias(const at::Tensor& out, const at::Tensor& indptr,
                                       const at::Tensor& indices,
                                       const std::optional<at::Tensor>& values,
                                       const at::Tensor& rows,
                                       const std::optional<at::Tensor>& segments,
                                       const std::optional<at::Tensor>& weights) {
  const auto o = byte_span(out);
  if (o.first == o.second) return;
  const std::pair<const char*, const at::Tensor*> inputs[] = {
      {"matrix indptr", &indptr},
      {"matrix indices", &indices},
      {"matrix values", values.has_value() ? &*values : nullptr},
      {"rows", &rows},
      {"segments", segments.has_value() ? &*segments : nullptr},
      {"weights", weights.has_value() ? &*weights : nullptr},
  };
  for (const auto& [name, t] : inputs) {
    if (t == nullptr || !t->defined()) continue;
    const auto s = byte_span(*t);
    TORCH_CHECK_VALUE(!(s.first < o.second && o.first < s.second), "gather_rows: out shares memory with ",
                      name, "; pass an out that overlaps no input");
  }
}

}  // namespace refit
