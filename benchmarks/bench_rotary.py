"""rotary at a Whisper/TangoFlux-sized self-attention: fused kernel vs the unfused torch expressions.

x [1, 16, 1500, 64] (B, H, T, D), full rotary (R = 64), fp32 and bf16, fp32 cos/sin. Layouts:
"bhtd" contiguous, and "bthd" (a [B,T,H,D] projection output viewed as [B,H,T,D], how attention
layers usually call it). Baselines: "reference" (pysonic.ops.reference.rotary, the unfused torch
expression) and "torch_rotate_half" (the usual x * cos + rotate_half(x) * sin with full-width
cos/sin tables, as in Hugging Face transformers).
"""
import pytest
import torch

from pysonic import ops
from pysonic.ops import reference

B, H, T, D = 1, 16, 1500, 64
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _angles(T, R):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, R, 2, dtype=torch.float32) / R))
    freqs = torch.arange(T, dtype=torch.float32)[:, None] * inv_freq[None]
    return freqs.cos(), freqs.sin()


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@pytest.mark.parametrize("impl", ["pysonic", "reference", "torch_rotate_half"])
@pytest.mark.parametrize("layout", ["bhtd", "bthd"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_rotary(benchmark, impl, layout, dtype):
    dt = DTYPES[dtype]
    x = torch.randn(B, H, T, D, dtype=dt) if layout == "bhtd" else torch.randn(B, T, H, D, dtype=dt).transpose(1, 2)
    cos, sin = _angles(T, D)
    cos_full, sin_full = torch.cat((cos, cos), -1).to(dt), torch.cat((sin, sin), -1).to(dt)
    fn = {
        "pysonic": lambda: ops.rotary(x, cos, sin),
        "reference": lambda: reference.rotary(x, cos, sin),
        "torch_rotate_half": lambda: x * cos_full + _rotate_half(x) * sin_full,
    }[impl]
    benchmark.group = f"rotary [{B},{H},{T},{D}] R={D} {layout} {dtype}"
    nbytes = 2 * x.numel() * x.element_size() + 2 * cos.numel() * cos.element_size()
    benchmark.extra_info.update(op="rotary", impl=impl, dtype=dtype, flops=0, bytes=nbytes)
    benchmark(fn)


@pytest.mark.parametrize("impl", ["pysonic", "reference"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_rotary_interleaved(benchmark, impl, dtype):
    x = torch.randn(B, H, T, D, dtype=DTYPES[dtype])
    cos, sin = _angles(T, D)
    fn = {
        "pysonic": lambda: ops.rotary(x, cos, sin, interleaved=True),
        "reference": lambda: reference.rotary(x, cos, sin, True),
    }[impl]
    benchmark.group = f"rotary interleaved [{B},{H},{T},{D}] R={D} {dtype}"
    nbytes = 2 * x.numel() * x.element_size() + 2 * cos.numel() * cos.element_size()
    benchmark.extra_info.update(op="rotary", impl=impl, dtype=dtype, flops=0, bytes=nbytes)
    benchmark(fn)
