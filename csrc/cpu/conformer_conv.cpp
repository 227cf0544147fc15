// CPU kernels for pysonic::conformer_conv and pysonic::conformer_conv_backward: the Conformer
// convolution module's GLU -> depthwise conv over time -> SiLU, fused.
//
// Contract (forward):
//   x      [B,T,2C] (made contiguous on purpose), float32/bfloat16/float16/float64
//   weight [C,K], bias [C], same dtype as x
//   g[b,t,c]   = x[b,t,c] * sigmoid(x[b,t,C+c])                       (GLU)
//   y[b,t,c]   = bias[c] + sum_k weight[c,k] * g[b, t + k - P, c]     (g = 0 outside [0,T))
//                P = K/2 ("same", K odd) or K-1 (causal: zeros on the left only)
//   out[b,t,c] = y * sigmoid(y)                                        [B,T,C] contiguous
// Backward (recomputes g and y; arithmetic in fp32, fp64 for float64):
//   gy = grad_out * silu'(y),  silu'(y) = s * (1 + y * (1 - s)),  s = sigmoid(y)
//   gg[t]       = sum_k weight[c,k] * gy[t - k + P]                    (a correlation with the
//                 flipped filter)
//   grad_x      = [gg * sigmoid(x2), gg * x1 * sigmoid(x2) * (1 - sigmoid(x2))]
//   grad_weight = sum_{b,t} gy[b,t,c] * g[b, t + k - P, c],  grad_bias = sum_{b,t} gy
//   grad_weight/grad_bias are reduced in fp32 over B and T: partial sums per fixed group of
//   (b, time segment) items, then a fixed-order sum over groups, so results do not depend on
//   the thread count.
//
// Blocking: one work item is (b, time segment of tb steps), all channels. It computes the GLU
// for its segment plus the K-1 halo rows into an fp32 scratch of [rows, channels] (channels
// padded to a multiple of kChanPad with zeros), reading whole rows of x so the hardware
// prefetchers stream them, then runs the correlation over time with channels in vector lanes
// and 4 output rows in registers. tb is chosen so the scratch stays in L2 (~512 KB).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "cpu/vec_utils.h"

#include <vector>

