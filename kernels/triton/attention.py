"""Flash-style attention in Triton: forward with an online softmax, FlashAttention-2 backward.

Never materialises the [Tq, Tk] score matrix: the forward streams key/value blocks through
on-chip tiles and keeps a running max and sum per query row; the backward recomputes the
probabilities from the saved log-sum-exp.

Semantics (``pysonic.ops.reference.attention``): q [B,H,Tq,D], k/v [B,Hkv,Tk,D] with H % Hkv == 0
(query head h reads key/value head h // (H // Hkv)); scores q.k * scale (default 1/sqrt(D));
``causal`` hides keys j > i + Tk - Tq (bottom-right aligned); ``key_lengths`` [B] hides keys
j >= key_lengths[b]. Outputs: out [B,H,Tq,D] in q's dtype, lse [B,H,Tq] float32 = log-sum-exp of
the visible scaled scores (natural log), -inf with a zero output row when no key is visible.
Products run in the input dtype with fp32 accumulation (probabilities rounded to v's dtype before
P @ V, like the reference), the softmax in fp32.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRET, cast, check_device, check_tensor, define, dot_precision, launch, mma, next_pow2,
)

OP = "attention"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _visible(offs_m, offs_n, Tq, Tk, kend, CAUSAL: tl.constexpr):
    """[BLOCK_M, BLOCK_N] mask: query row offs_m < Tq sees key offs_n (< kend = min(Tk, key length))."""
    mask = (offs_m[:, None] < Tq) & (offs_n[None, :] < kend)
    if CAUSAL:
        mask = mask & (offs_n[None, :] <= offs_m[:, None] + (Tk - Tq))
    return mask


@triton.jit
def _key_end(KLEN, b, Tk, HAS_KLEN: tl.constexpr):
    """Keys j < key_end are not hidden by key_lengths (Tk when there are none)."""
    kend = Tk
    if HAS_KLEN:
        klen = tl.load(KLEN + b).to(tl.int64)  # clamp before narrowing: huge lengths mean "all"
        kend = tl.minimum(tl.maximum(klen, 0), Tk).to(tl.int32)
    return kend


# Contract of _attention_fwd_kernel:
#   Q [B,H,Tq,D], K/V [B,Hkv,Tk,D], O [B,H,Tq,D]: contiguous, dtype T (fp32/bf16/fp16).
#   LSE [B,H,Tq] float32 contiguous. KLEN [B] integer (read only when HAS_KLEN).
#   grid (cdiv(Tq, BLOCK_M), B*H); program (m, bh) owns query rows [m*BLOCK_M, (m+1)*BLOCK_M) of
#   head bh % H in batch bh // H, reading key/value head (bh % H) // GROUP.
#   For each row i: s_j = (q_i . k_j) * scale over visible j; lse_i = log sum_j exp(s_j);
#   o_i = sum_j softmax(s)_j v_j. Online softmax in base 2 (qk_scale = scale * log2(e)):
#   m <- max(m, rowmax), acc <- acc * 2^(m_old - m) + P V, l <- l * 2^(m_old - m) + rowsum(P).
@triton.jit
def _attention_fwd_kernel(
    Q, K, V, O, LSE, KLEN, H, Hkv, Tq, Tk, D, GROUP, qk_scale,
    CAUSAL: tl.constexpr, HAS_KLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, INTERP: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    kv = b * Hkv + (bh % H) // GROUP
    q_base = Q + bh.to(tl.int64) * Tq * D
    k_base = K + kv.to(tl.int64) * Tk * D
    v_base = V + kv.to(tl.int64) * Tk * D

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q = tl.load(q_base + offs_m[:, None] * D + offs_d[None, :], mask=(offs_m[:, None] < Tq) & d_mask[None, :], other=0.0)

    kend = _key_end(KLEN, b, Tk, HAS_KLEN)
    hi = kend
    if CAUSAL:  # the last row of this block sees keys j <= row + Tk - Tq
        hi = tl.minimum(hi, tl.maximum((pid_m + 1) * BLOCK_M + (Tk - Tq), 0))

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols[None, :] < kend) & d_mask[:, None]
        kt = tl.load(k_base + cols[None, :] * D + offs_d[:, None], mask=kv_mask, other=0.0)  # [BLOCK_D, BLOCK_N]
        s = mma(q, kt, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), INTERP, PRECISION) * qk_scale
        s = tl.where(_visible(offs_m, cols, Tq, Tk, kend, CAUSAL), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * D + offs_d[None, :], mask=(cols[:, None] < kend) & d_mask[None, :], other=0.0)
        acc = mma(cast(p, v.dtype, INTERP), v, acc * alpha[:, None], INTERP, PRECISION)
        m_i = m_new

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    row_mask = offs_m < Tq
    o_ptrs = O + bh.to(tl.int64) * Tq * D + offs_m[:, None] * D + offs_d[None, :]
    tl.store(o_ptrs, cast(out, O.dtype.element_ty, INTERP), mask=row_mask[:, None] & d_mask[None, :])
    tl.store(LSE + bh.to(tl.int64) * Tq + offs_m, lse, mask=row_mask)


# Contract of _attention_bwd_delta_kernel:
#   Q, DO [B,H,Tq,D]; K, V [B,Hkv,Tk,D]: contiguous dtype T. LSE, DELTA [B,H,Tq] float32.
#   grid (cdiv(Tq, BLOCK_M), B*H); DELTA_i = sum_j P_ij (dO_i . v_j) over visible keys, in fp32.
#   This is rowsum(dO * O) in exact arithmetic, but computed from the recomputed fp32 P instead of
#   the stored low-precision O (which the forward built from P rounded to v's dtype): the
#   softmax gradient P (dP - DELTA) then cancels exactly where it should. It costs one more pass
#   over the keys (two products per tile) and, in bf16, halves the dq error on short rows.
@triton.jit
def _attention_bwd_delta_kernel(
    Q, K, V, DO, LSE, DELTA, KLEN, H, Hkv, Tq, Tk, D, GROUP, scale,
    CAUSAL: tl.constexpr, HAS_KLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, INTERP: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    kv = b * Hkv + (bh % H) // GROUP
    k_base = K + kv.to(tl.int64) * Tk * D
    v_base = V + kv.to(tl.int64) * Tk * D
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    row_mask = offs_m < Tq
    q_off = bh.to(tl.int64) * Tq * D + offs_m[:, None] * D + offs_d[None, :]
    qd_mask = row_mask[:, None] & d_mask[None, :]
    q = tl.load(Q + q_off, mask=qd_mask, other=0.0)
    do = tl.load(DO + q_off, mask=qd_mask, other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * Tq + offs_m, mask=row_mask, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
    qk_scale = scale * 1.4426950408889634

    kend = _key_end(KLEN, b, Tk, HAS_KLEN)
    hi = kend
    if CAUSAL:
        hi = tl.minimum(hi, tl.maximum((pid_m + 1) * BLOCK_M + (Tk - Tq), 0))
    delta = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        kt_mask = (cols[None, :] < kend) & d_mask[:, None]
        kt = tl.load(k_base + cols[None, :] * D + offs_d[:, None], mask=kt_mask, other=0.0)  # [BLOCK_D, BLOCK_N]
        vt = tl.load(v_base + cols[None, :] * D + offs_d[:, None], mask=kt_mask, other=0.0)
        s = mma(q, kt, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), INTERP, PRECISION) * qk_scale
        p = tl.where(_visible(offs_m, cols, Tq, Tk, kend, CAUSAL), tl.exp2(s - lse2[:, None]), 0.0)
        dp = mma(do, vt, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), INTERP, PRECISION)
        delta += tl.sum(p * dp, 1)
    tl.store(DELTA + bh.to(tl.int64) * Tq + offs_m, delta, mask=row_mask)


# Contract of _attention_bwd_dkdv_kernel:
#   Q, DO [B,H,Tq,D]; K, V, DK, DV [B,Hkv,Tk,D]: contiguous dtype T. LSE, DELTA [B,H,Tq] float32.
#   grid (cdiv(Tk, BLOCK_N), B*Hkv); program (n, bkv) owns keys [n*BLOCK_N, (n+1)*BLOCK_N) of
#   key/value head bkv % Hkv and sums over the GROUP query heads that read it (no atomics):
#   P_ij = exp(s_ij - lse_i) (0 where hidden), dV_j = sum_i P_ij dO_i,
#   dS_ij = P_ij (dO_i . v_j - DELTA_i), dK_j = scale * sum_i dS_ij q_i.
@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, KLEN, H, Hkv, Tq, Tk, D, GROUP, scale,
    CAUSAL: tl.constexpr, HAS_KLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, INTERP: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bkv = tl.program_id(1)
    b = bkv // Hkv
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    kv_off = bkv.to(tl.int64) * Tk * D + offs_n[:, None] * D + offs_d[None, :]
    kv_mask = (offs_n[:, None] < Tk) & d_mask[None, :]
    k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
    kend = _key_end(KLEN, b, Tk, HAS_KLEN)

    lo = 0
    hi = Tq
    if CAUSAL:  # query rows i >= j - (Tk - Tq) see key j; start at the block holding the first
        lo = tl.maximum(pid_n * BLOCK_N - (Tk - Tq), 0) // BLOCK_M * BLOCK_M
    hi = tl.where(pid_n * BLOCK_N >= kend, 0, hi)  # every key here hidden by key_lengths: zero grads
    qk_scale = scale * 1.4426950408889634

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(0, GROUP):
        bh = b * H + (bkv % Hkv) * GROUP + g
        q_base = Q + bh.to(tl.int64) * Tq * D
        do_base = DO + bh.to(tl.int64) * Tq * D
        for start_m in range(lo, hi, BLOCK_M):
            rows = start_m + offs_m
            row_mask = rows < Tq
            qd_mask = row_mask[:, None] & d_mask[None, :]
            q = tl.load(q_base + rows[:, None] * D + offs_d[None, :], mask=qd_mask, other=0.0)
            do = tl.load(do_base + rows[:, None] * D + offs_d[None, :], mask=qd_mask, other=0.0)
            lse = tl.load(LSE + bh.to(tl.int64) * Tq + rows, mask=row_mask, other=0.0)
            delta = tl.load(DELTA + bh.to(tl.int64) * Tq + rows, mask=row_mask, other=0.0)
            lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)  # such rows see nothing
            # transposed tiles: [BLOCK_N, BLOCK_M] with keys along rows
            st = mma(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], tl.float32), INTERP, PRECISION) * qk_scale
            vis = tl.trans(_visible(rows, offs_n, Tq, Tk, kend, CAUSAL))
            pt = tl.where(vis, tl.exp2(st - lse2[None, :]), 0.0)
            dv = mma(cast(pt, do.dtype, INTERP), do, dv, INTERP, PRECISION)
            dpt = mma(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], tl.float32), INTERP, PRECISION)
            dst = pt * (dpt - delta[None, :])
            dk = mma(cast(dst, q.dtype, INTERP), q, dk, INTERP, PRECISION)
    tl.store(DK + kv_off, cast(dk * scale, DK.dtype.element_ty, INTERP), mask=kv_mask)
    tl.store(DV + kv_off, cast(dv, DV.dtype.element_ty, INTERP), mask=kv_mask)


# Contract of _attention_bwd_dq_kernel:
#   Q, DO, DQ [B,H,Tq,D]; K, V [B,Hkv,Tk,D]: contiguous dtype T. LSE, DELTA [B,H,Tq] float32.
#   grid (cdiv(Tq, BLOCK_M), B*H); program (m, bh) owns query rows [m*BLOCK_M, (m+1)*BLOCK_M):
#   dQ_i = scale * sum_j P_ij (dO_i . v_j - DELTA_i) k_j over visible keys.
@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KLEN, H, Hkv, Tq, Tk, D, GROUP, scale,
    CAUSAL: tl.constexpr, HAS_KLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, INTERP: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    kv = b * Hkv + (bh % H) // GROUP
    k_base = K + kv.to(tl.int64) * Tk * D
    v_base = V + kv.to(tl.int64) * Tk * D
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    row_mask = offs_m < Tq
    q_off = bh.to(tl.int64) * Tq * D + offs_m[:, None] * D + offs_d[None, :]
    qd_mask = row_mask[:, None] & d_mask[None, :]
    q = tl.load(Q + q_off, mask=qd_mask, other=0.0)
    do = tl.load(DO + q_off, mask=qd_mask, other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * Tq + offs_m, mask=row_mask, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * Tq + offs_m, mask=row_mask, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
    qk_scale = scale * 1.4426950408889634

    kend = _key_end(KLEN, b, Tk, HAS_KLEN)
    hi = kend
    if CAUSAL:
        hi = tl.minimum(hi, tl.maximum((pid_m + 1) * BLOCK_M + (Tk - Tq), 0))
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        kt_mask = (cols[None, :] < kend) & d_mask[:, None]
        kt = tl.load(k_base + cols[None, :] * D + offs_d[:, None], mask=kt_mask, other=0.0)  # [BLOCK_D, BLOCK_N]
        vt = tl.load(v_base + cols[None, :] * D + offs_d[:, None], mask=kt_mask, other=0.0)
        s = mma(q, kt, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), INTERP, PRECISION) * qk_scale
        p = tl.where(_visible(offs_m, cols, Tq, Tk, kend, CAUSAL), tl.exp2(s - lse2[:, None]), 0.0)
        dp = mma(do, vt, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), INTERP, PRECISION)
        ds = p * (dp - delta[:, None])
        dq = mma(cast(ds, kt.dtype, INTERP), tl.trans(kt), dq, INTERP, PRECISION)
    tl.store(DQ + q_off, cast(dq * scale, DQ.dtype.element_ty, INTERP), mask=qd_mask)


# ----------------------------------------------------------------------------------------------
# host side


def _check(q, k, v, scale, key_lengths):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(OP, name, t, dim=4, dtypes=DTYPES)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{OP}: q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"{OP}: k must have shape [B, Hkv, Tk, D] with B={B}, D={D}, got {list(k.shape)}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"{OP}: v must have the shape of k {list(k.shape)}, got {list(v.shape)}")
    if (Hkv == 0 and H != 0) or (Hkv != 0 and H % Hkv != 0):
        raise ValueError(f"{OP}: the number of query heads H={H} must be a multiple of the key/value heads Hkv={Hkv}")
    if key_lengths is not None:
        check_tensor(OP, "key_lengths", key_lengths, integer=True)
        if tuple(key_lengths.shape) != (B,):
            raise ValueError(f"{OP}: key_lengths must have shape [B] = [{B}], got {list(key_lengths.shape)}")
    if scale is None and D == 0:
        raise ValueError(f"{OP}: q has head dimension 0; the default scale 1/sqrt(D) is undefined")
    # key_lengths may live on another device (like the reference, which moves it to q's)
    return check_device(OP, q=q, k=k, v=v)


def _blocks(q, Tq, Tk, D, backward=False):
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps) for a launch.

    tl.dot needs every tile dimension >= 16. The interpreter runs a program in numpy, so there
    fewer, larger tiles are faster. The GPU choices are the largest tiles that compile without
    register spills for sm_90 (ptxas -v on Triton 3.9's output; not timed: no GPU here).
    """
    block_d = next_pow2(D, 16)
    if q.device.type == "cpu":
        return next_pow2(min(Tq, 64), 16), next_pow2(min(Tk, 64), 16), block_d, 4
    if q.dtype == torch.float32 or block_d > 128:
        return 32, 32, block_d, (8 if backward or block_d > 64 else 4)
    if backward:
        return (64, 64, block_d, 8) if block_d <= 64 else (32, 64, block_d, 8)
    return (64, 128, block_d, 4) if block_d <= 64 else (64, 64, block_d, 4)


