"""The Triton kernels (kernels/triton, ``pysonic.triton_kernels``) against ``pysonic.ops.reference``.

They run here on CPU tensors through Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported), so shapes stay small: the interpreter executes
each program in numpy. Every ``IMPLS`` entry is called with the positional signature of its
``torch.ops.pysonic.<op>`` schema. Tolerances: fp32 results within 1e-5 (abs and rel) of the
reference (the kernels only reorder fp32 sums), gradients within 1e-4; bf16/fp16 by
``low_precision_close`` (kernel error vs the fp32 reference <= 2x plain PyTorch's in that dtype).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pysonic.ops import _backends, _triton, reference
from tests.ops.utils import REQUIRED, low_precision_close

_reason = _triton.why_unavailable("flow_step", torch.device("cpu"))
if _reason is not None and "triton" not in REQUIRED:
    pytest.skip(f"Triton kernels unavailable: {_reason}", allow_module_level=True)

IMPLS = _triton._load()[0].IMPLS if _reason is None else {}
OPS = ("attention", "rotary", "conformer_conv", "rvq_encode", "rvq_decode", "flow_step", "diffusion_step", "diffusion_step_x0",
       "lstm_recurrence", "elu_out")  # lstm_recurrence and elu_out: tests/ops/test_lstm.py, test_elu.py
FP32 = dict(atol=1e-5, rtol=1e-5)  # fp32 kernels reorder sums only
GRAD32 = dict(atol=1e-4, rtol=1e-4)  # gradients go through a few more reordered sums


def _noncontig(t: torch.Tensor) -> torch.Tensor:
    """The same values as a non-contiguous view (every other element of a doubled last dim)."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t
    out = wide[..., ::2]
    assert not out.is_contiguous() or t.shape[-1] <= 1
    return out.requires_grad_(t.requires_grad)


def _lowp_check(kernel_out, args_fp32, ref_fn, dtype):
    """low_precision_close of a kernel run on ``dtype`` copies of fp32 args against the reference."""
    lowp = [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args_fp32]
    low_precision_close(kernel_out, ref_fn(*args_fp32), ref_fn(*lowp))


def test_impls_cover_every_op():
    assert set(IMPLS) == set(OPS)
    for op in OPS:
        assert hasattr(torch.ops.pysonic, f"{op}_triton"), op
    assert _backends.why_unavailable("attention", "triton", torch.device("cpu")) is None


# ----------------------------------------------------------------------------------------------
# attention

# (B, H, Hkv, Tq, Tk, D, causal, key_lengths)
ATTENTION_CASES = [
    pytest.param(2, 2, 2, 5, 7, 8, False, None, id="odd"),
    pytest.param(2, 4, 2, 7, 5, 12, True, None, id="causal-Tq>Tk-gqa"),
    pytest.param(1, 2, 1, 3, 9, 16, True, [7], id="causal-Tq<Tk-keylen"),
    pytest.param(3, 2, 1, 6, 6, 5, False, [6, 0, 2], id="keylen-with-0"),
    pytest.param(1, 1, 1, 1, 20, 16, True, None, id="Tq=1"),
    pytest.param(1, 3, 3, 1, 1, 1, False, None, id="all-ones"),
    pytest.param(1, 3, 1, 33, 70, 24, True, [50], id="multi-block"),
    pytest.param(2, 2, 1, 4, 6, 8, False, [1 << 40, -3], id="keylen-huge-negative"),
]


def _attention_inputs(B, H, Hkv, Tq, Tk, D, key_lengths, dtype=torch.float32, grad=False):
    q, k, v = (torch.randn(B, h, t, D, dtype=dtype, requires_grad=grad) for h, t in ((H, Tq), (Hkv, Tk), (Hkv, Tk)))
    klen = None if key_lengths is None else torch.tensor(key_lengths)
    return q, k, v, klen


