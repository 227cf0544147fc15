// CPU kernels for the per-step sampler updates: flow_step and diffusion_step.
// Both are memory bound: one fused pass reads each input once and writes the output once,
// arithmetic in fp32 for every dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string>

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

// Per-item coefficients of both diffusion updates, float32 [batch] each (x0/x unused by the
// plain step).
struct StepCoefs {
  const float* c1;
  const float* c2;
  const float* sigma;
  const float* coef_x0;
  const float* coef_x;
};

// Per batch item b over its n elements, with e = eps and z = noise:
//   kX0 = false: out = c1 * x - (c1 * c2) * e + sigma * z, clamped to [-clip, clip] when clip >= 0;
//   kX0 = true:  y0 = c1 * x - (c1 * c2) * e, clamped when clip >= 0,
//                out = coef_x0 * y0 + coef_x * x + sigma * z.
// One pass: x, e and z are read once, out written once.
template <typename T, bool kX0>
void diffusion_step_kernel(const T* x, const T* eps, const T* noise, T* out, int64_t batch,
                           int64_t n, StepCoefs k, float clip) {
  const bool clamp = clip >= 0.f;
  at::parallel_for(0, batch * n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t start = begin; start < end;) {
      const int64_t b = start / n;
      const int64_t stop = std::min(end, (b + 1) * n);
      const float ca = k.c1[b], cb = -k.c1[b] * k.c2[b], cs = k.sigma[b];
      const float cp = kX0 ? k.coef_x0[b] : 0.f, cq = kX0 ? k.coef_x[b] : 0.f;
      const Vec va(ca), vb(cb), vs(cs), vp(cp), vq(cq), lo(-clip), hi(clip);
      int64_t i = start;
      for (; i + kPair <= stop; i += kPair) {
        Vec x0, x1, e0, e1;
        load_pair(x + i, x0, x1);
        load_pair(eps + i, e0, e1);
        Vec r0 = at::vec::fmadd(vb, e0, x0 * va);
        Vec r1 = at::vec::fmadd(vb, e1, x1 * va);
        if (kX0) {
          if (clamp) {
            r0 = at::vec::clamp(r0, lo, hi);
            r1 = at::vec::clamp(r1, lo, hi);
          }
          r0 = at::vec::fmadd(vq, x0, r0 * vp);
          r1 = at::vec::fmadd(vq, x1, r1 * vp);
        }
        if (noise != nullptr) {
          Vec z0, z1;
          load_pair(noise + i, z0, z1);
          r0 = at::vec::fmadd(vs, z0, r0);
          r1 = at::vec::fmadd(vs, z1, r1);
        }
        if (!kX0 && clamp) {
          r0 = at::vec::clamp(r0, lo, hi);
          r1 = at::vec::clamp(r1, lo, hi);
        }
        store_pair(out + i, r0, r1);
      }
      for (; i < stop; ++i) {
        const float xi = static_cast<float>(x[i]);
        float r = ca * xi + cb * static_cast<float>(eps[i]);
        if (kX0) {
          if (clamp) r = std::min(std::max(r, -clip), clip);
          r = cp * r + cq * xi;
        }
        if (noise != nullptr) r += cs * static_cast<float>(noise[i]);
        if (!kX0 && clamp) r = std::min(std::max(r, -clip), clip);
        out[i] = static_cast<T>(r);
      }
      start = stop;
    }
  });
}

at::Tensor coefficient(const char* op, const at::Tensor& c, int64_t batch, const char* name) {
  TORCH_CHECK(c.device().is_cpu(), op, ": ", name, " must be on the CPU like x, got ", c.device());
  TORCH_CHECK(c.is_floating_point(), op, ": ", name, " must be a float tensor, got ",
              c.scalar_type());
  TORCH_CHECK(c.dim() <= 1 && (c.numel() == batch || c.numel() == 1), op, ": ", name,
              " must be a scalar or have shape [B] = [", batch, "], got ", c.sizes());
  return c.to(at::kFloat).reshape({-1}).expand({batch}).contiguous();
}

