"""A plain pre-norm transformer encoder on ``pysonic.ops.attention`` (padding via key lengths).

Used by small encoders (e.g. the offline text encoder); the Flux blocks live in ``dit.py`` and
``mmdit.py``.
"""
from __future__ import annotations

import torch
from torch import nn

from pysonic import ops


class SelfAttention(nn.Module):
    """Multi-head self-attention; keys past ``lengths[b]`` are masked out.

    Args:
        dim: model width; heads: number of heads (``dim % heads == 0``).
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"SelfAttention: dim {dim} is not a multiple of heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, T, dim]; lengths: [B] valid tokens per row (None: all). Returns [B, T, dim]."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        o = ops.attention(q, k, v, key_lengths=lengths)
        return self.out(o.transpose(1, 2).reshape(B, T, -1))


class TransformerEncoderLayer(nn.Module):
    """``x + attn(norm(x))`` then ``x + mlp(norm(x))`` (GELU MLP, width ``mlp_ratio * dim``)."""

    def __init__(self, dim: int, heads: int, *, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), lengths))
        return x + self.drop(self.mlp(self.norm2(x)))
