// CPU kernels for pysonic::attention and pysonic::attention_backward (flash-attention style).
//
// Contract (see csrc/ops.cpp):
//   q [B,H,Tq,D], k/v [B,Hkv,Tk,D], H % Hkv == 0 (query head h reads kv head h / (H / Hkv)).
//   s_ij = scale * <q_i, k_j>, scale defaults to 1/sqrt(D).
//   Key j is visible to query i iff j < key_lengths[b] (when given) and, when causal,
//   j <= i + (Tk - Tq) (bottom-right aligned). Rows with no visible key give out = 0, lse = -inf.
//   out [B,H,Tq,D] (q.dtype) = softmax over visible j of s_ij, times v; lse [B,H,Tq] float32 is
//   the log-sum-exp of the visible s_ij.
//
// Forward: parallel over (b, h, query block). Each task streams key/value blocks through an
// online softmax (running row max and row sum, output rescaled when the max grows), so only a
// [qBlock x kvBlock] score tile is ever held. Both products of a tile are blocked matrix products
// (at::native::cpublas::brgemm: oneDNN micro-kernels, AVX-512 for fp32, AMX for bf16). Operands
// are prepared once per call at tensor level: k is transposed to [D, Tk] (the B operand of
// q @ k^T); for bf16 on AMX, k^T and v are also packed per key block into the VNNI layout
// (pairs of reduction rows interleaved: [K/2][N][2]) that AMX reads. fp16 (and bf16 where AMX
// is absent) runs the fp32 path on converted inputs; float64 runs the same loops with a plain
// scalar matrix product (slow, meant for gradcheck).
//
// Backward (flash-attention-2, recomputing P from lse): parallel over (b, h). For each key block
// j and each query block i that sees it, in transposed orientation so that every product reads
// row-major operands:
//   S^T = K_j Q_i^T, P^T = exp(S^T - lse_i) (masked), dV_j += P^T dO_i, dP^T = V_j dO_i^T,
//   dS^T = scale * P^T (dP^T - Delta_i) with Delta_i = rowsum(dO_i * O_i),
//   dK_j += dS^T Q_i, dQ_i^T += K_j^T dS^T.
// dK/dV are accumulated per query head in fp32 and summed over each kv head's query group.
// Inputs of every dtype are converted to fp32 (float64 stays float64) for the backward.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/vec_utils.h"

namespace pysonic::cpu {
namespace {

constexpr int64_t kMaxHeadDim = 128;
// Forward tiles: 64 query rows (the AMX/AVX-512 micro-kernels' sweet spot for M) x 768 keys (few
// online-softmax rescales; the fp32 score tile, 192 KB, stays in L2). Measured best among
// 32..128 x 256..1536 at T=1500, D=64.
constexpr int64_t kQBlock = 64;
constexpr int64_t kKvBlock = 768;
constexpr int64_t kBwdQBlock = 64;
constexpr int64_t kBwdKvBlock = 64;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------------------------
// Blocked matrix products: C[M,N] = (add ? C : 0) + A[M,K] @ B[K,N], all row-major with leading
// dimensions lda, ldb, ldc.

inline void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                 int64_t ldb, float* C, int64_t ldc, bool add) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, B, C, /*is_vnni=*/false);
}

inline void gemm(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B,
                 int64_t ldb, double* C, int64_t ldc, bool add) {
  for (int64_t i = 0; i < M; ++i) {
    double* c = C + i * ldc;
    if (!add) std::fill(c, c + N, 0.0);
    for (int64_t k = 0; k < K; ++k) {
      const double a = A[i * lda + k];
      const double* b = B + k * ldb;
      for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
    }
  }
}

// bf16 A (row-major) times bf16 B packed in VNNI layout ([K/2][ldb][2], K even), fp32 C (AMX).
inline void gemm(int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda,
                 const c10::BFloat16* B, int64_t ldb, float* C, int64_t ldc, bool add) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, B, C, /*is_vnni=*/true);
}

// ---------------------------------------------------------------------------------------------
// Which keys a query row sees: keys [0, visible(b, i)).

struct Visibility {
  int64_t Tq, Tk;
  bool causal;
  const int64_t* lengths;  // [B] or nullptr

  int64_t operator()(int64_t b, int64_t i) const {
    int64_t n = lengths != nullptr ? lengths[b] : Tk;
    if (causal) n = std::min(n, std::max<int64_t>(0, i + (Tk - Tq) + 1));
    return n;
  }
  // First query row i in [m0, m0 + rows) that sees key j, relative to m0 (rows if none).
  int64_t first_row(int64_t b, int64_t j, int64_t m0, int64_t rows) const {
    if (lengths != nullptr && j >= lengths[b]) return rows;
    if (!causal) return 0;
    return std::min(rows, std::max<int64_t>(0, j - (Tk - Tq) - m0));
  }
};

