// SPDX-License-Identifier: Apache-2.0
// Device helpers shared by the kernel files: warp and block reductions whose summation order
// depends only on the block size, so results are deterministic run to run.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "host_plan.hpp"

namespace autoglm::cuda_kernels::dev {

/// Grid-stride loop index type: 64-bit, shapes of real models exceed 2^31 elements.
using i64 = std::int64_t;

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide reductions: every thread of the block must call them (blockDim.x a multiple of
// 32, at most 1024); each returns the result to all threads. `scratch` holds 32 floats.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  v = warp_sum(v);
  const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < (blockDim.x >> 5) ? scratch[lane] : 0.0f;
  return warp_sum(v);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
  v = warp_max(v);
  const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < (blockDim.x >> 5) ? scratch[lane] : -INFINITY;
  return warp_max(v);
}

/// First index of a grid-stride loop and its stride.
__device__ __forceinline__ i64 grid_start() {
  return static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ i64 grid_stride() {
  return static_cast<i64>(gridDim.x) * blockDim.x;
}

}  // namespace autoglm::cuda_kernels::dev
