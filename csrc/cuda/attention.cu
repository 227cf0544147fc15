// CUDA launchers for attention and attention_backward (kernels/cuda/attention.cuh).
#include "attention.cuh"
#include "cuda/launch.h"

#include <cmath>
#include <limits>
#include <tuple>

namespace pysonic::cuda {
namespace {

constexpr int kMaxHeadDim = 128;

AttnShape check_attention(const char* op, const at::Tensor& q, const at::Tensor& k,
                          const at::Tensor& v, bool causal, std::optional<double> scale,
                          const std::optional<at::Tensor>& key_lengths) {
  check_cuda(q, op, "q");
  check_same_device(q, k, op, "k");
  check_same_device(q, v, op, "v");
  check_dim(q, 4, op, "q", "[B, H, Tq, D]");
  check_dim(k, 4, op, "k", "[B, Hkv, Tk, D]");
  check_dim(v, 4, op, "v", "[B, Hkv, Tk, D]");
  check_dtype(q, k, op, "k", "q");
  check_dtype(q, v, op, "v", "q");
  dispatch_float(q.scalar_type(), op, "q", [](auto) {});
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": v must have the shape of k ", k.sizes(), ", got ",
              v.sizes());
  AttnShape sh{};
  sh.B = q.size(0);
  sh.H = q.size(1);
  sh.Tq = q.size(2);
  sh.Hkv = k.size(1);
  sh.Tk = k.size(2);
  const int64_t D = q.size(3);
  TORCH_CHECK(k.size(0) == sh.B && k.size(3) == D, op, ": k must have shape [B, Hkv, Tk, D] with B = ",
              sh.B, " and D = ", D, " like q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(sh.Hkv >= 1 && sh.H % sh.Hkv == 0, op, ": the H = ", sh.H,
              " query heads must be a multiple of the Hkv = ", sh.Hkv, " key/value heads");
  TORCH_CHECK(D >= 1 && D <= kMaxHeadDim, op, ": the CUDA kernel supports head dims 1..",
              kMaxHeadDim, ", got D = ", D);
  sh.D = static_cast<int>(D);
  const double s = scale ? *scale : 1.0 / std::sqrt(static_cast<double>(D));
  TORCH_CHECK(std::isfinite(s), op, ": scale must be finite, got ", s);
  sh.scale = static_cast<float>(s);
  sh.causal = causal;
  if (key_lengths) {
    const auto& kl = *key_lengths;
    check_same_device(q, kl, op, "key_lengths");
    TORCH_CHECK(kl.dim() == 1 && kl.size(0) == sh.B, op, ": key_lengths must have shape [B] = [",
                sh.B, "], got ", kl.sizes());
    TORCH_CHECK(!kl.is_floating_point() && !kl.is_complex() && kl.scalar_type() != at::kBool, op,
                ": key_lengths must be an integer tensor, got ", kl.scalar_type());
  }
  return sh;
}

at::Tensor key_lengths_i64(const std::optional<at::Tensor>& key_lengths) {
  return key_lengths ? key_lengths->to(at::kLong).contiguous() : at::Tensor();
}

void check_grid(const char* op, int64_t blocks) {
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), op,
              ": the problem is too large for one CUDA grid (", blocks, " blocks)");
}

// Calls f(std::integral_constant<int, DMAX>) with DMAX = 64 or 128.
template <typename F>
void dispatch_head_dim(int D, F&& f) {
  if (D <= 64) {
    f(std::integral_constant<int, 64>{});
  } else {
    f(std::integral_constant<int, 128>{});
  }
}

