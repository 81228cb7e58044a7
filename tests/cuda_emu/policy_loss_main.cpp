// Runs the CUDA policy_loss kernel (in gaussian_logprob_cuda.cu) under the
// host emulation (cuda_runtime.h). Usage: policy_loss_main INPUT OUTPUT.
//   INPUT: 12 int64 (dtype, S, B, I, pred_step_stride, pred_user_stride,
//          traj_step_stride, traj_user_stride, pred_elems, traj_elems, mean,
//          has_old), 2 double (clip, normalizer), then pred (pred_elems
//          elements of the dtype's size), traj (traj_elems), coef_pred,
//          coef_x, log_var (S each), advantages (B) and, with has_old,
//          old_logprob ((S, B)), all in the accumulation type (double for
//          float64, else float).
//   OUTPUT: the launch status (int64), the terms and the loss shares ((S, B)
//          each, accumulation type), the gradient ((S, B, I) of dtype).
// Buffers are allocated at their exact sizes, so a kernel that reads or
// writes past them is caught when the driver is built with AddressSanitizer.
#include "emu_io.h"
#include "gaussian_logprob_emulated.cpp"  // csrc/cuda/gaussian_logprob_cuda.cu with its launches rewritten

namespace {

template <typename acc_t>
int run(std::FILE* in, std::FILE* out, refit::DType dtype, int64_t elem, const std::vector<int64_t>& h) {
  const int64_t S = h[1], B = h[2], I = h[3];
  const refit::cuda::GaussianLogprobShape sh{S, B, I, h[4], h[5], h[6], h[7]};
  const bool mean = h[10] != 0, has_old = h[11] != 0;
  const std::vector<double> scalars = emu_read<double>(in, 2);
  std::vector<unsigned char> pred = emu_read<unsigned char>(in, h[8] * elem);
  std::vector<unsigned char> traj = emu_read<unsigned char>(in, h[9] * elem);
  std::vector<acc_t> cp = emu_read<acc_t>(in, S), cx = emu_read<acc_t>(in, S), lv = emu_read<acc_t>(in, S);
  std::vector<acc_t> adv = emu_read<acc_t>(in, B);
  std::vector<acc_t> old = emu_read<acc_t>(in, has_old ? S * B : 0);
  // Filled with markers, so an element the kernel does not write shows.
  std::vector<acc_t> terms(static_cast<size_t>(S * B), acc_t(-7)), shares(static_cast<size_t>(S * B), acc_t(-7));
  std::vector<unsigned char> grad_pred(static_cast<size_t>(S * B * I * elem), 0xA5);
  const int64_t status = static_cast<int64_t>(refit::cuda::policy_loss_rows(
      dtype, pred.data(), traj.data(), cp.data(), cx.data(), lv.data(), adv.data(),
      has_old ? static_cast<const void*>(old.data()) : nullptr, sh, scalars[0], scalars[1], mean, terms.data(),
      shares.data(), grad_pred.data(), nullptr));
  emu_write_one(out, status);
  emu_write(out, terms);
  emu_write(out, shares);
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
