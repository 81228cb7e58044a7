// Definitions of refit::target_rank shared by the CPU and CUDA kernels (see
// DESIGN.md, "Op 4").
//
// The rank of a positive p of a row is the number of the row's other
// rankable items that topk_hits ranks before it: items with a higher score,
// and items with an equal score and a lower id (refit/topk_hits.h: -0.0 and
// +0.0 are equal, -inf is a score like any other, NaN is an error).
// Excluded items never count; an excluded positive is never ranked, and its
// rank is kExcludedRank. Hence rank < k exactly when topk_hits counts p as a
// hit at k.
//
// Errors are reported per row as topk_hits reports them (refit/topk_hits.h),
// with the checks in the same order: exclude, the scores (NaN), positives.
#pragma once

#include "refit/common.h"

namespace refit {
namespace target_rank {

// The rank of a positive that is itself excluded.
constexpr int64_t kExcludedRank = -1;

// Whether item i (score s) is ranked before item p (score sp). Branch-free
// (the comparisons are combined bitwise), so loops over items vectorise.
template <typename acc_t>
REFIT_HOST_DEVICE REFIT_INLINE bool beats(acc_t s, int64_t i, acc_t sp, int64_t p) {
  return static_cast<bool>(static_cast<int>(s > sp) | (static_cast<int>(s == sp) & static_cast<int>(i < p)));
}

}  // namespace target_rank
}  // namespace refit
