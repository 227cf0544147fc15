"""Safe checkpoint readers and strict loading with errors that name the tensor.

Only safetensors files and ``torch.load(weights_only=True)`` are used: an arbitrary pickle is
never executed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or does not match the model."""


def read_state_dict(path: str | Path, *, key: str | None = None) -> dict[str, torch.Tensor]:
    """Read tensors from a ``.safetensors`` file or a torch checkpoint (weights only).

    Args:
        path: the file.
        key: for torch checkpoints that wrap the state dict (e.g. ``{"model": state_dict}``),
            the entry holding it; None takes the file's top level.

    Returns:
        A flat ``name -> tensor`` dict on the CPU.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # corrupt header, truncated file
            raise CheckpointError(f"cannot read safetensors file {path}: {exc}") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # includes pickles that need arbitrary code
        raise CheckpointError(f"cannot read {path} as a weights-only torch checkpoint: {exc}") from exc
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            found = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
            raise CheckpointError(f"{path}: expected an entry {key!r}, found {found}")
        obj = obj[key]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {bad[:10]}")
    return dict(obj)


def load_into(module: torch.nn.Module, state: Mapping[str, torch.Tensor], *, source: str = "checkpoint") -> None:
    """Copy ``state`` into ``module``'s parameters and buffers, exactly.

    Every missing, unexpected or wrongly shaped tensor is an error naming it (all of them are
    listed at once), so a mismatched checkpoint never loads half-way or silently.
    """
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if state[k].shape != own[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors: {missing[:20]}{' ...' if len(missing) > 20 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors: {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}")
    if shapes:
        problems.append(f"shape mismatches: {shapes[:20]}")
    if problems:
        raise CheckpointError(f"{source} does not match {type(module).__name__}: " + "; ".join(problems))
    with torch.no_grad():
        module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
