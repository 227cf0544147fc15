// CPU kernels for the per-step sampler updates: flow_step and diffusion_step.
// Both are memory bound: one fused pass reads each input once and writes the output once,
// arithmetic in fp32 for every dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/vec_utils.h"

namespace pysonic::cpu {
namespace {

constexpr int64_t kGrain = 1 << 14;  // elements per parallel chunk (a multiple of kPair)

void check_same(const at::Tensor& x, const at::Tensor& other, const char* name) {
  TORCH_CHECK(other.sizes() == x.sizes(), name, " must have the shape of x ", x.sizes(), ", got ",
              other.sizes());
  TORCH_CHECK(other.scalar_type() == x.scalar_type(), name, " must have the dtype of x (",
              x.scalar_type(), "), got ", other.scalar_type());
  TORCH_CHECK(other.device() == x.device(), name, " must be on the device of x (", x.device(),
              "), got ", other.device());
}

// out[i] = x[i] + a * vc[i] + b * vu[i]  (vu may be null: b unused)
template <typename T>
void flow_step_kernel(const T* x, const T* vc, const T* vu, T* out, int64_t n, float a, float b) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    const Vec va(a), vb(b);
    int64_t i = begin;
    for (; i + kPair <= end; i += kPair) {
      Vec x0, x1, c0, c1;
      load_pair(x + i, x0, x1);
      load_pair(vc + i, c0, c1);
      x0 = at::vec::fmadd(va, c0, x0);
      x1 = at::vec::fmadd(va, c1, x1);
      if (vu != nullptr) {
        Vec u0, u1;
        load_pair(vu + i, u0, u1);
        x0 = at::vec::fmadd(vb, u0, x0);
        x1 = at::vec::fmadd(vb, u1, x1);
      }
      store_pair(out + i, x0, x1);
    }
    for (; i < end; ++i) {
      float r = static_cast<float>(x[i]) + a * static_cast<float>(vc[i]);
      if (vu != nullptr) r += b * static_cast<float>(vu[i]);
      out[i] = static_cast<T>(r);
    }
  });
}

at::Tensor flow_step_cpu(const at::Tensor& x, const at::Tensor& v_cond,
                         const std::optional<at::Tensor>& v_uncond, double dt,
                         double guidance_scale) {
  TORCH_CHECK(x.is_floating_point(), "flow_step: x must be floating point, got ", x.scalar_type());
  check_same(x, v_cond, "flow_step: v_cond");
  if (v_uncond) check_same(x, *v_uncond, "flow_step: v_uncond");
  auto xc = x.contiguous(), vcc = v_cond.contiguous();
  at::Tensor vuc = v_uncond ? v_uncond->contiguous() : at::Tensor();
  auto out = at::empty_like(xc);
  // x + dt * (vu + g * (vc - vu)) = x + (dt * g) * vc + (dt * (1 - g)) * vu
  const float a = static_cast<float>(v_uncond ? dt * guidance_scale : dt);
  const float b = static_cast<float>(dt * (1.0 - guidance_scale));
  dispatch_floating(x.scalar_type(), "flow_step", [&](auto tag) {
    using scalar_t = decltype(tag);
    flow_step_kernel<scalar_t>(xc.data_ptr<scalar_t>(), vcc.data_ptr<scalar_t>(),
                               vuc.defined() ? vuc.data_ptr<scalar_t>() : nullptr,
                               out.data_ptr<scalar_t>(), xc.numel(), a, b);
  });
  return out;
}

