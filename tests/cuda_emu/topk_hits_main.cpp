// Runs the CUDA topk_hits kernel under the host emulation (cuda_runtime.h).
// Usage: topk_hits_main INPUT OUTPUT. Binary files of little-endian values:
//   INPUT: 15 int64 (dtype, B, I, row_stride, n_ks, kmax, has_users,
//          ex_rows, ex_nnz, po_rows, po_nnz, M, ns_rows, ns_nnz,
//          return_indices; *_rows = -1 and M = -1 for absent arguments), then
//          scores (B * row_stride elements of 4 or 2 bytes), ks, users,
//          exclude indptr and indices, positives indptr and indices,
//          neighbors (B * M), neighbor_sets indptr and indices (int64).
//   OUTPUT: status, hits (B * n_ks int64), dcg and neighbor_hits
//          (B * n_ks float32 each), first_hit (B int64), indices
//          (B * kmax int64 when asked for), report (B * 4 int64).
#include <cstdio>
#include <vector>

#include "emu_io.h"
#include "emulated.cpp"  // csrc/cuda/topk_hits_cuda.cu with its launch rewritten

int main(int argc, char** argv) {
  if (argc != 3) return 2;
  std::FILE* in = std::fopen(argv[1], "rb");
  if (!in) return 2;
  const std::vector<int64_t> h = emu_read<int64_t>(in, 15);
  const int64_t dtype = h[0], B = h[1], I = h[2], stride = h[3], n_ks = h[4], kmax = h[5];
  const bool has_users = h[6] != 0;
  const int64_t ex_rows = h[7], ex_nnz = h[8], po_rows = h[9], po_nnz = h[10], M = h[11], ns_rows = h[12],
                ns_nnz = h[13];
  const bool return_indices = h[14] != 0;
  const int64_t elem = dtype == static_cast<int64_t>(refit::DType::kFloat32) ? 4 : 2;
  std::vector<unsigned char> scores = emu_read<unsigned char>(in, B * stride * elem);
  std::vector<int64_t> ks = emu_read<int64_t>(in, n_ks);
  std::vector<int64_t> users = emu_read<int64_t>(in, has_users ? B : 0);
  std::vector<int64_t> ex_ptr = emu_read<int64_t>(in, ex_rows + 1), ex_idx = emu_read<int64_t>(in, ex_rows >= 0 ? ex_nnz : 0);
  std::vector<int64_t> po_ptr = emu_read<int64_t>(in, po_rows + 1), po_idx = emu_read<int64_t>(in, po_rows >= 0 ? po_nnz : 0);
  std::vector<int64_t> nbrs = emu_read<int64_t>(in, M >= 0 ? B * M : 0);
  std::vector<int64_t> ns_ptr = emu_read<int64_t>(in, ns_rows + 1), ns_idx = emu_read<int64_t>(in, ns_rows >= 0 ? ns_nnz : 0);
  std::fclose(in);

  std::vector<int64_t> hits(B * n_ks, -7), first(B, -7), indices(return_indices ? B * kmax : 0, -7),
      report(B * 4, 0);
  std::vector<float> dcg(B * n_ks, -7.0f), nbr(B * n_ks, -7.0f);
  // Empty vectors still need distinct non-null pointers where an argument is present.
  static int64_t empty_marker = 0;
  auto ptr = [](std::vector<int64_t>& v) { return v.empty() ? &empty_marker : v.data(); };
  refit::cuda::TopKHitsParams p{};
  p.scores = scores.data();
  p.rows = B;
  p.items = I;
  p.score_row_stride = stride;
  p.ks = ks.data();
  p.n_ks = n_ks;
  p.kmax = kmax;
  p.users = has_users ? users.data() : nullptr;
  p.exclude = {ex_rows >= 0 ? ex_ptr.data() : nullptr, ptr(ex_idx), ex_rows, ex_nnz};
  p.positives = {po_rows >= 0 ? po_ptr.data() : nullptr, ptr(po_idx), po_rows, po_nnz};
  p.neighbor_sets = {ns_rows >= 0 ? ns_ptr.data() : nullptr, ptr(ns_idx), ns_rows, ns_nnz};
  p.neighbors = M >= 0 ? ptr(nbrs) : nullptr;
  p.n_neighbors = M >= 0 ? M : 0;
  p.hits = hits.data();
  p.dcg = dcg.data();
  p.neighbor_hits = nbr.data();
  p.first_hit = first.data();
  p.indices = return_indices ? indices.data() : nullptr;
  p.report = report.data();
  const int64_t status = static_cast<int64_t>(refit::cuda::topk_hits(static_cast<refit::DType>(dtype), p, nullptr));

  std::FILE* out = std::fopen(argv[2], "wb");
  if (!out) return 2;
  emu_write_one(out, status);
  emu_write(out, hits);
  emu_write(out, dcg);
  emu_write(out, nbr);
  emu_write(out, first);
  emu_write(out, indices);
  emu_write(out, report);
  std::fclose(out);
  return 0;
}
