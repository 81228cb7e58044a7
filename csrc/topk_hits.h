// Torch-side declarations and argument checks of refit::topk_hits, shared by
// the CPU kernel and the CUDA host code.
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

inline TopKCsr csr_arg(const char* name, const std::optional<at::Tensor>& indptr,
                       const std::optional<at::Tensor>& indices, const at::Tensor& scores) {
  const bool has_p = indptr.has_value() && indptr->defined();
  const bool has_i = indices.has_value() && indices->defined();
  TORCH_CHECK_VALUE(has_p == has_i, "topk_hits: ", name, "_indptr and ", name,
                    "_indices must be given together");
  if (!has_p) return {};
  for (const at::Tensor* t : {&*indptr, &*indices}) {
    const char* part = t == &*indptr ? "indptr" : "indices";
    TORCH_CHECK_TYPE(t->scalar_type() == at::kLong, "topk_hits: ", name, " ", part,
                     " must be int64, got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->dim() == 1, "topk_hits: ", name, " ", part, " must be 1-D, got shape ",
                      t->sizes());
    TORCH_CHECK_VALUE(t->device() == scores.device(), "topk_hits: ", name, " is on ", t->device(),
                      " but scores is on ", scores.device());
  }
  TORCH_CHECK_VALUE(indptr->size(0) >= 1, "topk_hits: ", name,
                    " indptr must have n_rows + 1 >= 1 entries, got none");
  return {indptr->contiguous(), indices->contiguous()};
}

}  // namespace topk_detail

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
  using topk_detail::csr_arg;
  const auto st = scores.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble,
                   "topk_hits: scores must be float16, bfloat16, float32 or float64, got ", st);
  TORCH_CHECK_VALUE(scores.dim() == 2, "topk_hits: scores must be 2-D (B, I), got shape ",
                    scores.sizes());
  TopKHitsArgs a;
  a.B = scores.size(0);
  a.I = scores.size(1);
  TORCH_CHECK_VALUE(a.I < (int64_t(1) << 31), "topk_hits: at most 2^31 - 1 items, got I = ", a.I);
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
  a.scores = (a.I <= 1 || scores.stride(1) == 1) ? scores : scores.contiguous();

  if (users.has_value() && users->defined()) {
    TORCH_CHECK_TYPE(users->scalar_type() == at::kLong, "topk_hits: users must be int64, got ",
                     users->scalar_type());
    TORCH_CHECK_VALUE(users->dim() == 1 && users->size(0) == a.B,
                      "topk_hits: users must have shape (B,) = (", a.B, ",), got ", users->sizes());
    TORCH_CHECK_VALUE(users->device() == scores.device(), "topk_hits: users is on ",
                      users->device(), " but scores is on ", scores.device());
    a.users = users->contiguous();
  }
  a.exclude = csr_arg("exclude", exclude_indptr, exclude_indices, scores);
  a.positives = csr_arg("positives", positives_indptr, positives_indices, scores);
  a.neighbor_sets = csr_arg("neighbor_sets", neighbor_sets_indptr, neighbor_sets_indices, scores);
  if (!a.users.defined()) {
    for (const auto& [name, csr] : {std::pair<const char*, const TopKCsr*>{"exclude", &a.exclude},
                                    {"positives", &a.positives}}) {
      TORCH_CHECK_VALUE(!csr->defined() || csr->rows() == a.B, "topk_hits: ", name, " has ",
                        csr->rows(), " rows but scores has B = ", a.B,
                        " (pass users= to pick rows of a larger matrix)");
    }
  }
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

// Raises the error of the first bad row of a (B, 4) int64 report written by a
// kernel (see refit/topk_hits.h); does nothing when every row is fine.
// IndexError for ids out of range, ValueError for the rest.
inline void raise_topk_row_error(const int64_t* report, const TopKHitsArgs& a) {
  using topk::Arg;
  using topk::RowError;
  for (int64_t b = 0; b < a.B; ++b) {
    const int64_t* e = report + b * topk::kErrorFields;
    const auto code = static_cast<RowError>(e[0]);
    if (code == RowError::kNone) continue;
    const auto arg = static_cast<Arg>(e[1]);
    const int64_t row = e[2], detail = e[3];
    const char* name = topk_detail::arg_name(arg);
    const int64_t n_rows = arg == Arg::kExclude     ? a.exclude.rows()
                           : arg == Arg::kPositives ? a.positives.rows()
                                                    : a.neighbor_sets.rows();
    switch (code) {
      case RowError::kNaN:
        TORCH_CHECK_VALUE(false, "topk_hits: scores row ", b, " contains NaN (first at column ",
                          detail, "); NaN scores cannot be ranked");
      case RowError::kUserOutOfRange:
        TORCH_CHECK_INDEX(false, "topk_hits: users[", b, "] = ", detail, " is out of range for ",
                          name, " with ", n_rows, " rows");
      case RowError::kBadIndptr:
        TORCH_CHECK_VALUE(false, "topk_hits: ", name, " row ", row, " (scores row ", b,
                          ") has an invalid indptr range: need 0 <= indptr[", row,
                          "] <= indptr[", row + 1, "] <= nnz");
      case RowError::kColumnOutOfRange:
        TORCH_CHECK_INDEX(false, "topk_hits: ", name, " row ", row, " (scores row ", b,
                          ") has column index ", detail, ", out of range for I = ", a.I,
                          " items");
      case RowError::kUnsorted:
        TORCH_CHECK_VALUE(false, "topk_hits: ", name, " row ", row, " (scores row ", b,
                          ") has column index ", detail,
                          " after a larger or equal one: the column indices of a row must be "
                          "sorted and unique (e.g. scipy's sum_duplicates())");
      case RowError::kNeighborOutOfRange:
        TORCH_CHECK_INDEX(false, "topk_hits: neighbors[", b, ", ", row, "] = ", detail,
                          " is out of range for neighbor_sets with ", a.neighbor_sets.rows(),
                          " rows (-1 marks padding)");
      default:
        TORCH_CHECK(false, "topk_hits: internal error in row ", b, " (code ", e[0],
                    "): please report it");
    }
  }
}

}  // namespace refit
