// CPU kernels of refit::gaussian_logprob and of the fused refit::policy_loss
// (which shares its rows): one pass over pred and traj, accumulation in
// float64, threads over (step, user) rows.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <vector>

#include "../gaussian_logprob.h"
#include "../policy_loss.h"
#include "common.h"
#include "refit/gaussian_logprob.h"
#include "refit/policy_loss.h"

namespace refit {
namespace {

// Widening loads: the 16-bit types convert through float (exactly), so the
// arithmetic below always runs in float64.
REFIT_INLINE double as_double(double v) { return v; }
REFIT_INLINE double as_double(float v) { return v; }
REFIT_INLINE double as_double(c10::Half v) { return static_cast<float>(v); }
REFIT_INLINE double as_double(c10::BFloat16 v) { return static_cast<float>(v); }

template <typename T>
REFIT_INLINE double row_sum_sq(const T* __restrict__ x_next, const T* __restrict__ x,
                               const T* __restrict__ pred, int64_t n, double coef_pred,
                               double coef_x) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) {
    const double r = glp::residual<double>(as_double(x_next[i]), as_double(x[i]),
                                           as_double(pred[i]), coef_pred, coef_x);
    acc += r * r;
  }
  return acc;
}

template <typename T>
REFIT_INLINE void row_grad(T* __restrict__ out, const T* __restrict__ x_next,
                           const T* __restrict__ x, const T* __restrict__ pred, int64_t n,
                           double coef_pred, double coef_x, double factor) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const double r = glp::residual<double>(as_double(x_next[i]), as_double(x[i]),
                                           as_double(pred[i]), coef_pred, coef_x);
    out[i] = static_cast<T>(factor * r);
  }
}

// The gradient row and the row's sum of squared residuals in one pass (the
// fused loss knows each row's weight before reading it).
template <typename T>
REFIT_INLINE double row_grad_sum_sq(T* __restrict__ out, const T* __restrict__ x_next,
                                    const T* __restrict__ x, const T* __restrict__ pred, int64_t n,
                                    double coef_pred, double coef_x, double factor) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) {
    const double r = glp::residual<double>(as_double(x_next[i]), as_double(x[i]),
                                           as_double(pred[i]), coef_pred, coef_x);
    acc += r * r;
    out[i] = static_cast<T>(factor * r);
  }
  return acc;
}

// Non-template entry points, one per element type, multiversioned.
#define REFIT_DEFINE_ROWS(T, SUFFIX)                                                         \
  REFIT_CPU_CLONES double row_sum_sq_##SUFFIX(const T* x_next, const T* x, const T* pred,  \
                                              int64_t n, double cp, double cx) {           \
    return row_sum_sq<T>(x_next, x, pred, n, cp, cx);                                      \
  }                                                                                        \
  REFIT_CPU_CLONES void row_grad_##SUFFIX(T* out, const T* x_next, const T* x,             \
                                          const T* pred, int64_t n, double cp, double cx,  \
                                          double factor) {                                 \
    row_grad<T>(out, x_next, x, pred, n, cp, cx, factor);                                  \
  }                                                                                        \
  REFIT_CPU_CLONES double row_grad_sum_sq_##SUFFIX(T* out, const T* x_next, const T* x,    \
                                                   const T* pred, int64_t n, double cp,    \
                                                   double cx, double factor) {             \
    return row_grad_sum_sq<T>(out, x_next, x, pred, n, cp, cx, factor);                    \
  }

REFIT_DEFINE_ROWS(float, f32)
REFIT_DEFINE_ROWS(double, f64)
REFIT_DEFINE_ROWS(c10::Half, f16)
REFIT_DEFINE_ROWS(c10::BFloat16, bf16)
#undef REFIT_DEFINE_ROWS

template <typename T> struct Rows;
template <> struct Rows<float> {
  static constexpr auto sum_sq = row_sum_sq_f32;
  static constexpr auto grad = row_grad_f32;
  static constexpr auto grad_sum_sq = row_grad_sum_sq_f32;
};
template <> struct Rows<double> {
  static constexpr auto sum_sq = row_sum_sq_f64;
  static constexpr auto grad = row_grad_f64;
  static constexpr auto grad_sum_sq = row_grad_sum_sq_f64;
};
template <> struct Rows<c10::Half> {
  static constexpr auto sum_sq = row_sum_sq_f16;
  static constexpr auto grad = row_grad_f16;
  static constexpr auto grad_sum_sq = row_grad_sum_sq_f16;
};
template <> struct Rows<c10::BFloat16> {
  static constexpr auto sum_sq = row_sum_sq_bf16;
  static constexpr auto grad = row_grad_bf16;
  static constexpr auto grad_sum_sq = row_grad_sum_sq_bf16;
};

std::vector<double> to_doubles(const at::Tensor& c) {
  const at::Tensor d = c.to(at::kDouble).contiguous();
  return std::vector<double>(d.data_ptr<double>(), d.data_ptr<double>() + d.numel());
}