namespace pysonic::cpu {
namespace {

constexpr int64_t kScratch = 1 << 17;  // fp32 scratch elements per work item (512 KB)
constexpr int64_t kChanPad = 32;       // channel padding: 2 fp32 vectors of AVX-512
constexpr int64_t kMaxGroups = 64;     // partial grad_weight/grad_bias sums in the backward
constexpr int64_t kLdPad = 16;         // scratch row padding (floats)

template <typename A>
inline at::vec::Vectorized<A> vsigmoid(const at::vec::Vectorized<A>& v) {
  using VA = at::vec::Vectorized<A>;
  return VA(A(1)) / (VA(A(1)) + v.neg().exp());
}

template <typename A>
inline A sigmoid(A v) {
  return A(1) / (A(1) + std::exp(-v));
}

// Geometry shared by forward and backward.
struct Geometry {
  int64_t B, T, C, K, P, Cp;  // Cp: C padded to kChanPad
  int64_t tb, nseg, ncb, cbw;  // time block, segments per batch item, channel blocks and width
  // Row strides of the scratch and of the weight taps: padded off powers of two so that the K
  // rows one output reads do not collide in the same L1 sets.
  int64_t ld() const { return cbw + kLdPad; }
  int64_t ldw() const { return Cp + kLdPad; }
  int64_t items() const { return B * nseg * ncb; }
  // Work items per parallel chunk: at least ~64K multiply-adds, so small problems run inline.
  int64_t grain() const {
    const int64_t work = std::min(T, tb) * std::min(Cp, cbw) * (K + 8);
    return std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(work, 1));
  }
};

// buffers: scratch buffers of about tb rows each per work item (1 forward, 2 backward);
// halo_rows: the extra rows they need beyond tb (K-1 forward, 2(K-1) backward).
Geometry make_geometry(int64_t B, int64_t T, int64_t C, int64_t K, bool causal, int64_t buffers,
                       int64_t halo_rows) {
  Geometry g{B, T, C, K, causal ? K - 1 : K / 2, (C + kChanPad - 1) / kChanPad * kChanPad,
             0, 0, 1, 0};
  g.cbw = g.Cp;  // all channels: whole rows of x are read
  const int64_t rows = kScratch / (buffers * g.Cp) - halo_rows;
  g.tb = std::clamp<int64_t>(rows / 4 * 4, 16, 256);
  g.nseg = (T + g.tb - 1) / g.tb;
  return g;
}

// g rows for times t0 .. t0+nrows-1 of batch item xb ([T,2C] rows), channels [c0, c0+cw),
// into dst [nrows, ld] (fp32); rows outside [0,T) and lanes [cw, ld) are zero.
template <typename T, typename A>
void glu_rows(const T* xb, int64_t T_, int64_t C, int64_t t0, int64_t nrows, int64_t c0,
              int64_t cw, A* dst, int64_t ld) {
  using VA = at::vec::Vectorized<A>;
  constexpr int64_t W = 2 * VA::size();
  for (int64_t r = 0; r < nrows; ++r) {
    A* d = dst + r * ld;
    const int64_t t = t0 + r;
    if (t < 0 || t >= T_) {
      std::fill(d, d + ld, A(0));
      continue;
    }
    const T* a = xb + t * 2 * C + c0;
    const T* g = a + C;
    int64_t j = 0;
    for (; j + W <= cw; j += W) {
      VA a0, a1, g0, g1;
      load2<T, A>(a + j, a0, a1);
      load2<T, A>(g + j, g0, g1);
      (a0 * vsigmoid(g0)).store(d + j);
      (a1 * vsigmoid(g1)).store(d + j + VA::size());
    }
    for (; j < cw; ++j) d[j] = static_cast<A>(a[j]) * sigmoid(static_cast<A>(g[j]));
    std::fill(d + cw, d + ld, A(0));
  }
}

// Correlation over time, channels in lanes: for r in [0, nout), lanes [0, width):
//   epilogue(r, lane, acc)  with  acc = init[lane] + sum_k w[k*ldw + lane] * src[(r+k)*ld + lane]
// width is a multiple of 2 vectors; epilogue receives two vectors (2V lanes) at a time.
template <typename A, typename Epi>
__attribute__((noinline)) void correlate(const A* src, int64_t ld, const A* w, int64_t ldw, const A* init, int64_t K,
               int64_t nout, int64_t width, Epi&& epilogue) {
  using VA = at::vec::Vectorized<A>;
  constexpr int64_t V = VA::size();
  for (int64_t lane = 0; lane < width; lane += 2 * V) {
    const VA i0 = init ? VA::loadu(init + lane) : VA(A(0));
    const VA i1 = init ? VA::loadu(init + lane + V) : VA(A(0));
    int64_t r = 0;
    // kRows = 4 output rows x 2 vectors in named registers (an array would be spilled).
    for (; r + 4 <= nout; r += 4) {
      VA a00 = i0, a01 = i1, a10 = i0, a11 = i1, a20 = i0, a21 = i1, a30 = i0, a31 = i1;
      const A* s = src + r * ld + lane;
      const A* wk = w + lane;
      for (int64_t k = 0; k < K; ++k, s += ld, wk += ldw) {
        const VA w0 = VA::loadu(wk), w1 = VA::loadu(wk + V);
        a00 = at::vec::fmadd(w0, VA::loadu(s), a00);
        a01 = at::vec::fmadd(w1, VA::loadu(s + V), a01);
        a10 = at::vec::fmadd(w0, VA::loadu(s + ld), a10);
        a11 = at::vec::fmadd(w1, VA::loadu(s + ld + V), a11);
        a20 = at::vec::fmadd(w0, VA::loadu(s + 2 * ld), a20);
        a21 = at::vec::fmadd(w1, VA::loadu(s + 2 * ld + V), a21);
        a30 = at::vec::fmadd(w0, VA::loadu(s + 3 * ld), a30);
        a31 = at::vec::fmadd(w1, VA::loadu(s + 3 * ld + V), a31);
      }
      // Through memory, so the accumulators' addresses never escape into the epilogue (GCC
      // otherwise keeps them on the stack inside the loop above).
      alignas(64) A res[8 * V];
      a00.store(res), a01.store(res + V), a10.store(res + 2 * V), a11.store(res + 3 * V);
      a20.store(res + 4 * V), a21.store(res + 5 * V), a30.store(res + 6 * V), a31.store(res + 7 * V);
      for (int j = 0; j < 4; ++j)
        epilogue(r + j, lane, VA::loadu(res + 2 * j * V), VA::loadu(res + (2 * j + 1) * V));
    }
    for (; r < nout; ++r) {
      VA acc0 = i0, acc1 = i1;
      const A* s = src + r * ld + lane;
      for (int64_t k = 0; k < K; ++k) {
        acc0 = at::vec::fmadd(VA::loadu(w + k * ldw + lane), VA::loadu(s + k * ld), acc0);
        acc1 = at::vec::fmadd(VA::loadu(w + k * ldw + lane + V), VA::loadu(s + k * ld + V), acc1);
      }
      epilogue(r, lane, acc0, acc1);
    }
  }
}

// Stores 2V fp32 lanes to dst (channels), only the first n of them when n < 2V.
template <typename T, typename A>
inline void store_lanes(T* dst, const at::vec::Vectorized<A>& lo, const at::vec::Vectorized<A>& hi,
                        int64_t n) {
  using VA = at::vec::Vectorized<A>;
  if (n >= 2 * VA::size()) {
    store2<T, A>(dst, lo, hi);
    return;
  }
  A buf[2 * VA::size()];
  lo.store(buf);
  hi.store(buf + VA::size());
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(buf[i]);
}

template <typename T>
void forward_kernel(const T* x, T* out, const acc_t<T>* wt, const acc_t<T>* bias,
                    const Geometry& G) {
  using A = acc_t<T>;
  using VA = at::vec::Vectorized<A>;
  at::parallel_for(0, G.items(), G.grain(), [&](int64_t begin, int64_t end) {
    std::vector<A> scratch((G.tb + G.K - 1) * G.ld());
    for (int64_t item = begin; item < end; ++item) {
      const int64_t cb = item % G.ncb, seg = (item / G.ncb) % G.nseg, b = item / (G.ncb * G.nseg);
      const int64_t ts = seg * G.tb, len = std::min(G.tb, G.T - ts);
      const int64_t c0 = cb * G.cbw, width = std::min(G.cbw, G.Cp - c0);
      const int64_t cw = std::min(width, G.C - c0);  // real channels in this block
      const T* xb = x + b * G.T * 2 * G.C;
      glu_rows<T, A>(xb, G.T, G.C, ts - G.P, len + G.K - 1, c0, cw, scratch.data(), G.ld());
      T* ob = out + (b * G.T + ts) * G.C + c0;
      correlate<A>(scratch.data(), G.ld(), wt + c0, G.ldw(), bias + c0, G.K, len, width,
                   [&](int64_t r, int64_t lane, VA y0, VA y1) {
                     if (lane >= cw) return;
                     store_lanes<T, A>(ob + r * G.C + lane, y0 * vsigmoid(y0), y1 * vsigmoid(y1),
                                       cw - lane);
                   });
    }
  });
}

// grad_weight terms of one vector of lanes: out[k*ldo] += sum_i gy[i*ld] * g[(i+k)*ld] for
// k < K, i < len; 4 taps at a time in named registers (kept out of line so GCC keeps them
// in registers).
template <typename A>
__attribute__((noinline)) void tap_sums(const A* gy, const A* g, int64_t ld, int64_t len,
                                        int64_t K, A* out, int64_t ldo) {
  using VA = at::vec::Vectorized<A>;
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) {
    VA s0(A(0)), s1(A(0)), s2(A(0)), s3(A(0));
    const A* gp = g + k * ld;
    for (int64_t i = 0; i < len; ++i, gp += ld) {
      const VA d = VA::loadu(gy + i * ld);
      s0 = at::vec::fmadd(d, VA::loadu(gp), s0);
      s1 = at::vec::fmadd(d, VA::loadu(gp + ld), s1);
      s2 = at::vec::fmadd(d, VA::loadu(gp + 2 * ld), s2);
      s3 = at::vec::fmadd(d, VA::loadu(gp + 3 * ld), s3);
    }
    (VA::loadu(out + k * ldo) + s0).store(out + k * ldo);
    (VA::loadu(out + (k + 1) * ldo) + s1).store(out + (k + 1) * ldo);
    (VA::loadu(out + (k + 2) * ldo) + s2).store(out + (k + 2) * ldo);
    (VA::loadu(out + (k + 3) * ldo) + s3).store(out + (k + 3) * ldo);
  }
  for (; k < K; ++k) {
    VA s0(A(0));
    for (int64_t i = 0; i < len; ++i) s0 = at::vec::fmadd(VA::loadu(gy + i * ld), VA::loadu(g + (i + k) * ld), s0);
    (VA::loadu(out + k * ldo) + s0).store(out + k * ldo);
  }
}

