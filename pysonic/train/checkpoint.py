"""Training checkpoints: atomic writes, weights-only reads, the latest one in a run directory.

A checkpoint is written to a temporary file in the same directory, flushed to disk, then renamed
over the target, so a kill at any moment leaves either the previous file or the new one, never a
torn file. Reads use ``torch.load(weights_only=True)``: checkpoints hold tensors, numbers,
strings, lists and dicts only, and no pickle is ever executed.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch

from pysonic.checkpoints.io import CheckpointError

_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


def save_checkpoint(path: str | Path, obj: dict) -> Path:
    """Write ``obj`` with ``torch.save`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (weights only, onto the CPU)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"training checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated/corrupt file, or a pickle that needs arbitrary code
        raise CheckpointError(f"cannot read training checkpoint {path}: {exc}") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(obj).__name__}")
    return obj


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def step_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``step_<N>.pt`` in ``<out_dir>/checkpoints``, oldest first."""
    d = checkpoint_dir(out_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _STEP_FILE.match(p.name))]
    return sorted(found)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint with the highest step in ``<out_dir>/checkpoints``, or None."""
    found = step_checkpoints(out_dir)
    return found[-1][1] if found else None


def prune_checkpoints(out_dir: str | Path, keep: int) -> None:
    """Delete all but the ``keep`` newest step checkpoints."""
    for _, path in step_checkpoints(out_dir)[:-keep] if keep > 0 else []:
        path.unlink(missing_ok=True)
