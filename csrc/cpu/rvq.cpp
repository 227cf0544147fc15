// CPU kernels for residual vector quantisation: rvq_encode and rvq_decode.
//
// rvq_encode(x [B,T,D], codebooks [L,K,D], n_q) -> codes [B,T,n_q] int64
//   For each row r = x[b,t] (fp32) and level l < n_q: code = argmin_k ||r - codebooks[l,k]||^2
//   (ties to the lowest k), then r -= codebooks[l,code] in fp32.
//
//   How: the distances are screened with the expansion d_k = ||c_k||^2 - 2 r.c_k, the products
//   coming from a blocked matrix product (oneDNN brgemm through ATen's cpublas): bf16 operands
//   with fp32 accumulation on AMX machines, fp32 operands elsewhere. A rigorous bound E_k on the
//   error of that screen (bf16 rounding of both operands, fp32 accumulation of D terms, rounding
//   of the norms and of the expansion itself) keeps every code whose interval
//   [d_k - E_k, d_k + E_k] reaches below min_j (d_j + E_j), widened by the rounding of an exact
//   distance; only those candidates (usually one to three) get their exact distance
//   sum_i (r_i - c_i)^2 computed in fp32, and the smallest exact distance wins, lowest index on
//   ties. So the result is the exact-difference argmin up to fp32 summation order, while almost
//   all the arithmetic runs in the matrix unit. Non-finite or huge values fall back to exact
//   distances for every code of the level.
//   Parallel over blocks of kRows rows; each thread carries its rows through all levels.
//
// rvq_decode(codes [B,T,n_q] int32/int64, codebooks [L,K,D]) -> [B,T,D] (codebooks' dtype)
//   out[b,t] = sum_l codebooks[l, codes[b,t,l]], accumulated in fp32. Codes outside [0, K) are
//   never read through: the op raises naming the level and the value.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/vec_utils.h"

namespace pysonic::cpu {
namespace {

constexpr int64_t kRows = 32;        // rows per matrix-product block (M)
constexpr int64_t kCodeBlock = 64;  // codes per matrix-product call (N; oneDNN packs B in blocks of <= 64)
constexpr int64_t kCodeAlign = Vec::size();
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kHuge = 1e18f;  // |r|, |c| above this: products may overflow -> exact path

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// ---------------------------------------------------------------------------------------------
// Small fp32 helpers over rows of T (float or bfloat16).

template <typename T>
inline void row_to_float(const T* src, int64_t stride, float* dst, int64_t n) {
  if (stride == 1) {
    int64_t i = 0;
    for (; i + kPair <= n; i += kPair) {
      Vec a, b;
      load_pair(src + i, a, b);
      a.store(dst + i);
      b.store(dst + i + Vec::size());
    }
    for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i * stride]);
  }
}

// sum_i (r_i - c_i)^2 in fp32.
template <typename T>
inline float exact_dist(const float* r, const T* c, int64_t n) {
  Vec acc0(0.f), acc1(0.f);
  int64_t i = 0;
  for (; i + kPair <= n; i += kPair) {
    Vec c0, c1;
    load_pair(c + i, c0, c1);
    const Vec d0 = Vec::loadu(r + i) - c0;
    const Vec d1 = Vec::loadu(r + i + Vec::size()) - c1;
    acc0 = at::vec::fmadd(d0, d0, acc0);
    acc1 = at::vec::fmadd(d1, d1, acc1);
  }
  float s = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc0 + acc1);
  for (; i < n; ++i) {
    const float d = r[i] - static_cast<float>(c[i]);
    s += d * d;
  }
  return s;
}

// r -= c in fp32 (the reference's residual update, bit for bit).
template <typename T>
inline void sub_row(float* r, const T* c, int64_t n) {
  int64_t i = 0;
  for (; i + kPair <= n; i += kPair) {
    Vec c0, c1;
    load_pair(c + i, c0, c1);
    (Vec::loadu(r + i) - c0).store(r + i);
    (Vec::loadu(r + i + Vec::size()) - c1).store(r + i + Vec::size());
  }
  for (; i < n; ++i) r[i] -= static_cast<float>(c[i]);
}

