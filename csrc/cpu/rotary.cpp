// CPU kernel for pysonic::rotary: rotary position embedding on the first R channels of x.
//
// Contract:
//   x    [B,H,T,D], any strides for B, H, T (a [B,T,H,D] tensor transposed to [B,H,T,D] is read
//        in place); the channel dimension is made unit-stride on purpose if it is not.
//   cos, sin [T,R/2], float32 or x's dtype (converted once to the fp32 compute type: float64
//        for float64 x), R even, R <= D.
//   out  [B,H,T,D] contiguous, in x's dtype (like the reference, whatever x's layout).
//   Half-split pairs (i, i + R/2), or interleaved pairs (2i, 2i+1) with interleaved=true:
//     out_a = x_a * cos[t,i] - x_b * sin[t,i]
//     out_b = x_b * cos[t,i] + x_a * sin[t,i]
//   Channels R..D are copied through. Arithmetic in fp32 (fp64 for float64 x).
// The backward of this op is the same op with -sin (the transpose of a rotation).
//
// Memory bound: one pass reads x once and writes out once; cos/sin rows stay in L1 while all
// heads of a time step (or all time steps of a block for one head) are rotated.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "cpu/vec_utils.h"

#include <cstring>

namespace pysonic::cpu {
namespace {

// Rotates one row of D channels: xr -> orow (both unit stride), with the cos/sin row of its
// time step (half = R/2 values each, compute type A).
template <typename T, bool kInterleaved>
inline void rotate_row(const T* xr, T* orow, const acc_t<T>* c, const acc_t<T>* s, int64_t half,
                       int64_t D) {
  using A = acc_t<T>;
  using VA = at::vec::Vectorized<A>;
  constexpr int64_t V = VA::size();
  int64_t i = 0;
  if constexpr (!kInterleaved) {
    // 2V pairs per step: x1 = xr[i..i+2V), x2 = xr[half+i..half+i+2V).
    for (; i + 2 * V <= half; i += 2 * V) {
      VA a0, a1, b0, b1;
      load2<T, A>(xr + i, a0, a1);
      load2<T, A>(xr + half + i, b0, b1);
      const VA c0 = VA::loadu(c + i), c1 = VA::loadu(c + i + V);
      const VA s0 = VA::loadu(s + i), s1 = VA::loadu(s + i + V);
      store2<T, A>(orow + i, at::vec::fmsub(a0, c0, b0 * s0), at::vec::fmsub(a1, c1, b1 * s1));
      store2<T, A>(orow + half + i, at::vec::fmadd(b0, c0, a0 * s0),
                   at::vec::fmadd(b1, c1, a1 * s1));
    }
    for (; i < half; ++i) {
      const A a = static_cast<A>(xr[i]), b = static_cast<A>(xr[half + i]);
      orow[i] = static_cast<T>(a * c[i] - b * s[i]);
      orow[half + i] = static_cast<T>(b * c[i] + a * s[i]);
    }
  } else {
    // V pairs per step: 2V consecutive channels, split into even (a) and odd (b) lanes.
    for (; i + V <= half; i += V) {
      VA lo, hi;
      load2<T, A>(xr + 2 * i, lo, hi);
      auto [a, b] = at::vec::deinterleave2(lo, hi);
      const VA cv = VA::loadu(c + i), sv = VA::loadu(s + i);
      auto [olo, ohi] = at::vec::interleave2(at::vec::fmsub(a, cv, b * sv), at::vec::fmadd(b, cv, a * sv));
      store2<T, A>(orow + 2 * i, olo, ohi);
    }
    for (; i < half; ++i) {
      const A a = static_cast<A>(xr[2 * i]), b = static_cast<A>(xr[2 * i + 1]);
      orow[2 * i] = static_cast<T>(a * c[i] - b * s[i]);
      orow[2 * i + 1] = static_cast<T>(b * c[i] + a * s[i]);
    }
  }
  if (D > 2 * half) std::memcpy(orow + 2 * half, xr + 2 * half, (D - 2 * half) * sizeof(T));
}

struct Strides {
  int64_t b, h, t;
};

template <typename T, bool kInterleaved>
void rotary_kernel(const T* x, T* out, const acc_t<T>* cos, const acc_t<T>* sin, int64_t B,
                   int64_t H, int64_t T_, int64_t D, int64_t half, Strides xs, Strides os) {
  // Work unit: (b, block of time steps), all heads. Inside a unit the loop whose x stride is
  // smaller runs innermost, so rows are visited in memory order for both [B,H,T,D] and the
  // transposed [B,T,H,D] layout.
  const int64_t row_elems = std::max<int64_t>(1, H * D);
  const int64_t tblock = std::max<int64_t>(1, std::min<int64_t>(T_, (1 << 13) / row_elems));
  const int64_t nblocks = (T_ + tblock - 1) / tblock;
  const bool heads_inner = std::abs(xs.h) < std::abs(xs.t);
  // Small problems run inline: a chunk of work units covers at least ~32K elements.
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / (tblock * row_elems));
  at::parallel_for(0, B * nblocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit / nblocks;
      const int64_t t0 = (unit % nblocks) * tblock, t1 = std::min(T_, t0 + tblock);
      auto row = [&](int64_t h, int64_t t) {
        rotate_row<T, kInterleaved>(x + b * xs.b + h * xs.h + t * xs.t,
                                    out + b * os.b + h * os.h + t * os.t, cos + t * half,
                                    sin + t * half, half, D);
      };
      if (heads_inner) {
        for (int64_t t = t0; t < t1; ++t)
          for (int64_t h = 0; h < H; ++h) row(h, t);
      } else {
        for (int64_t h = 0; h < H; ++h)
          for (int64_t t = t0; t < t1; ++t) row(h, t);
      }
    }
  });
}