// ---------------------------------------------------------------------------------------------
// Row softmax pieces on accumulator types (float vectorised, double scalar).

// Lane-wise max without NaN bookkeeping (scores are finite; a NaN input would show up in the
// sum anyway).
inline Vec fast_max(const Vec& a, const Vec& b) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_max_ps(a, b);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_max_ps(a, b);
#else
  return at::vec::maximum(a, b);
#endif
}

// max over x[0:n] * scale
inline float scaled_max(const float* x, int64_t n, float scale) {
  Vec m0(kNegInf), m1(kNegInf);
  int64_t c = 0;
  for (; c + kPair <= n; c += kPair) {
    m0 = fast_max(m0, Vec::loadu(x + c));
    m1 = fast_max(m1, Vec::loadu(x + c + Vec::size()));
  }
  Vec lo = fast_max(m0, m1), hi = lo;
  for (; c < n; ++c) {
    lo = fast_max(lo, Vec(x[c]));
  }
  (void)hi;
  float mx = kNegInf, mn = std::numeric_limits<float>::infinity();
  float lanes[Vec::size()];
  lo.store(lanes);
  for (int64_t i = 0; i < Vec::size(); ++i) mx = std::max(mx, lanes[i]);
  if (scale >= 0.f) return mx * scale;
  // negative scale: the largest scaled score comes from the smallest raw score
  for (c = 0; c < n; ++c) mn = std::min(mn, x[c]);
  return mn * scale;
}
inline double scaled_max(const double* x, int64_t n, double scale) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t c = 0; c < n; ++c) m = std::max(m, x[c] * scale);
  return m;
}

// Stores 2 * Vec::size() probabilities (one native instruction for bf16 where the CPU has it).
template <typename P>
inline void store_probs(P* p, const Vec& lo, const Vec& hi) {
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
  if constexpr (std::is_same_v<P, c10::BFloat16>) {
    _mm512_storeu_si512(p, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    return;
  }
#endif
  store_pair(p, lo, hi);
}

#if defined(CPU_CAPABILITY_AVX512)
// 2^t for t <= 0: 2^floor(t) * poly(frac(t)), with a least-squares polynomial of the given degree
// (max relative error 8.4e-8 for degree 5, below fp32 rounding; 8.7e-5 for degree 3, far below
// the bf16 rounding the probabilities get next). t is clamped at -127; NaN stays NaN.
template <int kDegree>
inline __m512 exp2_poly(__m512 t) {
  t = _mm512_max_ps(_mm512_set1_ps(-127.f), t);
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p;
  if constexpr (kDegree == 3) {
    p = _mm512_fmadd_ps(f, _mm512_set1_ps(0.07705013f), _mm512_set1_ps(0.22766343f));
    p = _mm512_fmadd_ps(f, p, _mm512_set1_ps(0.69511271f));
  } else {
    p = _mm512_fmadd_ps(f, _mm512_set1_ps(0.0018669533f), _mm512_set1_ps(0.0090174004f));
    p = _mm512_fmadd_ps(f, p, _mm512_set1_ps(0.055799656f));
    p = _mm512_fmadd_ps(f, p, _mm512_set1_ps(0.24016452f));
    p = _mm512_fmadd_ps(f, p, _mm512_set1_ps(0.6931513f));
  }
  p = _mm512_fmadd_ps(f, p, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}
#endif

// p[c] = exp(x[c] * scale - shift) for c < n, returns their sum; p may alias x. p must have room
// for n rounded up to 2 * Vec::size(): the tail is computed as a full (masked) vector and stores
// zeros past n.
template <typename P>
inline float exp_sum(const float* x, int64_t n, float scale, float shift, P* p) {
  Vec vsum(0.f);
  int64_t c = 0;
#if defined(CPU_CAPABILITY_AVX512)
  constexpr float kLog2e = 1.4426950408889634f;
  const __m512 vs = _mm512_set1_ps(scale * kLog2e), vshift = _mm512_set1_ps(shift * kLog2e);
  constexpr int kDegree = std::is_same_v<P, float> ? 5 : 3;
  for (; c < n; c += kPair) {
    const int64_t rem = n - c;
    const __mmask16 m0 = rem >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << rem) - 1);
    const __mmask16 m1 = rem >= 32 ? 0xFFFF : rem <= 16 ? 0 : static_cast<__mmask16>((1u << (rem - 16)) - 1);
    const Vec e0 = _mm512_maskz_mov_ps(
        m0, exp2_poly<kDegree>(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(m0, x + c), vs, vshift)));
    const Vec e1 = _mm512_maskz_mov_ps(
        m1, exp2_poly<kDegree>(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(m1, x + c + 16), vs, vshift)));
    vsum = vsum + e0 + e1;
    store_probs(p + c, e0, e1);
  }
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vsum);
#else
  const Vec vs(scale), vshift(shift);
  for (; c + kPair <= n; c += kPair) {
    const Vec e0 = at::vec::fmsub(Vec::loadu(x + c), vs, vshift).exp_u20();
    const Vec e1 = at::vec::fmsub(Vec::loadu(x + c + Vec::size()), vs, vshift).exp_u20();
    vsum = vsum + e0 + e1;
    store_probs(p + c, e0, e1);
  }
  float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vsum);
  for (; c < n; ++c) {
    const float e = std::exp(x[c] * scale - shift);
    sum += e;
    p[c] = static_cast<P>(e);
  }
  return sum;
