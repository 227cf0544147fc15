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
//   all the arithmetic runs in the matrix unit. Rows that keep many candidates (a residual much
//   longer than the level's codes) get every exact distance from a transposed copy of the level
//   instead (dense_distances). Non-finite or huge values fall back to exact distances for every
//   code of the level.
//   Parallel over blocks of up to kMaxRows rows; each thread carries its rows through all levels.
//
// rvq_decode(codes [B,T,n_q] int32/int64, codebooks [L,K,D]) -> [B,T,D] (codebooks' dtype)
//   out[b,t] = sum_l codebooks[l, codes[b,t,l]], accumulated in fp32. Codes outside [0, K) are
//   never read through: the op raises naming the level and the value.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cmath>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#include "cpu/vec_utils.h"

namespace pysonic::cpu {
namespace {

constexpr int64_t kMaxRows = 128;    // most rows per matrix-product block (M)
constexpr int64_t kGroupRows = 128;  // rows a thread carries through the levels together
constexpr int64_t kCodeBlock = 64;  // codes per matrix-product call (N; oneDNN packs B in blocks of <= 64)
constexpr int64_t kCodeAlign = Vec::size();
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kHuge = 1e18f;
constexpr int64_t kDenseMin = 64;  // a row is dense (see dense_distances) above max(kDenseMin, K / 8) candidates  // |r|, |c| above this: products may overflow -> exact path

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

// sum_i r_i^2 in fp32.
inline float sum_squares(const float* r, int64_t n) {
  Vec acc(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec v = Vec::loadu(r + i);
    acc = at::vec::fmadd(v, v, acc);
  }
  float s = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
  for (; i < n; ++i) s += r[i] * r[i];
  return s;
}

// oneDNN's packed bf16 B for blocks of <= 64 columns is the plain VNNI layout [K/2][N][2].
// Writing it directly skips a transpose + pack per block; checked once against pack() itself,
// so a oneDNN with another layout only costs the slower path.
bool vnni_layout_matches_pack() {
  static const bool same = [] {
    constexpr int64_t kd = 6, n = 16;
    std::vector<c10::BFloat16> plain(kd * n), packed(kd * n), mine(kd * n);
    for (int64_t i = 0; i < kd * n; ++i) plain[i] = c10::BFloat16(static_cast<float>(i + 1));
    at::native::cpublas::pack(kd, n, n, n, at::kBFloat16, at::kBFloat16, plain.data(), packed.data());
    for (int64_t i = 0; i < kd; ++i)
      for (int64_t k = 0; k < n; ++k) mine[((i >> 1) * n + k) * 2 + (i & 1)] = plain[i * n + k];
    for (int64_t i = 0; i < kd * n; ++i)
      if (packed[i].x != mine[i].x) return false;
    return true;
  }();
  return same;
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
  // An exact distance (exact_dist) and |r|^2 (sum_squares) are sums of D non-negative terms in
  // this file's fixed order: vector lanes accumulate ceil(D / 16) terms each, a tree of depth
  // log2(16) = 4 adds the lanes, a scalar tail adds D % 32 terms one by one (two roundings
  // each), and each term carries up to 3 roundings (difference, square). So the relative error
  // is at most gamma_n with n = ceil(D / 16) + 4 + 3 + 2 (D % 32) (+10% for gamma's higher
  // terms). For D = 128: 15 units of 2^-24, where a bound for an arbitrary order (2 (D + 4))
  // would be 264: on a residual much longer than the codes that kept nearly every code.
  const int64_t lanes = Vec::size();
  int64_t log2_lanes = 0;
  while ((int64_t{1} << log2_lanes) < lanes) ++log2_lanes;
  const int64_t n_round = (D + lanes - 1) / lanes + log2_lanes + 3 + 2 * (D % kPair);
  p.eps_exact = static_cast<float>(1.1 * static_cast<double>(n_round) * std::ldexp(1.0, -24));

  std::vector<char> block_ok(n_q * nblocks, 1);
  const bool direct = p.amx && vnni_layout_matches_pack();
  at::parallel_for(0, n_q * nblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> row(D);
    std::vector<c10::BFloat16> tmp_b, plain;
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
        row_to_float(books + (l * K + k) * D, 1, row.data(), D);
        const double n = static_cast<double>(sum_squares(row.data(), D));  // fp32 sum: error <= g n
        const double cn = std::sqrt(n);
        if (!std::isfinite(n) || cn > kHuge) ok = false;
        n_hi[k] = static_cast<float>(n * (1.0 + a_n));
        n_lo[k] = static_cast<float>(n * (1.0 - a_n));
        w[k] = static_cast<float>(p.a_rc * cn * (1.0 + g));
      }
      block_ok[job] = ok;
      if (p.amx) {
        // B for the block in VNNI layout [Dp/2][nb][2]: seen as 32-bit pairs of dimensions,
        // it is the transpose of the codes' bf16 rows [nb][Dp/2].
        auto* dst = p.b.data_ptr<c10::BFloat16>() + l * Dp * Kp + k0 * Dp;
        const int64_t kend = std::min(K, k0 + nb), half = Dp / 2;
        tmp_b.assign(Dp * nb, c10::BFloat16(0.f));
        for (int64_t k = k0; k < kend; ++k) {  // bf16 rows (RNE), zero padding
          row_to_float(books + (l * K + k) * D, 1, row.data(), D);
          c10::BFloat16* o = tmp_b.data() + (k - k0) * Dp;
          int64_t i = 0;
          for (; i + kPair <= D; i += kPair) store_pair(o + i, Vec::loadu(row.data() + i), Vec::loadu(row.data() + i + Vec::size()));
          for (; i < D; ++i) o[i] = c10::BFloat16(row[i]);
        }
        if (direct) {
          const auto* src32 = reinterpret_cast<const uint32_t*>(tmp_b.data());
          auto* dst32 = reinterpret_cast<uint32_t*>(dst);
          for (int64_t q = 0; q < half; ++q)
            for (int64_t kk = 0; kk < nb; ++kk) dst32[q * nb + kk] = src32[kk * half + q];
        } else {  // plain [Dp][nb], packed by oneDNN
          plain.resize(Dp * nb);
          for (int64_t i = 0; i < Dp; ++i)
            for (int64_t kk = 0; kk < nb; ++kk) plain[i * nb + kk] = tmp_b[kk * Dp + i];
          at::native::cpublas::pack(Dp, nb, nb, nb, at::kBFloat16, at::kBFloat16, plain.data(), dst);
        }
      } else {
        // B^T for the level, fp32 [Dp][Kp].
        float* dst = p.b.data_ptr<float>() + l * Dp * Kp;
        for (int64_t k = k0; k < k0 + nb; ++k) {
          if (k < K) row_to_float(books + (l * K + k) * D, 1, row.data(), D);
          for (int64_t i = 0; i < Dp; ++i) dst[i * Kp + k] = (i < D && k < K) ? row[i] : 0.f;
        }
      }
    }
  });
  for (int64_t job = 0; job < n_q * nblocks; ++job) {
    if (!block_ok[job]) p.level_ok[job / nblocks] = 0;
  }
  return p;
}

