"""Double-stream MM-DiT block (Flux ``FluxTransformerBlock``): audio and text keep separate
weights (modulation, projections, QK norms, MLPs) but attend jointly over the concatenated
sequence ``[text, audio]``, with gated residuals on both streams.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from pysonic.nn.dit import QK_NORM_EPS, rope_attention
from pysonic.nn.modulation import AdaLNZero, modulate


class GeluMLP(nn.Module):
    """``fc2(gelu_tanh(fc1(x)))`` (diffusers ``FeedForward(activation_fn="gelu-approximate")``)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class StreamParams(nn.Module):
    """One stream's weights in a double block: adaLN-Zero (6 vectors), fused qkv, QK norms,
    attention output projection and MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.mod = AdaLNZero(dim, 6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(dim // heads, eps=QK_NORM_EPS)
        self.k_norm = nn.RMSNorm(dim // heads, eps=QK_NORM_EPS)
        self.out = nn.Linear(dim, dim)
        self.mlp = GeluMLP(dim, int(dim * mlp_ratio))


class DoubleStreamBlock(nn.Module):
    """Joint attention of an audio stream and a text stream with separate weights.

    Each stream s: ``x_s += gate1_s * out_s(attn_s)``, then
    ``x_s += gate2_s * mlp_s(modulate(x_s, shift2_s, scale2_s))``; the attention runs over the
    concatenation ``[text, audio]`` (text first, as in Flux), each stream's q/k normalised with
    its own RMSNorms before rotary.

    Args:
        dim: model width (heads * head_dim).
        heads: attention heads.
        mlp_ratio: MLP hidden width / dim (4 in Flux).
    """

    def __init__(self, dim: int, heads: int, *, mlp_ratio: float = 4.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"DoubleStreamBlock: dim {dim} is not a multiple of heads {heads}")
        self.dim, self.heads = dim, heads
        self.audio = StreamParams(dim, heads, mlp_ratio)
        self.text = StreamParams(dim, heads, mlp_ratio)

    def forward(
        self,
        audio: torch.Tensor,
        text: torch.Tensor,
        c: torch.Tensor,
        rope=None,
        *,
        backend: str = "auto",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """audio [B, Ta, C], text [B, Tt, C], c [B, C], rope (cos, sin) [Tt + Ta, R/2]
        -> (audio, text) of the same shapes."""
        Tt = text.shape[1]
        streams, xs = (self.text, self.audio), (text, audio)  # Flux's joint order: text first
        heads = (self.heads, self.dim // self.heads)
        mods, qs, ks, vs = [], [], [], []
        for s, x in zip(streams, xs):
            m = s.mod(c)  # shift1, scale1, gate1, shift2, scale2, gate2
            q, k, v = s.qkv(modulate(x, m[0], m[1])).unflatten(-1, (3,) + heads).unbind(2)
            mods.append(m)
            qs.append(s.q_norm(q))
            ks.append(s.k_norm(k))
            vs.append(v)
        q, k, v = (torch.cat(t, dim=1) for t in (qs, ks, vs))
        a = rope_attention(q, k, v, rope, backend=backend)
        outs = []
        for s, x, m, a_s in zip(streams, xs, mods, (a[:, :Tt], a[:, Tt:])):
            shift1, scale1, gate1, shift2, scale2, gate2 = m
            x = x + gate1[:, None] * s.out(a_s)
            x = x + gate2[:, None] * s.mlp(modulate(x, shift2, scale2))
            outs.append(x)
        text, audio = outs
        return audio, text
