// CUDA launchers for conformer_conv and conformer_conv_backward (kernels/cuda/conformer_conv.cuh).
#include "conformer_conv.cuh"
#include "cuda/launch.h"

#include <tuple>

namespace pysonic::cuda {
namespace {

struct ConvShape {
  int64_t B, Tx, C, K, To, pad;
};

ConvShape check_conv(const char* op, const at::Tensor& x, const at::Tensor& weight,
                     const at::Tensor& bias, bool causal) {
  check_cuda(x, op, "x");
  check_same_device(x, weight, op, "weight");
  check_same_device(x, bias, op, "bias");
  check_dim(x, 3, op, "x", "[B, T, 2C]");
  check_dim(weight, 2, op, "weight", "[C, K]");
  check_dim(bias, 1, op, "bias", "[C]");
  check_dtype(x, weight, op, "weight", "x");
  check_dtype(x, bias, op, "bias", "x");
  const int64_t C = weight.size(0), K = weight.size(1);
  TORCH_CHECK(x.size(2) == 2 * C, op, ": x must have 2C = ", 2 * C,
              " channels for weight ", weight.sizes(), ", got x ", x.sizes());
  TORCH_CHECK(bias.size(0) == C, op, ": bias must have shape [C] = [", C, "], got ", bias.sizes());
  TORCH_CHECK(K >= 1, op, ": weight must have a kernel size K >= 1, got ", weight.sizes());
  // Like the CPU kernel: 'same' padding needs an odd K (the kernels themselves follow the
  // reference's padded length for any K, see kernels/cuda/conformer_conv.cuh).
  TORCH_CHECK(causal || K % 2 == 1, op, ": kernel size K = ", K,
              " must be odd for 'same' padding (or use causal=True)");
  TORCH_CHECK(C <= 65535LL * kConvCh, op, ": the CUDA kernel supports C <= ", 65535LL * kConvCh,
              " channels, got ", C);
  TORCH_CHECK(K <= 65535LL * kWgradTaps, op, ": the CUDA kernel supports K <= ",
              65535LL * kWgradTaps, ", got ", K);
  ConvShape s{x.size(0), x.size(1), C, K, 0, 0};
  s.pad = causal ? K - 1 : K / 2;
  s.To = causal ? s.Tx : s.Tx + 2 * (K / 2) - K + 1;  // the reference's padded conv length
  return s;
}

at::Tensor conformer_conv_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                               bool causal) {
  constexpr const char* op = "conformer_conv";
  const ConvShape s = check_conv(op, x, weight, bias, causal);
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty({s.B, s.To, s.C}, x.options());
  if (out.numel() == 0) return out;
  auto xc = x.contiguous(), wc = weight.contiguous(), bc = bias.contiguous();
  dispatch_float(x.scalar_type(), op, "x", [&](auto tag) {
    using T = decltype(tag);
    launch_conformer_conv<T, kConvForward>(ptr<const T>(xc), nullptr, ptr<const T>(wc),
                                           ptr<const T>(bc), nullptr, ptr<T>(out), nullptr, s.B,
                                           s.C, s.K, s.Tx, s.To, s.pad, current_stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conformer_conv_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& bias, bool causal) {
  constexpr const char* op = "conformer_conv_backward";
  const ConvShape s = check_conv(op, x, weight, bias, causal);
  check_same_device(x, grad_out, op, "grad_out");
  check_dtype(x, grad_out, op, "grad_out", "x");
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == s.B && grad_out.size(1) == s.To &&
                  grad_out.size(2) == s.C,
              op, ": grad_out must have shape [B, T, C] = [", s.B, ", ", s.To, ", ", s.C,
              "], got ", grad_out.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  auto xc = x.contiguous(), wc = weight.contiguous(), bc = bias.contiguous();
  auto goc = grad_out.contiguous();
  auto grad_x = at::empty({s.B, s.Tx, 2 * s.C}, x.options());
  auto grad_w = at::empty({s.C, s.K}, x.options());
  auto grad_b = at::empty({s.C}, x.options());
  if (s.C == 0) return {grad_x, grad_w, grad_b};
  if (s.B * s.To == 0) return {grad_x.zero_(), grad_w.zero_(), grad_b.zero_()};
  auto fopts = x.options().dtype(at::kFloat);
  auto dy = at::empty({s.B, s.To, s.C}, fopts);
  const int64_t P = conformer_conv_partials(s.B, s.To);
  auto pw = at::empty({P, s.C, s.K}, fopts);
  auto pb = at::empty({P, s.C}, fopts);
  dispatch_float(x.scalar_type(), op, "x", [&](auto tag) {
    using T = decltype(tag);
    const auto stream = current_stream();
    launch_conformer_conv<T, kConvGradY>(ptr<const T>(xc), nullptr, ptr<const T>(wc),
                                         ptr<const T>(bc), ptr<const T>(goc), nullptr,
                                         ptr<float>(dy), s.B, s.C, s.K, s.Tx, s.To, s.pad, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (s.Tx > 0) {
      launch_conformer_conv<T, kConvGradX>(ptr<const T>(xc), ptr<const float>(dy),
                                           ptr<const T>(wc), nullptr, nullptr, ptr<T>(grad_x),
                                           nullptr, s.B, s.C, s.K, s.Tx, s.To, s.pad, stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    launch_conformer_conv_wgrad<T>(ptr<const T>(xc), ptr<const float>(dy), ptr<float>(pw),
                                   ptr<float>(pb), ptr<T>(grad_w), ptr<T>(grad_b), P, s.B, s.C,
                                   s.K, s.Tx, s.To, s.pad, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_x, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(pysonic, CUDA, m) {
  m.impl("conformer_conv", &conformer_conv_cuda);
  m.impl("conformer_conv_backward", &conformer_conv_backward_cuda);
}

}  // namespace pysonic::cuda