// Lowest-index argmin of exact distances over all K codes. NaN counts as smallest, like
// torch.argmin (the reference), so a NaN input yields the first NaN distance's index.
template <typename T>
inline int64_t exact_argmin(const float* r, const T* book, int64_t K, int64_t D) {
  float best = kInf;
  int64_t idx = 0;
  bool best_nan = false;
  for (int64_t k = 0; k < K; ++k) {
    const float d = exact_dist(r, book + k * D, D);
    if (std::isnan(d)) {
      if (!best_nan) {
        best_nan = true;
        idx = k;
      }
    } else if (!best_nan && d < best) {
      best = d;
      idx = k;
    }
  }
  return idx;
}

// ---------------------------------------------------------------------------------------------
// Codebooks prepared for the screening matrix product.

struct Prepared {
  bool amx = false;        // bf16 packed (VNNI) operands on the matrix unit; else fp32
  int64_t K = 0, Kp = 0;   // codes, codes padded to kCodeAlign
  int64_t D = 0, Dp = 0;   // dimension, padded to even (VNNI pairs)
  at::Tensor b;            // amx: per (level, code block) packed bf16 [Dp, nb]; else fp32 [n_q, Dp, Kp]
  at::Tensor coef;         // float [n_q, 3, Kp]: n_hi, n_lo, w (see screen_row)
  std::vector<char> level_ok;  // level's norms finite and not huge: screening is safe
  float a_rc = 0.f;        // bound factor on |2 r.c - 2 r~.c~| / (|r| |c|)
  float eps_exact = 0.f;   // relative rounding of an exact distance
};

int64_t block_n(const Prepared& p, int64_t j) { return std::min(kCodeBlock, p.Kp - j * kCodeBlock); }

