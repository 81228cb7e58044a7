// Definitions of refit::topk_hits shared by the CPU and CUDA kernels (see
// DESIGN.md, "Op 2"): the ranking order, the DCG discount and the per-row
// error report.
//
// Ranking rule: higher score first; equal scores, lower item id first;
// excluded items never ranked; -inf is a score like any other; NaN is an
// error. +0.0 and -0.0 are equal scores.
#pragma once

#include "refit/common.h"

namespace refit {
namespace topk {

// What went wrong in a row. Every backend reports the first problem of the
// first bad row, with the checks of a row made in this order: exclude
// (users[b] in range, the row's indptr, its column indices), the scores
// (NaN), positives (same three checks), then each neighbor m in turn (its id,
// the indptr and the column indices of its neighbor_sets row).
enum class RowError : int64_t {
  kNone = 0,
  kNaN = 1,                // detail: the first column holding NaN
  kUserOutOfRange = 2,     // detail: users[b]
  kBadIndptr = 3,          // csr_row: the CSR row whose indptr range is invalid
  kColumnOutOfRange = 4,   // csr_row, detail: the column index
  kUnsorted = 5,           // csr_row, detail: the column index that is not above its predecessor
  kNeighborOutOfRange = 6, // csr_row: m, detail: neighbors[b, m]
  kInternal = 7,           // a selection that did not add up (a bug, never bad input)
};

// The argument a RowError is about.
enum class Arg : int64_t {
  kScores = 0,
  kExclude = 1,
  kPositives = 2,
  kNeighbors = 3,
  kNeighborSets = 4,
};

// A row's report is four int64: {RowError, Arg, csr_row, detail}.
constexpr int kErrorFields = 4;

// Rank r (0-based) contributes 1 / log2(r + 2) to the DCG.
REFIT_HOST_DEVICE REFIT_INLINE double discount(int64_t rank) {
  return 1.0 / log2(static_cast<double>(rank) + 2.0);
}

// The order-preserving 32-bit code of a score: a > b as floats exactly when
// code(a) > code(b) as unsigned integers (for non-NaN scores). -0.0 is mapped
// to +0.0 first, so equal scores get equal codes and ties fall to the item id.
// No score maps to 0 (-inf maps to 0x007FFFFF), which kernels may use as
// "not rankable".
REFIT_HOST_DEVICE REFIT_INLINE uint32_t score_code(float x) {
  union {
    float f;
    uint32_t u;
  } v;
  v.f = (x == 0.0f) ? 0.0f : x;
  return (v.u & 0x80000000u) ? ~v.u : (v.u | 0x80000000u);
}

// A 64-bit key that orders (score, item) pairs exactly as the ranking rule
// does: larger key = ranked earlier. The low word holds ~item, so among equal
// scores the lower id has the larger key. Keys of distinct items differ.
REFIT_HOST_DEVICE REFIT_INLINE uint64_t rank_key(float x, uint32_t item) {
  return (static_cast<uint64_t>(score_code(x)) << 32) | static_cast<uint64_t>(~item);
}

REFIT_HOST_DEVICE REFIT_INLINE uint32_t item_of_key(uint64_t key) {
  return ~static_cast<uint32_t>(key & 0xFFFFFFFFull);
}

}  // namespace topk
}  // namespace refit
