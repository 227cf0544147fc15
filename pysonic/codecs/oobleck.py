"""Oobleck: the Stable Audio Open VAE (Evans et al. 2024, arXiv:2407.14358), as TangoFlux uses it.

The architecture of diffusers' ``AutoencoderOobleck``: weight-normalised convolutions, Snake
activations with log-scale per-channel alpha/beta, residual units with dilations 1, 3, 9, strided
encoder convolutions and transposed decoder convolutions (kernel ``2 * stride``), and a diagonal
Gaussian latent whose scale goes through softplus. Parameter names are diffusers', so a
diffusers directory or TangoFlux's ``vae.safetensors`` loads without renaming.

Shapes: ``wav: [B, audio_channels, N]`` at ``sampling_rate``; ``latents: [B, 64, T]`` with
``T = N / hop_length`` (``hop_length = prod(downsampling_ratios) = 2048``, about 21.5 frames/s).

Decoding is convolutional, so any range of latent frames decodes exactly from a window that adds
the decoder's receptive field (:func:`decoder_receptive_field`, in latent frames) on each side:
``decode(z, frames=(a, b))`` gives exactly ``decode(z)[..., a * hop : b * hop]``, and
``decode(z, chunk_frames=n)`` decodes long latents in bounded memory with the same result.

Two pysonic extensions of the config, both off by default (diffusers' behaviour):

- ``latent_packing = p``: ``p`` consecutive encoder frames are stacked into one latent frame of
  ``p * decoder_input_channels`` channels (``hop_length = p * prod(downsampling_ratios)``). A small
  VAE learns quickly only at a small hop (measured on SonicSynth tones: hop 64 reconstructs pitch
  within 150 steps, hop 512 had not after 2000); packing then gives the flow model few, wide frames
  as TangoFlux's hop-2048 VAE does.
- ``scaling_factor = s``: latents are the posterior scaled by ``s`` (chosen so they have unit
  spread, which the flow model's ``N(0, 1)`` start assumes); ``decode`` divides by ``s`` first.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pysonic.checkpoints import CheckpointError, load_into, read_state_dict
from pysonic.nn.snake import Snake

DILATIONS = (1, 3, 9)  # residual units per block (Stable Audio / DAC)
RES_KERNEL = 7  # residual unit's dilated conv
CL = torch.channels_last  # activations inside the encoder/decoder are [B, C, 1, L] in this layout


def _to_2d(x: torch.Tensor) -> torch.Tensor:
    """[B, C, L] -> [B, C, 1, L] channels-last (one copy)."""
    return x.unsqueeze(2).contiguous(memory_format=CL)


def _to_1d(x: torch.Tensor) -> torch.Tensor:
    """[B, C, 1, L] -> contiguous [B, C, L]."""
    return x.squeeze(2).contiguous()


@dataclass(frozen=True)
class OobleckConfig:
    """Hyperparameters under diffusers' names; defaults are the released Stable Audio Open /
    TangoFlux VAE (diffusers' defaults, which TangoFlux instantiates as ``AutoencoderOobleck()``)."""

    encoder_hidden_size: int = 128  # encoder width; its last conv outputs mean and scale (2 x 64)
    downsampling_ratios: tuple[int, ...] = (2, 4, 4, 8, 8)  # hop 2048; reversed in the decoder
    channel_multiples: tuple[int, ...] = (1, 2, 4, 8, 16)  # width of block i = hidden * mult[i]
    decoder_channels: int = 128
    decoder_input_channels: int = 64  # latent channels
    audio_channels: int = 2  # stereo
    sampling_rate: int = 44_100
    latent_packing: int = 1  # pysonic: encoder frames stacked per latent frame (see the module doc)
    scaling_factor: float = 1.0  # pysonic: latents = posterior * scaling_factor

    def __post_init__(self) -> None:
        object.__setattr__(self, "downsampling_ratios", tuple(int(r) for r in self.downsampling_ratios))
        object.__setattr__(self, "channel_multiples", tuple(int(m) for m in self.channel_multiples))
        if len(self.channel_multiples) != len(self.downsampling_ratios):
            raise ValueError(
                f"OobleckConfig: channel_multiples {self.channel_multiples} and downsampling_ratios "
                f"{self.downsampling_ratios} must have the same length"
            )
        if self.encoder_hidden_size % 2:
            raise ValueError(f"OobleckConfig: encoder_hidden_size must be even (mean and scale), got {self.encoder_hidden_size}")
        if not (isinstance(self.latent_packing, int) and self.latent_packing >= 1):
            raise ValueError(f"OobleckConfig: latent_packing must be an integer >= 1, got {self.latent_packing!r}")
        if not (isinstance(self.scaling_factor, (int, float)) and math.isfinite(self.scaling_factor) and self.scaling_factor > 0):
            raise ValueError(f"OobleckConfig: scaling_factor must be a finite number > 0, got {self.scaling_factor!r}")

    @property
    def hop_length(self) -> int:
        """Audio samples per latent frame (packing included)."""
        return math.prod(self.downsampling_ratios) * self.latent_packing

    @property
    def frame_hop(self) -> int:
        """Audio samples per encoder/decoder frame (``prod(downsampling_ratios)``)."""
        return math.prod(self.downsampling_ratios)

    @property
    def latent_channels(self) -> int:
        """Channels of a latent frame (packing included)."""
        return self.decoder_input_channels * self.latent_packing

    @classmethod
    def from_dict(cls, d: dict) -> "OobleckConfig":
        """From a diffusers ``config.json`` dict (entries starting with ``_`` are metadata)."""
        name = d.get("_class_name", "AutoencoderOobleck")
        if name != "AutoencoderOobleck":
            raise CheckpointError(f"config is for {name!r}, not AutoencoderOobleck")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if not k.startswith("_") and k not in fields)
        if unknown:
            raise CheckpointError(f"unknown AutoencoderOobleck config entries: {unknown}")
        return cls(**{k: v for k, v in d.items() if k in fields})


