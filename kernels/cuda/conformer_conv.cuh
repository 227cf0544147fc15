// Conformer convolution module core: GLU over channels, depthwise conv over time, SiLU.
//
// Shapes (all contiguous): x [B, Tx, 2C] of T, weight [C, K] of T, bias [C] of T,
// out / grad_out [B, To, C] of T, dy [B, To, C] float, grad_x [B, Tx, 2C] of T.
// g[b, s, c] = x[b, s, c] * sigmoid(x[b, s, C + c])                  (GLU, zero outside [0, Tx))
// y[b, t, c] = bias[c] + sum_k weight[c, k] * g[b, t + k - pad, c]  (t < To)
// out = silu(y).  pad = K - 1 (causal, To = Tx) or K / 2 (To = Tx + 2 * (K / 2) - K + 1, i.e. Tx
// for odd K), exactly the reference's F.pad + F.conv1d. Arithmetic in fp32.
//
// _conformer_conv_kernel<T, MODE>: a tiled 1-D correlation, out_t = sum_k tap[k] * in[t + k - p].
//   MODE kConvForward: in = g (length Tx), tap = weight, p = pad; writes out = silu(y) (T).
//   MODE kConvGradY:   same conv; writes dy = grad_out * silu'(y) (float), silu'(y) =
//                      s (1 + y (1 - s)), s = sigmoid(y).
//   MODE kConvGradX:   in = dy (length To), tap[k] = weight[c, K - 1 - k], p = K - 1 - pad, which
//                      gives dg[s] = sum_k weight[c, k] dy[s - k + pad]; writes grad_x:
//                      grad_x[.., c] = dg * sigmoid(gate), grad_x[.., C + c] = dg * a * s (1 - s).
//   Block (32 channels, 8 rows) = 256 threads computes 64 outputs x 32 channels of one batch
//   item (8 outputs per thread, rows ty, ty + 8, ...). Grid: x = ceil(Tres / 64) output tiles,
//   y = ceil(C / 32) channel tiles, z strides over batch. Taps go through shared memory in
//   chunks of 32: window win[64 + 31][32] of inputs and taps wsm[32][32] (16 KB static).
//
// _conformer_conv_wgrad_kernel<T>: per-block partial sums for grad_weight / grad_bias.
//   grad_weight[c, k] = sum_{b, t} dy[b, t, c] g[b, t + k - pad, c]; grad_bias[c] = sum dy.
//   Block (32 channels, 8 taps): thread (tx, ty) owns tap k = 8 * blockIdx.z + ty of channel
//   32 * blockIdx.y + tx. Blocks with blockIdx.x = p visit the (b, 64-step time tile) pairs
//   p, p + P, ... and write pw[p, c, k] (float [P, C, K]) and, for blockIdx.z == 0, pb[p, c]
//   (float [P, C]). No atomics: _conformer_conv_reduce_kernel sums over p in a fixed order, so
//   the gradients are deterministic.
#pragma once

#include "common.cuh"

