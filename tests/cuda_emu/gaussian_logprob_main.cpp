// Runs the CUDA gaussian_logprob kernels (forward, then backward) under the
// host emulation (cuda_runtime.h). Usage: gaussian_logprob_main INPUT OUTPUT.
//   INPUT: 12 int64 (dtype, S, B, I, pred_step_stride, pred_user_stride,
//          traj_step_stride, traj_user_stride, pred_elems, traj_elems, mean,
//          per_step), then pred (pred_elems elements of the dtype's size),
//          traj (traj_elems), coef_pred, coef_x, log_var (S each) and the
//          incoming gradient ((S, B) when per_step, else (B,)), all four in
//          the accumulation type (double for float64, else float).
//   OUTPUT: forward status (int64), the result ((S, B) or (B,), accumulation
//          type), backward status (int64), the gradient ((S, B, I) of dtype).
// Buffers are allocated at their exact sizes, so a kernel that reads or
// writes past them is caught when the driver is built with AddressSanitizer.
#include "emu_io.h"
#include "gaussian_logprob_emulated.cpp"  // csrc/cuda/gaussian_logprob_cuda.cu with its launches rewritten

namespace {

template <typename acc_t>
int run(std::FILE* in, std::FILE* out, refit::DType dtype, int64_t elem, const std::vector<int64_t>& h) {
  const int64_t S = h[1], B = h[2], I = h[3];
  const refit::cuda::GaussianLogprobShape sh{S, B, I, h[4], h[5], h[6], h[7]};
  const bool mean = h[10] != 0, per_step = h[11] != 0;
  std::vector<unsigned char> pred = emu_read<unsigned char>(in, h[8] * elem);
  std::vector<unsigned char> traj = emu_read<unsigned char>(in, h[9] * elem);
  std::vector<acc_t> cp = emu_read<acc_t>(in, S), cx = emu_read<acc_t>(in, S), lv = emu_read<acc_t>(in, S);
  const int64_t n_out = per_step ? S * B : B;
  std::vector<acc_t> grad = emu_read<acc_t>(in, n_out);
  std::vector<acc_t> result(static_cast<size_t>(n_out), acc_t(-7));
  std::vector<acc_t> workspace(per_step ? 0 : static_cast<size_t>(S * B), acc_t(-7));
  void* ws = per_step ? static_cast<void*>(result.data()) : static_cast<void*>(workspace.data());
  const int64_t fwd = static_cast<int64_t>(refit::cuda::gaussian_logprob_forward(
      dtype, pred.data(), traj.data(), cp.data(), cx.data(), lv.data(), sh, mean, per_step, result.data(), ws,
      nullptr));
  // Filled with a marker, so an element the backward does not write shows.
  std::vector<unsigned char> grad_pred(static_cast<size_t>(S * B * I * elem), 0xA5);
  const int64_t bwd = static_cast<int64_t>(refit::cuda::gaussian_logprob_backward(
      dtype, grad.data(), pred.data(), traj.data(), cp.data(), cx.data(), lv.data(), sh, mean, per_step,
      grad_pred.data(), nullptr));
  emu_write_one(out, fwd);
  emu_write(out, result);
  emu_write_one(out, bwd);
  emu_write(out, grad_pred);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) return 2;
  std::FILE* in = std::fopen(argv[1], "rb");
  std::FILE* out = std::fopen(argv[2], "wb");
  if (!in || !out) return 2;
  const std::vector<int64_t> h = emu_read<int64_t>(in, 12);
  const auto dtype = static_cast<refit::DType>(h[0]);
  int rc;
  switch (dtype) {
    case refit::DType::kFloat64: rc = run<double>(in, out, dtype, 8, h); break;
    case refit::DType::kFloat32: rc = run<float>(in, out, dtype, 4, h); break;
    default: rc = run<float>(in, out, dtype, 2, h); break;
  }
  std::fclose(in);
  std::fclose(out);
  return rc;
}
