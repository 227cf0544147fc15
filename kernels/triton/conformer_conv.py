"""The conformer convolution module's fused middle in Triton: GLU -> depthwise conv -> SiLU.

x [B,T,2C], weight [C,K], bias [C] -> out [B,T,C] (``pysonic.ops.reference.conformer_conv``):
g = x[..., :C] * sigmoid(x[..., C:]); y[t, c] = bias[c] + sum_k weight[c, k] g[t + k - P, c]
with zeros outside [0, T) and P = K // 2 (K odd, same length) or P = K - 1 (causal);
out = y * sigmoid(y). fp32 arithmetic, x's dtype out.

The GLU is recomputed for each of the K taps instead of being written out: the kernels read x
(through L1/L2) and never store the [B,T,C] intermediate. The backward recomputes y the same way.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, INTERPRET, cast, check_device, check_tensor, define, launch, next_pow2

OP = "conformer_conv"


@triton.jit
def _glu(X, b_base, src, c, T, C, cmask):
    """GLU of x at times src [BLOCK_T] (zero outside [0, T)) and channels c [BLOCK_C] -> fp32 [BLOCK_T, BLOCK_C]."""
    m = ((src >= 0) & (src < T))[:, None] & cmask[None, :]
    ptr = X + b_base + src[:, None].to(tl.int64) * (2 * C) + c[None, :]
    a = tl.load(ptr, mask=m, other=0.0).to(tl.float32)
    gate = tl.load(ptr + C, mask=m, other=0.0).to(tl.float32)
    return a * tl.sigmoid(gate)


@triton.jit
def _conv(X, W, b_base, t, c, T, C, K, PAD, cmask, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """sum_k W[c, k] * glu(x)[t + k - PAD, c] in fp32, [BLOCK_T, BLOCK_C]."""
    acc = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
    for k in range(0, K):
        w = tl.load(W + c * K + k, mask=cmask, other=0.0).to(tl.float32)
        acc += _glu(X, b_base, t + (k - PAD), c, T, C, cmask) * w[None, :]
    return acc


# Contract of _conformer_conv_fwd_kernel:
#   X [B,T,2C], OUT [B,T,C]: contiguous dtype T_x; W [C,K], BIAS [C]: contiguous, any float dtype.
#   grid (cdiv(T, BLOCK_T), cdiv(C, BLOCK_C), B); program (i, j, b) owns times
#   [i*BLOCK_T, (i+1)*BLOCK_T) x channels [j*BLOCK_C, (j+1)*BLOCK_C) of item b.
#   OUT = silu(BIAS + sum_k W[:, k] * glu(X)[t + k - PAD]) (fp32, rounded once).
@triton.jit
def _conformer_conv_fwd_kernel(X, W, BIAS, OUT, T, C, K, PAD, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                               INTERP: tl.constexpr):
    b = tl.program_id(2)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    b_base = b.to(tl.int64) * T * (2 * C)
    y = _conv(X, W, b_base, t, c, T, C, K, PAD, cmask, BLOCK_T, BLOCK_C)
    y += tl.load(BIAS + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    out = y * tl.sigmoid(y)
    ptr = OUT + b.to(tl.int64) * T * C + t[:, None].to(tl.int64) * C + c[None, :]
    tl.store(ptr, cast(out, OUT.dtype.element_ty, INTERP), mask=(t < T)[:, None] & cmask[None, :])


# Contract of _conformer_conv_bwd_dy_kernel (backward, step 1 of 3):
#   X [B,T,2C], GOUT [B,T,C]: contiguous dtype T_x; W [C,K], BIAS [C]; DY [B,T,C] float32.
#   grid as the forward. Recomputes y, then DY = GOUT * silu'(y), silu'(y) = s (1 + y (1 - s)),
#   s = sigmoid(y).
@triton.jit
def _conformer_conv_bwd_dy_kernel(X, W, BIAS, GOUT, DY, T, C, K, PAD, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(2)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    b_base = b.to(tl.int64) * T * (2 * C)
    y = _conv(X, W, b_base, t, c, T, C, K, PAD, cmask, BLOCK_T, BLOCK_C)
    y += tl.load(BIAS + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    s = tl.sigmoid(y)
    off = b.to(tl.int64) * T * C + t[:, None].to(tl.int64) * C + c[None, :]
    m = (t < T)[:, None] & cmask[None, :]
    gout = tl.load(GOUT + off, mask=m, other=0.0).to(tl.float32)
    tl.store(DY + off, gout * s * (1.0 + y * (1.0 - s)), mask=m)


# Contract of _conformer_conv_bwd_dx_kernel (backward, step 2 of 3):
#   X, DX [B,T,2C] contiguous dtype T_x; W [C,K]; DY [B,T,C] float32.
#   grid as the forward. dg[s, c] = sum_k DY[s - k + PAD, c] W[c, k] (the transposed conv), then
#   DX[s, c] = dg * sigmoid(x_gate), DX[s, C + c] = dg * x_a * sigmoid(x_gate) (1 - sigmoid(x_gate)).
@triton.jit
def _conformer_conv_bwd_dx_kernel(X, W, DY, DX, T, C, K, PAD, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                                  INTERP: tl.constexpr):
    b = tl.program_id(2)
    s = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    dy_base = DY + b.to(tl.int64) * T * C
    dg = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
    for k in range(0, K):
        w = tl.load(W + c * K + k, mask=cmask, other=0.0).to(tl.float32)
        src = s - k + PAD
        m = ((src >= 0) & (src < T))[:, None] & cmask[None, :]
        dy = tl.load(dy_base + src[:, None].to(tl.int64) * C + c[None, :], mask=m, other=0.0)
        dg += dy * w[None, :]
    m = (s < T)[:, None] & cmask[None, :]
    off = b.to(tl.int64) * T * (2 * C) + s[:, None].to(tl.int64) * (2 * C) + c[None, :]
    a = tl.load(X + off, mask=m, other=0.0).to(tl.float32)
    sg = tl.sigmoid(tl.load(X + off + C, mask=m, other=0.0).to(tl.float32))
    dtype = DX.dtype.element_ty
    tl.store(DX + off, cast(dg * sg, dtype, INTERP), mask=m)
    tl.store(DX + off + C, cast(dg * a * sg * (1.0 - sg), dtype, INTERP), mask=m)


# Contract of _conformer_conv_bwd_dw_kernel (backward, step 3 of 3, partial sums):
#   X [B,T,2C] dtype T_x; DY [B,T,C] float32, seen as N = B*T rows (row r: item r // T, time r % T).
#   PW [SPLIT, C, K] and PB [SPLIT, C] float32: per-split partial sums.
#   grid (cdiv(C, BLOCK_C), SPLIT); program (j, p) sums rows [p*ROWS, (p+1)*ROWS) & < N:
#   PW[p, c, k] = sum_r DY[r, c] glu(x)[r + k - PAD, c] (same item only), PB[p, c] = sum_r DY[r, c].
@triton.jit
def _conformer_conv_bwd_dw_kernel(X, DY, PW, PB, N, T, C, K, PAD, ROWS, BLOCK_T: tl.constexpr,
                                  BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    p = tl.program_id(1)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    kk = tl.arange(0, BLOCK_K)
    acc_w = tl.zeros([BLOCK_C, BLOCK_K], tl.float32)
    acc_b = tl.zeros([BLOCK_C], tl.float32)
    lo = p * ROWS
    hi = tl.minimum(lo + ROWS, N)
    for start in range(lo, hi, BLOCK_T):
        r = start + tl.arange(0, BLOCK_T)
        rmask = r < hi
        t = r % T
        item_base = (r - t).to(tl.int64) * (2 * C)  # the row's item start in X
        dy = tl.load(DY + r[:, None].to(tl.int64) * C + c[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        acc_b += tl.sum(dy, 0)
        for k in range(0, K):
            src = t + (k - PAD)
            m = (rmask & (src >= 0) & (src < T))[:, None] & cmask[None, :]
            ptr = X + item_base[:, None] + src[:, None].to(tl.int64) * (2 * C) + c[None, :]
            a = tl.load(ptr, mask=m, other=0.0).to(tl.float32)
            gate = tl.load(ptr + C, mask=m, other=0.0).to(tl.float32)
            part = tl.sum(dy * a * tl.sigmoid(gate), 0)  # [BLOCK_C]
            acc_w = tl.where((kk == k)[None, :], acc_w + part[:, None], acc_w)
    wmask = cmask[:, None] & (kk < K)[None, :]
    tl.store(PW + p.to(tl.int64) * C * K + c[:, None] * K + kk[None, :], acc_w, mask=wmask)
    tl.store(PB + p.to(tl.int64) * C + c, acc_b, mask=cmask)


# Contract of _sum_splits_kernel: P [SPLIT, M] float32 -> OUT [M] (any float dtype) = sum over
#   splits, in order (deterministic). grid (cdiv(M, BLOCK),).
@triton.jit
def _sum_splits_kernel(P, OUT, SPLIT, M, BLOCK: tl.constexpr, INTERP: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    acc = tl.zeros([BLOCK], tl.float32)
    for s in range(0, SPLIT):
        acc += tl.load(P + s * M + offs, mask=mask, other=0.0)
    tl.store(OUT + offs, cast(acc, OUT.dtype.element_ty, INTERP), mask=mask)


# ----------------------------------------------------------------------------------------------
# host side


def _check(x, weight, bias, causal, op=OP):
    check_tensor(op, "x", x, dim=3, dtypes=FLOAT_DTYPES)
    check_tensor(op, "weight", weight, dim=2, dtypes=FLOAT_DTYPES)
    check_tensor(op, "bias", bias, dim=1, dtypes=FLOAT_DTYPES)
    C, K = weight.shape
    if x.shape[2] != 2 * C:
        raise ValueError(f"{op}: x must have 2C = {2 * C} channels for weight [C, K] = {list(weight.shape)}, got {list(x.shape)}")
    if tuple(bias.shape) != (C,):
        raise ValueError(f"{op}: bias must have shape [C] = [{C}], got {list(bias.shape)}")
    if K == 0:
        raise ValueError(f"{op}: weight must have a kernel size K >= 1, got {list(weight.shape)}")
    if not causal and K % 2 == 0:
        raise ValueError(f"{op}: weight must have an odd kernel size K for same padding (causal=False), got K={K}")
    return check_device(op, x=x, weight=weight, bias=bias)


def _geometry(x, weight, causal):
    B, T, _ = x.shape
    C, K = weight.shape
    pad = K - 1 if causal else K // 2
    if x.device.type == "cpu":  # interpreter: big tiles, fewer programs
        block_t, block_c = next_pow2(min(T, 64)), next_pow2(min(C, 128))
    else:
        block_t, block_c = 32, next_pow2(min(C, 64))
    return B, T, C, K, pad, block_t, block_c


@define("conformer_conv_triton")
def conformer_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """Triton ``conformer_conv``: x [B,T,2C], weight [C,K], bias [C] -> [B,T,C] in x's dtype."""
    _check(x, weight, bias, causal)
    B, T, C, K, pad, bt, bc = _geometry(x, weight, causal)
    x, weight, bias = x.contiguous(), weight.contiguous(), bias.contiguous()
    out = torch.empty(B, T, C, dtype=x.dtype, device=x.device)
    if out.numel():
        launch(_conformer_conv_fwd_kernel)[(triton.cdiv(T, bt), triton.cdiv(C, bc), B)](
            x, weight, bias, out, T, C, K, pad, BLOCK_T=bt, BLOCK_C=bc, INTERP=INTERPRET, num_warps=4)
    return out


