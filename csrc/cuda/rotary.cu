// CUDA launcher for rotary (kernels/cuda/rotary.cuh). The backward is this op with -sin.
#include "cuda/launch.h"
#include "rotary.cuh"

namespace pysonic::cuda {
namespace {

at::Tensor rotary_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                       bool interleaved) {
  constexpr const char* op = "rotary";
  check_cuda(x, op, "x");
  check_same_device(x, cos, op, "cos");
  check_same_device(x, sin, op, "sin");
  check_dim(x, 4, op, "x", "[B, H, T, D]");
  check_dim(cos, 2, op, "cos", "[T, R/2]");
  TORCH_CHECK(sin.sizes() == cos.sizes(), "rotary: sin must have the shape of cos ", cos.sizes(),
              ", got ", sin.sizes());
  check_dtype(cos, sin, op, "sin", "cos");
  const int64_t tlen = x.size(2), D = x.size(3), half = cos.size(1);
  TORCH_CHECK(cos.size(0) == tlen, "rotary: cos must have T = ", tlen, " rows (x is ", x.sizes(),
              "), got ", cos.sizes());
  TORCH_CHECK(2 * half <= D, "rotary: cos/sin rotate R = 2 * ", half, " = ", 2 * half,
              " channels but x has only D = ", D);
  TORCH_CHECK(cos.scalar_type() == at::kFloat || cos.scalar_type() == x.scalar_type(),
              "rotary: cos/sin must be float32 or the dtype of x (", x.scalar_type(), "), got ",
              cos.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  auto xc = x.contiguous(), cc = cos.contiguous(), sc = sin.contiguous();
  auto out = at::empty(xc.sizes(), xc.options());
  if (xc.numel() == 0) return out;
  const int64_t rows = xc.numel() / D;
  dispatch_float(x.scalar_type(), op, "x", [&](auto tag) {
    using T = decltype(tag);
    if (cc.scalar_type() == at::kFloat) {
      launch_rotary<T, float>(ptr<const T>(xc), ptr<const float>(cc), ptr<const float>(sc),
                              ptr<T>(out), rows, tlen, D, half, interleaved, current_stream());
    } else {
      launch_rotary<T, T>(ptr<const T>(xc), ptr<const T>(cc), ptr<const T>(sc), ptr<T>(out), rows,
                          tlen, D, half, interleaved, current_stream());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pysonic, CUDA, m) { m.impl("rotary", &rotary_cuda); }

}  // namespace pysonic::cuda
