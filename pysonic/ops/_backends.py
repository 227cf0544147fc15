"""Backend choice for the fused ops: ``auto``, ``cpp``, ``cuda``, ``triton`` or ``reference``.

``auto`` picks the compiled CUDA kernel (else Triton) for CUDA tensors and the C++ kernel for
CPU tensors. When the compiled extension is missing, ``auto`` uses the reference (import already
warned). A backend asked for by name that cannot run raises :class:`BackendUnavailable` saying
why; nothing falls back silently.
"""
from __future__ import annotations

import os

import torch

from pysonic import _ext

BACKENDS = ("auto", "cpp", "cuda", "triton", "reference")


class BackendUnavailable(RuntimeError):
    """A backend was asked for by name but cannot run this op on these tensors."""


def _has_kernel(op: str, key: str) -> bool:
    return _ext._C is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"pysonic::{op}", key)


def why_unavailable(op: str, backend: str, device: torch.device) -> str | None:
    """None if ``backend`` can run ``op`` on ``device``, else the reason it cannot."""
    if backend == "reference":
        return None
    if backend in ("cpp", "cuda"):
        if _ext._C is None:
            return f"the compiled extension pysonic._C is not available ({_ext.LOAD_ERROR})"
        want = "cpu" if backend == "cpp" else "cuda"
        if device.type != want:
            return f"the {backend} backend runs {want} tensors, got {device.type} tensors"
        if backend == "cuda" and not _ext._C.build_info().get("cuda", False):
            return "pysonic._C was built without CUDA kernels (rebuild with PYSONIC_CUDA=1)"
        key = "CPU" if backend == "cpp" else "CUDA"
        if not _has_kernel(op, key):
            return f"no {key} kernel is registered for pysonic::{op}"
        return None
    if backend == "triton":
        from pysonic.ops import _triton

        return _triton.why_unavailable(op, device)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


_auto_cache: dict[tuple[str, str], str] = {}


# torch.compile evaluates the choice once while tracing and keeps it as a constant: it depends
# only on the op, the request and the device, never on tensor values.
@torch.compiler.assume_constant_result
def resolve(op: str, backend: str, device: torch.device) -> str:
    """The concrete backend that runs ``op`` on ``device`` for the requested ``backend``."""
    if backend == "auto":
        key = (op, device.type)
        if key not in _auto_cache:
            order = {"cpu": ("cpp",), "cuda": ("cuda", "triton")}.get(device.type, ())
            found = [b for b in order if why_unavailable(op, b, device) is None]
            _auto_cache[key] = found[0] if found else "reference"
        return _auto_cache[key]
    reason = why_unavailable(op, backend, device)
    if reason is not None:
        raise BackendUnavailable(f"pysonic.ops.{op}: backend {backend!r} unavailable: {reason}")
    return backend


def available_backends(op: str, device: torch.device | str = "cpu") -> list[str]:
    """The named backends that can run ``op`` on ``device`` here (``reference`` always)."""
    device = torch.device(device)
    return [b for b in BACKENDS[1:] if why_unavailable(op, b, device) is None]


def triton_interpreting() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
