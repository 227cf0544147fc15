// Shared device helpers for the pysonic CUDA kernels (no ATen here).
//
// Element types are CUDA's own: float, __nv_bfloat16, __half. The host launchers pass
// at::BFloat16 / at::Half storage reinterpreted as these (identical 16-bit layouts).
// torch builds CUDA code with __CUDA_NO_HALF_OPERATORS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__,
// so every conversion below is an explicit intrinsic; all arithmetic happens in fp32.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

// Launch `kernel` (a function pointer variable, so template commas never meet the macro) and
// declare dynamic shared memory. tests/cuda_emu/emu.h predefines these to run the kernels on the
// CPU (PYSONIC_CUDA_EMULATE); a real build always takes the definitions below.
#ifndef PYSONIC_CUDA_EMULATE
#define PYSONIC_LAUNCH_SMEM(kernel, grid, block, smem, stream, ...) \
  (kernel)<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#define PYSONIC_LAUNCH(kernel, grid, block, stream, ...) \
  PYSONIC_LAUNCH_SMEM(kernel, grid, block, 0, stream, __VA_ARGS__)
#define PYSONIC_DYNAMIC_SMEM(type, name) extern __shared__ type name[]
#endif

namespace pysonic::cuda {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// Sum / max over the 32 lanes of a warp; every lane gets the same result (the xor butterfly
// adds the same two operands on both partners, so the lanes agree bit for bit).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int m = kWarp / 2; m > 0; m >>= 1) v += __shfl_xor_sync(kFullMask, v, m);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int m = kWarp / 2; m > 0; m >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, m));
  return v;
}

__device__ __forceinline__ float sigmoidf(float v) { return 1.f / (1.f + expf(-v)); }

// Ceil division for non-negative sizes.
template <typename I>
__host__ __device__ __forceinline__ I ceil_div(I a, I b) { return (a + b - 1) / b; }

}  // namespace pysonic::cuda
