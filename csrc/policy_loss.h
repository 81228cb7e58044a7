// Torch-side declarations and argument checks of refit::policy_loss, shared
// by the CPU kernel and the CUDA host code.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <tuple>

#include "gaussian_logprob.h"

namespace refit {

// The fused policy-gradient loss over a trajectory (see refit/policy_loss.h):
// returns (loss, logprob, grad_pred): the () loss and the (S, B) per-step
// log-likelihoods in float64 for float64 inputs, else float32, and d loss /
// d pred, shaped and typed like pred (contiguous).
std::tuple<at::Tensor, at::Tensor, at::Tensor> policy_loss_cpu(
    const at::Tensor& pred, const at::Tensor& traj, const at::Tensor& coef_pred,
    const at::Tensor& coef_x, const at::Tensor& log_var, const at::Tensor& advantages,
    const c10::optional<at::Tensor>& old_logprob, double clip, bool mean, double normalizer);

// The checks every backend makes, with the messages of the Python front end.
inline void check_policy_loss_args(const at::Tensor& pred, const at::Tensor& traj,
                                   const at::Tensor& coef_pred, const at::Tensor& coef_x,
                                   const at::Tensor& log_var, const at::Tensor& advantages,
                                   const c10::optional<at::Tensor>& old_logprob, double clip,
                                   bool mean, double normalizer) {
  check_gaussian_logprob_args(pred, traj, coef_pred, coef_x, log_var, mean, "policy_loss");
  const int64_t S = pred.size(0), B = pred.size(1);
  TORCH_CHECK_TYPE(advantages.scalar_type() == at::kFloat || advantages.scalar_type() == at::kDouble,
                   "policy_loss: advantages must be float32 or float64, got ", advantages.scalar_type());
  TORCH_CHECK_VALUE(advantages.dim() == 1 && advantages.size(0) == B,
                    "policy_loss: advantages must have shape (B,) = (", B, ",), got ", advantages.sizes());
  TORCH_CHECK_VALUE(advantages.device() == pred.device(), "policy_loss: advantages is on ",
                    advantages.device(), " but pred is on ", pred.device());
  if (old_logprob.has_value()) {
    const at::Tensor& old = *old_logprob;
    TORCH_CHECK_TYPE(old.scalar_type() == at::kFloat || old.scalar_type() == at::kDouble,
                     "policy_loss: old_logprob must be float32 or float64, got ", old.scalar_type());
    TORCH_CHECK_VALUE(old.dim() == 2 && old.size(0) == S && old.size(1) == B,
                      "policy_loss: old_logprob must have shape (S, B) = (", S, ", ", B, "), got ",
                      old.sizes());
    TORCH_CHECK_VALUE(old.device() == pred.device(), "policy_loss: old_logprob is on ", old.device(),
                      " but pred is on ", pred.device());
    TORCH_CHECK_VALUE(std::isfinite(clip) && clip > 0.0,
                      "policy_loss: clip must be a finite number > 0, got ", clip);
  }
  TORCH_CHECK_VALUE(std::isfinite(normalizer) && normalizer > 0.0,
                    "policy_loss: normalizer must be a finite number > 0, got ", normalizer);
}

}  // namespace refit
