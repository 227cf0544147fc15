// CPU kernel for the recurrent half of an LSTM layer at small batch (inference).
//
// lstm_recurrence(gates_x [T,B,4H], w_hh [4H,H], h0 [B,H], c0 [B,H]) -> (y [T,B,H], c_T [B,H])
//   gates_x holds x_t @ w_ih^T + b_ih + b_hh for every step (one big matrix product, done by the
//   caller). Per step, with torch's gate order (i, f, g, o):
//     z = gates_x[t] + h_{t-1} @ w_hh^T
//     c_t = sigmoid(z_f) * c_{t-1} + sigmoid(z_i) * tanh(z_g);  h_t = sigmoid(z_o) * tanh(c_t)
//   y[t] = h_t. Arithmetic and the carried state are fp32 for both fp32 and bf16 inputs.
//
// Why a kernel: at batch 1 each step is a 4H x H matrix-vector product (4 MB of fp32 weights for
// EnCodec's H = 512) that depends on the previous step, so the layer is bound by how fast the
// weights stream in, T times. Here the hidden units are split into blocks of 16 and the blocks
// among the threads of one OpenMP team; each thread packs the w_hh rows of its own units once
// per call ([block][input][gate][16 units], the order the loop reads them) and is the only one
// to read them, so its share stays in its own L2 cache across steps (2 MB per thread for
// H = 512 on 2 threads) instead of coming from L3 every step. Threads exchange h_t through a
// double buffer with one barrier per step. The sum over the H inputs runs in a fixed order (even
// and odd inputs apart, then added), so results differ from a BLAS product by fp32 rounding only.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <omp.h>
#include <sys/mman.h>

#include <cstdlib>

#include <algorithm>
#include <vector>

#include "cpu/vec_utils.h"

namespace pysonic::cpu {
namespace {

constexpr int64_t kUnits = Vec::size();  // hidden units per block (one vector)
constexpr int64_t kGates = 4;

inline Vec sigmoid(const Vec& z) { return Vec(1.f) / (Vec(1.f) + z.neg().exp()); }

// Up to n (<= kUnits) values of p as one fp32 vector (lanes past n are 0).
template <typename T>
inline Vec load_part(const T* p, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return n == kUnits ? Vec::loadu(p) : Vec::loadu(p, n);
  } else {
    float tmp[kUnits] = {};
    for (int64_t u = 0; u < n; ++u) tmp[u] = static_cast<float>(p[u]);
    return Vec::loadu(tmp);
  }
}

template <typename T>
inline void store_part(T* p, const Vec& v, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    if (n == kUnits) v.store(p); else v.store(p, n);
  } else {
    float tmp[kUnits];
    v.store(tmp);
    for (int64_t u = 0; u < n; ++u) p[u] = static_cast<T>(tmp[u]);
  }
}

// The packed weights live in 2 MiB-aligned memory backed by transparent huge pages where the
// kernel allows it: each thread's share (about the size of its L2) is then physically contiguous
// and spreads evenly over the cache's sets. With 4 KiB pages the physical placement is random and
// some sets overflow: inside EnCodec a layer took 19-27 ms from call to call, ~19 ms with this
// buffer in the same runs. A share this close to the L2's size stays sensitive to whatever else
// uses the cache (on this VM, H = 512 ran 19-28 ms per layer across processes and hours while
// H = 448, 1.5 MB per thread, ran at a steady per-weight cost 25-40% lower).
// The buffer is kept per calling thread and grows as needed (a fresh huge page costs its zeroing
// on every call otherwise): 4 MiB for EnCodec's H = 512.
class HugePageBuffer {
 public:
  HugePageBuffer() = default;
  ~HugePageBuffer() { std::free(ptr_); }
  HugePageBuffer(const HugePageBuffer&) = delete;
  HugePageBuffer& operator=(const HugePageBuffer&) = delete;

  float* get(size_t n) {
    constexpr size_t kHuge = size_t(2) << 20;
    const size_t bytes = (n * sizeof(float) + kHuge - 1) / kHuge * kHuge;
    if (bytes > bytes_) {
      std::free(ptr_);
      ptr_ = static_cast<float*>(std::aligned_alloc(kHuge, bytes));
      bytes_ = ptr_ != nullptr ? bytes : 0;
      TORCH_CHECK(ptr_ != nullptr, "lstm_recurrence: out of memory for ", bytes, " bytes of packed weights");
#ifdef MADV_HUGEPAGE
      madvise(ptr_, bytes, MADV_HUGEPAGE);  // a hint: without THP the buffer still works
#endif
    }
    return ptr_;
  }

