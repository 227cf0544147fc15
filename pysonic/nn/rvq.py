"""Residual vector quantiser (SoundStream/EnCodec) on the fused ``rvq_encode`` / ``rvq_decode`` ops.

Codebooks are stacked in one buffer ``codebooks: [n_q, bins, dim]`` (the ops' layout). They are
buffers, not parameters: EnCodec learns them by EMA k-means, not by gradient.
"""
from __future__ import annotations

import torch
from torch import nn

import pysonic.ops as ops


class ResidualVectorQuantizer(nn.Module):
    """Args:
        dim: codebook vector size (EnCodec: the encoder's latent size, 128).
        n_q: number of codebooks (levels).
        bins: entries per codebook (EnCodec 1024; the MusicGen 32 kHz codec 2048).
    """

    def __init__(self, *, dim: int, n_q: int, bins: int) -> None:
        super().__init__()
        self.dim, self.n_q, self.bins = dim, n_q, bins
        # Kaiming-uniform start (the reference's init when k-means init is off); real weights
        # come from a checkpoint.
        books = torch.empty(n_q, bins, dim)
        for level in range(n_q):
            nn.init.kaiming_uniform_(books[level])
        self.register_buffer("codebooks", books)

    def encode(self, x: torch.Tensor, *, n_q: int | None = None) -> torch.Tensor:
        """Latent ``x: [B, dim, T]`` -> codes ``[B, n_q, T]`` (int64), using the first ``n_q`` levels."""
        n_q = self.n_q if n_q is None else n_q
        if not 1 <= n_q <= self.n_q:
            raise ValueError(f"ResidualVectorQuantizer.encode: n_q must be in [1, {self.n_q}], got {n_q}")
        if x.dim() != 3 or x.shape[1] != self.dim:
            raise ValueError(f"ResidualVectorQuantizer.encode: x must be [B, {self.dim}, T], got {tuple(x.shape)}")
        codes = ops.rvq_encode(x.transpose(1, 2).contiguous(), self.codebooks, n_q=n_q)  # [B, T, n_q]
        return codes.transpose(1, 2)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[B, n_q, T]`` -> the sum of their codebook vectors ``[B, dim, T]``."""
        if codes.dim() != 3:
            raise ValueError(f"ResidualVectorQuantizer.decode: codes must be [B, n_q, T], got {tuple(codes.shape)}")
        if codes.dtype.is_floating_point or codes.dtype == torch.bool or codes.is_complex():
            raise TypeError(f"ResidualVectorQuantizer.decode: codes must be an integer tensor, got {codes.dtype}")
        if not 1 <= codes.shape[1] <= self.n_q:
            raise ValueError(
                f"ResidualVectorQuantizer.decode: codes have {codes.shape[1]} levels, the quantizer has {self.n_q}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.bins):
            raise ValueError(
                f"ResidualVectorQuantizer.decode: codes must be in [0, {self.bins}), "
                f"got values in [{int(codes.min())}, {int(codes.max())}]")
        books = self.codebooks[: codes.shape[1]]
        out = ops.rvq_decode(codes.transpose(1, 2).contiguous().long(), books)  # [B, T, dim]
        return out.transpose(1, 2)
