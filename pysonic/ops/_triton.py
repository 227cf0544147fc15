"""Finds the Triton kernels (``kernels/triton``, shipped as ``pysonic.triton_kernels``).

They run on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before Triton
was imported. ``pysonic.triton_kernels.IMPLS`` maps an op name to a callable with the same
positional signature and outputs as ``torch.ops.pysonic.<op>``.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import torch

from pysonic.ops._backends import triton_interpreting

_state: dict = {}


def _load():
    """Import the kernel package once; returns (module or None, error or None)."""
    if "module" in _state:
        return _state["module"], _state["error"]
    module, error = None, None
    if importlib.util.find_spec("triton") is None:
        error = "the triton package is not installed (pip install triton)"
    else:
        try:
            try:
                module = importlib.import_module("pysonic.triton_kernels")
            except ModuleNotFoundError as exc:
                if exc.name != "pysonic.triton_kernels":  # something the kernels import is missing
                    raise
                module = _load_from_source()
                if module is None:
                    error = "pysonic.triton_kernels is not installed with this copy of pysonic"
        except Exception as exc:  # a broken triton install (or kernel file) must not break pysonic
            module, error = None, f"importing the Triton kernels failed: {exc}"
            for name in [n for n in sys.modules if n == "pysonic.triton_kernels" or n.startswith("pysonic.triton_kernels.")]:
                del sys.modules[name]  # no half-initialised package left behind
    _state.update(module=module, error=error)
    return module, error


def _load_from_source():
    """A source checkout built in place: load kernels/triton from beside the package (or None)."""
    src = Path(__file__).resolve().parents[2] / "kernels" / "triton" / "__init__.py"
    if not src.exists():
        return None
    spec = importlib.util.spec_from_file_location(
        "pysonic.triton_kernels", src, submodule_search_locations=[str(src.parent)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def why_unavailable(op: str, device: torch.device) -> str | None:
    if device.type == "cpu" and not triton_interpreting():
        return "Triton runs CPU tensors only under the interpreter: set TRITON_INTERPRET=1 before importing triton"
    if device.type not in ("cpu", "cuda"):
        return f"Triton kernels run cuda tensors (or cpu under TRITON_INTERPRET=1), got {device.type}"
    module, error = _load()
    if error is not None:
        return error
    if op not in module.IMPLS:
        return f"no Triton kernel for {op}"
    return None


def get(op: str):
    """The Triton implementation of ``op`` (call :func:`why_unavailable` first)."""
    module, error = _load()
    if error is not None:
        raise RuntimeError(error)
    return module.IMPLS[op]