 private:
  float* ptr_ = nullptr;
  size_t bytes_ = 0;
};

template <typename T>
void lstm_recurrence_kernel(const T* gx, const T* w, const T* h0, const T* c0, T* y, T* c_out,
                            int64_t steps, int64_t batch, int64_t hidden, int threads) {
  const int64_t blocks = (hidden + kUnits - 1) / kUnits;
  const int64_t padded = blocks * kUnits;
  const int64_t block_len = hidden * kGates * kUnits;  // packed floats per unit block
  static thread_local HugePageBuffer packed_buffer;
  float* const packed = packed_buffer.get(static_cast<size_t>(blocks * block_len));
  std::vector<float> h_buf(static_cast<size_t>(2 * batch * padded), 0.f);  // fp32 h, double buffered
  std::vector<float> c_buf(static_cast<size_t>(batch * padded), 0.f);
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, blocks)));

#pragma omp parallel num_threads(threads)
  {
    const int64_t team = omp_get_num_threads(), me = omp_get_thread_num();
    const int64_t b_begin = blocks * me / team, b_end = blocks * (me + 1) / team;

    // Pack this thread's rows and load its share of the initial state.
    for (int64_t blk = b_begin; blk < b_end; ++blk) {
      float* dst = packed + blk * block_len;
      const int64_t n = std::min(kUnits, hidden - blk * kUnits);
      for (int64_t i = 0; i < hidden; ++i)
        for (int64_t g = 0; g < kGates; ++g)
          for (int64_t u = 0; u < kUnits; ++u)
            dst[(i * kGates + g) * kUnits + u] =
                u < n ? static_cast<float>(w[(g * hidden + blk * kUnits + u) * hidden + i]) : 0.f;
      for (int64_t b = 0; b < batch; ++b) {
        const int64_t off = b * hidden + blk * kUnits;
        load_part(h0 + off, n).store(h_buf.data() + b * padded + blk * kUnits);
        load_part(c0 + off, n).store(c_buf.data() + b * padded + blk * kUnits);
      }
    }
#pragma omp barrier

    for (int64_t t = 0; t < steps; ++t) {
      const float* h_prev = h_buf.data() + (t % 2) * batch * padded;
      float* h_next = h_buf.data() + ((t + 1) % 2) * batch * padded;
      for (int64_t b = 0; b < batch; ++b) {
        const float* hp = h_prev + b * padded;
        const T* gxt = gx + (t * batch + b) * kGates * hidden;
        T* yt = y + (t * batch + b) * hidden;
        // Odd steps walk the weights backwards (blocks and inputs), so the lines the previous
        // step read last, still in L2, are read first: a cyclic walk over about the cache's
        // size would miss on nearly every line under LRU replacement.
        const bool backwards = t % 2 == 1;
        for (int64_t k = b_begin; k < b_end; ++k) {
          const int64_t blk = backwards ? b_end - 1 - (k - b_begin) : k;
          const int64_t u0 = blk * kUnits, n = std::min(kUnits, hidden - u0);
          const float* wp = packed + blk * block_len;
          // Two accumulators per gate (pairs of inputs): 8 independent FMA chains.
          Vec a[kGates], e[kGates];
          for (int64_t g = 0; g < kGates; ++g) {
            a[g] = load_part(gxt + g * hidden + u0, n);
            e[g] = Vec(0.f);
          }
          const int64_t pairs = hidden / 2;
          if (hidden % 2 == 1) {  // the last input on its own
            const Vec h_a(hp[hidden - 1]);
            const float* r = wp + (hidden - 1) * kGates * kUnits;
            for (int64_t g = 0; g < kGates; ++g) e[g] = at::vec::fmadd(h_a, Vec::loadu(r + g * kUnits), e[g]);
          }
          for (int64_t q = 0; q < pairs; ++q) {
            const int64_t i = 2 * (backwards ? pairs - 1 - q : q);
            const Vec h_a(hp[i]), h_e(hp[i + 1]);
            const float* r = wp + i * kGates * kUnits;
            for (int64_t g = 0; g < kGates; ++g) {
              a[g] = at::vec::fmadd(h_a, Vec::loadu(r + g * kUnits), a[g]);
              e[g] = at::vec::fmadd(h_e, Vec::loadu(r + (kGates + g) * kUnits), e[g]);
            }
          }
          const Vec in = sigmoid(a[0] + e[0]), forget = sigmoid(a[1] + e[1]);
          const Vec cell = (a[2] + e[2]).tanh(), out = sigmoid(a[3] + e[3]);
          float* cp = c_buf.data() + b * padded + u0;
          const Vec c = forget * Vec::loadu(cp) + in * cell;
          const Vec h = out * c.tanh();
          c.store(cp);
          h.store(h_next + b * padded + u0);
          store_part(yt + u0, h, n);
        }
      }
#pragma omp barrier
    }
    for (int64_t blk = b_begin; blk < b_end; ++blk) {
      const int64_t n = std::min(kUnits, hidden - blk * kUnits);
      for (int64_t b = 0; b < batch; ++b)
        store_part(c_out + b * hidden + blk * kUnits, Vec::loadu(c_buf.data() + b * padded + blk * kUnits), n);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> lstm_recurrence_cpu(const at::Tensor& gates_x, const at::Tensor& w_hh,
                                                       const at::Tensor& h0, const at::Tensor& c0) {
  const char* op = "lstm_recurrence";
  TORCH_CHECK(gates_x.dim() == 3, op, ": gates_x must be [T, B, 4H], got ", gates_x.sizes());
  TORCH_CHECK(w_hh.dim() == 2, op, ": w_hh must be [4H, H], got ", w_hh.sizes());
  const int64_t steps = gates_x.size(0), batch = gates_x.size(1), hidden = w_hh.size(1);
  TORCH_CHECK(hidden >= 1 && w_hh.size(0) == kGates * hidden, op, ": w_hh must be [4H, H] with H >= 1, got ",
              w_hh.sizes());
  TORCH_CHECK(gates_x.size(2) == kGates * hidden, op, ": gates_x must be [T, B, 4H] with 4H = ",
              kGates * hidden, ", got ", gates_x.sizes());
  for (const auto* t : {&h0, &c0})
    TORCH_CHECK(t->dim() == 2 && t->size(0) == batch && t->size(1) == hidden, op,
                ": h0 and c0 must be [B, H] = [", batch, ", ", hidden, "], got ", t->sizes());
  for (const auto* t : {&w_hh, &h0, &c0}) {
    TORCH_CHECK(t->scalar_type() == gates_x.scalar_type(), op, ": all inputs must have the dtype of gates_x (",
                gates_x.scalar_type(), "), got ", t->scalar_type());
    TORCH_CHECK(t->device() == gates_x.device(), op, ": all inputs must be on the device of gates_x");
  }
  TORCH_CHECK(gates_x.scalar_type() == at::kFloat || gates_x.scalar_type() == at::kBFloat16, op,
              ": dtype must be float32 or bfloat16, got ", gates_x.scalar_type());
  const auto gx = gates_x.contiguous(), w = w_hh.contiguous(), h = h0.contiguous(), c = c0.contiguous();
  auto y = at::empty({steps, batch, hidden}, gates_x.options());
  auto c_out = at::empty({batch, hidden}, gates_x.options());
  if (batch == 0) return {y, c_out};
  if (steps == 0) {
    c_out.copy_(c);
    return {y, c_out};
  }
  AT_DISPATCH_SWITCH(gates_x.scalar_type(), "lstm_recurrence",
    AT_DISPATCH_CASE(at::kFloat, [&] {
      lstm_recurrence_kernel<float>(gx.data_ptr<float>(), w.data_ptr<float>(), h.data_ptr<float>(),
                                    c.data_ptr<float>(), y.data_ptr<float>(), c_out.data_ptr<float>(), steps,
                                    batch, hidden, at::get_num_threads());
    })
    AT_DISPATCH_CASE(at::kBFloat16, [&] {
      using B = at::BFloat16;
      lstm_recurrence_kernel<B>(gx.data_ptr<B>(), w.data_ptr<B>(), h.data_ptr<B>(), c.data_ptr<B>(),
                                y.data_ptr<B>(), c_out.data_ptr<B>(), steps, batch, hidden,
                                at::get_num_threads());
    }));
  return {y, c_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(pysonic, CPU, m) { m.impl("lstm_recurrence", &lstm_recurrence_cpu); }

}  // namespace pysonic::cpu
