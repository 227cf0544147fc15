"""The Conformer convolution module's core, fused: ``conformer_conv`` (differentiable).

GLU over channels -> depthwise convolution over time -> SiLU. The compiled op
``pysonic::conformer_conv`` gets a fake (for ``torch.compile``) and autograd here; its backward
is the compiled ``pysonic::conformer_conv_backward`` (which recomputes the GLU output and the
convolution instead of saving them). Double backward is not supported on the compiled path.
"""
from __future__ import annotations

import torch

from pysonic import _ext
from pysonic.ops import _checks, reference
from pysonic.ops._backends import resolve

_DTYPES = _checks.FLOAT_DTYPES + (torch.float64,)


def conformer_conv(x, weight, bias, *, causal: bool = False, backend: str = "auto"):
    """``silu(depthwise_conv1d(glu(x)) + bias)``, the middle of a Conformer conv module.

    ``glu(x) = x[..., :C] * sigmoid(x[..., C:])``; the convolution runs over time with one
    length-K filter per channel and keeps the length: K // 2 zeros on each side ("same", K odd),
    or K - 1 zeros on the left with ``causal=True`` (any K). The pointwise convolutions and
    normalisation around it in a Conformer block stay outside (they are matrix products).

    Args:
        x: [B, T, 2C], float32/bfloat16/float16/float64 (the output of the first pointwise conv).
        weight: [C, K] depthwise filters (``Conv1d(C, C, K, groups=C).weight[:, 0, :]``), x's dtype.
        bias: [C], x's dtype.
        causal: pad on the left only (streaming).
        backend: "auto", "cpp", "cuda", "triton" or "reference".

    Returns:
        [B, T, C] contiguous, in x's dtype.
    """
    op = "conformer_conv"
    _checks.tensor(op, "x", x, dim=3, dtypes=_DTYPES)
    _checks.tensor(op, "weight", weight, dim=2)
    _checks.tensor(op, "bias", bias, dim=1)
    device = _checks.same_device(op, x=x, weight=weight, bias=bias)
    _checks.same_dtype(op, x=x, weight=weight, bias=bias)
    C, K = weight.shape
    if x.shape[2] % 2 != 0:
        raise ValueError(f"{op}: x must have an even number of channels 2C (GLU halves), got {x.shape[2]}")
    if x.shape[2] != 2 * C:
        raise ValueError(f"{op}: x has {x.shape[2]} channels but weight has C = {C}: x must have 2C = {2 * C}")
    if bias.shape[0] != C:
        raise ValueError(f"{op}: bias must have C = {C} entries, got shape {tuple(bias.shape)}")
    if K < 1:
        raise ValueError(f"{op}: weight must have a kernel size K >= 1, got shape {tuple(weight.shape)}")
    causal = bool(causal)
    if not causal and K % 2 == 0:
        raise ValueError(f"{op}: kernel size K = {K} (weight.shape[1]) must be odd for 'same' padding, or use causal=True")
    chosen = resolve(op, backend, device)
    if chosen == "reference":
        return reference.conformer_conv(x, weight, bias, causal)
    if chosen == "triton":
        from pysonic.ops import _triton

        return _triton.get(op)(x, weight, bias, causal)
    return torch.ops.pysonic.conformer_conv(x, weight, bias, causal)


def _setup_context(ctx, inputs, output):
    x, weight, bias, causal = inputs
    ctx.causal = causal
    ctx.save_for_backward(x, weight, bias)


def _backward(ctx, grad):
    x, weight, bias = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = torch.ops.pysonic.conformer_conv_backward(grad, x, weight, bias, ctx.causal)
    return (
        grad_x if ctx.needs_input_grad[0] else None,
        grad_weight if ctx.needs_input_grad[1] else None,
        grad_bias if ctx.needs_input_grad[2] else None,
        None,
    )


def _fake(x, weight, bias, causal=False):
    return x.new_empty((x.shape[0], x.shape[1], weight.shape[0]))


def _fake_backward(grad_out, x, weight, bias, causal=False):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), bias.new_empty(bias.shape)


if _ext._C is not None:
    torch.library.register_fake("pysonic::conformer_conv")(_fake)
    torch.library.register_fake("pysonic::conformer_conv_backward")(_fake_backward)
    torch.library.register_autograd("pysonic::conformer_conv", _backward, setup_context=_setup_context)
