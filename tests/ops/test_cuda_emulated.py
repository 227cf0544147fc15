"""The CUDA kernels of kernels/cuda/*.cuh, run on the CPU through tests/cuda_emu (no GPU needed).

The emulator executes the real device code (index math, shared-memory tiling, __syncthreads,
warp shuffles, the launch helpers' grid shapes) with one std::thread per CUDA thread; only the
host launchers' tensor plumbing is re-stated in tests/cuda_emu/__init__.py. Output and scratch
buffers are pre-filled with NaN, so an element a kernel forgets to write fails the comparison.
Skips (with the reason) where g++ or the CUDA headers are missing.

Tolerances: fp32 kernels against a float64 reference, atol/rtol 1e-5 (fp32 rounding and a
different summation order); bf16/fp16 with the flash-attention rule (low_precision_close).
Shapes are small: every CUDA thread is an OS thread here.
"""
from __future__ import annotations

import pytest
import torch

from pysonic.ops import reference
from tests import cuda_emu as E
from tests.ops.utils import low_precision_close

try:
    E.load()
    _REASON = None
except E.Unavailable as exc:
    _REASON = f"CUDA emulator unavailable: {exc}"

pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


def check(out, ref64, ref_lowp, dtype):
    assert out.dtype == dtype and out.shape == ref64.shape
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref64.double(), atol=1e-5, rtol=1e-5)
    else:
        low_precision_close(out, ref64, ref_lowp, floor=1e-3)