template <typename T>
Prepared prepare(const T* books, int64_t n_q, int64_t K, int64_t D) {
  Prepared p;
  p.amx = at::native::cpublas::could_pack(at::kBFloat16);
  p.K = K;
  p.Kp = round_up(K, kCodeAlign);
  p.D = D;
  p.Dp = round_up(D, 2);
  const int64_t Kp = p.Kp, Dp = p.Dp;
  const int64_t nblocks = (Kp + kCodeBlock - 1) / kCodeBlock;
  auto fopt = at::TensorOptions().dtype(at::kFloat);
  p.b = at::empty({n_q * Dp * Kp}, fopt.dtype(p.amx ? at::kBFloat16 : at::kFloat));
  p.coef = at::empty({n_q, 3, Kp}, fopt);
  p.level_ok.assign(n_q, 1);

  // Error-bound constants (see the header comment). u: bf16 unit roundoff of the operands
  // (0 when the product runs in fp32); g: fp32 accumulation of Dp terms (gamma_n <= n 2^-24,
  // padded by 4 terms for the norm, the expansion and the bound's own arithmetic).
  const double u = p.amx ? std::ldexp(1.0, -9) : 0.0;
  const double g = (Dp + 4) * std::ldexp(1.0, -24);
  p.a_rc = static_cast<float>(1.05 * (2.0 * (2.0 * u + u * u + g * (1 + u) * (1 + u)) + std::ldexp(1.0, -19)));
  const double a_n = 1.05 * (g + std::ldexp(1.0, -20));
  p.eps_exact = static_cast<float>(2.0 * (D + 4) * std::ldexp(1.0, -24));

  std::vector<char> block_ok(n_q * nblocks, 1);
  at::parallel_for(0, n_q * nblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<c10::BFloat16> tmp_b;
    for (int64_t job = begin; job < end; ++job) {
      const int64_t l = job / nblocks, j = job % nblocks;
      const int64_t k0 = j * kCodeBlock, nb = block_n(p, j);
      // Norm coefficients for codes k0..k0+nb (padding codes never win: +inf norms).
      float* n_hi = p.coef.data_ptr<float>() + (l * 3 + 0) * Kp;
      float* n_lo = n_hi + Kp;
      float* w = n_lo + Kp;
      bool ok = true;
      for (int64_t k = k0; k < k0 + nb; ++k) {
        if (k >= K) {
          n_hi[k] = kInf;
          n_lo[k] = kInf;
          w[k] = 0.f;
          continue;
        }
        const T* c = books + (l * K + k) * D;
        double n = 0.0;  // only its fp32 rounding is used; double keeps the bound simple
        for (int64_t i = 0; i < D; ++i) {
          const float v = static_cast<float>(c[i]);
          n += static_cast<double>(v) * v;
        }
        const float nf = static_cast<float>(n);
        const float cn = static_cast<float>(std::sqrt(n));
        if (!std::isfinite(nf) || cn > kHuge) ok = false;
        n_hi[k] = static_cast<float>(n * (1.0 + a_n));
        n_lo[k] = static_cast<float>(n * (1.0 - a_n));
        w[k] = static_cast<float>(p.a_rc * std::sqrt(n) * (1.0 + g));
      }
      block_ok[job] = ok;
      // Transposed operand B [Dp, nb] (zero padding rows/columns).
      if (p.amx) {
        tmp_b.assign(Dp * nb, c10::BFloat16(0.f));
        for (int64_t k = k0; k < std::min(K, k0 + nb); ++k) {
          const T* c = books + (l * K + k) * D;
          for (int64_t i = 0; i < D; ++i) tmp_b[i * nb + (k - k0)] = c10::BFloat16(static_cast<float>(c[i]));
        }
        auto* dst = p.b.data_ptr<c10::BFloat16>() + l * Dp * Kp + k0 * Dp;
        at::native::cpublas::pack(Dp, nb, nb, nb, at::kBFloat16, at::kBFloat16, tmp_b.data(), dst);
      } else {
        float* dst = p.b.data_ptr<float>() + l * Dp * Kp;
        for (int64_t i = 0; i < Dp; ++i) {
          for (int64_t k = k0; k < k0 + nb; ++k) {
            dst[i * Kp + k] = (i < D && k < K) ? static_cast<float>(books[(l * K + k) * D + i]) : 0.f;
          }
        }
      }
    }
  });
  for (int64_t job = 0; job < n_q * nblocks; ++job) {
    if (!block_ok[job]) p.level_ok[job / nblocks] = 0;
  }
  return p;
}

// Scores s[m, k] ~= r~_m . c~_k for the kRows rows of `a` (bf16 or fp32 [kRows, Dp]).
void screen_scores(const Prepared& p, int64_t level, const void* a, float* scores) {
  const int64_t nblocks = (p.Kp + kCodeBlock - 1) / kCodeBlock;
  for (int64_t j = 0; j < nblocks; ++j) {
    const int64_t k0 = j * kCodeBlock, nb = block_n(p, j);
    if (p.amx) {
      const auto* b = p.b.data_ptr<c10::BFloat16>() + level * p.Dp * p.Kp + k0 * p.Dp;
      at::native::cpublas::brgemm(kRows, nb, p.Dp, p.Dp, nb, p.Kp, false,
                                  static_cast<const c10::BFloat16*>(a), b, scores + k0, true);
    } else {
      const float* b = p.b.data_ptr<float>() + level * p.Dp * p.Kp + k0;
      at::native::cpublas::brgemm(kRows, nb, p.Dp, p.Dp, p.Kp, p.Kp, false,
                                  static_cast<const float*>(a), b, scores + k0, false);
    }
  }
}

