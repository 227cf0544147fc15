"""FLAN-T5 (or any T5 encoder) through ``transformers``, from a local directory only.

Tokenisation is TangoFlux's: prompts padded to the longest in the batch and truncated at the
tokenizer's ``model_max_length`` (its inference path; its training path uses 64, pass
``max_length=64``), the unconditional prompt padded to an exact length with ``length=``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pysonic.checkpoints import CheckpointError
from pysonic.text.base import TextEncoder

TIED = "encoder.embed_tokens.weight"  # tied to shared.weight; safetensors checkpoints keep only one


class T5TextEncoder(TextEncoder):
    """A T5 encoder and its tokenizer, loaded from a local directory (never from the network).

    Args:
        path: directory with the transformers files of a T5 model (``config.json``, weights,
            tokenizer files), e.g. a local copy of ``google/flan-t5-large``.
        max_length: token limit of ``encode(..., length=None)``; default the tokenizer's
            ``model_max_length`` (512 for FLAN-T5), as TangoFlux's inference does.
        device, dtype: where and in what dtype to put the encoder (default CPU, float32).
    """

    def __init__(self, path: str | Path, *, max_length: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"T5TextEncoder: text encoder directory not found: {path}")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"T5TextEncoder: no config.json in {path} (a transformers T5 directory is expected)")
        try:
            from transformers import AutoTokenizer, T5EncoderModel
        except ImportError as exc:  # optional dependency
            raise ImportError("T5TextEncoder needs the `transformers` package (pip install transformers)") from exc
        self.path = path
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = T5EncoderModel.from_pretrained(str(path), local_files_only=True).eval()
        self.model.requires_grad_(False)
        self.dim = int(self.model.config.d_model)
        self.max_length = int(max_length or self.tokenizer.model_max_length)
        if self.max_length < 1:
            raise ValueError(f"T5TextEncoder: max_length must be >= 1, got {self.max_length}")
        self.to(device=device, dtype=dtype)

    @torch.no_grad()
    def _encode(self, prompts: list[str], length: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        if length is None:
            batch = self.tokenizer(prompts, max_length=self.max_length, padding=True, truncation=True, return_tensors="pt")
        else:
            batch = self.tokenizer(prompts, max_length=length, padding="max_length", truncation=True, return_tensors="pt")
        ids = batch.input_ids.to(self.device)
        mask = batch.attention_mask.to(self.device)
        states = self.model(input_ids=ids, attention_mask=mask)[0]
        return states, mask == 1

    def load_release_weights(self, state: dict[str, torch.Tensor], *, source: str = "checkpoint") -> bool:
        """Load T5 encoder tensors (``shared.weight``, ``encoder.*``); the tied
        ``encoder.embed_tokens.weight`` may be absent. Any other mismatch is a CheckpointError."""
        own = self.model.state_dict()
        state = dict(state)
        if TIED not in state and "shared.weight" in state:
            state[TIED] = state["shared.weight"]
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
        if missing or unexpected or shapes:
            raise CheckpointError(
                f"{source}: text encoder tensors do not match the T5 in {self.path}: "
                f"missing {missing[:10]}, unexpected {unexpected[:10]}, shapes {shapes[:10]}"
            )
        with torch.no_grad():
            self.model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
        return True
