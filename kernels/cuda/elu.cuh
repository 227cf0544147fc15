// ELU: out[i] = x[i] > 0 ? x[i] : alpha * expm1(x[i]), fp32 arithmetic (CUDA's expm1f, accurate
// near 0 where exp(x) - 1 would cancel).
//
// _elu_kernel<T>
//   x, out: n elements of T each, walked as flat arrays (the launcher passes dense tensors with
//   the same strides, so element i of one is element i of the other whatever the layout; out may
//   equal x). Grid-stride loop, one element per thread per iteration. NaN propagates.
#pragma once

#include "common.cuh"

namespace pysonic::cuda {

template <typename T>
__global__ void _elu_kernel(const T* x, T* out, int64_t n, float alpha) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float v = to_float(x[i]);
    out[i] = from_float<T>(v > 0.f ? v : alpha * expm1f(v));
  }
}

template <typename T>
inline void launch_elu(const T* x, T* out, int64_t n, float alpha, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t work = ceil_div<int64_t>(n, kThreads);
  const unsigned blocks = static_cast<unsigned>(work < 65535 ? (work > 0 ? work : 1) : 65535);
  auto kernel = &_elu_kernel<T>;
  PYSONIC_LAUNCH(kernel, dim3(blocks), dim3(kThreads), stream, x, out, n, alpha);
}

}  // namespace pysonic::cuda