// The code for one row given its screening scores s[0..Kp), or -1 when screening is unsafe.
template <typename T>
int64_t screen_row(const Prepared& p, int64_t level, const float* r, const float* s,
                   const T* book) {
  const int64_t Kp = p.Kp, D = p.D;
  const float* n_hi = p.coef.data_ptr<float>() + level * 3 * Kp;
  const float* n_lo = n_hi + Kp;
  const float* w = n_lo + Kp;
  // |r|, rounded up generously (it multiplies bound terms only).
  Vec vrr(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= D; i += Vec::size()) {
    const Vec v = Vec::loadu(r + i);
    vrr = at::vec::fmadd(v, v, vrr);
  }
  float rr = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vrr);
  for (; i < D; ++i) rr += r[i] * r[i];
  const float sqrt_d = std::sqrt(static_cast<float>(D));
  // The additive terms cover operands and partial sums flushed to zero (denormals, ~1.2e-38).
  const float R = std::sqrt(rr) * (1.f + p.eps_exact) + 1e-30f * (1.f + sqrt_d);
  if (!std::isfinite(R) || R > kHuge) return -1;
  const float tau = 2.4e-38f * ((1.f + sqrt_d) * (1.f + R) + static_cast<float>(D));
  // Upper bound of every code's distance (minus |r|^2); the best one is U.
  const Vec vR(R), two(2.f);
  Vec vmin(kInf);
  for (int64_t k = 0; k < Kp; k += Vec::size()) {
    const Vec hi = at::vec::fmadd(vR, Vec::loadu(w + k), Vec::loadu(n_hi + k) - two * Vec::loadu(s + k));
    vmin = at::vec::minimum(vmin, hi);
  }
  const float U = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::minimum(a, b); }, vmin);
  if (!std::isfinite(U)) return -1;
  // The exact minimiser's lower bound is below U; widen by an exact distance's own rounding
  // (the exact distances, not the real ones, decide) and a tiny absolute term (flushed denormals).
  const float thr = U + 2.f * p.eps_exact * (rr + std::abs(U)) + 2.f * tau;
  const Vec vthr(thr);
  float best = kInf;
  int64_t idx = -1;
  for (int64_t k = 0; k < Kp; k += Vec::size()) {
    const Vec lo = Vec::loadu(n_lo + k) - two * Vec::loadu(s + k) - vR * Vec::loadu(w + k);
    // zero_mask: lanes where (lo <= thr) is false.
    int keep = ~(lo <= vthr).zero_mask() & ((1 << Vec::size()) - 1);
    while (keep) {
      const int lane = __builtin_ctz(keep);
      keep &= keep - 1;
      const int64_t code = k + lane;
      const float d = exact_dist(r, book + code * D, D);
      if (d < best) {  // strict: ties keep the lower index (lanes visited in order)
        best = d;
        idx = code;
      }
    }
  }
  return (idx >= 0 && std::isfinite(best)) ? idx : -1;
}

