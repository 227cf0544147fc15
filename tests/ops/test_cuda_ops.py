"""The CUDA kernels (torch.ops.pysonic.* on CUDA tensors) against pysonic.ops.reference.

Needs a CUDA device and a pysonic._C built with the CUDA kernels (PYSONIC_CUDA=1); without a
device every test skips with "needs a CUDA device". A build without the CUDA kernels skips with
the reason, or fails when CI sets PYSONIC_REQUIRE_BACKENDS=...,cuda.

Tolerances: fp32 against the fp32 reference with atol/rtol stated per op (summation order
differs); bf16/fp16 with the flash-attention rule (tests.ops.utils.low_precision_close): the
kernel's error against the fp32 reference is at most 2x plain PyTorch's in the same precision.
"""
from __future__ import annotations

import math

import pytest
import torch

from pysonic.ops import _backends, reference
from tests.ops.utils import REQUIRED, low_precision_close

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEV = "cuda"
LOWP = (torch.bfloat16, torch.float16)


def cuda_op(name):
    reason = _backends.why_unavailable(name, "cuda", torch.device(DEV))
    if reason is not None:
        if "cuda" in REQUIRED:
            pytest.fail(f"cuda backend required but unavailable: {reason}")
        pytest.skip(f"cuda backend unavailable: {reason}")
    return getattr(torch.ops.pysonic, name)


def close(out, ref32, ref_lowp, dtype, *, atol, rtol):
    """fp32: allclose to the fp32 reference; low precision: the 2x-of-torch rule."""
    assert out.dtype == dtype and out.shape == ref32.shape
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref32, atol=atol, rtol=rtol)
    else:
        low_precision_close(out, ref32, ref_lowp, floor=1e-3)


# ------------------------------------------------------------------------------- attention

ATTN_SHAPES = [  # B, H, Hkv, Tq, Tk, D
    (2, 4, 2, 7, 13, 64),
    (1, 2, 1, 1, 1, 32),
    (2, 2, 2, 33, 17, 80),
    (1, 3, 3, 65, 65, 128),
    (1, 4, 1, 40, 100, 16),
    (2, 1, 1, 0, 5, 64),  # empty queries
    (1, 2, 2, 3, 0, 64),  # no keys: zeros, lse -inf
]


def _attn_inputs(shape, dtype, lengths):
    B, H, Hkv, Tq, Tk, D = shape
    q = torch.randn(B, H, Tq, D, device=DEV)
    k = torch.randn(B, Hkv, Tk, D, device=DEV)
    v = torch.randn(B, Hkv, Tk, D, device=DEV)
    kl = None
    if lengths and B > 0:
        kl = torch.randint(0, Tk + 2, (B,), device=DEV)
        kl[0] = 0  # a batch item with no visible key
    return q.to(dtype), k.to(dtype), v.to(dtype), kl


def _ref_lse(q, k, causal, scale, kl):
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    kk = k.float().repeat_interleave(H // Hkv, dim=1)
    s = (q.float() @ kk.transpose(-1, -2)) * scale
    vis = reference.attention_mask(B, Tq, Tk, causal, kl, q.device)
    return torch.logsumexp(s.masked_fill(~vis, float("-inf")), dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths", [False, True])
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=str)
def test_attention(shape, causal, lengths, dtype):
    op = cuda_op("attention")
    q, k, v, kl = _attn_inputs(shape, dtype, lengths)
    scale = 1.0 / math.sqrt(shape[-1])
    out, lse = op(q, k, v, causal, None, kl)
    ref32 = reference.attention(q.float(), k.float(), v.float(), causal, scale, kl)
    ref_lowp = reference.attention(q, k, v, causal, scale, kl)
    close(out, ref32, ref_lowp, dtype, atol=2e-5, rtol=1e-4)  # fp32: summation order only
    assert lse.dtype == torch.float32 and lse.shape == shape[:2] + (shape[3],)
    ref_lse = _ref_lse(q, k, causal, scale, kl)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)  # from the same (rounded) inputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", ATTN_SHAPES[:5], ids=str)
