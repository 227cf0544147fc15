"""Fused softmax attention (flash-style): grouped-query heads, bottom-right causal mask, key lengths.

``pysonic.ops.attention`` is the one entry point; the C++ (CPU) and CUDA kernels behind
``torch.ops.pysonic.attention`` return ``(out, lse)`` and are differentiable through
``torch.ops.pysonic.attention_backward`` (registered below), so training runs the fused backward
on each device.
"""
from __future__ import annotations

import math

import torch

from pysonic import _ext
from pysonic.ops import _checks, reference
from pysonic.ops._backends import resolve

MAX_HEAD_DIM = 128
# float64 is accepted so that torch.autograd.gradcheck can run on the kernels (slow path).
ATTENTION_DTYPES = _checks.FLOAT_DTYPES + (torch.float64,)
_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def _check(op, q, k, v, scale, key_lengths):
    _checks.tensor(op, "q", q, dim=4, dtypes=ATTENTION_DTYPES)
    _checks.tensor(op, "k", k, dim=4)
    _checks.tensor(op, "v", v, dim=4)
    if key_lengths is not None:
        _checks.tensor(op, "key_lengths", key_lengths, dim=1, dtypes=_INT_DTYPES)
    device = _checks.same_device(op, q=q, k=k, v=v, key_lengths=key_lengths)
    _checks.same_dtype(op, q=q, k=k, v=v)
    _checks.same_shape(op, k=k, v=v)
    B, H, _, D = q.shape
    Bk, Hkv, Tk, Dk = k.shape
    if Bk != B:
        raise ValueError(f"{op}: k has batch size {Bk} but q has {B} (q [B,H,Tq,D], k/v [B,Hkv,Tk,D])")
    if Dk != D:
        raise ValueError(f"{op}: k has head dim {Dk} but q has {D}")
    if (Hkv == 0 and H != 0) or (Hkv != 0 and H % Hkv != 0):
        raise ValueError(f"{op}: the {H} heads of q must be a multiple of the {Hkv} heads of k/v (grouped-query attention)")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"{op}: head dim D={D} of q exceeds the maximum of {MAX_HEAD_DIM}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"{op}: scale must be a finite number or None, got {scale!r}")
    if key_lengths is not None:
        if key_lengths.shape[0] != B:
            raise ValueError(f"{op}: key_lengths must have shape [B] = [{B}], got {tuple(key_lengths.shape)}")
        if not torch.compiler.is_compiling() and key_lengths.numel() > 0:
            lo, hi = int(key_lengths.min()), int(key_lengths.max())
            if lo < 0 or hi > Tk:
                raise ValueError(f"{op}: key_lengths must lie in [0, Tk] = [0, {Tk}], got values in [{lo}, {hi}]")
    return device


def attention(q, k, v, *, causal: bool = False, scale: float | None = None, key_lengths=None, backend: str = "auto"):
    """Softmax attention ``softmax(scale * q k^T + mask) v``, computed tile by tile (flash-style).

    Args:
        q: queries [B, H, Tq, D], float32/bfloat16/float16 (float64 for gradcheck); any strides.
        k: keys [B, Hkv, Tk, D], same dtype and device; H must be a multiple of Hkv
            (grouped-query: query head h reads kv head h // (H // Hkv)).
        v: values [B, Hkv, Tk, D], like k.
        causal: query i sees keys j <= i + (Tk - Tq) (bottom-right aligned, so a query block
            appended to a KV cache sees the whole cache).
        scale: score scale, default 1/sqrt(D).
        key_lengths: integer tensor [B]; keys j >= key_lengths[b] are hidden (padding).
            A query row that sees no key returns zeros.
        backend: "auto", "cpp", "cuda", "triton" or "reference".

    Returns:
        out [B, H, Tq, D], q's dtype. Differentiable with respect to q, k and v.
    """
    op = "attention"
    device = _check(op, q, k, v, scale, key_lengths)
    scale = None if scale is None else float(scale)
    chosen = resolve(op, backend, device)
    if chosen == "reference":
        return reference.attention(q, k, v, causal, scale, key_lengths)
    if chosen == "triton":
        from pysonic.ops import _triton

        return _triton.get(op)(q, k, v, causal, scale, key_lengths)[0]
    return torch.ops.pysonic.attention(q, k, v, causal, scale, key_lengths)[0]


if _ext._C is not None:  # shapes for torch.compile / fake tensors, and the fused backward

    @torch.library.register_fake("pysonic::attention")
    def _attention_fake(q, k, v, causal=False, scale=None, key_lengths=None):
        B, H, Tq, D = q.shape
        out = q.new_empty((B, H, Tq, D))
        lse = q.new_empty((B, H, Tq), dtype=torch.float32)
        return out, lse

    @torch.library.register_fake("pysonic::attention_backward")
    def _attention_backward_fake(grad_out, q, k, v, out, lse, causal=False, scale=None, key_lengths=None):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def _attention_setup_context(ctx, inputs, output):
        q, k, v, causal, scale, key_lengths = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, key_lengths)
        ctx.causal, ctx.scale = causal, scale
        ctx.mark_non_differentiable(lse)

    def _attention_backward(ctx, grad_out, grad_lse):
        # lse is returned for the backward pass only and is not differentiable (grad_lse unused).
        q, k, v, out, lse, key_lengths = ctx.saved_tensors
        if grad_out is None:
            return None, None, None, None, None, None
        dq, dk, dv = torch.ops.pysonic.attention_backward(
            grad_out, q, k, v, out, lse, ctx.causal, ctx.scale, key_lengths
        )
        return dq, dk, dv, None, None, None

    torch.library.register_autograd(
        "pysonic::attention", _attention_backward, setup_context=_attention_setup_context
    )