template <typename T>
void rvq_encode_kernel(const at::Tensor& x, const T* books, int64_t K, int64_t n_q,
                       int64_t* codes) {
  const int64_t B = x.size(0), Tn = x.size(1), D = x.size(2);
  const int64_t rows = B * Tn;
  const T* xp = x.data_ptr<T>();
  const int64_t sb = x.stride(0), st = x.stride(1), sd = x.stride(2);
  const Prepared p = prepare(books, n_q, K, D);
  const int64_t Dp = p.Dp, Kp = p.Kp;
  const int64_t nblocks = (rows + kRows - 1) / kRows;
  at::parallel_for(0, nblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> res(kRows * Dp), scores(kRows * Kp);
    std::vector<c10::BFloat16> abf(p.amx ? kRows * Dp : 0);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t row0 = blk * kRows, m_valid = std::min(kRows, rows - row0);
      std::fill(res.begin(), res.end(), 0.f);
      for (int64_t m = 0; m < m_valid; ++m) {
        const int64_t n = row0 + m;
        row_to_float(xp + (n / Tn) * sb + (n % Tn) * st, sd, res.data() + m * Dp, D);
      }
      for (int64_t l = 0; l < n_q; ++l) {
        const T* book = books + l * K * D;
        const bool screen = p.level_ok[l] && D > 0;
        if (screen) {
          const void* a = res.data();
          if (p.amx) {
            for (int64_t m = 0; m < kRows; ++m) {
              // fp32 -> bf16 (round to nearest even), padding column stays 0
              const float* src = res.data() + m * Dp;
              c10::BFloat16* dst = abf.data() + m * Dp;
              int64_t i = 0;
              for (; i + kPair <= Dp; i += kPair) store_pair(dst + i, Vec::loadu(src + i), Vec::loadu(src + i + Vec::size()));
              for (; i < Dp; ++i) dst[i] = c10::BFloat16(src[i]);
            }
            a = abf.data();
          }
          screen_scores(p, l, a, scores.data());
        }
        for (int64_t m = 0; m < m_valid; ++m) {
          float* r = res.data() + m * Dp;
          int64_t code = screen ? screen_row(p, l, r, scores.data() + m * Kp, book) : -1;
          if (code < 0) code = exact_argmin(r, book, K, D);
          codes[(row0 + m) * n_q + l] = code;
          sub_row(r, book + code * D, D);
        }
      }
    }
    if (p.amx) at::native::cpublas::brgemm_release(true);
  });
}

void check_books(const char* op, const at::Tensor& codebooks) {
  TORCH_CHECK(codebooks.device().is_cpu(), op, ": codebooks must be a CPU tensor, got ", codebooks.device());
  TORCH_CHECK(codebooks.dim() == 3, op, ": codebooks must be [L, K, D], got shape ", codebooks.sizes());
  TORCH_CHECK(codebooks.scalar_type() == at::kFloat || codebooks.scalar_type() == at::kBFloat16, op,
              ": codebooks must be float32 or bfloat16, got ", codebooks.scalar_type());
  TORCH_CHECK(codebooks.size(1) > 0, op, ": codebooks must have K >= 1 codes per level, got shape ",
              codebooks.sizes());
}

at::Tensor rvq_encode_cpu(const at::Tensor& x, const at::Tensor& codebooks, int64_t n_q) {
  const char* op = "rvq_encode";
  check_books(op, codebooks);
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 3, op, ": x must be [B, T, D], got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == codebooks.scalar_type(), op, ": x has dtype ", x.scalar_type(),
              " but codebooks has ", codebooks.scalar_type());
  TORCH_CHECK(x.size(2) == codebooks.size(2), op, ": x has D = ", x.size(2), " but codebooks has D = ",
              codebooks.size(2));
  const int64_t L = codebooks.size(0), K = codebooks.size(1), D = x.size(2);
  TORCH_CHECK(n_q >= 1 && n_q <= L, op, ": n_q must be in [1, L = ", L, "], got ", n_q);
  auto codes = at::empty({x.size(0), x.size(1), n_q}, x.options().dtype(at::kLong));
  if (codes.numel() == 0) return codes;
  if (D == 0) return codes.zero_();  // every distance is 0: the lowest index wins
  auto books = codebooks.contiguous();
  if (x.scalar_type() == at::kFloat) {
    rvq_encode_kernel<float>(x, books.data_ptr<float>(), K, n_q, codes.data_ptr<int64_t>());
  } else {
    rvq_encode_kernel<c10::BFloat16>(x, books.data_ptr<c10::BFloat16>(), K, n_q, codes.data_ptr<int64_t>());
  }
  return codes;
}

// ---------------------------------------------------------------------------------------------
// Decode.

