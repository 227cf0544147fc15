"""Rotary position embedding in Triton (``pysonic.ops.reference.rotary``).

x [B,H,T,D], cos/sin [T,R/2] -> [B,H,T,D]: the first R channels are rotated in pairs (i, i+R/2)
(half-split) or (2i, 2i+1) (interleaved); channels R..D pass through. fp32 arithmetic, x's dtype
out. The backward is the same op with -sin (the transpose of a rotation is the opposite rotation).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, INTERPRET, cast, check_device, check_tensor, define, launch, next_pow2

OP = "rotary"


# Contract of _rotary_kernel:
#   X, OUT: contiguous [N, D] rows (N = B*H*T, row r at position t = r % T), dtype T.
#   COS, SIN: contiguous [T, HALF] (any float dtype), R = 2*HALF <= D.
#   grid (cdiv(N, BLOCK_ROWS),); program p owns rows [p*BLOCK_ROWS, (p+1)*BLOCK_ROWS).
#   For i < HALF with (a, b) = (i, i+HALF), or (2i, 2i+1) when INTERLEAVED:
#     OUT[r, a] = X[r, a] cos[t, i] - X[r, b] sin[t, i]
#     OUT[r, b] = X[r, b] cos[t, i] + X[r, a] sin[t, i]      (fp32)
#   OUT[r, R:] = X[r, R:]  (in BLOCK_REST-wide chunks).
@triton.jit
def _rotary_kernel(X, COS, SIN, OUT, N, T, D, HALF, INTERLEAVED: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                   BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr, INTERP: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < N
    t = rows % T
    i = tl.arange(0, BLOCK_HALF)
    mask = row_mask[:, None] & (i < HALF)[None, :]
    if INTERLEAVED:
        ia = 2 * i
        ib = 2 * i + 1
    else:
        ia = i
        ib = i + HALF
    base = rows[:, None] * D
    x1 = tl.load(X + base + ia[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + base + ib[None, :], mask=mask, other=0.0).to(tl.float32)
    cs_off = t[:, None] * HALF + i[None, :]
    c = tl.load(COS + cs_off, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(SIN + cs_off, mask=mask, other=0.0).to(tl.float32)
    dtype = OUT.dtype.element_ty
    tl.store(OUT + base + ia[None, :], cast(x1 * c - x2 * s, dtype, INTERP), mask=mask)
    tl.store(OUT + base + ib[None, :], cast(x2 * c + x1 * s, dtype, INTERP), mask=mask)
    j = tl.arange(0, BLOCK_REST)
    for start in range(2 * HALF, D, BLOCK_REST):
        cols = start + j
        m = row_mask[:, None] & (cols < D)[None, :]
        tl.store(OUT + base + cols[None, :], tl.load(X + base + cols[None, :], mask=m), mask=m)


def _check(x, cos, sin):
    check_tensor(OP, "x", x, dim=4, dtypes=FLOAT_DTYPES)
    check_tensor(OP, "cos", cos, dim=2, dtypes=FLOAT_DTYPES)
    check_tensor(OP, "sin", sin, dim=2, dtypes=FLOAT_DTYPES)
    T, D = x.shape[2], x.shape[3]
    if cos.shape[0] != T:
        raise ValueError(f"{OP}: cos must have shape [T, R/2] with T={T} (x's dim 2), got {list(cos.shape)}")
    if sin.shape != cos.shape:
        raise ValueError(f"{OP}: sin must have the shape of cos {list(cos.shape)}, got {list(sin.shape)}")
    if 2 * cos.shape[1] > D:
        raise ValueError(f"{OP}: cos has R/2={cos.shape[1]} columns but R={2 * cos.shape[1]} exceeds the head dim D={D}")
    check_device(OP, x=x, cos=cos, sin=sin)


@define("rotary_triton")
def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Triton ``rotary``: x [B,H,T,D], cos/sin [T,R/2] -> [B,H,T,D] in x's dtype."""
    _check(x, cos, sin)
    x, cos, sin = x.contiguous(), cos.contiguous(), sin.contiguous()
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    T, D = x.shape[2], x.shape[3]
    half = cos.shape[1]
    n = x.numel() // D
    block_half = next_pow2(half)
    block_rest = next_pow2(min(D - 2 * half, 128))
    # elements of each half per program: 1K on a GPU (4K spills registers at 4 warps, ptxas -v
    # for sm_90), 4K under the interpreter (fewer, bigger numpy steps)
    tile = 4096 if x.device.type == "cpu" else 1024
    block_rows = min(next_pow2(n), max(1, tile // block_half))
    launch(_rotary_kernel)[(triton.cdiv(n, block_rows),)](
        x, cos, sin, out, n, T, D, half, INTERLEAVED=bool(interleaved), BLOCK_ROWS=block_rows,
        BLOCK_HALF=block_half, BLOCK_REST=block_rest, INTERP=INTERPRET, num_warps=4,
    )
    return out


@rotary.register_fake
def _(x, cos, sin, interleaved=False):
    _check(x, cos, sin)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    _, cos, sin, interleaved = inputs
    ctx.save_for_backward(cos, sin)
    ctx.interleaved = interleaved


def _backward(ctx, grad):
    # Differentiable w.r.t. x only; cos and sin are treated as constants (their gradient is None).
    cos, sin = ctx.saved_tensors
    return torch.ops.pysonic.rotary_triton(grad, cos, -sin, ctx.interleaved), None, None, None


rotary.register_autograd(_backward, setup_context=_setup_context)