# ----------------------------------------------------------------------------------- steps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("vec", [True, False])
@pytest.mark.parametrize("guided", [True, False])
def test_flow_step(dtype, vec, guided):
    x, vc, vu = (torch.randn(3, 37).to(dtype) for _ in range(3))
    vu = vu if guided else None
    out = E.flow_step(x, vc, vu, -0.1, 2.5, vec=vec)
    f64 = lambda t: None if t is None else t.double()
    check(out, reference.flow_step(f64(x), f64(vc), f64(vu), -0.1, 2.5), reference.flow_step(x, vc, vu, -0.1, 2.5), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("vec", [True, False])
@pytest.mark.parametrize("clip", [None, 0.4])
@pytest.mark.parametrize("with_noise", [True, False])
def test_diffusion_step(dtype, vec, clip, with_noise):
    x, eps, noise = (torch.randn(3, 2, 16).to(dtype) for _ in range(3))
    noise = noise if with_noise else None
    c1, c2, sigma = torch.rand(3) + 0.5, torch.rand(3), torch.rand(3)
    out = E.diffusion_step(x, eps, noise, c1, c2, sigma, clip, vec=vec)
    ref64 = reference.diffusion_step(x.double(), eps.double(), None if noise is None else noise.double(), c1, c2, sigma, clip)
    check(out, ref64, reference.diffusion_step(x, eps, noise, c1, c2, sigma, clip), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("vec", [True, False])
@pytest.mark.parametrize("clip", [None, 0.4])
@pytest.mark.parametrize("with_noise", [True, False])
def test_diffusion_step_x0(dtype, vec, clip, with_noise):
    # [3, 2, 16] takes the vector path; [3, 37] (odd item length) the scalar one.
    shape = (3, 2, 16) if vec else (3, 37)
    x, eps, noise = (torch.randn(shape).to(dtype) for _ in range(3))
    noise = noise if with_noise else None
    c1, c2, p, q, sigma = torch.rand(3) + 0.5, torch.rand(3), torch.rand(3), torch.rand(3) + 0.5, torch.rand(3)
    out = E.diffusion_step_x0(x, eps, noise, c1, c2, p, q, sigma, clip, vec=vec)
    f64 = lambda t: None if t is None else t.double()
    ref64 = reference.diffusion_step_x0(f64(x), f64(eps), f64(noise), c1, c2, p, q, sigma, clip)
    check(out, ref64, reference.diffusion_step_x0(x, eps, noise, c1, c2, p, q, sigma, clip), dtype)
    if clip is not None:  # the clamp binds somewhere, so this tests it
        xf, ef = x.float().reshape(3, -1), eps.float().reshape(3, -1)
        assert (c1[:, None] * (xf - c2[:, None] * ef)).abs().max() > clip


# ---------------------------------------------------------------------------------- rotary


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cos_fp32", [True, False])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 5, 10, 3), (1, 1, 1, 8, 4), (1, 2, 3, 6, 0)], ids=str)
def test_rotary(shape, interleaved, cos_fp32, dtype):
    B, H, T, D, half = shape
    x = torch.randn(B, H, T, D).to(dtype)
    ang = torch.randn(T, half)
    cdt = torch.float32 if cos_fp32 else dtype
    cos, sin = ang.cos().to(cdt), ang.sin().to(cdt)
    out = E.rotary(x, cos, sin, interleaved)
    ref64 = reference.rotary(x.double(), cos.double(), sin.double(), interleaved)
    check(out, ref64, reference.rotary(x, cos, sin, interleaved), dtype)


# ------------------------------------------------------------------------------------- rvq


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("warps", [4, 1])
@pytest.mark.parametrize("shape", [(2, 7, 40, 3, 9, 3), (1, 3, 5, 2, 6, 1)], ids=str)
def test_rvq(shape, warps, dtype):
    B, T, D, L, K, n_q = shape
    books = torch.randn(L, K, D).to(dtype)
    x = torch.randn(B, T, D).to(dtype)
    codes = E.rvq_encode(x, books, n_q, warps=warps)
    torch.testing.assert_close(codes, reference.rvq_encode(x, books, n_q), rtol=0, atol=0)
    dup = torch.cat([books, books], dim=1)  # exact ties: the lowest index wins
    torch.testing.assert_close(E.rvq_encode(x, dup, n_q, warps=warps), codes, rtol=0, atol=0)
    for cdt in (torch.int64, torch.int32):
        out, err = E.rvq_decode(codes.to(cdt), books)
        assert err.tolist() == [0, 0, 0, 0]
        torch.testing.assert_close(out, reference.rvq_decode(codes, books), rtol=0, atol=0)


@pytest.mark.parametrize("bad", [6, -1, 1 << 40])
def test_rvq_decode_reports_out_of_range(bad):
    books = torch.randn(3, 6, 8)
    codes = torch.randint(0, 6, (2, 5, 3))
    codes[1, 2, 1] = bad
    out, err = E.rvq_decode(codes, books)
    assert err.tolist() == [1, bad, 1, 7]  # flag, code, level, row (b * T + t)
    assert torch.isfinite(out).all()  # the bad code adds nothing and is never read


# -------------------------------------------------------------------------- conformer_conv

CONV_CASES = [(2, 19, 8, 7, False), (1, 70, 40, 5, True), (1, 9, 5, 4, False), (1, 5, 3, 40, False), (2, 6, 2, 1, True), (1, 0, 3, 4, False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conformer_conv(case, dtype):
    B, T, C, K, causal = case
    x = torch.randn(B, T, 2 * C).to(dtype)
    w = (torch.randn(C, K) / K).to(dtype)
    b = torch.randn(C).to(dtype)
    leaves64 = [t.double().requires_grad_() for t in (x, w, b)]
    ref64 = reference.conformer_conv(*leaves64, causal)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    ref_lowp = reference.conformer_conv(*leaves, causal)
    check(E.conformer_conv(x, w, b, causal), ref64, ref_lowp, dtype)
    g = torch.randn(ref64.shape).to(dtype)
    ref64.backward(g.double())
    ref_lowp.backward(g)
    for got, r64, rlow in zip(E.conformer_conv_backward(g, x, w, b, causal), leaves64, leaves):
        check(got, r64.grad, rlow.grad, dtype)


# ------------------------------------------------------------------------------- attention

ATTN_CASES = [  # B, H, Hkv, Tq, Tk, D
    (2, 4, 2, 7, 13, 64),
    (1, 2, 1, 1, 1, 32),
    (1, 2, 2, 20, 37, 80),
    (1, 1, 1, 17, 9, 128),
    (1, 2, 1, 3, 0, 16),
]


def _attention_case(shape, dtype, causal, lengths):
    B, H, Hkv, Tq, Tk, D = shape
    q = torch.randn(B, H, Tq, D).to(dtype)
    k = torch.randn(B, Hkv, Tk, D).to(dtype)
    v = torch.randn(B, Hkv, Tk, D).to(dtype)
    kl = None
    if lengths:
        kl = torch.tensor([max(Tk - 3, 0), Tk + 5][:B])
        if B == 1:
            kl = torch.tensor([Tk // 2])
    scale = 0.3
    out, lse = E.attention(q, k, v, causal, scale, kl)
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    ref64 = reference.attention(*leaves64, causal, scale, kl)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_lowp = reference.attention(*leaves, causal, scale, kl)
    check(out, ref64, ref_lowp, dtype)
    # lse against log-sum-exp of the masked scores of the same inputs (float64).
    kk = leaves64[1].detach().repeat_interleave(H // Hkv, dim=1)
    s = (leaves64[0].detach() @ kk.transpose(-1, -2)) * scale
    vis = reference.attention_mask(B, Tq, Tk, causal, kl, q.device)
    ref_lse = torch.logsumexp(s.masked_fill(~vis, float("-inf")), dim=-1)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-4)
    g = torch.randn(ref64.shape).to(dtype)
    ref64.backward(g.double())
    ref_lowp.backward(g)
    grads = E.attention_backward(g, q, k, v, out, lse, causal, scale, kl)
    for got, r64, rlow in zip(grads, leaves64, leaves):
        check(got, r64.grad, rlow.grad, dtype)


# Every mask combination on the small shapes; the larger ones (the slow part of this file) get
# the plain and the fully masked variant.
ATTN_FP32 = [(s, c, l) for s in ATTN_CASES for c in (False, True) for l in (False, True)
             if s[3] * s[4] < 300 or c == l]


@pytest.mark.parametrize("shape,causal,lengths", ATTN_FP32, ids=str)
def test_attention_fp32(shape, causal, lengths):
    _attention_case(shape, torch.float32, causal, lengths)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_attention_low_precision(dtype):
    _attention_case((1, 2, 1, 9, 21, 48), dtype, True, True)


# ------------------------------------------------------------------------------ elu, lstm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_elu(dtype):
    x = (torch.randn(3, 5, 37) * 4).to(dtype)
    x[0, 0, :4] = torch.tensor([0.0, -1e-7, -30.0, float("nan")]).to(dtype)
    out = E.elu(x, 0.7)
    ref64 = torch.nn.functional.elu(x.double(), 0.7)
    assert out[0, 0, 3].isnan()
    out, ref64 = out.flatten()[4:], ref64.flatten()[4:]
    if dtype == torch.float32:  # CUDA's expm1f: a few ulp from the float64 value
        torch.testing.assert_close(out.double(), ref64, atol=1e-6, rtol=1e-6)
    else:  # one rounding of the fp32 value to the output dtype
        step = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
        torch.testing.assert_close(out.double(), ref64, atol=1e-6, rtol=step)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(5, 2, 24), (4, 1, 33), (3, 3, 1)], ids=str)
def test_lstm_recurrence(dtype, shape):
    """Against the reference (fp32 state in both): fp32 1e-5; bf16 outputs one bf16 step apart."""
    T, B, H = shape
    g = torch.Generator().manual_seed(0)
    gates = (torch.randn(T, B, 4 * H, generator=g) * 2).to(dtype)
    w = (torch.randn(4 * H, H, generator=g) * 3 / H**0.5).to(dtype)
    h0, c0 = torch.randn(B, H, generator=g).tanh().to(dtype), torch.randn(B, H, generator=g).to(dtype)
    y, c = E.lstm_recurrence(gates, w, h0, c0)
    y_ref, c_ref = reference.lstm_recurrence(gates, w, h0, c0)
    if dtype == torch.float32:
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c, c_ref, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(y, y_ref, rtol=0, atol=2.0**-7 + 1e-6)
        torch.testing.assert_close(c, c_ref, rtol=2.0**-7, atol=2.0**-7)
