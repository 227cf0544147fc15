"""rvq_encode / rvq_decode against the plain-PyTorch loops a codec would otherwise run.

Run: ``python -m pytest benchmarks/bench_rvq.py --benchmark-only -q`` (2 threads).
Shape: one 20 s clip of 75 Hz EnCodec frames (T=1500), 12 levels of K=1024 codes, D=128.
Baselines: ``torch_cdist`` (per level ``torch.cdist`` + ``argmin``, subtracting the chosen codes),
``torch_mm`` (the same with the ``||c||^2 - 2 x.c`` expansion through ``torch.mm``) and, for
decode, ``torch_index`` (per level index-and-add).
"""
from __future__ import annotations

import pytest
import torch

import pysonic.ops as ops

torch.set_num_threads(2)

B, T, L, K, D = 1, 1500, 12, 1024, 128
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


def _inputs(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, D, generator=g).to(dtype)
    codebooks = (torch.randn(L, K, D, generator=g) * 0.7 ** torch.arange(L).view(L, 1, 1)).to(dtype)
    return x, codebooks


def encode_cdist(x, codebooks):
    r = x.reshape(-1, x.shape[-1])
    codes = []
    for level in range(codebooks.shape[0]):
        idx = torch.cdist(r, codebooks[level]).argmin(-1)
        codes.append(idx)
        r = r - codebooks[level][idx]
    return torch.stack(codes, -1).reshape(*x.shape[:2], -1)


def encode_mm(x, codebooks):
    r = x.reshape(-1, x.shape[-1]).float()
    books = codebooks.float()
    norms = books.square().sum(-1)  # [L, K]
    codes = []
    for level in range(books.shape[0]):
        idx = (norms[level] - 2 * r @ books[level].T).argmin(-1)
        codes.append(idx)
        r = r - books[level][idx]
    return torch.stack(codes, -1).reshape(*x.shape[:2], -1)


def decode_index(codes, codebooks):
    out = torch.zeros(*codes.shape[:2], codebooks.shape[-1], dtype=codebooks.dtype)
    for level in range(codes.shape[-1]):
        out = out + codebooks[level][codes[..., level]]
    return out


ENCODERS = {
    "pysonic": lambda x, cb: ops.rvq_encode(x, cb, backend="cpp"),
    "torch_cdist": encode_cdist,
    "torch_mm": encode_mm,
}
DECODERS = {
    "pysonic": lambda c, cb: ops.rvq_decode(c, cb, backend="cpp"),
    "torch_index": decode_index,
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", list(ENCODERS))
def test_bench_rvq_encode(benchmark, impl, dtype):
    x, codebooks = _inputs(dtype)
    size = x.element_size()
    benchmark.group = f"rvq_encode B={B} T={T} L={L} K={K} D={D} {str(dtype).replace('torch.', '')}"
    benchmark.extra_info.update(
        op="rvq_encode", impl=impl, dtype=str(dtype).replace("torch.", ""),
        flops=float(2 * B * T * L * K * D),
        bytes=(x.numel() + codebooks.numel()) * size + B * T * L * 8,
    )
    benchmark(ENCODERS[impl], x, codebooks)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", list(DECODERS))
def test_bench_rvq_decode(benchmark, impl, dtype):
    _, codebooks = _inputs(dtype)
    codes = torch.randint(0, K, (B, T, L), generator=torch.Generator().manual_seed(1))
    size = codebooks.element_size()
    benchmark.group = f"rvq_decode B={B} T={T} L={L} K={K} D={D} {str(dtype).replace('torch.', '')}"
    benchmark.extra_info.update(
        op="rvq_decode", impl=impl, dtype=str(dtype).replace("torch.", ""),
        flops=float(B * T * L * D),
        bytes=codes.numel() * 8 + B * T * L * D * size + B * T * D * size,
    )
    benchmark(DECODERS[impl], codes, codebooks)
