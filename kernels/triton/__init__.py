"""Triton kernels for pysonic's fused ops (shipped as ``pysonic.triton_kernels``).

``IMPLS`` maps an op name to a callable with the positional signature and outputs of
``torch.ops.pysonic.<op>`` (csrc/ops.cpp). Each callable is a ``torch.library`` op of its own,
``torch.ops.pysonic.<op>_triton``, with a fake implementation, and autograd for attention,
rotary and conformer_conv. Kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1.
"""
from __future__ import annotations

from . import attention, conformer_conv, rotary, rvq, steps

IMPLS = {
    "rotary": rotary.rotary,
    "conformer_conv": conformer_conv.conformer_conv,
    "rvq_encode": rvq.rvq_encode,
    "rvq_decode": rvq.rvq_decode,
    "attention": attention.attention,
    "flow_step": steps.flow_step,
    "diffusion_step": steps.diffusion_step,
}

__all__ = ["IMPLS"]
