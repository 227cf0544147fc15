"""Fused ops: one Python function each, choosing among C++/CUDA/Triton kernels and the reference.

Every function takes ``backend="auto" | "cpp" | "cuda" | "triton" | "reference"``; see
:mod:`pysonic.ops._backends`. ``pysonic.ops.reference`` holds the plain-PyTorch definitions.
"""
from pysonic.ops import reference
from pysonic.ops._backends import BACKENDS, BackendUnavailable, available_backends
from pysonic.ops.rvq import rvq_decode, rvq_encode
from pysonic.ops.steps import diffusion_step, flow_step

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "available_backends",
    "reference",
    "flow_step",
    "diffusion_step",
    "rvq_encode",
    "rvq_decode",
]
