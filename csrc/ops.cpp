// The pysonic op library: every schema is declared here, once. Kernels register themselves
// per device in csrc/cpu/*.cpp (CPU key) and csrc/cuda/*.cu (CUDA key). This file is also the
// pybind11 module pysonic._C, so importing it registers the ops with the dispatcher.
#include <torch/extension.h>
#include <torch/library.h>

#include "block_cache.h"

#ifndef PYSONIC_VERSION
#define PYSONIC_VERSION "unknown"
#endif
#ifndef PYSONIC_CPU_ISA
#define PYSONIC_CPU_ISA "DEFAULT"
#endif

TORCH_LIBRARY(pysonic, m) {
  // q [B,H,Tq,D], k/v [B,Hkv,Tk,D] -> out [B,H,Tq,D] (q.dtype), lse [B,H,Tq] float32
  // (log-sum-exp of the scaled scores; -inf for a row with no visible key).
  m.def("attention(Tensor q, Tensor k, Tensor v, bool causal=False, float? scale=None, "
        "Tensor? key_lengths=None) -> (Tensor, Tensor)");
  // Gradients of attention given the forward's out and lse -> (dq, dk, dv).
  m.def("attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
        "Tensor lse, bool causal=False, float? scale=None, Tensor? key_lengths=None) "
        "-> (Tensor, Tensor, Tensor)");
  // x [B,H,T,D], cos/sin [T,R/2] -> [B,H,T,D]; first R channels rotated, rest passed through.
  // The backward is this op with -sin.
  m.def("rotary(Tensor x, Tensor cos, Tensor sin, bool interleaved=False) -> Tensor");
  // x [B,T,2C], weight [C,K], bias [C] -> silu(depthwise_conv(glu(x))) [B,T,C].
  m.def("conformer_conv(Tensor x, Tensor weight, Tensor bias, bool causal=False) -> Tensor");
  // -> (grad_x [B,T,2C], grad_weight [C,K], grad_bias [C])
  m.def("conformer_conv_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor bias, "
        "bool causal=False) -> (Tensor, Tensor, Tensor)");
  // x [B,T,D], codebooks [L,K,D] -> codes [B,T,n_q] int64.
  m.def("rvq_encode(Tensor x, Tensor codebooks, int n_q) -> Tensor");
  // codes [B,T,n_q] integer, codebooks [L,K,D] -> [B,T,D] (codebooks.dtype).
  m.def("rvq_decode(Tensor codes, Tensor codebooks) -> Tensor");
  // x + dt * (v_uncond + guidance_scale * (v_cond - v_uncond)); x + dt * v_cond without v_uncond.
  m.def("flow_step(Tensor x, Tensor v_cond, Tensor? v_uncond, float dt, float guidance_scale) -> Tensor");
  // c1 * (x - c2 * eps) + sigma * noise, optionally clamped to [-clip, clip].
  // c1, c2, sigma: float32 tensors of shape [B] (one value per batch item).
  m.def("diffusion_step(Tensor x, Tensor eps, Tensor? noise, Tensor c1, Tensor c2, Tensor sigma, "
        "float? clip=None) -> Tensor");
  // DDPM step that clamps its clean-signal estimate (ivanvovk WaveGrad clip_denoised, diffusers
  // clip_sample): x0 = c1 * (x - c2 * eps), clamped to [-clip, clip] unless clip is None;
  // out = coef_x0 * x0 + coef_x * x + sigma * noise. c1, c2, coef_x0, coef_x, sigma: float32 [B].
  m.def("diffusion_step_x0(Tensor x, Tensor eps, Tensor? noise, Tensor c1, Tensor c2, "
        "Tensor coef_x0, Tensor coef_x, Tensor sigma, float? clip=1.0) -> Tensor");
  // out = x > 0 ? x : alpha * (exp(x) - 1); x and out: same shape, dtype and strides (on dims
  // longer than 1), dense (out may be x: in place).
  m.def("elu_out(Tensor x, float alpha, Tensor(a!) out) -> ()");
  // The recurrent half of an LSTM layer (gate order i, f, g, o): gates_x [T,B,4H] = x @ w_ih^T
  // + biases, w_hh [4H,H], h0/c0 [B,H] -> (y [T,B,H], c_T [B,H]); y[T-1] is h_T. Inference only.
  m.def("lstm_recurrence(Tensor gates_x, Tensor w_hh, Tensor h0, Tensor c0) -> (Tensor, Tensor)");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = PYSONIC_VERSION;
  info["cpu_isa"] = PYSONIC_CPU_ISA;
#ifdef PYSONIC_WITH_CUDA
  info["cuda"] = true;
#ifdef PYSONIC_CUDA_ARCHS
  info["cuda_archs"] = PYSONIC_CUDA_ARCHS;
#endif
#else
  info["cuda"] = false;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pysonic compiled kernels; importing this module registers torch.ops.pysonic.*";
  m.def("build_info", &build_info, "Facts about this build: version, CPU ISA, CUDA support.");
  // The large-block CPU allocator cache (csrc/block_cache.cpp); pysonic.memory wraps these.
  m.def("block_cache_enter", &pysonic::memory::block_cache_enter, pybind11::arg("min_block_bytes"),
        pybind11::arg("max_cached_bytes"));
  m.def("block_cache_exit", &pysonic::memory::block_cache_exit);
  m.def("block_cache_release", &pysonic::memory::block_cache_release);
  m.def("block_cache_stats", [] {
    const auto s = pysonic::memory::block_cache_stats();
    pybind11::dict d;
    d["cached_bytes"] = s.cached_bytes;
    d["hits"] = s.hits;
    d["misses"] = s.misses;
    d["depth"] = s.depth;
    return d;
  });
}
