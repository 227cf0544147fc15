"""The text-encoder interface the generation models are written against.

A text encoder turns prompts into a padded sequence of states and a mask of the real tokens. Models
(e.g. TangoFlux) only see these tensors, so any encoder of the right width plugs in: FLAN-T5
through ``transformers`` (:class:`pysonic.text.T5TextEncoder`), or an offline one.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class TextEncoder(nn.Module):
    """Base class: subclasses set ``dim`` and implement :meth:`_encode`.

    ``encode`` checks the prompts, then calls ``_encode``; ``device`` is where the states come out;
    ``to(...)`` is ``nn.Module.to``.
    """

    dim: int  # width of the states

    def encode(self, prompts: str | Sequence[str], *, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode prompts.

        Args:
            prompts: a string or a list of strings (the empty string is a valid prompt: the
                unconditional input of classifier-free guidance).
            length: None pads the batch to its longest prompt (truncated at the encoder's
                maximum); an int pads or truncates every prompt to exactly that many tokens.

        Returns:
            ``(states [B, L, dim], mask [B, L] bool)``, mask True on real tokens (at least one
            per prompt), states on :attr:`device`.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, Sequence) or isinstance(prompts, (bytes, bytearray)):
            raise TypeError(f"{type(self).__name__}.encode: prompts must be a string or a list of strings, got {type(prompts).__name__}")
        prompts = list(prompts)
        if not prompts:
            raise ValueError(f"{type(self).__name__}.encode: prompts is an empty list")
        bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
        if bad:
            raise TypeError(f"{type(self).__name__}.encode: every prompt must be a string, got {bad[:3]}")
        if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 1):
            raise ValueError(f"{type(self).__name__}.encode: length must be a positive int or None, got {length!r}")
        return self._encode(prompts, length)

    def _encode(self, prompts: list[str], length: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement _encode (prompts, length) -> (states, mask)")

    @property
    def device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    def load_release_weights(self, state: dict[str, torch.Tensor], *, source: str = "checkpoint") -> bool:
        """Take this encoder's weights from a model checkpoint that saved them (the TangoFlux
        release keeps its T5 inside ``tangoflux.safetensors`` under ``text_encoder.``).

        Args:
            state: the encoder's tensors, prefix already stripped.

        Returns:
            True if loaded; the base class loads nothing and returns False.
        """
        return False
