// One step of the LSTM recurrence (the host loops over the T steps; see csrc/cuda/lstm.cu).
//
// _lstm_step_kernel<T>: one warp per (batch item b, hidden unit u).
//   gx: [B, 4H] of T, this step's input gates (x_t @ w_ih^T + biases), gate order i, f, g, o;
//   w: [4H, H] of T (w_hh); h_prev: [B, H] float; h_next: [B, H] float; c: [B, H] float (read
//   and written in place: each (b, u) belongs to one warp); y: [B, H] of T (this step's output).
//   The lanes split the H inputs of the four rows g * H + u (coalesced reads), a butterfly sum
//   gives every lane the four dot products, lane 0 applies the gates:
//   c = sigmoid(z_f) * c + sigmoid(z_i) * tanh(z_g);  h = sigmoid(z_o) * tanh(c).
//   h_prev and h_next are separate buffers so that no warp reads an h another has overwritten.
#pragma once

#include "common.cuh"

namespace pysonic::cuda {

template <typename T>
__global__ void _lstm_step_kernel(const T* gx, const T* w, const float* h_prev, float* h_next, float* c,
                                  T* y, int64_t batch, int64_t hidden) {
  const int64_t warps_per_block = blockDim.x / kWarp;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * warps_per_block + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (item >= batch * hidden) return;  // whole warps leave together (item is per warp)
  const int64_t b = item / hidden, u = item % hidden;
  const float* hp = h_prev + b * hidden;
  float z[4] = {0.f, 0.f, 0.f, 0.f};
  for (int64_t i = lane; i < hidden; i += kWarp) {
    const float hv = hp[i];
#pragma unroll
    for (int g = 0; g < 4; ++g) z[g] += to_float(w[(g * hidden + u) * hidden + i]) * hv;
  }
#pragma unroll
  for (int g = 0; g < 4; ++g) z[g] = warp_sum(z[g]);
  if (lane == 0) {
    const T* gxb = gx + b * 4 * hidden;
    const float in = sigmoidf(z[0] + to_float(gxb[u]));
    const float forget = sigmoidf(z[1] + to_float(gxb[hidden + u]));
    const float cell = tanhf(z[2] + to_float(gxb[2 * hidden + u]));
    const float out = sigmoidf(z[3] + to_float(gxb[3 * hidden + u]));
    const float cv = forget * c[b * hidden + u] + in * cell;
    const float hv = out * tanhf(cv);
    c[b * hidden + u] = cv;
    h_next[b * hidden + u] = hv;
    y[b * hidden + u] = from_float<T>(hv);
  }
}

template <typename T>
inline void launch_lstm_step(const T* gx, const T* w, const float* h_prev, float* h_next, float* c, T* y,
                             int64_t batch, int64_t hidden, cudaStream_t stream) {
  constexpr int kThreads = 256;  // 8 warps, 8 (b, u) items per block
  const int64_t blocks = ceil_div<int64_t>(batch * hidden, kThreads / kWarp);
  auto kernel = &_lstm_step_kernel<T>;
  PYSONIC_LAUNCH(kernel, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), stream, gx, w, h_prev, h_next, c,
                 y, batch, hidden);
}

}  // namespace pysonic::cuda
