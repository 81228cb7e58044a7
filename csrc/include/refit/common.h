// Definitions shared by the CPU (C++) and CUDA kernels.
//
// Everything here is header-only and free of torch headers so that `nvcc -c`
// can compile the CUDA sources on a machine without a CUDA build of torch, and
// so that the CPU tests exercise the very arithmetic the GPU runs.
#pragma once

#include <cstdint>
#include <math.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define REFIT_HOST_DEVICE __host__ __device__
#define REFIT_INLINE __forceinline__
#else
#define REFIT_HOST_DEVICE
#define REFIT_INLINE inline __attribute__((always_inline))
#endif

namespace refit {

// Element types the kernels accept, numbered independently of torch so that
// the CUDA launchers can take them without torch headers.
enum class DType : int32_t {
  kFloat16 = 0,
  kBFloat16 = 1,
  kFloat32 = 2,
  kFloat64 = 3,
};

// Status codes returned by the CUDA launchers (plain C, no exceptions cross
// the nvcc / host-compiler boundary).
enum class LaunchStatus : int32_t {
  kOk = 0,
  kBadDType = 1,
  kBadShape = 2,
  kCudaError = 3,
};

// fma and exp by overload, so templates over the accumulation type pick the
// float or double routine on the host and on the device alike.
REFIT_HOST_DEVICE REFIT_INLINE float fma_(float a, float b, float c) { return fmaf(a, b, c); }
REFIT_HOST_DEVICE REFIT_INLINE double fma_(double a, double b, double c) { return fma(a, b, c); }
REFIT_HOST_DEVICE REFIT_INLINE float exp_(float x) { return expf(x); }
REFIT_HOST_DEVICE REFIT_INLINE double exp_(double x) { return exp(x); }

}  // namespace refit