def _common_args(q, k, scale):
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    return B, H, Hkv, Tq, Tk, D, (H // Hkv if Hkv else 1), (1.0 / math.sqrt(D) if scale is None else float(scale))


@define("attention_triton")
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
              scale: Optional[float] = None, key_lengths: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``attention``: (out [B,H,Tq,D], lse [B,H,Tq] float32); see the module docstring."""
    _check(q, k, v, scale, key_lengths)
    B, H, Hkv, Tq, Tk, D, group, scale = _common_args(q, k, scale)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    lse = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)
    if lse.numel() == 0:
        return out, lse
    if Tk == 0:  # nothing to see anywhere
        return out.zero_(), lse.fill_(float("-inf"))
    klen = key_lengths.to(q.device).contiguous() if key_lengths is not None else lse  # lse: unused placeholder
    bm, bn, bd, warps = _blocks(q, Tq, Tk, D)
    launch(_attention_fwd_kernel)[(triton.cdiv(Tq, bm), B * H)](
        q, k, v, out, lse, klen, H, Hkv, Tq, Tk, D, group, scale * LOG2E,
        CAUSAL=bool(causal), HAS_KLEN=key_lengths is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
        INTERP=INTERPRET, PRECISION=dot_precision(q.dtype), num_warps=warps, num_stages=2,
    )
    return out, lse


@attention.register_fake
def _(q, k, v, causal=False, scale=None, key_lengths=None):
    _check(q, k, v, scale, key_lengths)
    B, H, Tq, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(B, H, Tq, dtype=torch.float32)


@define("attention_backward_triton")
def attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, causal: bool = False, scale: Optional[float] = None,
                       key_lengths: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of ``attention`` given its out and lse (FlashAttention-2 recomputation)."""
    _check_backward(grad_out, q, k, v, out, lse, scale, key_lengths)
    B, H, Hkv, Tq, Tk, D, group, scale = _common_args(q, k, scale)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    grad_out, lse = grad_out.contiguous(), lse.contiguous()  # out: checked only (see the delta kernel)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0 or k.numel() == 0:  # an empty side: every gradient is zero (or empty)
        return dq.zero_(), dk.zero_(), dv.zero_()
    klen = key_lengths.to(q.device).contiguous() if key_lengths is not None else lse
    bm, bn, bd, warps = _blocks(q, Tq, Tk, D, backward=True)
    delta = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)
    meta = dict(CAUSAL=bool(causal), HAS_KLEN=key_lengths is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
                INTERP=INTERPRET, PRECISION=dot_precision(q.dtype), num_warps=warps, num_stages=2)
    launch(_attention_bwd_delta_kernel)[(triton.cdiv(Tq, bm), B * H)](
        q, k, v, grad_out, lse, delta, klen, H, Hkv, Tq, Tk, D, group, scale, **meta)
    launch(_attention_bwd_dkdv_kernel)[(triton.cdiv(Tk, bn), B * Hkv)](
        q, k, v, grad_out, lse, delta, dk, dv, klen, H, Hkv, Tq, Tk, D, group, scale, **meta)
    launch(_attention_bwd_dq_kernel)[(triton.cdiv(Tq, bm), B * H)](
        q, k, v, grad_out, lse, delta, dq, klen, H, Hkv, Tq, Tk, D, group, scale, **meta)
    return dq, dk, dv


