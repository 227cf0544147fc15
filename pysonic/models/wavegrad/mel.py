"""Mel front end matching the features WaveGrad checkpoints were trained on.

Both peers compute their mels with ``torchaudio.transforms.MelSpectrogram``; this module
reproduces that pipeline with ``torch.stft`` and its own filterbank, so torchaudio is not
needed at run time:

* STFT with a periodic Hann window of ``win_length`` zero-padded (centred) to ``n_fft``,
  ``center=True`` with reflect padding, one-sided;
* optional window normalisation (divide by ``sqrt(sum(window ** 2))``, torchaudio ``normalized=True``);
* magnitude to the power ``power``;
* an HTK-scale triangular filterbank without area normalisation (torchaudio's defaults,
  ``mel_scale="htk"``, ``norm=None``), band edges from ``f_min`` to ``f_max`` and FFT bin
  frequencies ``linspace(0, sample_rate // 2, n_fft // 2 + 1)``;
* log compression: ivanvovk's ``log10`` with ``log10(0) -> 0`` and the last frame dropped
  (``data.MelSpectrogramFixed``), or LMNT's ``clamp((20 log10(max(x, 1e-5)) - 20 + 100) / 100, 0, 1)``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from pysonic.models.wavegrad.config import MelConfig


def hz_to_mel(f):
    """HTK mel scale: 2595 * log10(1 + f / 700)."""
    return 2595.0 * math.log10(1.0 + f / 700.0)


def mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(*, n_freqs: int, f_min: float, f_max: float, n_mels: int, sample_rate: int) -> torch.Tensor:
    """Triangular HTK mel filterbank, [n_freqs, n_mels], float32 (computed in float64).

    Filter ``j`` rises linearly from ``f[j]`` to a peak of 1 at ``f[j + 1]`` and falls to 0 at
    ``f[j + 2]``, where ``f`` are ``n_mels + 2`` points equally spaced in mel from ``f_min`` to
    ``f_max``.
    """
    if not 0 <= f_min < f_max:
        raise ValueError(f"mel_filterbank: need 0 <= f_min < f_max, got f_min={f_min}, f_max={f_max}")
    freqs = torch.linspace(0, sample_rate // 2, n_freqs, dtype=torch.float64)
    pts = mel_to_hz(torch.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2, dtype=torch.float64))
    width = pts[1:] - pts[:-1]  # [n_mels + 1]
    offset = pts[None, :] - freqs[:, None]  # [n_freqs, n_mels + 2]: f_pt - f_bin
    rising = -offset[:, :-2] / width[:-1]  # (f_bin - f_lo) / (f_mid - f_lo)
    falling = offset[:, 2:] / width[1:]  # (f_hi - f_bin) / (f_hi - f_mid)
    return torch.clamp(torch.minimum(rising, falling), min=0.0).to(torch.float32)


class MelSpectrogram(nn.Module):
    """Waveform -> log mel, as the checkpoint's training code computed it.

    Args:
        config: a :class:`MelConfig`.
    """

    def __init__(self, config: MelConfig):
        super().__init__()
        if config.compression not in ("log10", "lmnt_db"):
            raise ValueError(f"MelSpectrogram: compression must be 'log10' or 'lmnt_db', got {config.compression!r}")
        if config.win_length > config.n_fft:
            raise ValueError(f"MelSpectrogram: win_length {config.win_length} > n_fft {config.n_fft}")
        self.config = config
        self.register_buffer("window", torch.hann_window(config.win_length, periodic=True, dtype=torch.float32), persistent=False)
        fb = mel_filterbank(
            n_freqs=config.n_fft // 2 + 1, f_min=config.f_min, f_max=config.f_max,
            n_mels=config.n_mels, sample_rate=config.sample_rate,
        )
        self.register_buffer("filterbank", fb, persistent=False)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        """wav: [B, N] or [N] float in [-1, 1]. Returns [B, n_mels, frames] ([n_mels, frames] for 1-D input).

        ``frames = N // hop + 1``, minus one when the config drops the last frame (ivanvovk), so a
        waveform of ``T * hop`` samples gives ``T`` frames there.
        """
        c = self.config
        if not isinstance(wav, torch.Tensor) or not wav.is_floating_point():
            raise TypeError("MelSpectrogram: wav must be a floating-point tensor")
        if wav.dim() not in (1, 2) or wav.shape[-1] == 0:
            raise ValueError(f"MelSpectrogram: wav must be [B, N] or [N] with N > 0, got shape {tuple(wav.shape)}")
        if wav.shape[-1] <= c.n_fft // 2:
            raise ValueError(f"MelSpectrogram: wav needs more than n_fft // 2 = {c.n_fft // 2} samples for reflect padding, got {wav.shape[-1]}")
        squeeze = wav.dim() == 1
        x = wav.reshape(1, -1) if squeeze else wav
        spec = torch.stft(
            x.float(), c.n_fft, hop_length=c.hop_length, win_length=c.win_length, window=self.window,
            center=True, pad_mode="reflect", normalized=False, onesided=True, return_complex=True,
        ).abs()
        if c.normalized:
            spec = spec / self.window.pow(2).sum().sqrt()
        if c.power != 1.0:
            spec = spec.pow(c.power)
        mel = torch.matmul(spec.transpose(-1, -2), self.filterbank).transpose(-1, -2)
        if c.compression == "log10":
            mel = mel.log10()
            mel = torch.where(torch.isinf(mel), torch.zeros_like(mel), mel)
        else:
            mel = 20.0 * torch.log10(mel.clamp(min=1e-5)) - 20.0
            mel = ((mel + 100.0) / 100.0).clamp(0.0, 1.0)
        if c.drop_last_frame:
            mel = mel[..., :-1]
        return mel[0] if squeeze else mel
