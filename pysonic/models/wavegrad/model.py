"""The WaveGrad network: predicts the noise in a noisy waveform given its mel spectrogram.

Chen et al., 2020, figures 3 to 5. The downsampling stream (DBlocks) reads the noisy audio; a
FiLM at each of its resolutions turns features plus the noise level into (shift, scale); the
upsampling stream (UBlocks) grows the mel to the audio rate, modulated by those FiLMs in reverse.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from pysonic.models.wavegrad.config import WaveGradConfig
from pysonic.nn.film import Conv1d, FiLM, film_modulate

_SLOPE = 0.2  # leaky ReLU slope everywhere in WaveGrad


def _resample(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Resample the last axis of [B, C, T] or [B, C, 1, T] to ``size``."""
    if x.dim() == 4:  # bilinear with height 1 -> 1 is linear along time
        return F.interpolate(x, size=(1, size), mode="bilinear" if mode == "linear" else "nearest", align_corners=None if mode != "linear" else False)
    if mode == "linear":
        return F.interpolate(x, size=size, mode="linear", align_corners=False)
    return F.interpolate(x, size=size, mode="nearest")


def _conv(cin: int, cout: int, k: int, dilation: int = 1) -> Conv1d:
    return Conv1d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation)


class DBlock(nn.Module):
    """Downsample by ``factor``, then three (leaky ReLU, dilated 3-tap conv); plus a 1x1 residual."""

    def __init__(self, cin: int, cout: int, factor: int, dilations: list[int], mode: str):
        super().__init__()
        self.factor, self.mode = factor, mode
        self.residual = _conv(cin, cout, 1)
        self.convs = nn.ModuleList([_conv(cin if i == 0 else cout, cout, 3, d) for i, d in enumerate(dilations)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-1] // self.factor
        x = _resample(x, size, self.mode)
        # The 1x1 conv and the resampling commute (both linear, on different axes; resampling keeps
        # constants): the residual conv runs at the low rate on the already-resampled input.
        residual = self.residual(x)
        h = F.leaky_relu(x, _SLOPE)
        last = len(self.convs) - 1
        for i, conv in enumerate(self.convs):
            # Each conv's leaky ReLU (or the last one's residual sum) is fused into the conv.
            h = conv.fused(h, add=residual if i == last else None, slope=None if i == last else _SLOPE)
        return h


class UBlock(nn.Module):
    """Upsample by ``factor``; two residual halves, each with FiLM-modulated dilated convs.

    ``up_conv`` is the first conv after upsampling; ``convs[0..2]`` follow FiLM modulations.
    """

    def __init__(self, cin: int, cout: int, factor: int, dilations: list[int], mode: str):
        super().__init__()
        self.factor, self.mode = factor, mode
        self.residual = _conv(cin, cout, 1)
        self.up_conv = _conv(cin, cout, 3, dilations[0])
        self.convs = nn.ModuleList([_conv(cout, cout, 3, d) for d in dilations[1:]])

    def forward(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        size = x.shape[-1] * self.factor
        # The 1x1 conv and the resampling commute (both linear, on different axes): conv at the low rate.
        residual = _resample(self.residual(x), size, self.mode)
        h = self.up_conv(_resample(F.leaky_relu(x, _SLOPE), size, self.mode))
        # The residual sums are fused into the convs that precede them (out of place: x is saved
        # by the modulation's autograd).
        x = self.convs[0].fused(film_modulate(h, shift, scale, slope=_SLOPE), add=residual)
        h = self.convs[1](film_modulate(x, shift, scale, slope=_SLOPE))
        return self.convs[2].fused(film_modulate(h, shift, scale, slope=_SLOPE), add=x)


class WaveGradNet(nn.Module):
    """epsilon-prediction network.

    Args:
        config: a :class:`WaveGradConfig`.
    """

    def __init__(self, config: WaveGradConfig):
        super().__init__()
        config.validate()
        self.config = config
        c, mode = config, config.interpolation
        n = len(c.factors)
        self.audio_conv = _conv(1, c.downsampling_preconv_out_channels, 5)
        d_in = [c.downsampling_preconv_out_channels] + c.downsampling_out_channels[:-1]
        d_factors = c.factors[1:][::-1]
        self.dblocks = nn.ModuleList([
            DBlock(i, o, f, d, mode) for i, o, f, d in zip(d_in, c.downsampling_out_channels, d_factors, c.downsampling_dilations)
        ])
        film_in = [c.downsampling_preconv_out_channels] + c.downsampling_out_channels
        film_out = c.upsampling_out_channels[::-1]
        self.films = nn.ModuleList([FiLM(i, o, pe_scale=c.pe_scale) for i, o in zip(film_in, film_out)])
        self.mel_conv = _conv(c.n_mels, c.upsampling_preconv_out_channels, 3)
        u_in = [c.upsampling_preconv_out_channels] + c.upsampling_out_channels[:-1]
        self.ublocks = nn.ModuleList([
            UBlock(i, o, f, d, mode) for i, o, f, d in zip(u_in, c.upsampling_out_channels, c.factors, c.upsampling_dilations)
        ])
        self.out_conv = _conv(c.upsampling_out_channels[-1], 1, 3)
        assert len(self.films) == n

    def prepare(self, dtype: torch.dtype | None) -> None:
        """Cache the convolution weights for the channels-last path in ``dtype`` (None frees them).

        Call again after changing the weights. :meth:`forward` with ``channels_last=True`` needs it.
        """
        for m in self.modules():
            if isinstance(m, Conv1d):
                m.prepare(dtype)

    def encode_mel(self, mel: torch.Tensor) -> torch.Tensor:
        """The mel's first convolution, which does not change across sampler iterations. [B, n_mels, T] -> [B, C, T]."""
        return self.mel_conv(mel)

    def forward(
        self,
        audio: torch.Tensor,
        mel: torch.Tensor | None,
        noise_level: torch.Tensor,
        *,
        mel_features: torch.Tensor | None = None,
        channels_last: bool = False,
    ) -> torch.Tensor:
        """Predict the noise.

        Args:
            audio: noisy waveform [B, T * hop].
            mel: conditioning mel [B, n_mels, T] (or None when ``mel_features`` is given).
            noise_level: sqrt(alpha_bar) per item, [B] (or [B, 1]).
            mel_features: ``encode_mel(mel)``, cached across iterations (for ``channels_last``: of
                ``to_channels_last(mel)``).
            channels_last: run on [B, C, 1, T] channels-last activations in the dtype given to
                :meth:`prepare` (inference only; ``audio`` may be float32, it is converted).

        Returns:
            predicted noise [B, T * hop].
        """
        if noise_level.dim() == 2:
            noise_level = noise_level.reshape(-1)
        stats = []
        if channels_last:
            dtype = self.audio_conv._fast[0].dtype if self.audio_conv._fast is not None else audio.dtype
            h = self.audio_conv(to_channels_last(audio.unsqueeze(1), dtype))
            if mel is not None:
                mel = to_channels_last(mel, dtype)
        else:
            h = self.audio_conv(audio.unsqueeze(1))
        stats.append(self.films[0](h, noise_level))
        for dblock, film in zip(self.dblocks, self.films[1:]):
            h = dblock(h)
            stats.append(film(h, noise_level))
        x = self.encode_mel(mel) if mel_features is None else mel_features
        for ublock, (shift, scale) in zip(self.ublocks, reversed(stats)):
            x = ublock(x, shift, scale)
        return self.out_conv(x).reshape(audio.shape[0], -1)


def to_channels_last(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """[B, C, T] -> [B, C, 1, T] channels-last (in ``dtype``)."""
    return x[:, :, None, :].to(dtype or x.dtype).contiguous(memory_format=torch.channels_last)
