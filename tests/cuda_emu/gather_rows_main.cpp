// Runs the CUDA gather_rows kernels (validation, then the gather when the
// validation passes) under the host emulation (cuda_runtime.h).
// Usage: gather_rows_main INPUT OUTPUT.
//   INPUT: 13 int64 (index64, n_rows, nnz, n_cols, n, batch, has_values,
//          has_segments, has_weights, out_dtype, out_row_stride,
//          out_col_stride, out_elems), then indptr (n_rows + 1) and indices
//          (nnz) as int64 or int32, values (nnz float32) when given, rows
//          (n int64), segments (batch + 1 int64) when given, weights (n
//          float32) when given, and the initial output buffer (out_elems
//          elements of out_dtype's size).
//   OUTPUT: validation status, bad flag, gather status (-1 when not run),
//          all int64, then the output buffer.
#include "emu_io.h"
#include "gather_rows_emulated.cpp"  // csrc/cuda/gather_rows_cuda.cu with its launches rewritten

int main(int argc, char** argv) {
  if (argc != 3) return 2;
  std::FILE* in = std::fopen(argv[1], "rb");
  std::FILE* out = std::fopen(argv[2], "wb");
  if (!in || !out) return 2;
  const std::vector<int64_t> h = emu_read<int64_t>(in, 13);
  const bool index64 = h[0] != 0;
  const int64_t n_rows = h[1], nnz = h[2], n_cols = h[3], n = h[4], batch = h[5];
  const bool has_values = h[6] != 0, has_segments = h[7] != 0, has_weights = h[8] != 0;
  const auto out_dtype = static_cast<refit::DType>(h[9]);
  const int64_t s0 = h[10], s1 = h[11], out_elems = h[12];
  const int64_t isz = index64 ? 8 : 4;
  std::vector<unsigned char> indptr = emu_read<unsigned char>(in, (n_rows + 1) * isz);
  std::vector<unsigned char> indices = emu_read<unsigned char>(in, nnz * isz);
  std::vector<float> values = emu_read<float>(in, has_values ? nnz : 0);
  std::vector<int64_t> rows = emu_read<int64_t>(in, n);
  std::vector<int64_t> segments = emu_read<int64_t>(in, has_segments ? batch + 1 : 0);
  std::vector<float> weights = emu_read<float>(in, has_weights ? n : 0);
  const int64_t osz = out_dtype == refit::DType::kFloat32 ? 4 : 2;
  std::vector<unsigned char> buf = emu_read<unsigned char>(in, out_elems * osz);
  std::fclose(in);

  const refit::cuda::GatherRowsArgs args{
      indptr.data(), indices.data(), index64, has_values ? values.data() : nullptr, rows.data(),
      has_segments ? segments.data() : nullptr, has_weights ? weights.data() : nullptr, n_rows, nnz, n_cols, n,
      batch};
  int32_t bad = 0;
  const int64_t vstatus = static_cast<int64_t>(refit::cuda::gather_rows_validate(args, &bad, nullptr));
  int64_t fstatus = -1;
  if (vstatus == 0 && bad == 0) {
    fstatus = static_cast<int64_t>(refit::cuda::gather_rows_forward(args, out_dtype, buf.data(), s0, s1, nullptr));
  }
  emu_write_one(out, vstatus);
  emu_write_one(out, static_cast<int64_t>(bad));
  emu_write_one(out, fstatus);
  emu_write(out, buf);
  std::fclose(out);
  return 0;
}
