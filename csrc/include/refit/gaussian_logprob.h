// The arithmetic of the Gaussian log-probability of a denoising trajectory,
// shared by the CPU and CUDA kernels (see DESIGN.md, "Op 1").
//
//   mu_s        = coef_pred[s] * pred[s] + coef_x[s] * traj[s]
//   r_s         = traj[s+1] - mu_s                       (the residual)
//   term(s, b)  = -0.5 * (sum_i r^2 / v_s + I * log(2 pi v_s)),  v_s = exp(log_var[s])
//   d term / d pred[s, b, i] = coef_pred[s] * r_s[b, i] / v_s
#pragma once

#include "refit/common.h"

namespace refit {
namespace glp {

// log(2 * pi), to double precision.
constexpr double kLog2Pi = 1.8378770664093453;

// The residual traj[s+1] - coef_x * traj[s] - coef_pred * pred, with two fused
// multiply-adds. The residual is 1e-4..1e-2 of the states it is taken from
// (step variances are 1e-7..1e-5), so rounding once per fma instead of once per
// operation keeps visibly more of its significant digits in float32.
template <typename acc_t>
REFIT_HOST_DEVICE REFIT_INLINE acc_t residual(acc_t x_next, acc_t x, acc_t pred,
                                              acc_t coef_pred, acc_t coef_x) {
  return fma_(-coef_pred, pred, fma_(-coef_x, x, x_next));
}

// Log-likelihood contribution of one (step, user) row from its sum of squared
// residuals. The normalising constant I * log(2 pi v) is added analytically
// instead of per item: with v ~ 1e-7 it dominates the sum, and adding it once
// avoids I roundings of a large number.
// The *_inv forms take 1 / v = exp(-log_var) computed once per step by the
// caller (rows of few items cost little else); the results are the same bits.
template <typename acc_t>
REFIT_HOST_DEVICE REFIT_INLINE acc_t step_term_inv(acc_t sum_sq, acc_t inv_var, acc_t log_var,
                                                   acc_t n_items, acc_t scale) {
  return acc_t(-0.5) * scale * (sum_sq * inv_var + n_items * (acc_t(kLog2Pi) + log_var));
}

template <typename acc_t>
REFIT_HOST_DEVICE REFIT_INLINE acc_t step_term(acc_t sum_sq, acc_t log_var,
                                               acc_t n_items, acc_t scale) {
  return step_term_inv<acc_t>(sum_sq, exp_(-log_var), log_var, n_items, scale);
}

// Factor that turns a residual into d term / d pred: scale * coef_pred / v.
template <typename acc_t>
REFIT_HOST_DEVICE REFIT_INLINE acc_t grad_factor_inv(acc_t coef_pred, acc_t inv_var, acc_t scale) {
  return scale * coef_pred * inv_var;
}

template <typename acc_t>
REFIT_HOST_DEVICE REFIT_INLINE acc_t grad_factor(acc_t coef_pred, acc_t log_var,
                                                 acc_t scale) {
  return grad_factor_inv<acc_t>(coef_pred, exp_(-log_var), scale);
}

}  // namespace glp
}  // namespace refit