def test_attention_backward(shape, causal, dtype):
    fwd, bwd = cuda_op("attention"), cuda_op("attention_backward")
    q, k, v, kl = _attn_inputs(shape, dtype, lengths=True)
    g = torch.randn(q.shape, device=DEV).to(dtype)
    scale = 0.3
    out, lse = fwd(q, k, v, causal, scale, kl)
    grads = bwd(g, q, k, v, out, lse, causal, scale, kl)

    def ref_grads(t_dtype):
        leaves = [t.detach().to(t_dtype).requires_grad_() for t in (q, k, v)]
        reference.attention(*leaves, causal, scale, kl).backward(g.to(t_dtype))
        return [t.grad for t in leaves]

    for got, r32, rlow in zip(grads, ref_grads(torch.float32), ref_grads(dtype)):
        close(got, r32, rlow, dtype, atol=1e-4, rtol=1e-3)  # fp32: recomputation, order


def test_attention_noncontiguous_and_errors():
    op = cuda_op("attention")
    q = torch.randn(2, 9, 3, 64, device=DEV).transpose(1, 2)  # [2, 3, 9, 64] view
    k = torch.randn(2, 3, 11, 64, device=DEV)
    out, _ = op(q, k, k, False, None, None)
    torch.testing.assert_close(out, reference.attention(q, k, k), atol=2e-5, rtol=1e-4)
    with pytest.raises(RuntimeError, match="attention: .*multiple"):
        op(q, k[:, :2], k[:, :2], False, None, None)
    with pytest.raises(RuntimeError, match="attention: .*head dims"):
        big = torch.randn(1, 1, 2, 160, device=DEV)
        op(big, big, big, False, None, None)


# ---------------------------------------------------------------------------------- rotary


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cos_fp32", [True, False])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 17, 64, 32), (1, 1, 1, 8, 4), (2, 2, 5, 10, 3), (1, 2, 9, 6, 0), (0, 2, 4, 8, 4)], ids=str)
def test_rotary(shape, interleaved, cos_fp32, dtype):
    op = cuda_op("rotary")
    B, H, T, D, half = shape
    x = torch.randn(B, H, T, D, device=DEV).to(dtype)
    ang = torch.randn(T, half, device=DEV)
    cdt = torch.float32 if cos_fp32 else dtype
    cos, sin = ang.cos().to(cdt), ang.sin().to(cdt)
    out = op(x, cos, sin, interleaved)
    ref32 = reference.rotary(x.float(), cos.float(), sin.float(), interleaved)
    ref_lowp = reference.rotary(x, cos, sin, interleaved)
    close(out, ref32, ref_lowp.to(dtype), dtype, atol=1e-6, rtol=1e-5)


def test_rotary_noncontiguous():
    op = cuda_op("rotary")
    x = torch.randn(2, 7, 3, 16, device=DEV).transpose(1, 2)
    ang = torch.randn(7, 8, device=DEV)
    torch.testing.assert_close(op(x, ang.cos(), ang.sin(), False),
                               reference.rotary(x, ang.cos(), ang.sin()), atol=1e-6, rtol=1e-5)


# -------------------------------------------------------------------------- conformer_conv

CONV_SHAPES = [(2, 19, 8, 7), (1, 1, 3, 5), (2, 70, 40, 31), (1, 130, 33, 3), (1, 9, 5, 4), (2, 6, 2, 1), (0, 5, 4, 3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=str)
def test_conformer_conv(shape, causal, dtype):
    fwd, bwd = cuda_op("conformer_conv"), cuda_op("conformer_conv_backward")
    B, T, C, K = shape
    x = torch.randn(B, T, 2 * C, device=DEV).to(dtype)
    w = (torch.randn(C, K, device=DEV) / K).to(dtype)
    b = torch.randn(C, device=DEV).to(dtype)
    if K % 2 == 0 and not causal:  # 'same' padding needs an odd K (as on the CPU)
        with pytest.raises(RuntimeError, match="conformer_conv: kernel size K = .* must be odd"):
            fwd(x, w, b, causal)
        return
    out = fwd(x, w, b, causal)
    ref32 = reference.conformer_conv(x.float(), w.float(), b.float(), causal)
    ref_lowp = reference.conformer_conv(x, w, b, causal)
    close(out, ref32, ref_lowp, dtype, atol=1e-5, rtol=1e-4)

    g = torch.randn(ref32.shape, device=DEV).to(dtype)
    grads = bwd(g, x, w, b, causal)

    def ref_grads(t_dtype):
        leaves = [t.detach().to(t_dtype).requires_grad_() for t in (x, w, b)]
        reference.conformer_conv(*leaves, causal).backward(g.to(t_dtype))
        return [t.grad for t in leaves]

    for got, r32, rlow in zip(grads, ref_grads(torch.float32), ref_grads(dtype)):
        close(got, r32, rlow, dtype, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------- rvq


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 9, 16, 4, 33, 3), (1, 1, 8, 1, 1, 1), (2, 5, 130, 3, 7, 2), (1, 3, 8, 2, 5, 0), (0, 3, 8, 2, 5, 2)], ids=str)
def test_rvq(shape, dtype):
    enc, dec = cuda_op("rvq_encode"), cuda_op("rvq_decode")
    B, T, D, L, K, n_q = shape
    books = torch.randn(L, K, D, device=DEV).to(dtype)
    x = torch.randn(B, T, D, device=DEV).to(dtype)
    codes = enc(x, books, n_q)
    assert codes.dtype == torch.int64 and codes.shape == (B, T, n_q)
    torch.testing.assert_close(codes, reference.rvq_encode(x, books, n_q), rtol=0, atol=0)
    # Duplicate codes: ties go to the lowest index.
    dup = torch.cat([books, books], dim=1)
    assert (enc(x, dup, n_q) < K).all()
    for cdt in (torch.int64, torch.int32):
        out = dec(codes.to(cdt), books)
        ref = reference.rvq_decode(codes, books)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)  # same fp32 sum in the same order


