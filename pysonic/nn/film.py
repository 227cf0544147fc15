"""Feature-wise linear modulation (FiLM) conditioned on a continuous noise level.

As in WaveGrad (Chen et al., 2020, section 3 and figure 5): a 3-tap convolution and a leaky ReLU
on the features, plus a sinusoidal positional encoding of the noise level, then one 3-tap
convolution that gives the per-channel, per-time ``shift`` and ``scale`` a UBlock applies as
``scale * h + shift``.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def noise_level_encoding(noise_level: torch.Tensor, dim: int, *, scale: float = 1.0) -> torch.Tensor:
    """Sinusoidal encoding of a continuous noise level.

    ``[sin(scale * l * 1e-4 ** (i / h)), cos(...)]`` for ``i < h = dim // 2`` (the Transformer's
    encoding with the noise level as position). ivanvovk/WaveGrad multiplies the level by
    ``scale = 5000`` (its ``LINEAR_SCALE``); the LMNT package uses ``scale = 1``.

    Args:
        noise_level: [B] (or [B, 1]) noise levels sqrt(alpha_bar), float.
        dim: number of channels to produce (even).
        scale: multiplier applied to the level.

    Returns:
        [B, dim] encoding in the level's dtype.
    """
    if noise_level.dim() == 2 and noise_level.shape[1] == 1:
        noise_level = noise_level[:, 0]
    if noise_level.dim() != 1:
        raise ValueError(f"noise_level_encoding: noise_level must have shape [B], got {tuple(noise_level.shape)}")
    half = dim // 2
    steps = torch.arange(half, dtype=noise_level.dtype, device=noise_level.device) / half
    # 1e-4 ** (i / h) as ivanvovk computes it, in the level's dtype: with scale 5000 the angles reach
    # thousands of radians, so the rounding of the frequencies matters at the 1e-4 level.
    freqs = torch.pow(1e-4, steps)
    angles = (scale * noise_level)[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


# oneDNN convolution with fused post-ops (what torch.compile's CPU backend calls): the elementwise
# op after a convolution runs on its output while it is still in cache instead of as another pass.
_POINTWISE = getattr(torch.ops.mkldnn, "_convolution_pointwise", None) if torch.backends.mkldnn.is_available() else None


class Conv1d(nn.Conv1d):
    """Conv1d that also runs on [B, C, 1, T] channels-last activations (the fast inference layout).

    ``prepare(dtype)`` caches the weight as [O, C, 1, k] channels-last in ``dtype``: oneDNN then
    skips its per-call layout reorders, and bf16 uses the AMX kernels. The cache is kept until the
    weights change (their version counter moves) or ``prepare(None)``. Parameters and state-dict
    names are those of ``nn.Conv1d``.
    """

    _fast: tuple[torch.Tensor, torch.Tensor | None] | None = None
    _fast_key: tuple | None = None

    def prepare(self, dtype: torch.dtype | None) -> None:
        if dtype is None:
            self._fast = self._fast_key = None
            return
        key = (dtype, self.weight.data_ptr(), self.weight._version,
               None if self.bias is None else (self.bias.data_ptr(), self.bias._version))
        if self._fast is not None and self._fast_key == key:
            return
        w = self.weight.detach()[:, :, None, :].to(dtype).contiguous(memory_format=torch.channels_last)
        b = None if self.bias is None else self.bias.detach().to(dtype)
        self._fast, self._fast_key = (w, b), key

    def fused(self, x: torch.Tensor, *, add: torch.Tensor | None = None, slope: float | None = None) -> torch.Tensor:
        """``leaky_relu(conv(x) + add, slope)`` (either part optional) in one oneDNN call on the 4-D
        channels-last path; the same ops one after the other anywhere else (training, 3-D input)."""
        w = self._fast[0] if self._fast is not None else None
        if (
            _POINTWISE is not None and x.dim() == 4 and w is not None and w.dtype == x.dtype
            and x.is_contiguous(memory_format=torch.channels_last)
            and (add is None or (add.dtype == x.dtype and add.is_contiguous(memory_format=torch.channels_last)))
        ):
            pad, dil = [0, self.padding[0]], [1, self.dilation[0]]
            unary = "leaky_relu" if slope is not None else None
            scalars = [slope] if slope is not None else []
            if add is None:
                return _POINTWISE(x, w, self._fast[1], pad, [1, 1], dil, 1, unary or "none", scalars, "")
            return _POINTWISE.binary(x, add, w, self._fast[1], pad, [1, 1], dil, 1, "add", None, unary, scalars, None)
        out = self(x)
        if add is not None:
            out = out.add_(add)
        return out if slope is None else F.leaky_relu_(out, slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            if self._fast is None or self._fast[0].dtype != x.dtype:
                raise RuntimeError("Conv1d: call prepare(dtype) before running on 4-D channels-last activations")
            if _POINTWISE is not None and x.is_contiguous(memory_format=torch.channels_last):
                return self.fused(x)  # oneDNN with the bias fused (no separate bias pass)
            w, b = self._fast
            if self.kernel_size[0] == 1 and x.is_contiguous(memory_format=torch.channels_last):
                # 1x1: channels-last memory is [B, 1, T, C], so this is one GEMM with no copies.
                out = F.linear(x.permute(0, 2, 3, 1), w[:, :, 0, 0], b)
                return out.permute(0, 3, 1, 2)
            return F.conv2d(x, w, b, padding=(0, self.padding[0]), dilation=(1, self.dilation[0]))
        return super().forward(x)



class FiLM(nn.Module):
    """Noise-level conditioned FiLM generator.

    Args:
        in_channels: channels of the features it reads (a DBlock's output).
        out_channels: channels of the UBlock it modulates.
        pe_scale: multiplier of the noise level inside the positional encoding.
    """

    def __init__(self, in_channels: int, out_channels: int, *, pe_scale: float = 1.0):
        super().__init__()
        if in_channels % 2:
            raise ValueError(f"FiLM: in_channels must be even for the sin/cos encoding, got {in_channels}")
        self.in_channels, self.out_channels, self.pe_scale = in_channels, out_channels, float(pe_scale)
        self.input_conv = Conv1d(in_channels, in_channels, 3, padding=1)
        # One convolution for both outputs: channels [0, C) are the shift, [C, 2C) the scale.
        self.output_conv = Conv1d(in_channels, 2 * out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, noise_level: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, C_in, T] (or [B, C_in, 1, T]); noise_level: [B]. Returns (shift, scale), each [B, C_out, ...]."""
        h = self.input_conv.fused(x, slope=0.2)
        enc = noise_level_encoding(noise_level.to(torch.float32), self.in_channels, scale=self.pe_scale)
        h = h + enc.to(h.dtype).reshape(enc.shape + (1,) * (h.dim() - 2))
        shift, scale = self.output_conv(h).chunk(2, dim=1)
        return shift, scale


def film_modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, *, slope: float = 0.2) -> torch.Tensor:
    """``leaky_relu(scale * h + shift)`` in two passes over memory (addcmul, in-place activation)."""
    out = torch.addcmul(shift, scale, h)
    return F.leaky_relu_(out, slope)
