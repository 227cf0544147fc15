// CUDA launcher for elu_out (kernel in kernels/cuda/elu.cuh). Checks mirror csrc/cpu/elu.cpp.
#include "cuda/launch.h"
#include "elu.cuh"

namespace pysonic::cuda {
namespace {

void elu_out_cuda(const at::Tensor& x, double alpha, const at::Tensor& out) {
  constexpr const char* op = "elu_out";
  check_cuda(x, op, "x");
  check_same_device(x, out, op, "out");
  check_dtype(x, out, op, "out", "x");
  bool same_layout = out.sizes() == x.sizes();
  for (int64_t d = 0; same_layout && d < x.dim(); ++d)
    same_layout = x.size(d) <= 1 || x.stride(d) == out.stride(d);  // size-1 dims are never stepped
  TORCH_CHECK(same_layout, op, ": out must have the shape and strides of x, got ", out.sizes(), " / ",
              out.strides(), " vs ", x.sizes(), " / ", x.strides());
  TORCH_CHECK(x.is_non_overlapping_and_dense(), op, ": x must be dense (no gaps or overlaps), got strides ",
              x.strides());
  const int64_t n = x.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  dispatch_float(x.scalar_type(), op, "x", [&](auto tag) {
    using T = decltype(tag);
    launch_elu<T>(ptr<const T>(x), ptr<T>(out), n, static_cast<float>(alpha), current_stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(pysonic, CUDA, m) { m.impl("elu_out", &elu_out_cuda); }

}  // namespace pysonic::cuda
