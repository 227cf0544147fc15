"""Scalar logs of a training run: JSON lines (default) or TensorBoard."""
from __future__ import annotations

import json
import time
from pathlib import Path


class ScalarLogger:
    """Append ``{"step": N, "time": ..., name: value, ...}`` records.

    Args:
        out_dir: run directory; JSONL goes to ``<out_dir>/log.jsonl``, TensorBoard events to
            ``<out_dir>/tensorboard``.
        format: ``"jsonl"`` or ``"tensorboard"`` (needs the ``tensorboard`` package).
        enabled: False on every process but rank 0, so only one writes.
    """

    def __init__(self, out_dir: str | Path, format: str = "jsonl", *, enabled: bool = True) -> None:
        if format not in ("jsonl", "tensorboard"):
            raise ValueError(f"ScalarLogger: format must be 'jsonl' or 'tensorboard', got {format!r}")
        self.format = format
        self.enabled = enabled
        self._file = None
        self._writer = None
        if not enabled:
            return
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if format == "jsonl":
            self._file = open(out_dir / "log.jsonl", "a", encoding="utf-8")
        else:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ValueError("ScalarLogger: format='tensorboard' needs the tensorboard package "
                                 "(pip install tensorboard), or use format='jsonl'") from exc
            self._writer = SummaryWriter(str(out_dir / "tensorboard"))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self._file is not None:
            record = {"step": int(step), "time": round(time.time(), 3), **{k: float(v) for k, v in scalars.items()}}
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        else:
            for name, value in scalars.items():
                self._writer.add_scalar(name, float(value), int(step))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