def test_rvq_decode_out_of_range_raises():
    dec = cuda_op("rvq_decode")
    books = torch.randn(2, 5, 8, device=DEV)
    for bad in (5, -1, 1 << 40):
        codes = torch.zeros(1, 3, 2, dtype=torch.long, device=DEV)
        codes[0, 1, 1] = bad
        with pytest.raises(RuntimeError, match=f"rvq_decode: code {bad} .*out of range"):
            dec(codes, books)
    with pytest.raises(RuntimeError, match="rvq_decode: .*levels"):
        dec(torch.zeros(1, 1, 3, dtype=torch.long, device=DEV), books)


# ----------------------------------------------------------------------------------- steps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 1024), (1,), (0, 4), (4, 4097)], ids=str)
@pytest.mark.parametrize("guided", [False, True])
def test_flow_step(shape, guided, dtype):
    op = cuda_op("flow_step")
    x, vc, vu = (torch.randn(shape, device=DEV).to(dtype) for _ in range(3))
    vu = vu if guided else None
    out = op(x, vc, vu, -0.05, 3.5)
    ref32 = reference.flow_step(x.float(), vc.float(), None if vu is None else vu.float(), -0.05, 3.5)
    ref_lowp = reference.flow_step(x, vc, vu, -0.05, 3.5)
    close(out, ref32, ref_lowp, dtype, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_steps_unaligned_and_strided(dtype):
    # Contiguous views at an odd storage offset take the scalar (unvectorised) path.
    flow, diff = cuda_op("flow_step"), cuda_op("diffusion_step")
    base = torch.randn(3 * 1001 + 1, device=DEV).to(dtype)
    x = base[1:].view(3, 1001)
    vc = torch.randn(1001, 3, device=DEV).to(dtype).t()  # strided view
    assert x.is_contiguous() and x.data_ptr() % 16 != 0 and not vc.is_contiguous()
    torch.testing.assert_close(flow(x, vc, None, 0.5, 1.0), reference.flow_step(x, vc, None, 0.5, 1.0))
    c = torch.full((3,), 0.7, device=DEV)
    torch.testing.assert_close(diff(x, vc, None, c, c, c, None), reference.diffusion_step(x, vc, None, c, c, c))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 1024), (1,), (0, 4), (5, 4097)], ids=str)
@pytest.mark.parametrize("clip", [None, 0.5])
@pytest.mark.parametrize("with_noise", [False, True])
def test_diffusion_step(shape, clip, with_noise, dtype):
    op = cuda_op("diffusion_step")
    x, eps, noise = (torch.randn(shape, device=DEV).to(dtype) for _ in range(3))
    noise = noise if with_noise else None
    B = shape[0]
    c1, c2, sigma = (torch.rand(B, device=DEV) + 0.5 for _ in range(3))
    out = op(x, eps, noise, c1, c2, sigma, clip)
    ref32 = reference.diffusion_step(x.float(), eps.float(), None if noise is None else noise.float(), c1, c2, sigma, clip)
    ref_lowp = reference.diffusion_step(x, eps, noise, c1, c2, sigma, clip)
    close(out, ref32, ref_lowp, dtype, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 1024), (1,), (0, 4), (5, 4097)], ids=str)
