"""Triton kernel for ``lstm_recurrence``: one launch per step (the Python loop runs the T steps).

Each program takes one batch item and a block of hidden units, loops over the H inputs in chunks
(a [units, chunk] tile of each gate's rows of w_hh times the chunk of h), then applies the gates
(order i, f, g, o). h and c are carried in fp32 buffers; h is double buffered so that no program
reads an h that another has already overwritten.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, cast, check_device, check_tensor, define, launch, next_pow2

_DTYPES = (torch.float32, torch.bfloat16)


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _tanh(z):
    # tanh through exp of a non-positive argument (no overflow): sign(z) * (1 - e) / (1 + e), e = exp(-2|z|)
    e = tl.exp(-2.0 * tl.abs(z))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(z < 0.0, -t, t)


# Contract of _lstm_step_kernel: GX [T, B, 4H] (input gates, dtype T), W [4H, H] (T), H_PREV,
# H_NEXT, C: float32 [B, H] (C read and written in place), Y [T, B, H] (T); all contiguous; step t.
# grid (B, cdiv(H, BLOCK_U)); program (b, p) computes units [p*BLOCK_U, (p+1)*BLOCK_U) & < H.
@triton.jit
def _lstm_step_kernel(GX, W, H_PREV, H_NEXT, C, Y, t, B, H, BLOCK_U: tl.constexpr, BLOCK_H: tl.constexpr,
                      INTERP: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    units = tl.program_id(1) * BLOCK_U + tl.arange(0, BLOCK_U)
    umask = units < H
    z_i = tl.zeros((BLOCK_U,), tl.float32)
    z_f = tl.zeros((BLOCK_U,), tl.float32)
    z_g = tl.zeros((BLOCK_U,), tl.float32)
    z_o = tl.zeros((BLOCK_U,), tl.float32)
    for start in range(0, H, BLOCK_H):
        cols = start + tl.arange(0, BLOCK_H)
        cmask = cols < H
        h = tl.load(H_PREV + b * H + cols, mask=cmask, other=0.0)[None, :]
        tile = units[:, None].to(tl.int64) * H + cols[None, :]
        m = umask[:, None] & cmask[None, :]
        z_i += tl.sum(tl.load(W + tile, mask=m, other=0.0).to(tl.float32) * h, axis=1)
        z_f += tl.sum(tl.load(W + H * H + tile, mask=m, other=0.0).to(tl.float32) * h, axis=1)
        z_g += tl.sum(tl.load(W + 2 * H * H + tile, mask=m, other=0.0).to(tl.float32) * h, axis=1)
        z_o += tl.sum(tl.load(W + 3 * H * H + tile, mask=m, other=0.0).to(tl.float32) * h, axis=1)
    row = t.to(tl.int64) * B + b  # (t, b) in [T, B]
    gx = GX + row * 4 * H + units
    z_i += tl.load(gx, mask=umask, other=0.0).to(tl.float32)
    z_f += tl.load(gx + H, mask=umask, other=0.0).to(tl.float32)
    z_g += tl.load(gx + 2 * H, mask=umask, other=0.0).to(tl.float32)
    z_o += tl.load(gx + 3 * H, mask=umask, other=0.0).to(tl.float32)
    c = _sigmoid(z_f) * tl.load(C + b * H + units, mask=umask, other=0.0) + _sigmoid(z_i) * _tanh(z_g)
    h_new = _sigmoid(z_o) * _tanh(c)
    tl.store(C + b * H + units, c, mask=umask)
    tl.store(H_NEXT + b * H + units, h_new, mask=umask)
    tl.store(Y + row * H + units, cast(h_new, Y.dtype.element_ty, INTERP), mask=umask)


def _check(gates_x, w_hh, h0, c0):
    op = "lstm_recurrence"
    check_tensor(op, "gates_x", gates_x, dim=3, dtypes=_DTYPES)
    check_tensor(op, "w_hh", w_hh, dim=2, dtypes=_DTYPES)
    H = w_hh.shape[1]
    if H < 1 or w_hh.shape[0] != 4 * H:
        raise ValueError(f"{op}: w_hh must be [4H, H] with H >= 1, got shape {tuple(w_hh.shape)}")
    if gates_x.shape[2] != 4 * H:
        raise ValueError(f"{op}: gates_x must be [T, B, 4H] = [T, B, {4 * H}], got {tuple(gates_x.shape)}")
    for name, t in (("h0", h0), ("c0", c0)):
        check_tensor(op, name, t, dim=2)
        if tuple(t.shape) != (gates_x.shape[1], H):
            raise ValueError(f"{op}: {name} must be [B, H] = [{gates_x.shape[1]}, {H}], got {tuple(t.shape)}")
    for name, t in (("w_hh", w_hh), ("h0", h0), ("c0", c0)):
        if t.dtype != gates_x.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but gates_x has {gates_x.dtype}")
    check_device(op, gates_x=gates_x, w_hh=w_hh, h0=h0, c0=c0)


@define("lstm_recurrence_triton")
def lstm_recurrence(gates_x: torch.Tensor, w_hh: torch.Tensor, h0: torch.Tensor,
                    c0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``lstm_recurrence``: see ``pysonic.ops.reference.lstm_recurrence``."""
    _check(gates_x, w_hh, h0, c0)
    T, B, _ = gates_x.shape
    H = w_hh.shape[1]
    y = torch.empty((T, B, H), dtype=gates_x.dtype, device=gates_x.device)
    c = c0.float().contiguous().clone()
    if B == 0 or T == 0:
        return y, c.to(gates_x.dtype)
    gx, w = gates_x.contiguous(), w_hh.contiguous()
    h_prev, h_next = h0.float().contiguous().clone(), torch.empty((B, H), dtype=torch.float32, device=gates_x.device)
    block_u = min(16, next_pow2(H))
    block_h = min(64, next_pow2(H, 16))  # 4 gate tiles of 16 x 64 fp32: no register spills
    for t in range(T):
        launch(_lstm_step_kernel)[(B, triton.cdiv(H, block_u))](
            gx, w, h_prev, h_next, c, y, t, B, H, BLOCK_U=block_u, BLOCK_H=block_h, INTERP=INTERPRET, num_warps=4)
        h_prev, h_next = h_next, h_prev
    return y, c.to(gates_x.dtype)


@lstm_recurrence.register_fake
def _(gates_x, w_hh, h0, c0):
    _check(gates_x, w_hh, h0, c0)
    T, B, _ = gates_x.shape
    H = w_hh.shape[1]
    return gates_x.new_empty((T, B, H)), gates_x.new_empty((B, H))