template <typename T>
void backward_kernel(const T* go, const T* x, T* gx, const acc_t<T>* wt, const acc_t<T>* wflip,
                     const acc_t<T>* bias, acc_t<T>* pw, acc_t<T>* pb, const Geometry& G) {
  using A = acc_t<T>;
  using VA = at::vec::Vectorized<A>;
  constexpr int64_t V = VA::size();
  const int64_t K = G.K, O = K - 1 - G.P;  // gy row q <-> time ts - O + q
  // The (b, segment) items are split into a fixed number of groups, each run in order by one
  // thread and summing into its own partial grad_weight/grad_bias: results do not depend on
  // the number of threads.
  const int64_t nbt = G.B * G.nseg, ngroups = std::min(nbt, kMaxGroups);
  const int64_t group_grain = std::max<int64_t>(1, G.grain() * ngroups / std::max<int64_t>(nbt, 1));
  at::parallel_for(0, ngroups, group_grain, [&](int64_t gbegin, int64_t gend) {
    const int64_t ld = G.ld();
    std::vector<A> g_s((G.tb + 2 * (K - 1)) * ld);  // g at ts-(K-1) .. te+K-2
    std::vector<A> gy_s((G.tb + K - 1) * ld);       // gy at ts-O .. te+P-1
    for (int64_t group = gbegin; group < gend; ++group)
    for (int64_t item = group * nbt / ngroups * G.ncb; item < (group + 1) * nbt / ngroups * G.ncb; ++item) {
      const int64_t cb = item % G.ncb, bt = item / G.ncb;
      const int64_t seg = bt % G.nseg, b = bt / G.nseg;
      const int64_t ts = seg * G.tb, len = std::min(G.tb, G.T - ts);
      const int64_t c0 = cb * G.cbw, width = std::min(G.cbw, G.Cp - c0);
      const int64_t cw = std::min(width, G.C - c0);
      const T* xb = x + b * G.T * 2 * G.C;
      const T* gob = go + b * G.T * G.C + c0;
      glu_rows<T, A>(xb, G.T, G.C, ts - (K - 1), len + 2 * (K - 1), c0, cw, g_s.data(), ld);
      // gy[q] for times u = ts - O + q: recompute y, apply silu' and grad_out (0 outside [0,T)).
      correlate<A>(g_s.data(), ld, wt + c0, G.ldw(), bias + c0, K, len + K - 1, width,
                   [&](int64_t q, int64_t lane, VA y0, VA y1) {
                     A* d = gy_s.data() + q * ld + lane;
                     const int64_t u = ts - O + q;
                     if (u < 0 || u >= G.T || lane >= cw) {
                       VA(A(0)).store(d);
                       VA(A(0)).store(d + V);
                       return;
                     }
                     VA g0, g1;
                     const T* src = gob + u * G.C + lane;
                     if (cw - lane >= 2 * V) {
                       load2<T, A>(src, g0, g1);
                     } else {
                       A buf[2 * V] = {};
                       for (int64_t i = 0; i < cw - lane; ++i) buf[i] = static_cast<A>(src[i]);
                       g0 = VA::loadu(buf);
                       g1 = VA::loadu(buf + V);
                     }
                     const VA one(A(1));
                     const VA s0 = vsigmoid(y0), s1 = vsigmoid(y1);
                     (g0 * s0 * at::vec::fmadd(y0, one - s0, one)).store(d);
                     (g1 * s1 * at::vec::fmadd(y1, one - s1, one)).store(d + V);
                   });
      // grad_x for t in [ts, ts+len): gg[i] = sum_k wflip[k] * gy[i + k].
      T* gxb = gx + b * G.T * 2 * G.C;
      correlate<A>(gy_s.data(), ld, wflip + c0, G.ldw(), nullptr, K, len, width,
                   [&](int64_t i, int64_t lane, VA gg0, VA gg1) {
                     if (lane >= cw) return;
                     const int64_t t = ts + i, n = std::min<int64_t>(2 * V, cw - lane);
                     const T* a = xb + t * 2 * G.C + c0 + lane;
                     const T* g = a + G.C;
                     T* da = gxb + t * 2 * G.C + c0 + lane;
                     T* dg = da + G.C;
                     VA a0, a1, z0, z1;
                     if (n == 2 * V) {
                       load2<T, A>(a, a0, a1);
                       load2<T, A>(g, z0, z1);
                     } else {
                       A ba[2 * V] = {}, bg[2 * V] = {};
                       for (int64_t j = 0; j < n; ++j) {
                         ba[j] = static_cast<A>(a[j]);
                         bg[j] = static_cast<A>(g[j]);
                       }
                       a0 = VA::loadu(ba), a1 = VA::loadu(ba + V);
                       z0 = VA::loadu(bg), z1 = VA::loadu(bg + V);
                     }
                     const VA one(A(1));
                     const VA s0 = vsigmoid(z0), s1 = vsigmoid(z1);
                     store_lanes<T, A>(da, gg0 * s0, gg1 * s1, n);
                     store_lanes<T, A>(dg, gg0 * a0 * s0 * (one - s0), gg1 * a1 * s1 * (one - s1), n);
                   });
      // Add this (b, segment)'s grad_weight/grad_bias terms to its group's partial sums: times
      // u in [ts, ts+len), i.e. gy rows O..O+len-1, against g rows O+k..O+k+len-1.
      A* pwb = pw + group * K * G.Cp + c0;
      A* pbb = pb + group * G.Cp + c0;
      for (int64_t lane = 0; lane < width; lane += V) {
        VA bsum = VA::loadu(pbb + lane);
        for (int64_t i = 0; i < len; ++i) bsum = bsum + VA::loadu(gy_s.data() + (O + i) * ld + lane);
        bsum.store(pbb + lane);
        tap_sums<A>(gy_s.data() + O * ld + lane, g_s.data() + O * ld + lane, ld, len, K,
                    pwb + lane, G.Cp);
      }
    }
  });
}

