// A tiny CUDA emulator for testing kernels/cuda/*.cuh on a machine without a GPU.
//
// Force-included (g++ -include emu.h -DPYSONIC_CUDA_EMULATE) before the kernel headers. Each
// kernel launch runs its blocks one after another; the threads of a block are fibers
// (ucontext) on the calling OS thread, switched round-robin whenever one waits: __syncthreads
// is a barrier over the block, a warp shuffle writes to per-warp slots and waits on a barrier
// over the warp's 32 threads. Since blocks never overlap, `__shared__` can be `static` (one array
// per kernel instantiation, shared by the block's threads). A barrier that can never complete
// (e.g. a full-mask shuffle reached by only part of a warp, undefined behaviour on a GPU too)
// throws instead of hanging.
//
// Only what the pysonic kernels use is provided. Host-side conversions of __nv_bfloat16 and
// __half come from CUDA's own headers (they are __host__ __device__).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <stdexcept>
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

struct Barrier {
  unsigned expected = 0, arrived = 0;
  unsigned long generation = 0;
};

struct Fiber {
  ucontext_t ctx;
  std::vector<unsigned char> stack;
  uint3 tid;
  bool done = false;
};

// The state of the running launch (one at a time, single OS thread).
inline uint3 tl_threadIdx, tl_blockIdx;
inline dim3 tl_blockDim, tl_gridDim;
inline std::vector<Fiber>* fibers = nullptr;
inline unsigned current = 0;
inline ucontext_t scheduler;
inline Barrier block_barrier;
inline std::vector<Barrier> warp_barriers;
inline std::vector<float> warp_slots;  // 32 floats per warp
inline std::vector<unsigned char> dyn_smem;
inline const std::function<void()>* kernel_body = nullptr;
inline unsigned long progress = 0;  // barrier arrivals + finished threads

inline unsigned linear_tid() {
  return tl_threadIdx.x + tl_blockDim.x * (tl_threadIdx.y + tl_blockDim.y * tl_threadIdx.z);
}

inline void yield() { swapcontext(&(*fibers)[current].ctx, &scheduler); }

inline void wait(Barrier& b) {
  ++progress;
  if (++b.arrived == b.expected) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  const unsigned long gen = b.generation;
  while (b.generation == gen) yield();
}

inline void syncthreads() { wait(block_barrier); }

inline float shfl(float v, unsigned src_lane) {
  const unsigned tid = linear_tid(), warp = tid / 32, lane = tid % 32;
  float* slots = warp_slots.data() + warp * 32;
  slots[lane] = v;
  wait(warp_barriers[warp]);
  const float r = slots[src_lane % 32];
  wait(warp_barriers[warp]);
  return r;
}

inline void* dynamic_smem() { return dyn_smem.data(); }

inline void fiber_main() {
  (*kernel_body)();
  (*fibers)[current].done = true;  // returns to `scheduler` through uc_link
}

// Runs fn on every thread of every block of the grid.
inline void launch(dim3 grid, dim3 block, size_t smem, const std::function<void()>& fn) {
  const unsigned nthreads = block.x * block.y * block.z;
  if (nthreads == 0 || nthreads > 1024 || nthreads % 32 != 0) throw std::runtime_error("emu: bad block size");
  if (grid.y > 65535 || grid.z > 65535) throw std::runtime_error("emu: grid.y/z > 65535");
  if (smem > 48 * 1024) throw std::runtime_error("emu: dynamic shared memory > 48 KB");
  std::vector<Fiber> fs(nthreads);
  fibers = &fs;
  kernel_body = &fn;
  tl_blockDim = block;
  tl_gridDim = grid;
  for (unsigned i = 0; i < nthreads; ++i) {
    fs[i].stack.resize(256 * 1024);
    fs[i].tid = uint3{i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
  }
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        tl_blockIdx = uint3{bx, by, bz};
        block_barrier = Barrier{nthreads, 0, 0};
        warp_barriers.assign(nthreads / 32, Barrier{32, 0, 0});
        warp_slots.assign(nthreads, 0.f);
        dyn_smem.assign(smem + 16, 0xff);  // poisoned: 0xffffffff is a NaN float
        for (auto& f : fs) {
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.data();
          f.ctx.uc_stack.ss_size = f.stack.size();
          f.ctx.uc_link = &scheduler;
          makecontext(&f.ctx, fiber_main, 0);
          f.done = false;
        }
        unsigned remaining = nthreads;
        while (remaining > 0) {
          const unsigned long before = progress;
          for (unsigned i = 0; i < nthreads; ++i) {
            if (fs[i].done) continue;
            current = i;
            tl_threadIdx = fs[i].tid;
            swapcontext(&scheduler, &fs[i].ctx);
            if (fs[i].done) {
              --remaining;
              ++progress;
            }
          }
          if (remaining > 0 && progress == before)
            throw std::runtime_error("emu: deadlock (a barrier some threads never reach)");
        }
      }
  fibers = nullptr;
  kernel_body = nullptr;
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
