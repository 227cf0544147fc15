// CUDA launchers for rvq_encode and rvq_decode (kernels/cuda/rvq.cuh).
#include "cuda/launch.h"
#include "rvq.cuh"

namespace pysonic::cuda {
namespace {

constexpr int64_t kMaxSmemBytes = 48 * 1024;  // the default dynamic shared memory limit

void check_codebooks(const at::Tensor& codebooks, const char* op) {
  check_cuda(codebooks, op, "codebooks");
  check_dim(codebooks, 3, op, "codebooks", "[L, K, D]");
  TORCH_CHECK(codebooks.is_floating_point(), op, ": codebooks must be floating point, got ",
              codebooks.scalar_type());
}

at::Tensor rvq_encode_cuda(const at::Tensor& x, const at::Tensor& codebooks, int64_t n_q) {
  constexpr const char* op = "rvq_encode";
  check_cuda(x, op, "x");
  check_codebooks(codebooks, op);
  check_same_device(x, codebooks, op, "codebooks");
  check_dim(x, 3, op, "x", "[B, T, D]");
  const int64_t L = codebooks.size(0), K = codebooks.size(1), D = codebooks.size(2);
  TORCH_CHECK(x.size(2) == D, "rvq_encode: x must have D = ", D, " channels like codebooks ",
              codebooks.sizes(), ", got x ", x.sizes());
  TORCH_CHECK(n_q >= 0 && n_q <= L, "rvq_encode: n_q must be in [0, L] = [0, ", L, "], got ", n_q);
  const int64_t rows = x.size(0) * x.size(1);
  TORCH_CHECK(K >= 1 || n_q == 0 || rows == 0, "rvq_encode: codebooks have no codes (K = 0)");
  const int warps = rvq_encode_smem(kEncodeWarps, D) <= kMaxSmemBytes ? kEncodeWarps : 1;
  TORCH_CHECK(rvq_encode_smem(warps, D) <= kMaxSmemBytes, "rvq_encode: the CUDA kernel supports ",
              "codebook dimensions D <= ", kMaxSmemBytes / 4, ", got D = ", D);
  dispatch_float(x.scalar_type(), op, "x", [](auto) {});
  const c10::cuda::CUDAGuard guard(x.device());
  auto codes = at::empty({x.size(0), x.size(1), n_q}, x.options().dtype(at::kLong));
  if (rows == 0 || n_q == 0) return codes;
  auto xc = x.contiguous();
  auto books = codebooks.to(at::kFloat).contiguous();
  dispatch_float(x.scalar_type(), op, "x", [&](auto tag) {
    using T = decltype(tag);
    launch_rvq_encode<T>(ptr<const T>(xc), ptr<const float>(books), ptr<int64_t>(codes), rows, K,
                         D, n_q, warps, current_stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return codes;
}

at::Tensor rvq_decode_cuda(const at::Tensor& codes, const at::Tensor& codebooks) {
  constexpr const char* op = "rvq_decode";
  check_cuda(codes, op, "codes");
  check_codebooks(codebooks, op);
  check_same_device(codes, codebooks, op, "codebooks");
  check_dim(codes, 3, op, "codes", "[B, T, n_q]");
  TORCH_CHECK(!codes.is_floating_point() && !codes.is_complex() &&
                  codes.scalar_type() != at::kBool,
              "rvq_decode: codes must be an integer tensor, got ", codes.scalar_type());
  const int64_t L = codebooks.size(0), K = codebooks.size(1), D = codebooks.size(2);
  const int64_t n_q = codes.size(2);
  TORCH_CHECK(n_q <= L, "rvq_decode: codes have n_q = ", n_q, " levels but codebooks only L = ", L);
  const c10::cuda::CUDAGuard guard(codes.device());
  const int64_t rows = codes.size(0) * codes.size(1);
  auto out = at::empty({codes.size(0), codes.size(1), D}, codebooks.options());
  if (rows == 0 || D == 0) return out;
  if (n_q == 0) return out.zero_();
  at::Tensor cc = codes.scalar_type() == at::kInt ? codes.contiguous()
                                                  : codes.to(at::kLong).contiguous();
  auto books = codebooks.contiguous();
  auto err = at::zeros({4}, codes.options().dtype(at::kLong));
  auto* errp = reinterpret_cast<unsigned long long*>(err.data_ptr());
  dispatch_float(codebooks.scalar_type(), op, "codebooks", [&](auto tag) {
    using C = decltype(tag);
    if (cc.scalar_type() == at::kInt) {
      launch_rvq_decode<C, int32_t>(ptr<const int32_t>(cc), ptr<const C>(books), ptr<C>(out), rows,
                                    n_q, K, D, errp, current_stream());
    } else {
      launch_rvq_decode<C, int64_t>(ptr<const int64_t>(cc), ptr<const C>(books), ptr<C>(out), rows,
                                    n_q, K, D, errp, current_stream());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // One small device-to-host copy (it synchronises the stream) to report a bad code.
  const auto host = err.cpu();
  const int64_t* e = host.data_ptr<int64_t>();
  TORCH_CHECK(e[0] == 0, "rvq_decode: code ", e[1], " at level ", e[2], " (row ", e[3],
              " of B*T) is out of range for K = ", K, " codes");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pysonic, CUDA, m) {
  m.impl("rvq_encode", &rvq_encode_cuda);
  m.impl("rvq_decode", &rvq_decode_cuda);
}

}  // namespace pysonic::cuda