// Shared body of diffusion_step and diffusion_step_x0 (coef_x0/coef_x undefined for the former).
at::Tensor diffusion_step_impl(const char* op, bool x0_mode, const at::Tensor& x,
                               const at::Tensor& eps, const std::optional<at::Tensor>& noise,
                               const at::Tensor& c1, const at::Tensor& c2,
                               const at::Tensor& coef_x0, const at::Tensor& coef_x,
                               const at::Tensor& sigma, std::optional<double> clip) {
  TORCH_CHECK(x.is_floating_point(), op, ": x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, op, ": x must have a batch dimension, got a scalar");
  const std::string pre = std::string(op) + ": ";
  check_same(x, eps, (pre + "eps").c_str());
  if (noise) check_same(x, *noise, (pre + "noise").c_str());
  TORCH_CHECK(!clip || *clip >= 0, op, ": clip must be >= 0, got ", clip.value_or(0.0));
  const int64_t batch = x.size(0);
  auto a = coefficient(op, c1, batch, "c1"), b = coefficient(op, c2, batch, "c2"),
       s = coefficient(op, sigma, batch, "sigma");
  at::Tensor p, q;
  if (x0_mode) {
    p = coefficient(op, coef_x0, batch, "coef_x0");
    q = coefficient(op, coef_x, batch, "coef_x");
  }
  auto xc = x.contiguous(), ec = eps.contiguous();
  at::Tensor nc = noise ? noise->contiguous() : at::Tensor();
  auto out = at::empty_like(xc);
  if (xc.numel() == 0) return out;
  const int64_t n = xc.numel() / batch;
  const StepCoefs k{a.data_ptr<float>(), b.data_ptr<float>(), s.data_ptr<float>(),
                    x0_mode ? p.data_ptr<float>() : nullptr,
                    x0_mode ? q.data_ptr<float>() : nullptr};
  const float clip_value = clip ? static_cast<float>(*clip) : -1.f;
  dispatch_floating(x.scalar_type(), op, [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* z = nc.defined() ? nc.data_ptr<scalar_t>() : nullptr;
    if (x0_mode) {
      diffusion_step_kernel<scalar_t, true>(xc.data_ptr<scalar_t>(), ec.data_ptr<scalar_t>(), z,
                                            out.data_ptr<scalar_t>(), batch, n, k, clip_value);
    } else {
      diffusion_step_kernel<scalar_t, false>(xc.data_ptr<scalar_t>(), ec.data_ptr<scalar_t>(), z,
                                             out.data_ptr<scalar_t>(), batch, n, k, clip_value);
    }
  });
  return out;
}

at::Tensor diffusion_step_cpu(const at::Tensor& x, const at::Tensor& eps,
                              const std::optional<at::Tensor>& noise, const at::Tensor& c1,
                              const at::Tensor& c2, const at::Tensor& sigma,
                              std::optional<double> clip) {
  return diffusion_step_impl("diffusion_step", false, x, eps, noise, c1, c2, at::Tensor(),
                             at::Tensor(), sigma, clip);
}

at::Tensor diffusion_step_x0_cpu(const at::Tensor& x, const at::Tensor& eps,
                                 const std::optional<at::Tensor>& noise, const at::Tensor& c1,
                                 const at::Tensor& c2, const at::Tensor& coef_x0,
                                 const at::Tensor& coef_x, const at::Tensor& sigma,
                                 std::optional<double> clip) {
  return diffusion_step_impl("diffusion_step_x0", true, x, eps, noise, c1, c2, coef_x0, coef_x,
                             sigma, clip);
}

}  // namespace

TORCH_LIBRARY_IMPL(pysonic, CPU, m) {
  m.impl("flow_step", &flow_step_cpu);
  m.impl("diffusion_step", &diffusion_step_cpu);
  m.impl("diffusion_step_x0", &diffusion_step_x0_cpu);
}

}  // namespace pysonic::cpu
