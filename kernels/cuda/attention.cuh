// Softmax attention (forward and backward), flash-attention-2 style, SIMT (no tensor cores).
//
// Shapes (contiguous): q, out, grad_out, dq [B, H, Tq, D] of T; k, v, dk, dv [B, Hkv, Tk, D] of
// T; lse, delta [B, H, Tq] float; key_lengths: int64 [B] or null. D <= DMAX (64 or 128).
// Query head h reads key/value head h / (H / Hkv) (grouped-query, like repeat_interleave).
// Key j is visible to query i iff j < clamp(key_lengths[b], 0, Tk) and, when causal,
// j <= i + Tk - Tq (bottom-right aligned). s_ij = scale * q_i . k_j (fp32).
//
// _attention_fwd_kernel<T, DMAX, RPW>
//   out_i = sum_j softmax_j(s_ij) v_j over visible j; lse_i = log sum_j exp(s_ij). A row that sees
//   no key gets out = 0, lse = -inf. Flat grid: block = (b * H + h) * ceil(Tq / BQ) + query tile,
//   BQ = 4 warps * RPW rows; warp w owns rows w * RPW .. w * RPW + RPW - 1 of the tile.
//   Keys come in tiles of 32 (lane = key) through shared memory: qs[BQ][DMAX] (pre-loaded, read
//   as broadcasts), ks[32][DMAX + 1] (pitch + 1: lane-per-row reads hit distinct banks),
//   vs[32][DMAX]. Per tile a lane computes the scores of its key for the warp's rows, the warp
//   does the online-softmax max/sum with shuffles, then every lane accumulates o[d] for
//   d = lane + 32 c, broadcasting p_j with __shfl_sync. Only the key tiles below the last key
//   any row of the block may see are visited.
//
// Backward (recomputes p_ij = exp(s_ij - lse_i), 0 when masked or lse_i = -inf):
//   _attention_bwd_delta_kernel: delta_i = sum_d grad_out_i[d] * out_i[d] (one warp per row).
//   _attention_bwd_dq_kernel<T, DMAX, RPW>: dq_i = scale * sum_j ds_ij k_j with
//     ds_ij = p_ij (grad_out_i . v_j - delta_i); same grid/tiling as the forward (vs pitch + 1).
//   _attention_bwd_dkv_kernel<T, DMAX, RPW>: for BK = 4 * RPW keys of (b, kv head) per block,
//     dv_j = sum_{h in group, i} p_ij grad_out_i, dk_j = scale * sum_{h, i} ds_ij q_i; queries in
//     tiles of 32 (lane = query). The block loops over the H / Hkv query heads of its kv head,
//     so grouped heads are summed in registers: no atomics, deterministic.
//   Static shared memory stays under 48 KB for DMAX = 128 (41 KB each).
#pragma once

#include "common.cuh"

