// A tiny CUDA emulator for testing kernels/cuda/*.cuh on a machine without a GPU.
//
// Force-included (g++ -include emu.h -DPYSONIC_CUDA_EMULATE) before the kernel headers. Each
// kernel launch runs its blocks one after another; the threads of a block run as real
// std::threads, so __syncthreads is a std::barrier over the block and the warp shuffles
// exchange values through per-warp slots guarded by a barrier over the warp's 32 threads. Since
// blocks never overlap, `__shared__` can be `static` (one array per kernel instantiation, shared
// by the block's threads). A full-mask shuffle reached by only part of a warp deadlocks here,
// which is undefined behaviour on a GPU as well.
//
// Only what the pysonic kernels use is provided. Host-side conversions of __nv_bfloat16 and
// __half come from CUDA's own headers (they are __host__ __device__).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __launch_bounds__(...)

namespace pysonic_emu {

struct Block {
  std::barrier<>* block_barrier;
  std::vector<std::unique_ptr<std::barrier<>>>* warp_barriers;
  std::vector<float>* warp_slots;  // 32 floats per warp
  std::vector<unsigned char>* dynamic_smem;
};

inline thread_local uint3 tl_threadIdx, tl_blockIdx;
inline thread_local dim3 tl_blockDim, tl_gridDim;
inline thread_local Block tl_block;
inline std::mutex atomic_mutex;

inline unsigned linear_tid() {
  return tl_threadIdx.x + tl_blockDim.x * (tl_threadIdx.y + tl_blockDim.y * tl_threadIdx.z);
}

inline void syncthreads() { tl_block.block_barrier->arrive_and_wait(); }

inline float shfl(float v, unsigned src_lane) {
  const unsigned tid = linear_tid(), warp = tid / 32, lane = tid % 32;
  float* slots = tl_block.warp_slots->data() + warp * 32;
  auto& bar = *(*tl_block.warp_barriers)[warp];
  slots[lane] = v;
  bar.arrive_and_wait();
  const float r = slots[src_lane % 32];
  bar.arrive_and_wait();
  return r;
}

inline void* dynamic_smem() { return tl_block.dynamic_smem->data(); }

// Runs fn on every thread of every block of the grid.
inline void launch(dim3 grid, dim3 block, size_t smem, const std::function<void()>& fn) {
  const unsigned nthreads = block.x * block.y * block.z;
  if (nthreads == 0 || nthreads > 1024 || nthreads % 32 != 0) throw std::runtime_error("emu: bad block size");
  if (grid.y > 65535 || grid.z > 65535) throw std::runtime_error("emu: grid.y/z > 65535");
  if (smem > 48 * 1024) throw std::runtime_error("emu: dynamic shared memory > 48 KB");
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::barrier<> block_barrier(nthreads);
        std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
        for (unsigned w = 0; w < nthreads / 32; ++w) warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
        std::vector<float> slots(nthreads);
        std::vector<unsigned char> dyn(smem + 16);
        // Poison dynamic shared memory: a kernel must not read what it did not write.
        for (size_t i = 0; i < dyn.size(); ++i) dyn[i] = 0xff;  // 0xffffffff is a NaN float
        Block b{&block_barrier, &warp_barriers, &slots, &dyn};
        std::vector<std::thread> threads;
        threads.reserve(nthreads);
        for (unsigned tz = 0; tz < block.z; ++tz)
          for (unsigned ty = 0; ty < block.y; ++ty)
            for (unsigned tx = 0; tx < block.x; ++tx)
              threads.emplace_back([=, &fn] {
                tl_threadIdx = uint3{tx, ty, tz};
                tl_blockIdx = uint3{bx, by, bz};
                tl_blockDim = block;
                tl_gridDim = grid;
                tl_block = b;
                fn();
              });
        for (auto& t : threads) t.join();
      }
}

}  // namespace pysonic_emu

#define threadIdx (::pysonic_emu::tl_threadIdx)
#define blockIdx (::pysonic_emu::tl_blockIdx)
#define blockDim (::pysonic_emu::tl_blockDim)
#define gridDim (::pysonic_emu::tl_gridDim)

inline void __syncthreads() { pysonic_emu::syncthreads(); }
inline float __shfl_sync(unsigned, float v, int src) { return pysonic_emu::shfl(v, static_cast<unsigned>(src)); }
inline float __shfl_xor_sync(unsigned, float v, int mask) {
  const unsigned lane = pysonic_emu::linear_tid() % 32;
  return pysonic_emu::shfl(v, lane ^ static_cast<unsigned>(mask));
}
inline unsigned long long atomicCAS(unsigned long long* p, unsigned long long cmp, unsigned long long val) {
  std::lock_guard<std::mutex> lock(pysonic_emu::atomic_mutex);
  const unsigned long long old = *p;
  if (old == cmp) *p = val;
  return old;
}
using std::isnan;

#define PYSONIC_LAUNCH_SMEM(kernel, grid, block, smem, stream, ...) \
  ::pysonic_emu::launch((grid), (block), (smem), [&] { (kernel)(__VA_ARGS__); })
#define PYSONIC_LAUNCH(kernel, grid, block, stream, ...) \
  PYSONIC_LAUNCH_SMEM(kernel, grid, block, 0, stream, __VA_ARGS__)
#define PYSONIC_DYNAMIC_SMEM(type, name) type* name = static_cast<type*>(::pysonic_emu::dynamic_smem())
