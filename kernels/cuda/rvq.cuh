// Residual vector quantisation: encode (nearest code per level) and decode (sum of codes).
//
// _rvq_encode_kernel<T>
//   x: contiguous [rows, D] of T; books: contiguous float [L, K, D] (the launcher converts);
//   codes: contiguous int64 [rows, n_q], n_q <= L, K >= 1.
//   One warp per row (grid-stride over rows, kEncodeWarps warps per block). The fp32 residual
//   of the row lives in dynamic shared memory, kEncodeWarps * D floats per block; lane l owns
//   the elements d = l, l + 32, ... so no synchronisation is needed between lanes. For each
//   level: dist[k] = sum_d (r[d] - books[level, k, d])^2 (exact differences, like the
//   reference), argmin with ties (and a first NaN, as torch.argmin) to the lowest index, then
//   r -= books[level, best].
//
// _rvq_decode_kernel<C, I>
//   codes: contiguous [rows, n_q] of I (int32 or int64); books: contiguous [L, K, D] of C;
//   out: contiguous [rows, D] of C. out[row, d] = sum_{l < n_q} books[l, codes[row, l], d],
//   accumulated in fp32 in level order (bit-identical to the reference's fp32 sum).
//   A code outside [0, K) is never read: it adds nothing, and the first one found is recorded in
//   err (unsigned long long [4], zeroed by the caller): err[0] = 1, err[1] = the code (as a
//   two's-complement int64), err[2] = its level, err[3] = its row. Blocks stride over rows,
//   threads over d.
#pragma once

#include "common.cuh"

namespace pysonic::cuda {

constexpr int kEncodeWarps = 4;  // warps per block for the encoder when D is small enough

__device__ __forceinline__ void argmin_update(float dist, int64_t k, float& best, int64_t& best_k) {
  if (dist < best || (isnan(dist) && !isnan(best))) {
    best = dist;
    best_k = k;
  }
}

template <typename T>
__global__ void _rvq_encode_kernel(const T* __restrict__ x, const float* __restrict__ books,
                                   int64_t* __restrict__ codes, int64_t rows, int64_t K,
                                   int64_t D, int64_t n_q) {
  PYSONIC_DYNAMIC_SMEM(float, residual_smem);
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;
  float* r = residual_smem + static_cast<int64_t>(warp) * D;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * warps + warp; row < rows;
       row += static_cast<int64_t>(gridDim.x) * warps) {
    for (int64_t d = lane; d < D; d += kWarp) r[d] = to_float(x[row * D + d]);
    for (int64_t level = 0; level < n_q; ++level) {
      const float* book = books + level * K * D;
      float best = INFINITY;
      int64_t best_k = 0;
      int64_t k = 0;
      for (; k + 4 <= K; k += 4) {  // four codes at a time for independent shuffle chains
        const float* c = book + k * D;
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
        for (int64_t d = lane; d < D; d += kWarp) {
          const float rd = r[d];
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            const float diff = rd - c[u * D + d];
            acc[u] = fmaf(diff, diff, acc[u]);
          }
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) acc[u] = warp_sum(acc[u]);
#pragma unroll
        for (int u = 0; u < 4; ++u) argmin_update(acc[u], k + u, best, best_k);
      }
      for (; k < K; ++k) {
        const float* c = book + k * D;
        float acc = 0.f;
        for (int64_t d = lane; d < D; d += kWarp) {
          const float diff = r[d] - c[d];
          acc = fmaf(diff, diff, acc);
        }
        argmin_update(warp_sum(acc), k, best, best_k);
      }
      if (lane == 0) codes[row * n_q + level] = best_k;
      const float* chosen = book + best_k * D;
      for (int64_t d = lane; d < D; d += kWarp) r[d] -= chosen[d];
    }
  }
}

template <typename C, typename I>
__global__ void _rvq_decode_kernel(const I* __restrict__ codes, const C* __restrict__ books,
                                   C* __restrict__ out, int64_t rows, int64_t n_q, int64_t K,
                                   int64_t D, unsigned long long* __restrict__ err) {
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const I* rc = codes + row * n_q;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      float acc = 0.f;
      for (int64_t level = 0; level < n_q; ++level) {
        const int64_t code = static_cast<int64_t>(rc[level]);
        if (code < 0 || code >= K) {
          if (atomicCAS(err, 0ull, 1ull) == 0ull) {
            err[1] = static_cast<unsigned long long>(code);
            err[2] = static_cast<unsigned long long>(level);
            err[3] = static_cast<unsigned long long>(row);
          }
          continue;
        }
        acc += to_float(books[(level * K + code) * D + d]);
      }
      out[row * D + d] = from_float<C>(acc);
    }
  }
}

// Dynamic shared memory of the encoder for `warps` warps (bytes).
inline int64_t rvq_encode_smem(int warps, int64_t D) { return warps * D * static_cast<int64_t>(sizeof(float)); }

template <typename T>
inline void launch_rvq_encode(const T* x, const float* books, int64_t* codes, int64_t rows,
                              int64_t K, int64_t D, int64_t n_q, int warps, cudaStream_t stream) {
  const int64_t blocks = ceil_div<int64_t>(rows, warps);
  const unsigned grid = static_cast<unsigned>(blocks < (1 << 20) ? blocks : (1 << 20));
  auto kernel = &_rvq_encode_kernel<T>;
  PYSONIC_LAUNCH_SMEM(kernel, dim3(grid), dim3(warps * kWarp),
                      static_cast<size_t>(rvq_encode_smem(warps, D)), stream, x, books, codes,
                      rows, K, D, n_q);
}

template <typename C, typename I>
inline void launch_rvq_decode(const I* codes, const C* books, C* out, int64_t rows, int64_t n_q,
                              int64_t K, int64_t D, unsigned long long* err, cudaStream_t stream) {
  const int threads = D >= 128 ? 128 : (D > 32 ? 64 : 32);
  const unsigned grid = static_cast<unsigned>(rows < (1 << 20) ? rows : (1 << 20));
  auto kernel = &_rvq_decode_kernel<C, I>;
  PYSONIC_LAUNCH(kernel, dim3(grid), dim3(threads), stream, codes, books, out, rows, n_q, K, D, err);
}

}  // namespace pysonic::cuda
