// CUDA kernels of refit::gaussian_logprob and of the fused refit::policy_loss
// (which shares its rows). Plain CUDA: no torch headers, so
// `nvcc -c -arch=sm_90 -I csrc/include` compiles this file on any machine.
//
// One block per (step, user) row of I items: the forward block reduces the
// row's squared residuals to one term, the backward block writes the row's
// gradient. Rows are independent, so the grid is S * B blocks; a second small
// kernel sums the (S, B) terms over steps in a fixed order (deterministic).
// policy_loss's block does both for its row, since a row's loss weight
// depends on nothing but the row's own term.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "launchers.h"
#include "refit/gaussian_logprob.h"
#include "refit/policy_loss.h"

namespace refit {
namespace cuda {
namespace {

thread_local cudaError_t g_last_error = cudaSuccess;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(float v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <typename T> __device__ __forceinline__ T from_acc(double v);
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// Sum over the block; the result is valid in thread 0.
template <typename acc_t>
__device__ acc_t block_sum(acc_t v) {
  __shared__ acc_t warp_sums[32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  const int n_warps = (blockDim.x + 31) >> 5;
  v = (threadIdx.x < n_warps) ? warp_sums[lane] : acc_t(0);
  if (warp == 0) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

template <typename T, typename acc_t>
__global__ void gaussian_logprob_rows_kernel(const T* __restrict__ pred,
                                             const T* __restrict__ traj,
                                             const acc_t* __restrict__ coef_pred,
                                             const acc_t* __restrict__ coef_x,
                                             const acc_t* __restrict__ log_var,
                                             GaussianLogprobShape sh, bool mean,
                                             acc_t* __restrict__ terms) {
  const int64_t row = blockIdx.x;
  const int64_t s = row / sh.users, b = row % sh.users;
  const T* p = pred + s * sh.pred_step_stride + b * sh.pred_user_stride;
  const T* x = traj + s * sh.traj_step_stride + b * sh.traj_user_stride;
  const T* x_next = x + sh.traj_step_stride;
  const acc_t cp = coef_pred[s], cx = coef_x[s];
  acc_t acc = 0;
  for (int64_t i = threadIdx.x; i < sh.items; i += blockDim.x) {
    const acc_t r = glp::residual<acc_t>(to_acc(x_next[i]), to_acc(x[i]), to_acc(p[i]), cp, cx);
    acc = fma_(r, r, acc);
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) {
    const acc_t n = static_cast<acc_t>(sh.items);
    terms[row] = glp::step_term<acc_t>(acc, log_var[s], n, mean ? acc_t(1) / n : acc_t(1));
  }
}

// out[b] = sum_s terms[s, b], one thread per user, steps in order.
template <typename acc_t>
__global__ void sum_steps_kernel(const acc_t* __restrict__ terms, int64_t steps, int64_t users,
                                 acc_t* __restrict__ out) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= users) return;
  acc_t acc = 0;
  for (int64_t s = 0; s < steps; ++s) acc += terms[s * users + b];
  out[b] = acc;
}

template <typename T, typename acc_t>
__global__ void gaussian_logprob_grad_kernel(const acc_t* __restrict__ grad,
                                             const T* __restrict__ pred,
                                             const T* __restrict__ traj,
                                             const acc_t* __restrict__ coef_pred,
                                             const acc_t* __restrict__ coef_x,
                                             const acc_t* __restrict__ log_var,
                                             GaussianLogprobShape sh, bool mean, bool per_step,
                                             T* __restrict__ grad_pred) {
  const int64_t row = blockIdx.x;
  const int64_t s = row / sh.users, b = row % sh.users;
  const T* p = pred + s * sh.pred_step_stride + b * sh.pred_user_stride;
  const T* x = traj + s * sh.traj_step_stride + b * sh.traj_user_stride;
  const T* x_next = x + sh.traj_step_stride;
  T* out = grad_pred + row * sh.items;
  const acc_t cp = coef_pred[s], cx = coef_x[s];
  const acc_t scale = mean ? acc_t(1) / static_cast<acc_t>(sh.items) : acc_t(1);
  const acc_t factor = grad[per_step ? row : b] * glp::grad_factor<acc_t>(cp, log_var[s], scale);
  for (int64_t i = threadIdx.x; i < sh.items; i += blockDim.x) {
    const acc_t r = glp::residual<acc_t>(to_acc(x_next[i]), to_acc(x[i]), to_acc(p[i]), cp, cx);
    out[i] = from_acc<T>(factor * r);
  }
}

// One block per (step, user) row: the row's term, loss share and gradient.
// `old` is nullptr for REINFORCE, whose weight is known before the row is
// read: one pass writes the gradient while it reduces the squares. PPO's
// weight needs the term, so its block reduces first and writes the gradient
// in a second pass (the row was just read and is likely still in L2).
template <typename T, typename acc_t>
__global__ void policy_loss_rows_kernel(const T* __restrict__ pred, const T* __restrict__ traj,
                                        const acc_t* __restrict__ coef_pred,
                                        const acc_t* __restrict__ coef_x,
                                        const acc_t* __restrict__ log_var,
                                        const acc_t* __restrict__ advantages,
                                        const acc_t* __restrict__ old, GaussianLogprobShape sh,
                                        acc_t clip, acc_t inv_n, bool mean,
                                        acc_t* __restrict__ terms, acc_t* __restrict__ shares,
                                        T* __restrict__ grad_pred) {
  __shared__ acc_t row_weight;
  const int64_t row = blockIdx.x;
  const int64_t s = row / sh.users, b = row % sh.users;
  const T* p = pred + s * sh.pred_step_stride + b * sh.pred_user_stride;
  const T* x = traj + s * sh.traj_step_stride + b * sh.traj_user_stride;
  const T* x_next = x + sh.traj_step_stride;
  T* out = grad_pred + row * sh.items;
  const acc_t cp = coef_pred[s], cx = coef_x[s], lv = log_var[s], adv = advantages[b];
  const acc_t n = static_cast<acc_t>(sh.items);
  const acc_t scale = mean ? acc_t(1) / n : acc_t(1);
  const acc_t factor = glp::grad_factor<acc_t>(cp, lv, scale);
  const bool has_old = old != nullptr;
  acc_t acc = 0;
  if (!has_old) {
    const acc_t g = pl::row_loss<acc_t>(acc_t(0), adv, false, acc_t(0), clip, inv_n).weight * factor;
    for (int64_t i = threadIdx.x; i < sh.items; i += blockDim.x) {
      const acc_t r = glp::residual<acc_t>(to_acc(x_next[i]), to_acc(x[i]), to_acc(p[i]), cp, cx);
      acc = fma_(r, r, acc);
      out[i] = from_acc<T>(g * r);
    }
  } else {
    for (int64_t i = threadIdx.x; i < sh.items; i += blockDim.x) {
      const acc_t r = glp::residual<acc_t>(to_acc(x_next[i]), to_acc(x[i]), to_acc(p[i]), cp, cx);
      acc = fma_(r, r, acc);
    }
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) {
    const acc_t term = glp::step_term<acc_t>(acc, lv, n, scale);
    const pl::RowLoss<acc_t> share =
        pl::row_loss<acc_t>(term, adv, has_old, has_old ? old[row] : acc_t(0), clip, inv_n);
    terms[row] = term;
    shares[row] = share.loss;
    row_weight = share.weight;
  }
  // has_old is the same for the whole block, so either every thread reaches
  // the barrier or none does.
  if (!has_old) return;
  __syncthreads();
  const acc_t g = row_weight * factor;
  for (int64_t i = threadIdx.x; i < sh.items; i += blockDim.x) {
    const acc_t r = glp::residual<acc_t>(to_acc(x_next[i]), to_acc(x[i]), to_acc(p[i]), cp, cx);
    out[i] = from_acc<T>(g * r);
  }
}

// Threads per row block: a multiple of the warp size, no more than the row
// needs, at most 256 (enough loads in flight per SM with several blocks each).
unsigned row_threads(int64_t items) {
  int64_t t = ((items + 31) / 32) * 32;
  if (t < 32) t = 32;
  if (t > 256) t = 256;
  return static_cast<unsigned>(t);
}

LaunchStatus finish() {
  g_last_error = cudaGetLastError();
  return g_last_error == cudaSuccess ? LaunchStatus::kOk : LaunchStatus::kCudaError;
}

bool rows_fit(const GaussianLogprobShape& sh) {
  // One block per row: the grid's x dimension holds at most 2^31 - 1 blocks.
  return sh.steps >= 0 && sh.users >= 0 && sh.items >= 0 &&
         sh.steps * sh.users <= static_cast<int64_t>(0x7fffffff);
}

template <typename T>
LaunchStatus forward_typed(const void* pred, const void* traj, const void* coef_pred,
                           const void* coef_x, const void* log_var,
                           const GaussianLogprobShape& sh, bool mean, bool per_step, void* out,
                           void* workspace, cudaStream_t stream) {
  using acc_t = typename Acc<T>::type;
  const int64_t rows = sh.steps * sh.users;
  acc_t* terms = static_cast<acc_t*>(per_step ? out : workspace);
  if (rows > 0) {
    gaussian_logprob_rows_kernel<T, acc_t><<<static_cast<unsigned>(rows), row_threads(sh.items), 0, stream>>>(
        static_cast<const T*>(pred), static_cast<const T*>(traj),
        static_cast<const acc_t*>(coef_pred), static_cast<const acc_t*>(coef_x),
        static_cast<const acc_t*>(log_var), sh, mean, terms);
  }
  if (!per_step && sh.users > 0) {
    const unsigned threads = 256;
    const unsigned blocks = static_cast<unsigned>((sh.users + threads - 1) / threads);
    sum_steps_kernel<acc_t><<<blocks, threads, 0, stream>>>(terms, sh.steps, sh.users,
                                                             static_cast<acc_t*>(out));
  }
  return finish();
}

template <typename T>
LaunchStatus backward_typed(const void* grad, const void* pred, const void* traj,
                            const void* coef_pred, const void* coef_x, const void* log_var,
                            const GaussianLogprobShape& sh, bool mean, bool per_step,
                            void* grad_pred, cudaStream_t stream) {
  using acc_t = typename Acc<T>::type;
  const int64_t rows = sh.steps * sh.users;
  if (rows == 0 || sh.items == 0) return LaunchStatus::kOk;
  gaussian_logprob_grad_kernel<T, acc_t><<<static_cast<unsigned>(rows), row_threads(sh.items), 0, stream>>>(
      static_cast<const acc_t*>(grad), static_cast<const T*>(pred), static_cast<const T*>(traj),
      static_cast<const acc_t*>(coef_pred), static_cast<const acc_t*>(coef_x),
      static_cast<const acc_t*>(log_var), sh, mean, per_step, static_cast<T*>(grad_pred));
  return finish();
}

template <typename T>
LaunchStatus policy_loss_typed(const void* pred, const void* traj, const void* coef_pred,
                               const void* coef_x, const void* log_var, const void* advantages,
                               const void* old, const GaussianLogprobShape& sh, double clip,
                               double normalizer, bool mean, void* terms, void* shares,
                               void* grad_pred, cudaStream_t stream) {
  using acc_t = typename Acc<T>::type;
  const int64_t rows = sh.steps * sh.users;
  if (rows == 0) return LaunchStatus::kOk;
  // 1 / normalizer is rounded once from double, as close to a division as a
  // multiplication gets. clip is checked only when PPO uses it.
  policy_loss_rows_kernel<T, acc_t><<<static_cast<unsigned>(rows), row_threads(sh.items), 0, stream>>>(
      static_cast<const T*>(pred), static_cast<const T*>(traj), static_cast<const acc_t*>(coef_pred),
      static_cast<const acc_t*>(coef_x), static_cast<const acc_t*>(log_var),
      static_cast<const acc_t*>(advantages), static_cast<const acc_t*>(old), sh,
      static_cast<acc_t>(old != nullptr ? clip : 0.0), static_cast<acc_t>(1.0 / normalizer), mean,
      static_cast<acc_t*>(terms), static_cast<acc_t*>(shares), static_cast<T*>(grad_pred));
  return finish();
}

}  // namespace

LaunchStatus gaussian_logprob_forward(DType dtype, const void* pred, const void* traj,
                                      const void* coef_pred, const void* coef_x,
                                      const void* log_var, const GaussianLogprobShape& shape,
                                      bool mean, bool per_step, void* out, void* workspace,
                                      void* stream) {
  if (!rows_fit(shape)) return LaunchStatus::kBadShape;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32:
      return forward_typed<float>(pred, traj, coef_pred, coef_x, log_var, shape, mean, per_step, out, workspace, st);
    case DType::kFloat64:
      return forward_typed<double>(pred, traj, coef_pred, coef_x, log_var, shape, mean, per_step, out, workspace, st);
    case DType::kFloat16:
      return forward_typed<__half>(pred, traj, coef_pred, coef_x, log_var, shape, mean, per_step, out, workspace, st);
    case DType::kBFloat16:
      return forward_typed<__nv_bfloat16>(pred, traj, coef_pred, coef_x, log_var, shape, mean, per_step, out, workspace, st);
  }
  return LaunchStatus::kBadDType;
}

LaunchStatus gaussian_logprob_backward(DType dtype, const void* grad, const void* pred,
                                       const void* traj, const void* coef_pred,
                                       const void* coef_x, const void* log_var,
                                       const GaussianLogprobShape& shape, bool mean,
                                       bool per_step, void* grad_pred, void* stream) {
  if (!rows_fit(shape)) return LaunchStatus::kBadShape;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32:
      return backward_typed<float>(grad, pred, traj, coef_pred, coef_x, log_var, shape, mean, per_step, grad_pred, st);
    case DType::kFloat64:
      return backward_typed<double>(grad, pred, traj, coef_pred, coef_x, log_var, shape, mean, per_step, grad_pred, st);
    case DType::kFloat16:
      return backward_typed<__half>(grad, pred, traj, coef_pred, coef_x, log_var, shape, mean, per_step, grad_pred, st);
    case DType::kBFloat16:
      return backward_typed<__nv_bfloat16>(grad, pred, traj, coef_pred, coef_x, log_var, shape, mean, per_step, grad_pred, st);
  }
  return LaunchStatus::kBadDType;
}

LaunchStatus policy_loss_rows(DType dtype, const void* pred, const void* traj,
                              const void* coef_pred, const void* coef_x, const void* log_var,
                              const void* advantages, const void* old,
                              const GaussianLogprobShape& shape, double clip, double normalizer,
                              bool mean, void* terms, void* shares, void* grad_pred, void* stream) {
  if (!rows_fit(shape)) return LaunchStatus::kBadShape;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32:
      return policy_loss_typed<float>(pred, traj, coef_pred, coef_x, log_var, advantages, old, shape, clip, normalizer, mean, terms, shares, grad_pred, st);
    case DType::kFloat64:
      return policy_loss_typed<double>(pred, traj, coef_pred, coef_x, log_var, advantages, old, shape, clip, normalizer, mean, terms, shares, grad_pred, st);
    case DType::kFloat16:
      return policy_loss_typed<__half>(pred, traj, coef_pred, coef_x, log_var, advantages, old, shape, clip, normalizer, mean, terms, shares, grad_pred, st);
    case DType::kBFloat16:
      return policy_loss_typed<__nv_bfloat16>(pred, traj, coef_pred, coef_x, log_var, advantages, old, shape, clip, normalizer, mean, terms, shares, grad_pred, st);
  }
  return LaunchStatus::kBadDType;
}

const char* last_error_string() { return cudaGetErrorString(g_last_error); }

}  // namespace cuda
}  // namespace refit
