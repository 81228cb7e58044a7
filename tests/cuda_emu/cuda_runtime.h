// Host emulation of the CUDA features the refit kernels use, so that tests on
// a machine without a GPU can execute a kernel's logic (not only compile it).
//
// A launch runs the grid one block at a time; the threads of a block run
// concurrently as std::threads, __syncthreads() is a std::barrier over them,
// __shared__ variables are statics of the kernel function (one block at a
// time uses them), and the atomics are real atomics. A barrier reached by
// only part of a block deadlocks here as it would misbehave on a GPU: run
// emulated kernels under a timeout. Warp-level intrinsics are not emulated.
#pragma once

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <thread>
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
typedef void* cudaStream_t;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "no error (emulated)"; }

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

// kernel<<<grid, block, smem, stream>>>(args...) is rewritten to
// emu_launch(kernel, grid, block, smem, stream, args...).
template <typename Kernel, typename... Args>
void emu_launch(Kernel kernel, unsigned grid, unsigned block, std::size_t, cudaStream_t, Args... args) {
  blockDim.x = block;
  gridDim.x = grid;
  for (unsigned b = 0; b < grid; ++b) {
    blockIdx.x = b;
    std::barrier<> bar(block);
    emu_block_barrier = &bar;
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
}