namespace pysonic::cuda {

constexpr int kAttnWarps = 4;
constexpr int kAttnThreads = kAttnWarps * kWarp;
constexpr int kAttnTile = 32;  // keys (forward, dq) or queries (dkv) per shared-memory tile
constexpr int kAttnFwdRows = 4;  // rows per warp: forward
constexpr int kAttnBwdRows = 2;  // rows per warp: backward kernels

struct AttnShape {
  int64_t B, H, Hkv, Tq, Tk;
  int D;
  float scale;
  bool causal;
};

// Number of visible keys of batch item b (keys j < klen may be visible).
__device__ __forceinline__ int64_t attn_klen(const int64_t* key_lengths, int64_t b, int64_t Tk) {
  if (key_lengths == nullptr) return Tk;
  const int64_t n = key_lengths[b];
  return n < 0 ? 0 : (n > Tk ? Tk : n);
}

__device__ __forceinline__ bool attn_visible(int64_t i, int64_t j, int64_t klen, bool causal,
                                             int64_t offset) {
  return j < klen && (!causal || j <= i + offset);
}

// Loads rows [r0, r0 + rows) of a [n, D] matrix into dst[rows][PITCH] as float (zeros past n).
template <typename T, int PITCH>
__device__ __forceinline__ void attn_load_tile(float* dst, const T* src, int64_t r0, int rows,
                                               int64_t n, int D) {
  for (int idx = threadIdx.x; idx < rows * D; idx += blockDim.x) {
    const int rr = idx / D, d = idx - rr * D;
    const int64_t r = r0 + rr;
    dst[rr * PITCH + d] = r < n ? to_float(src[r * D + d]) : 0.f;
  }
}

template <typename T, int DMAX, int RPW>
__global__ void __launch_bounds__(kAttnThreads)
    _attention_fwd_kernel(const T* __restrict__ q, const T* __restrict__ k,
                          const T* __restrict__ v, T* __restrict__ out, float* __restrict__ lse,
                          const int64_t* __restrict__ key_lengths, AttnShape sh) {
  constexpr int BQ = kAttnWarps * RPW;
  constexpr int DC = DMAX / kWarp;
  __shared__ float qs[BQ][DMAX];
  __shared__ float ks[kAttnTile][DMAX + 1];
  __shared__ float vs[kAttnTile][DMAX];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int D = sh.D;
  const int64_t ntiles = ceil_div<int64_t>(sh.Tq, BQ);
  const int64_t bh = blockIdx.x / ntiles;
  const int64_t i0 = (static_cast<int64_t>(blockIdx.x) - bh * ntiles) * BQ;
  const int64_t b = bh / sh.H, h = bh - b * sh.H;
  const int64_t hk = h / (sh.H / sh.Hkv);
  const T* qb = q + bh * sh.Tq * D;
  const T* kb = k + (b * sh.Hkv + hk) * sh.Tk * D;
  const T* vb = v + (b * sh.Hkv + hk) * sh.Tk * D;
  const int64_t offset = sh.Tk - sh.Tq;
  const int64_t klen = attn_klen(key_lengths, b, sh.Tk);
  int64_t jend = klen;  // keys >= jend are invisible to every row of this block
  if (sh.causal) {
    const int64_t i_last = (i0 + BQ < sh.Tq ? i0 + BQ : sh.Tq) - 1;
    const int64_t lim = i_last + offset + 1;
    jend = lim < jend ? (lim > 0 ? lim : 0) : jend;
  }
  attn_load_tile<T, DMAX>(&qs[0][0], qb, i0, BQ, sh.Tq, D);

  float m[RPW], l[RPW], o[RPW][DC];
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
#pragma unroll
    for (int c = 0; c < DC; ++c) o[r][c] = 0.f;
  }
  const int rbase = warp * RPW;
  for (int64_t j0 = 0; j0 < jend; j0 += kAttnTile) {
    attn_load_tile<T, DMAX + 1>(&ks[0][0], kb, j0, kAttnTile, sh.Tk, D);
    attn_load_tile<T, DMAX>(&vs[0][0], vb, j0, kAttnTile, sh.Tk, D);
    __syncthreads();  // also publishes qs on the first tile
    const int64_t j = j0 + lane;
    float s[RPW];
#pragma unroll
    for (int r = 0; r < RPW; ++r) s[r] = 0.f;
    for (int d = 0; d < D; ++d) {
      const float kd = ks[lane][d];
#pragma unroll
      for (int r = 0; r < RPW; ++r) s[r] = fmaf(qs[rbase + r][d], kd, s[r]);
    }
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
      const int64_t i = i0 + rbase + r;
      const float sc = (i < sh.Tq && attn_visible(i, j, klen, sh.causal, offset)) ? s[r] * sh.scale
                                                                                   : -INFINITY;
      const float m_new = fmaxf(m[r], warp_max(sc));
      const float p = sc == -INFINITY ? 0.f : expf(sc - m_new);
      const float alpha = m[r] == -INFINITY ? 0.f : expf(m[r] - m_new);
      l[r] = l[r] * alpha + warp_sum(p);
#pragma unroll
      for (int c = 0; c < DC; ++c) o[r][c] *= alpha;
      m[r] = m_new;
      s[r] = p;
    }
    for (int jj = 0; jj < kAttnTile; ++jj) {
      float pj[RPW];
#pragma unroll
      for (int r = 0; r < RPW; ++r) pj[r] = __shfl_sync(kFullMask, s[r], jj);
#pragma unroll
      for (int c = 0; c < DC; ++c) {
        const int d = lane + kWarp * c;
        if (d < D) {
          const float vd = vs[jj][d];
#pragma unroll
          for (int r = 0; r < RPW; ++r) o[r][c] = fmaf(pj[r], vd, o[r][c]);
        }
      }
    }
    __syncthreads();  // before the next tile overwrites ks/vs
  }
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    const int64_t i = i0 + rbase + r;
    if (i >= sh.Tq) continue;
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
#pragma unroll
    for (int c = 0; c < DC; ++c) {
      const int d = lane + kWarp * c;
      if (d < D) out[(bh * sh.Tq + i) * D + d] = from_float<T>(o[r][c] * inv);
    }
    if (lane == 0) lse[bh * sh.Tq + i] = l[r] > 0.f ? m[r] + logf(l[r]) : -INFINITY;
  }
}

