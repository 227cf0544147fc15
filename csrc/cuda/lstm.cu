// CUDA launcher for lstm_recurrence (kernel in kernels/cuda/lstm.cuh): one launch per step, the
// state in fp32 buffers. Checks mirror csrc/cpu/lstm.cpp.
#include "cuda/launch.h"
#include "lstm.cuh"

#include <tuple>

namespace pysonic::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> lstm_recurrence_cuda(const at::Tensor& gates_x, const at::Tensor& w_hh,
                                                        const at::Tensor& h0, const at::Tensor& c0) {
  constexpr const char* op = "lstm_recurrence";
  check_cuda(gates_x, op, "gates_x");
  check_dim(gates_x, 3, op, "gates_x", "[T, B, 4H]");
  check_dim(w_hh, 2, op, "w_hh", "[4H, H]");
  const int64_t steps = gates_x.size(0), batch = gates_x.size(1), hidden = w_hh.size(1);
  TORCH_CHECK(hidden >= 1 && w_hh.size(0) == 4 * hidden, op, ": w_hh must be [4H, H] with H >= 1, got ",
              w_hh.sizes());
  TORCH_CHECK(gates_x.size(2) == 4 * hidden, op, ": gates_x must be [T, B, 4H] with 4H = ", 4 * hidden, ", got ",
              gates_x.sizes());
  for (const auto* t : {&h0, &c0})
    TORCH_CHECK(t->dim() == 2 && t->size(0) == batch && t->size(1) == hidden, op, ": h0 and c0 must be [B, H] = [",
                batch, ", ", hidden, "], got ", t->sizes());
  check_dtype(gates_x, w_hh, op, "w_hh", "gates_x");
  check_dtype(gates_x, h0, op, "h0", "gates_x");
  check_dtype(gates_x, c0, op, "c0", "gates_x");
  check_same_device(gates_x, w_hh, op, "w_hh");
  check_same_device(gates_x, h0, op, "h0");
  check_same_device(gates_x, c0, op, "c0");
  TORCH_CHECK(gates_x.scalar_type() == at::kFloat || gates_x.scalar_type() == at::kBFloat16, op,
              ": dtype must be float32 or bfloat16, got ", gates_x.scalar_type());
  const c10::cuda::CUDAGuard guard(gates_x.device());
  auto y = at::empty({steps, batch, hidden}, gates_x.options());
  if (batch == 0) return {y, at::empty({0, hidden}, gates_x.options())};
  const auto gx = gates_x.contiguous(), w = w_hh.contiguous();
  auto h = h0.to(at::kFloat).contiguous().clone();  // [B, H] fp32, double buffered with h_other
  auto h_other = at::empty({batch, hidden}, h.options());
  auto c = c0.to(at::kFloat).contiguous().clone();
  dispatch_float(gates_x.scalar_type(), op, "gates_x", [&](auto tag) {
    using T = decltype(tag);
    float* h_prev = ptr<float>(h);
    float* h_next = ptr<float>(h_other);
    for (int64_t t = 0; t < steps; ++t) {
      launch_lstm_step<T>(ptr<const T>(gx) + t * batch * 4 * hidden, ptr<const T>(w), h_prev, h_next,
                          ptr<float>(c), ptr<T>(y) + t * batch * hidden, batch, hidden, current_stream());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      float* tmp = h_prev;
      h_prev = h_next;
      h_next = tmp;
    }
  });
  return {y, c.to(gates_x.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(pysonic, CUDA, m) { m.impl("lstm_recurrence", &lstm_recurrence_cuda); }

}  // namespace pysonic::cuda
