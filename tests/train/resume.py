"""The exact-resume check that every trainer's tests share."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file


def check_resume_is_exact(make: Callable[[Path], object], tmp_path: Path, *, stop_at: int = 3) -> None:
    """``make(out_dir)`` builds a fresh trainer. One runs uninterrupted; another is stopped at
    step ``stop_at`` (a KeyboardInterrupt from ``on_log``, as a kill between steps would) and a
    fresh trainer in the same directory resumes it. The final weights must match bit for bit."""
    make(tmp_path / "ref").fit()
    cut = make(tmp_path / "cut")

    def stop(step, logs):
        if step == stop_at:
            raise KeyboardInterrupt(f"stopped at step {step}")

    cut.on_log = stop
    with pytest.raises(KeyboardInterrupt):
        cut.fit()
    assert not (tmp_path / "cut" / "final.safetensors").exists()
    make(tmp_path / "cut").fit()
    a, b = load_file(tmp_path / "ref" / "final.safetensors"), load_file(tmp_path / "cut" / "final.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=lambda m: f"{k}: {m}")
