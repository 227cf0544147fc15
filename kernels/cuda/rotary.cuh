// Rotary position embedding on the first R = 2 * half channels of each row.
//
// _rotary_kernel<T, C>
//   x, out: contiguous [rows, D] of T, rows = B * H * Tlen (row r sits at time t = r % Tlen);
//   cos, sin: contiguous [Tlen, half] of C (float, or T itself); 2 * half <= D.
//   Pairs (i1, i2) = (p, p + half), or (2p, 2p + 1) when interleaved, for p < half:
//     out[i1] = x[i1] * cos[t, p] - x[i2] * sin[t, p]
//     out[i2] = x[i2] * cos[t, p] + x[i1] * sin[t, p]      (fp32 arithmetic)
//   Channels 2 * half .. D - 1 are copied. Work item w of a row (per_row = half + D - 2 * half
//   items) is pair w when w < half, else pass-through channel 2 * half + (w - half);
//   a 1-D grid-stride loop covers rows * per_row items (int64 indices).
#pragma once

#include "common.cuh"

namespace pysonic::cuda {

template <typename T, typename C>
__global__ void _rotary_kernel(const T* __restrict__ x, const C* __restrict__ cos,
                               const C* __restrict__ sin, T* __restrict__ out, int64_t rows,
                               int64_t tlen, int64_t D, int64_t half, bool interleaved) {
  const int64_t per_row = half + (D - 2 * half);
  const int64_t total = rows * per_row;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    const int64_t row = i / per_row;
    const int64_t w = i - row * per_row;
    const T* xr = x + row * D;
    T* orow = out + row * D;
    if (w < half) {
      const int64_t t = row % tlen;
      const float c = to_float(cos[t * half + w]);
      const float s = to_float(sin[t * half + w]);
      const int64_t i1 = interleaved ? 2 * w : w;
      const int64_t i2 = interleaved ? 2 * w + 1 : w + half;
      const float x1 = to_float(xr[i1]), x2 = to_float(xr[i2]);
      orow[i1] = from_float<T>(x1 * c - x2 * s);
      orow[i2] = from_float<T>(x2 * c + x1 * s);
    } else {
      const int64_t d = 2 * half + (w - half);
      orow[d] = xr[d];
    }
  }
}

template <typename T, typename C>
inline void launch_rotary(const T* x, const C* cos, const C* sin, T* out, int64_t rows,
                          int64_t tlen, int64_t D, int64_t half, bool interleaved,
                          cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t total = rows * (half + (D - 2 * half));
  if (total == 0) return;
  const int64_t blocks = ceil_div<int64_t>(total, kThreads);
  const unsigned grid = static_cast<unsigned>(blocks < (1 << 20) ? blocks : (1 << 20));
  auto kernel = &_rotary_kernel<T, C>;
  PYSONIC_LAUNCH(kernel, dim3(grid), dim3(kThreads), stream, x, cos, sin, out, rows, tlen, D, half,
                 interleaved);
}

}  // namespace pysonic::cuda
