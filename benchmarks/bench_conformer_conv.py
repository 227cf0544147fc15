"""conformer_conv at a Conformer (SoundStorm) size: fused kernel vs the unfused torch sequence.

x [1, 1500, 1024] (B, T, 2C), C = 512, K = 31, fp32 and bf16. Baselines: "torch_unfused" (what a
Conformer module runs: F.glu over channels, transpose to [B,C,T], conv1d(groups=C, padding=K//2),
SiLU, transpose back) and "reference" (pysonic.ops.reference.conformer_conv, the same with
explicit padding). The training step (forward + backward for x, weight and bias) is timed too.
"""
import pytest
import torch
import torch.nn.functional as F

from pysonic import ops
from pysonic.ops import reference

B, T, C, K = 1, 1500, 512, 31
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _torch_unfused(x, weight, bias):
    h = F.glu(x, dim=-1).transpose(1, 2)  # [B,C,T]
    h = F.conv1d(h, weight.unsqueeze(1), bias, padding=weight.shape[1] // 2, groups=weight.shape[0])
    return F.silu(h).transpose(1, 2)


def _inputs(dtype, requires_grad=False):
    x = torch.randn(B, T, 2 * C, dtype=dtype)
    w = (torch.randn(C, K) / K**0.5).to(dtype)
    b = torch.randn(C).to(dtype)
    return [t.requires_grad_(requires_grad) for t in (x, w, b)]


FNS = {
    "pysonic": lambda x, w, b: ops.conformer_conv(x, w, b),
    "torch_unfused": _torch_unfused,
    "reference": lambda x, w, b: reference.conformer_conv(x, w, b),
}


def _work(x):
    flops = 2.0 * B * T * C * K + 8.0 * B * T * C  # the conv's multiply-adds + GLU/SiLU
    return flops, (x.numel() + B * T * C) * x.element_size()


@pytest.mark.parametrize("impl", list(FNS))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_conformer_conv(benchmark, impl, dtype):
    x, w, b = _inputs(DTYPES[dtype])
    flops, nbytes = _work(x)
    benchmark.group = f"conformer_conv [{B},{T},{2 * C}] K={K} {dtype}"
    benchmark.extra_info.update(op="conformer_conv", impl=impl, dtype=dtype, flops=flops, bytes=nbytes)
    benchmark(FNS[impl], x, w, b)


@pytest.mark.parametrize("impl", ["pysonic", "torch_unfused"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_conformer_conv_train_step(benchmark, impl, dtype):
    x, w, b = _inputs(DTYPES[dtype], requires_grad=True)
    grad = torch.randn(B, T, C, dtype=DTYPES[dtype])
    fn = FNS[impl]
    flops, nbytes = _work(x)

    def step():
        return torch.autograd.grad(fn(x, w, b), (x, w, b), grad)

    benchmark.group = f"conformer_conv fwd+bwd [{B},{T},{2 * C}] K={K} {dtype}"
    benchmark.extra_info.update(op="conformer_conv", impl=impl, dtype=dtype, flops=3 * flops, bytes=3 * nbytes)
    benchmark(step)
