// Torch-side declarations and argument checks of refit::target_rank, shared
// by the CPU kernel and the CUDA host code. The checks are topk_hits' (the
// shared arguments are refused alike, see ../topk_hits.h).
#pragma once

#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <optional>

#include "refit/target_rank.h"
#include "topk_hits.h"

namespace refit {

// Returns the (n,) int64 ranks of the positives; see
// refit_kernels/ops/target_rank.py for the contract.
at::Tensor target_rank_cpu(const at::Tensor& scores, const std::optional<at::Tensor>& users,
                           const std::optional<at::Tensor>& exclude_indptr,
                           const std::optional<at::Tensor>& exclude_indices, const at::Tensor& positives_indptr,
                           const at::Tensor& positives_indices);

// Checked, contiguous arguments of one call.
struct TargetRankArgs {
  at::Tensor scores;  // (B, I), items contiguous
  at::Tensor users;   // (B,) int64 or undefined
  TopKCsr exclude, positives;
  int64_t B = 0, I = 0;
};

// The checks every backend makes, with the messages of the Python front end.
// Checks that need the values of the tensors (ids in range, sorted rows, NaN)
// are the kernels' and are reported per row through raise_target_rank_row_error.
inline TargetRankArgs check_target_rank_args(const at::Tensor& scores, const std::optional<at::Tensor>& users,
                                             const std::optional<at::Tensor>& exclude_indptr,
                                             const std::optional<at::Tensor>& exclude_indices,
                                             const at::Tensor& positives_indptr,
                                             const at::Tensor& positives_indices) {
  TargetRankArgs a;
  a.scores = checked_scores("target_rank", scores);
  a.B = scores.size(0);
  a.I = scores.size(1);
  a.users = checked_users("target_rank", users, a.B, scores);
  const int64_t per_batch = a.users.defined() ? -1 : a.B;
  a.exclude = checked_csr("target_rank", "exclude", exclude_indptr, exclude_indices, scores, per_batch);
  a.positives = checked_csr("target_rank", "positives", positives_indptr, positives_indices, scores, per_batch);
  return a;
}

// The output and where each scores row's ranks start in it.
//
// Without users the ranks sit beside the positives' entries: output (nnz,),
// row b's ranks at [indptr[b], indptr[b+1]), and `starts` is undefined (the
// kernels use indptr). The output starts filled with kExcludedRank, so an
// entry that belongs to no row (an indptr that does not run from 0 to nnz,
// which the Python front end refuses) is "never ranked", not garbage.
//
// With users, row b's ranks are those of positives row users[b]: the output
// is the rows' ranks one after the other, `starts` (B,) int64 where each
// begins. A row that the kernel will refuse (users[b] or its indptr range
// out of range) counts as empty here.
struct TargetRankOutput {
  at::Tensor ranks, starts;
};

inline TargetRankOutput target_rank_output(const TargetRankArgs& a) {
  const auto opts = a.scores.options().dtype(at::kLong);
  const TopKCsr& pos = a.positives;
  if (!a.users.defined()) return {at::full({pos.nnz()}, target_rank::kExcludedRank, opts), {}};
  at::Tensor lengths = at::zeros({a.B}, opts);
  if (pos.rows() > 0) {
    const at::Tensor u = a.users;
    const at::Tensor in_range = (u >= 0).logical_and_(u < pos.rows());
    const at::Tensor r = u.clamp(0, pos.rows() - 1);
    const at::Tensor lo = pos.indptr.index_select(0, r), hi = pos.indptr.index_select(0, r + 1);
    const at::Tensor ok = in_range.logical_and_(lo >= 0).logical_and_(lo <= hi).logical_and_(hi <= pos.nnz());
    lengths = at::where(ok, hi - lo, 0);
  }
  const at::Tensor ends = at::cumsum(lengths, 0);
  const int64_t total = a.B > 0 ? ends[a.B - 1].item<int64_t>() : 0;
  return {at::empty({total}, opts), ends - lengths};
}

// Raises the error of the first bad row of a target_rank report (see raise_row_error).
inline void raise_target_rank_row_error(const int64_t* report, const TargetRankArgs& a) {
  raise_row_error(report, {"target_rank", a.B, a.I, a.exclude.rows(), a.positives.rows(), 0});
}

}  // namespace refit