// exp(-log_var[s]) once per step instead of once or twice per row.
std::vector<double> inverse_variances(const std::vector<double>& log_var) {
  std::vector<double> out(log_var.size());
  for (size_t s = 0; s < log_var.size(); ++s) out[s] = exp_(-log_var[s]);
  return out;
}

}  // namespace

at::Tensor gaussian_logprob_cpu(const at::Tensor& pred_in, const at::Tensor& traj_in,
                                const at::Tensor& coef_pred, const at::Tensor& coef_x,
                                const at::Tensor& log_var, bool mean, bool per_step) {
  check_gaussian_logprob_args(pred_in, traj_in, coef_pred, coef_x, log_var, mean);
  TORCH_CHECK_VALUE(pred_in.device().is_cpu(), "gaussian_logprob (cpu): pred must be a CPU tensor, got ",
                    pred_in.device());
  const at::Tensor pred = items_contiguous(pred_in);
  const at::Tensor traj = items_contiguous(traj_in);
  const int64_t S = pred.size(0), B = pred.size(1), I = pred.size(2);
  const std::vector<double> cp = to_doubles(coef_pred), cx = to_doubles(coef_x),
                            lv = to_doubles(log_var);
  const std::vector<double> inv_v = inverse_variances(lv);
  const double scale = mean ? 1.0 / static_cast<double>(I) : 1.0;

  // Per-row terms in float64; summing them over steps in a fixed order below
  // keeps the result independent of the thread count.
  std::vector<double> terms(static_cast<size_t>(S * B));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(),
                                  "gaussian_logprob_cpu", [&] {
    const scalar_t* p = pred.const_data_ptr<scalar_t>();
    const scalar_t* t = traj.const_data_ptr<scalar_t>();
    const int64_t ps0 = pred.stride(0), ps1 = pred.stride(1);
    const int64_t ts0 = traj.stride(0), ts1 = traj.stride(1);
    cpu::for_each_step_row(S, B, I * static_cast<int64_t>(sizeof(scalar_t)), [&](int64_t s, int64_t b) {
      const double sum_sq = Rows<scalar_t>::sum_sq(t + (s + 1) * ts0 + b * ts1, t + s * ts0 + b * ts1,
                                                   p + s * ps0 + b * ps1, I, cp[s], cx[s]);
      terms[s * B + b] = glp::step_term_inv<double>(sum_sq, inv_v[s], lv[s], static_cast<double>(I), scale);
    });
  });

  const auto out_type = gaussian_logprob_result_type(pred.scalar_type());
  if (per_step) {
    at::Tensor out = at::empty({S, B}, pred.options().dtype(at::kDouble));
    std::copy(terms.begin(), terms.end(), out.data_ptr<double>());
    return out.to(out_type);
  }
  at::Tensor out = at::empty({B}, pred.options().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  for (int64_t b = 0; b < B; ++b) o[b] = 0.0;
  for (int64_t s = 0; s < S; ++s)
    for (int64_t b = 0; b < B; ++b) o[b] += terms[s * B + b];
  return out.to(out_type);
}

