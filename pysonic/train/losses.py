"""Reconstruction and adversarial losses for training audio codecs / vocoders.

- :func:`waveform_l1`: time-domain L1 (EnCodec's ``l_t``).
- :class:`MultiScaleMelLoss`: EnCodec's frequency-domain loss ``l_f`` (Défossez et al. 2022,
  eq. 1): over STFT window sizes ``2**i`` (i = 5..11, hop a quarter of the window), the L1 plus
  ``alpha_i`` times the L2 distance of 64-bin mel spectrograms (normalised STFT), averaged.
- :class:`MultiResolutionSTFTLoss`: spectral convergence + log-magnitude L1 over several STFT
  resolutions (Yamamoto et al. 2020, Parallel WaveGAN, section 2.3).
- :func:`hinge_discriminator_loss`, :func:`hinge_generator_loss`, :func:`feature_matching_loss`:
  EnCodec's adversarial terms (eq. 2-3): hinge losses over the discriminators' logits, and the
  relative L1 of every discriminator layer's features.

Waveforms are ``[B, C, N]``; losses are means over the batch (scalars).
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def waveform_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of ``[B, C, N]`` waveforms (``pred`` is cropped to ``target``)."""
    _check_pair("waveform_l1", pred, target)
    return (pred[..., : target.shape[-1]].float() - target.float()).abs().mean()


def _check_pair(op: str, pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.dim() != 3 or target.dim() != 3 or pred.shape[:2] != target.shape[:2]:
        raise ValueError(f"{op}: pred and target must be [B, C, N] with the same B and C, got "
                         f"{tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.shape[-1] < target.shape[-1]:
        raise ValueError(f"{op}: pred has {pred.shape[-1]} samples, fewer than the target's {target.shape[-1]}")


def hz_to_mel(f):
    """HTK mel scale: ``2595 log10(1 + f / 700)``."""
    return 2595.0 * math.log10(1.0 + f / 700.0) if isinstance(f, (int, float)) else 2595.0 * torch.log10(1.0 + f / 700.0)


@functools.lru_cache(maxsize=32)
def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int, f_min: float = 0.0, f_max: float | None = None) -> torch.Tensor:
    """Triangular mel filters ``[n_mels, n_fft // 2 + 1]`` (HTK scale, no area normalisation),
    for a one-sided power or magnitude spectrum."""
    f_max = sample_rate / 2 if f_max is None else f_max
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    m_pts = torch.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2, dtype=torch.float64)
    f_pts = 700.0 * (10 ** (m_pts / 2595.0) - 1.0)
    lower = (freqs[None] - f_pts[:-2, None]) / (f_pts[1:-1, None] - f_pts[:-2, None])
    upper = (f_pts[2:, None] - freqs[None]) / (f_pts[2:, None] - f_pts[1:-1, None])
    return torch.clamp(torch.minimum(lower, upper), min=0.0).float()


