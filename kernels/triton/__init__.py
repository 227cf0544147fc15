"""Triton kernels for pysonic's fused ops (shipped as ``pysonic.triton_kernels``).

``IMPLS`` maps an op name to a callable with the positional signature and outputs of
``torch.ops.pysonic.<op>`` (csrc/ops.cpp). Each callable is a ``torch.library`` op of its own,
``torch.ops.pysonic.<op>_triton``, with a fake implementation, and autograd for attention,
rotary and conformer_conv (backward kernels in Triton too: ``pysonic::attention_backward_triton``,
``pysonic::conformer_conv_backward_triton``; rotary's backward is rotary with -sin). Registered
with ``torch.library.triton_op`` on GPUs and ``custom_op`` under the interpreter (see ``_common``).
Kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1.

``python kernels/triton/_compile_check.py`` (TRITON_INTERPRET unset) checks the GPU path without
a GPU: traces every op body on fake CUDA tensors and compiles every launch for sm_90.
"""
from __future__ import annotations

from . import attention, conformer_conv, elu, lstm, rotary, rvq, steps

IMPLS = {
    "rotary": rotary.rotary,
    "conformer_conv": conformer_conv.conformer_conv,
    "rvq_encode": rvq.rvq_encode,
    "rvq_decode": rvq.rvq_decode,
    "attention": attention.attention,
    "flow_step": steps.flow_step,
    "diffusion_step": steps.diffusion_step,
    "diffusion_step_x0": steps.diffusion_step_x0,
    "lstm_recurrence": lstm.lstm_recurrence,
    "elu_out": elu.elu_out,
}

__all__ = ["IMPLS"]
