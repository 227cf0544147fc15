"""attention forward at B=1, H=16, T=1500, D=64 (a TangoFlux/MusicGen-sized layer): pysonic's fused
CPU kernel vs torch's own CPU flash attention (scaled_dot_product_attention) and the reference.
Plus the backward (forward + backward through autograd) against torch's SDPA backward."""
import pytest
import torch
import torch.nn.functional as F

from pysonic import ops
from pysonic.ops import reference

B, H, T, D = 1, 16, 1500, 64
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _inputs(dtype, requires_grad=False):
    return [torch.randn(B, H, T, D, dtype=DTYPES[dtype], requires_grad=requires_grad) for _ in range(3)]


def _info(benchmark, impl, dtype, causal, passes=1):
    # Two [T,T,D] products per pass (forward 2, backward 5 with the recomputation -> counted as
    # 2 + 5 = 7 for forward+backward); causal does about half the work.
    flops = passes * 2 * 2 * B * H * T * T * D * (0.5 if causal else 1.0)
    nbytes = 4 * B * H * T * D * torch.finfo(DTYPES[dtype]).bits // 8
    benchmark.extra_info.update(op="attention", impl=impl, dtype=dtype, flops=flops, bytes=nbytes)


@pytest.mark.parametrize("impl", ["pysonic", "torch_sdpa", "reference"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_attention_forward(benchmark, impl, causal, dtype):
    q, k, v = _inputs(dtype)
    fn = {
        "pysonic": lambda: ops.attention(q, k, v, causal=causal),
        "torch_sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
        "reference": lambda: reference.attention(q, k, v, causal),
    }[impl]
    benchmark.group = f"attention fwd [{B},{H},{T},{D}] {'causal' if causal else 'full'} {dtype}"
    _info(benchmark, impl, dtype, causal)
    with torch.inference_mode():
        benchmark(fn)


@pytest.mark.parametrize("impl", ["pysonic", "torch_sdpa"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_attention_forward_backward(benchmark, impl, causal, dtype):
    q, k, v = _inputs(dtype, requires_grad=True)
    grad = torch.randn(B, H, T, D, dtype=DTYPES[dtype])
    attend = {
        "pysonic": lambda: ops.attention(q, k, v, causal=causal),
        "torch_sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
    }[impl]
    benchmark.group = f"attention fwd+bwd [{B},{H},{T},{D}] {'causal' if causal else 'full'} {dtype}"
    _info(benchmark, impl, dtype, causal, passes=3.5)
    benchmark(lambda: torch.autograd.grad(attend(), (q, k, v), grad))