// Scores s[m, k] ~= r~_m . c~_k for the mb rows of `a` (bf16 or fp32 [mb, Dp]).
void screen_scores(const Prepared& p, int64_t level, int64_t mb, const void* a, float* scores) {
  const int64_t nblocks = (p.Kp + kCodeBlock - 1) / kCodeBlock;
  for (int64_t j = 0; j < nblocks; ++j) {
    const int64_t k0 = j * kCodeBlock, nb = block_n(p, j);
    if (p.amx) {
      const auto* b = p.b.data_ptr<c10::BFloat16>() + level * p.Dp * p.Kp + k0 * p.Dp;
      at::native::cpublas::brgemm(mb, nb, p.Dp, p.Dp, nb, p.Kp, false,
                                  static_cast<const c10::BFloat16*>(a), b, scores + k0, true);
    } else {
      const float* b = p.b.data_ptr<float>() + level * p.Dp * p.Kp + k0;
      at::native::cpublas::brgemm(mb, nb, p.Dp, p.Dp, p.Kp, p.Kp, false,
                                  static_cast<const float*>(a), b, scores + k0, false);
    }
  }
}

// Screens one row given its scores s[0..Kp): appends to `cand` (in increasing order) every code
// that may be the exact-distance minimiser, prefetching their rows (kCandidates). kDense: more
// than dense_above codes may be, none appended (see dense_distances). kUnsafe: screening is
// unsafe for this row (non-finite or huge residual): the caller scans all codes exactly.
enum class Screen { kUnsafe, kCandidates, kDense };

