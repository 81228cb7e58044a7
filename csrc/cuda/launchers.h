// Launchers of the CUDA kernels: plain C++ declarations with no torch and no
// CUDA headers, so the host glue (compiled by the C++ compiler against torch)
// and the kernels (compiled by nvcc, without torch) meet only here.
#pragma once

#include <cstdint>

#include "refit/common.h"

namespace refit {
namespace cuda {

// Sizes and element strides of gaussian_logprob's inputs; the item dimension
// has unit stride.
struct GaussianLogprobShape {
  int64_t steps;  // S
  int64_t users;  // B
  int64_t items;  // I
  int64_t pred_step_stride, pred_user_stride;
  int64_t traj_step_stride, traj_user_stride;
};

// Forward. pred (S, B, I) and traj (S+1, B, I) of `dtype`; the coefficient
// vectors (S,) and `out` are in the accumulation type: double for kFloat64
// inputs, float otherwise. Writes the (S, B) terms into `out` when per_step,
// else the (B,) sums over steps, using `workspace` ((S, B) accumulation-type
// elements, unused when per_step). `stream` is a cudaStream_t.
LaunchStatus gaussian_logprob_forward(DType dtype, const void* pred, const void* traj,
                                      const void* coef_pred, const void* coef_x,
                                      const void* log_var, const GaussianLogprobShape& shape,
                                      bool mean, bool per_step, void* out, void* workspace,
                                      void* stream);

// Backward. `grad` is the contiguous (S, B) or (B,) incoming gradient in the
// accumulation type; writes d/d pred into the contiguous (S, B, I) `grad_pred`
// of `dtype`.
LaunchStatus gaussian_logprob_backward(DType dtype, const void* grad, const void* pred,
                                       const void* traj, const void* coef_pred,
                                       const void* coef_x, const void* log_var,
                                       const GaussianLogprobShape& shape, bool mean,
                                       bool per_step, void* grad_pred, void* stream);

// The message of the last CUDA error seen by a launcher on this thread.
const char* last_error_string();

}  // namespace cuda
}  // namespace refit
