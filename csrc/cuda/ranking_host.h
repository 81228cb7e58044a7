// Host-side helpers shared by the CUDA glue of the ranking ops (topk_hits,
// target_rank): the kernels' code for a scores dtype, and a CSR argument as
// the launchers take it.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "../topk_hits.h"
#include "launchers.h"

namespace refit {

// The launchers' code for a scores dtype; nullopt for a type no kernel takes.
inline std::optional<DType> score_dtype_code(c10::ScalarType t) {
  switch (t) {
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    default: return std::nullopt;
  }
}

inline cuda::TopKCsrView csr_view(const TopKCsr& m) {
  if (!m.defined()) return {nullptr, nullptr, 0, 0};
  return {m.indptr.const_data_ptr<int64_t>(), m.indices.const_data_ptr<int64_t>(), m.rows(), m.nnz()};
}

}  // namespace refit
