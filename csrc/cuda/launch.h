// Host-side helpers shared by the CUDA launchers in csrc/cuda/*.cu: dtype dispatch to CUDA's
// element types, device checks, the current stream. Only the light c10/cuda headers are used
// (ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers that a bare toolkit may lack);
// c10::cuda::getCurrentCUDAStream is the function at::cuda::getCurrentCUDAStream names.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cstdint>

namespace pysonic::cuda {

// Calls f(T{}) with T = float, __nv_bfloat16 or __half for a float32/bfloat16/float16 tensor;
// anything else is an error naming the op and the argument.
template <typename F>
void dispatch_float(at::ScalarType t, const char* op, const char* name, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    case at::kHalf: f(__half{}); break;
    default:
      TORCH_CHECK(false, op, ": ", name, " has unsupported dtype ", t,
                  " (expected float32, bfloat16 or float16)");
  }
}

// The data of a contiguous tensor as T (at::BFloat16/at::Half share CUDA's 16-bit layouts).
template <typename T>
T* ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

inline void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
}

inline void check_same_device(const at::Tensor& ref, const at::Tensor& t, const char* op,
                              const char* name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on ", ref.device(),
              ", got ", t.device());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name,
                      const char* shape) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

inline void check_dtype(const at::Tensor& ref, const at::Tensor& t, const char* op,
                        const char* name, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the dtype of ",
              ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
}

inline bool aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % static_cast<std::uintptr_t>(bytes) == 0;
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

}  // namespace pysonic::cuda
