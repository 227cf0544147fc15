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
            module = importlib.import_module("pysonic.triton_kernels")
        except ModuleNotFoundError:
            # A source checkout built in place: load kernels/triton from beside the package.
            src = Path(__file__).resolve().parents[2] / "kernels" / "triton" / "__init__.py"
            if src.exists():
                spec = importlib.util.spec_from_file_location(
                    "pysonic.triton_kernels", src, submodule_search_locations=[str(src.parent)]
                )
                module = importlib.util.module_from_spec(spec)
                sys.modules[spec.name] = module
                spec.loader.exec_module(module)
            else:
                error = "pysonic.triton_kernels is not installed with this copy of pysonic"
        except Exception as exc:  # a broken triton install must not break pysonic
            error = f"importing the Triton kernels failed: {exc}"
    _state.update(module=module, error=error)
    return module, error


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