#endif
}
inline double exp_sum(const double* x, int64_t n, double scale, double shift, double* p) {
  double sum = 0;
  for (int64_t c = 0; c < n; ++c) {
    p[c] = std::exp(x[c] * scale - shift);
    sum += p[c];
  }
  return sum;
}

template <typename T>
inline void scale_row(T* x, int64_t n, T a) {
  if constexpr (std::is_same_v<T, float>) {
    at::vec::map([a](Vec v) { return v * Vec(a); }, x, x, n);
  } else {
    for (int64_t c = 0; c < n; ++c) x[c] *= a;
  }
}

// ---------------------------------------------------------------------------------------------
// Forward.

// Operands of the forward tiles. in_t: the product input type (float, double or bf16 packed);
// acc_t: accumulator type.
template <typename in_t>
struct FwdOperands {
  const in_t* q;  // row m of (b, h): q + b*qsb + h*qsh + m*qst, Dk contiguous entries
  int64_t qsb, qsh, qst;
  int64_t Dk;     // reduction length of q @ k^T (D, or D rounded up to even for VNNI)
  const in_t* kt; // key block j of (b, hk): kt + (b*Hkv + hk)*ksh + j*ksj, [Dk, kv] with ld ldk
  int64_t ksh, ksj, ldk;
  const in_t* v;  // key block j of (b, hk): v + b*vsb + hk*vsh + j*vsj, [kv, D] with ld ldv
  int64_t vsb, vsh, vsj, ldv;
  bool pad_even;  // the P @ V reduction length must be even (VNNI): pad P with a zero column
};

