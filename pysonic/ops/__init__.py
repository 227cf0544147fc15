"""Fused ops: one Python function each, choosing among C++/CUDA/Triton kernels and the reference.

Every function takes ``backend="auto" | "cpp" | "cuda" | "triton" | "reference"``; see
:mod:`pysonic.ops._backends`. ``pysonic.ops.reference`` holds the plain-PyTorch definitions.
"""
from pysonic.ops import reference
from pysonic.ops._backends import BACKENDS, BackendUnavailable, available_backends
from pysonic.ops.rvq import rvq_decode, rvq_encode
from pysonic.ops.attention import attention
from pysonic.ops.steps import diffusion_step, diffusion_step_x0, flow_step
from pysonic.ops.rotary import rotary
from pysonic.ops.conformer_conv import conformer_conv
from pysonic.ops.lstm import lstm_layer, lstm_recurrence
from pysonic.ops.elu import elu

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "available_backends",
    "reference",
    "attention",
    "flow_step",
    "diffusion_step",
    "diffusion_step_x0",
    "rvq_encode",
    "rvq_decode",
    "rotary",
    "conformer_conv",
    "lstm_recurrence",
    "lstm_layer",
    "elu",
]