@conformer_conv.register_fake
def _(x, weight, bias, causal=False):
    _check(x, weight, bias, causal)
    return x.new_empty(x.shape[0], x.shape[1], weight.shape[0])


@define("conformer_conv_backward_triton")
def conformer_conv_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                            causal: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x [B,T,2C], grad_weight [C,K], grad_bias [C]) of ``conformer_conv`` (all in Triton)."""
    _check_backward(grad_out, x, weight, bias, causal)
    B, T, C, K, pad, bt, bc = _geometry(x, weight, causal)
    x, weight, bias, grad_out = x.contiguous(), weight.contiguous(), bias.contiguous(), grad_out.contiguous()
    dx = torch.empty_like(x)
    dw = torch.empty_like(weight)
    db = torch.empty_like(bias)
    if x.numel() == 0 or weight.numel() == 0:  # no rows (or no channels): zero parameter grads
        return dx, dw.zero_(), db.zero_()
    dy = torch.empty(B, T, C, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(T, bt), triton.cdiv(C, bc), B)
    launch(_conformer_conv_bwd_dy_kernel)[grid](x, weight, bias, grad_out, dy, T, C, K, pad, BLOCK_T=bt, BLOCK_C=bc, num_warps=4)
    launch(_conformer_conv_bwd_dx_kernel)[grid](x, weight, dy, dx, T, C, K, pad, BLOCK_T=bt, BLOCK_C=bc,
                                                INTERP=INTERPRET, num_warps=4)
    # grad_weight / grad_bias reduce over all B*T rows: split the rows so a GPU has enough
    # programs, then sum the splits in a fixed order (deterministic, no atomics).
    n = B * T
    bc_w = next_pow2(min(C, 32))
    block_k = next_pow2(K)
    split = 1 if x.device.type == "cpu" else max(1, min(triton.cdiv(n, 256), 1024 // triton.cdiv(C, bc_w)))
    rows = triton.cdiv(triton.cdiv(n, split), bt) * bt
    split = triton.cdiv(n, rows)
    pw = torch.empty(split, C, K, dtype=torch.float32, device=x.device)
    pb = torch.empty(split, C, dtype=torch.float32, device=x.device)
    launch(_conformer_conv_bwd_dw_kernel)[(triton.cdiv(C, bc_w), split)](
        x, dy, pw, pb, n, T, C, K, pad, rows, BLOCK_T=bt, BLOCK_C=bc_w, BLOCK_K=block_k, num_warps=4)
    block = 1024
    launch(_sum_splits_kernel)[(triton.cdiv(C * K, block),)](pw, dw, split, C * K, BLOCK=block, INTERP=INTERPRET)
    launch(_sum_splits_kernel)[(triton.cdiv(C, block),)](pb, db, split, C, BLOCK=block, INTERP=INTERPRET)
    return dx, dw, db


def _check_backward(grad_out, x, weight, bias, causal):
    op = OP + "_backward"
    _check(x, weight, bias, causal, op)
    check_tensor(op, "grad_out", grad_out, dim=3, dtypes=(x.dtype,))
    want = (x.shape[0], x.shape[1], weight.shape[0])
    if tuple(grad_out.shape) != want:
        raise ValueError(f"{op}: grad_out must have shape [B, T, C] = {list(want)}, got {list(grad_out.shape)}")
    check_device(op, x=x, grad_out=grad_out)


@conformer_conv_backward.register_fake
def _(grad_out, x, weight, bias, causal=False):
    _check_backward(grad_out, x, weight, bias, causal)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(weight, memory_format=torch.contiguous_format),
            torch.empty_like(bias, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    x, weight, bias, causal = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.causal = causal


def _backward(ctx, grad):
    x, weight, bias = ctx.saved_tensors
    dx, dw, db = torch.ops.pysonic.conformer_conv_backward_triton(grad, x, weight, bias, ctx.causal)
    return dx, dw, db, None


conformer_conv.register_autograd(_backward, setup_context=_setup_context)
