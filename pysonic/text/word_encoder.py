"""A small text encoder trained here, that needs nothing but its own files (no hub, no tokenizer
package): word tokens plus a numeric channel, so "440 Hz", "A4" and "the note a4" carry their
value, and values between the ones seen in training (held-out pitches, tempos) stay meaningful.

Tokenisation (lower case): numbers (``440``, ``2.5``) become a ``<num>`` token whose numeric
features encode ``log2(value)``; note names (``a4``, ``c#3``, ``bb2``) become ``<note>`` with
the features of their equal-tempered frequency (A4 = 440 Hz); other words are looked up in the
vocabulary (``<unk>`` if absent); ``<eos>`` ends every prompt, so the empty prompt (the
classifier-free-guidance "unconditional" text) is one token.

Optionally (``value_code > 0``) a number's output state also carries a *place code* of its value:
Gaussian bumps over log2(value), added after the last layer through a fixed orthonormal
projection. A generator conditioned on these states can then turn "300 Hz" into a spectral
position with linear maps, and a value between two seen in training gives a code between theirs.
Measured (``tools/oracle_flow_pitch.py``: the default flow model on a phase-free stand-in latent,
8000 steps): asked sines at 150/220/300/440/600 Hz came out at 107/220/294/405/613 Hz with the code
(64 bumps) and at 103/274/278/274/3927 Hz without it. Off in the shipped encoder.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from pysonic.checkpoints import CheckpointError, load_into, read_state_dict
from pysonic.nn.transformer import TransformerEncoderLayer
from pysonic.text.base import TextEncoder

PAD, UNK, NUM, NOTE, EOS = "<pad>", "<unk>", "<num>", "<note>", "<eos>"
SPECIALS = (PAD, UNK, NUM, NOTE, EOS)
_TOKEN = re.compile(r"\b[a-g](?:#|b)?\d\b(?![.\d])|\d+(?:\.\d+)?|[a-z]+|[^\sa-z\d]")
_NOTE = re.compile(r"^([a-g])(#|b)?(\d)$")
_SEMITONE = {"c": 0, "d": 2, "e": 4, "f": 5, "g": 7, "a": 9, "b": 11}
NUM_FREQS = 8  # Fourier features of log2(value) at periods 16, 8, ..., 1/8 octave
_VALUE_CODE_SEED = 20261122  # the fixed projection of the value code (stored with the weights)


def note_frequency(name: str) -> float:
    """Equal-tempered frequency of a note name like ``A4``, ``c#3`` or ``Bb2`` (A4 = 440 Hz)."""
    m = _NOTE.match(name.lower())
    if m is None:
        raise ValueError(f"note_frequency: {name!r} is not a note name (letter, optional #/b, octave digit)")
    letter, accidental, octave = m.groups()
    midi = 12 * (int(octave) + 1) + _SEMITONE[letter] + {"#": 1, "b": -1, None: 0}[accidental]
    return 440.0 * 2.0 ** ((midi - 69) / 12)


def tokenize(text: str) -> list[tuple[str, float | None]]:
    """``text`` -> ``[(token, value or None)]`` (before the vocabulary lookup; no ``<eos>``)."""
    out: list[tuple[str, float | None]] = []
    for tok in _TOKEN.findall(text.lower()):
        if _NOTE.match(tok):
            out.append((NOTE, note_frequency(tok)))
        elif tok[0].isdigit():
            out.append((NUM, float(tok)))
        else:
            out.append((tok, None))
    return out


def numeric_features(values: torch.Tensor) -> torch.Tensor:
    """values [...] (> 0) -> [..., 1 + 2 * NUM_FREQS]: scaled log2 and its sines/cosines."""
    u = torch.log2(values.clamp_min(1e-3))
    freqs = 2.0 ** torch.arange(-4, NUM_FREQS - 4, dtype=u.dtype, device=u.device)
    angles = 2 * math.pi * u[..., None] * freqs
    return torch.cat([u[..., None] / 10, angles.sin(), angles.cos()], dim=-1)


