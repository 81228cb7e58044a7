// CUDA kernels of refit::gather_rows. Plain CUDA: no torch headers, so
// `nvcc -c -arch=sm_90 -I csrc/include` compiles this file on any machine.
//
// One block per output row. The row is built in a float32 tile of shared
// memory (at most kMaxTile columns at a time): zero the tile, add the
// segment's gathered rows one after the other (threads share a row's entries;
// a barrier between rows makes every column add up in segment order, so the
// result does not depend on scheduling), then round the tile into the output.
// Every output element is written exactly once, which zeroes `out` as well.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "launchers.h"
#include "refit/gather_rows.h"

namespace refit {
namespace cuda {
namespace {

thread_local cudaError_t g_last_error = cudaSuccess;

// Shared-memory tile: 12288 float32 = 48 KiB, the limit without opt-in.
constexpr int64_t kMaxTile = 12288;
constexpr unsigned kThreads = 256;

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// One warp per gathered row j: lane 0 checks the row id and its indptr entries,
// then the warp checks the row's column ids. Threads past the rows check the
// segment offsets.
template <typename index_t>
__global__ void gather_rows_validate_kernel(GatherRowsArgs a, int32_t* __restrict__ bad) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t n_warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  const index_t* indptr = static_cast<const index_t*>(a.indptr);
  const index_t* indices = static_cast<const index_t*>(a.indices);
  for (int64_t j = warp; j < a.n; j += n_warps) {
    int64_t p0 = 0, p1 = 0;
    int ok = 1;
    if (lane == 0) {
      ok = gr::row_extent(indptr, a.n_rows, a.nnz, a.rows[j], &p0, &p1) == gr::Problem::kNone;
    }
    ok = __shfl_sync(0xffffffffu, ok, 0);
    p0 = __shfl_sync(0xffffffffu, p0, 0);
    p1 = __shfl_sync(0xffffffffu, p1, 0);
    if (!ok) {
      if (lane == 0) *bad = 1;
      continue;
    }
    for (int64_t k = p0 + lane; k < p1; k += 32) {
      if (!gr::in_range(static_cast<int64_t>(indices[k]), a.n_cols)) *bad = 1;
    }
  }
  if (a.segments != nullptr) {
    const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    const int64_t n_threads = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t b = t; b <= a.batch; b += n_threads) {
      const int64_t s = a.segments[b];
      const bool wrong = (b == 0 && s != 0) || (b == a.batch && s != a.n) ||
                         (b > 0 && s < a.segments[b - 1]);
      if (wrong) *bad = 1;
    }
  }
}

template <typename index_t, typename out_t>
__global__ void gather_rows_kernel(GatherRowsArgs a, out_t* __restrict__ out, int64_t s0,
                                   int64_t s1, int64_t tile) {
  extern __shared__ float acc[];
  const int64_t b = blockIdx.x;
  int64_t j0, j1;
  gr::segment_of(a.segments, b, &j0, &j1);
  const index_t* indptr = static_cast<const index_t*>(a.indptr);
  const index_t* indices = static_cast<const index_t*>(a.indices);
  out_t* row = out + b * s0;
  for (int64_t c0 = 0; c0 < a.n_cols; c0 += tile) {
    const int64_t width = a.n_cols - c0 < tile ? a.n_cols - c0 : tile;
    for (int64_t i = threadIdx.x; i < width; i += blockDim.x) acc[i] = 0.0f;
    __syncthreads();
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t r = a.rows[j];
      const int64_t p0 = static_cast<int64_t>(indptr[r]);
      const int64_t p1 = static_cast<int64_t>(indptr[r + 1]);
      const float w = gr::weight_of(a.weights, j);
      for (int64_t k = p0 + threadIdx.x; k < p1; k += blockDim.x) {
        const int64_t c = static_cast<int64_t>(indices[k]) - c0;
        // Columns of one CSR row are distinct (sorted and unique after
        // loading), so within a row no two threads add to the same element;
        // the atomic only matters for rows with repeated columns.
        if (c >= 0 && c < width) atomicAdd(&acc[c], w * gr::value_of(a.values, k));
      }
      __syncthreads();
    }
    for (int64_t i = threadIdx.x; i < width; i += blockDim.x) row[(c0 + i) * s1] = from_float<out_t>(acc[i]);
    __syncthreads();  // the next tile reuses acc
  }
}

LaunchStatus finish() {
  g_last_error = cudaGetLastError();
  return g_last_error == cudaSuccess ? LaunchStatus::kOk : LaunchStatus::kCudaError;
}

template <typename index_t, typename out_t>
LaunchStatus forward_typed(const GatherRowsArgs& a, void* out, int64_t s0, int64_t s1,
                           cudaStream_t stream) {
  const int64_t tile = a.n_cols < kMaxTile ? a.n_cols : kMaxTile;
  gather_rows_kernel<index_t, out_t>
      <<<static_cast<unsigned>(a.batch), kThreads, static_cast<size_t>(tile) * sizeof(float), stream>>>(
          a, static_cast<out_t*>(out), s0, s1, tile);
  return finish();
}

template <typename index_t>
LaunchStatus forward_index(const GatherRowsArgs& a, DType out_dtype, void* out, int64_t s0,
                           int64_t s1, cudaStream_t stream) {
  switch (out_dtype) {
    case DType::kFloat32: return forward_typed<index_t, float>(a, out, s0, s1, stream);
    case DType::kFloat16: return forward_typed<index_t, __half>(a, out, s0, s1, stream);
    case DType::kBFloat16: return forward_typed<index_t, __nv_bfloat16>(a, out, s0, s1, stream);
    case DType::kFloat64: break;
  }
  return LaunchStatus::kBadDType;
}

bool shape_ok(const GatherRowsArgs& a) {
  // One block per output row: the grid's x dimension holds at most 2^31 - 1 blocks.
  return a.n >= 0 && a.batch >= 0 && a.n_cols >= 0 && a.n_rows >= 0 && a.nnz >= 0 &&
         a.batch <= static_cast<int64_t>(0x7fffffff);
}

}  // namespace

LaunchStatus gather_rows_validate(const GatherRowsArgs& a, int32_t* bad, void* stream) {
  if (!shape_ok(a)) return LaunchStatus::kBadShape;
  const int64_t work = (a.n * 32 > a.batch + 1 ? a.n * 32 : a.batch + 1);
  if (work == 0) return LaunchStatus::kOk;
  int64_t blocks = (work + kThreads - 1) / kThreads;
  if (blocks > 65535) blocks = 65535;  // grid-stride loops cover the rest
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (a.index64) {
    gather_rows_validate_kernel<int64_t><<<static_cast<unsigned>(blocks), kThreads, 0, st>>>(a, bad);
  } else {
    gather_rows_validate_kernel<int32_t><<<static_cast<unsigned>(blocks), kThreads, 0, st>>>(a, bad);
  }
  return finish();
}

LaunchStatus gather_rows_forward(const GatherRowsArgs& a, DType out_dtype, void* out,
                                 int64_t out_row_stride, int64_t out_col_stride, void* stream) {
  if (!shape_ok(a)) return LaunchStatus::kBadShape;
  if (a.batch == 0 || a.n_cols == 0) return LaunchStatus::kOk;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  return a.index64 ? forward_index<int64_t>(a, out_dtype, out, out_row_stride, out_col_stride, st)
                   : forward_index<int32_t>(a, out_dtype, out, out_row_stride, out_col_stride, st);
}

const char* gather_rows_last_error_string() { return cudaGetErrorString(g_last_error); }

}  // namespace cuda
}  // namespace refit
