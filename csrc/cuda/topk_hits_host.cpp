// Host side of the CUDA refit::topk_hits: checks, allocation, stream, and the
// error report; the kernel itself lives in topk_hits_cuda.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../topk_hits.h"
#include "launchers.h"
#include "ranking_host.h"

namespace refit {

TopKHitsResult topk_hits_cuda(const at::Tensor& scores, at::IntArrayRef ks,
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
  TORCH_CHECK_VALUE(scores.is_cuda(), "topk_hits (cuda): scores must be a CUDA tensor, got ",
                    scores.device());
  const std::optional<DType> dtype = score_dtype_code(a.scores.scalar_type());
  TORCH_CHECK_TYPE(dtype && *dtype != DType::kFloat64,
                   "topk_hits (cuda): scores must be float16, bfloat16 or float32, got ", a.scores.scalar_type(),
                   " (float64 runs on the cpu and reference backends)");
  TORCH_CHECK_VALUE(a.kmax <= cuda::kTopKMaxK, "topk_hits (cuda): Kmax must be at most ",
                    cuda::kTopKMaxK, ", got ", a.kmax);
  TORCH_CHECK_VALUE(a.B <= 0x7fffffff, "topk_hits (cuda): at most 2^31 - 1 rows, got B = ", a.B);
  const c10::cuda::CUDAGuard guard(scores.device());
  const int64_t B = a.B, n_k = static_cast<int64_t>(a.ks.size());
  const auto opts = scores.options();
  at::Tensor hits = at::empty({B, n_k}, opts.dtype(at::kLong));
  at::Tensor dcg = at::empty({B, n_k}, opts.dtype(at::kFloat));
  at::Tensor nbr_hits = at::empty({B, n_k}, opts.dtype(at::kFloat));
  at::Tensor first_hit = at::empty({B}, opts.dtype(at::kLong));
  at::Tensor indices = at::empty({B, return_indices ? a.kmax : 0}, opts.dtype(at::kLong));
  at::Tensor report = at::zeros({B, topk::kErrorFields}, opts.dtype(at::kLong));
  at::Tensor ks_host = at::empty({n_k}, at::TensorOptions().dtype(at::kLong));
  std::copy(a.ks.begin(), a.ks.end(), ks_host.data_ptr<int64_t>());
  const at::Tensor ks_dev = ks_host.to(scores.device());

  cuda::TopKHitsParams p{};
  p.scores = a.scores.const_data_ptr();
  p.rows = B;
  p.items = a.I;
  p.score_row_stride = a.scores.stride(0);
  p.ks = ks_dev.const_data_ptr<int64_t>();
  p.n_ks = n_k;
  p.kmax = a.kmax;
  p.users = a.users.defined() ? a.users.const_data_ptr<int64_t>() : nullptr;
  p.exclude = csr_view(a.exclude);
  p.positives = csr_view(a.positives);
  p.neighbor_sets = csr_view(a.neighbor_sets);
  p.neighbors = a.neighbors.defined() ? a.neighbors.const_data_ptr<int64_t>() : nullptr;
  p.n_neighbors = a.neighbors.defined() ? a.neighbors.size(1) : 0;
  p.hits = hits.data_ptr<int64_t>();
  p.dcg = dcg.data_ptr<float>();
  p.neighbor_hits = nbr_hits.data_ptr<float>();
  p.first_hit = first_hit.data_ptr<int64_t>();
  p.indices = return_indices ? indices.data_ptr<int64_t>() : nullptr;
  p.report = report.data_ptr<int64_t>();
  const LaunchStatus status = cuda::topk_hits(*dtype, p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK_VALUE(status != LaunchStatus::kBadShape, "topk_hits (cuda): unsupported sizes (B = ", B,
                    ", I = ", a.I, ", Kmax = ", a.kmax, ")");
  TORCH_CHECK(status == LaunchStatus::kOk, "topk_hits (cuda) failed: ", cuda::topk_hits_error_string());
  // Reading the report waits for the kernel: bad rows must raise, not return garbage.
  if (B > 0 && report.select(1, 0).ne(0).any().item<bool>()) {
    const at::Tensor host = report.cpu();
    raise_topk_row_error(host.const_data_ptr<int64_t>(), a);
  }
  return {hits, dcg, nbr_hits, first_hit, indices};
}

TORCH_LIBRARY_IMPL(refit, CUDA, m) { m.impl("topk_hits", &topk_hits_cuda); }

}  // namespace refit
