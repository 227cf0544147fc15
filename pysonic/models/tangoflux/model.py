"""TangoFlux's velocity model: the part whose weights live in the release's ``tangoflux.safetensors``.

What it adds around the :class:`FluxTransformer` (``tangoflux/model.py`` of the release):

- ``text_proj``: ``relu(Linear(text_dim, joint_attention_dim))`` of the masked mean of the text
  states (the release's ``fc`` on ``nanmean`` of the T5 states with padding set to NaN); it is the
  transformer's pooled projection.
- ``duration_embed``: the duration in seconds, clamped to ``[0, max_duration]`` and divided by
  ``max_duration``, through Stable Audio's random-Fourier features ``[t, sin(2 pi t w), cos(2 pi t w)]``
  (``w``: 128 learned frequencies) and a Linear to ``text_dim``; it is appended to the text sequence
  as one extra token (the release's ``DurationEmbedder``).
- no attention mask reaches the transformer (padding tokens of the text are attended, as released).

The text encoder is not part of this module (``pysonic.text``): ``velocity`` takes its states.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from pysonic.checkpoints import CheckpointError, load_into, read_state_dict
from pysonic.models.tangoflux.transformer import FluxTransformer, FluxTransformerConfig

# Entries of the release's config.json that only matter to other parts (read and kept, not used here).
_TEXT_ENCODER_KEY = "text_encoder_name"
# Key prefixes of tangoflux.safetensors that belong to other modules: the frozen T5 encoder saved
# with the model (loaded by the pipeline into the text encoder), and the DPO reference copy.
FOREIGN_PREFIXES = ("text_encoder.", "ref_transformer.")


@dataclass(frozen=True)
class TangoFluxConfig:
    """Defaults: the released model (``TangoFlux.__init__`` defaults = the release's config.json)."""

    num_layers: int = 6  # double-stream blocks
    num_single_layers: int = 18  # single-stream blocks
    in_channels: int = 64  # Oobleck latent width
    attention_head_dim: int = 128
    num_attention_heads: int = 8
    joint_attention_dim: int = 1024  # = the text encoder's width (flan-t5-large d_model): the
    # release feeds T5 states straight into the transformer's context embedder and sizes the
    # pooled projection and the duration token by d_model, so the two must agree
    audio_seq_len: int = 645  # latent frames generated (30 s at 44.1 kHz / 2048)
    max_duration: float = 30.0  # seconds; durations are clamped to [0, max_duration]
    uncondition: bool = False  # training only: drop 10% of the text (CFG training)
    text_encoder_name: str = "google/flan-t5-large"  # which text encoder the weights expect
    duration_features: int = 256  # DurationEmbedder internal_dim (release default)
    axes_dims_rope: tuple[int, ...] | None = None  # rotary dims per position axis (sum <= head dim);
    # None: the transformer's default (16, 56, 56), which needs attention_head_dim >= 128
    text_pooling: str = "mean"  # the pooled text for adaLN: "mean" (the release) or "attention"
    # (softmax weights from one learned query, zero at init = the mean): lets the global
    # conditioning single out a token, e.g. the number of "a sine at 440 Hz"

    @property
    def text_dim(self) -> int:
        return self.joint_attention_dim

    def transformer_config(self) -> FluxTransformerConfig:
        return FluxTransformerConfig(
            in_channels=self.in_channels,
            num_layers=self.num_layers,
            num_single_layers=self.num_single_layers,
            attention_head_dim=self.attention_head_dim,
            num_attention_heads=self.num_attention_heads,
            joint_attention_dim=self.joint_attention_dim,
            pooled_projection_dim=self.text_dim,
            guidance_embeds=False,
            **({} if self.axes_dims_rope is None else {"axes_dims_rope": tuple(self.axes_dims_rope)}),
        )

    @classmethod
    def from_config_dict(cls, d: Mapping) -> "TangoFluxConfig":
        """From the release's ``config.json`` (or the ``model`` section of its training YAML).

        Entries this model does not know are reported with a warning (the release ignores them).
        """
        if not isinstance(d, Mapping):
            raise TypeError(f"TangoFluxConfig.from_config_dict: expected a dict, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(k for k in d if k not in names and not str(k).startswith("_"))
        if unknown:
            warnings.warn(f"TangoFluxConfig: ignoring unknown config entries {unknown}", stacklevel=2)
        kw = {k: d[k] for k in names if k in d}
        for k in ("num_layers", "num_single_layers", "in_channels", "attention_head_dim",
                  "num_attention_heads", "joint_attention_dim", "audio_seq_len", "duration_features"):
            if k in kw:
                v = kw[k]
                if isinstance(v, bool) or not isinstance(v, int) or v < (0 if "layers" in k else 1):
                    raise ValueError(f"TangoFluxConfig: {k} must be a positive integer, got {v!r}")
        if kw.get("text_pooling", "mean") not in ("mean", "attention"):
            raise ValueError(f"TangoFluxConfig: text_pooling must be 'mean' or 'attention', got {kw['text_pooling']!r}")
        if kw.get("axes_dims_rope") is not None:
            v = kw["axes_dims_rope"]
            if (not isinstance(v, (list, tuple)) or not v
                    or not all(isinstance(a, int) and not isinstance(a, bool) and a > 0 and a % 2 == 0 for a in v)):
                raise ValueError(f"TangoFluxConfig: axes_dims_rope must be a non-empty list of positive even ints, got {v!r}")
            kw["axes_dims_rope"] = tuple(v)
        if "max_duration" in kw:
            v = kw["max_duration"]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"TangoFluxConfig: max_duration must be a positive number, got {v!r}")
            kw["max_duration"] = float(v)
        return cls(**kw)


class DurationEmbedding(nn.Module):
    """Seconds -> one text-width token (the release's ``DurationEmbedder``, Stable Audio's
    ``NumberConditioner``): clamp to [0, max], scale to [0, 1], random-Fourier features
    ``[t, sin(2 pi t w), cos(2 pi t w)]`` with learned ``w`` [features / 2], then a Linear.

    Args:
        dim: output width (the text width).
        max_value: the clamp's upper bound (``max_duration``); the lower bound is 0.
        features: Fourier width (even); the Linear reads ``features + 1`` values.
    """

    def __init__(self, dim: int, max_value: float, features: int = 256):
        super().__init__()
        if features % 2:
            raise ValueError(f"DurationEmbedding: features must be even, got {features}")
        self.max_value = float(max_value)
        self.freqs = nn.Parameter(torch.randn(features // 2))  # StableAudioPositionalEmbedding.weights
        self.proj = nn.Linear(features + 1, dim)

    def forward(self, seconds: torch.Tensor) -> torch.Tensor:
        """seconds: [B] -> [B, 1, dim]."""
        t = seconds.float().clamp(0, self.max_value) / self.max_value  # min_value = 0
        t = t.to(self.freqs.dtype)[:, None]
        angles = t * self.freqs[None] * 2 * math.pi
        feats = torch.cat([t, angles.sin(), angles.cos()], dim=-1)
        return self.proj(feats)[:, None, :]


class TangoFluxModel(nn.Module):
    """Text projection + duration embedding + Flux transformer: the flow velocity of TangoFlux.

    Args:
        config: a :class:`TangoFluxConfig` (default: the released model).
    """

    def __init__(self, config: TangoFluxConfig | None = None):
        super().__init__()
        self.config = cfg = config or TangoFluxConfig()
        self.text_proj = nn.Linear(cfg.text_dim, cfg.joint_attention_dim)  # release: fc.0 (+ ReLU)
        self.duration_embed = DurationEmbedding(cfg.text_dim, cfg.max_duration, cfg.duration_features)
        self.transformer = FluxTransformer(cfg.transformer_config())
        if cfg.text_pooling not in ("mean", "attention"):
            raise ValueError(f"TangoFluxModel: text_pooling must be 'mean' or 'attention', got {cfg.text_pooling!r}")
        if cfg.text_pooling == "attention":
            self.pool_query = nn.Parameter(torch.zeros(cfg.text_dim))

    # ------------------------------------------------------------------ conditioning
    def pooled_text(self, text_states: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """``relu(text_proj(mean of the unmasked states))``: [B, L, D], [B, L] -> [B, D]; with
        ``text_pooling="attention"`` a softmax-weighted mean (scores: states . pool_query / sqrt(D))."""
        if self.config.text_pooling == "attention":
            scores = (text_states.float() @ self.pool_query.float()) / text_states.shape[-1] ** 0.5
            weights = torch.softmax(scores.masked_fill(~text_mask, float("-inf")), dim=1)
            pooled = (weights[..., None] * text_states.float()).sum(1)
            return torch.relu(self.text_proj(pooled.to(self.text_proj.weight.dtype)))
        m = text_mask.to(text_states.dtype)[..., None]
        count = m.sum(1)
        mean = (text_states * m).sum(1) / count  # the release's nanmean with padding set to NaN
        return torch.relu(self.text_proj(mean.to(self.text_proj.weight.dtype)))

    def context(self, text_states: torch.Tensor, duration: torch.Tensor) -> torch.Tensor:
        """Text states with the duration token appended: [B, L, D], [B] -> [B, L + 1, D]."""
        dur = self.duration_embed(duration)
        return torch.cat([text_states, dur.to(text_states.dtype)], dim=1)

    # ------------------------------------------------------------------ forward
    def _check(self, latents, sigma, text_states, text_mask, duration):
        cfg = self.config
        for name, t in (("latents", latents), ("text_states", text_states), ("text_mask", text_mask)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"TangoFluxModel.velocity: {name} must be a tensor, got {type(t).__name__}")
        if latents.dim() != 3 or latents.shape[2] != cfg.in_channels or not latents.is_floating_point():
            raise ValueError(
                f"TangoFluxModel.velocity: latents must be a float [B, T, {cfg.in_channels}] tensor, got "
                f"{tuple(latents.shape)} {latents.dtype}"
            )
        B = latents.shape[0]
        if B == 0 or latents.shape[1] == 0:
            raise ValueError(f"TangoFluxModel.velocity: latents is empty, shape {tuple(latents.shape)}")
        if text_states.dim() != 3 or text_states.shape[0] != B or text_states.shape[2] != cfg.text_dim:
            raise ValueError(
                f"TangoFluxModel.velocity: text_states must be [B={B}, L, {cfg.text_dim}], got {tuple(text_states.shape)}"
            )
        if not text_states.is_floating_point():
            raise ValueError(f"TangoFluxModel.velocity: text_states must be floating point, got {text_states.dtype}")
        if text_mask.shape != text_states.shape[:2]:
            raise ValueError(
                f"TangoFluxModel.velocity: text_mask must be [B, L] = {list(text_states.shape[:2])}, got {tuple(text_mask.shape)}"
            )
        if text_mask.dtype != torch.bool:
            raise ValueError(f"TangoFluxModel.velocity: text_mask must be bool, got {text_mask.dtype}")
        if not bool(text_mask.any(1).all()):
            raise ValueError("TangoFluxModel.velocity: text_mask has a row with no valid token")
        sigma = torch.as_tensor(sigma, device=latents.device)
        if sigma.dim() == 0:
            sigma = sigma[None]
        if sigma.dim() != 1 or sigma.shape[0] not in (1, B) or not sigma.is_floating_point():
            raise ValueError(f"TangoFluxModel.velocity: sigma must be a float scalar, [1] or [B={B}], got {tuple(sigma.shape)} {sigma.dtype}")
        duration = torch.as_tensor(duration, device=latents.device)
        if duration.dim() == 0:
            duration = duration[None]
        if duration.dim() != 1 or duration.shape[0] not in (1, B):
            raise ValueError(f"TangoFluxModel.velocity: duration must be a scalar, [1] or [B={B}], got shape {tuple(duration.shape)}")
        return sigma.expand(B), duration.expand(B)

    def velocity(
        self,
        latents: torch.Tensor,
        sigma,
        text_states: torch.Tensor,
        text_mask: torch.Tensor,
        duration,
        *,
        backend: str = "auto",
    ) -> torch.Tensor:
        """Flow-matching velocity ``d latents / d sigma`` (target ``noise - data``).

        Args:
            latents: [B, T, in_channels] noisy latents ``(1 - sigma) * data + sigma * noise``.
            sigma: float scalar, [1] or [B], in [0, 1] (1 = pure noise). The release feeds
                ``timestep / 1000`` with ``timestep = 1000 * sigma`` in float32.
            text_states: [B, L, text_dim] text-encoder states (padding positions included: the
                transformer attends to them, as released).
            text_mask: [B, L] bool, True for real tokens; used only for the pooled projection.
            duration: seconds, scalar, [1] or [B].
            backend: backend of the attention and rotary ops.

        Returns:
            [B, T, in_channels], in the transformer's output dtype.
        """
        sigma, duration = self._check(latents, sigma, text_states, text_mask, duration)
        dtype = self.text_proj.weight.dtype  # inputs in the weights' dtype (autocast may lower it further)
        latents, text_states = latents.to(dtype), text_states.to(dtype)
        pooled = self.pooled_text(text_states, text_mask)
        ctx = self.context(text_states, duration)
        return self.transformer(latents, ctx, pooled, sigma, backend=backend)

    forward = velocity

    # ------------------------------------------------------------------ checkpoints
    def _release_sources(self) -> dict[str, str]:
        """Our non-transformer keys -> the release's key names."""
        return {
            "text_proj.weight": "fc.0.weight",
            "text_proj.bias": "fc.0.bias",
            "duration_embed.freqs": "duration_emebdder.time_positional_embedding.0.weights",
            "duration_embed.proj.weight": "duration_emebdder.time_positional_embedding.1.weight",
            "duration_embed.proj.bias": "duration_emebdder.time_positional_embedding.1.bias",
        }

    def load_release_state_dict(
        self, state: Mapping[str, torch.Tensor] | str | Path, *, source: str | None = None
    ) -> None:
        """Load the release's ``tangoflux.safetensors`` (the package's ``TangoFlux.state_dict()``).

        Keys under ``text_encoder.`` (the frozen T5 saved with the model) and ``ref_transformer.``
        (the DPO reference copy) belong to other modules and are skipped here. Every other key
        must match: a missing, unexpected or wrongly shaped tensor is a ``CheckpointError`` naming it.
        """
        if isinstance(state, (str, Path)):
            source = source or str(state)
            state = read_state_dict(state)
        source = source or "TangoFlux state dict"
        state = {k: v for k, v in state.items() if not k.startswith(FOREIGN_PREFIXES)}
        mapping = self._release_sources()
        missing = [v for v in mapping.values() if v not in state]
        unexpected = sorted(k for k in state if k not in mapping.values() and not k.startswith("transformer."))
        if missing or unexpected:
            problems = []
            if missing:
                problems.append(f"missing tensors: {missing}")
            if unexpected:
                problems.append(f"unexpected tensors: {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}")
            raise CheckpointError(f"{source} does not match TangoFluxModel: " + "; ".join(problems))
        own = {ours: state[theirs] for ours, theirs in mapping.items()}
        mine = self.state_dict()
        shapes = [f"{theirs}: checkpoint {tuple(state[theirs].shape)} vs model {tuple(mine[ours].shape)}"
                  for ours, theirs in mapping.items() if state[theirs].shape != mine[ours].shape]
        if shapes:
            raise CheckpointError(f"{source} does not match TangoFluxModel: shape mismatches: {shapes}")
        try:
            self.transformer.load_diffusers_state_dict(state, prefix="transformer.", source=source)
        except CheckpointError as exc:
            raise CheckpointError(f"{exc} (names relative to the prefix 'transformer.')") from exc
        # load_into checks shapes and names; the transformer's keys were loaded just above.
        trans = {f"transformer.{k}": v for k, v in self.transformer.state_dict().items()}
        load_into(self, {**own, **trans}, source=source)

    def release_state_dict(self) -> dict[str, torch.Tensor]:
        """The inverse of :meth:`load_release_state_dict` for this module's tensors (no text
        encoder): our weights under the release's key names, diffusers names for the transformer."""
        out = {theirs: self.state_dict()[ours] for ours, theirs in self._release_sources().items()}
        trans = self.transformer.state_dict()
        for ours, srcs in self.transformer._diffusers_sources().items():
            w = trans[ours]
            if len(srcs) == 1:
                out[f"transformer.{srcs[0]}"] = w
                continue
            # concatenated along dim 0 from pieces of equal-or-known size: q, k, v are dim each
            dim = self.transformer.config.dim
            sizes = [dim] * (len(srcs) - 1)
            sizes.append(w.shape[0] - sum(sizes))
            for name, piece in zip(srcs, torch.split(w, sizes, dim=0)):
                out[f"transformer.{name}"] = piece.contiguous()
        return out

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        config: TangoFluxConfig | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> "TangoFluxModel":
        """Load from a release directory (``config.json`` + ``tangoflux.safetensors``) or a
        ``tangoflux.safetensors`` file (then ``config`` or the default config). Local files only."""
        import json

        path = Path(path)
        if path.is_dir():
            cfg_file, weights = path / "config.json", path / "tangoflux.safetensors"
            if config is None:
                if not cfg_file.is_file():
                    raise CheckpointError(f"TangoFluxModel: config.json not found in {path} (looked for {cfg_file})")
                config = TangoFluxConfig.from_config_dict(json.loads(cfg_file.read_text()))
        else:
            weights = path
        if not weights.is_file():
            raise CheckpointError(f"TangoFluxModel: weights not found: looked for {weights}")
        model = cls(config)
        model.load_release_state_dict(weights)
        return model.to(device=device, dtype=dtype).eval()
