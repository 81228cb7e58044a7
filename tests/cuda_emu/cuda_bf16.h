// Host emulation of __nv_bfloat16 (see cuda_runtime.h): storage and the
// conversions to and from float, bit for bit as the CUDA intrinsics (round to
// nearest even).
#pragma once

#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  if ((x & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{0x7fffu};  // NaN: CUDA's canonical NaN
  x += 0x7fffu + ((x >> 16) & 1u);  // round half to even; overflow carries into inf as it should
  return __nv_bfloat16{static_cast<uint16_t>(x >> 16)};
}