template <typename in_t, typename acc_t, typename out_t>
void attention_forward_kernel(const FwdOperands<in_t>& op, out_t* out, float* lse, int64_t B,
                              int64_t H, int64_t Hkv, int64_t D, const Visibility& vis,
                              acc_t scale, int64_t qblock, int64_t kvblock) {
  const int64_t Tq = vis.Tq;
  const int64_t group = H / Hkv;
  const int64_t nq = (Tq + qblock - 1) / qblock;
  constexpr bool separate_p = !std::is_same_v<in_t, acc_t>;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();

  at::parallel_for(0, B * H * nq, 1, [&](int64_t begin, int64_t end) {
    // row length of the S and P tiles: room for the vector tail of exp_sum and the even padding
    const int64_t kv_pad = (kvblock + kPair - 1) / kPair * kPair;
    std::vector<acc_t> s_buf(qblock * kv_pad), o_buf(qblock * D), mx(qblock), sum(qblock);
    std::vector<in_t> p_buf(separate_p ? qblock * kv_pad : 0);
    acc_t* S = s_buf.data();
    in_t* P = separate_p ? p_buf.data() : reinterpret_cast<in_t*>(S);
    acc_t* O = o_buf.data();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qi = task % nq, bh = task / nq, h = bh % H, b = bh / H, hk = h / group;
      const int64_t m0 = qi * qblock, rows = std::min(qblock, Tq - m0);
      const in_t* qp = op.q + b * op.qsb + h * op.qsh + m0 * op.qst;
      const int64_t nkeys = vis(b, m0 + rows - 1);  // the last row sees the most keys
      std::fill(mx.begin(), mx.begin() + rows, neg_inf);
      std::fill(sum.begin(), sum.begin() + rows, acc_t(0));
      int64_t j = 0;
      for (int64_t n0 = 0; n0 < nkeys; n0 += kvblock, ++j) {
        const int64_t cols = std::min(kvblock, nkeys - n0);
        const int64_t cols_e = op.pad_even ? (cols + 1) / 2 * 2 : cols;
        // S = q_tile @ k_block^T, ld of S and P is kv_pad
        gemm(rows, cols, op.Dk, qp, op.qst, op.kt + (b * Hkv + hk) * op.ksh + j * op.ksj, op.ldk,
             S, kv_pad, false);
        for (int64_t r = 0; r < rows; ++r) {
          acc_t* srow = S + r * kv_pad;
          in_t* prow = P + r * kv_pad;
          const int64_t lim = std::min(cols, std::max<int64_t>(0, vis(b, m0 + r) - n0));
          const acc_t m_new = std::max(mx[r], lim > 0 ? scaled_max(srow, lim, scale) : neg_inf);
          if (m_new == neg_inf) {  // nothing visible yet: P row is zero, O row stays zero
            std::fill(prow, prow + cols_e, in_t(0));
            continue;
          }
          const acc_t alpha = std::exp(mx[r] - m_new);  // 0 when mx was -inf
          const acc_t rs = exp_sum(srow, lim, scale, m_new, prow);
          std::fill(prow + lim, prow + cols_e, in_t(0));
          sum[r] = sum[r] * alpha + rs;
          mx[r] = m_new;
          if (j > 0 && alpha != acc_t(1)) scale_row(O + r * D, D, alpha);
        }
        // O (+)= P @ v_block
        gemm(rows, D, cols_e, P, kv_pad, op.v + b * op.vsb + hk * op.vsh + j * op.vsj, op.ldv, O,
             D, j > 0);
      }
      out_t* orow = out + ((b * H + h) * Tq + m0) * D;
      float* lrow = lse + (b * H + h) * Tq + m0;
      for (int64_t r = 0; r < rows; ++r) {
        if (nkeys == 0 || sum[r] == acc_t(0)) {
          std::fill(orow + r * D, orow + (r + 1) * D, out_t(0));
          lrow[r] = kNegInf;
          continue;
        }
        const acc_t inv = acc_t(1) / sum[r];
        const acc_t* o = O + r * D;
        for (int64_t d = 0; d < D; ++d) orow[r * D + d] = static_cast<out_t>(o[d] * inv);
        lrow[r] = static_cast<float>(mx[r] + std::log(sum[r]));
      }
    }
    if constexpr (!std::is_same_v<in_t, double>) at::native::cpublas::brgemm_release();
  });
}

// ---------------------------------------------------------------------------------------------
// Checks shared by forward and backward.

struct Shapes {
  int64_t B, H, Hkv, Tq, Tk, D;
};

Shapes check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const std::optional<at::Tensor>& key_lengths) {
  TORCH_CHECK(q.dim() == 4, op, ": q must have shape [B,H,Tq,D], got ", q.sizes());
  TORCH_CHECK(k.dim() == 4, op, ": k must have shape [B,Hkv,Tk,D], got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": v must have the shape of k ", k.sizes(), ", got ",
              v.sizes());
  for (auto* t : {&k, &v}) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), op, ": ", t == &k ? "k" : "v",
                " must have the dtype of q (", q.scalar_type(), "), got ", t->scalar_type());
    TORCH_CHECK(t->device() == q.device(), op, ": ", t == &k ? "k" : "v",
                " must be on the device of q (", q.device(), "), got ", t->device());
  }
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble, op,
              ": unsupported dtype ", dt, " for q (expected float32, bfloat16, float16 or float64)");
  Shapes s{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3)};
  TORCH_CHECK(k.size(0) == s.B, op, ": k batch size ", k.size(0), " != q batch size ", s.B);
  TORCH_CHECK(k.size(3) == s.D, op, ": k head dim ", k.size(3), " != q head dim ", s.D);
  TORCH_CHECK(s.Hkv > 0 ? s.H % s.Hkv == 0 : s.H == 0, op, ": the number of query heads (", s.H,
              ") must be a multiple of the number of kv heads in k (", s.Hkv, ")");
  TORCH_CHECK(s.D <= kMaxHeadDim, op, ": head dim D = ", s.D, " exceeds the maximum of ",
              kMaxHeadDim);
  if (key_lengths) {
    const auto& kl = *key_lengths;
    TORCH_CHECK(kl.device() == q.device(), op, ": key_lengths must be on the device of q (",
                q.device(), "), got ", kl.device());
    TORCH_CHECK(!kl.is_floating_point() && !kl.is_complex() && kl.scalar_type() != at::kBool, op,
                ": key_lengths must be an integer tensor, got ", kl.scalar_type());
    TORCH_CHECK(kl.dim() == 1 && kl.size(0) == s.B, op, ": key_lengths must have shape [B] = [",
                s.B, "], got ", kl.sizes());
  }
  return s;
}