at::Tensor gaussian_logprob_backward_cpu(const at::Tensor& grad_in, const at::Tensor& pred_in,
                                         const at::Tensor& traj_in, const at::Tensor& coef_pred,
                                         const at::Tensor& coef_x, const at::Tensor& log_var,
                                         bool mean, bool per_step) {
  check_gaussian_logprob_args(pred_in, traj_in, coef_pred, coef_x, log_var, mean);
  check_gaussian_logprob_grad(grad_in, pred_in, per_step);
  TORCH_CHECK_VALUE(pred_in.device().is_cpu(), "gaussian_logprob_backward (cpu): pred must be a CPU tensor, got ",
                    pred_in.device());
  const at::Tensor pred = items_contiguous(pred_in);
  const at::Tensor traj = items_contiguous(traj_in);
  const int64_t S = pred.size(0), B = pred.size(1), I = pred.size(2);
  const std::vector<double> cp = to_doubles(coef_pred), cx = to_doubles(coef_x),
                            lv = to_doubles(log_var);
  const std::vector<double> inv_v = inverse_variances(lv);
  const double scale = mean ? 1.0 / static_cast<double>(I) : 1.0;
  // grad is (B,) or (S, B) and often an expanded view of a scalar's gradient.
  const at::Tensor g = grad_in.to(at::kDouble).contiguous();
  const double* gp = g.const_data_ptr<double>();

  at::Tensor out = cpu::empty_for_overwrite({S, B, I}, pred.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(),
                                  "gaussian_logprob_backward_cpu", [&] {
    const scalar_t* p = pred.const_data_ptr<scalar_t>();
    const scalar_t* t = traj.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t ps0 = pred.stride(0), ps1 = pred.stride(1);
    const int64_t ts0 = traj.stride(0), ts1 = traj.stride(1);
    cpu::for_each_step_row(S, B, I * static_cast<int64_t>(sizeof(scalar_t)), [&](int64_t s, int64_t b) {
      const double factor =
          (per_step ? gp[s * B + b] : gp[b]) * glp::grad_factor_inv<double>(cp[s], inv_v[s], scale);
      Rows<scalar_t>::grad(o + (s * B + b) * I, t + (s + 1) * ts0 + b * ts1, t + s * ts0 + b * ts1,
                           p + s * ps0 + b * ps1, I, cp[s], cx[s], factor);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> policy_loss_cpu(
    const at::Tensor& pred_in, const at::Tensor& traj_in, const at::Tensor& coef_pred,
    const at::Tensor& coef_x, const at::Tensor& log_var, const at::Tensor& advantages,
    const c10::optional<at::Tensor>& old_logprob, double clip, bool mean, double normalizer) {
  check_policy_loss_args(pred_in, traj_in, coef_pred, coef_x, log_var, advantages, old_logprob, clip,
                         mean, normalizer);
  TORCH_CHECK_VALUE(pred_in.device().is_cpu(), "policy_loss (cpu): pred must be a CPU tensor, got ",
                    pred_in.device());
  const at::Tensor pred = items_contiguous(pred_in);
  const at::Tensor traj = items_contiguous(traj_in);
  const int64_t S = pred.size(0), B = pred.size(1), I = pred.size(2);
  const std::vector<double> cp = to_doubles(coef_pred), cx = to_doubles(coef_x),
                            lv = to_doubles(log_var), adv = to_doubles(advantages);
  const std::vector<double> inv_v = inverse_variances(lv);
  const bool has_old = old_logprob.has_value();
  const std::vector<double> old = has_old ? to_doubles(*old_logprob) : std::vector<double>();
  const double scale = mean ? 1.0 / static_cast<double>(I) : 1.0;
  const double inv_n = 1.0 / normalizer;

  // Per-row terms and loss shares in float64, summed in a fixed order below
  // (the result does not depend on the thread count).
  std::vector<double> terms(static_cast<size_t>(S * B)), shares(static_cast<size_t>(S * B));
  at::Tensor grad = cpu::empty_for_overwrite({S, B, I}, pred.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "policy_loss_cpu", [&] {
    const scalar_t* p = pred.const_data_ptr<scalar_t>();
    const scalar_t* t = traj.const_data_ptr<scalar_t>();
    scalar_t* o = grad.data_ptr<scalar_t>();
    const int64_t ps0 = pred.stride(0), ps1 = pred.stride(1);
    const int64_t ts0 = traj.stride(0), ts1 = traj.stride(1);
    cpu::for_each_step_row(S, B, I * static_cast<int64_t>(sizeof(scalar_t)), [&](int64_t s, int64_t b) {
      const int64_t r = s * B + b;
      const scalar_t* xn = t + (s + 1) * ts0 + b * ts1;
      const scalar_t* x = t + s * ts0 + b * ts1;
      const scalar_t* pr = p + s * ps0 + b * ps1;
      scalar_t* out = o + r * I;
      const double factor = glp::grad_factor_inv<double>(cp[s], inv_v[s], scale);
      const double n_items = static_cast<double>(I);
      if (!has_old) {  // REINFORCE: the weight does not depend on the term, so one pass
        const double weight = pl::row_loss<double>(0.0, adv[b], false, 0.0, clip, inv_n).weight;
        const double sum_sq = Rows<scalar_t>::grad_sum_sq(out, xn, x, pr, I, cp[s], cx[s], weight * factor);
        terms[r] = glp::step_term_inv<double>(sum_sq, inv_v[s], lv[s], n_items, scale);
        shares[r] = pl::row_loss<double>(terms[r], adv[b], false, 0.0, clip, inv_n).loss;
      } else {  // PPO: the weight needs the row's term; the second read finds the row in cache
        const double sum_sq = Rows<scalar_t>::sum_sq(xn, x, pr, I, cp[s], cx[s]);
        terms[r] = glp::step_term_inv<double>(sum_sq, inv_v[s], lv[s], n_items, scale);
        const pl::RowLoss<double> share = pl::row_loss<double>(terms[r], adv[b], true, old[r], clip, inv_n);
        Rows<scalar_t>::grad(out, xn, x, pr, I, cp[s], cx[s], share.weight * factor);
        shares[r] = share.loss;
      }
    });
  });

  const auto out_type = gaussian_logprob_result_type(pred.scalar_type());
  double total = 0.0;
  for (const double v : shares) total += v;
  at::Tensor loss = at::empty({}, pred.options().dtype(at::kDouble));
  *loss.data_ptr<double>() = total;
  at::Tensor logprob = at::empty({S, B}, pred.options().dtype(at::kDouble));
  std::copy(terms.begin(), terms.end(), logprob.data_ptr<double>());
  return {loss.to(out_type), logprob.to(out_type), grad};
}

TORCH_LIBRARY_IMPL(refit, CPU, m) {
  m.impl("gaussian_logprob", &gaussian_logprob_cpu);
  m.impl("gaussian_logprob_backward", &gaussian_logprob_backward_cpu);
  m.impl("policy_loss", &policy_loss_cpu);
}

}  // namespace refit
