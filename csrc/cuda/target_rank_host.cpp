// Host side of the CUDA refit::target_rank: checks, allocation, stream, and
// the error report; the kernel itself lives in target_rank_cuda.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../target_rank.h"
#include "launchers.h"
#include "ranking_host.h"

namespace refit {

at::Tensor target_rank_cuda(const at::Tensor& scores, const std::optional<at::Tensor>& users,
                            const std::optional<at::Tensor>& exclude_indptr,
                            const std::optional<at::Tensor>& exclude_indices, const at::Tensor& positives_indptr,
                            const at::Tensor& positives_indices) {
  const TargetRankArgs a =
      check_target_rank_args(scores, users, exclude_indptr, exclude_indices, positives_indptr, positives_indices);
  TORCH_CHECK_VALUE(scores.is_cuda(), "target_rank (cuda): scores must be a CUDA tensor, got ", scores.device());
  const std::optional<DType> dtype = score_dtype_code(a.scores.scalar_type());
  TORCH_CHECK_TYPE(dtype, "target_rank (cuda): unsupported scores dtype ", a.scores.scalar_type());
  TORCH_CHECK_VALUE(a.B <= 0x7fffffff, "target_rank (cuda): at most 2^31 - 1 rows, got B = ", a.B);
  const c10::cuda::CUDAGuard guard(scores.device());
  TargetRankOutput out = target_rank_output(a);
  at::Tensor report = at::zeros({a.B, topk::kErrorFields}, scores.options().dtype(at::kLong));

  cuda::TargetRankParams p{};
  p.scores = a.scores.const_data_ptr();
  p.rows = a.B;
  p.items = a.I;
  p.score_row_stride = a.scores.stride(0);
  p.users = a.users.defined() ? a.users.const_data_ptr<int64_t>() : nullptr;
  p.exclude = csr_view(a.exclude);
  p.positives = csr_view(a.positives);
  p.starts = out.starts.defined() ? out.starts.const_data_ptr<int64_t>() : nullptr;
  p.ranks = out.ranks.data_ptr<int64_t>();
  p.report = report.data_ptr<int64_t>();
  const LaunchStatus status = cuda::target_rank(*dtype, p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK_VALUE(status != LaunchStatus::kBadShape, "target_rank (cuda): unsupported sizes (B = ", a.B,
                    ", I = ", a.I, ")");
  TORCH_CHECK(status == LaunchStatus::kOk, "target_rank (cuda) failed: ", cuda::target_rank_error_string());
  // Reading the report waits for the kernel: bad rows must raise, not return garbage.
  if (a.B > 0 && report.select(1, 0).ne(0).any().item<bool>()) {
    const at::Tensor host = report.cpu();
    raise_target_rank_row_error(host.const_data_ptr<int64_t>(), a);
  }
  return out.ranks;
}

TORCH_LIBRARY_IMPL(refit, CUDA, m) { m.impl("target_rank", &target_rank_cuda); }

}  // namespace refit