namespace pysonic::cuda {

constexpr int kConvForward = 0;
constexpr int kConvGradY = 1;
constexpr int kConvGradX = 2;

constexpr int kConvCh = 32;    // channels per block (blockDim.x)
constexpr int kConvRows = 8;   // blockDim.y
constexpr int kConvTile = 64;  // output time steps per block
constexpr int kConvTaps = 32;  // taps per shared-memory chunk
constexpr int kConvPerThread = kConvTile / kConvRows;
constexpr int kWgradTaps = 8;  // taps per wgrad block (blockDim.y)

template <typename T>
__device__ __forceinline__ float glu_at(const T* x, int64_t b, int64_t s, int64_t c, int64_t C,
                                        int64_t Tx) {
  const T* row = x + (b * Tx + s) * 2 * C;
  return to_float(row[c]) * sigmoidf(to_float(row[C + c]));
}

template <typename T, int MODE>
__global__ void __launch_bounds__(kConvCh * kConvRows)
    _conformer_conv_kernel(const T* __restrict__ x, const float* __restrict__ dy,
                           const T* __restrict__ weight, const T* __restrict__ bias,
                           const T* __restrict__ grad_out, T* __restrict__ out,
                           float* __restrict__ dy_out, int64_t B, int64_t C, int64_t K,
                           int64_t Tx, int64_t To, int64_t pad) {
  __shared__ float win[kConvTile + kConvTaps - 1][kConvCh];
  __shared__ float wsm[kConvTaps][kConvCh];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kConvCh + tx;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kConvTile;
  const bool grad_x = MODE == kConvGradX;
  const int64_t t_in = grad_x ? To : Tx;     // input length
  const int64_t t_res = grad_x ? Tx : To;    // output length
  const int64_t p = grad_x ? K - 1 - pad : pad;
  for (int64_t b = blockIdx.z; b < B; b += gridDim.z) {
    float acc[kConvPerThread];
#pragma unroll
    for (int r = 0; r < kConvPerThread; ++r) acc[r] = 0.f;
    for (int64_t kc0 = 0; kc0 < K; kc0 += kConvTaps) {
      const int kn = static_cast<int>(K - kc0 < kConvTaps ? K - kc0 : kConvTaps);
      for (int u = ty; u < kConvTile + kn - 1; u += kConvRows) {
        const int64_t s = t0 + kc0 + u - p;
        float v = 0.f;
        if (c < C && s >= 0 && s < t_in) {
          if constexpr (MODE == kConvGradX) {
            v = dy[(b * To + s) * C + c];
          } else {
            v = glu_at(x, b, s, c, C, Tx);
          }
        }
        win[u][tx] = v;
      }
      for (int k = ty; k < kn; k += kConvRows) {
        float w = 0.f;
        if (c < C) w = to_float(weight[c * K + (grad_x ? K - 1 - (kc0 + k) : kc0 + k)]);
        wsm[k][tx] = w;
      }
      __syncthreads();
      for (int k = 0; k < kn; ++k) {
        const float w = wsm[k][tx];
#pragma unroll
        for (int r = 0; r < kConvPerThread; ++r) acc[r] = fmaf(w, win[ty + kConvRows * r + k][tx], acc[r]);
      }
      __syncthreads();
    }
    if (c < C) {
#pragma unroll
      for (int r = 0; r < kConvPerThread; ++r) {
        const int64_t t = t0 + ty + kConvRows * r;
        if (t >= t_res) continue;
        if constexpr (MODE == kConvForward) {
          const float y = acc[r] + to_float(bias[c]);
          out[(b * To + t) * C + c] = from_float<T>(y * sigmoidf(y));
        } else if constexpr (MODE == kConvGradY) {
          const float y = acc[r] + to_float(bias[c]);
          const float s = sigmoidf(y);
          const float go = to_float(grad_out[(b * To + t) * C + c]);
          dy_out[(b * To + t) * C + c] = go * s * (1.f + y * (1.f - s));
        } else {
          const T* xr = x + (b * Tx + t) * 2 * C;
          const float a = to_float(xr[c]);
          const float s = sigmoidf(to_float(xr[C + c]));
          T* gr = out + (b * Tx + t) * 2 * C;
          gr[c] = from_float<T>(acc[r] * s);
          gr[C + c] = from_float<T>(acc[r] * a * s * (1.f - s));
        }
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kConvCh * kWgradTaps)
    _conformer_conv_wgrad_kernel(const T* __restrict__ x, const float* __restrict__ dy,
                                 float* __restrict__ pw, float* __restrict__ pb, int64_t B,
                                 int64_t C, int64_t K, int64_t Tx, int64_t To, int64_t pad) {
  __shared__ float dys[kConvTile][kConvCh];
  __shared__ float gw[kConvTile + kWgradTaps - 1][kConvCh];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kConvCh + tx;
  const int64_t k0 = static_cast<int64_t>(blockIdx.z) * kWgradTaps;
  const int64_t k = k0 + ty;
  const bool with_bias = blockIdx.z == 0 && ty == 0;
  const int64_t ntiles = ceil_div<int64_t>(To, kConvTile);
  const int64_t total = B * ntiles;
  float acc = 0.f, bacc = 0.f;
  for (int64_t tile = blockIdx.x; tile < total; tile += gridDim.x) {
    const int64_t b = tile / ntiles;
    const int64_t t0 = (tile - b * ntiles) * kConvTile;
    for (int j = ty; j < kConvTile; j += kWgradTaps) {
      const int64_t t = t0 + j;
      dys[j][tx] = (c < C && t < To) ? dy[(b * To + t) * C + c] : 0.f;
    }
    for (int u = ty; u < kConvTile + kWgradTaps - 1; u += kWgradTaps) {
      const int64_t s = t0 + k0 + u - pad;
      gw[u][tx] = (c < C && s >= 0 && s < Tx) ? glu_at(x, b, s, c, C, Tx) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int j = 0; j < kConvTile; ++j) acc = fmaf(dys[j][tx], gw[j + ty][tx], acc);
    if (with_bias) {
      for (int j = 0; j < kConvTile; ++j) bacc += dys[j][tx];
    }
    __syncthreads();
  }
  if (c < C && k < K) pw[(static_cast<int64_t>(blockIdx.x) * C + c) * K + k] = acc;
  if (with_bias && c < C) pb[static_cast<int64_t>(blockIdx.x) * C + c] = bacc;
}

// grad_weight[i] = sum_p pw[p, i] (i < C * K), grad_bias[c] = sum_p pb[p, c], in p order.
template <typename T>
__global__ void _conformer_conv_reduce_kernel(const float* __restrict__ pw,
                                              const float* __restrict__ pb,
                                              T* __restrict__ grad_weight,
                                              T* __restrict__ grad_bias, int64_t P, int64_t C,
                                              int64_t K) {
  const int64_t n = C * K;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    float s = 0.f;
    for (int64_t q = 0; q < P; ++q) s += pw[q * n + i];
    grad_weight[i] = from_float<T>(s);
    if (i < C) {
      float sb = 0.f;
      for (int64_t q = 0; q < P; ++q) sb += pb[q * C + i];
      grad_bias[i] = from_float<T>(sb);
    }
  }
}

// ---- host-side launch helpers (the caller checks shapes; every size here is > 0) ----

inline dim3 conformer_conv_grid(int64_t t_res, int64_t B, int64_t C) {
  return dim3(static_cast<unsigned>(ceil_div<int64_t>(t_res, kConvTile)),
              static_cast<unsigned>(ceil_div<int64_t>(C, kConvCh)),
              static_cast<unsigned>(B < 65535 ? B : 65535));
}

template <typename T, int MODE>
inline void launch_conformer_conv(const T* x, const float* dy, const T* weight, const T* bias,
                                  const T* grad_out, T* out, float* dy_out, int64_t B, int64_t C,
                                  int64_t K, int64_t Tx, int64_t To, int64_t pad,
                                  cudaStream_t stream) {
  auto kernel = &_conformer_conv_kernel<T, MODE>;
  const dim3 grid = conformer_conv_grid(MODE == kConvGradX ? Tx : To, B, C);
  PYSONIC_LAUNCH(kernel, grid, dim3(kConvCh, kConvRows), stream, x, dy, weight, bias, grad_out,
                 out, dy_out, B, C, K, Tx, To, pad);
}

// Number of partial-sum slots P for the weight gradient (<= the number of time tiles).
inline int64_t conformer_conv_partials(int64_t B, int64_t To) {
  const int64_t tiles = B * ceil_div<int64_t>(To, kConvTile);
  return tiles < 128 ? tiles : 128;
}

template <typename T>
inline void launch_conformer_conv_wgrad(const T* x, const float* dy, float* pw, float* pb,
                                        T* grad_weight, T* grad_bias, int64_t P, int64_t B,
                                        int64_t C, int64_t K, int64_t Tx, int64_t To, int64_t pad,
                                        cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(P), static_cast<unsigned>(ceil_div<int64_t>(C, kConvCh)),
                  static_cast<unsigned>(ceil_div<int64_t>(K, kWgradTaps)));
  auto wgrad = &_conformer_conv_wgrad_kernel<T>;
  PYSONIC_LAUNCH(wgrad, grid, dim3(kConvCh, kWgradTaps), stream, x, dy, pw, pb, B, C, K, Tx, To,
                 pad);
  constexpr int kThreads = 256;
  const int64_t blocks = ceil_div<int64_t>(C * K, kThreads);
  auto reduce = &_conformer_conv_reduce_kernel<T>;
  PYSONIC_LAUNCH(reduce, dim3(static_cast<unsigned>(blocks < 65535 ? blocks : 65535)),
                 dim3(kThreads), stream, pw, pb, grad_weight, grad_bias, P, C, K);
}

}  // namespace pysonic::cuda
