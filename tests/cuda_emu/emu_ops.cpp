// C entry points over the launch helpers of kernels/cuda/*.cuh, compiled for the CPU emulator
// (tests/cuda_emu/emu.h) and called through ctypes by tests/ops/test_cuda_emulated.py.
// dtype codes: 0 = float32, 1 = bfloat16, 2 = float16. Pointers are host memory.
#include "attention.cuh"
#include "conformer_conv.cuh"
#include "elu.cuh"
#include "lstm.cuh"
#include "rotary.cuh"
#include "rvq.cuh"
#include "steps.cuh"

using namespace pysonic::cuda;

namespace {

template <typename F>
void dispatch(int dtype, F&& f) {
  switch (dtype) {
    case 0: f(float{}); break;
    case 1: f(__nv_bfloat16{}); break;
    case 2: f(__half{}); break;
    default: throw std::runtime_error("emu: bad dtype code");
  }
}

template <typename F>
void dispatch_dmax(int dmax, F&& f) {
  if (dmax == 64) f(std::integral_constant<int, 64>{});
  else f(std::integral_constant<int, 128>{});
}

}  // namespace

extern "C" {

void emu_elu(int dtype, const void* x, void* out, int64_t n, float alpha) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_elu<T>((const T*)x, (T*)out, n, alpha, nullptr);
  });
}

// One step of the LSTM recurrence (the host loop lives in tests/cuda_emu/__init__.py, as in
// csrc/cuda/lstm.cu).
void emu_lstm_step(int dtype, const void* gx, const void* w, const float* h_prev, float* h_next, float* c,
                   void* y, int64_t batch, int64_t hidden) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_lstm_step<T>((const T*)gx, (const T*)w, h_prev, h_next, c, (T*)y, batch, hidden, nullptr);
  });
}

void emu_flow_step(int dtype, int vec, const void* x, const void* vc, const void* vu, void* out,
                   int64_t n, float a, float b) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = 16 / sizeof(T);
    if (vec) launch_flow_step<T, V>((const T*)x, (const T*)vc, (const T*)vu, (T*)out, n, a, b, nullptr);
    else launch_flow_step<T, 1>((const T*)x, (const T*)vc, (const T*)vu, (T*)out, n, a, b, nullptr);
  });
}

void emu_diffusion_step(int dtype, int vec, const void* x, const void* eps, const void* noise,
                        void* out, int64_t batch, int64_t n, const float* c1, const float* c2,
                        const float* sigma, float clip) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = 16 / sizeof(T);
    if (vec) launch_diffusion_step<T, V>((const T*)x, (const T*)eps, (const T*)noise, (T*)out, batch, n, c1, c2, sigma, clip, nullptr);
    else launch_diffusion_step<T, 1>((const T*)x, (const T*)eps, (const T*)noise, (T*)out, batch, n, c1, c2, sigma, clip, nullptr);
  });
}

void emu_diffusion_step_x0(int dtype, int vec, const void* x, const void* eps, const void* noise,
                           void* out, int64_t batch, int64_t n, const float* c1, const float* c2,
                           const float* p, const float* q, const float* sigma, float clip) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = 16 / sizeof(T);
    if (vec) launch_diffusion_step_x0<T, V>((const T*)x, (const T*)eps, (const T*)noise, (T*)out, batch, n, c1, c2, p, q, sigma, clip, nullptr);
    else launch_diffusion_step_x0<T, 1>((const T*)x, (const T*)eps, (const T*)noise, (T*)out, batch, n, c1, c2, p, q, sigma, clip, nullptr);
  });
}

void emu_rotary(int dtype, int cos_float, const void* x, const void* cos, const void* sin, void* out,
                int64_t rows, int64_t tlen, int64_t D, int64_t half, int interleaved) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (cos_float) launch_rotary<T, float>((const T*)x, (const float*)cos, (const float*)sin, (T*)out, rows, tlen, D, half, interleaved != 0, nullptr);
    else launch_rotary<T, T>((const T*)x, (const T*)cos, (const T*)sin, (T*)out, rows, tlen, D, half, interleaved != 0, nullptr);
  });
}

