"""Snake activation (Ziyin et al. 2020, arXiv:2006.08195) with per-channel alpha and beta.

``snake(x) = x + 1 / (beta + 1e-9) * sin(alpha * x) ** 2``, the BigVGAN / DAC / Stable Audio form
with a separate frequency ``alpha`` and magnitude ``beta`` per channel. With ``logscale=True``
(Stable Audio Open's Oobleck VAE, diffusers' ``Snake1d``) the parameters hold ``log(alpha)`` and
``log(beta)`` and start at 0, i.e. alpha = beta = 1.
"""
from __future__ import annotations

import torch
from torch import nn


class Snake(nn.Module):
    """Per-channel Snake on ``[B, C, ...]`` inputs.

    Parameters are named ``alpha`` and ``beta`` with shape ``[1, C, 1]``, as in diffusers'
    ``Snake1d``, so checkpoints load without renaming.
    """

    def __init__(self, channels: int, *, logscale: bool = True) -> None:
        super().__init__()
        self.channels = channels
        self.logscale = logscale
        init = 0.0 if logscale else 1.0  # both mean alpha = beta = 1
        self.alpha = nn.Parameter(torch.full((1, channels, 1), init))
        self.beta = nn.Parameter(torch.full((1, channels, 1), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, ...] -> same shape."""
        # broadcast [1, C, 1] over any trailing dims; the result keeps x's memory layout
        per_channel = (1, self.channels) + (1,) * (x.dim() - 2)
        alpha, beta = (self.alpha.exp(), self.beta.exp()) if self.logscale else (self.alpha, self.beta)
        alpha, inv_beta = alpha.view(per_channel), (beta + 1e-9).reciprocal().view(per_channel)
        # x + sin(alpha x)^2 / (beta + 1e-9): three passes over x, two of them in place
        return torch.addcmul(x, inv_beta, torch.sin(alpha * x).square_())

    def extra_repr(self) -> str:
        return f"{self.channels}, logscale={self.logscale}"
