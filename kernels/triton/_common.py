"""Shared pieces of the Triton kernels: op registration, launch checks, interpreter workarounds.

Registration. On a GPU each op is a ``torch.library.triton_op`` whose body launches its kernels
through ``torch.library.wrap_triton``, so ``torch.compile`` sees (and can fuse around) the kernels.
Under ``TRITON_INTERPRET=1`` (CPU tensors) ``wrap_triton`` hands back the raw interpreted kernel,
and ``triton_op``'s automatic functional decomposition then runs that kernel on fake tensors while
tracing (``opcheck``'s aot_dispatch test fails with "Attempted to access the data pointer on an
invalid python storage"); there the same body is registered with ``torch.library.custom_op``,
which is opaque to tracing and uses our explicit fake implementation. The kernels are identical.

Interpreter findings (Triton 3.9, checked on CPU tensors). The interpreter keeps bf16 values as
their raw uint16 bits in numpy, so arithmetic on bf16 tensors (``a + a``, ``a * 3.0``) computes
on the integers and returns garbage; only the bf16 <-> fp32 conversions are implemented. Every
kernel therefore converts bf16 to fp32 right after loading and does all arithmetic in fp32 (the
ops' contract anyway). Two places still need bf16 and are worked around, switched by the
``INTERP`` constexpr every kernel takes, so the same kernel source runs in both places:

* ``tl.dot`` on bfloat16 operands multiplies the raw uint16 bit patterns (the interpreter stores
  bf16 as uint16 and calls ``np.matmul`` on them): results are garbage. :func:`mma` upcasts bf16
  operands to fp32 first under the interpreter (bf16 x bf16 products are exact in fp32, the
  accumulation is fp32 either way, so the result matches the GPU's bf16 MMA with fp32 accumulate).
* fp32 -> bf16 casts truncate under the interpreter (``fp_downcast_rounding="rtne"`` is ignored
  for this pair), while the GPU rounds to nearest even. :func:`cast` rounds to nearest even by
  hand with integer ops under the interpreter, so stored bf16 results are the GPU's.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from pysonic.ops import _checks

#: True when Triton runs kernels through its CPU interpreter (read once, like Triton does).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def define(name: str):
    """Decorator registering ``pysonic::<name>`` (see the module docstring for triton_op vs custom_op)."""
    qualname = f"pysonic::{name}"
    if INTERPRET:
        return torch.library.custom_op(qualname, mutates_args=())
    return torch.library.triton_op(qualname, mutates_args=())


def launch(kernel):
    """``kernel`` wrapped for tracing (``wrap_triton``); a no-op wrapper under the interpreter."""
    return torch.library.wrap_triton(kernel)


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot`` on ``dtype`` operands: fp32 follows torch's TF32 switch."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # the default; ignored for 16-bit operands


def next_pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, triton.next_power_of_2(max(1, int(n))))


# ----------------------------------------------------------------------------------------------
# argument checks (every message names the op and the argument)


# The op API's checks, so both layers word their errors the same way.
check_tensor = _checks.tensor


def check_device(op: str, **tensors) -> torch.device:
    """All given tensors share one device that Triton can run here; returns it."""
    device = _checks.same_device(op, **tensors)
    if device.type == "cpu" and not INTERPRET:
        raise ValueError(f"{op}: Triton runs CPU tensors only under TRITON_INTERPRET=1 (set before importing triton)")
    if device.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"{op}: Triton kernels run cuda tensors (or cpu under TRITON_INTERPRET=1), got {device.type}")
    return device


def check_shape(op: str, name: str, t: torch.Tensor, shape: tuple, what: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {what} = {list(shape)}, got {list(t.shape)}")


# ----------------------------------------------------------------------------------------------
# device helpers shared by the kernels


@triton.jit
def cast(x, dtype: tl.constexpr, INTERP: tl.constexpr):
    """fp32 ``x`` -> ``dtype`` rounding to nearest even (by hand for bf16 under the interpreter)."""
    if INTERP and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (((bits >> 16) & 1) + 0x7FFF)
        rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(x != x, x.to(tl.bfloat16), rounded)  # NaN stays NaN
    else:
        return x.to(dtype)


@triton.jit
def mma(a, b, acc, INTERP: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation; bf16 operands go through fp32 under the interpreter."""
    if INTERP and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)