template <typename F>
void dispatch_rotary_dtype(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    case at::kDouble: f(double{}); break;
    default:
      TORCH_CHECK(false, "rotary: x has unsupported dtype ", t,
                  " (expected float32, bfloat16, float16 or float64)");
  }
}

at::Tensor rotary_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                      bool interleaved) {
  TORCH_CHECK(x.dim() == 4, "rotary: x must have shape [B,H,T,D], got ", x.sizes());
  TORCH_CHECK(cos.dim() == 2, "rotary: cos must have shape [T,R/2], got ", cos.sizes());
  TORCH_CHECK(sin.sizes() == cos.sizes(), "rotary: sin must have the shape of cos ", cos.sizes(),
              ", got ", sin.sizes());
  TORCH_CHECK(x.device().is_cpu() && cos.device().is_cpu() && sin.device().is_cpu(),
              "rotary: x, cos and sin must be CPU tensors, got ", x.device(), ", ", cos.device(),
              ", ", sin.device());
  const int64_t B = x.size(0), H = x.size(1), T_ = x.size(2), D = x.size(3);
  const int64_t half = cos.size(1);
  TORCH_CHECK(cos.size(0) == T_, "rotary: cos must have T = ", T_, " rows (x.size(2)), got ",
              cos.size(0));
  TORCH_CHECK(2 * half <= D, "rotary: rotary width R = 2 * cos.size(1) = ", 2 * half,
              " exceeds the head size D = ", D);
  TORCH_CHECK(cos.scalar_type() == at::kFloat || cos.scalar_type() == x.scalar_type(),
              "rotary: cos must be float32 or x's dtype (", x.scalar_type(), "), got ",
              cos.scalar_type());
  TORCH_CHECK(sin.scalar_type() == cos.scalar_type(), "rotary: sin must have the dtype of cos (",
              cos.scalar_type(), "), got ", sin.scalar_type());
  at::Tensor out;
  dispatch_rotary_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const auto acc_type = c10::CppTypeToScalarType<A>::value;
    // Rows must be unit stride; any B/H/T strides are fine.
    const at::Tensor xc = x.stride(3) == 1 || D <= 1 ? x : x.contiguous();
    out = at::empty({B, H, T_, D}, xc.options());
    if (out.numel() == 0) return;
    const at::Tensor cc = cos.to(acc_type).contiguous(), sc = sin.to(acc_type).contiguous();
    const Strides xs{xc.stride(0), xc.stride(1), xc.stride(2)};
    const Strides os{out.stride(0), out.stride(1), out.stride(2)};
    auto run = interleaved ? rotary_kernel<T, true> : rotary_kernel<T, false>;
    run(xc.const_data_ptr<T>(), out.mutable_data_ptr<T>(), static_cast<const A*>(cc.const_data_ptr()),
        static_cast<const A*>(sc.const_data_ptr()), B, H, T_, D, half, xs, os);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pysonic, CPU, m) { m.impl("rotary", &rotary_cpu); }

}  // namespace pysonic::cpu
