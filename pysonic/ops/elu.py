"""ELU, the activation before nearly every convolution of SEANet (EnCodec): ``elu``.

torch's CPU ELU spends most of its time in a general-purpose ``expm1``; the C++ kernel computes
it with a short polynomial near zero and ``exp`` elsewhere (a few fp32 ulp from torch's), about
2.5x faster on one thread. ``out`` lets a caller write the activation straight into a larger
buffer (SEANet writes it into the padded input of the next convolution). Not differentiable:
training uses ``torch.nn.functional.elu``.
"""
from __future__ import annotations

import torch

from pysonic import _ext
from pysonic.ops import _checks, reference
from pysonic.ops._backends import resolve


def elu(x, alpha: float = 1.0, *, out=None, backend: str = "auto"):
    """``x`` where ``x > 0``, else ``alpha * (exp(x) - 1)``; arithmetic in fp32.

    Args:
        x: any shape and strides, float32/bfloat16/float16.
        alpha: the value the output approaches for very negative ``x``.
        out: a tensor of x's shape, dtype and device to write into (may be ``x`` itself), or
            None for a new tensor in x's memory layout.
        backend: "auto", "cpp", "cuda", "triton" or "reference".

    Returns:
        ``out`` (or the new tensor).
    """
    op = "elu"
    _checks.tensor(op, "x", x, dtypes=_checks.FLOAT_DTYPES)
    if out is None:
        out = torch.empty_like(x)
    _checks.tensor(op, "out", out)
    _checks.same_device(op, x=x, out=out)
    _checks.same_dtype(op, x=x, out=out)
    _checks.same_shape(op, x=x, out=out)
    alpha = float(alpha)
    chosen = resolve("elu_out", backend, x.device)
    if chosen == "reference":
        return out.copy_(reference.elu(x, alpha))
    # The kernels walk x and out as flat arrays: both dense with the same strides.
    if _dense(x) and _same_layout(x, out):
        _run(chosen, x, alpha, out)
        return out
    src = x if _dense(x) else x.contiguous()
    tmp = torch.empty_like(src)
    _run(chosen, src, alpha, tmp)
    return out.copy_(tmp)


def _dense(t) -> bool:
    """The elements fill one block of memory without gaps or overlaps, in some dimension order."""
    expected = 1
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n > 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _same_layout(a, b) -> bool:
    """Equal strides on every dimension longer than 1 (the others are never stepped along)."""
    return all(sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()) if n > 1)


def _run(chosen, x, alpha, out):
    if chosen == "triton":
        from pysonic.ops import _triton

        _triton.get("elu_out")(x, alpha, out)
    else:
        torch.ops.pysonic.elu_out(x, alpha, out)


if _ext._C is not None:

    @torch.library.register_fake("pysonic::elu_out")
    def _elu_out_fake(x, alpha, out):
        torch._check(out.shape == x.shape, lambda: "elu_out: out must have the shape of x")
