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

// The fused policy-gradient loss over gaussian_logprob's rows (refit/policy_loss.h).
// pred and traj as for gaussian_logprob_forward; coef_pred, coef_x, log_var
// (S,), advantages (B,) and old ((S, B), or nullptr for REINFORCE) in the
// accumulation type, contiguous. Writes the contiguous (S, B) per-step terms
// and per-row loss shares (accumulation type; the caller sums the shares in a
// fixed order for the loss) and d loss / d pred into the contiguous
// (S, B, I) `grad_pred` of `dtype`. `clip` is read only with `old`.
LaunchStatus policy_loss_rows(DType dtype, const void* pred, const void* traj,
                              const void* coef_pred, const void* coef_x, const void* log_var,
                              const void* advantages, const void* old,
                              const GaussianLogprobShape& shape, double clip, double normalizer,
                              bool mean, void* terms, void* shares, void* grad_pred, void* stream);

// gather_rows: out[b] = sum_{j in [segments[b], segments[b+1])} weights[j] * A[rows[j]].
// Device pointers; null `values`, `segments` or `weights` mean ones, one row
// per output, ones.
struct GatherRowsArgs {
  const void* indptr;   // (n_rows + 1,) int64 when index64, else int32
  const void* indices;  // (nnz,) indptr's type
  bool index64;
  const float* values;      // (nnz,) or null
  const int64_t* rows;      // (n,)
  const int64_t* segments;  // (batch + 1,) or null (then batch == n)
  const float* weights;     // (n,) or null
  int64_t n_rows, nnz, n_cols;
  int64_t n;      // gathered rows
  int64_t batch;  // output rows B
};

// Checks every segment offset, row id, indptr entry and column id the kernel
// would read; sets the device int32 `*bad` (zeroed by the caller) to 1 when
// any is wrong. The caller reports which (it copies the arguments to the host).
LaunchStatus gather_rows_validate(const GatherRowsArgs& args, int32_t* bad, void* stream);

// Overwrites `out` ((batch, n_cols) of out_dtype: kFloat32, kFloat16 or
// kBFloat16, element strides out_row_stride / out_col_stride) with the sums.
// The arguments must have passed gather_rows_validate.
LaunchStatus gather_rows_forward(const GatherRowsArgs& args, DType out_dtype, void* out,
                                 int64_t out_row_stride, int64_t out_col_stride, void* stream);

// The message of the last CUDA error seen by a gather_rows launcher on this thread.
const char* gather_rows_last_error_string();
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

// target_rank: scores (rows, items) of `dtype` (any of the four) with unit
// item stride; the positives CSR (required) and the exclude CSR (indptr ==
// nullptr when absent), rows sorted and unique (checked by the kernel).
// Row b's ranks go to ranks[starts[b] + j], j = 0 .. its positives, when
// `starts` (rows,) is given, else beside the positives' entries
// (ranks[positives.indptr[u] + j]). report (rows, 4) zero-initialised
// (refit/topk_hits.h); users may be absent (nullptr).
struct TargetRankParams {
  const void* scores;
  int64_t rows, items, score_row_stride;
  const int64_t* users;
  TopKCsrView exclude, positives;
  const int64_t* starts;
  int64_t* ranks;
  int64_t* report;
};

LaunchStatus target_rank(DType dtype, const TargetRankParams& params, void* stream);
// The message of the last CUDA error seen by target_rank on this thread.
const char* target_rank_error_string();

// The message of the last CUDA error seen by a launcher on this thread.
const char* last_error_string();

}  // namespace cuda
}  // namespace refit