// key_lengths as a contiguous int64 CPU tensor, checked to lie in [0, Tk].
at::Tensor lengths_tensor(const char* op, const std::optional<at::Tensor>& key_lengths,
                          int64_t Tk) {
  if (!key_lengths) return at::Tensor();
  auto kl = key_lengths->to(at::kLong).contiguous();
  if (kl.numel() > 0) {
    const int64_t lo = kl.min().item<int64_t>(), hi = kl.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi <= Tk, op, ": key_lengths must lie in [0, Tk] = [0, ", Tk,
                "], got values in [", lo, ", ", hi, "]");
  }
  return kl;
}

// A view of t [B,H,T,D] whose rows of D values are contiguous and do not overlap (strides of
// the B, H and T dimensions are free, so e.g. a transposed [B,T,H,D] tensor is read in place).
at::Tensor rows_contiguous(const at::Tensor& t) {
  const bool rows_ok = t.size(3) <= 1 || t.stride(3) == 1;
  const bool apart = t.size(2) <= 1 || t.stride(2) >= t.size(3);
  return rows_ok && apart ? t : t.contiguous();
}

// The distance between rows of a rows_contiguous tensor, as a matrix leading dimension (>= D).
int64_t row_ld(const at::Tensor& t) {
  return t.size(2) <= 1 ? t.size(3) : t.stride(2);
}

// AMX bf16 products through oneDNN (false without AMX, or when oneDNN is disabled at runtime
// with torch.backends.mkldnn.enabled = False; asked on every call for that reason).
bool use_amx_bf16() {
  return at::native::cpublas::could_pack(at::kBFloat16);
}

// Key/value operands packed per key block of kvb keys (zeros beyond Tk and D), from k or v
// [B,Hkv,Tk,D] with any strides:
//   k^T, plain:  [B,Hkv,nkb][Dp][kvb]        element (d, n) at d*kvb + n
//   k^T, VNNI:   [B,Hkv,nkb][Dp/2][kvb][2]   element (d, n) at (d/2)*2*kvb + 2*n + d%2
//   v,   VNNI:   [B,Hkv,nkb][kvb/2][D][2]    element (n, d) at (n/2)*2*D + 2*d + n%2
enum class Pack { KtPlain, KtVnni, VVnni };

template <typename T>
at::Tensor pack_kv(const at::Tensor& x, int64_t kvb, int64_t Dp, Pack kind) {
  const int64_t B = x.size(0), Hkv = x.size(1), Tk = x.size(2), D = x.size(3);
  const int64_t nkb = (Tk + kvb - 1) / kvb;
  const int64_t cols = kind == Pack::VVnni ? D : Dp;
  auto out = at::empty({B, Hkv, nkb, kvb * cols}, x.options());
  const T* src = x.data_ptr<T>();
  T* dst = out.data_ptr<T>();
  const int64_t s0 = x.stride(0), s1 = x.stride(1), s2 = x.stride(2), s3 = x.stride(3);
  at::parallel_for(0, B * Hkv * nkb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t j = task % nkb, bh = task / nkb, h = bh % Hkv, b = bh / Hkv;
      const T* blk = src + b * s0 + h * s1 + j * kvb * s2;
      T* o = dst + task * kvb * cols;
      const int64_t rows = std::min(kvb, Tk - j * kvb);
      if (kind == Pack::VVnni) {  // pairs of key rows interleaved: contiguous writes
        for (int64_t n = 0; n < kvb; ++n) {
          const T* row = blk + n * s2;
          T* on = o + (n >> 1) * 2 * D + (n & 1);
          for (int64_t d = 0; d < D; ++d) on[2 * d] = n < rows ? row[d * s3] : T(0);
        }
        continue;
      }
      // k^T: a transpose, done in chunks of kChunk keys so that the rows read stay in L1 while
      // every output row is written contiguously.
      constexpr int64_t kChunk = 32;
      const bool pairs = kind == Pack::KtVnni && sizeof(T) == 2 && s3 == 1 && D % 2 == 0;
      for (int64_t n0 = 0; n0 < kvb; n0 += kChunk) {
        const int64_t n1 = std::min(n0 + kChunk, kvb), valid = std::min(n1, rows);
        if (pairs) {  // move (d, d+1) pairs as one 32-bit word: word (d/2, n) of the VNNI block
          uint32_t* o32 = reinterpret_cast<uint32_t*>(o);
          for (int64_t d2 = 0; d2 < Dp / 2; ++d2) {
            uint32_t* od = o32 + d2 * kvb;
            for (int64_t n = n0; n < valid; ++n) std::memcpy(od + n, blk + n * s2 + 2 * d2, 4);
            for (int64_t n = std::max(valid, n0); n < n1; ++n) od[n] = 0;
          }
        } else if (kind == Pack::KtPlain) {
          for (int64_t d = 0; d < Dp; ++d) {
            T* od = o + d * kvb;
            for (int64_t n = n0; n < n1; ++n) od[n] = n < rows && d < D ? blk[n * s2 + d * s3] : T(0);
          }
        } else {
          for (int64_t d = 0; d < Dp; ++d) {
            T* od = o + (d >> 1) * 2 * kvb + (d & 1);
            for (int64_t n = n0; n < n1; ++n)
              od[2 * n] = n < rows && d < D ? blk[n * s2 + d * s3] : T(0);
          }
        }
      }
    }
  });
  return out;
}

