"""Residual vector quantisation in Triton: ``rvq_encode`` (nearest codes) and ``rvq_decode`` (sum of codes).

Semantics: ``pysonic.ops.reference.rvq_encode`` / ``rvq_decode``. Encoding keeps each row's fp32
residual in registers across levels and scans the level's codebook in tiles with exact squared
differences (no |r|^2 - 2 r.c + |c|^2 expansion, whose cancellation would reorder near ties);
ties go to the lowest index. Decoding gathers and sums codebook rows in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, INTERPRET, cast, check_device, check_tensor, define, launch, next_pow2


# Contract of _rvq_encode_kernel:
#   X [N, D] contiguous (any float dtype), CB [L, K, D] contiguous (any float dtype),
#   CODES [N, NQ] int64 contiguous, NQ <= L, K >= 1, KD = K * D (level stride).
#   grid (cdiv(N, BLOCK_R),); program p owns rows [p*BLOCK_R, (p+1)*BLOCK_R).
#   r = X[row] (fp32); for level l < NQ: code = argmin_k sum_d (r_d - CB[l,k,d])^2 (first index on
#   ties; codebook scanned in BLOCK_K tiles), CODES[row, l] = code, r -= CB[l, code].
@triton.jit
def _rvq_encode_kernel(X, CB, CODES, N, NQ, K, D, KD, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < N
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    kk = tl.arange(0, BLOCK_K)
    r = tl.load(X + rows[:, None] * D + d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    for level in range(0, NQ):
        cb = CB + level * KD
        best_d = tl.full([BLOCK_R], float("inf"), tl.float32)
        best_i = tl.zeros([BLOCK_R], tl.int32)
        for start in range(0, K, BLOCK_K):
            codes = start + kk
            cmask = codes < K
            e = tl.load(cb + codes[:, None].to(tl.int64) * D + d[None, :], mask=cmask[:, None] & dmask[None, :],
                        other=0.0).to(tl.float32)  # [BLOCK_K, BLOCK_D]
            diff = r[:, None, :] - e[None, :, :]
            dist = tl.sum(diff * diff, 2)  # [BLOCK_R, BLOCK_K]
            dist = tl.where(cmask[None, :], dist, float("inf"))
            tile_min = tl.min(dist, 1)
            tile_arg = tl.min(tl.where(dist == tile_min[:, None], codes[None, :], 2147483647), 1)
            better = tile_min < best_d  # strict: an earlier tile keeps a tie
            best_i = tl.where(better, tile_arg, best_i)
            best_d = tl.where(better, tile_min, best_d)
        tl.store(CODES + rows * NQ + level, best_i.to(tl.int64), mask=rmask)
        chosen = tl.load(cb + best_i[:, None].to(tl.int64) * D + d[None, :], mask=rmask[:, None] & dmask[None, :],
                         other=0.0).to(tl.float32)
        r = r - chosen


# Contract of _rvq_decode_kernel:
#   CODES [N, NQ] contiguous, any integer dtype; CB [L, K, D] contiguous, KD = K * D; OUT [N, D] (CB's dtype);
#   FLAG [1] int32, set to 1 when any code lies outside [0, K) (that code is then read as zeros:
#   never an out-of-bounds load). grid (cdiv(N, BLOCK_R),).
#   OUT[row] = sum_{l < NQ} CB[l, CODES[row, l]] accumulated in fp32.
@triton.jit
def _rvq_decode_kernel(CODES, CB, OUT, FLAG, N, NQ, K, D, KD, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                       INTERP: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < N
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    bad = tl.zeros([BLOCK_R], tl.int32)
    for level in range(0, NQ):
        idx = tl.load(CODES + rows * NQ + level, mask=rmask, other=0).to(tl.int64)
        ok = (idx >= 0) & (idx < K)
        bad = tl.where(rmask & ~ok, 1, bad)
        ptr = CB + level * KD + idx[:, None] * D + d[None, :]
        acc += tl.load(ptr, mask=(rmask & ok)[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    tl.store(OUT + rows[:, None] * D + d[None, :], cast(acc, OUT.dtype.element_ty, INTERP),
             mask=rmask[:, None] & dmask[None, :])
    tl.store(FLAG + tl.zeros([BLOCK_R], tl.int32), bad, mask=bad != 0)  # racing writers all write 1


# ----------------------------------------------------------------------------------------------
# host side


def _check_encode(x, codebooks, n_q):
    op = "rvq_encode"
    check_tensor(op, "x", x, dim=3, dtypes=FLOAT_DTYPES)
    check_tensor(op, "codebooks", codebooks, dim=3, dtypes=FLOAT_DTYPES)
    L, K, D = codebooks.shape
    if x.shape[2] != D:
        raise ValueError(f"{op}: x must have D = {D} features (codebooks [L, K, D] = {list(codebooks.shape)}), got {list(x.shape)}")
    if not 0 <= n_q <= L:
        raise ValueError(f"{op}: n_q must be in [0, L] = [0, {L}], got {n_q}")
    if K == 0 and n_q > 0:
        raise ValueError(f"{op}: codebooks must hold at least one code (K >= 1), got {list(codebooks.shape)}")
    check_device(op, x=x, codebooks=codebooks)


def _encode_blocks(device, n, K, D):
    block_d = next_pow2(D)
    if device.type == "cpu":  # interpreter: one numpy op over a big [rows, codes, D] tile
        block_r, budget = min(next_pow2(n), 64), 1 << 16
    else:  # the 3-D tile lives in registers
        block_r, budget = 16, 1 << 13
    block_k = min(next_pow2(K), max(1, budget // (block_r * block_d)))
    return block_r, block_k, block_d


@define("rvq_encode_triton")
def rvq_encode(x: torch.Tensor, codebooks: torch.Tensor, n_q: int) -> torch.Tensor:
    """Triton ``rvq_encode``: x [B,T,D], codebooks [L,K,D] -> codes [B,T,n_q] int64."""
    _check_encode(x, codebooks, n_q)
    B, T, D = x.shape
    L, K, _ = codebooks.shape
    x, codebooks = x.contiguous(), codebooks.contiguous()
    codes = torch.empty(B, T, n_q, dtype=torch.int64, device=x.device)
    n = B * T
    if codes.numel():
        br, bk, bd = _encode_blocks(x.device, n, K, D)
        launch(_rvq_encode_kernel)[(triton.cdiv(n, br),)](
            x, codebooks, codes, n, n_q, K, D, K * D, BLOCK_R=br, BLOCK_K=bk, BLOCK_D=bd, num_warps=4)
    return codes


@rvq_encode.register_fake
def _(x, codebooks, n_q):
    _check_encode(x, codebooks, n_q)
    return x.new_empty(x.shape[0], x.shape[1], n_q, dtype=torch.int64)


def _check_decode(codes, codebooks):
    op = "rvq_decode"
    check_tensor(op, "codes", codes, dim=3, integer=True)
    check_tensor(op, "codebooks", codebooks, dim=3, dtypes=FLOAT_DTYPES)
    if codes.shape[2] > codebooks.shape[0]:
        raise ValueError(f"{op}: codes has n_q = {codes.shape[2]} levels but codebooks has only L = {codebooks.shape[0]}")
    check_device(op, codes=codes, codebooks=codebooks)


def _raise_if_flagged(flag, codes, K):
    msg = f"rvq_decode: codes must lie in [0, K) = [0, {K}) (the codebook size)"
    from torch._subclasses.fake_tensor import is_fake

    if torch.compiler.is_compiling() or is_fake(flag):  # traced: no host sync possible
        torch._assert_async(flag == 0, msg)  # flag has one element
    elif flag.item():
        raise ValueError(f"{msg}, got values in [{codes.min().item()}, {codes.max().item()}]")


@define("rvq_decode_triton")
def rvq_decode(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Triton ``rvq_decode``: codes [B,T,n_q] integer, codebooks [L,K,D] -> [B,T,D] in codebooks' dtype.

    A code outside [0, K) raises ValueError (the kernel flags it and never reads out of bounds).
    """
    _check_decode(codes, codebooks)
    B, T, n_q = codes.shape
    L, K, D = codebooks.shape
    codes, codebooks = codes.contiguous(), codebooks.contiguous()
    out = torch.empty(B, T, D, dtype=codebooks.dtype, device=codebooks.device)
    n = B * T
    if n and n_q:  # runs even when D == 0, so bad codes are still reported
        flag = torch.zeros(1, dtype=torch.int32, device=codes.device)
        block_d = next_pow2(D)
        block_r = min(next_pow2(n), max(1, 4096 // block_d))
        launch(_rvq_decode_kernel)[(triton.cdiv(n, block_r),)](
            codes, codebooks, out, flag, n, n_q, K, D, K * D, BLOCK_R=block_r, BLOCK_D=block_d, INTERP=INTERPRET, num_warps=4)
        _raise_if_flagged(flag, codes, K)
    else:
        out.zero_()
    return out


@rvq_decode.register_fake
def _(codes, codebooks):
    _check_decode(codes, codebooks)
    return codebooks.new_empty(codes.shape[0], codes.shape[1], codebooks.shape[2])
