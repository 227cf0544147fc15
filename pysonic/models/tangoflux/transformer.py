"""The Flux transformer of TangoFlux (diffusers ``FluxTransformer2DModel`` as TangoFlux builds it),
on pysonic's fused attention and rotary ops.

Audio latents [B, Ta, 64] and text states [B, Tt, 1024] (T5 states followed by the duration
token) are embedded to the model width, go through N double-stream blocks (separate weights,
joint attention) and M single-stream blocks (one concatenated sequence), and the audio part is
projected back to the latent width: the flow-matching velocity.

Conditioning vector (adaLN): ``MLP(timestep_features(1000 * t)) + MLP(pooled)`` (TangoFlux
builds the transformer with ``guidance_embeds=False``; a guidance MLP is supported for other
Flux configurations). Rotary positions: TangoFlux gives the audio tokens ids ``arange(Ta)`` on all
three rope axes and the text tokens ids 0, which are the defaults here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from pysonic.checkpoints import CheckpointError, load_into, read_state_dict
from pysonic.nn.dit import SingleStreamBlock
from pysonic.nn.embeddings import TimestepMLP, rotary_tables, timestep_features
from pysonic.nn.mmdit import DoubleStreamBlock
from pysonic.nn.modulation import AdaLNContinuous

TIME_FEATURES = 256  # Flux's time_proj width (Timesteps(num_channels=256))


@dataclass(frozen=True)
class FluxTransformerConfig:
    """Defaults: the released TangoFlux transformer (tangoflux/model.py + the released config.json)."""

    in_channels: int = 64  # VAE (Oobleck) latent width
    out_channels: int | None = None  # None: in_channels
    num_layers: int = 6  # double-stream blocks
    num_single_layers: int = 18  # single-stream blocks
    attention_head_dim: int = 128
    num_attention_heads: int = 8  # model width 8 * 128 = 1024
    joint_attention_dim: int = 1024  # flan-t5-large d_model
    pooled_projection_dim: int = 1024  # TangoFlux passes the text encoder's d_model
    guidance_embeds: bool = False  # TangoFlux: False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)  # diffusers' default, sums to the head dim
    rope_theta: float = 10000.0  # FluxPosEmbed(theta=10000)
    mlp_ratio: float = 4.0

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


class FluxTransformer(nn.Module):
    """Flux velocity transformer.

    Args:
        config: a :class:`FluxTransformerConfig` (default: the released TangoFlux one).
    """

    def __init__(self, config: FluxTransformerConfig | None = None):
        super().__init__()
        cfg = config or FluxTransformerConfig()
        if sum(cfg.axes_dims_rope) > cfg.attention_head_dim:
            raise ValueError(
                f"FluxTransformer: axes_dims_rope {cfg.axes_dims_rope} sum to more than the head dim {cfg.attention_head_dim}"
            )
        self.config = cfg
        dim = cfg.dim
        self.out_channels = cfg.out_channels or cfg.in_channels
        self.x_embedder = nn.Linear(cfg.in_channels, dim)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, dim)
        self.time_embed = TimestepMLP(TIME_FEATURES, dim)
        self.guidance_embed = TimestepMLP(TIME_FEATURES, dim) if cfg.guidance_embeds else None
        self.pooled_embed = TimestepMLP(cfg.pooled_projection_dim, dim)
        heads = cfg.num_attention_heads
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(dim, heads, mlp_ratio=cfg.mlp_ratio) for _ in range(cfg.num_layers)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(dim, heads, mlp_ratio=cfg.mlp_ratio) for _ in range(cfg.num_single_layers)
        )
        self.norm_out = AdaLNContinuous(dim)
        self.proj_out = nn.Linear(dim, self.out_channels)

    # ------------------------------------------------------------------ inputs
    def _check(self, latents, text, pooled, timestep, guidance):
        cfg = self.config
        for name, t, dim in (("latents", latents, 3), ("text", text, 3), ("pooled", pooled, 2)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"FluxTransformer: {name} must be a tensor, got {type(t).__name__}")
            if t.dim() != dim or not t.is_floating_point():
                raise ValueError(f"FluxTransformer: {name} must be a {dim}-D float tensor, got shape {tuple(t.shape)} {t.dtype}")
        B = latents.shape[0]
        if latents.shape[2] != cfg.in_channels:
            raise ValueError(f"FluxTransformer: latents must be [B, Ta, {cfg.in_channels}], got {tuple(latents.shape)}")
        if text.shape[0] != B or text.shape[2] != cfg.joint_attention_dim:
            raise ValueError(
                f"FluxTransformer: text must be [B={B}, Tt, {cfg.joint_attention_dim}], got {tuple(text.shape)}"
            )
        if pooled.shape != (B, cfg.pooled_projection_dim):
            raise ValueError(
                f"FluxTransformer: pooled must be [B={B}, {cfg.pooled_projection_dim}], got {tuple(pooled.shape)}"
            )
        out = []
        for name, t in (("timestep", timestep), ("guidance", guidance)):
            if t is None:
                out.append(None)
                continue
            t = torch.as_tensor(t, device=latents.device)
            if t.dim() == 0:
                t = t[None]
            if t.dim() != 1 or t.shape[0] not in (1, B):
                raise ValueError(f"FluxTransformer: {name} must be a scalar, [1] or [B={B}], got shape {tuple(t.shape)}")
            out.append(t.expand(B))
        if guidance is None and self.guidance_embed is not None:
            raise ValueError("FluxTransformer: this config has guidance_embeds=True, pass guidance=")
        if guidance is not None and self.guidance_embed is None:
            raise ValueError("FluxTransformer: guidance= given but this config has guidance_embeds=False")
        return out

    def _ids(self, name, ids, T, device, default):
        n_axes = len(self.config.axes_dims_rope)
        if ids is None:
            return default
        ids = torch.as_tensor(ids, device=device)
        if ids.dim() == 3:  # diffusers' deprecated batched ids [B, T, n_axes]: it reads item 0
            ids = ids[0]
        if ids.dim() == 1:
            ids = ids[:, None].expand(-1, n_axes)
        if ids.shape != (T, n_axes):
            raise ValueError(f"FluxTransformer: {name} must be [{T}] or [{T}, {n_axes}], got {tuple(ids.shape)}")
        return ids

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        latents: torch.Tensor,
        text: torch.Tensor,
        pooled: torch.Tensor,
        timestep,
        *,
        audio_ids: torch.Tensor | None = None,
        text_ids: torch.Tensor | None = None,
        guidance=None,
        backend: str = "auto",
    ) -> torch.Tensor:
        """Velocity of the audio latents.

        Args:
            latents: [B, Ta, in_channels] noisy audio latents.
            text: [B, Tt, joint_attention_dim] text-encoder states (TangoFlux appends its duration
                token here).
            pooled: [B, pooled_projection_dim] pooled text projection (TangoFlux: ``fc(mean(T5))``).
            timestep: scalar, [1] or [B], in [0, 1] (sigma; scaled by 1000 inside, like diffusers).
            audio_ids: [Ta] or [Ta, 3] rope position ids; default ``arange(Ta)`` on every axis.
            text_ids: [Tt] or [Tt, 3]; default zeros (TangoFlux).
            guidance: guidance scale for guidance-distilled configs (None for TangoFlux).
            backend: backend of the attention and rotary ops.

        Returns:
            [B, Ta, out_channels].
        """
        timestep, guidance = self._check(latents, text, pooled, timestep, guidance)
        B, Ta, _ = latents.shape
        Tt = text.shape[1]
        n_axes = len(self.config.axes_dims_rope)
        dev = latents.device
        audio_ids = self._ids("audio_ids", audio_ids, Ta, dev, torch.arange(Ta, device=dev)[:, None].expand(-1, n_axes))
        text_ids = self._ids("text_ids", text_ids, Tt, dev, torch.zeros(Tt, n_axes, device=dev))

        x = self.x_embedder(latents)
        # diffusers casts the timestep to the embedded latents' dtype before scaling by 1000
        c = self.time_embed(timestep_features(timestep.to(x.dtype) * 1000, TIME_FEATURES).to(pooled.dtype))
        if guidance is not None:
            c = c + self.guidance_embed(timestep_features(guidance.to(x.dtype) * 1000, TIME_FEATURES).to(pooled.dtype))
        c = c + self.pooled_embed(pooled)
        ctx = self.context_embedder(text)
        rope = rotary_tables(
            torch.cat([text_ids, audio_ids], dim=0), self.config.axes_dims_rope, theta=self.config.rope_theta
        )

        for block in self.double_blocks:
            x, ctx = block(x, ctx, c, rope, backend=backend)
        h = torch.cat([ctx, x], dim=1)
        for block in self.single_blocks:
            h = block(h, c, rope, backend=backend)
        x = h[:, Tt:]
        return self.proj_out(self.norm_out(x, c))

    # ------------------------------------------------------------------ checkpoints
    def _diffusers_sources(self) -> dict[str, list[str]]:
        """Our state-dict key -> the diffusers ``FluxTransformer2DModel`` keys it is made of
        (several keys: concatenated along the output dimension)."""
        m: dict[str, list[str]] = {}

        def lin(ours, theirs, kinds=("weight", "bias")):
            for k in kinds:
                srcs = [theirs] if isinstance(theirs, str) else theirs
                m[f"{ours}.{k}"] = [f"{s}.{k}" for s in srcs]

        lin("x_embedder", "x_embedder")
        lin("context_embedder", "context_embedder")
        lin("time_embed.fc1", "time_text_embed.timestep_embedder.linear_1")
        lin("time_embed.fc2", "time_text_embed.timestep_embedder.linear_2")
        lin("pooled_embed.fc1", "time_text_embed.text_embedder.linear_1")
        lin("pooled_embed.fc2", "time_text_embed.text_embedder.linear_2")
        if self.guidance_embed is not None:
            lin("guidance_embed.fc1", "time_text_embed.guidance_embedder.linear_1")
            lin("guidance_embed.fc2", "time_text_embed.guidance_embedder.linear_2")
        for i in range(len(self.double_blocks)):
            o, t = f"double_blocks.{i}", f"transformer_blocks.{i}"
            for s, norm, qkv, qn, kn, out, ff in (
                ("audio", "norm1", ("to_q", "to_k", "to_v"), "norm_q", "norm_k", "to_out.0", "ff"),
                ("text", "norm1_context", ("add_q_proj", "add_k_proj", "add_v_proj"), "norm_added_q", "norm_added_k", "to_add_out", "ff_context"),
            ):
                lin(f"{o}.{s}.mod.linear", f"{t}.{norm}.linear")
                lin(f"{o}.{s}.qkv", [f"{t}.attn.{p}" for p in qkv])
                lin(f"{o}.{s}.q_norm", f"{t}.attn.{qn}", ("weight",))
                lin(f"{o}.{s}.k_norm", f"{t}.attn.{kn}", ("weight",))
                lin(f"{o}.{s}.out", f"{t}.attn.{out}")
                lin(f"{o}.{s}.mlp.fc1", f"{t}.{ff}.net.0.proj")
                lin(f"{o}.{s}.mlp.fc2", f"{t}.{ff}.net.2")
        for i in range(len(self.single_blocks)):
            o, t = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
            lin(f"{o}.mod.linear", f"{t}.norm.linear")
            lin(f"{o}.qkv_mlp", [f"{t}.attn.to_q", f"{t}.attn.to_k", f"{t}.attn.to_v", f"{t}.proj_mlp"])
            lin(f"{o}.q_norm", f"{t}.attn.norm_q", ("weight",))
            lin(f"{o}.k_norm", f"{t}.attn.norm_k", ("weight",))
            lin(f"{o}.proj_out", f"{t}.proj_out")
        lin("norm_out.linear", "norm_out.linear")
        lin("proj_out", "proj_out")
        return m

    def load_diffusers_state_dict(
        self, state: Mapping[str, torch.Tensor] | str | Path, *, prefix: str = "", source: str | None = None
    ) -> None:
        """Load diffusers ``FluxTransformer2DModel`` weights (a state dict or a file path).

        Args:
            state: the state dict, or a path read with ``pysonic.checkpoints.read_state_dict``
                (``diffusion_pytorch_model.safetensors``, or TangoFlux's full checkpoint with
                ``prefix="transformer."``).
            prefix: only keys starting with it are read, with it stripped (others are ignored).
            source: name used in error messages.

        Raises:
            CheckpointError: naming every missing, unexpected or wrongly shaped tensor.
        """
        if isinstance(state, (str, Path)):
            source = source or str(state)
            state = read_state_dict(state)
        source = source or "diffusers FluxTransformer2DModel state dict"
        if prefix:
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        converted, used, missing, shapes = {}, set(), [], []
        for ours, srcs in self._diffusers_sources().items():
            absent = [s for s in srcs if s not in state]
            if absent:
                missing.extend(absent)
                continue
            used.update(srcs)
            parts = [state[s] for s in srcs]
            if len(parts) > 1 and len({tuple(p.shape[1:]) for p in parts}) > 1:
                shapes.append(", ".join(f"{s}: {tuple(p.shape)}" for s, p in zip(srcs, parts)))
                continue
            converted[ours] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        unexpected = sorted(set(state) - used)
        if missing or unexpected or shapes:
            problems = []
            if shapes:
                problems.append(f"tensors that cannot be concatenated: {shapes[:5]}")
            if missing:
                problems.append(f"missing tensors: {missing[:20]}{' ...' if len(missing) > 20 else ''}")
            if unexpected:
                problems.append(f"unexpected tensors: {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}")
            raise CheckpointError(f"{source} does not match FluxTransformer: " + "; ".join(problems))
        load_into(self, converted, source=source)
