// Host side of the CUDA refit::gather_rows: checks, validation, allocation,
// stream; the kernels themselves live in gather_rows_cuda.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../gather_rows.h"
#include "launchers.h"

namespace refit {
namespace {

DType out_kernel_dtype(c10::ScalarType t) {
  switch (t) {
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kFloat: return DType::kFloat32;
    default: TORCH_CHECK_TYPE(false, "gather_rows (cuda): unsupported output dtype ", t);
  }
}

void check_status(LaunchStatus status, const char* what) {
  TORCH_CHECK_VALUE(status != LaunchStatus::kBadShape, what,
                    ": at most 2^31 - 1 output rows for the CUDA kernel");
  TORCH_CHECK(status == LaunchStatus::kOk, what, " failed: ", cuda::gather_rows_last_error_string());
}

at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

std::optional<at::Tensor> on_cpu(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->cpu()) : std::nullopt;
}

}  // namespace

void gather_rows_out_cuda(const at::Tensor& indptr_in, const at::Tensor& indices_in,
                          const std::optional<at::Tensor>& values_in, const at::Tensor& rows_in,
                          const std::optional<at::Tensor>& segments_in,
                          const std::optional<at::Tensor>& weights_in, int64_t n_cols,
                          const at::Tensor& out) {
  const int64_t B = check_gather_rows_args(indptr_in, indices_in, values_in, rows_in, segments_in,
                                           weights_in, n_cols);
  check_gather_rows_out(out, B, n_cols, indptr_in.device());
  check_gather_rows_no_alias(out, indptr_in, indices_in, values_in, rows_in, segments_in, weights_in);
  TORCH_CHECK_VALUE(indptr_in.is_cuda(), "gather_rows (cuda): the matrix must be on a CUDA device, got ",
                    indptr_in.device());
  const c10::cuda::CUDAGuard guard(indptr_in.device());
  const at::Tensor indptr = indptr_in.contiguous(), indices = indices_in.contiguous();
  const at::Tensor rows = rows_in.contiguous();
  const at::Tensor values = contiguous_or_undefined(values_in);
  const at::Tensor segments = contiguous_or_undefined(segments_in);
  const at::Tensor weights = contiguous_or_undefined(weights_in);
  const cuda::GatherRowsArgs args{
      indptr.const_data_ptr(),
      indices.const_data_ptr(),
      indptr.scalar_type() == at::kLong,
      values.defined() ? values.const_data_ptr<float>() : nullptr,
      rows.const_data_ptr<int64_t>(),
      segments.defined() ? segments.const_data_ptr<int64_t>() : nullptr,
      weights.defined() ? weights.const_data_ptr<float>() : nullptr,
      indptr.size(0) - 1,
      indices.size(0),
      n_cols,
      rows.size(0),
      B,
  };
  void* stream = c10::cuda::getCurrentCUDAStream().stream();

  // Validate on the device, before anything is written. On a problem, the
  // CPU kernel re-runs the checks on host copies to raise the exact error
  // (which argument, which index); this path is taken only for bad input.
  at::Tensor bad = at::zeros({1}, indptr.options().dtype(at::kInt));
  check_status(cuda::gather_rows_validate(args, bad.data_ptr<int32_t>(), stream),
               "gather_rows (cuda) validation");
  if (bad.item<int32_t>() != 0) {
    (void)gather_rows_cpu(indptr.cpu(), indices.cpu(), on_cpu(values_in), rows.cpu(),
                          on_cpu(segments_in), on_cpu(weights_in), n_cols, at::kFloat);
    TORCH_CHECK(false, "gather_rows (cuda): the device found an index out of range that the host "
                       "checks did not; please report this");
  }
  check_status(cuda::gather_rows_forward(args, out_kernel_dtype(out.scalar_type()), out.data_ptr(),
                                         out.stride(0), out.stride(1), stream),
               "gather_rows (cuda)");
}

at::Tensor gather_rows_cuda(const at::Tensor& indptr, const at::Tensor& indices,
                            const std::optional<at::Tensor>& values, const at::Tensor& rows,
                            const std::optional<at::Tensor>& segments,
                            const std::optional<at::Tensor>& weights, int64_t n_cols,
                            c10::ScalarType dtype) {
  check_gather_rows_dtype(dtype);
  const int64_t B = check_gather_rows_args(indptr, indices, values, rows, segments, weights, n_cols);
  at::Tensor out = at::empty({B, n_cols}, indptr.options().dtype(dtype));
  gather_rows_out_cuda(indptr, indices, values, rows, segments, weights, n_cols, out);
  return out;
}

TORCH_LIBRARY_IMPL(refit, CUDA, m) {
  m.impl("gather_rows", &gather_rows_cuda);
  m.impl("gather_rows_out", &gather_rows_out_cuda);
}

}  // namespace refit
