"""Residual vector quantiser (SoundStream/EnCodec) on the fused ``rvq_encode`` / ``rvq_decode`` ops.

Codebooks are stacked in one buffer ``codebooks: [n_q, bins, dim]`` (the ops' layout). They are
buffers, not parameters: EnCodec learns them by EMA k-means, not by gradient.

Training (``forward`` in training mode, after :meth:`ResidualVectorQuantizer.enable_ema`):
straight-through quantisation, a commitment loss, EMA codebook updates and dead-code
replacement, as in EnCodec (Défossez et al. 2022, section 3.2) and SoundStream (Zeghidour et al.
2021, section 3.2). ``encode`` / ``decode`` (inference) are unchanged by any of it.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import pysonic.ops as ops


class QuantizerOutput(NamedTuple):
    """``quantized [B, dim, T]`` (straight-through in training: its gradient flows to the input),
    ``codes [B, n_q, T]``, ``commit_loss`` (scalar: mean over levels of the squared distance of
    each level's input to its code), ``stats`` (floats to log)."""

    quantized: torch.Tensor
    codes: torch.Tensor
    commit_loss: torch.Tensor
    stats: dict


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class ResidualVectorQuantizer(nn.Module):
    """Args:
        dim: codebook vector size (EnCodec: the encoder's latent size, 128).
        n_q: number of codebooks (levels).
        bins: entries per codebook (EnCodec 1024; the MusicGen 32 kHz codec 2048).
    """

    def __init__(self, *, dim: int, n_q: int, bins: int) -> None:
        super().__init__()
        self.dim, self.n_q, self.bins = dim, n_q, bins
        self.ema_enabled = False
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

    # ------------------------------------------------------------------ training
    def enable_ema(self, *, decay: float = 0.99, epsilon: float = 1e-5, dead_code_threshold: float = 2.0,
                   data_init: bool = True) -> None:
        """Add the EMA k-means state (persistent buffers ``cluster_size [n_q, bins]``,
        ``embed_sum [n_q, bins, dim]`` and ``data_initialized [n_q]``, so training checkpoints hold
        them; an inference model has none, so exported weights must leave them out).

        Args (defaults are EnCodec's / audiocraft's):
            decay: EMA decay of the per-code counts and sums (0.99).
            epsilon: Laplace smoothing of the counts (1e-5).
            dead_code_threshold: a code whose EMA count falls below this is replaced by a vector
                of the current batch (2.0); 0 disables replacement.
            data_init: at a level's first training step, set its codes to random vectors of the
                batch (the cheap form of EnCodec's k-means initialisation: codes start where the
                data is, instead of a random init nothing maps to).
        """
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ResidualVectorQuantizer.enable_ema: decay must be in (0, 1), got {decay}")
        self.decay, self.epsilon, self.dead_code_threshold = float(decay), float(epsilon), float(dead_code_threshold)
        if not self.ema_enabled:
            # start as if every code had been used once, at its current position
            self.register_buffer("cluster_size", torch.ones(self.n_q, self.bins, device=self.codebooks.device))
            self.register_buffer("embed_sum", self.codebooks.detach().clone())
            self.register_buffer("data_initialized", torch.full((self.n_q,), not data_init, device=self.codebooks.device))
        self.ema_enabled = True

    def forward(self, x: torch.Tensor, *, n_q: int | None = None) -> QuantizerOutput:
        """Quantise ``x: [B, dim, T]`` with the first ``n_q`` levels.

        In training mode (needs :meth:`enable_ema`): each level picks the nearest code of its
        residual input (the fused op, fp32 distances), the codebook moves by EMA towards the mean
        of the vectors assigned to each code (statistics summed over all processes, so every
        process updates identically), codes with an EMA count under ``dead_code_threshold`` are
        replaced by random vectors of the batch, and the output is straight-through
        (``x + (q - x).detach()``, the form that keeps the gradient exact for every level).
        Outside training mode: the codes and their decoding, no state change, zero loss.
        """
        n_q = self.n_q if n_q is None else n_q
        if self.training and self.ema_enabled and not bool(self.data_initialized[:n_q].all()):
            self._data_init(x.detach(), n_q)
        codes = self.encode(x.detach().to(self.codebooks.dtype), n_q=n_q)  # [B, n_q, T]
        if not self.training:
            q = self.decode(codes).to(x.dtype)
            return QuantizerOutput(q, codes, x.new_zeros(()), {})
        if not self.ema_enabled:
            raise RuntimeError("ResidualVectorQuantizer: call enable_ema() before training the quantiser")
        B, D, T = x.shape
        x_flat = x.float().transpose(1, 2).reshape(-1, D)  # [N, D], carries the gradient
        residual = x_flat.detach()
        q_total = torch.zeros_like(residual)
        commit = x_flat.new_zeros(())
        replaced, usage = 0, 0.0
        for level in range(n_q):
            idx = codes[:, level].reshape(-1)  # [N]
            q = self.codebooks[level].float()[idx]  # before this level's update (the codes' book)
            replaced += self._ema_update(level, residual, idx)
            usage += float((torch.bincount(idx, minlength=self.bins) > 0).float().mean())
            residual = residual - q
            q_total = q_total + q
            # commitment: this level's input (x minus the codes above, detached) to its code
            commit = commit + (x_flat - q_total).pow(2).mean()
        commit = commit / n_q
        q_total = q_total.view(B, T, D).transpose(1, 2).to(x.dtype)
        quantized = x + (q_total - x).detach()
        stats = {"commit_loss": float(commit.detach()), "dead_codes_replaced": float(replaced),
                 "codebook_usage": usage / n_q}
        return QuantizerOutput(quantized, codes, commit, stats)

    @torch.no_grad()
    def _data_init(self, x: torch.Tensor, n_q: int) -> None:
        """Levels not yet initialised take random residual vectors of this batch as codes (drawn
        on rank 0 and shared); their EMA state restarts as one use per code."""
        residual = x.float().transpose(1, 2).reshape(-1, self.dim)
        for level in range(n_q):
            if not bool(self.data_initialized[level]):
                pick = torch.randint(0, residual.shape[0], (self.bins,), device=residual.device)
                new = residual[pick].clone()
                if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                    dist.broadcast(new, src=0)
                self.codebooks[level].copy_(new.to(self.codebooks.dtype))
                self.embed_sum[level].copy_(new.to(self.embed_sum.dtype))
                self.cluster_size[level].fill_(1.0)
                self.data_initialized[level] = True
            book = self.codebooks[level].float()
            d = torch.cdist(residual, book)
            residual = residual - book[d.argmin(dim=1)]

    @torch.no_grad()
    def _ema_update(self, level: int, vectors: torch.Tensor, idx: torch.Tensor) -> int:
        """EMA k-means step for one level; returns how many dead codes were replaced."""
        counts = torch.bincount(idx, minlength=self.bins).float()  # [K]
        sums = torch.zeros(self.bins, vectors.shape[1], dtype=torch.float32, device=vectors.device)
        sums.index_add_(0, idx, vectors.float())
        both = _all_reduce_sum(torch.cat([counts[:, None], sums], dim=1))
        counts, sums = both[:, 0], both[:, 1:]
        size, acc = self.cluster_size[level], self.embed_sum[level]
        size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        acc.mul_(self.decay).add_(sums.to(acc.dtype), alpha=1 - self.decay)
        # Laplace smoothing keeps empty codes from dividing by zero
        n = size.sum()
        smoothed = (size + self.epsilon) / (n + self.bins * self.epsilon) * n
        self.codebooks[level].copy_((acc / smoothed[:, None]).to(self.codebooks.dtype))
        if self.dead_code_threshold <= 0:
            return 0
        dead = size < self.dead_code_threshold
        n_dead = int(dead.sum())
        if n_dead == 0:
            return 0
        # new positions: random vectors of this batch (drawn on rank 0 and shared, so that all
        # processes keep identical codebooks); their EMA state restarts at the threshold count
        pick = torch.randint(0, vectors.shape[0], (n_dead,), device=vectors.device)
        new = vectors[pick].float()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(new, src=0)
        self.codebooks[level][dead] = new.to(self.codebooks.dtype)
        acc[dead] = new.to(acc.dtype) * self.dead_code_threshold
        size[dead] = self.dead_code_threshold
        return n_dead