def value_code_features(values: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """values [...] (> 0) -> [..., K]: Gaussian bumps over log2(value), one per centre (log2 Hz,
    evenly spaced), each as wide as the spacing, so a value between two centres lights both."""
    u = torch.log2(values.clamp_min(1e-3))
    width = (centres[-1] - centres[0]) / max(len(centres) - 1, 1)
    return torch.exp(-0.5 * ((u[..., None] - centres) / width) ** 2)


def build_vocab(texts: Iterable[str], *, min_count: int = 1) -> list[str]:
    """The vocabulary of a caption corpus: the special tokens, then words by frequency."""
    counts = Counter(tok for t in texts for tok, value in tokenize(t) if value is None)
    words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    return list(SPECIALS) + words


@dataclass
class WordEncoderConfig:
    vocab: list[str] = field(default_factory=lambda: list(SPECIALS))
    dim: int = 256
    layers: int = 3
    heads: int = 4
    max_tokens: int = 64  # longer prompts are truncated (TangoFlux's T5 uses 64 too)
    dropout: float = 0.0
    value_code: int = 0  # bumps of the value place code (0: off); see the module docstring
    value_code_range: tuple[float, float] = (30.0, 8000.0)  # values of the first and last bump centre
    value_code_scale: float = 3.0  # multiplier of the code (bumps of height 1; the states have rms 1 per channel)

    def __post_init__(self) -> None:
        lo, hi = (float(v) for v in self.value_code_range)
        if self.value_code < 0 or self.value_code == 1:
            raise ValueError(f"WordEncoderConfig: value_code must be 0 (off) or >= 2 bumps, got {self.value_code}")
        if self.value_code > self.dim:
            raise ValueError(f"WordEncoderConfig: value_code {self.value_code} exceeds dim {self.dim} (the projection is orthonormal)")
        if not 0 < lo < hi:
            raise ValueError(f"WordEncoderConfig: value_code_range must be 0 < low < high, got {self.value_code_range}")
        self.value_code_range = (lo, hi)


class WordTextEncoder(TextEncoder):
    """Text -> (states [B, L, dim], mask [B, L] bool), trained from scratch (e.g. jointly with a
    TangoFlux-architecture model on SonicSynth captions)."""

    def __init__(self, config: WordEncoderConfig) -> None:
        super().__init__()
        if list(config.vocab[: len(SPECIALS)]) != list(SPECIALS):
            raise ValueError(f"WordTextEncoder: the vocabulary must start with {SPECIALS}")
        self.config = config
        self.index = {w: i for i, w in enumerate(config.vocab)}
        self.embed = nn.Embedding(len(config.vocab), config.dim)
        self.number = nn.Linear(1 + 2 * NUM_FREQS, config.dim)
        self.position = nn.Embedding(config.max_tokens, config.dim)
        self.layers = nn.ModuleList(TransformerEncoderLayer(config.dim, config.heads, dropout=config.dropout)
                                    for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.dim)
        if config.value_code:
            lo, hi = config.value_code_range
            self.register_buffer("value_centres", torch.linspace(math.log2(lo), math.log2(hi), config.value_code))
            g = torch.Generator().manual_seed(_VALUE_CODE_SEED)
            q, _ = torch.linalg.qr(torch.randn(config.dim, config.value_code, generator=g))
            self.register_buffer("value_projection", q.contiguous())  # [dim, K], orthonormal columns

    @property
    def dim(self) -> int:
        return self.config.dim

    def tokens(self, prompts: list[str], length: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ids [B, L] (long), values [B, L] (1.0 where not numeric), lengths [B]; L is the
        longest prompt, or ``length`` (prompts truncated to it, ``<eos>`` kept last)."""
        limit = min(self.config.max_tokens, length or self.config.max_tokens)
        rows = [tokenize(p)[: limit - 1] + [(EOS, None)] for p in prompts]
        L = length if length is not None else max(len(r) for r in rows)
        if L > self.config.max_tokens:
            raise ValueError(f"WordTextEncoder: length {L} exceeds max_tokens {self.config.max_tokens}")
        ids = torch.zeros(len(rows), L, dtype=torch.long)
        values = torch.ones(len(rows), L)
        for b, row in enumerate(rows):
            for t, (tok, value) in enumerate(row):
                ids[b, t] = self.index.get(tok, self.index[UNK])
                if value is not None:
                    values[b, t] = value
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        return ids, values, lengths

    def _encode(self, prompts: list[str], length: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts: B strings -> states [B, L, dim] (zero at padding), mask [B, L] bool."""
        ids, values, lengths = (t.to(self.device) for t in self.tokens(prompts, length))
        is_num = (ids == self.index[NUM]) | (ids == self.index[NOTE])
        x = self.embed(ids) + is_num[..., None] * self.number(numeric_features(values))
        x = x + self.position(torch.arange(ids.shape[1], device=self.device))
        for layer in self.layers:
            x = layer(x, lengths)
        mask = torch.arange(ids.shape[1], device=self.device)[None] < lengths[:, None]
        out = self.norm(x)
        if self.config.value_code:
            code = value_code_features(values, self.value_centres) @ self.value_projection.T
            out = out + self.config.value_code_scale * is_num[..., None] * code.to(out.dtype)
        return out * mask[..., None], mask

    def forward(self, prompts: list[str], length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode(prompts, length=length)

    # ---- files ------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json`` (with the vocabulary) and ``model.safetensors``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps({"type": "word_text_encoder", **asdict(self.config)}))
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(directory / "model.safetensors"))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "WordTextEncoder":
        directory = Path(directory)
        cfg_file = directory / "config.json"
        if not cfg_file.is_file():
            raise CheckpointError(f"WordTextEncoder: no config.json in {directory}")
        raw = json.loads(cfg_file.read_text())
        if raw.pop("type", None) != "word_text_encoder":
            raise CheckpointError(f"WordTextEncoder: {cfg_file} is not a word_text_encoder config")
        model = cls(WordEncoderConfig(**raw))
        load_into(model, read_state_dict(directory / "model.safetensors"), source=str(directory))
        return model.eval()