template <typename T, typename acc_t, typename out_t>
void forward_plain(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                   at::Tensor& lse, const Shapes& s, const Visibility& vis, double scale) {
  // fp32 / fp64: k^T packed per key block as the B operand of q @ k^T; v read in place.
  auto qr = rows_contiguous(q), vr = rows_contiguous(v);
  at::Tensor kt = pack_kv<T>(k, kKvBlock, s.D, Pack::KtPlain);
  FwdOperands<T> op{qr.data_ptr<T>(), qr.stride(0), qr.stride(1), row_ld(qr), s.D,
                    kt.data_ptr<T>(), kt.stride(1), kt.stride(2), kKvBlock,
                    vr.data_ptr<T>(), vr.stride(0), vr.stride(1), kKvBlock * row_ld(vr),
                    row_ld(vr), false};
  attention_forward_kernel<T, acc_t, out_t>(op, out.data_ptr<out_t>(), lse.data_ptr<float>(),
                                            s.B, s.H, s.Hkv, s.D, vis, static_cast<acc_t>(scale),
                                            kQBlock, kKvBlock);
}

void forward_bf16_amx(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      at::Tensor& out, at::Tensor& lse, const Shapes& s, const Visibility& vis,
                      double scale) {
  using bf16 = c10::BFloat16;
  const int64_t Dp = (s.D + 1) / 2 * 2;
  auto qr = Dp == s.D ? rows_contiguous(q) : at::constant_pad_nd(q, {0, Dp - s.D});
  auto kt = pack_kv<bf16>(k, kKvBlock, Dp, Pack::KtVnni);
  auto vp = pack_kv<bf16>(v, kKvBlock, Dp, Pack::VVnni);
  FwdOperands<bf16> op{qr.data_ptr<bf16>(), qr.stride(0), qr.stride(1), row_ld(qr), Dp,
                       kt.data_ptr<bf16>(), kt.stride(1), kt.stride(2), kKvBlock,
                       vp.data_ptr<bf16>(), vp.stride(0), vp.stride(1), vp.stride(2), s.D, true};
  attention_forward_kernel<bf16, float, bf16>(op, out.data_ptr<bf16>(), lse.data_ptr<float>(),
                                              s.B, s.H, s.Hkv, s.D, vis,
                                              static_cast<float>(scale), kQBlock, kKvBlock);
}

