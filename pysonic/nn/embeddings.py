"""Timestep and position embeddings for diffusion transformers (Flux / TangoFlux conventions).

``timestep_features`` is the sinusoidal feature of a (scaled) timestep, ``TimestepMLP`` the
two-layer MLP on top of it, and ``rotary_tables`` the per-position cos/sin tables that
``pysonic.ops.rotary`` consumes (multi-axis RoPE as in Flux: each axis owns a slice of the
rotated channels).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
import torch.nn.functional as F


def timestep_features(t: torch.Tensor, dim: int = 256, *, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features ``[cos(t f_i), sin(t f_i)]`` with ``f_i = max_period^(-i / (dim/2))``.

    This is diffusers' ``get_timestep_embedding(t, dim, flip_sin_to_cos=True,
    downscale_freq_shift=0)`` (Flux's ``time_proj``): cosines first, then sines, in fp32.

    Args:
        t: [B] timesteps (any real dtype; Flux feeds ``sigma * 1000``).
        dim: feature width (even).

    Returns:
        [B, dim] float32.
    """
    if t.dim() != 1:
        raise ValueError(f"timestep_features: t must have shape [B], got {tuple(t.shape)}")
    if dim % 2:
        raise ValueError(f"timestep_features: dim must be even, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepMLP(nn.Module):
    """``fc2(silu(fc1(x)))``: diffusers' ``TimestepEmbedding`` and ``PixArtAlphaTextProjection``
    (with SiLU) in Flux's ``time_text_embed`` are both this shape.

    Args:
        in_dim: input width (256 for timestep features, the pooled text width for the pooled embedder).
        dim: hidden and output width (the transformer width).
    """

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)))


def rotary_tables(
    positions: torch.Tensor,
    axes_dim: Sequence[int],
    *,
    theta: float = 10000.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cos/sin tables of multi-axis RoPE for ``pysonic.ops.rotary(..., interleaved=True)``.

    Axis ``a`` (width ``d_a``, even) rotates ``d_a / 2`` channel pairs with angles
    ``pos[t, a] * theta^(-2i / d_a)``; the tables of all axes are concatenated along the pair
    dimension, as in Flux's ``FluxPosEmbed`` (computed in float64, then cast to float32, like
    diffusers on CPU/CUDA). Flux pairs channels (2i, 2i+1) (``repeat_interleave_real=True``), so
    these tables go with ``interleaved=True``.

    Args:
        positions: [T, n_axes] position ids, or [T] (the same position on every axis, as
            TangoFlux builds its 1-D audio and text ids).
        axes_dim: width of each axis, summing to the rotated head width R.

    Returns:
        (cos, sin), each [T, R/2] float32.
    """
    axes_dim = [int(d) for d in axes_dim]
    if any(d <= 0 or d % 2 for d in axes_dim):
        raise ValueError(f"rotary_tables: every axis width must be positive and even, got {axes_dim}")
    if positions.dim() == 1:
        positions = positions[:, None].expand(-1, len(axes_dim))
    if positions.dim() != 2 or positions.shape[1] != len(axes_dim):
        raise ValueError(
            f"rotary_tables: positions must have shape [T] or [T, {len(axes_dim)}] (one column per axis), "
            f"got {tuple(positions.shape)}"
        )
    fdtype = torch.float32 if positions.device.type == "mps" else torch.float64
    pos = positions.float().to(fdtype)  # ids -> float32 first, as diffusers does
    angles = []
    for a, d in enumerate(axes_dim):
        freqs = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=fdtype, device=pos.device) / d))
        angles.append(pos[:, a, None] * freqs[None, :])
    angles = torch.cat(angles, dim=-1)
    return angles.cos().float(), angles.sin().float()
