"""Shared test helpers for the fused ops."""
from __future__ import annotations

import os

import pytest
import torch

from pysonic.ops import _backends

# CI sets PYSONIC_REQUIRE_BACKENDS=cpp,triton: a backend it names that cannot run fails the
# test instead of skipping it, so a broken build cannot pass as "skipped".
REQUIRED = {b for b in os.environ.get("PYSONIC_REQUIRE_BACKENDS", "").split(",") if b}


def cpu_backends(op: str) -> list:
    """pytest params for every kernel backend that runs CPU tensors (cpp, triton); the reference
    itself is not listed (it is what they are compared to). An unavailable backend is skipped
    with the reason, or fails when CI requires it."""
    params = []
    for backend in ("cpp", "triton"):
        reason = _backends.why_unavailable(op, backend, torch.device("cpu"))
        marks = ()
        if reason is not None:
            if backend not in REQUIRED:  # required ones run and fail inside the op call
                marks = pytest.mark.skip(reason=f"{backend} backend unavailable: {reason}")
        params.append(pytest.param(backend, marks=marks, id=backend))
    return params


def low_precision_close(out, ref_fp32, ref_lowp, *, floor: float = 1e-6, factor: float = 2.0):
    """The flash-attention rule for bf16/fp16: the kernel's max error against an fp32 reference is
    at most ``factor`` x the max error of plain PyTorch run in the same low precision (plus a
    small ``floor`` for outputs that are exact in both)."""
    err = (out.float() - ref_fp32.float()).abs().max().item() if out.numel() else 0.0
    base = (ref_lowp.float() - ref_fp32.float()).abs().max().item() if out.numel() else 0.0
    assert err <= factor * base + floor, f"low-precision error {err:.3g} > {factor} x torch's {base:.3g} + {floor}"
