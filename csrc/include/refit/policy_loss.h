// The arithmetic of the fused policy-gradient loss, shared by the CPU and
// CUDA kernels (the log-likelihood itself is gaussian_logprob's, see
// refit/gaussian_logprob.h).
//
// Per (step s, user b) row, with L[s,b] the step's log-likelihood term and
// n the normalizer:
//   REINFORCE:  loss_row = -adv[b] * L[s,b] / n
//   PPO (old):  rho = exp(L[s,b] - old[s,b]),
//               loss_row = -min(rho * adv[b], clamp(rho, 1 - clip, 1 + clip) * adv[b]) / n
// and d loss / d pred[s,b,i] = weight(s,b) * (d L[s,b] / d pred[s,b,i]), with
// weight = d loss_row / d L[s,b]. The weight of a row depends on nothing but
// that row's own term, so each row is one independent unit of work.
#pragma once

#include "refit/common.h"

namespace refit {
namespace pl {

// A row's share of the loss and d(share)/d(term), for REINFORCE (has_old
// false) or PPO's clipped surrogate (has_old true).
template <typename acc_t>
struct RowLoss {
  acc_t loss;
  acc_t weight;
};

template <typename acc_t>
REFIT_HOST_DEVICE REFIT_INLINE RowLoss<acc_t> row_loss(acc_t term, acc_t adv, bool has_old, acc_t old,
                                                       acc_t clip, acc_t inv_n) {
  if (!has_old) return {-adv * term * inv_n, -adv * inv_n};
  const acc_t rho = exp_(term - old);
  const acc_t lo = acc_t(1) - clip, hi = acc_t(1) + clip;
  const acc_t clamped = rho < lo ? lo : (rho > hi ? hi : rho);
  const acc_t plain = rho * adv, cut = clamped * adv;
  // The gradient autograd gives min(plain, cut): where rho lies inside the
  // clip range both branches carry it (clamp passes its gradient on the
  // closed range), outside it only the plain branch when that is the smaller.
  const bool live = (rho >= lo && rho <= hi) || plain < cut;
  return {-(plain < cut ? plain : cut) * inv_n, live ? -adv * rho * inv_n : acc_t(0)};
}

}  // namespace pl
}  // namespace refit