class WNConv1d(nn.Module):
    """Weight-normalised ``Conv1d`` / ``ConvTranspose1d`` (``torch.nn.utils.weight_norm``, dim 0).

    ``weight = weight_v * weight_g / ||weight_v||`` with the norm over every dim but 0, i.e. per
    output channel for a convolution and per *input* channel for a transposed one (the layout
    ``[in, out, k]``), as in the released checkpoints.
    """

    def __init__(self, cin: int, cout: int, kernel: int, *, stride: int = 1, dilation: int = 1,
                 padding: int = 0, bias: bool = True, transposed: bool = False) -> None:
        super().__init__()
        cls = nn.ConvTranspose1d if transposed else nn.Conv1d
        ref = cls(cin, cout, kernel, stride=stride, dilation=dilation, padding=padding, bias=bias)
        v = ref.weight.detach()
        self.weight_g = nn.Parameter(v.norm(dim=(1, 2), keepdim=True))
        self.weight_v = nn.Parameter(v.clone())
        self.bias = nn.Parameter(ref.bias.detach().clone()) if bias else None
        self.stride, self.dilation, self.padding, self.transposed = stride, dilation, padding, transposed

    def weight(self) -> torch.Tensor:
        v = self.weight_v
        return v * (self.weight_g / v.norm(dim=(1, 2), keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C_in, 1, L] channels-last -> [B, C_out, 1, L'] channels-last.

        Run as a 2-D convolution over a height-1 image in channels-last layout: oneDNN then
        convolves without the layout reorders it adds around every NCL 1-D convolution (4-5x
        faster in bf16, about 1.5x in fp32 on this CPU).
        """
        w = self.weight().unsqueeze(2).contiguous(memory_format=CL)
        if self.transposed:
            return F.conv_transpose2d(x, w, self.bias, stride=(1, self.stride), padding=(0, self.padding))
        return F.conv2d(x, w, self.bias, stride=(1, self.stride), padding=(0, self.padding), dilation=(1, self.dilation))


class ResidualUnit(nn.Module):
    """x + conv1x1(snake(conv7_dilated(snake(x)))), length-preserving."""

    def __init__(self, dim: int, dilation: int) -> None:
        super().__init__()
        self.snake1 = Snake(dim)
        self.conv1 = WNConv1d(dim, dim, RES_KERNEL, dilation=dilation, padding=(RES_KERNEL - 1) * dilation // 2)
        self.snake2 = Snake(dim)
        self.conv2 = WNConv1d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.snake2(self.conv1(self.snake1(x))))


class EncoderBlock(nn.Module):
    """Three residual units, Snake, then a strided conv (kernel 2s) that downsamples by s."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.res_unit1, self.res_unit2, self.res_unit3 = (ResidualUnit(cin, d) for d in DILATIONS)
        self.snake1 = Snake(cin)
        self.conv1 = WNConv1d(cin, cout, 2 * stride, stride=stride, padding=math.ceil(stride / 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.res_unit3(self.res_unit2(self.res_unit1(x)))
        return self.conv1(self.snake1(x))


class DecoderBlock(nn.Module):
    """Snake, a transposed conv (kernel 2s) that upsamples by s, then three residual units."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.snake1 = Snake(cin)
        self.conv_t1 = WNConv1d(cin, cout, 2 * stride, stride=stride, padding=math.ceil(stride / 2), transposed=True)
        self.res_unit1, self.res_unit2, self.res_unit3 = (ResidualUnit(cout, d) for d in DILATIONS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_t1(self.snake1(x))
        return self.res_unit3(self.res_unit2(self.res_unit1(x)))


class OobleckEncoder(nn.Module):
    """wav [B, audio_channels, N] -> [B, encoder_hidden_size, N / hop] (mean and scale)."""

    def __init__(self, cfg: OobleckConfig) -> None:
        super().__init__()
        h, mult = cfg.encoder_hidden_size, (1, *cfg.channel_multiples)
        self.conv1 = WNConv1d(cfg.audio_channels, h, 7, padding=3)
        self.block = nn.ModuleList(
            EncoderBlock(h * mult[i], h * mult[i + 1], s) for i, s in enumerate(cfg.downsampling_ratios)
        )
        self.snake1 = Snake(h * mult[-1])
        self.conv2 = WNConv1d(h * mult[-1], h, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(_to_2d(x))
        for block in self.block:
            x = block(x)
        return _to_1d(self.conv2(self.snake1(x)))


class OobleckDecoder(nn.Module):
    """latents [B, decoder_input_channels, T] -> wav [B, audio_channels, T * hop]."""

    def __init__(self, cfg: OobleckConfig) -> None:
        super().__init__()
        c, mult, n = cfg.decoder_channels, (1, *cfg.channel_multiples), len(cfg.downsampling_ratios)
        self.conv1 = WNConv1d(cfg.decoder_input_channels, c * mult[-1], 7, padding=3)
        self.block = nn.ModuleList(
            DecoderBlock(c * mult[n - i], c * mult[n - i - 1], s)
            for i, s in enumerate(reversed(cfg.downsampling_ratios))
        )
        self.snake1 = Snake(c)
        self.conv2 = WNConv1d(c, cfg.audio_channels, 7, padding=3, bias=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv1(_to_2d(z))
        for block in self.block:
            x = block(x)
        return _to_1d(self.conv2(self.snake1(x)))


def decoder_receptive_field(cfg: OobleckConfig) -> int:
    """How many latent frames on each side can change a decoded sample (an upper bound).

    Walks the decoder from its output back to the latents, keeping the dependence radius ``r`` in
    the current layer's samples: a same-padded conv of kernel k and dilation d adds
    ``(k - 1) * d / 2``; a transposed conv (stride s, kernel 2s) maps output radius r to at most
    ``ceil((r + 2s) / s) + 1`` input samples. Windows extended by this many frames decode exactly.
    """
    r = 3  # output conv, kernel 7
    for s in cfg.downsampling_ratios:  # decoder blocks from last (stride ratios[0]) to first
        r += sum((RES_KERNEL - 1) * d // 2 for d in DILATIONS)
        r = math.ceil((r + 2 * s) / s) + 1
    return r + 3  # input conv, kernel 7


class OobleckVAE(nn.Module):
    """The Stable Audio Open VAE: ``encode`` wav -> latents, ``decode`` latents -> wav."""

    def __init__(self, config: OobleckConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or OobleckConfig()
        if cfg.encoder_hidden_size // 2 != cfg.decoder_input_channels:
            raise ValueError(
                f"OobleckVAE: latent width encoder_hidden_size / 2 = {cfg.encoder_hidden_size // 2} "
                f"must equal decoder_input_channels = {cfg.decoder_input_channels}"
            )
        self.encoder = OobleckEncoder(cfg)
        self.decoder = OobleckDecoder(cfg)
        self.hop_length = cfg.hop_length
        self.sampling_rate = cfg.sampling_rate
        self.receptive_field = decoder_receptive_field(cfg)  # in decoder frames (frame_hop samples)

    # ---------------------------------------------------------------- packing

    def pack(self, h: torch.Tensor) -> torch.Tensor:
        """Decoder frames [B, C, T * p] -> latents [B, C * p, T], scaled (channel ``c * p + j`` holds
        channel c of frame ``t * p + j``). T * p must be a multiple of p (encode pads the audio)."""
        p, s = self.config.latent_packing, self.config.scaling_factor
        if p > 1:
            B, C, T = h.shape
            h = h.reshape(B, C, T // p, p).transpose(2, 3).reshape(B, C * p, T // p)
        return h * s if s != 1.0 else h

    def unpack(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`pack`: latents [B, C * p, T] -> decoder input [B, C, T * p]."""
        p, s = self.config.latent_packing, self.config.scaling_factor
        if s != 1.0:
            z = z / s
        if p > 1:
            B, Cp, T = z.shape
            z = z.reshape(B, Cp // p, p, T).transpose(2, 3).reshape(B, Cp // p, T * p)
        return z

    # ---------------------------------------------------------------- encode

    def _check(self, x: torch.Tensor, name: str, channels: int, what: str) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"OobleckVAE.{name}: expected a tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[1] != channels:
            raise ValueError(f"OobleckVAE.{name}: expected {what} [B, {channels}, L], got shape {tuple(x.shape)}")
        if x.shape[0] == 0 or x.shape[2] == 0:
            raise ValueError(f"OobleckVAE.{name}: empty input of shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"OobleckVAE.{name}: expected a floating-point tensor, got {x.dtype}")
        if not torch.isfinite(x).all():
            raise ValueError(f"OobleckVAE.{name}: input contains NaN or infinite values")

    def _dtype(self) -> torch.dtype:
        return self.decoder.conv2.weight_v.dtype

    def encode_distribution(self, wav: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """wav: [B, audio_channels, N] -> (mean, std), each [B, latent_channels, ceil(N / hop)].

        ``std = softplus(scale) + 1e-4`` as in diffusers' ``OobleckDiagonalGaussianDistribution``.
        """
        self._check(wav, "encode", self.config.audio_channels, "wav")
        if self.config.latent_packing > 1:  # whole latent frames: zero-pad the audio's end
            wav = F.pad(wav, (0, -wav.shape[-1] % self.hop_length))
        h = self.encoder(wav.to(self._dtype()))
        mean, scale = h.chunk(2, dim=1)
        return self.pack(mean), self.pack(F.softplus(scale) + 1e-4)

    def encode(self, wav: torch.Tensor, *, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """wav: [B, audio_channels, N] -> latents [B, latent_channels, T].

        Returns the posterior mean, or with ``sample=True`` ``mean + std * noise`` drawn from
        ``generator`` (the same draw as diffusers' ``latent_dist.sample(generator)``).
        """
        mean, std = self.encode_distribution(wav)
        if not sample:
            return mean
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + std * noise

    # ---------------------------------------------------------------- decode

    def decode(self, latents: torch.Tensor, *, frames: tuple[int, int] | None = None,
               chunk_frames: int | None = None) -> torch.Tensor:
        """latents: [B, latent_channels, T] -> wav [B, audio_channels, T * hop].

        Args:
            frames: ``(start, stop)`` latent frames to decode; returns exactly
                ``decode(latents)[..., start * hop : stop * hop]``, computing only those frames plus
                the decoder's receptive field on each side.
            chunk_frames: decode at most this many latent frames (plus the receptive field) at a
                time, so memory is bounded for any length; the result equals the one-pass decode.
        """
        self._check(latents, "decode", self.config.latent_channels, "latents")
        T = latents.shape[-1]
        z = self.unpack(latents.to(self._dtype()))  # decoder frames: p per latent frame
        if frames is None and chunk_frames is None:
            return self.decoder(z)
        if any(s % 2 for s in self.config.downsampling_ratios):
            raise ValueError("OobleckVAE.decode: frames / chunk_frames need even downsampling_ratios "
                             f"(got {self.config.downsampling_ratios})")
        start, stop = (0, T) if frames is None else frames
        if not (0 <= start < stop <= T):
            raise ValueError(f"OobleckVAE.decode: frames=({start}, {stop}) must satisfy 0 <= start < stop <= {T}")
        if chunk_frames is not None and chunk_frames < 1:
            raise ValueError(f"OobleckVAE.decode: chunk_frames must be >= 1, got {chunk_frames}")
        p = self.config.latent_packing
        start, stop, step = start * p, stop * p, (chunk_frames or (stop - start)) * p
        pieces = [self._decode_window(z, a, min(a + step, stop)) for a in range(start, stop, step)]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)

    def _decode_window(self, z: torch.Tensor, start: int, stop: int, margin: int | None = None) -> torch.Tensor:
        """Samples of decoder frames [start, stop), decoded from the frames within ``margin``."""
        margin = self.receptive_field if margin is None else margin
        lo, hi = max(0, start - margin), min(z.shape[-1], stop + margin)
        wav = self.decoder(z[..., lo:hi])
        hop = self.config.frame_hop
        return wav[..., (start - lo) * hop : (stop - lo) * hop]

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        """Reconstruction through the posterior mean: wav -> wav."""
        return self.decode(self.encode(wav))

    # ---------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, path: str | Path, *, config: OobleckConfig | None = None,
                        device: torch.device | str | None = None,
                        dtype: torch.dtype | None = None) -> "OobleckVAE":
        """Load released weights from a local path (nothing is fetched).

        ``path`` is one of:
          - a diffusers directory: ``config.json`` + ``diffusion_pytorch_model.safetensors``
            (or the same inside a ``vae/`` subfolder, as in stable-audio-open-1.0);
          - a directory holding ``vae.safetensors`` (the TangoFlux release), default config;
          - a single weights file with diffusers key names (``vae.safetensors``).
        Weight norm may be stored as ``weight_g``/``weight_v`` or as
        ``parametrizations.weight.original0``/``original1``. ``config`` overrides config.json.
        """
        path = Path(path)
        looked = []
        weights = None
        if path.is_dir():
            for d in (path, path / "vae"):
                cand = d / "diffusion_pytorch_model.safetensors"
                looked.append(cand)
                if cand.is_file():
                    weights = cand
                    cfg_file = d / "config.json"
                    if config is None:
                        if not cfg_file.is_file():
                            raise CheckpointError(f"OobleckVAE: {cand} found but no config.json beside it ({cfg_file})")
                        config = OobleckConfig.from_dict(json.loads(cfg_file.read_text()))
                    break
            if weights is None:
                cand = path / "vae.safetensors"
                looked.append(cand)
                if cand.is_file():
                    weights = cand
        elif path.is_file():
            weights = path
        else:
            looked.append(path)
        if weights is None:
            raise CheckpointError("OobleckVAE: no weights found; looked for " + ", ".join(str(p) for p in looked))
        model = cls(config)
        load_into(model, convert_state_dict(read_state_dict(weights)), source=str(weights))
        return model.to(device=device, dtype=dtype).eval()


def convert_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename torch's parametrised weight norm (``parametrizations.weight.original0/1``) to
    ``weight_g``/``weight_v``; every other diffusers name is already ours."""
    out = {}
    for k, v in state.items():
        k = k.replace(".parametrizations.weight.original0", ".weight_g")
        k = k.replace(".parametrizations.weight.original1", ".weight_v")
        if k in out:
            raise CheckpointError(f"OobleckVAE: tensor {k} appears twice (both weight-norm namings)")
        out[k] = v
    return out
