"""Rotary position embedding: ``rotary`` (fused, differentiable).

The compiled op ``pysonic::rotary`` gets a fake (for ``torch.compile``) and autograd here: the
gradient with respect to ``x`` is the same op with ``-sin`` (a rotation's transpose is its
inverse); gradients with respect to ``cos``/``sin``, when they require grad, are computed with
plain torch ops in the backward (they are rarely trained).
"""
from __future__ import annotations

import torch

from pysonic import _ext
from pysonic.ops import _checks, reference
from pysonic.ops._backends import resolve

_DTYPES = _checks.FLOAT_DTYPES + (torch.float64,)


def rotary(x, cos, sin, *, interleaved: bool = False, backend: str = "auto"):
    """Rotates the first R channels of each head by per-time-step angles (RoPE).

    With ``half = R / 2``, pairs ``(a, b)`` are channels ``(i, i + half)`` (half-split, the
    GPT-NeoX / Llama layout) or ``(2i, 2i + 1)`` with ``interleaved=True`` (GPT-J layout):
    ``a' = a * cos[t, i] - b * sin[t, i]``, ``b' = b * cos[t, i] + a * sin[t, i]``.
    Channels ``R..D`` pass through. Arithmetic in fp32 (fp64 for float64 inputs).

    Args:
        x: [B, H, T, D], float32/bfloat16/float16/float64, any strides (a ``[B, T, H, D]``
            tensor transposed to ``[B, H, T, D]`` is read in place).
        cos: [T, R/2] with R even and R <= D; float32 or x's dtype.
        sin: [T, R/2], same shape and dtype as ``cos``.
        interleaved: pair channels (2i, 2i+1) instead of (i, i + R/2).
        backend: "auto", "cpp", "cuda", "triton" or "reference".

    Returns:
        [B, H, T, D] contiguous, in x's dtype.
    """
    op = "rotary"
    _checks.tensor(op, "x", x, dim=4, dtypes=_DTYPES)
    _checks.tensor(op, "cos", cos, dim=2)
    _checks.tensor(op, "sin", sin, dim=2)
    device = _checks.same_device(op, x=x, cos=cos, sin=sin)
    if cos.dtype not in (torch.float32, x.dtype):
        raise TypeError(f"{op}: cos must be float32 or x's dtype ({x.dtype}), got {cos.dtype}")
    _checks.same_dtype(op, cos=cos, sin=sin)
    _checks.same_shape(op, cos=cos, sin=sin)
    T, D = x.shape[2], x.shape[3]
    if cos.shape[0] != T:
        raise ValueError(f"{op}: cos must have T = {T} rows (x.shape[2]), got shape {tuple(cos.shape)}")
    if 2 * cos.shape[1] > D:
        raise ValueError(
            f"{op}: rotary width R = 2 * cos.shape[1] = {2 * cos.shape[1]} exceeds the head size D = {D}"
        )
    interleaved = bool(interleaved)
    chosen = resolve(op, backend, device)
    if chosen == "reference":
        return reference.rotary(x, cos, sin, interleaved)
    if chosen == "triton":
        from pysonic.ops import _triton

        return _triton.get(op)(x, cos, sin, interleaved)
    return torch.ops.pysonic.rotary(x, cos, sin, interleaved)


def _pairs(t, half, interleaved):
    """The (a, b) channel halves of the rotated part of ``t`` [..., D]."""
    if interleaved:
        return t[..., 0 : 2 * half : 2], t[..., 1 : 2 * half : 2]
    return t[..., :half], t[..., half : 2 * half]


def _setup_context(ctx, inputs, output):
    x, cos, sin, interleaved = inputs
    ctx.interleaved = interleaved
    need_angles = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    ctx.save_for_backward(cos, sin, x if need_angles else None)


def _backward(ctx, grad):
    cos, sin, x = ctx.saved_tensors
    grad_x = grad_cos = grad_sin = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.pysonic.rotary(grad, cos, -sin, ctx.interleaved)
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        # d out_a = g_a, d out_b = g_b:  dcos = sum_BH (g_a a + g_b b), dsin = sum_BH (g_b a - g_a b)
        half = cos.shape[-1]
        acc = torch.promote_types(x.dtype, torch.float32)  # fp32 sums (fp64 for float64)
        a, b = (t.to(acc) for t in _pairs(x, half, ctx.interleaved))
        ga, gb = (t.to(acc) for t in _pairs(grad, half, ctx.interleaved))
        if ctx.needs_input_grad[1]:
            grad_cos = (ga * a + gb * b).sum(dim=(0, 1)).to(cos.dtype)
        if ctx.needs_input_grad[2]:
            grad_sin = (gb * a - ga * b).sum(dim=(0, 1)).to(sin.dtype)
    return grad_x, grad_cos, grad_sin, None


def _fake(x, cos, sin, interleaved=False):
    return x.new_empty(x.shape)  # contiguous, like the kernels


if _ext._C is not None:
    torch.library.register_fake("pysonic::rotary")(_fake)
    torch.library.register_autograd("pysonic::rotary", _backward, setup_context=_setup_context)