def _reference_lse(q, k, causal, scale, key_lengths):
    B, H, Tq, D = q.shape
    k = k.float().repeat_interleave(H // k.shape[1], dim=1)
    scores = (q.float() @ k.transpose(-1, -2)) * scale
    visible = reference.attention_mask(B, Tq, k.shape[2], causal, key_lengths, q.device)
    return torch.logsumexp(scores.masked_fill(~visible, float("-inf")), -1)


@pytest.mark.parametrize("B,H,Hkv,Tq,Tk,D,causal,key_lengths", ATTENTION_CASES)
def test_attention_fp32(B, H, Hkv, Tq, Tk, D, causal, key_lengths):
    q, k, v, klen = _attention_inputs(B, H, Hkv, Tq, Tk, D, key_lengths)
    out, lse = IMPLS["attention"](q, k, v, causal, None, klen)
    torch.testing.assert_close(out, reference.attention(q, k, v, causal, None, klen), **FP32)
    want = _reference_lse(q, k, causal, 1 / math.sqrt(D), klen)
    assert lse.dtype == torch.float32 and lse.shape == (B, H, Tq)
    torch.testing.assert_close(lse, want, **FP32)  # -inf exactly where the reference has -inf
    blind = torch.isinf(want)
    assert (out[blind] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("B,H,Hkv,Tq,Tk,D,causal,key_lengths", ATTENTION_CASES[1:4] + ATTENTION_CASES[6:])
def test_attention_low_precision(dtype, B, H, Hkv, Tq, Tk, D, causal, key_lengths):
    q, k, v, klen = _attention_inputs(B, H, Hkv, Tq, Tk, D, key_lengths)
    out, lse = IMPLS["attention"](q.to(dtype), k.to(dtype), v.to(dtype), causal, 0.3, klen)
    assert out.dtype == dtype
    _lowp_check(out, [q, k, v, causal, 0.3, klen], reference.attention, dtype)
    want = _reference_lse(q.to(dtype), k.to(dtype), causal, 0.3, klen)  # exact products of the rounded inputs
    torch.testing.assert_close(lse, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("B,H,Hkv,Tq,Tk,D,causal,key_lengths", [ATTENTION_CASES[i] for i in (0, 1, 2, 3, 6)])
def test_attention_grad_fp32(B, H, Hkv, Tq, Tk, D, causal, key_lengths):
    q, k, v, klen = _attention_inputs(B, H, Hkv, Tq, Tk, D, key_lengths, grad=True)
    out, lse = IMPLS["attention"](q, k, v, causal, 0.5, klen)
    assert not lse.requires_grad
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(reference.attention(q, k, v, causal, 0.5, klen), (q, k, v), g)
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, **GRAD32, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_attention_grad_low_precision(dtype):
    q, k, v, klen = _attention_inputs(2, 4, 2, 9, 13, 16, [13, 4], grad=True)
    g = torch.randn(2, 4, 9, 16)
    ref32 = torch.autograd.grad(reference.attention(q, k, v, True, None, klen), (q, k, v), g)
    low = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    ref_low = torch.autograd.grad(reference.attention(*low, True, None, klen), low, g.to(dtype))
    out, _ = IMPLS["attention"](*low, True, None, klen)
    got = torch.autograd.grad(out, low, g.to(dtype))
    for a, b, c in zip(got, ref32, ref_low):
        assert a.dtype == dtype
        low_precision_close(a, b, c)


def test_attention_noncontiguous():
    q, k, v, klen = _attention_inputs(2, 2, 1, 5, 6, 8, [3, 6], grad=True)
    qn, kn, vn = (_noncontig(t.detach()).requires_grad_() for t in (q, k, v))
    qt = q.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # [B,T,H,D] memory
    out, _ = IMPLS["attention"](qt, kn, vn, False, None, klen)
    want = reference.attention(q, k, v, False, None, klen)
    torch.testing.assert_close(out, want, **FP32)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (qt, kn, vn), g)
    for a, b in zip(got, torch.autograd.grad(want, (q, k, v), g)):
        torch.testing.assert_close(a, b, **GRAD32)


@pytest.mark.parametrize("shape", [(0, 2, 4, 4, 8), (1, 2, 0, 4, 8), (1, 2, 3, 0, 8)], ids=["B=0", "Tq=0", "Tk=0"])
def test_attention_empty(shape):
    B, H, Tq, Tk, D = shape
    q = torch.randn(B, H, Tq, D, requires_grad=True)
    k = torch.randn(B, H, Tk, D, requires_grad=True)
    v = torch.randn(B, H, Tk, D, requires_grad=True)
    out, lse = IMPLS["attention"](q, k, v, True, None, None)
    assert out.shape == (B, H, Tq, D) and lse.shape == (B, H, Tq)
    assert (out == 0).all() and (lse == float("-inf")).all()
    grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
    for g, t in zip(grads, (q, k, v)):
        assert g.shape == t.shape and (g == 0).all()


def test_attention_errors():
    q = torch.randn(1, 3, 4, 8)
    k = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="attention.*multiple"):
        IMPLS["attention"](q, k, k, False, None, None)
    with pytest.raises(ValueError, match="attention: key_lengths"):
        IMPLS["attention"](q, q, q, False, None, torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="attention: q, k and v"):
        IMPLS["attention"](q, q.half(), q, False, None, None)


# ----------------------------------------------------------------------------------------------
# rotary

# (B, H, T, D, R)
ROTARY_CASES = [(2, 3, 5, 14, 6), (1, 2, 7, 8, 8), (2, 1, 1, 6, 2), (1, 2, 3, 5, 0), (1, 1, 9, 130, 128)]


def _rotary_inputs(B, H, T, D, R, dtype=torch.float32, grad=False):
    x = torch.randn(B, H, T, D, dtype=dtype, requires_grad=grad)
    angle = torch.randn(T, R // 2)
    return x, angle.cos(), angle.sin()


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("B,H,T,D,R", ROTARY_CASES)
def test_rotary(B, H, T, D, R, interleaved):
    x, cos, sin = _rotary_inputs(B, H, T, D, R, grad=True)
    out = IMPLS["rotary"](x, cos, sin, interleaved)
    want = reference.rotary(x, cos, sin, interleaved)
    torch.testing.assert_close(out, want, **FP32)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(want, x, g)[0], **FP32)
    xb = x.detach().bfloat16()
    low_precision_close(IMPLS["rotary"](xb, cos, sin, interleaved), want, reference.rotary(xb, cos.bfloat16(), sin.bfloat16(), interleaved))


def test_rotary_bf16_grad_and_noncontiguous():
    x, cos, sin = _rotary_inputs(2, 2, 6, 10, 8)
    xb = _noncontig(x.bfloat16()).requires_grad_()
    cb, sb = _noncontig(cos.bfloat16()), _noncontig(sin.bfloat16())
    out = IMPLS["rotary"](xb, cb, sb, True)
    assert out.dtype == torch.bfloat16
    x32 = x.requires_grad_()
    want = reference.rotary(x32, cb.float(), sb.float(), True)
    xl = x.detach().bfloat16().requires_grad_()
    want_low = reference.rotary(xl, cb, sb, True)
    low_precision_close(out, want, want_low)
    g = torch.randn(out.shape)
    low_precision_close(torch.autograd.grad(out, xb, g.bfloat16())[0], torch.autograd.grad(want, x32, g)[0],
                        torch.autograd.grad(want_low, xl, g.bfloat16())[0])


def test_rotary_empty_and_errors():
    x, cos, sin = _rotary_inputs(0, 2, 3, 4, 4)
    assert IMPLS["rotary"](x, cos, sin, False).shape == x.shape
    x, cos, sin = _rotary_inputs(1, 1, 3, 4, 4)
    with pytest.raises(ValueError, match="rotary: cos"):
        IMPLS["rotary"](x, cos[:2], sin[:2], False)
    with pytest.raises(ValueError, match="rotary: cos.*exceeds"):
        IMPLS["rotary"](x, torch.ones(3, 3), torch.ones(3, 3), False)


# ----------------------------------------------------------------------------------------------
# conformer_conv

# (B, T, C, K, causal)
CONV_CASES = [(2, 9, 5, 3, False), (1, 11, 6, 4, True), (3, 1, 3, 5, False), (1, 7, 1, 1, True), (2, 70, 17, 7, True)]


def _conv_inputs(B, T, C, K, dtype=torch.float32, grad=False):
    return tuple(torch.randn(*s, dtype=dtype, requires_grad=grad) for s in ((B, T, 2 * C), (C, K), (C,)))


@pytest.mark.parametrize("B,T,C,K,causal", CONV_CASES)
def test_conformer_conv_fp32(B, T, C, K, causal):
    x, w, b = _conv_inputs(B, T, C, K, grad=True)
    out = IMPLS["conformer_conv"](x, w, b, causal)
    want = reference.conformer_conv(x, w, b, causal)
    torch.testing.assert_close(out, want, **FP32)
    g = torch.randn_like(out)
    for name, a, c in zip(("x", "weight", "bias"), torch.autograd.grad(out, (x, w, b), g), torch.autograd.grad(want, (x, w, b), g)):
        torch.testing.assert_close(a, c, **GRAD32, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("B,T,C,K,causal", [CONV_CASES[0], CONV_CASES[1], CONV_CASES[4]])
def test_conformer_conv_bf16(B, T, C, K, causal):
    x, w, b = _conv_inputs(B, T, C, K, grad=True)
    low = [t.detach().bfloat16().requires_grad_() for t in (x, w, b)]
    out = IMPLS["conformer_conv"](*low, causal)
    assert out.dtype == torch.bfloat16
    want = reference.conformer_conv(x, w, b, causal)
    want_low = reference.conformer_conv(*low, causal)
    low_precision_close(out, want, want_low)
    g = torch.randn(out.shape)
    got = torch.autograd.grad(out, low, g.bfloat16())
    ref32 = torch.autograd.grad(want, (x, w, b), g)
    ref_low = torch.autograd.grad(want_low, low, g.bfloat16())
    for a, c, d in zip(got, ref32, ref_low):
        low_precision_close(a, c, d)


def test_conformer_conv_noncontiguous_empty_errors():
    x, w, b = _conv_inputs(2, 6, 4, 3)
    xn, wn = _noncontig(x), _noncontig(w)
    torch.testing.assert_close(IMPLS["conformer_conv"](xn, wn, b, False), reference.conformer_conv(x, w, b, False), **FP32)
    xe = torch.randn(2, 0, 8, requires_grad=True)
    we = torch.randn(4, 3, requires_grad=True)
    be = torch.randn(4, requires_grad=True)
    out = IMPLS["conformer_conv"](xe, we, be, False)
    assert out.shape == (2, 0, 4)
    gx, gw, gb = torch.autograd.grad(out.sum(), (xe, we, be))
    assert gx.shape == xe.shape and (gw == 0).all() and (gb == 0).all()
    with pytest.raises(ValueError, match="conformer_conv: weight.*odd"):
        IMPLS["conformer_conv"](x, torch.randn(4, 2), b, False)
    with pytest.raises(ValueError, match="conformer_conv: x"):
        IMPLS["conformer_conv"](x[..., :6], w, b, False)


# ----------------------------------------------------------------------------------------------
# rvq


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B,T,D,L,K,n_q", [(2, 7, 6, 4, 10, 3), (1, 1, 1, 2, 3, 2), (3, 5, 33, 2, 70, 2), (1, 4, 8, 3, 5, 0)])
def test_rvq_encode(dtype, B, T, D, L, K, n_q):
    x = torch.randn(B, T, D, dtype=dtype)
    books = torch.randn(L, K, D, dtype=dtype)
    codes = IMPLS["rvq_encode"](x, books, n_q)
    assert codes.dtype == torch.int64 and codes.shape == (B, T, n_q)
    torch.testing.assert_close(codes, reference.rvq_encode(x, books, n_q), atol=0, rtol=0)


def test_rvq_encode_ties_noncontiguous_empty():
    books = torch.randn(2, 6, 4)
    books[0, 4] = books[0, 1]  # duplicate codes: the lower index wins
    books[1, 5] = books[1, 2]
    x = books[0, 1] + books[1, 2] + 0.01 * torch.randn(3, 5, 4)
    codes = IMPLS["rvq_encode"](_noncontig(x), _noncontig(books), 2)
    assert (codes[..., 0] == 1).all() and (codes[..., 1] == 2).all()
    torch.testing.assert_close(codes, reference.rvq_encode(x, books, 2), atol=0, rtol=0)
    assert IMPLS["rvq_encode"](torch.randn(2, 0, 4), books, 2).shape == (2, 0, 2)
    with pytest.raises(ValueError, match="rvq_encode: n_q"):
        IMPLS["rvq_encode"](x, books, 3)


def test_rvq_encode_tie_across_codebook_tiles():
    # D=256 and 64 rows make the interpreter's launch scan the codebook 4 codes per tile, so the
    # duplicate codes 2 and 9 land in different tiles: the earlier one must win.
    books = torch.randn(1, 12, 256)
    books[0, 9] = books[0, 2]
    x = books[0, 2] + 0.01 * torch.randn(1, 64, 256)
    codes = IMPLS["rvq_encode"](x, books, 1)
    assert (codes == 2).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B,T,D,L,K,n_q", [(2, 7, 6, 4, 10, 3), (1, 1, 1, 1, 1, 1), (2, 9, 130, 3, 5, 3)])
def test_rvq_decode(dtype, B, T, D, L, K, n_q):
    books = torch.randn(L, K, D, dtype=dtype)
    codes = torch.randint(0, K, (B, T, n_q))
    out = IMPLS["rvq_decode"](codes, books)
    assert out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, reference.rvq_decode(codes, books), **FP32)
    else:
        low_precision_close(out, reference.rvq_decode(codes, books.float()), reference.rvq_decode(codes, books))
    torch.testing.assert_close(IMPLS["rvq_decode"](_noncontig(codes.int()), books), out, atol=0, rtol=0)


def test_rvq_decode_bad_codes_and_empty():
    books = torch.randn(2, 5, 3)
    codes = torch.randint(0, 5, (2, 4, 2))
    for bad in (5, -1, 1 << 40):
        c = codes.clone()
        c[1, 3, 1] = bad
        with pytest.raises(ValueError, match=r"rvq_decode: codes must lie in \[0, K\)"):
            IMPLS["rvq_decode"](c, books)
    assert IMPLS["rvq_decode"](codes[:, :0], books).shape == (2, 0, 3)
    assert (IMPLS["rvq_decode"](codes[..., :0], books) == 0).all()
    with pytest.raises(ValueError, match="rvq_decode: codes has n_q"):
        IMPLS["rvq_decode"](torch.zeros(1, 1, 3, dtype=torch.long), books)
    with pytest.raises(TypeError, match="rvq_decode: codes"):
        IMPLS["rvq_decode"](codes.float(), books)


# ----------------------------------------------------------------------------------------------
# sampler steps


@pytest.mark.parametrize("shape", [(3, 5, 7), (1,), (), (2, 3000)], ids=["odd", "one", "scalar", "multi-block"])
@pytest.mark.parametrize("uncond", [False, True], ids=["cond", "cfg"])
def test_flow_step(shape, uncond):
    x, vc, vu = (torch.randn(shape) for _ in range(3))
    vu = vu if uncond else None
    args = [x, vc, vu, -0.07, 3.5]
    torch.testing.assert_close(IMPLS["flow_step"](*args), reference.flow_step(*args), **FP32)
    low = [a.bfloat16() if isinstance(a, torch.Tensor) else a for a in args]
    _lowp_check(IMPLS["flow_step"](*low), args, reference.flow_step, torch.bfloat16)


def test_bf16_rounds_to_nearest_even():
    # The interpreter truncates fp32 -> bf16 casts; the kernels round to nearest even by hand there
    # (as the GPU does). flow_step does the reference's exact fp32 arithmetic, so with one
    # rounding at the end the bf16 results must be bitwise equal.
    x, vc, vu = (torch.randn(4, 999).bfloat16() for _ in range(3))
    got = IMPLS["flow_step"](x, vc, vu, 0.0123, 1.7)
    torch.testing.assert_close(got, reference.flow_step(x, vc, vu, 0.0123, 1.7), atol=0, rtol=0)


@pytest.mark.parametrize("noise,clip", [(False, None), (True, None), (True, 0.8), (False, 0.0)])
@pytest.mark.parametrize("shape", [(3, 5, 7), (1, 1), (2, 3000)], ids=["odd", "one", "multi-block"])
def test_diffusion_step(shape, noise, clip):
    x, eps, n = (torch.randn(shape) for _ in range(3))
    c1, c2, sigma = (torch.rand(shape[0]) + 0.1 for _ in range(3))
    args = [x, eps, n if noise else None, c1, c2, sigma, clip]
    torch.testing.assert_close(IMPLS["diffusion_step"](*args), reference.diffusion_step(*args), **FP32)
    low = [t.bfloat16() if t is not None else None for t in args[:3]] + args[3:]
    low_precision_close(IMPLS["diffusion_step"](*low), reference.diffusion_step(*args), reference.diffusion_step(*low))


def test_steps_noncontiguous_empty_errors():
    x, vc, vu = (_noncontig(torch.randn(4, 6)) for _ in range(3))
    torch.testing.assert_close(IMPLS["flow_step"](x, vc, vu, 0.1, 2.0), reference.flow_step(x, vc, vu, 0.1, 2.0), **FP32)
    c = torch.rand(4)
    torch.testing.assert_close(IMPLS["diffusion_step"](x, vc, vu, c, c, c, 1.0),
                               reference.diffusion_step(x, vc, vu, c, c, c, 1.0), **FP32)
    e = torch.randn(2, 0, 3)
    assert IMPLS["flow_step"](e, e, None, 0.1, 1.0).shape == e.shape
    assert IMPLS["diffusion_step"](e, e, e, c[:2], c[:2], c[:2], None).shape == e.shape
    with pytest.raises(ValueError, match="flow_step: v_cond"):
        IMPLS["flow_step"](x, vc[:2], None, 0.1, 1.0)
    with pytest.raises(ValueError, match="diffusion_step: c1"):
        IMPLS["diffusion_step"](x, vc, None, c[:3], c, c, None)


# ----------------------------------------------------------------------------------------------
# torch.library registration


def _opcheck_cases():
    q, k, v, _ = _attention_inputs(1, 2, 1, 3, 5, 4, None, grad=True)
    x, w, b = _conv_inputs(1, 4, 3, 3, grad=True)
    xr, cos, sin = _rotary_inputs(1, 2, 3, 6, 4, grad=True)
    books = torch.randn(2, 4, 3)
    y = torch.randn(2, 3)
    c = torch.rand(2)
    return {
        "attention": (q, k, v, True, None, torch.tensor([4])),
        "rotary": (xr, cos, sin, True),
        "conformer_conv": (x, w, b, False),
        "rvq_encode": (torch.randn(1, 3, 3), books, 2),
        "rvq_decode": (torch.randint(0, 4, (1, 3, 2)), books),
        "flow_step": (y, y, y, 0.1, 2.0),
        "diffusion_step": (y, y, y, c, c, c, 1.0),
        "diffusion_step_x0": (y, y, y, c, c, c, c, c, 1.0),
        "lstm_recurrence": (torch.randn(3, 2, 8), torch.randn(8, 2), torch.randn(2, 2), torch.randn(2, 2)),
        "elu_out": (y, 1.0, torch.empty_like(y)),
    }


@pytest.mark.parametrize("op", OPS)
def test_opcheck(op):
    # schema, fake tensor, autograd registration and AOT dispatch of each registered Triton op
    torch.library.opcheck(getattr(torch.ops.pysonic, f"{op}_triton"), _opcheck_cases()[op])


def test_torch_compile_fullgraph():
    # Dynamo traces through the registered ops without graph breaks, and autograd flows through
    # them. backend="aot_eager": inductor takes minutes on this machine; opcheck covers the rest.
    q = torch.randn(1, 2, 5, 8, requires_grad=True)
    cos, sin = torch.randn(5, 2), torch.randn(5, 2)
    w, b = torch.randn(8, 3), torch.randn(8)  # x [1, 5, 16] = [B, T, 2C]

    def f(q):
        o, _ = IMPLS["attention"](q, q, q, True, None, None)
        r = IMPLS["rotary"](o, cos, sin, False)
        return IMPLS["conformer_conv"](r.reshape(1, 5, 16), w, b, False).square().sum()

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q)
    (g,) = torch.autograd.grad(got, q)
    q2 = q.detach().requires_grad_()
    want = f(q2)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch.testing.assert_close(g, torch.autograd.grad(want, q2)[0], atol=0, rtol=0)


@pytest.mark.skipif(os.environ.get("PYSONIC_TEST_TRITON_COMPILE") != "1",
                    reason="about a minute: set PYSONIC_TEST_TRITON_COMPILE=1 to trace every op body on fake "
                           "CUDA tensors and compile every launch for sm_90 (no GPU needed)")
def test_gpu_path_traces_and_compiles():
    script = Path(__file__).resolve().parents[2] / "kernels" / "triton" / "_compile_check.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "0 failures" in run.stdout