std::tuple<at::Tensor, at::Tensor> attention_cuda(const at::Tensor& q, const at::Tensor& k,
                                                  const at::Tensor& v, bool causal,
                                                  std::optional<double> scale,
                                                  const std::optional<at::Tensor>& key_lengths) {
  constexpr const char* op = "attention";
  const AttnShape sh = check_attention(op, q, k, v, causal, scale, key_lengths);
  const c10::cuda::CUDAGuard guard(q.device());
  auto out = at::empty({sh.B, sh.H, sh.Tq, sh.D}, q.options());
  auto lse = at::empty({sh.B, sh.H, sh.Tq}, q.options().dtype(at::kFloat));
  if (sh.B * sh.H * sh.Tq == 0) return {out, lse};
  check_grid(op, attention_fwd_blocks(sh));
  auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  auto kl = key_lengths_i64(key_lengths);
  const int64_t* klp = kl.defined() ? ptr<const int64_t>(kl) : nullptr;
  dispatch_float(q.scalar_type(), op, "q", [&](auto tag) {
    using T = decltype(tag);
    dispatch_head_dim(sh.D, [&](auto dmax) {
      launch_attention_fwd<T, decltype(dmax)::value>(ptr<const T>(qc), ptr<const T>(kc),
                                                     ptr<const T>(vc), ptr<T>(out),
                                                     ptr<float>(lse), klp, sh, current_stream());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, bool causal, std::optional<double> scale,
    const std::optional<at::Tensor>& key_lengths) {
  constexpr const char* op = "attention_backward";
  const AttnShape sh = check_attention(op, q, k, v, causal, scale, key_lengths);
  const auto check_like_q = [&](const at::Tensor& t, const char* name) {
    check_same_device(q, t, op, name);
    check_dtype(q, t, op, name, "q");
    TORCH_CHECK(t.sizes() == q.sizes(), op, ": ", name, " must have the shape of q ", q.sizes(),
                ", got ", t.sizes());
  };
  check_like_q(grad_out, "grad_out");
  check_like_q(out, "out");
  check_same_device(q, lse, op, "lse");
  TORCH_CHECK(lse.scalar_type() == at::kFloat, op, ": lse must be float32, got ", lse.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == sh.B && lse.size(1) == sh.H && lse.size(2) == sh.Tq,
              op, ": lse must have shape [B, H, Tq] = [", sh.B, ", ", sh.H, ", ", sh.Tq, "], got ",
              lse.sizes());
  const c10::cuda::CUDAGuard guard(q.device());
  auto dq = at::empty({sh.B, sh.H, sh.Tq, sh.D}, q.options());
  auto dk = at::empty({sh.B, sh.Hkv, sh.Tk, sh.D}, q.options());
  auto dv = at::empty({sh.B, sh.Hkv, sh.Tk, sh.D}, q.options());
  if (sh.B * sh.H * sh.Tq == 0 && sh.B * sh.Hkv * sh.Tk == 0) return {dq, dk, dv};
  check_grid(op, attention_dq_blocks(sh));
  check_grid(op, attention_dkv_blocks(sh));
  auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  auto goc = grad_out.contiguous(), oc = out.contiguous(), lc = lse.contiguous();
  auto delta = at::empty({sh.B, sh.H, sh.Tq}, q.options().dtype(at::kFloat));
  auto kl = key_lengths_i64(key_lengths);
  const int64_t* klp = kl.defined() ? ptr<const int64_t>(kl) : nullptr;
  dispatch_float(q.scalar_type(), op, "q", [&](auto tag) {
    using T = decltype(tag);
    dispatch_head_dim(sh.D, [&](auto dmax) {
      launch_attention_bwd<T, decltype(dmax)::value>(
          ptr<const T>(goc), ptr<const T>(qc), ptr<const T>(kc), ptr<const T>(vc),
          ptr<const T>(oc), ptr<const float>(lc), ptr<float>(delta), ptr<T>(dq), ptr<T>(dk),
          ptr<T>(dv), klp, sh, current_stream());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(pysonic, CUDA, m) {
  m.impl("attention", &attention_cuda);
  m.impl("attention_backward", &attention_backward_cuda);
}

}  // namespace pysonic::cuda