template <typename T>
__global__ void __launch_bounds__(kAttnThreads)
    _attention_bwd_delta_kernel(const T* __restrict__ grad_out, const T* __restrict__ out,
                                float* __restrict__ delta, int64_t rows, int D) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kAttnWarps + warp; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kAttnWarps) {
    float acc = 0.f;
    for (int d = lane; d < D; d += kWarp)
      acc = fmaf(to_float(grad_out[row * D + d]), to_float(out[row * D + d]), acc);
    acc = warp_sum(acc);
    if (lane == 0) delta[row] = acc;
  }
}

template <typename T, int DMAX, int RPW>
__global__ void __launch_bounds__(kAttnThreads)
    _attention_bwd_dq_kernel(const T* __restrict__ grad_out, const T* __restrict__ q,
                             const T* __restrict__ k, const T* __restrict__ v,
                             const float* __restrict__ lse, const float* __restrict__ delta,
                             T* __restrict__ dq, const int64_t* __restrict__ key_lengths,
                             AttnShape sh) {
  constexpr int BQ = kAttnWarps * RPW;
  constexpr int DC = DMAX / kWarp;
  __shared__ float qs[BQ][DMAX];
  __shared__ float dos[BQ][DMAX];
  __shared__ float ks[kAttnTile][DMAX + 1];
  __shared__ float vs[kAttnTile][DMAX + 1];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int D = sh.D;
  const int64_t ntiles = ceil_div<int64_t>(sh.Tq, BQ);
  const int64_t bh = blockIdx.x / ntiles;
  const int64_t i0 = (static_cast<int64_t>(blockIdx.x) - bh * ntiles) * BQ;
  const int64_t b = bh / sh.H, h = bh - b * sh.H;
  const int64_t hk = h / (sh.H / sh.Hkv);
  const T* kb = k + (b * sh.Hkv + hk) * sh.Tk * D;
  const T* vb = v + (b * sh.Hkv + hk) * sh.Tk * D;
  const int64_t offset = sh.Tk - sh.Tq;
  const int64_t klen = attn_klen(key_lengths, b, sh.Tk);
  int64_t jend = klen;
  if (sh.causal) {
    const int64_t i_last = (i0 + BQ < sh.Tq ? i0 + BQ : sh.Tq) - 1;
    const int64_t lim = i_last + offset + 1;
    jend = lim < jend ? (lim > 0 ? lim : 0) : jend;
  }
  attn_load_tile<T, DMAX>(&qs[0][0], q + bh * sh.Tq * D, i0, BQ, sh.Tq, D);
  attn_load_tile<T, DMAX>(&dos[0][0], grad_out + bh * sh.Tq * D, i0, BQ, sh.Tq, D);
  const int rbase = warp * RPW;
  float row_lse[RPW], row_delta[RPW], acc[RPW][DC];
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    const int64_t i = i0 + rbase + r;
    row_lse[r] = i < sh.Tq ? lse[bh * sh.Tq + i] : -INFINITY;
    row_delta[r] = i < sh.Tq ? delta[bh * sh.Tq + i] : 0.f;
#pragma unroll
    for (int c = 0; c < DC; ++c) acc[r][c] = 0.f;
  }
  for (int64_t j0 = 0; j0 < jend; j0 += kAttnTile) {
    attn_load_tile<T, DMAX + 1>(&ks[0][0], kb, j0, kAttnTile, sh.Tk, D);
    attn_load_tile<T, DMAX + 1>(&vs[0][0], vb, j0, kAttnTile, sh.Tk, D);
    __syncthreads();
    const int64_t j = j0 + lane;
    float s[RPW], dp[RPW];
#pragma unroll
    for (int r = 0; r < RPW; ++r) s[r] = dp[r] = 0.f;
    for (int d = 0; d < D; ++d) {
      const float kd = ks[lane][d], vd = vs[lane][d];
#pragma unroll
      for (int r = 0; r < RPW; ++r) {
        s[r] = fmaf(qs[rbase + r][d], kd, s[r]);
        dp[r] = fmaf(dos[rbase + r][d], vd, dp[r]);
      }
    }
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
      const int64_t i = i0 + rbase + r;
      const bool vis = i < sh.Tq && row_lse[r] != -INFINITY &&
                       attn_visible(i, j, klen, sh.causal, offset);
      const float p = vis ? expf(s[r] * sh.scale - row_lse[r]) : 0.f;
      s[r] = p * (dp[r] - row_delta[r]);  // ds_ij
    }
    for (int jj = 0; jj < kAttnTile; ++jj) {
      float dsj[RPW];
#pragma unroll
      for (int r = 0; r < RPW; ++r) dsj[r] = __shfl_sync(kFullMask, s[r], jj);
#pragma unroll
      for (int c = 0; c < DC; ++c) {
        const int d = lane + kWarp * c;
        if (d < D) {
          const float kd = ks[jj][d];
#pragma unroll
          for (int r = 0; r < RPW; ++r) acc[r][c] = fmaf(dsj[r], kd, acc[r][c]);
        }
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    const int64_t i = i0 + rbase + r;
    if (i >= sh.Tq) continue;
#pragma unroll
    for (int c = 0; c < DC; ++c) {
      const int d = lane + kWarp * c;
      if (d < D) dq[(bh * sh.Tq + i) * D + d] = from_float<T>(acc[r][c] * sh.scale);
    }
  }
}

