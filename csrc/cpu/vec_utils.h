// Small helpers shared by the CPU kernels: load/store fp32, bf16 or fp16 data as fp32
// at::vec vectors, two vectors (2 * Vec::size() elements) at a time, so one loop body serves
// every dtype and all arithmetic happens in fp32.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <tuple>
#include <type_traits>
#include <c10/util/Exception.h>
#include <ATen/core/ATen_fwd.h>

namespace pysonic::cpu {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kPair = 2 * Vec::size();  // elements handled by one load_pair/store_pair

// Accumulation type: fp32 for every dtype, except float64 (gradcheck runs kernels in float64).
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Loads/stores 2 * Vectorized<A>::size() elements of T as two vectors of A.
template <typename T, typename A>
inline void load2(const T* p, at::vec::Vectorized<A>& lo, at::vec::Vectorized<A>& hi) {
  using VA = at::vec::Vectorized<A>;
  if constexpr (std::is_same_v<T, A>) {
    lo = VA::loadu(p);
    hi = VA::loadu(p + VA::size());
  } else {
    std::tie(lo, hi) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
  }
}

template <typename T, typename A>
inline void store2(T* p, const at::vec::Vectorized<A>& lo, const at::vec::Vectorized<A>& hi) {
  using VA = at::vec::Vectorized<A>;
  if constexpr (std::is_same_v<T, A>) {
    lo.store(p);
    hi.store(p + VA::size());
  } else {
    at::vec::convert_from_float<T>(lo, hi).store(p);
  }
}

template <typename T>
inline void load_pair(const T* p, Vec& lo, Vec& hi) {
  load2<T, float>(p, lo, hi);
}

template <typename T>
inline void store_pair(T* p, const Vec& lo, const Vec& hi) {
  store2<T, float>(p, lo, hi);
}

}  // namespace pysonic::cpu

namespace pysonic::cpu {

// Calls f(scalar_t{}) for float32, bfloat16 or float16 tensors; any other dtype is an error
// that names the op. Use as: dispatch_floating(t, "op", [&](auto tag) { using T = decltype(tag); });
template <typename F>
void dispatch_floating(at::ScalarType t, const char* op, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", t, " (expected float32, bfloat16 or float16)");
  }
}

}  // namespace pysonic::cpu