template <typename T>
Screen screen_row(const Prepared& p, int64_t level, const float* r, const float* s, const T* book,
                  int64_t dense_above, std::vector<int32_t>& cand) {
  const int64_t Kp = p.Kp, D = p.D;
  const float* n_hi = p.coef.data_ptr<float>() + level * 3 * Kp;
  const float* n_lo = n_hi + Kp;
  const float* w = n_lo + Kp;
  // |r|, rounded up generously (it multiplies bound terms only).
  const float rr = sum_squares(r, D);
  const float sqrt_d = std::sqrt(static_cast<float>(D));
  // The additive terms cover operands and partial sums flushed to zero (denormals, ~1.2e-38).
  const float R = std::sqrt(rr) * (1.f + p.eps_exact) + 1e-30f * (1.f + sqrt_d);
  if (!std::isfinite(R) || R > kHuge) return Screen::kUnsafe;
  const float tau = 2.4e-38f * ((1.f + sqrt_d) * (1.f + R) + static_cast<float>(D));
  // Upper bound of every code's distance (minus |r|^2); the best one is U. Everything here is
  // finite (norms checked per level, |r| and |c| <= 1e18), so a plain min is enough; four
  // accumulators break the dependency chain.
  const Vec vR(R), two(2.f);
  Vec m0(kInf), m1(kInf), m2(kInf), m3(kInf);
  auto hi = [&](int64_t k) {
    return at::vec::fmadd(vR, Vec::loadu(w + k), Vec::loadu(n_hi + k) - two * Vec::loadu(s + k));
  };
  constexpr int64_t V = Vec::size();
  int64_t k = 0;
  for (; k + 4 * V <= Kp; k += 4 * V) {
    m0 = at::vec::clamp_max(hi(k), m0);
    m1 = at::vec::clamp_max(hi(k + V), m1);
    m2 = at::vec::clamp_max(hi(k + 2 * V), m2);
    m3 = at::vec::clamp_max(hi(k + 3 * V), m3);
  }
  for (; k < Kp; k += V) m0 = at::vec::clamp_max(hi(k), m0);
  Vec vmin = at::vec::clamp_max(at::vec::clamp_max(m0, m1), at::vec::clamp_max(m2, m3));
  const float U = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::clamp_max(a, b); }, vmin);
  if (!std::isfinite(U)) return Screen::kUnsafe;
  // The exact minimiser's lower bound is below U; widen by an exact distance's own rounding
  // (the exact distances, not the real ones, decide) and a tiny absolute term (flushed denormals).
  const float thr = U + 2.f * p.eps_exact * (rr + std::abs(U)) + 2.f * tau;
  const Vec vthr(thr);
  // Count first: a dense row (more than dense_above candidates) is decided by dense_distances.
  int64_t count = 0;
  for (k = 0; k < Kp; k += V) {
    const Vec lo = Vec::loadu(n_lo + k) - two * Vec::loadu(s + k) - vR * Vec::loadu(w + k);
    count += __builtin_popcount(~(lo <= vthr).zero_mask() & ((1 << V) - 1));
  }
  if (count > dense_above) return Screen::kDense;
  const size_t first = cand.size();
  for (k = 0; k < Kp; k += V) {
    const Vec lo = Vec::loadu(n_lo + k) - two * Vec::loadu(s + k) - vR * Vec::loadu(w + k);
    // zero_mask: lanes where (lo <= thr) is false.
    int keep = ~(lo <= vthr).zero_mask() & ((1 << V) - 1);
    while (keep) {
      const int lane = __builtin_ctz(keep);
      keep &= keep - 1;
      cand.push_back(static_cast<int32_t>(k + lane));
    }
  }
  if (cand.size() == first) return Screen::kUnsafe;  // cannot happen with a correct bound; stay safe
  for (size_t c = first; c < cand.size(); ++c) {
    const char* row = reinterpret_cast<const char*>(book + cand[c] * D);
    for (int64_t off = 0; off < D * static_cast<int64_t>(sizeof(T)); off += 64) __builtin_prefetch(row + off, 0, 2);
  }
  return Screen::kCandidates;
}

// Dense rows: when screening keeps many codes (a residual much longer than the level's codes,
// e.g. deep levels of an untrained model: the exact distances then differ by little more than
// their own rounding), every code's exact distance is computed from a transposed fp32 copy of
// the level, [D][Kp], 64 codes per pass with no horizontal sums: ~3x faster than one candidate
// at a time. Exact distances in another summation order, so the same contract.

// bt [D][Kp] = the level's codes transposed, fp32, zero columns past K; in 16 x 16 tiles.
template <typename T>
void transpose_level(const T* book, int64_t K, int64_t D, int64_t Kp, float* bt) {
  constexpr int64_t kTile = 16;
  std::fill(bt, bt + D * Kp, 0.f);
  for (int64_t k0 = 0; k0 < K; k0 += kTile)
    for (int64_t i0 = 0; i0 < D; i0 += kTile) {
      const int64_t k1 = std::min(K, k0 + kTile), i1 = std::min(D, i0 + kTile);
      for (int64_t k = k0; k < k1; ++k)
        for (int64_t i = i0; i < i1; ++i) bt[i * Kp + k] = static_cast<float>(book[k * D + i]);
    }
}

