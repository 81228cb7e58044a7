// Host emulation of __half (see cuda_runtime.h): storage and the conversions
// to and from float, bit for bit as the CUDA intrinsics (round to nearest even).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

struct __half {
  uint16_t bits;
};

inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t exp = (h.bits >> 10) & 0x1fu, man = h.bits & 0x3ffu;
  float f;
  if (exp == 0) {
    f = std::ldexp(static_cast<float>(man), -24);  // zero or subnormal
    return sign ? -f : f;
  }
  const uint32_t out = exp == 31 ? (sign | 0x7f800000u | (man << 13)) : (sign | ((exp + 112) << 23) | (man << 13));
  std::memcpy(&f, &out, sizeof f);
  return f;
}

inline __half __float2half_rn(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t a = x & 0x7fffffffu;
  uint32_t h;
  if (a > 0x7f800000u) {
    h = 0x7fffu;  // NaN: CUDA's canonical NaN
    return __half{static_cast<uint16_t>(h)};
  }
  if (a >= 0x477ff000u) {
    h = 0x7c00u;  // 65520 and above (the tie above the largest half, 65504, rounds to even: up) and inf
  } else if (a >= 0x38800000u) {  // the normal range, from 2^-14
    h = ((((a >> 23) - 112u) << 10) | ((a >> 13) & 0x3ffu));
    const uint32_t rest = a & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is right
  } else {  // subnormal halves: multiples of 2^-24, rounded to the nearest, ties to even
    float v;
    std::memcpy(&v, &a, sizeof v);
    h = static_cast<uint32_t>(std::nearbyint(v * 16777216.0f));  // exact scaling by 2^24
  }
  return __half{static_cast<uint16_t>(sign | h)};
}
