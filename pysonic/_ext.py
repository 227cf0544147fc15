"""Loads the compiled extension ``pysonic._C`` if it was built.

Importing ``pysonic._C`` registers the ``torch.ops.pysonic.*`` ops with the dispatcher. When it
is missing or fails to load, pysonic keeps working on the reference (plain PyTorch) and Triton
paths, and says once how to build it.
"""
from __future__ import annotations

import warnings

import torch  # noqa: F401  (loads libtorch/libc10, which pysonic._C links against)

try:
    from pysonic import _C  # noqa: F401

    LOAD_ERROR: str | None = None
except ImportError as exc:  # missing build, ABI mismatch with the installed torch, ...
    _C = None
    LOAD_ERROR = str(exc)
    warnings.warn(
        "pysonic: compiled kernels unavailable, using the plain-PyTorch reference ops "
        f"({exc}); build them with `pip install --no-build-isolation -e .`",
        RuntimeWarning,
        stacklevel=2,
    )


def build_info() -> dict:
    """Facts about the compiled extension (version, CPU ISA, CUDA), or ``{"compiled": False}``."""
    if _C is None:
        return {"compiled": False, "error": LOAD_ERROR}
    return {"compiled": True, **_C.build_info()}