template <typename A>
const A* cptr(const at::Tensor& t) {
  return static_cast<const A*>(t.const_data_ptr());
}
template <typename A>
A* mptr(const at::Tensor& t) {
  return static_cast<A*>(t.mutable_data_ptr());
}

template <typename F>
void dispatch_conv_dtype(at::ScalarType t, const char* op, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    case at::kDouble: f(double{}); break;
    default:
      TORCH_CHECK(false, op, ": x has unsupported dtype ", t,
                  " (expected float32, bfloat16, float16 or float64)");
  }
}

void check_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                const at::Tensor& bias, bool causal) {
  TORCH_CHECK(x.dim() == 3, op, ": x must have shape [B,T,2C], got ", x.sizes());
  TORCH_CHECK(weight.dim() == 2, op, ": weight must have shape [C,K], got ", weight.sizes());
  TORCH_CHECK(bias.dim() == 1, op, ": bias must have shape [C], got ", bias.sizes());
  const int64_t C = weight.size(0), K = weight.size(1);
  TORCH_CHECK(x.size(2) == 2 * C, op, ": x must have 2C = ", 2 * C,
              " channels (weight has C = ", C, "), got ", x.size(2));
  TORCH_CHECK(bias.size(0) == C, op, ": bias must have C = ", C, " entries, got ", bias.size(0));
  TORCH_CHECK(K >= 1, op, ": weight must have a kernel size K >= 1, got K = ", K);
  TORCH_CHECK(causal || K % 2 == 1, op, ": kernel size K = ", K,
              " must be odd for 'same' padding (or use causal=True)");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight must have the dtype of x (",
              x.scalar_type(), "), got ", weight.scalar_type());
  TORCH_CHECK(bias.scalar_type() == x.scalar_type(), op, ": bias must have the dtype of x (",
              x.scalar_type(), "), got ", bias.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu() && bias.device().is_cpu(), op,
              ": x, weight and bias must be CPU tensors, got ", x.device(), ", ", weight.device(),
              ", ", bias.device());
}

