// Host emulation of the CUDA features the refit kernels use, so that tests on
// a machine without a GPU can execute a kernel's logic (not only compile it).
//
// A launch runs the grid one block at a time; the threads of a block run
// concurrently as std::threads, __syncthreads() is a std::barrier over them,
// __shared__ variables are statics of the kernel function (one block at a
// time uses them), dynamic shared memory (`extern __shared__ T name[];`,
// rewritten by the test harness into `T* name = emu_dynamic_shared<T>();`)
// is a buffer of the launch's size, and the atomics are real atomics. A
// barrier reached by only part of a block deadlocks here as it would
// misbehave on a GPU: run emulated kernels under a timeout.
//
// Warp shuffles exchange values through a per-warp slot array between two
// barriers of the warp's threads, so every lane of the warp must call them
// together, as the full mask 0xffffffff promises on a GPU; a mask other than
// the full one, or a full mask in a warp with fewer than 32 threads (a
// partial last warp), is reported and ends the program, since the GPU's
// result would be undefined there.
//
// Launch checks: a launch whose grid or block is empty, whose block exceeds
// 1024 threads, or whose dynamic shared memory exceeds the 48 KiB available
// without opting in, is not run and makes cudaGetLastError() report an error,
// as the CUDA runtime would.
#pragma once

#include <array>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct EmuDim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local EmuDim3 threadIdx;
inline EmuDim3 blockIdx;
inline EmuDim3 blockDim;
inline EmuDim3 gridDim;
inline std::barrier<>* emu_block_barrier = nullptr;

inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }

typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
constexpr cudaError_t cudaErrorInvalidConfiguration = 9;
typedef void* cudaStream_t;
inline cudaError_t emu_pending_error = cudaSuccess;
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu_pending_error;
  emu_pending_error = cudaSuccess;
  return e;
}
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error (emulated)";
    case cudaErrorInvalidValue: return "invalid argument (emulated launch check)";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument (emulated launch check)";
    default: return "unknown error (emulated)";
  }
}

template <typename T>
T atomicAdd(T* p, T v) { return std::atomic_ref<T>(*p).fetch_add(v); }
template <typename T>
T atomicSub(T* p, T v) { return std::atomic_ref<T>(*p).fetch_sub(v); }
template <typename T>
T atomicMin(T* p, T v) {
  std::atomic_ref<T> r(*p);
  T old = r.load();
  while (v < old && !r.compare_exchange_weak(old, v)) {
  }
  return old;
}

using std::isnan;

// --- dynamic shared memory ------------------------------------------------------------------

// Sized by each launch; 16-byte aligned like the GPU's.
struct EmuSharedBuffer {
  std::unique_ptr<std::max_align_t[]> data;
  std::size_t bytes = 0;
};
inline EmuSharedBuffer emu_dynamic_smem;

template <typename T>
T* emu_dynamic_shared() {
  return reinterpret_cast<T*>(emu_dynamic_smem.data.get());
}

// --- warps ----------------------------------------------------------------------------------

struct EmuWarp {
  std::unique_ptr<std::barrier<>> bar;
  unsigned size = 0;  // threads of the block in this warp (32 but for a partial last warp)
  std::array<std::array<unsigned char, 8>, 32> slot{};
};
inline std::vector<EmuWarp>* emu_warps = nullptr;

[[noreturn]] inline void emu_fail(const char* what) {
  std::fprintf(stderr, "cuda emulation: %s (block %u, thread %u, block size %u)\n", what, blockIdx.x, threadIdx.x,
               blockDim.x);
  std::fflush(stderr);
  std::_Exit(3);
}

template <typename T>
T emu_shuffle(unsigned mask, T v, int src_of_lane_delta, bool down, int width) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffled values are at most 8 bytes");
  if (width != 32) emu_fail("warp shuffles with width != 32 are not emulated");
  const unsigned lane = threadIdx.x & 31u;
  EmuWarp& w = (*emu_warps)[threadIdx.x >> 5];
  if (mask != 0xffffffffu) emu_fail("warp shuffle with a partial mask is not emulated");
  if (w.size != 32) emu_fail("warp shuffle with the full mask in a warp of fewer than 32 threads (undefined on a GPU)");
  std::memcpy(w.slot[lane].data(), &v, sizeof(T));
  w.bar->arrive_and_wait();
  T out = v;
  const int src = down ? static_cast<int>(lane) + src_of_lane_delta : src_of_lane_delta;
  // __shfl_down_sync keeps the caller's own value when lane + delta is past the warp;
  // __shfl_sync reads lane src modulo the width.
  if (down) {
    if (src < 32) std::memcpy(&out, w.slot[src].data(), sizeof(T));
  } else {
    std::memcpy(&out, w.slot[src & 31].data(), sizeof(T));
  }
  w.bar->arrive_and_wait();  // nobody overwrites a slot before every lane has read
  return out;
}

template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return emu_shuffle(mask, v, static_cast<int>(delta), true, width);
}
template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  return emu_shuffle(mask, v, src_lane, false, width);
}

// --- launches -------------------------------------------------------------------------------

// kernel<<<grid, block, smem, stream>>>(args...) is rewritten to
// emu_launch(kernel, grid, block, smem, stream, args...).
template <typename Kernel, typename... Args>
void emu_launch(Kernel kernel, unsigned grid, unsigned block, std::size_t smem, cudaStream_t, Args... args) {
  if (grid == 0 || block == 0 || block > 1024) {
    emu_pending_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (smem > 48 * 1024) {
    emu_pending_error = cudaErrorInvalidValue;
    return;
  }
  emu_dynamic_smem.bytes = smem;
  emu_dynamic_smem.data.reset(smem ? new std::max_align_t[(smem + sizeof(std::max_align_t) - 1) /
                                                         sizeof(std::max_align_t)]
                                   : nullptr);
  blockDim.x = block;
  gridDim.x = grid;
  const unsigned n_warps = (block + 31) / 32;
  for (unsigned b = 0; b < grid; ++b) {
    blockIdx.x = b;
    std::barrier<> bar(block);
    emu_block_barrier = &bar;
    std::vector<EmuWarp> warps(n_warps);
    for (unsigned w = 0; w < n_warps; ++w) {
      warps[w].size = (w + 1) * 32 <= block ? 32 : block - w * 32;
      warps[w].bar = std::make_unique<std::barrier<>>(warps[w].size);
    }
    emu_warps = &warps;
    std::vector<std::thread> threads;
    threads.reserve(block);
    for (unsigned t = 0; t < block; ++t) {
      threads.emplace_back([=] {
        threadIdx.x = t;
        kernel(args...);
      });
    }
    for (auto& th : threads) th.join();
  }
  emu_dynamic_smem.data.reset();
  emu_dynamic_smem.bytes = 0;
}
