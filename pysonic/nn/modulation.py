"""adaLN-Zero modulation (DiT / Flux): a conditioning vector gives per-channel shift, scale and gate.

``AdaLNZero`` produces ``n`` chunks from ``linear(silu(c))``; ``modulate`` applies
``LayerNorm(x) * (1 + scale) + shift`` (LayerNorm without affine, eps 1e-6 as in Flux).
``AdaLNContinuous`` is Flux's output norm (``AdaLayerNormContinuous``: scale first, then shift).
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

EPS = 1e-6  # Flux's LayerNorm eps (diffusers AdaLayerNormZero / Continuous, eps=1e-6)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, *, eps: float = EPS) -> torch.Tensor:
    """``layer_norm(x) * (1 + scale) + shift``; x [B, T, C], shift/scale [B, C]."""
    return F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale[:, None]) + shift[:, None]


class AdaLNZero(nn.Module):
    """``linear(silu(c)).chunk(n)``: the n modulation vectors of a block.

    Flux uses n = 6 in double-stream blocks (shift/scale/gate for attention, then for the MLP:
    diffusers ``AdaLayerNormZero``) and n = 3 in single-stream blocks (``AdaLayerNormZeroSingle``).

    Args:
        dim: width of x and of the conditioning vector.
        n: number of modulation vectors.
    """

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.n = n
        self.linear = nn.Linear(dim, n * dim)

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """c [B, C] -> n tensors [B, C]."""
        return self.linear(F.silu(c)).chunk(self.n, dim=-1)


class AdaLNContinuous(nn.Module):
    """Output norm: ``layer_norm(x) * (1 + scale) + shift`` with ``scale, shift = linear(silu(c))``."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x [B, T, C], c [B, C] -> [B, T, C]."""
        scale, shift = self.linear(F.silu(c).to(x.dtype)).chunk(2, dim=-1)
        return modulate(x, shift, scale)
