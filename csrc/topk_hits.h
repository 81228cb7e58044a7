// Torch-side declarations and argument checks of refit::topk_hits, shared by
// the CPU kernel and the CUDA host code; the checks of the arguments the
// ranking ops share (scores, users, CSR arguments, the per-row error report)
// serve refit::target_rank too (target_rank.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "refit/topk_hits.h"

namespace refit {

using TopKHitsResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Returns (hits (B, n_k) int64, dcg (B, n_k) float32, neighbor_hits (B, n_k)
// float32, first_hit (B,) int64, indices (B, Kmax) int64, or (B, 0) when not
// asked for). See refit_kernels/ops/topk_hits.py for the contract.
TopKHitsResult topk_hits_cpu(const at::Tensor& scores, at::IntArrayRef ks,
                             const std::optional<at::Tensor>& users,
                             const std::optional<at::Tensor>& exclude_indptr,
                             const std::optional<at::Tensor>& exclude_indices,
                             const std::optional<at::Tensor>& positives_indptr,
                             const std::optional<at::Tensor>& positives_indices,
                             const std::optional<at::Tensor>& neighbors,
                             const std::optional<at::Tensor>& neighbor_sets_indptr,
                             const std::optional<at::Tensor>& neighbor_sets_indices,
                             bool return_indices);

// One CSR argument as plain tensors (undefined when the argument is absent).
struct TopKCsr {
  at::Tensor indptr, indices;
  bool defined() const { return indptr.defined(); }
  int64_t rows() const { return defined() ? indptr.size(0) - 1 : 0; }
  int64_t nnz() const { return defined() ? indices.size(0) : 0; }
};

// Checked, contiguous arguments of one call.
struct TopKHitsArgs {
  at::Tensor scores;  // (B, I), items contiguous
  std::vector<int64_t> ks;
  at::Tensor users;  // (B,) int64 or undefined
  TopKCsr exclude, positives, neighbor_sets;
  at::Tensor neighbors;  // (B, M) int64 contiguous or undefined
  bool return_indices = false;
  int64_t B = 0, I = 0, kmax = 0;
};

namespace topk_detail {

inline const char* arg_name(topk::Arg a) {
  switch (a) {
    case topk::Arg::kScores: return "scores";
    case topk::Arg::kExclude: return "exclude";
    case topk::Arg::kPositives: return "positives";
    case topk::Arg::kNeighbors: return "neighbors";
    case topk::Arg::kNeighborSets: return "neighbor_sets";
  }
  return "?";
}

}  // namespace topk_detail

// The checks of the arguments the ranking ops (topk_hits, target_rank) share,
// each naming `op` in its message as the Python front ends do.

// scores: float16, bfloat16, float32 or float64, 2-D, I < 2^31. Returns the
// scores with unit item stride (a copy only when the items are strided).
inline at::Tensor checked_scores(const char* op, const at::Tensor& scores) {
  const auto st = scores.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble, op,
                   ": scores must be float16, bfloat16, float32 or float64, got ", st);
  TORCH_CHECK_VALUE(scores.dim() == 2, op, ": scores must be 2-D (B, I), got shape ", scores.sizes());
  TORCH_CHECK_VALUE(scores.size(1) < (int64_t(1) << 31), op, ": at most 2^31 - 1 items, got I = ",
                    scores.size(1));
  return (scores.size(1) <= 1 || scores.stride(1) == 1) ? scores : scores.contiguous();
}

// users: (B,) int64 on the scores' device, contiguous; undefined when absent.
inline at::Tensor checked_users(const char* op, const std::optional<at::Tensor>& users, int64_t B,
                                const at::Tensor& scores) {
  if (!users.has_value() || !users->defined()) return {};
  TORCH_CHECK_TYPE(users->scalar_type() == at::kLong, op, ": users must be int64, got ", users->scalar_type());
  TORCH_CHECK_VALUE(users->dim() == 1 && users->size(0) == B, op, ": users must have shape (B,) = (", B,
                    ",), got ", users->sizes());
  TORCH_CHECK_VALUE(users->device() == scores.device(), op, ": users is on ", users->device(),
                    " but scores is on ", scores.device());
  return users->contiguous();
}

// One CSR argument: int64 1-D parts on the scores' device, given together;
// rows_when_per_batch >= 0 also asks for that many rows (a CSR indexed by
// scores row, without users).
inline TopKCsr checked_csr(const char* op, const char* name, const std::optional<at::Tensor>& indptr,
                           const std::optional<at::Tensor>& indices, const at::Tensor& scores,
                           int64_t rows_when_per_batch = -1) {
  const bool has_p = indptr.has_value() && indptr->defined();
  const bool has_i = indices.has_value() && indices->defined();
  TORCH_CHECK_VALUE(has_p == has_i, op, ": ", name, "_indptr and ", name, "_indices must be given together");
  if (!has_p) return {};
  for (const at::Tensor* t : {&*indptr, &*indices}) {
    const char* part = t == &*indptr ? "indptr" : "indices";
    TORCH_CHECK_TYPE(t->scalar_type() == at::kLong, op, ": ", name, " ", part, " must be int64, got ",
                     t->scalar_type());
    TORCH_CHECK_VALUE(t->dim() == 1, op, ": ", name, " ", part, " must be 1-D, got shape ", t->sizes());
    TORCH_CHECK_VALUE(t->device() == scores.device(), op, ": ", name, " is on ", t->device(),
                      " but scores is on ", scores.device());
  }
  TORCH_CHECK_VALUE(indptr->size(0) >= 1, op, ": ", name, " indptr must have n_rows + 1 >= 1 entries, got none");
  TopKCsr m{indptr->contiguous(), indices->contiguous()};
  TORCH_CHECK_VALUE(rows_when_per_batch < 0 || m.rows() == rows_when_per_batch, op, ": ", name, " has ",
                    m.rows(), " rows but scores has B = ", rows_when_per_batch,
                    " (pass users= to pick rows of a larger matrix)");
  return m;
}

// Raises the error of the first bad row of a (B, 4) int64 report written by a
// kernel of `op` (see refit/topk_hits.h); does nothing when every row is
// fine. `csrs` gives the number of rows of each CSR argument (by topk::Arg).
// IndexError for ids out of range, ValueError for the rest.
struct RowErrorContext {
  const char* op;
  int64_t B, I;
  int64_t exclude_rows, positives_rows, neighbor_sets_rows;
};

inline void raise_row_error(const int64_t* report, const RowErrorContext& c) {
  using topk::Arg;
  using topk::RowError;
  const char* op = c.op;
  for (int64_t b = 0; b < c.B; ++b) {
    const int64_t* e = report + b * topk::kErrorFields;
    const auto code = static_cast<RowError>(e[0]);
    if (code == RowError::kNone) continue;
    const auto arg = static_cast<Arg>(e[1]);
    const int64_t row = e[2], detail = e[3];
    const char* name = topk_detail::arg_name(arg);
    const int64_t n_rows = arg == Arg::kExclude     ? c.exclude_rows
                           : arg == Arg::kPositives ? c.positives_rows
                                                    : c.neighbor_sets_rows;
    switch (code) {
      case RowError::kNaN:
        TORCH_CHECK_VALUE(false, op, ": scores row ", b, " contains NaN (first at column ", detail,
                          "); NaN scores cannot be ranked");
      case RowError::kUserOutOfRange:
        TORCH_CHECK_INDEX(false, op, ": users[", b, "] = ", detail, " is out of range for ", name, " with ",
                          n_rows, " rows");
      case RowError::kBadIndptr:
        TORCH_CHECK_VALUE(false, op, ": ", name, " row ", row, " (scores row ", b,
                          ") has an invalid indptr range: need 0 <= indptr[", row, "] <= indptr[", row + 1,
                          "] <= nnz");
      case RowError::kColumnOutOfRange:
        TORCH_CHECK_INDEX(false, op, ": ", name, " row ", row, " (scores row ", b, ") has column index ",
                          detail, ", out of range for I = ", c.I, " items");
      case RowError::kUnsorted:
        TORCH_CHECK_VALUE(false, op, ": ", name, " row ", row, " (scores row ", b, ") has column index ",
                          detail,
                          " after a larger or equal one: the column indices of a row must be "
                          "sorted and unique (e.g. scipy's sum_duplicates())");
      case RowError::kNeighborOutOfRange:
        TORCH_CHECK_INDEX(false, op, ": neighbors[", b, ", ", row, "] = ", detail,
                          " is out of range for neighbor_sets with ", c.neighbor_sets_rows,
                          " rows (-1 marks padding)");
      default:
        TORCH_CHECK(false, op, ": internal error in row ", b, " (code ", e[0], "): please report it");
    }
  }
}

// The checks every backend makes, with the messages of the Python front end
// (TORCH_CHECK_TYPE raises TypeError, TORCH_CHECK_VALUE ValueError). Checks
// that need the values of the tensors (ids in range, sorted rows, NaN) are
// the kernels' and are reported per row through raise_topk_row_error.
inline TopKHitsArgs check_topk_hits_args(const at::Tensor& scores, at::IntArrayRef ks,
                                         const std::optional<at::Tensor>& users,
                                         const std::optional<at::Tensor>& exclude_indptr,
                                         const std::optional<at::Tensor>& exclude_indices,
                                         const std::optional<at::Tensor>& positives_indptr,
                                         const std::optional<at::Tensor>& positives_indices,
                                         const std::optional<at::Tensor>& neighbors,
                                         const std::optional<at::Tensor>& neighbor_sets_indptr,
                                         const std::optional<at::Tensor>& neighbor_sets_indices,
                                         bool return_indices) {
  TopKHitsArgs a;
  a.scores = checked_scores("topk_hits", scores);
  a.B = scores.size(0);
  a.I = scores.size(1);
  TORCH_CHECK_VALUE(!ks.empty(), "topk_hits: ks must hold at least one k");
  for (size_t j = 0; j < ks.size(); ++j) {
    TORCH_CHECK_VALUE(ks[j] >= 1 && ks[j] <= a.I,
                      "topk_hits: every k in ks must satisfy 1 <= k <= I = ", a.I, ", got ks = ",
                      ks);
    TORCH_CHECK_VALUE(j == 0 || ks[j] > ks[j - 1], "topk_hits: ks must be strictly ascending, got ",
                      ks);
  }
  a.ks.assign(ks.begin(), ks.end());
  a.kmax = ks.back();
  a.users = checked_users("topk_hits", users, a.B, scores);
  const int64_t per_batch = a.users.defined() ? -1 : a.B;
  a.exclude = checked_csr("topk_hits", "exclude", exclude_indptr, exclude_indices, scores, per_batch);
  a.positives = checked_csr("topk_hits", "positives", positives_indptr, positives_indices, scores, per_batch);
  a.neighbor_sets = checked_csr("topk_hits", "neighbor_sets", neighbor_sets_indptr, neighbor_sets_indices, scores);
  const bool has_nbr = neighbors.has_value() && neighbors->defined();
  TORCH_CHECK_VALUE(has_nbr == a.neighbor_sets.defined(),
                    "topk_hits: neighbors and neighbor_sets must be given together");
  if (has_nbr) {
    TORCH_CHECK_TYPE(neighbors->scalar_type() == at::kLong,
                     "topk_hits: neighbors must be int64, got ", neighbors->scalar_type());
    TORCH_CHECK_VALUE(neighbors->dim() == 2 && neighbors->size(0) == a.B,
                      "topk_hits: neighbors must have shape (B, M) with B = ", a.B, ", got ",
                      neighbors->sizes());
    TORCH_CHECK_VALUE(neighbors->device() == scores.device(), "topk_hits: neighbors is on ",
                      neighbors->device(), " but scores is on ", scores.device());
    a.neighbors = neighbors->contiguous();
  }
  a.return_indices = return_indices;
  return a;
}

// Raises the error of the first bad row of a topk_hits report (see raise_row_error).
inline void raise_topk_row_error(const int64_t* report, const TopKHitsArgs& a) {
  raise_row_error(report, {"topk_hits", a.B, a.I, a.exclude.rows(), a.positives.rows(), a.neighbor_sets.rows()});
}

}  // namespace refit
