// Per-step sampler updates: flow_step and diffusion_step (memory bound, fp32 arithmetic).
//
// _flow_step_kernel<T, V>
//   x, vc, vu, out: contiguous [n] arrays of T (vu may be null). When V > 1 every pointer is
//   aligned to V * sizeof(T) bytes (the launcher checks), so V elements move per access.
//   out[i] = x[i] + a * vc[i] + b * vu[i]       (a = dt * g, b = dt * (1 - g); b unused
//   without vu, where a = dt): the same algebra as the CPU kernel.
//
// _diffusion_step_kernel<T, V>
//   x, eps, noise, out: contiguous [batch, n] arrays of T (noise may be null); c1, c2, sigma:
//   float [batch]. When V > 1, pointers are aligned to V * sizeof(T) and n % V == 0.
//   out[b, i] = c1[b] * x - c1[b] * c2[b] * eps + sigma[b] * noise, then clamped to
//   [-clip, clip] when clip >= 0 (NaN stays NaN, like torch.clamp).
//   Grid: x over chunks of one item's n elements, y over batch items (grid-stride on both).
//   With X0 = true (launch_diffusion_step_x0, the op diffusion_step_x0), p and q: float [batch]:
//   y0 = c1[b] * x - c1[b] * c2[b] * eps, clamped to [-clip, clip] when clip >= 0, then
//   out[b, i] = p[b] * y0 + q[b] * x + sigma[b] * noise (no clamp of the result).
#pragma once

#include "common.cuh"

namespace pysonic::cuda {

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__global__ void _flow_step_kernel(const T* __restrict__ x, const T* __restrict__ vc,
                                  const T* __restrict__ vu, T* __restrict__ out, int64_t n,
                                  float a, float b) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = n / V;
  using P = Pack<T, V>;
  for (int64_t i = tid; i < nvec; i += stride) {
    const P px = reinterpret_cast<const P*>(x)[i];
    const P pc = reinterpret_cast<const P*>(vc)[i];
    P po;
    if (vu != nullptr) {
      const P pu = reinterpret_cast<const P*>(vu)[i];
#pragma unroll
      for (int e = 0; e < V; ++e)
        po.v[e] = from_float<T>(to_float(px.v[e]) + a * to_float(pc.v[e]) + b * to_float(pu.v[e]));
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e) po.v[e] = from_float<T>(to_float(px.v[e]) + a * to_float(pc.v[e]));
    }
    reinterpret_cast<P*>(out)[i] = po;
  }
  // The n % V tail, one element per thread.
  for (int64_t i = nvec * V + tid; i < n; i += stride) {
    float r = to_float(x[i]) + a * to_float(vc[i]);
    if (vu != nullptr) r += b * to_float(vu[i]);
    out[i] = from_float<T>(r);
  }
}

__device__ __forceinline__ float clamp_keep_nan(float r, float clip) {
  return r < -clip ? -clip : (r > clip ? clip : r);
}

template <typename T, int V, bool X0>
__global__ void _diffusion_step_kernel(const T* __restrict__ x, const T* __restrict__ eps,
                                       const T* __restrict__ noise, T* __restrict__ out,
                                       int64_t batch, int64_t n, const float* __restrict__ c1,
                                       const float* __restrict__ c2,
                                       const float* __restrict__ sigma,
                                       const float* __restrict__ p, const float* __restrict__ q,
                                       float clip) {
  const bool clamp = clip >= 0.f;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = n / V;  // n % V == 0 whenever V > 1
  using P = Pack<T, V>;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const float ca = c1[b], cb = -c1[b] * c2[b], cs = sigma[b];
    const float cp = X0 ? p[b] : 0.f, cq = X0 ? q[b] : 0.f;
    const int64_t base = b * nvec;  // in units of P
    for (int64_t i = tid; i < nvec; i += stride) {
      const P px = reinterpret_cast<const P*>(x)[base + i];
      const P pe = reinterpret_cast<const P*>(eps)[base + i];
      P pz = px;  // unused without noise
      if (noise != nullptr) pz = reinterpret_cast<const P*>(noise)[base + i];
      P po;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float xv = to_float(px.v[e]);
        float r = ca * xv + cb * to_float(pe.v[e]);
        if (X0) {
          if (clamp) r = clamp_keep_nan(r, clip);
          r = cp * r + cq * xv;
        }
        if (noise != nullptr) r += cs * to_float(pz.v[e]);
        if (!X0 && clamp) r = clamp_keep_nan(r, clip);
        po.v[e] = from_float<T>(r);
      }
      reinterpret_cast<P*>(out)[base + i] = po;
    }
  }
}

// Host-side launch helpers (raw pointers; the caller checks shapes and alignment).
template <typename T, int V>
inline void launch_flow_step(const T* x, const T* vc, const T* vu, T* out, int64_t n, float a,
                             float b, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t work = ceil_div<int64_t>(n / V > 0 ? n / V : n, kThreads);
  const unsigned blocks = static_cast<unsigned>(work < 65535 ? (work > 0 ? work : 1) : 65535);
  auto kernel = &_flow_step_kernel<T, V>;
  PYSONIC_LAUNCH(kernel, dim3(blocks), dim3(kThreads), stream, x, vc, vu, out, n, a, b);
}

template <typename T, int V, bool X0>
inline void launch_diffusion_step_impl(const T* x, const T* eps, const T* noise, T* out,
                                       int64_t batch, int64_t n, const float* c1, const float* c2,
                                       const float* sigma, const float* p, const float* q,
                                       float clip, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t work = ceil_div<int64_t>(n / V, kThreads);
  const unsigned gx = static_cast<unsigned>(work < 1024 ? (work > 0 ? work : 1) : 1024);
  const unsigned gy = static_cast<unsigned>(batch < 65535 ? batch : 65535);
  auto kernel = &_diffusion_step_kernel<T, V, X0>;
  PYSONIC_LAUNCH(kernel, dim3(gx, gy), dim3(kThreads), stream, x, eps, noise, out, batch, n, c1,
                 c2, sigma, p, q, clip);
}

template <typename T, int V>
inline void launch_diffusion_step(const T* x, const T* eps, const T* noise, T* out, int64_t batch,
                                  int64_t n, const float* c1, const float* c2, const float* sigma,
                                  float clip, cudaStream_t stream) {
  launch_diffusion_step_impl<T, V, false>(x, eps, noise, out, batch, n, c1, c2, sigma, nullptr,
                                          nullptr, clip, stream);
}

template <typename T, int V>
inline void launch_diffusion_step_x0(const T* x, const T* eps, const T* noise, T* out,
                                     int64_t batch, int64_t n, const float* c1, const float* c2,
                                     const float* p, const float* q, const float* sigma,
                                     float clip, cudaStream_t stream) {
  launch_diffusion_step_impl<T, V, true>(x, eps, noise, out, batch, n, c1, c2, sigma, p, q, clip,
                                         stream);
}

}  // namespace pysonic::cuda
