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

// topk_hits: one CSR argument (rows sorted and unique, checked by the kernel);
// indptr == nullptr when absent.
struct TopKCsrView {
  const int64_t* indptr;
  const int64_t* indices;
  int64_t rows, nnz;
};

// The largest Kmax the CUDA topk_hits kernel ranks (its top list lives in
// shared memory).
constexpr int64_t kTopKMaxK = 1024;

// Arguments of topk_hits: scores (rows, items) of `dtype` (float16, bfloat16
// or float32) with unit item stride; ks (n_ks,) ascending on the device with
// ks[n_ks - 1] == kmax; outputs contiguous: hits (rows, n_ks), dcg and
// neighbor_hits (rows, n_ks) float, first_hit (rows,), indices (rows, kmax)
// or nullptr, report (rows, 4) zero-initialised (refit/topk_hits.h). users,
// neighbors (rows, n_neighbors) and the CSR arguments may be absent (nullptr).
struct TopKHitsParams {
  const void* scores;
  int64_t rows, items, score_row_stride;
  const int64_t* ks;
  int64_t n_ks, kmax;
  const int64_t* users;
  TopKCsrView exclude, positives, neighbor_sets;
  const int64_t* neighbors;
  int64_t n_neighbors;
  int64_t* hits;
  float* dcg;
  float* neighbor_hits;
  int64_t* first_hit;
  int64_t* indices;
  int64_t* report;
};

LaunchStatus topk_hits(DType dtype, const TopKHitsParams& params, void* stream);
// The message of the last CUDA error seen by topk_hits on this thread.
const char* topk_hits_error_string();

// The message of the last CUDA error seen by a launcher on this thread.
const char* last_error_string();

}  // namespace cuda
}  // namespace refit
