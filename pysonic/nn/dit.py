"""Single-stream DiT block (Flux ``FluxSingleTransformerBlock``): one concatenated text+audio
sequence, attention and MLP computed in parallel from the same modulated input.

Also holds ``rope_attention``, the multi-head attention core shared with the double-stream
block: per-head RMSNorm of q and k, rotary on q and k, then ``pysonic.ops.attention``.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from pysonic.nn.modulation import AdaLNZero, modulate
from pysonic.ops import attention, rotary

QK_NORM_EPS = 1e-6  # Flux blocks build their q/k RMSNorms with eps=1e-6


def rope_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor] | None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention over the whole sequence with interleaved-pair rotary on q and k.

    Args:
        q, k, v: [B, T, H, D] (q and k already RMS-normalised; strided views are fine).
        rope: (cos, sin) each [T, R/2] from ``pysonic.nn.embeddings.rotary_tables``, or None.
        backend: passed to ``pysonic.ops.rotary`` and ``pysonic.ops.attention``.

    Returns:
        [B, T, H*D].
    """
    B, T, H, D = q.shape
    # under autocast the RMSNorms may return a different dtype than the v projection; the fused
    # ops want one dtype (the projections' dtype, as autocast's SDPA would use)
    q, k = q.to(v.dtype), k.to(v.dtype)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D] views
    if rope is not None:
        cos, sin = rope
        q = rotary(q, cos, sin, interleaved=True, backend=backend)  # Flux pairs channels (2i, 2i+1)
        k = rotary(k, cos, sin, interleaved=True, backend=backend)
    out = attention(q, k, v, backend=backend)
    return out.transpose(1, 2).reshape(B, T, H * D)


class SingleStreamBlock(nn.Module):
    """``x + gate * proj_out([attn(m), gelu_tanh(mlp_in(m))])`` with ``m = modulate(x, shift, scale)``.

    q, k, v and the MLP input come from one fused projection ``qkv_mlp`` (diffusers keeps them as
    ``attn.to_q/to_k/to_v`` and ``proj_mlp``; the loader concatenates them).

    Args:
        dim: model width (heads * head_dim).
        heads: attention heads.
        mlp_ratio: MLP hidden width / dim (4 in Flux).
    """

    def __init__(self, dim: int, heads: int, *, mlp_ratio: float = 4.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"SingleStreamBlock: dim {dim} is not a multiple of heads {heads}")
        self.dim, self.heads = dim, heads
        self.mlp_dim = int(dim * mlp_ratio)
        self.mod = AdaLNZero(dim, 3)
        self.qkv_mlp = nn.Linear(dim, 3 * dim + self.mlp_dim)
        self.q_norm = nn.RMSNorm(dim // heads, eps=QK_NORM_EPS)
        self.k_norm = nn.RMSNorm(dim // heads, eps=QK_NORM_EPS)
        self.proj_out = nn.Linear(dim + self.mlp_dim, dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope=None, *, backend: str = "auto") -> torch.Tensor:
        """x [B, T, C] (text then audio), c [B, C] conditioning, rope (cos, sin) [T, R/2] -> [B, T, C]."""
        shift, scale, gate = self.mod(c)
        m = modulate(x, shift, scale)
        q, k, v, h = self.qkv_mlp(m).split([self.dim, self.dim, self.dim, self.mlp_dim], dim=-1)
        heads = (self.heads, self.dim // self.heads)
        q, k, v = self.q_norm(q.unflatten(-1, heads)), self.k_norm(k.unflatten(-1, heads)), v.unflatten(-1, heads)
        a = rope_attention(q, k, v, rope, backend=backend)
        h = F.gelu(h, approximate="tanh")
        return x + gate[:, None] * self.proj_out(torch.cat([a, h], dim=-1))
