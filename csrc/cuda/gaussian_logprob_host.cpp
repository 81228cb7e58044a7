// Host side of the CUDA refit::gaussian_logprob and refit::policy_loss:
// checks, layout, allocation, stream; the kernels themselves live in
// gaussian_logprob_cuda.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../gaussian_logprob.h"
#include "../policy_loss.h"
#include "launchers.h"

namespace refit {
namespace {

DType kernel_dtype(c10::ScalarType t) {
  switch (t) {
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    default: TORCH_CHECK_TYPE(false, "gaussian_logprob (cuda): unsupported dtype ", t);
  }
}

cuda::GaussianLogprobShape shape_of(const at::Tensor& pred, const at::Tensor& traj) {
  return {pred.size(0), pred.size(1), pred.size(2), pred.stride(0), pred.stride(1),
          traj.stride(0), traj.stride(1)};
}

void check_status(LaunchStatus status, const char* what) {
  TORCH_CHECK_VALUE(status != LaunchStatus::kBadShape, what,
                    ": S * B must be below 2^31 for the CUDA kernel");
  TORCH_CHECK(status == LaunchStatus::kOk, what, " failed: ", cuda::last_error_string());
}

}  // namespace

at::Tensor gaussian_logprob_cuda(const at::Tensor& pred_in, const at::Tensor& traj_in,
                                 const at::Tensor& coef_pred, const at::Tensor& coef_x,
                                 const at::Tensor& log_var, bool mean, bool per_step) {
  check_gaussian_logprob_args(pred_in, traj_in, coef_pred, coef_x, log_var, mean);
  TORCH_CHECK_VALUE(pred_in.is_cuda(), "gaussian_logprob (cuda): pred must be a CUDA tensor, got ",
                    pred_in.device());
  const c10::cuda::CUDAGuard guard(pred_in.device());
  const at::Tensor pred = items_contiguous(pred_in);
  const at::Tensor traj = items_contiguous(traj_in);
  const int64_t S = pred.size(0), B = pred.size(1);
  const auto acc = gaussian_logprob_result_type(pred.scalar_type());
  const at::Tensor cp = coef_pred.to(acc).contiguous();
  const at::Tensor cx = coef_x.to(acc).contiguous();
  const at::Tensor lv = log_var.to(acc).contiguous();
  at::Tensor out = per_step ? at::empty({S, B}, pred.options().dtype(acc))
                            : at::empty({B}, pred.options().dtype(acc));
  at::Tensor workspace = per_step ? out : at::empty({S, B}, pred.options().dtype(acc));
  check_status(cuda::gaussian_logprob_forward(
                   kernel_dtype(pred.scalar_type()), pred.const_data_ptr(), traj.const_data_ptr(),
                   cp.const_data_ptr(), cx.const_data_ptr(), lv.const_data_ptr(),
                   shape_of(pred, traj), mean, per_step, out.data_ptr(), workspace.data_ptr(),
                   c10::cuda::getCurrentCUDAStream().stream()),
               "gaussian_logprob (cuda)");
  return out;
}

at::Tensor gaussian_logprob_backward_cuda(const at::Tensor& grad_in, const at::Tensor& pred_in,
                                          const at::Tensor& traj_in, const at::Tensor& coef_pred,
                                          const at::Tensor& coef_x, const at::Tensor& log_var,
                                          bool mean, bool per_step) {
  check_gaussian_logprob_args(pred_in, traj_in, coef_pred, coef_x, log_var, mean);
  check_gaussian_logprob_grad(grad_in, pred_in, per_step);
  TORCH_CHECK_VALUE(pred_in.is_cuda(), "gaussian_logprob_backward (cuda): pred must be a CUDA tensor, got ",
                    pred_in.device());
  const c10::cuda::CUDAGuard guard(pred_in.device());
  const at::Tensor pred = items_contiguous(pred_in);
  const at::Tensor traj = items_contiguous(traj_in);
  const auto acc = gaussian_logprob_result_type(pred.scalar_type());
  const at::Tensor g = grad_in.to(acc).contiguous();
  const at::Tensor cp = coef_pred.to(acc).contiguous();
  const at::Tensor cx = coef_x.to(acc).contiguous();
  const at::Tensor lv = log_var.to(acc).contiguous();
  at::Tensor out = at::empty(pred.sizes(), pred.options().memory_format(at::MemoryFormat::Contiguous));
  check_status(cuda::gaussian_logprob_backward(
                   kernel_dtype(pred.scalar_type()), g.const_data_ptr(), pred.const_data_ptr(),
                   traj.const_data_ptr(), cp.const_data_ptr(), cx.const_data_ptr(),
                   lv.const_data_ptr(), shape_of(pred, traj), mean, per_step, out.data_ptr(),
                   c10::cuda::getCurrentCUDAStream().stream()),
               "gaussian_logprob_backward (cuda)");
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> policy_loss_cuda(
    const at::Tensor& pred_in, const at::Tensor& traj_in, const at::Tensor& coef_pred,
    const at::Tensor& coef_x, const at::Tensor& log_var, const at::Tensor& advantages,
    const c10::optional<at::Tensor>& old_logprob, double clip, bool mean, double normalizer) {
  check_policy_loss_args(pred_in, traj_in, coef_pred, coef_x, log_var, advantages, old_logprob, clip,
                         mean, normalizer);
  TORCH_CHECK_VALUE(pred_in.is_cuda(), "policy_loss (cuda): pred must be a CUDA tensor, got ",
                    pred_in.device());
  const c10::cuda::CUDAGuard guard(pred_in.device());
  const at::Tensor pred = items_contiguous(pred_in);
  const at::Tensor traj = items_contiguous(traj_in);
  const int64_t S = pred.size(0), B = pred.size(1);
  const auto acc = gaussian_logprob_result_type(pred.scalar_type());
  const at::Tensor cp = coef_pred.to(acc).contiguous();
  const at::Tensor cx = coef_x.to(acc).contiguous();
  const at::Tensor lv = log_var.to(acc).contiguous();
  const at::Tensor adv = advantages.to(acc).contiguous();
  const at::Tensor old = old_logprob.has_value() ? old_logprob->to(acc).contiguous() : at::Tensor();
  at::Tensor terms = at::empty({S, B}, pred.options().dtype(acc));
  at::Tensor shares = at::empty({S, B}, pred.options().dtype(acc));
  at::Tensor grad = at::empty(pred.sizes(), pred.options().memory_format(at::MemoryFormat::Contiguous));
  check_status(cuda::policy_loss_rows(
                   kernel_dtype(pred.scalar_type()), pred.const_data_ptr(), traj.const_data_ptr(),
                   cp.const_data_ptr(), cx.const_data_ptr(), lv.const_data_ptr(), adv.const_data_ptr(),
                   old.defined() ? old.const_data_ptr() : nullptr, shape_of(pred, traj), clip,
                   normalizer, mean, terms.data_ptr(), shares.data_ptr(), grad.data_ptr(),
                   c10::cuda::getCurrentCUDAStream().stream()),
               "policy_loss (cuda)");
  // torch's reduction adds in an order fixed by the shape, so the loss is
  // reproducible run to run.
  return {shares.sum(), terms, grad};
}

TORCH_LIBRARY_IMPL(refit, CUDA, m) {
  m.impl("gaussian_logprob", &gaussian_logprob_cuda);
  m.impl("gaussian_logprob_backward", &gaussian_logprob_backward_cuda);
  m.impl("policy_loss", &policy_loss_cuda);
}

}  // namespace refit