template <typename T, int DMAX, int RPW>
__global__ void __launch_bounds__(kAttnThreads)
    _attention_bwd_dkv_kernel(const T* __restrict__ grad_out, const T* __restrict__ q,
                              const T* __restrict__ k, const T* __restrict__ v,
                              const float* __restrict__ lse, const float* __restrict__ delta,
                              T* __restrict__ dk, T* __restrict__ dv,
                              const int64_t* __restrict__ key_lengths, AttnShape sh) {
  constexpr int BK = kAttnWarps * RPW;
  constexpr int DC = DMAX / kWarp;
  __shared__ float ks[BK][DMAX];
  __shared__ float vs[BK][DMAX];
  __shared__ float qs[kAttnTile][DMAX + 1];
  __shared__ float dos[kAttnTile][DMAX + 1];
  __shared__ float lses[kAttnTile];
  __shared__ float deltas[kAttnTile];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int D = sh.D;
  const int64_t ntiles = ceil_div<int64_t>(sh.Tk, BK);
  const int64_t bhk = blockIdx.x / ntiles;  // b * Hkv + hk
  const int64_t j0 = (static_cast<int64_t>(blockIdx.x) - bhk * ntiles) * BK;
  const int64_t b = bhk / sh.Hkv, hk = bhk - b * sh.Hkv;
  const int64_t group = sh.H / sh.Hkv;
  const int64_t offset = sh.Tk - sh.Tq;
  const int64_t klen = attn_klen(key_lengths, b, sh.Tk);
  // Queries that may see key j0 (the smallest of the block): i >= j0 - offset when causal.
  int64_t istart = sh.causal ? (j0 - offset > 0 ? j0 - offset : 0) : 0;
  if (j0 >= klen) istart = sh.Tq;  // every key of the block is hidden
  attn_load_tile<T, DMAX>(&ks[0][0], k + bhk * sh.Tk * D, j0, BK, sh.Tk, D);
  attn_load_tile<T, DMAX>(&vs[0][0], v + bhk * sh.Tk * D, j0, BK, sh.Tk, D);
  const int rbase = warp * RPW;
  float dk_acc[RPW][DC], dv_acc[RPW][DC];
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
#pragma unroll
    for (int c = 0; c < DC; ++c) dk_acc[r][c] = dv_acc[r][c] = 0.f;
  }
  for (int64_t g = 0; g < group; ++g) {
    const int64_t bh = b * sh.H + hk * group + g;
    const T* qb = q + bh * sh.Tq * D;
    const T* dob = grad_out + bh * sh.Tq * D;
    for (int64_t q0 = istart; q0 < sh.Tq; q0 += kAttnTile) {
      attn_load_tile<T, DMAX + 1>(&qs[0][0], qb, q0, kAttnTile, sh.Tq, D);
      attn_load_tile<T, DMAX + 1>(&dos[0][0], dob, q0, kAttnTile, sh.Tq, D);
      for (int ii = threadIdx.x; ii < kAttnTile; ii += blockDim.x) {
        const int64_t i = q0 + ii;
        lses[ii] = i < sh.Tq ? lse[bh * sh.Tq + i] : -INFINITY;
        deltas[ii] = i < sh.Tq ? delta[bh * sh.Tq + i] : 0.f;
      }
      __syncthreads();  // also publishes ks/vs on the first tile
      const int64_t i = q0 + lane;
      float s[RPW], dp[RPW];
#pragma unroll
      for (int r = 0; r < RPW; ++r) s[r] = dp[r] = 0.f;
      for (int d = 0; d < D; ++d) {
        const float qd = qs[lane][d], dod = dos[lane][d];
#pragma unroll
        for (int r = 0; r < RPW; ++r) {
          s[r] = fmaf(ks[rbase + r][d], qd, s[r]);
          dp[r] = fmaf(vs[rbase + r][d], dod, dp[r]);
        }
      }
      const float li = lses[lane], di = deltas[lane];
      float p[RPW];
#pragma unroll
      for (int r = 0; r < RPW; ++r) {
        const int64_t j = j0 + rbase + r;
        const bool vis = i < sh.Tq && li != -INFINITY && attn_visible(i, j, klen, sh.causal, offset);
        p[r] = vis ? expf(s[r] * sh.scale - li) : 0.f;
        s[r] = p[r] * (dp[r] - di);  // ds_ij
      }
      for (int ii = 0; ii < kAttnTile; ++ii) {
        float pi[RPW], dsi[RPW];
#pragma unroll
        for (int r = 0; r < RPW; ++r) {
          pi[r] = __shfl_sync(kFullMask, p[r], ii);
          dsi[r] = __shfl_sync(kFullMask, s[r], ii);
        }
#pragma unroll
        for (int c = 0; c < DC; ++c) {
          const int d = lane + kWarp * c;
          if (d < D) {
            const float qd = qs[ii][d], dod = dos[ii][d];
#pragma unroll
            for (int r = 0; r < RPW; ++r) {
              dv_acc[r][c] = fmaf(pi[r], dod, dv_acc[r][c]);
              dk_acc[r][c] = fmaf(dsi[r], qd, dk_acc[r][c]);
            }
          }
        }
      }
      __syncthreads();
    }
  }
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    const int64_t j = j0 + rbase + r;
    if (j >= sh.Tk) continue;
