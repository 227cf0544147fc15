"""Multi-scale STFT discriminator (EnCodec, Défossez et al. 2022, section 3.4 and figure 4).

Each sub-discriminator looks at one complex STFT of the waveform (real and imaginary parts as
input channels, laid out ``[B, 2C, time, freq]``): a 2-D conv, then convs dilated 1, 2, 4 along
time and strided by 2 along frequency, a last conv and a 1-channel output conv, LeakyReLU(0.2)
between them, weight norm on every conv. Hyperparameter defaults are the paper's (32 filters,
kernel (3, 9), STFT windows 2048 / 1024 / 512 with a quarter hop).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


def _same_padding(kernel: tuple[int, int], dilation: tuple[int, int] = (1, 1)) -> tuple[int, int]:
    return ((kernel[0] - 1) * dilation[0] // 2, (kernel[1] - 1) * dilation[1] // 2)


class STFTDiscriminator(nn.Module):
    """One scale.

    Args:
        channels: audio channels. filters: width of the first conv (32). max_filters: cap (1024).
        filters_scale: width growth per dilated conv (1). n_fft / hop_length / win_length: the
        STFT (1024 / 256 / 1024). kernel_size: (time, freq) of the convs (3, 9).
        dilations: time dilations of the strided convs (1, 2, 4). stride: (time, freq) (1, 2).
        normalized: normalised STFT (True). negative_slope: LeakyReLU slope (0.2).
    """

    def __init__(self, *, channels: int = 1, filters: int = 32, max_filters: int = 1024, filters_scale: int = 1,
                 n_fft: int = 1024, hop_length: int = 256, win_length: int = 1024,
                 kernel_size: tuple[int, int] = (3, 9), dilations: Sequence[int] = (1, 2, 4),
                 stride: tuple[int, int] = (1, 2), normalized: bool = True, negative_slope: float = 0.2) -> None:
        super().__init__()
        if win_length > n_fft:
            raise ValueError(f"STFTDiscriminator: win_length ({win_length}) must be <= n_fft ({n_fft})")
        self.channels, self.n_fft, self.hop_length, self.win_length = channels, n_fft, hop_length, win_length
        self.normalized = normalized
        self.register_buffer("window", torch.hann_window(win_length), persistent=False)
        convs = [weight_norm(nn.Conv2d(2 * channels, filters, kernel_size, padding=_same_padding(kernel_size)))]
        width = filters
        for i, d in enumerate(dilations):
            out = min(filters_scale ** (i + 1) * filters, max_filters)
            convs.append(weight_norm(nn.Conv2d(width, out, kernel_size, stride=stride, dilation=(d, 1),
                                               padding=_same_padding(kernel_size, (d, 1)))))
            width = out
        square = (kernel_size[0], kernel_size[0])
        out = min(filters_scale ** (len(dilations) + 1) * filters, max_filters)
        convs.append(weight_norm(nn.Conv2d(width, out, square, padding=_same_padding(square))))
        self.convs = nn.ModuleList(convs)
        self.post = weight_norm(nn.Conv2d(out, 1, square, padding=_same_padding(square)))
        self.act = nn.LeakyReLU(negative_slope)

    def forward(self, wav: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``wav [B, C, N]`` -> ``(logits [B, 1, frames, freq'], features per conv)``."""
        if wav.dim() != 3 or wav.shape[1] != self.channels:
            raise ValueError(f"STFTDiscriminator: wav must be [B, {self.channels}, N], got {tuple(wav.shape)}")
        B, C, N = wav.shape
        x = wav.float().reshape(B * C, N)
        if N < self.n_fft:  # one frame at least
            x = nn.functional.pad(x, (0, self.n_fft - N))
        spec = torch.stft(x, self.n_fft, self.hop_length, self.win_length, self.window.to(x.device),
                          center=False, normalized=self.normalized, return_complex=True)  # [BC, F, T]
        spec = spec.view(B, C, *spec.shape[1:])
        z = torch.cat([spec.real, spec.imag], dim=1).transpose(2, 3)  # [B, 2C, T, F]
        features = []
        for conv in self.convs:
            z = self.act(conv(z))
            features.append(z)
        return self.post(z), features


class MultiScaleSTFTDiscriminator(nn.Module):
    """Sub-discriminators at several STFT sizes (EnCodec: 2048, 1024, 512; hop a quarter).

    ``forward(wav)`` -> ``(logits list, features list of lists)``, one entry per scale.
    """

    def __init__(self, *, channels: int = 1, filters: int = 32, n_ffts: Sequence[int] = (1024, 2048, 512),
                 hop_lengths: Sequence[int] | None = None, win_lengths: Sequence[int] | None = None, **kwargs) -> None:
        super().__init__()
        hop_lengths = list(hop_lengths) if hop_lengths is not None else [n // 4 for n in n_ffts]
        win_lengths = list(win_lengths) if win_lengths is not None else list(n_ffts)
        if not (len(n_ffts) == len(hop_lengths) == len(win_lengths)) or not n_ffts:
            raise ValueError("MultiScaleSTFTDiscriminator: n_ffts, hop_lengths and win_lengths must have the same "
                             "non-zero length")
        self.discriminators = nn.ModuleList([
            STFTDiscriminator(channels=channels, filters=filters, n_fft=n, hop_length=h, win_length=w, **kwargs)
            for n, h, w in zip(n_ffts, hop_lengths, win_lengths)
        ])

    def forward(self, wav: torch.Tensor) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
        logits, features = [], []
        for disc in self.discriminators:
            lg, ft = disc(wav)
            logits.append(lg)
            features.append(ft)
        return logits, features