@pytest.mark.parametrize("clip", [None, 0.5])
@pytest.mark.parametrize("with_noise", [False, True])
def test_diffusion_step_x0(shape, clip, with_noise, dtype):
    op = cuda_op("diffusion_step_x0")
    x, eps, noise = (torch.randn(shape, device=DEV).to(dtype) for _ in range(3))
    noise = noise if with_noise else None
    B = shape[0]
    coefs = [torch.rand(B, device=DEV) + 0.5 for _ in range(5)]
    out = op(x, eps, noise, *coefs, clip)
    ref32 = reference.diffusion_step_x0(x.float(), eps.float(), None if noise is None else noise.float(), *coefs, clip)
    ref_lowp = reference.diffusion_step_x0(x, eps, noise, *coefs, clip)
    close(out, ref32, ref_lowp, dtype, atol=1e-6, rtol=1e-5)
    # An odd storage offset takes the scalar path.
    if x.numel() and dtype == torch.float32:
        base = torch.randn(x.numel() + 1, device=DEV)
        xs = base[1:].view(shape)
        torch.testing.assert_close(op(xs, eps, noise, *coefs, clip),
                                   reference.diffusion_step_x0(xs, eps, noise, *coefs, clip), atol=1e-6, rtol=1e-5)


def test_diffusion_step_x0_errors():
    op = cuda_op("diffusion_step_x0")
    x = torch.randn(2, 3, device=DEV)
    one = torch.ones(2, device=DEV)
    with pytest.raises(RuntimeError, match="diffusion_step_x0: coef_x0 must be on the device"):
        op(x, x, None, one, one, torch.ones(2), one, one, 1.0)
    with pytest.raises(RuntimeError, match="diffusion_step_x0: coef_x must be a scalar or have shape"):
        op(x, x, None, one, one, one, torch.ones(3, device=DEV), one, 1.0)
    with pytest.raises(RuntimeError, match="diffusion_step_x0: clip"):
        op(x, x, None, one, one, one, one, one, -1.0)
    with pytest.raises(RuntimeError, match="diffusion_step_x0: noise"):
        op(x, x, torch.randn(2, 4, device=DEV), one, one, one, one, one, 1.0)


def test_diffusion_step_errors():
    op = cuda_op("diffusion_step")
    x = torch.randn(2, 3, device=DEV)
    one = torch.ones(2, device=DEV)
    with pytest.raises(RuntimeError, match="diffusion_step: c1 must be on the device"):
        op(x, x, None, torch.ones(2), one, one, None)
    with pytest.raises(RuntimeError, match="diffusion_step: c2 must be a scalar or have shape"):
        op(x, x, None, one, torch.ones(3, device=DEV), one, None)
    with pytest.raises(RuntimeError, match="diffusion_step: clip"):
        op(x, x, None, one, one, one, -1.0)


# ------------------------------------------------------------------------------ elu, lstm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_elu(dtype):
    op = cuda_op("elu_out")
    x = (torch.randn(2, 32, 1, 3001, device=DEV) * 4).to(dtype).contiguous(memory_format=torch.channels_last)
    out = torch.empty_like(x)
    op(x, 0.8, out)
    ref = reference.elu(x, 0.8)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)  # expm1f: a few ulp
    else:
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=2.0**-7)  # one rounding to dtype
    op(x, 0.8, x)  # in place
    torch.testing.assert_close(x, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(50, 1, 512), (7, 3, 24), (3, 2, 1)], ids=str)
def test_lstm_recurrence(shape, dtype):
    op = cuda_op("lstm_recurrence")
    T, B, H = shape
    gates = (torch.randn(T, B, 4 * H, device=DEV) * 2).to(dtype)
    w = (torch.randn(4 * H, H, device=DEV) * 3 / H**0.5).to(dtype)
    h0, c0 = torch.randn(B, H, device=DEV).tanh().to(dtype), torch.randn(B, H, device=DEV).to(dtype)
    y, c = op(gates, w, h0, c0)
    y_ref, c_ref = reference.lstm_recurrence(gates, w, h0, c0)
    if dtype == torch.float32:  # the dot products sum in another order; fp32 state in both
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(c, c_ref, atol=1e-5, rtol=1e-5)
    else:  # outputs one bf16 rounding apart
        torch.testing.assert_close(y, y_ref, atol=2.0**-7 + 1e-6, rtol=0)
        torch.testing.assert_close(c, c_ref, atol=2.0**-7, rtol=2.0**-7)