#pragma unroll
    for (int c = 0; c < DC; ++c) {
      const int d = lane + kWarp * c;
      if (d < D) {
        dk[(bhk * sh.Tk + j) * D + d] = from_float<T>(dk_acc[r][c] * sh.scale);
        dv[(bhk * sh.Tk + j) * D + d] = from_float<T>(dv_acc[r][c]);
      }
    }
  }
}

// ---- host-side launch helpers; the caller checks shapes and that the grids are non-empty ----

template <typename T, int DMAX>
inline void launch_attention_fwd(const T* q, const T* k, const T* v, T* out, float* lse,
                                 const int64_t* key_lengths, const AttnShape& sh,
                                 cudaStream_t stream) {
  constexpr int BQ = kAttnWarps * kAttnFwdRows;
  const int64_t blocks = sh.B * sh.H * ceil_div<int64_t>(sh.Tq, BQ);
  auto kernel = &_attention_fwd_kernel<T, DMAX, kAttnFwdRows>;
  PYSONIC_LAUNCH(kernel, dim3(static_cast<unsigned>(blocks)), dim3(kAttnThreads), stream, q, k, v,
                 out, lse, key_lengths, sh);
}

// Blocks each attention launch needs (the launcher checks they fit a 1-D grid).
inline int64_t attention_fwd_blocks(const AttnShape& sh) {
  return sh.B * sh.H * ceil_div<int64_t>(sh.Tq, kAttnWarps * kAttnFwdRows);
}
inline int64_t attention_dq_blocks(const AttnShape& sh) {
  return sh.B * sh.H * ceil_div<int64_t>(sh.Tq, kAttnWarps * kAttnBwdRows);
}
inline int64_t attention_dkv_blocks(const AttnShape& sh) {
  return sh.B * sh.Hkv * ceil_div<int64_t>(sh.Tk, kAttnWarps * kAttnBwdRows);
}

