"""Triton kernel for ``elu_out``: ``out = x > 0 ? x : alpha * (exp(x) - 1)``, in place allowed.

x and out are dense with the same strides (the op wrapper ensures it), so the kernel walks both as
flat arrays from their data pointers. expm1 is a degree-8 Taylor polynomial on (-0.35, 0] (no
cancellation near 0) and ``exp(x) - 1`` below, in fp32, as in the C++ kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, INTERPRET, cast, check_device, check_tensor, launch

BLOCK = 1024  # elements per program


# Contract of _elu_kernel: X, OUT: N elements each (flat), dtype T; grid (cdiv(N, BLOCK),);
# program p covers [p*BLOCK, (p+1)*BLOCK) & < N. fp32 arithmetic, rounded once to T; NaN stays NaN.
@triton.jit
def _elu_kernel(X, OUT, N, alpha, BLOCK: tl.constexpr, INTERP: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    z = tl.where(x < 0.0, x, 0.0)  # the polynomial sees only (-0.35, 0]
    p = 1.0 / 40320.0
    p = p * z + 1.0 / 5040.0
    p = p * z + 1.0 / 720.0
    p = p * z + 1.0 / 120.0
    p = p * z + 1.0 / 24.0
    p = p * z + 1.0 / 6.0
    p = p * z + 0.5
    near_zero = z + z * z * p
    em1 = tl.where(x > -0.35, near_zero, tl.exp(x) - 1.0)
    out = tl.where(x > 0.0, x, alpha * em1)  # NaN: x > 0 is false and exp(NaN) is NaN
    tl.store(OUT + offs, cast(out, OUT.dtype.element_ty, INTERP), mask=mask)


def _check(x, out):
    op = "elu_out"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES)
    check_tensor(op, "out", out)
    if out.shape != x.shape or any(n > 1 and a != b for n, a, b in zip(x.shape, x.stride(), out.stride())):
        raise ValueError(f"{op}: out must have the shape and strides of x, got {tuple(out.shape)} / "
                         f"{out.stride()} vs {tuple(x.shape)} / {x.stride()}")
    if out.dtype != x.dtype:
        raise TypeError(f"{op}: out has dtype {out.dtype} but x has {x.dtype}")
    check_device(op, x=x, out=out)


def _register():
    qualname = "pysonic::elu_out_triton"
    if INTERPRET:
        return torch.library.custom_op(qualname, mutates_args=("out",))
    return torch.library.triton_op(qualname, mutates_args=("out",))


@_register()
def elu_out(x: torch.Tensor, alpha: float, out: torch.Tensor) -> None:
    """Triton ``elu_out``: see ``pysonic.ops.reference.elu`` (x, out: dense, same strides)."""
    _check(x, out)
    n = x.numel()
    if n:
        launch(_elu_kernel)[(triton.cdiv(n, BLOCK),)](x, out, n, float(alpha), BLOCK=BLOCK, INTERP=INTERPRET,
                                                      num_warps=4)


@elu_out.register_fake
def _(x, alpha, out):
    _check(x, out)
