// Runs the CUDA target_rank kernel under the host emulation (cuda_runtime.h).
// Usage: target_rank_main INPUT OUTPUT.
//   INPUT: 12 int64 (dtype, B, I, row_stride, score_elems, has_users,
//          ex_rows, ex_nnz, po_rows, po_nnz, has_starts, n_ranks; ex_rows =
//          -1 without exclude), then the scores (score_elems elements of
//          dtype's size: the stretch of storage the rows span), users (B),
//          exclude indptr and indices, positives indptr and indices, starts
//          (B) (all int64).
//   OUTPUT: status, ranks (n_ranks), report (B * 4), all int64.
#include <vector>

#include "emu_io.h"
#include "target_rank_emulated.cpp"  // csrc/cuda/target_rank_cuda.cu with its launch rewritten

int main(int argc, char** argv) {
  if (argc != 3) return 2;
  std::FILE* in = std::fopen(argv[1], "rb");
  std::FILE* out = std::fopen(argv[2], "wb");
  if (!in || !out) return 2;
  const std::vector<int64_t> h = emu_read<int64_t>(in, 12);
  const auto dtype = static_cast<refit::DType>(h[0]);
  const int64_t B = h[1], I = h[2], stride = h[3], score_elems = h[4];
  const bool has_users = h[5] != 0, has_starts = h[10] != 0;
  const int64_t ex_rows = h[6], ex_nnz = h[7], po_rows = h[8], po_nnz = h[9], n_ranks = h[11];
  const int64_t elem = dtype == refit::DType::kFloat64 ? 8 : dtype == refit::DType::kFloat32 ? 4 : 2;
  // Exact sizes, so that AddressSanitizer sees any read past what the kernel may touch.
  std::vector<unsigned char> scores = emu_read<unsigned char>(in, score_elems * elem);
  std::vector<int64_t> users = emu_read<int64_t>(in, has_users ? B : 0);
  std::vector<int64_t> ex_ptr = emu_read<int64_t>(in, ex_rows + 1);
  std::vector<int64_t> ex_idx = emu_read<int64_t>(in, ex_rows >= 0 ? ex_nnz : 0);
  std::vector<int64_t> po_ptr = emu_read<int64_t>(in, po_rows + 1), po_idx = emu_read<int64_t>(in, po_nnz);
  std::vector<int64_t> starts = emu_read<int64_t>(in, has_starts ? B : 0);
  std::fclose(in);

  // As the host glue allocates it: filled with -1 beside the positives' entries, else left
  // unset (-7 here, so a rank the kernel fails to write shows).
  std::vector<int64_t> ranks(n_ranks, has_starts ? -7 : refit::target_rank::kExcludedRank), report(B * 4, 0);
  // Empty vectors still need distinct non-null pointers where an argument is present.
  static int64_t empty_marker = 0;
  auto ptr = [](std::vector<int64_t>& v) { return v.empty() ? &empty_marker : v.data(); };
  refit::cuda::TargetRankParams p{};
  p.scores = scores.empty() ? static_cast<void*>(&empty_marker) : scores.data();
  p.rows = B;
  p.items = I;
  p.score_row_stride = stride;
  p.users = has_users ? ptr(users) : nullptr;
  p.exclude = {ex_rows >= 0 ? ex_ptr.data() : nullptr, ptr(ex_idx), ex_rows, ex_nnz};
  p.positives = {po_ptr.data(), ptr(po_idx), po_rows, po_nnz};
  p.starts = has_starts ? ptr(starts) : nullptr;
  p.ranks = ptr(ranks);
  p.report = ptr(report);
  const int64_t status = static_cast<int64_t>(refit::cuda::target_rank(dtype, p, nullptr));

  emu_write_one(out, status);
  emu_write(out, ranks);
  emu_write(out, report);
  std::fclose(out);
  return 0;
}
