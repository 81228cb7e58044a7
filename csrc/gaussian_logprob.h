// Torch-side declarations and argument checks of refit::gaussian_logprob,
// shared by the CPU kernels and the CUDA host code.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace refit {

// Forward: (S,) coefficient vectors, pred (S, B, I), traj (S+1, B, I).
// Returns (B,) or, with per_step, (S, B); float64 for float64 inputs and
// float32 otherwise.
at::Tensor gaussian_logprob_cpu(const at::Tensor& pred, const at::Tensor& traj,
                                const at::Tensor& coef_pred, const at::Tensor& coef_x,
                                const at::Tensor& log_var, bool mean, bool per_step);
// Backward: grad has the forward result's shape; returns d/d pred, shaped and
// typed like pred (contiguous).
at::Tensor gaussian_logprob_backward_cpu(const at::Tensor& grad, const at::Tensor& pred,
                                         const at::Tensor& traj, const at::Tensor& coef_pred,
                                         const at::Tensor& coef_x, const at::Tensor& log_var,
                                         bool mean, bool per_step);

inline bool is_kernel_float(c10::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// The checks every backend makes, with the messages of the Python front end:
// TORCH_CHECK_TYPE raises TypeError and TORCH_CHECK_VALUE ValueError in Python.
inline void check_gaussian_logprob_args(const at::Tensor& pred, const at::Tensor& traj,
                                        const at::Tensor& coef_pred, const at::Tensor& coef_x,
                                        const at::Tensor& log_var, bool mean,
                                        const char* op = "gaussian_logprob") {
  TORCH_CHECK_TYPE(is_kernel_float(pred.scalar_type()),
                   op, ": pred must be float16, bfloat16, float32 or float64, got ",
                   pred.scalar_type());
  TORCH_CHECK_TYPE(traj.scalar_type() == pred.scalar_type(),
                   op, ": traj must have pred's dtype ", pred.scalar_type(),
                   ", got ", traj.scalar_type());
  TORCH_CHECK_VALUE(pred.dim() == 3, op, ": pred must be 3-D (S, B, I), got shape ",
                    pred.sizes());
  TORCH_CHECK_VALUE(traj.dim() == 3, op, ": traj must be 3-D (S+1, B, I), got shape ",
                    traj.sizes());
  const int64_t S = pred.size(0);
  TORCH_CHECK_VALUE(traj.size(0) == S + 1 && traj.size(1) == pred.size(1) &&
                        traj.size(2) == pred.size(2),
                    op, ": traj must have shape (S+1, B, I) = (", S + 1, ", ",
                    pred.size(1), ", ", pred.size(2), ") for pred of shape ", pred.sizes(),
                    ", got ", traj.sizes());
  TORCH_CHECK_VALUE(traj.device() == pred.device(), op, ": traj is on ",
                    traj.device(), " but pred is on ", pred.device());
  TORCH_CHECK_VALUE(!mean || pred.size(2) > 0,
                    op, ": reduction='mean' needs at least one item, got I = 0");
  const char* names[3] = {"coef_pred", "coef_x", "log_var"};
  const at::Tensor* coefs[3] = {&coef_pred, &coef_x, &log_var};
  for (int k = 0; k < 3; ++k) {
    const at::Tensor& c = *coefs[k];
    TORCH_CHECK_TYPE(c.scalar_type() == at::kFloat || c.scalar_type() == at::kDouble,
                     op, ": ", names[k], " must be float32 or float64, got ",
                     c.scalar_type());
    TORCH_CHECK_VALUE(c.dim() == 1 && c.size(0) == S, op, ": ", names[k],
                      " must have shape (S,) = (", S, ",), got ", c.sizes());
    TORCH_CHECK_VALUE(c.device() == pred.device(), op, ": ", names[k], " is on ",
                      c.device(), " but pred is on ", pred.device());
  }
}

inline void check_gaussian_logprob_grad(const at::Tensor& grad, const at::Tensor& pred,
                                        bool per_step) {
  TORCH_CHECK_TYPE(grad.scalar_type() == at::kFloat || grad.scalar_type() == at::kDouble,
                   "gaussian_logprob_backward: grad must be float32 or float64, got ",
                   grad.scalar_type());
  const bool ok = per_step ? (grad.dim() == 2 && grad.size(0) == pred.size(0) &&
                              grad.size(1) == pred.size(1))
                           : (grad.dim() == 1 && grad.size(0) == pred.size(1));
  TORCH_CHECK_VALUE(ok, "gaussian_logprob_backward: grad must have shape ",
                    per_step ? "(S, B)" : "(B,)", " for pred of shape ", pred.sizes(), ", got ",
                    grad.sizes());
  TORCH_CHECK_VALUE(grad.device() == pred.device(), "gaussian_logprob_backward: grad is on ",
                    grad.device(), " but pred is on ", pred.device());
}

// The kernels walk rows of I items with unit stride; any other layout of the
// item dimension is copied once (steps and users may have any strides).
inline at::Tensor items_contiguous(const at::Tensor& t) {
  return (t.size(2) <= 1 || t.stride(2) == 1) ? t : t.contiguous();
}

// Result dtype: float64 stays float64, everything else is reported in float32
// (a sum of I * S terms of size ~10 overflows float16).
inline c10::ScalarType gaussian_logprob_result_type(c10::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace refit
