"""Importing peer packages for parity tests and benchmarks."""
from __future__ import annotations

import importlib.util
import sys
import types

import pytest


def import_encodec_package():
    """The `encodec` package (skipped with the reason if absent).

    It imports torchaudio at module level but uses it only for file I/O and resampling, which
    the parity tests never call; torchaudio's wheels pin other torch builds, so an empty
    stand-in module is put in place for the import and removed straight after.
    """
    stub = None
    if importlib.util.find_spec("torchaudio") is None:
        stub = sys.modules.setdefault("torchaudio", types.ModuleType("torchaudio"))
    try:
        return pytest.importorskip("encodec")
    finally:
        if stub is not None and sys.modules.get("torchaudio") is stub:
            del sys.modules["torchaudio"]
