// CUDA launchers for the per-step sampler updates: flow_step, diffusion_step, diffusion_step_x0.
// Checks mirror csrc/cpu/steps.cpp; kernels live in kernels/cuda/steps.cuh.
#include "cuda/launch.h"
#include "steps.cuh"

#include <type_traits>

namespace pysonic::cuda {
namespace {

void check_like_x(const at::Tensor& x, const at::Tensor& other, const char* op, const char* name) {
  TORCH_CHECK(other.sizes() == x.sizes(), op, ": ", name, " must have the shape of x ", x.sizes(),
              ", got ", other.sizes());
  check_dtype(x, other, op, name, "x");
  check_same_device(x, other, op, name);
}

template <typename T>
constexpr int vec_width() {
  return static_cast<int>(16 / sizeof(T));
}

at::Tensor flow_step_cuda(const at::Tensor& x, const at::Tensor& v_cond,
                          const std::optional<at::Tensor>& v_uncond, double dt,
                          double guidance_scale) {
  constexpr const char* op = "flow_step";
  check_cuda(x, op, "x");
  TORCH_CHECK(x.is_floating_point(), "flow_step: x must be floating point, got ", x.scalar_type());
  check_like_x(x, v_cond, op, "v_cond");
  if (v_uncond) check_like_x(x, *v_uncond, op, "v_uncond");
  const c10::cuda::CUDAGuard guard(x.device());
  auto xc = x.contiguous(), vcc = v_cond.contiguous();
  at::Tensor vuc = v_uncond ? v_uncond->contiguous() : at::Tensor();
  auto out = at::empty(xc.sizes(), xc.options());
  const int64_t n = xc.numel();
  if (n == 0) return out;
  // x + dt * (vu + g * (vc - vu)) = x + (dt * g) * vc + (dt * (1 - g)) * vu
  const float a = static_cast<float>(v_uncond ? dt * guidance_scale : dt);
  const float b = static_cast<float>(dt * (1.0 - guidance_scale));
  dispatch_float(x.scalar_type(), op, "x", [&](auto tag) {
    using T = decltype(tag);
    const T* vu = vuc.defined() ? ptr<const T>(vuc) : nullptr;
    constexpr int V = vec_width<T>();
    const int64_t bytes = V * static_cast<int64_t>(sizeof(T));
    const bool vec = aligned(xc.data_ptr(), bytes) && aligned(vcc.data_ptr(), bytes) &&
                     aligned(out.data_ptr(), bytes) && (vu == nullptr || aligned(vu, bytes));
    if (vec) {
      launch_flow_step<T, V>(ptr<const T>(xc), ptr<const T>(vcc), vu, ptr<T>(out), n, a, b,
                             current_stream());
    } else {
      launch_flow_step<T, 1>(ptr<const T>(xc), ptr<const T>(vcc), vu, ptr<T>(out), n, a, b,
                             current_stream());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// A float scalar or [B] tensor on x's device -> contiguous float32 [B].
at::Tensor coefficient(const char* op, const at::Tensor& c, const at::Tensor& x, int64_t batch,
                       const char* name) {
  TORCH_CHECK(c.device() == x.device(), op, ": ", name, " must be on the device of x (",
              x.device(), "), got ", c.device());
  TORCH_CHECK(c.dim() <= 1 && (c.numel() == batch || c.numel() == 1), op, ": ", name,
              " must be a scalar or have shape [B] = [", batch, "], got ", c.sizes());
  TORCH_CHECK(c.is_floating_point(), op, ": ", name, " must be a float tensor, got ",
              c.scalar_type());
  return c.to(at::kFloat).reshape({-1}).expand({batch}).contiguous();
}

// Shared body of diffusion_step and diffusion_step_x0 (coef_x0/coef_x undefined for the former).
at::Tensor diffusion_step_impl(const char* op, bool x0_mode, const at::Tensor& x,
                               const at::Tensor& eps, const std::optional<at::Tensor>& noise,
                               const at::Tensor& c1, const at::Tensor& c2,
                               const at::Tensor& coef_x0, const at::Tensor& coef_x,
                               const at::Tensor& sigma, std::optional<double> clip) {
  check_cuda(x, op, "x");
  TORCH_CHECK(x.is_floating_point(), op, ": x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, op, ": x must have a batch dimension, got a scalar");
  check_like_x(x, eps, op, "eps");
  if (noise) check_like_x(x, *noise, op, "noise");
  TORCH_CHECK(!clip || *clip >= 0, op, ": clip must be >= 0, got ", clip.value_or(0.0));
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t batch = x.size(0);
  auto a = coefficient(op, c1, x, batch, "c1"), b = coefficient(op, c2, x, batch, "c2"),
       s = coefficient(op, sigma, x, batch, "sigma");
  at::Tensor p, q;
  if (x0_mode) {
    p = coefficient(op, coef_x0, x, batch, "coef_x0");
    q = coefficient(op, coef_x, x, batch, "coef_x");
  }
  auto xc = x.contiguous(), ec = eps.contiguous();
  at::Tensor nc = noise ? noise->contiguous() : at::Tensor();
  auto out = at::empty(xc.sizes(), xc.options());
  if (xc.numel() == 0) return out;
  const int64_t n = xc.numel() / batch;
  const float clip_value = clip ? static_cast<float>(*clip) : -1.f;
  dispatch_float(x.scalar_type(), op, "x", [&](auto tag) {
    using T = decltype(tag);
    const T* z = nc.defined() ? ptr<const T>(nc) : nullptr;
    const float* pp = x0_mode ? ptr<const float>(p) : nullptr;
    const float* qp = x0_mode ? ptr<const float>(q) : nullptr;
    constexpr int V = vec_width<T>();
    const int64_t bytes = V * static_cast<int64_t>(sizeof(T));
    const bool vec = n % V == 0 && aligned(xc.data_ptr(), bytes) && aligned(ec.data_ptr(), bytes) &&
                     aligned(out.data_ptr(), bytes) && (z == nullptr || aligned(z, bytes));
    auto launch = [&](auto width) {
      constexpr int W = decltype(width)::value;
      if (x0_mode) {
        launch_diffusion_step_x0<T, W>(ptr<const T>(xc), ptr<const T>(ec), z, ptr<T>(out), batch,
                                       n, ptr<const float>(a), ptr<const float>(b), pp, qp,
                                       ptr<const float>(s), clip_value, current_stream());
      } else {
        launch_diffusion_step<T, W>(ptr<const T>(xc), ptr<const T>(ec), z, ptr<T>(out), batch, n,
                                    ptr<const float>(a), ptr<const float>(b), ptr<const float>(s),
                                    clip_value, current_stream());
      }
    };
    if (vec) {
      launch(std::integral_constant<int, V>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor diffusion_step_cuda(const at::Tensor& x, const at::Tensor& eps,
                               const std::optional<at::Tensor>& noise, const at::Tensor& c1,
                               const at::Tensor& c2, const at::Tensor& sigma,
                               std::optional<double> clip) {
  return diffusion_step_impl("diffusion_step", false, x, eps, noise, c1, c2, at::Tensor(),
                             at::Tensor(), sigma, clip);
}

at::Tensor diffusion_step_x0_cuda(const at::Tensor& x, const at::Tensor& eps,
                                  const std::optional<at::Tensor>& noise, const at::Tensor& c1,
                                  const at::Tensor& c2, const at::Tensor& coef_x0,
                                  const at::Tensor& coef_x, const at::Tensor& sigma,
                                  std::optional<double> clip) {
  return diffusion_step_impl("diffusion_step_x0", true, x, eps, noise, c1, c2, coef_x0, coef_x,
                             sigma, clip);
}

}  // namespace

TORCH_LIBRARY_IMPL(pysonic, CUDA, m) {
  m.impl("flow_step", &flow_step_cuda);
  m.impl("diffusion_step", &diffusion_step_cuda);
  m.impl("diffusion_step_x0", &diffusion_step_x0_cuda);
}

}  // namespace pysonic::cuda