template <typename T, typename I>
void rvq_decode_kernel(const I* codes, int64_t sb, int64_t st, int64_t sl, int64_t Tn, int64_t n_q,
                       int64_t rows, const T* books, int64_t K, int64_t D, T* out,
                       std::atomic<bool>& bad) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, n_q * D));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(D);
    for (int64_t n = begin; n < end; ++n) {
      const I* c = codes + (n / Tn) * sb + (n % Tn) * st;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t l = 0; l < n_q; ++l) {
        const int64_t idx = static_cast<int64_t>(c[l * sl]);
        if (idx < 0 || idx >= K) {
          bad.store(true, std::memory_order_relaxed);
          continue;
        }
        const T* row = books + (l * K + idx) * D;
        float* a = acc.data();
        int64_t i = 0;
        for (; i + kPair <= D; i += kPair) {
          Vec r0, r1;
          load_pair(row + i, r0, r1);
          (Vec::loadu(a + i) + r0).store(a + i);
          (Vec::loadu(a + i + Vec::size()) + r1).store(a + i + Vec::size());
        }
        for (; i < D; ++i) a[i] += static_cast<float>(row[i]);
      }
      T* o = out + n * D;
      int64_t i = 0;
      for (; i + kPair <= D; i += kPair) store_pair(o + i, Vec::loadu(acc.data() + i), Vec::loadu(acc.data() + i + Vec::size()));
      for (; i < D; ++i) o[i] = static_cast<T>(acc[i]);
    }
  });
}

at::Tensor rvq_decode_cpu(const at::Tensor& codes, const at::Tensor& codebooks) {
  const char* op = "rvq_decode";
  check_books(op, codebooks);
  TORCH_CHECK(codes.device().is_cpu(), op, ": codes must be a CPU tensor, got ", codes.device());
  TORCH_CHECK(codes.dim() == 3, op, ": codes must be [B, T, n_q], got shape ", codes.sizes());
  TORCH_CHECK(codes.scalar_type() == at::kLong || codes.scalar_type() == at::kInt, op,
              ": codes must be int64 or int32, got ", codes.scalar_type());
  const int64_t L = codebooks.size(0), K = codebooks.size(1), D = codebooks.size(2);
  const int64_t B = codes.size(0), Tn = codes.size(1), n_q = codes.size(2);
  TORCH_CHECK(n_q <= L, op, ": codes has n_q = ", n_q, " levels but codebooks has only L = ", L);
  auto out = at::empty({B, Tn, D}, codebooks.options());
  const int64_t rows = B * Tn;
  auto books = codebooks.contiguous();
  std::atomic<bool> bad{false};
  auto run = [&](auto tag_t, auto tag_i) {
    using T = decltype(tag_t);
    using I = decltype(tag_i);
    rvq_decode_kernel<T, I>(codes.data_ptr<I>(), codes.stride(0), codes.stride(1), codes.stride(2), Tn,
                            n_q, rows, books.data_ptr<T>(), K, D, out.data_ptr<T>(), bad);
  };
  auto run_i = [&](auto tag_t) {
    if (codes.scalar_type() == at::kLong) run(tag_t, int64_t{});
    else run(tag_t, int32_t{});
  };
  if (rows > 0) {
    if (codebooks.scalar_type() == at::kFloat) run_i(float{});
    else run_i(c10::BFloat16{});
  }
  if (bad.load()) {
    // Report the first bad code in (b, t, level) order.
    auto c = codes.to(at::kLong);
    auto acc = c.accessor<int64_t, 3>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < Tn; ++t)
        for (int64_t l = 0; l < n_q; ++l) {
          const int64_t v = acc[b][t][l];
          TORCH_CHECK(v >= 0 && v < K, op, ": codes[", b, ", ", t, ", ", l, "] = ", v,
                      " is out of range for level ", l, " (expected 0 <= code < K = ", K, ")");
        }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pysonic, CPU, m) {
  m.impl("rvq_encode", &rvq_encode_cpu);
  m.impl("rvq_decode", &rvq_decode_cpu);
}

}  // namespace pysonic::cpu