def _stft_magnitude(x: torch.Tensor, n_fft: int, hop: int, *, normalized: bool = True, power: float = 1.0) -> torch.Tensor:
    """``[B, C, N]`` -> ``[B * C, n_fft // 2 + 1, frames]`` magnitude (Hann window, centred,
    reflect-padded; inputs shorter than the pad are zero-padded first)."""
    flat = x.float().reshape(-1, x.shape[-1])
    if flat.shape[-1] <= n_fft // 2:
        flat = F.pad(flat, (0, n_fft // 2 + 1 - flat.shape[-1]))
    window = torch.hann_window(n_fft, device=x.device, dtype=torch.float32)
    spec = torch.stft(flat, n_fft, hop, n_fft, window, center=True, pad_mode="reflect",
                      normalized=normalized, return_complex=True)
    mag = spec.abs()
    return mag if power == 1.0 else mag.pow(power)


class MultiScaleMelLoss(nn.Module):
    """EnCodec's multi-scale mel loss.

    Args (defaults from the EnCodec paper / audiocraft's ``MultiScaleMelSpectrogramLoss``):
        sample_rate: of the waveforms.
        range_start, range_end: window sizes ``2**i`` for ``i`` in ``[range_start, range_end)``
            (5..11 -> 32..1024 samples).
        n_mels: mel bins (64).
        alphas: weight the L2 term with ``sqrt(2**i / 2)`` (the paper's alpha_i), else 1.
        floor: added before the log in the log-mel distances (1e-5).
        log: compare log-mel spectrograms (audiocraft's default) instead of linear ones.
    """

    def __init__(self, sample_rate: int, *, range_start: int = 5, range_end: int = 12, n_mels: int = 64,
                 alphas: bool = True, floor: float = 1e-5, log: bool = True) -> None:
        super().__init__()
        if range_end <= range_start:
            raise ValueError(f"MultiScaleMelLoss: range_end ({range_end}) must exceed range_start ({range_start})")
        self.sample_rate, self.n_mels, self.floor, self.log = sample_rate, n_mels, floor, log
        self.scales = [2**i for i in range(range_start, range_end)]
        self.alphas = [math.sqrt(s / 2) if alphas else 1.0 for s in self.scales]

    def _mel(self, x: torch.Tensor, n_fft: int) -> torch.Tensor:
        # fewer mel bins than FFT bins at the small scales (audiocraft caps them the same way)
        n_mels = min(self.n_mels, n_fft // 2 + 1)
        fb = mel_filterbank(n_fft, n_mels, self.sample_rate).to(x.device)
        mel = torch.matmul(fb, _stft_magnitude(x, n_fft, n_fft // 4))  # [BC, n_mels, frames]
        return torch.log(mel + self.floor) if self.log else mel

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_pair("MultiScaleMelLoss", pred, target)
        pred = pred[..., : target.shape[-1]]
        total = pred.new_zeros((), dtype=torch.float32)
        for n_fft, alpha in zip(self.scales, self.alphas):
            a, b = self._mel(pred, n_fft), self._mel(target, n_fft)
            total = total + (a - b).abs().mean() + alpha * (a - b).pow(2).mean()
        return total / len(self.scales)


class MultiResolutionSTFTLoss(nn.Module):
    """Spectral convergence ``||S - S'||_F / ||S||_F`` plus ``mean |log S - log S'|`` over
    several (n_fft, hop) resolutions, averaged (Parallel WaveGAN's auxiliary loss).

    Args:
        resolutions: ``(n_fft, hop)`` pairs; default Parallel WaveGAN's three (window = n_fft).
        eps: magnitude floor inside the log and the norm ratio.
    """

    def __init__(self, resolutions: Sequence[tuple[int, int]] = ((512, 128), (1024, 256), (2048, 512)),
                 *, eps: float = 1e-7) -> None:
        super().__init__()
        if not resolutions:
            raise ValueError("MultiResolutionSTFTLoss: give at least one (n_fft, hop) resolution")
        self.resolutions = [(int(n), int(h)) for n, h in resolutions]
        self.eps = eps

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_pair("MultiResolutionSTFTLoss", pred, target)
        pred = pred[..., : target.shape[-1]]
        total = pred.new_zeros((), dtype=torch.float32)
        for n_fft, hop in self.resolutions:
            a = _stft_magnitude(pred, n_fft, hop, normalized=False)
            b = _stft_magnitude(target, n_fft, hop, normalized=False)
            sc = torch.linalg.vector_norm(b - a, dim=(1, 2)) / (torch.linalg.vector_norm(b, dim=(1, 2)) + self.eps)
            mag = (torch.log(a + self.eps) - torch.log(b + self.eps)).abs().mean()
            total = total + sc.mean() + mag
        return total / len(self.resolutions)


def hinge_discriminator_loss(real_logits: Sequence[torch.Tensor], fake_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """``mean_k [ mean relu(1 - D_k(x)) + mean relu(1 + D_k(G(x))) ]`` (EnCodec eq. 3)."""
    if len(real_logits) != len(fake_logits) or not real_logits:
        raise ValueError("hinge_discriminator_loss: need the same non-zero number of real and fake outputs")
    total = sum(F.relu(1 - r.float()).mean() + F.relu(1 + f.float()).mean() for r, f in zip(real_logits, fake_logits))
    return total / len(real_logits)


def hinge_generator_loss(fake_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """``mean_k mean relu(1 - D_k(G(x)))`` (EnCodec eq. 2's adversarial term)."""
    if not fake_logits:
        raise ValueError("hinge_generator_loss: no discriminator outputs")
    return sum(F.relu(1 - f.float()).mean() for f in fake_logits) / len(fake_logits)


def feature_matching_loss(real_features: Sequence[Sequence[torch.Tensor]],
                          fake_features: Sequence[Sequence[torch.Tensor]], *, per_item: bool = False,
                          eps: float = 1e-8) -> torch.Tensor:
    """``mean_{k, l} ||D_k^l(x) - D_k^l(G(x))||_1 / mean(|D_k^l(x)|)`` (EnCodec eq. 2's ``l_feat``);
    the real features are treated as constants.

    ``per_item``: take the ratio per batch item and average it over the batch (a mean of
    per-item terms, so the loss does not depend on how a batch is split across processes);
    otherwise the ratio of batch means, as in the paper / audiocraft.
    """
    terms = []
    for real_layers, fake_layers in zip(real_features, fake_features, strict=True):
        for r, f in zip(real_layers, fake_layers, strict=True):
            r = r.detach().float()
            if per_item:
                num = (r - f.float()).abs().flatten(1).mean(1)
                terms.append((num / (r.abs().flatten(1).mean(1) + eps)).mean())
            else:
                terms.append((r - f.float()).abs().mean() / (r.abs().mean() + eps))
    if not terms:
        raise ValueError("feature_matching_loss: no features")
    return sum(terms) / len(terms)