std::tuple<at::Tensor, at::Tensor> attention_cpu(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v, bool causal,
                                                 std::optional<double> scale,
                                                 const std::optional<at::Tensor>& key_lengths) {
  const char* op = "attention";
  const Shapes s = check_inputs(op, q, k, v, key_lengths);
  auto lengths = lengths_tensor(op, key_lengths, s.Tk);
  const double sc = scale ? *scale : 1.0 / std::sqrt(static_cast<double>(std::max<int64_t>(s.D, 1)));
  auto out = at::empty({s.B, s.H, s.Tq, s.D}, q.options());
  auto lse = at::empty({s.B, s.H, s.Tq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  if (s.Tk == 0 || s.D == 0) {  // no keys at all (or nothing to attend with): zero rows
    out.zero_();
    lse.fill_(s.Tk == 0 ? kNegInf : 0.f);
    if (s.D == 0 && s.Tk > 0) {
      // D == 0: every score is 0; lse = log(number of visible keys)
      for (int64_t b = 0; b < s.B; ++b) {
        Visibility vis{s.Tq, s.Tk, causal, lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr};
        for (int64_t i = 0; i < s.Tq; ++i) {
          const int64_t n = vis(b, i);
          lse.select(0, b).select(1, i).fill_(n > 0 ? std::log(static_cast<double>(n)) : kNegInf);
        }
      }
    }
    return {out, lse};
  }
  const Visibility vis{s.Tq, s.Tk, causal, lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr};
  switch (q.scalar_type()) {
    case at::kFloat:
      forward_plain<float, float, float>(q, k, v, out, lse, s, vis, sc);
      break;
    case at::kDouble:
      forward_plain<double, double, double>(q, k, v, out, lse, s, vis, sc);
      break;
    case at::kBFloat16:
      if (use_amx_bf16()) {
        forward_bf16_amx(q, k, v, out, lse, s, vis, sc);
        break;
      }
      [[fallthrough]];
    default: {  // fp16 (and bf16 without AMX): fp32 products on converted inputs
      auto out32 = at::empty({s.B, s.H, s.Tq, s.D}, q.options().dtype(at::kFloat));
      forward_plain<float, float, float>(q.to(at::kFloat), k.to(at::kFloat), v.to(at::kFloat),
                                         out32, lse, s, vis, sc);
      out.copy_(out32);
    }
  }
  return {out, lse};
}

// ---------------------------------------------------------------------------------------------
// Backward.

template <typename T>
void attention_backward_kernel(const T* q, const T* qt, const T* k, const T* kt, const T* v,
                               const T* dout, const T* doutt, const float* lse, const T* delta,
                               T* dq, T* dk, T* dv, const Shapes& s, const Visibility& vis,
                               T scale, int64_t qblock, int64_t kvblock) {
  const int64_t B = s.B, H = s.H, Hkv = s.Hkv, Tq = s.Tq, Tk = s.Tk, D = s.D;
  const int64_t group = H / Hkv;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> pt(kvblock * qblock), dpt(kvblock * qblock), dqt(D * Tq);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H, hk = h / group;
      const T* q_h = q + bh * Tq * D;      // [Tq, D]
      const T* qt_h = qt + bh * D * Tq;    // [D, Tq]
      const T* do_h = dout + bh * Tq * D;  // [Tq, D]
      const T* dot_h = doutt + bh * D * Tq;
      const float* lse_h = lse + bh * Tq;
      const T* delta_h = delta + bh * Tq;
      const T* k_h = k + (b * Hkv + hk) * Tk * D;   // [Tk, D]
      const T* kt_h = kt + (b * Hkv + hk) * D * Tk; // [D, Tk]
      const T* v_h = v + (b * Hkv + hk) * Tk * D;
      T* dk_h = dk + bh * Tk * D;  // per query head, zero-initialised
      T* dv_h = dv + bh * Tk * D;
      std::fill(dqt.begin(), dqt.end(), T(0));
      const int64_t nkeys = Tq > 0 ? vis(b, Tq - 1) : 0;
      for (int64_t n0 = 0; n0 < nkeys; n0 += kvblock) {
        const int64_t cols = std::min(kvblock, nkeys - n0);
        for (int64_t m0 = 0; m0 < Tq; m0 += qblock) {
          const int64_t rows = std::min(qblock, Tq - m0);
          if (vis(b, m0 + rows - 1) <= n0) continue;  // no row of this block sees these keys
          // S^T [cols, rows] = K_j Q_i^T
          gemm(cols, rows, D, k_h + n0 * D, D, qt_h + m0, Tq, pt.data(), qblock, false);
          // P^T = exp(scale * S^T - lse), masked
          for (int64_t c = 0; c < cols; ++c) {
            T* p = pt.data() + c * qblock;
            const int64_t r0 = vis.first_row(b, n0 + c, m0, rows);
            std::fill(p, p + r0, T(0));
            for (int64_t r = r0; r < rows; ++r) {
              p[r] = std::exp(p[r] * scale - static_cast<T>(lse_h[m0 + r]));
            }
          }
          // dV_j += P^T dO_i
          gemm(cols, D, rows, pt.data(), qblock, do_h + m0 * D, D, dv_h + n0 * D, D, true);
          // dP^T [cols, rows] = V_j dO_i^T
          gemm(cols, rows, D, v_h + n0 * D, D, dot_h + m0, Tq, dpt.data(), qblock, false);
          // dS^T = scale * P^T * (dP^T - Delta_i)
          for (int64_t c = 0; c < cols; ++c) {
            const T* p = pt.data() + c * qblock;
            T* ds = dpt.data() + c * qblock;
            for (int64_t r = 0; r < rows; ++r) ds[r] = scale * p[r] * (ds[r] - delta_h[m0 + r]);
          }
          // dK_j += dS^T Q_i
          gemm(cols, D, rows, dpt.data(), qblock, q_h + m0 * D, D, dk_h + n0 * D, D, true);
          // dQ_i^T += K_j^T dS^T
          gemm(D, rows, cols, kt_h + n0, Tk, dpt.data(), qblock, dqt.data() + m0, Tq, true);
        }
      }
      T* dq_h = dq + bh * Tq * D;
      for (int64_t i = 0; i < Tq; ++i)
        for (int64_t d = 0; d < D; ++d) dq_h[i * D + d] = dqt[d * Tq + i];
    }
    if constexpr (std::is_same_v<T, float>) at::native::cpublas::brgemm_release();
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, bool causal, std::optional<double> scale,
    const std::optional<at::Tensor>& key_lengths) {
  const char* op = "attention_backward";
  const Shapes s = check_inputs(op, q, k, v, key_lengths);
  TORCH_CHECK(grad_out.sizes() == q.sizes(), op, ": grad_out must have the shape of q ", q.sizes(),
              ", got ", grad_out.sizes());
  TORCH_CHECK(out.sizes() == q.sizes(), op, ": out must have the shape of q ", q.sizes(), ", got ",
              out.sizes());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == s.B && lse.size(1) == s.H && lse.size(2) == s.Tq,
              op, ": lse must have shape [B,H,Tq] = [", s.B, ", ", s.H, ", ", s.Tq, "], got ",
              lse.sizes());
  for (auto* t : {&grad_out, &out, &lse}) {
    const char* name = t == &grad_out ? "grad_out" : t == &out ? "out" : "lse";
    TORCH_CHECK(t->device() == q.device(), op, ": ", name, " must be on the device of q (",
                q.device(), "), got ", t->device());
    TORCH_CHECK(t->is_floating_point(), op, ": ", name, " must be floating point, got ",
                t->scalar_type());
  }
  auto lengths = lengths_tensor(op, key_lengths, s.Tk);
  const double sc = scale ? *scale : 1.0 / std::sqrt(static_cast<double>(std::max<int64_t>(s.D, 1)));
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (q.numel() == 0 || k.numel() == 0) {
    return {at::zeros_like(q, at::MemoryFormat::Contiguous),
            at::zeros_like(k, at::MemoryFormat::Contiguous),
            at::zeros_like(v, at::MemoryFormat::Contiguous)};
  }
  auto q_ = q.to(acc).contiguous(), k_ = k.to(acc).contiguous(), v_ = v.to(acc).contiguous();
  auto do_ = grad_out.to(acc).contiguous();
  auto qt = q_.transpose(2, 3).contiguous(), kt = k_.transpose(2, 3).contiguous();
  auto dot = do_.transpose(2, 3).contiguous();
  auto lse_ = lse.to(at::kFloat).contiguous();
  auto delta = (do_ * out.to(acc)).sum(-1).contiguous();  // [B,H,Tq]
  auto dq = at::empty({s.B, s.H, s.Tq, s.D}, q_.options());
  auto dk = at::zeros({s.B, s.H, s.Tk, s.D}, q_.options());
  auto dv = at::zeros({s.B, s.H, s.Tk, s.D}, q_.options());
  const Visibility vis{s.Tq, s.Tk, causal, lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr};
  if (acc == at::kDouble) {
    attention_backward_kernel<double>(
        q_.data_ptr<double>(), qt.data_ptr<double>(), k_.data_ptr<double>(), kt.data_ptr<double>(),
        v_.data_ptr<double>(), do_.data_ptr<double>(), dot.data_ptr<double>(),
        lse_.data_ptr<float>(), delta.data_ptr<double>(), dq.data_ptr<double>(),
        dk.data_ptr<double>(), dv.data_ptr<double>(), s, vis, sc, kBwdQBlock, kBwdKvBlock);
  } else {
    attention_backward_kernel<float>(
        q_.data_ptr<float>(), qt.data_ptr<float>(), k_.data_ptr<float>(), kt.data_ptr<float>(),
        v_.data_ptr<float>(), do_.data_ptr<float>(), dot.data_ptr<float>(), lse_.data_ptr<float>(),
        delta.data_ptr<float>(), dq.data_ptr<float>(), dk.data_ptr<float>(), dv.data_ptr<float>(),
        s, vis, static_cast<float>(sc), kBwdQBlock, kBwdKvBlock);
  }
  const int64_t group = s.H / s.Hkv;
  if (group > 1) {
    dk = dk.view({s.B, s.Hkv, group, s.Tk, s.D}).sum(2);
    dv = dv.view({s.B, s.Hkv, group, s.Tk, s.D}).sum(2);
  }
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(pysonic, CPU, m) {
  m.impl("attention", &attention_cpu);
  m.impl("attention_backward", &attention_backward_cpu);
}

}  // namespace pysonic::cpu