template <typename T, int DMAX>
inline void launch_attention_bwd(const T* grad_out, const T* q, const T* k, const T* v,
                                 const T* out, const float* lse, float* delta, T* dq, T* dk, T* dv,
                                 const int64_t* key_lengths, const AttnShape& sh,
                                 cudaStream_t stream) {
  const int64_t rows = sh.B * sh.H * sh.Tq;
  if (rows > 0) {
    const int64_t blocks = ceil_div<int64_t>(rows, kAttnWarps);
    auto delta_kernel = &_attention_bwd_delta_kernel<T>;
    PYSONIC_LAUNCH(delta_kernel, dim3(static_cast<unsigned>(blocks < (1 << 20) ? blocks : (1 << 20))),
                   dim3(kAttnThreads), stream, grad_out, out, delta, rows, sh.D);
    auto dq_kernel = &_attention_bwd_dq_kernel<T, DMAX, kAttnBwdRows>;
    PYSONIC_LAUNCH(dq_kernel, dim3(static_cast<unsigned>(attention_dq_blocks(sh))),
                   dim3(kAttnThreads), stream, grad_out, q, k, v, lse, delta, dq, key_lengths, sh);
  }
  if (sh.B * sh.Hkv * sh.Tk > 0) {
    auto dkv_kernel = &_attention_bwd_dkv_kernel<T, DMAX, kAttnBwdRows>;
    PYSONIC_LAUNCH(dkv_kernel, dim3(static_cast<unsigned>(attention_dkv_blocks(sh))),
                   dim3(kAttnThreads), stream, grad_out, q, k, v, lse, delta, dk, dv, key_lengths,
                   sh);
  }
}

}  // namespace pysonic::cuda