void emu_rvq_encode(int dtype, const void* x, const float* books, int64_t* codes, int64_t rows,
                    int64_t K, int64_t D, int64_t n_q, int warps) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_rvq_encode<T>((const T*)x, books, codes, rows, K, D, n_q, warps, nullptr);
  });
}

void emu_rvq_decode(int dtype, int code64, const void* codes, const void* books, void* out,
                    int64_t rows, int64_t n_q, int64_t K, int64_t D, unsigned long long* err) {
  dispatch(dtype, [&](auto tag) {
    using C = decltype(tag);
    if (code64) launch_rvq_decode<C, int64_t>((const int64_t*)codes, (const C*)books, (C*)out, rows, n_q, K, D, err, nullptr);
    else launch_rvq_decode<C, int32_t>((const int32_t*)codes, (const C*)books, (C*)out, rows, n_q, K, D, err, nullptr);
  });
}

void emu_conformer_conv(int dtype, const void* x, const void* w, const void* b, void* out,
                        int64_t B, int64_t C, int64_t K, int64_t Tx, int64_t To, int64_t pad) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_conformer_conv<T, kConvForward>((const T*)x, nullptr, (const T*)w, (const T*)b, nullptr, (T*)out, nullptr, B, C, K, Tx, To, pad, nullptr);
  });
}

// Mirrors conformer_conv_backward_cuda after its checks (sizes > 0).
void emu_conformer_conv_backward(int dtype, const void* go, const void* x, const void* w,
                                 const void* b, float* dy, void* gx, float* pw, float* pb,
                                 void* gw, void* gb, int64_t P, int64_t B, int64_t C, int64_t K,
                                 int64_t Tx, int64_t To, int64_t pad) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_conformer_conv<T, kConvGradY>((const T*)x, nullptr, (const T*)w, (const T*)b, (const T*)go, nullptr, dy, B, C, K, Tx, To, pad, nullptr);
    if (Tx > 0) launch_conformer_conv<T, kConvGradX>((const T*)x, dy, (const T*)w, nullptr, nullptr, (T*)gx, nullptr, B, C, K, Tx, To, pad, nullptr);
    launch_conformer_conv_wgrad<T>((const T*)x, dy, pw, pb, (T*)gw, (T*)gb, P, B, C, K, Tx, To, pad, nullptr);
  });
}

void emu_attention_fwd(int dtype, int dmax, const void* q, const void* k, const void* v, void* out,
                       float* lse, const int64_t* kl, int64_t B, int64_t H, int64_t Hkv,
                       int64_t Tq, int64_t Tk, int D, float scale, int causal) {
  const AttnShape sh{B, H, Hkv, Tq, Tk, D, scale, causal != 0};
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_dmax(dmax, [&](auto dm) {
      launch_attention_fwd<T, decltype(dm)::value>((const T*)q, (const T*)k, (const T*)v, (T*)out, lse, kl, sh, nullptr);
    });
  });
}

void emu_attention_bwd(int dtype, int dmax, const void* go, const void* q, const void* k,
                       const void* v, const void* out, const float* lse, float* delta, void* dq,
                       void* dk, void* dv, const int64_t* kl, int64_t B, int64_t H, int64_t Hkv,
                       int64_t Tq, int64_t Tk, int D, float scale, int causal) {
  const AttnShape sh{B, H, Hkv, Tq, Tk, D, scale, causal != 0};
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_dmax(dmax, [&](auto dm) {
      launch_attention_bwd<T, decltype(dm)::value>((const T*)go, (const T*)q, (const T*)k, (const T*)v, (const T*)out, lse, delta, (T*)dq, (T*)dk, (T*)dv, kl, sh, nullptr);
    });
  });
}

}  // extern "C"