// The transposed levels that have dense rows, each built once per call by whichever thread
// needs it first.
class TransposedLevels {
 public:
  TransposedLevels(int64_t n_q, int64_t D, int64_t Kp) : D_(D), Kp_(Kp), once_(new std::once_flag[n_q]), bt_(n_q) {}

  template <typename T>
  const float* get(int64_t level, const T* book, int64_t K) {
    std::call_once(once_[level], [&] {
      bt_[level].resize(D_ * Kp_);
      transpose_level(book, K, D_, Kp_, bt_[level].data());
    });
    return bt_[level].data();
  }

 private:
  int64_t D_, Kp_;
  std::unique_ptr<std::once_flag[]> once_;
  std::vector<std::vector<float>> bt_;
};

// Exact distances of up to kDenseRows rows rs[q] to every code of bt [D][Kp]: dist[q * Kp + k].
// Four rows share each load of the codes (the transposed level streams from L2 once per four
// rows), 64 codes per pass.
constexpr int64_t kDenseRows = 4;

template <int NR, int NV>
inline void dense_block(const float* const* rs, const float* bt, int64_t k0, int64_t Kp, int64_t D, float* dist) {
  constexpr int64_t V = Vec::size();
  Vec a[NR][NV];
  for (auto& row : a)
    for (auto& v : row) v = Vec(0.f);
  const float* c = bt + k0;
  for (int64_t i = 0; i < D; ++i, c += Kp) {
    Vec cv[NV];
    for (int j = 0; j < NV; ++j) cv[j] = Vec::loadu(c + j * V);
    for (int q = 0; q < NR; ++q) {
      const Vec ri(rs[q][i]);
      for (int j = 0; j < NV; ++j) {
        const Vec d = ri - cv[j];
        a[q][j] = at::vec::fmadd(d, d, a[q][j]);
      }
    }
  }
  for (int q = 0; q < NR; ++q)
    for (int j = 0; j < NV; ++j) a[q][j].store(dist + q * Kp + k0 + j * V);
}

template <int NR>
inline void dense_rows_distances(const float* const* rs, const float* bt, int64_t Kp, int64_t D, float* dist) {
  constexpr int64_t V = Vec::size();
  int64_t k0 = 0;
  for (; k0 + 4 * V <= Kp; k0 += 4 * V) dense_block<NR, 4>(rs, bt, k0, Kp, D, dist);
  for (; k0 < Kp; k0 += V) dense_block<NR, 1>(rs, bt, k0, Kp, D, dist);  // Kp is a multiple of V
}

inline void dense_distances(const float* const* rs, int64_t nr, const float* bt, int64_t Kp, int64_t D,
                            float* dist) {
  switch (nr) {
    case 1: dense_rows_distances<1>(rs, bt, Kp, D, dist); break;
    case 2: dense_rows_distances<2>(rs, bt, Kp, D, dist); break;
    case 3: dense_rows_distances<3>(rs, bt, Kp, D, dist); break;
    default: dense_rows_distances<4>(rs, bt, Kp, D, dist); break;
  }
}