def _check_backward(grad_out, q, k, v, out, lse, scale, key_lengths):
    device = _check(q, k, v, scale, key_lengths)
    for name, t in (("grad_out", grad_out), ("out", out)):
        check_tensor(OP + "_backward", name, t, dtypes=(q.dtype,))
        if t.shape != q.shape:
            raise ValueError(f"{OP}_backward: {name} must have the shape of q {list(q.shape)}, got {list(t.shape)}")
    check_tensor(OP + "_backward", "lse", lse, dtypes=(torch.float32,))
    if tuple(lse.shape) != tuple(q.shape[:3]):
        raise ValueError(f"{OP}_backward: lse must have shape [B, H, Tq] = {list(q.shape[:3])}, got {list(lse.shape)}")
    check_device(OP + "_backward", q=q, grad_out=grad_out, out=out, lse=lse)
    return device


@attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, causal=False, scale=None, key_lengths=None):
    _check_backward(grad_out, q, k, v, out, lse, scale, key_lengths)
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale, key_lengths = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_lengths)
    ctx.causal, ctx.scale = causal, scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    # lse is an auxiliary output (marked non-differentiable): grad_lse is ignored.
    q, k, v, out, lse, key_lengths = ctx.saved_tensors
    dq, dk, dv = torch.ops.pysonic.attention_backward_triton(
        grad_out, q, k, v, out, lse, ctx.causal, ctx.scale, key_lengths)
    return dq, dk, dv, None, None, None


attention.register_autograd(_backward, setup_context=_setup_context)