// Per batch item b over its n elements: out = c1 * x - (c1 * c2) * eps + sigma * noise,
// clamped to [-clip, clip] when clip > 0.
template <typename T>
void diffusion_step_kernel(const T* x, const T* eps, const T* noise, T* out, int64_t batch,
                           int64_t n, const float* c1, const float* c2, const float* sigma,
                           float clip) {
  const bool clamp = clip >= 0.f;
  at::parallel_for(0, batch * n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t start = begin; start < end;) {
      const int64_t b = start / n;
      const int64_t stop = std::min(end, (b + 1) * n);
      const float ca = c1[b], cb = -c1[b] * c2[b], cs = sigma[b];
      const Vec va(ca), vb(cb), vs(cs), lo(-clip), hi(clip);
      int64_t i = start;
      for (; i + kPair <= stop; i += kPair) {
        Vec x0, x1, e0, e1;
        load_pair(x + i, x0, x1);
        load_pair(eps + i, e0, e1);
        Vec r0 = at::vec::fmadd(vb, e0, x0 * va);
        Vec r1 = at::vec::fmadd(vb, e1, x1 * va);
        if (noise != nullptr) {
          Vec z0, z1;
          load_pair(noise + i, z0, z1);
          r0 = at::vec::fmadd(vs, z0, r0);
          r1 = at::vec::fmadd(vs, z1, r1);
        }
        if (clamp) {
          r0 = at::vec::clamp(r0, lo, hi);
          r1 = at::vec::clamp(r1, lo, hi);
        }
        store_pair(out + i, r0, r1);
      }
      for (; i < stop; ++i) {
        float r = ca * static_cast<float>(x[i]) + cb * static_cast<float>(eps[i]);
        if (noise != nullptr) r += cs * static_cast<float>(noise[i]);
        if (clamp) r = std::min(std::max(r, -clip), clip);
        out[i] = static_cast<T>(r);
      }
      start = stop;
    }
  });
}

at::Tensor coefficient(const at::Tensor& c, int64_t batch, const char* name) {
  TORCH_CHECK(c.device().is_cpu(), "diffusion_step: ", name, " must be on the CPU like x, got ",
              c.device());
  TORCH_CHECK(c.dim() <= 1 && (c.numel() == batch || c.numel() == 1), "diffusion_step: ", name,
              " must be a scalar or have shape [B] = [", batch, "], got ", c.sizes());
  return c.to(at::kFloat).expand({batch}).contiguous();
}

at::Tensor diffusion_step_cpu(const at::Tensor& x, const at::Tensor& eps,
                              const std::optional<at::Tensor>& noise, const at::Tensor& c1,
                              const at::Tensor& c2, const at::Tensor& sigma,
                              std::optional<double> clip) {
  TORCH_CHECK(x.is_floating_point(), "diffusion_step: x must be floating point, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, "diffusion_step: x must have a batch dimension, got a scalar");
  check_same(x, eps, "diffusion_step: eps");
  if (noise) check_same(x, *noise, "diffusion_step: noise");
  TORCH_CHECK(!clip || *clip >= 0, "diffusion_step: clip must be >= 0, got ", *clip);
  const int64_t batch = x.size(0);
  auto a = coefficient(c1, batch, "c1"), b = coefficient(c2, batch, "c2"),
       s = coefficient(sigma, batch, "sigma");
  auto xc = x.contiguous(), ec = eps.contiguous();
  at::Tensor nc = noise ? noise->contiguous() : at::Tensor();
  auto out = at::empty_like(xc);
  if (xc.numel() == 0) return out;
  const int64_t n = xc.numel() / batch;
  dispatch_floating(x.scalar_type(), "diffusion_step", [&](auto tag) {
    using scalar_t = decltype(tag);
    diffusion_step_kernel<scalar_t>(xc.data_ptr<scalar_t>(), ec.data_ptr<scalar_t>(),
                                    nc.defined() ? nc.data_ptr<scalar_t>() : nullptr,
                                    out.data_ptr<scalar_t>(), batch, n, a.data_ptr<float>(),
                                    b.data_ptr<float>(), s.data_ptr<float>(),
                                    clip ? static_cast<float>(*clip) : -1.f);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pysonic, CPU, m) {
  m.impl("flow_step", &flow_step_cpu);
  m.impl("diffusion_step", &diffusion_step_cpu);
}

}  // namespace pysonic::cpu