// Lowest index of the minimum of d[0..K) (finite values): the minimum by vectors, then its first
// occurrence.
inline int64_t lowest_argmin(const float* d, int64_t K) {
  constexpr int64_t V = Vec::size();
  float best = d[0];
  int64_t k = 0;
  if (K >= V) {
    Vec m = Vec::loadu(d);
    for (k = V; k + V <= K; k += V) m = at::vec::minimum(m, Vec::loadu(d + k));
    best = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::minimum(a, b); }, m);
  }
  for (; k < K; ++k) best = std::min(best, d[k]);
  int64_t idx = 0;
  while (d[idx] != best) ++idx;
  return idx;
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
  // Row blocks: large enough to amortise each matrix-product call, small enough that every
  // thread gets about two blocks; a multiple of 16 (the matrix unit's tile height).
  const int64_t per_thread = (rows + 2 * at::get_num_threads() - 1) / (2 * at::get_num_threads());
  const int64_t mb = std::clamp<int64_t>(round_up(per_thread, 16), 16, kMaxRows);
  const int64_t nblocks = (rows + mb - 1) / mb;
  // Each thread takes its blocks in groups of about kGroupRows rows and runs the levels
  // level-major over a group (a group is one block at the default sizes: larger groups, which
  // keep one level's codebook hot for more rows, measured no faster here).
  const int64_t group = std::max<int64_t>(1, kGroupRows / mb);
  TransposedLevels transposed(n_q, D, Kp);
  at::parallel_for(0, nblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> res(group * mb * Dp), scores(mb * Kp);
    std::vector<c10::BFloat16> abf(p.amx ? mb * Dp : 0);
    std::vector<int32_t> cand;
    std::vector<int64_t> cbeg(mb), cend(mb);
    std::vector<float> dist(kDenseRows * Kp);  // dense rows: every code's distance
    std::vector<int64_t> dense_rows;
    const int64_t dense_above = std::max<int64_t>(kDenseMin, K / 8);
    for (int64_t g0 = begin; g0 < end; g0 += group) {
      const int64_t g1 = std::min(end, g0 + group);
      std::fill(res.begin(), res.end(), 0.f);
      for (int64_t n = g0 * mb; n < std::min(rows, g1 * mb); ++n) {
        row_to_float(xp + (n / Tn) * sb + (n % Tn) * st, sd, res.data() + (n - g0 * mb) * Dp, D);
      }
      for (int64_t l = 0; l < n_q; ++l) {
        const T* book = books + l * K * D;
        const bool screen = p.level_ok[l] && D > 0;
        for (int64_t blk = g0; blk < g1; ++blk) {
          const int64_t row0 = blk * mb, m_valid = std::min(mb, rows - row0);
          float* rb = res.data() + (blk - g0) * mb * Dp;  // this block's residuals [mb, Dp]
          if (screen) {
            const void* a = rb;
            if (p.amx) {
              for (int64_t m = 0; m < mb; ++m) {
                // fp32 -> bf16 (round to nearest even), padding column stays 0
                const float* src = rb + m * Dp;
                c10::BFloat16* dst = abf.data() + m * Dp;
                int64_t i = 0;
                for (; i + kPair <= Dp; i += kPair) store_pair(dst + i, Vec::loadu(src + i), Vec::loadu(src + i + Vec::size()));
                for (; i < Dp; ++i) dst[i] = c10::BFloat16(src[i]);
              }
              a = abf.data();
            }
            screen_scores(p, l, mb, a, scores.data());
          }
          // Pass 1: candidates of every row (their rows prefetched while the others screen).
          // No candidates (screening unsafe for the row) means: scan all codes exactly; dense
          // rows (cend -1) get every exact distance at the end.
          cand.clear();
          for (int64_t m = 0; m < m_valid; ++m) {
            cbeg[m] = static_cast<int64_t>(cand.size());
            const Screen how = screen ? screen_row(p, l, rb + m * Dp, scores.data() + m * Kp, book, dense_above, cand)
                                      : Screen::kUnsafe;
            if (how == Screen::kDense) dense_rows.push_back(m);  // decided after the others
            cend[m] = how == Screen::kDense ? -1 : static_cast<int64_t>(cand.size());
          }
          // Pass 2: exact distances of the candidates decide; update the residuals.
          for (int64_t m = 0; m < m_valid; ++m) {
            if (cend[m] < 0) continue;  // a dense row: below, four at a time
            float* r = rb + m * Dp;
            int64_t code = -1;
            float best = kInf;
            for (int64_t c = cbeg[m]; c < cend[m]; ++c) {
              const float d = exact_dist(r, book + cand[c] * D, D);
              if (d < best) {  // strict: ties keep the lower index (candidates are in order)
                best = d;
                code = cand[c];
              }
            }
            if (code < 0) code = exact_argmin(r, book, K, D);
            codes[(row0 + m) * n_q + l] = code;
            sub_row(r, book + code * D, D);
          }
          const float* book_t = dense_rows.empty() ? nullptr : transposed.get(l, book, K);
          for (size_t q0 = 0; q0 < dense_rows.size(); q0 += kDenseRows) {
            const int64_t nr = std::min<int64_t>(kDenseRows, static_cast<int64_t>(dense_rows.size() - q0));
            const float* rs[kDenseRows];
            for (int64_t q = 0; q < nr; ++q) rs[q] = rb + dense_rows[q0 + q] * Dp;
            dense_distances(rs, nr, book_t, Kp, D, dist.data());
            for (int64_t q = 0; q < nr; ++q) {
              const int64_t m = dense_rows[q0 + q];
              const int64_t code = lowest_argmin(dist.data() + q * Kp, K);
              codes[(row0 + m) * n_q + l] = code;
              sub_row(rb + m * Dp, book + code * D, D);
            }
          }
          dense_rows.clear();
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
  TORCH_CHECK(K < std::numeric_limits<int32_t>::max(), op, ": at most 2^31 - 2 codes per level, got K = ", K);
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