// weight [C,K] -> [K,ldw] in the compute type (flipped over K when flip), zero padded lanes.
at::Tensor weight_taps(const at::Tensor& weight, int64_t ldw, at::ScalarType acc, bool flip) {
  const int64_t C = weight.size(0), K = weight.size(1);
  auto w = weight.to(acc);
  if (flip) w = w.flip({1});
  auto out = at::zeros({K, ldw}, weight.options().dtype(acc));
  out.narrow(1, 0, C).copy_(w.t());
  return out;
}

// p [N, ...] -> sum over N, in order n = 0..N-1 for every element (independent of threads).
template <typename A>
at::Tensor sum_partials(const at::Tensor& p) {
  const int64_t n = p.size(0), m = p.numel() / std::max<int64_t>(n, 1);
  auto out = at::empty({m}, p.options());
  const A* src = cptr<A>(p);
  A* dst = mptr<A>(out);
  at::parallel_for(0, m, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) dst[j] = A(0);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = begin; j < end; ++j) dst[j] += src[i * m + j];
  });
  return out;
}

at::Tensor padded(const at::Tensor& v, int64_t Cp, at::ScalarType acc) {
  auto out = at::zeros({Cp}, v.options().dtype(acc));
  out.narrow(0, 0, v.size(0)).copy_(v);
  return out;
}

