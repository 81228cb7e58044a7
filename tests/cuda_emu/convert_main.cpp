// The host stand-ins of the CUDA float <-> half / bfloat16 conversions on a
// list of floats. Usage: convert_main INPUT OUTPUT.
//   INPUT: int64 n, then n float32.
//   OUTPUT: n uint16 (__float2half_rn), n uint16 (__float2bfloat16_rn), and
//           n float32 each of __half2float and __bfloat162float of those.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "emu_io.h"

int main(int argc, char** argv) {
  if (argc != 3) return 2;
  std::FILE* in = std::fopen(argv[1], "rb");
  std::FILE* out = std::fopen(argv[2], "wb");
  if (!in || !out) return 2;
  const int64_t n = emu_read<int64_t>(in, 1)[0];
  const std::vector<float> x = emu_read<float>(in, n);
  std::vector<uint16_t> half(x.size()), bf16(x.size());
  std::vector<float> half_back(x.size()), bf16_back(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const __half h = __float2half_rn(x[i]);
    const __nv_bfloat16 b = __float2bfloat16_rn(x[i]);
    half[i] = h.bits;
    bf16[i] = b.bits;
    half_back[i] = __half2float(h);
    bf16_back[i] = __bfloat162float(b);
  }
  emu_write(out, half);
  emu_write(out, bf16);
  emu_write(out, half_back);
  emu_write(out, bf16_back);
  std::fclose(in);
  std::fclose(out);
  return 0;
}