at::Tensor conformer_conv_cpu(const at::Tensor& x, const at::Tensor& weight,
                              const at::Tensor& bias, bool causal) {
  check_args("conformer_conv", x, weight, bias, causal);
  const int64_t B = x.size(0), T_ = x.size(1), C = weight.size(0), K = weight.size(1);
  auto out = at::empty({B, T_, C}, x.options());
  if (out.numel() == 0) return out;
  const auto geo = make_geometry(B, T_, C, K, causal, 1, K - 1);
  dispatch_conv_dtype(x.scalar_type(), "conformer_conv", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const auto acc = c10::CppTypeToScalarType<A>::value;
    const auto xc = x.contiguous();
    const auto wt = weight_taps(weight, geo.ldw(), acc, false), bp = padded(bias, geo.Cp, acc);
    forward_kernel<T>(xc.const_data_ptr<T>(), out.mutable_data_ptr<T>(), cptr<A>(wt),
                      cptr<A>(bp), geo);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conformer_conv_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& bias, bool causal) {
  check_args("conformer_conv_backward", x, weight, bias, causal);
  const int64_t B = x.size(0), T_ = x.size(1), C = weight.size(0), K = weight.size(1);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({B, T_, C}),
              "conformer_conv_backward: grad_out must have shape [B,T,C] = [", B, ", ", T_, ", ",
              C, "], got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(),
              "conformer_conv_backward: grad_out must have the dtype of x (", x.scalar_type(),
              "), got ", grad_out.scalar_type());
  TORCH_CHECK(grad_out.device().is_cpu(),
              "conformer_conv_backward: grad_out must be a CPU tensor, got ", grad_out.device());
  auto grad_x = at::empty({B, T_, 2 * C}, x.options());
  if (B * T_ * C == 0) {
    return {grad_x, at::zeros_like(weight, at::MemoryFormat::Contiguous),
            at::zeros_like(bias, at::MemoryFormat::Contiguous)};
  }
  const auto geo = make_geometry(B, T_, C, K, causal, 2, 2 * (K - 1));
  const int64_t ngroups = std::min(B * geo.nseg, kMaxGroups);
  at::Tensor gw, gb;
  dispatch_conv_dtype(x.scalar_type(), "conformer_conv_backward", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const auto acc = c10::CppTypeToScalarType<A>::value;
    const auto xc = x.contiguous(), goc = grad_out.contiguous();
    const auto wt = weight_taps(weight, geo.ldw(), acc, false);
    const auto wf = weight_taps(weight, geo.ldw(), acc, true);
    const auto bp = padded(bias, geo.Cp, acc);
    // Partial sums per group of (b, time segment) items in the compute type, then summed in a
    // fixed order.
    auto pw = at::zeros({ngroups, K, geo.Cp}, x.options().dtype(acc));
    auto pb = at::zeros({ngroups, geo.Cp}, x.options().dtype(acc));
    backward_kernel<T>(goc.const_data_ptr<T>(), xc.const_data_ptr<T>(),
                       grad_x.mutable_data_ptr<T>(), cptr<A>(wt),
                       cptr<A>(wf), cptr<A>(bp), mptr<A>(pw),
                       mptr<A>(pb), geo);
    gw = sum_partials<A>(pw).view({K, geo.Cp}).narrow(1, 0, C).t().to(weight.scalar_type());
    gb = sum_partials<A>(pb).narrow(0, 0, C).to(bias.scalar_type());
  });
  return {grad_x, gw.contiguous(), gb.contiguous()};
}

}  // namespace

TORCH_LIBRARY_IMPL(pysonic, CPU, m) {
  m.impl("conformer_conv", &conformer_conv_cpu);
  m.impl("conformer_conv_backward", &conformer_conv_backward_cpu);
}

}  // namespace pysonic::cpu
