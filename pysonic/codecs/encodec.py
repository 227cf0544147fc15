"""EnCodec (Défossez et al. 2022, arXiv:2210.13438): SEANet encoder/decoder around a residual VQ.

Published configurations (presets on :class:`EncodecConfig`):

- ``encodec_24khz``: mono, causal, weight norm, 1.5/3/6/12/24 kbps (2..32 codebooks of 1024).
- ``encodec_48khz``: stereo, non-causal, time group norm, 3/6/12/24 kbps, input split into 1 s
  segments overlapping by 1 %, each normalised by its RMS (the scale is sent with the codes).
- ``encodec_32khz``: the MusicGen/AudioGen codec: mono, non-causal, 64 filters, ratios
  (8, 5, 4, 4), identity skips, 4 codebooks of 2048 at 2.2 kbps.

Codes are ``[B, n_q, T]``. For segmented models the segments' frames are concatenated along T
(every segment but the last has ``ceil(segment * sample_rate / hop)`` frames) and ``scales`` is
``[B, S]``, one RMS per segment.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn

from pysonic.checkpoints import CheckpointError, load_into, read_state_dict
from pysonic.checkpoints import encodec as convert
from pysonic.nn.rvq import ResidualVectorQuantizer
from pysonic.nn.seanet import SEANetDecoder, SEANetEncoder, SEANetStream


@dataclass(frozen=True)
class EncodecConfig:
    """Hyperparameters; defaults are the 24 kHz model's (reference code and paper)."""

    sample_rate: int = 24_000
    channels: int = 1
    target_bandwidths: tuple[float, ...] = (1.5, 3.0, 6.0, 12.0, 24.0)  # kbps
    dimension: int = 128  # latent and codebook size
    n_filters: int = 32
    ratios: tuple[int, ...] = (8, 5, 4, 2)  # decoder upsampling order; hop = prod = 320
    n_residual_layers: int = 1
    kernel_size: int = 7
    last_kernel_size: int = 7
    residual_kernel_size: int = 3
    dilation_base: int = 2
    causal: bool = True
    norm: str = "weight_norm"  # or "time_group_norm" (48 kHz), "none"
    pad_mode: str = "reflect"
    true_skip: bool = False  # identity residual shortcuts (MusicGen 32 kHz codec)
    compress: int = 2
    lstm: int = 2  # LSTM layers after the encoder convs / before the decoder's
    trim_right_ratio: float = 1.0
    bins: int = 1024  # codebook entries
    n_q: int | None = None  # codebooks; None: as many as the highest bandwidth needs
    normalize: bool = False  # per-segment RMS normalisation (48 kHz)
    segment: float | None = None  # seconds per segment (48 kHz: 1.0); None: whole input
    overlap: float = 0.01  # fraction of a segment shared with the next

    @classmethod
    def encodec_24khz(cls, **overrides) -> "EncodecConfig":
        return cls(**overrides)

    @classmethod
    def encodec_48khz(cls, **overrides) -> "EncodecConfig":
        base = dict(sample_rate=48_000, channels=2, target_bandwidths=(3.0, 6.0, 12.0, 24.0), causal=False,
                    norm="time_group_norm", normalize=True, segment=1.0, overlap=0.01)
        return cls(**{**base, **overrides})

    @classmethod
    def encodec_32khz(cls, **overrides) -> "EncodecConfig":
        base = dict(sample_rate=32_000, target_bandwidths=(2.2,), n_filters=64, ratios=(8, 5, 4, 4),
                    causal=False, true_skip=True, bins=2048)
        return cls(**{**base, **overrides})

    @property
    def hop_length(self) -> int:
        return math.prod(self.ratios)

    @property
    def frame_rate(self) -> int:
        return math.ceil(self.sample_rate / self.hop_length)

    @property
    def bits_per_codebook(self) -> int:
        return int(math.log2(self.bins))

    @property
    def num_quantizers(self) -> int:
        if self.n_q is not None:
            return self.n_q
        return int(1000 * self.target_bandwidths[-1] // (self.frame_rate * self.bits_per_codebook))

    def n_q_for_bandwidth(self, bandwidth: float | None) -> int:
        """Codebooks used at ``bandwidth`` kbps (None: all). Unknown bandwidths are an error."""
        if bandwidth is None:
            return self.num_quantizers
        if not any(math.isclose(bandwidth, b) for b in self.target_bandwidths):
            raise ValueError(f"EncodecModel: bandwidth {bandwidth} kbps is not one of this model's "
                             f"{list(self.target_bandwidths)}")
        per_q = self.bits_per_codebook * self.frame_rate / 1000  # kbps per codebook
        return max(1, min(self.num_quantizers, int(math.floor(bandwidth / per_q + 1e-9))))


def _linear_overlap_add(frames: list[torch.Tensor], stride: int) -> torch.Tensor:
    """Sum of frames ``[B, C, L_i]`` placed ``stride`` apart, each weighted by a triangle peaking
    at its centre, divided by the summed weights (so a lone frame passes through unchanged)."""
    length = frames[0].shape[-1]
    total = stride * (len(frames) - 1) + frames[-1].shape[-1]
    t = torch.linspace(0, 1, length + 2, device=frames[0].device, dtype=frames[0].dtype)[1:-1]
    weight = 0.5 - (t - 0.5).abs()
    out = frames[0].new_zeros(*frames[0].shape[:-1], total)
    sum_weight = frames[0].new_zeros(total)
    for i, frame in enumerate(frames):
        n = frame.shape[-1]
        out[..., i * stride : i * stride + n] += weight[:n] * frame
        sum_weight[i * stride : i * stride + n] += weight[:n]
    return out / sum_weight


class EncodecModel(nn.Module):
    """EnCodec: ``encode(wav)`` -> codes, ``decode(codes)`` -> wav.

    Attributes: ``sample_rate``, ``channels``, ``frame_rate`` (code frames per second),
    ``bandwidths`` (kbps), ``hop_length``, ``config``.
    """

    def __init__(self, config: EncodecConfig | None = None) -> None:
        super().__init__()
        config = config or EncodecConfig()
        self.config = config
        arch = dict(channels=config.channels, dimension=config.dimension, n_filters=config.n_filters,
                    ratios=config.ratios, n_residual_layers=config.n_residual_layers,
                    kernel_size=config.kernel_size, last_kernel_size=config.last_kernel_size,
                    residual_kernel_size=config.residual_kernel_size, dilation_base=config.dilation_base,
                    causal=config.causal, norm=config.norm, pad_mode=config.pad_mode,
                    true_skip=config.true_skip, compress=config.compress, lstm=config.lstm)
        self.encoder = SEANetEncoder(**arch)
        self.decoder = SEANetDecoder(**arch, trim_right_ratio=config.trim_right_ratio)
        if 2 ** config.bits_per_codebook != config.bins:
            raise ValueError(f"EncodecModel: bins must be a power of 2, got {config.bins}")
        per_q = config.bits_per_codebook * config.frame_rate / 1000
        if int(math.floor(config.target_bandwidths[-1] / per_q + 1e-9)) > config.num_quantizers:
            raise ValueError(f"EncodecModel: {config.target_bandwidths[-1]} kbps needs more than the "
                             f"{config.num_quantizers} codebooks configured")
        self.quantizer = ResidualVectorQuantizer(dim=config.dimension, n_q=config.num_quantizers, bins=config.bins)

    sample_rate = property(lambda self: self.config.sample_rate)
    channels = property(lambda self: self.config.channels)
    frame_rate = property(lambda self: self.config.frame_rate)
    hop_length = property(lambda self: self.config.hop_length)
    bandwidths = property(lambda self: tuple(self.config.target_bandwidths))

    # ------------------------------------------------------------------ segments
    def _segment_length(self) -> int | None:
        return None if self.config.segment is None else int(self.config.segment * self.sample_rate)

    def _segment_stride(self) -> int | None:
        seg = self._segment_length()
        return None if seg is None else max(1, int((1 - self.config.overlap) * seg))

    # ------------------------------------------------------------------ encode
    def _check_wav(self, wav: torch.Tensor) -> None:
        if not isinstance(wav, torch.Tensor):
            raise TypeError(f"EncodecModel.encode: wav must be a tensor, got {type(wav).__name__}")
        if not wav.is_floating_point():
            raise TypeError(f"EncodecModel.encode: wav must be floating point, got {wav.dtype}")
        if wav.dim() != 3:
            raise ValueError(f"EncodecModel.encode: wav must be [B, C, N], got shape {tuple(wav.shape)}")
        if wav.shape[1] != self.channels:
            raise ValueError(f"EncodecModel.encode: this model takes {self.channels} channel(s), wav has "
                             f"{wav.shape[1]} (remix first)")
        if wav.shape[0] == 0 or wav.shape[-1] == 0:
            raise ValueError(f"EncodecModel.encode: empty audio, shape {tuple(wav.shape)}")
        # One reduction pass: a finite sum means every sample is finite (the exact check only
        # runs when the sum is not, e.g. for huge but finite samples that overflow it).
        if not bool(torch.isfinite(wav.sum())) and not bool(torch.isfinite(wav).all()):
            raise ValueError("EncodecModel.encode: wav contains NaN or Inf samples")

    @torch.no_grad()
    def encode(self, wav: torch.Tensor, bandwidth: float | None = None):
        """Encode audio.

        Args:
            wav: ``[B, channels, N]`` float audio at ``sample_rate``. Samples beyond [-1, 1] are
                encoded as they are (no clipping); silence is valid input.
            bandwidth: kbps, one of ``bandwidths``; None uses every codebook (the highest).

        Returns:
            codes ``[B, n_q, T]`` int64 with ``T = ceil(N / hop)`` (per segment for segmented
            models); for models with ``normalize`` (48 kHz) the tuple ``(codes, scales)`` with
            ``scales: [B, S]``.
        """
        self._check_wav(wav)
        n_q = self.config.n_q_for_bandwidth(bandwidth)
        wav = wav.to(self.encoder.layers[0].bias.dtype)
        length = wav.shape[-1]
        seg, stride = self._segment_length(), self._segment_stride()
        if seg is None:
            seg = stride = length
        codes, scales = [], []
        for offset in range(0, length, stride):
            frame = wav[..., offset : offset + seg]
            if self.config.normalize:
                # RMS of the mono mix; 1e-8 keeps silence finite (it encodes as zeros / scale 1e-8).
                scale = frame.mean(dim=1, keepdim=True).pow(2).mean(dim=2, keepdim=True).sqrt() + 1e-8
                frame = frame / scale
                scales.append(scale.view(-1, 1))
            codes.append(self.quantizer.encode(self.encoder(frame), n_q=n_q))
        codes = torch.cat(codes, dim=-1)
        if self.config.normalize:
            return codes, torch.cat(scales, dim=1).float()
        return codes

    # ------------------------------------------------------------------ decode
    def decode(self, codes: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
        """Decode codes ``[B, n_q, T]`` (any ``n_q`` up to the model's) to audio ``[B, C, T * hop]``
        (segmented models: the overlap-added length). ``scales [B, S]`` is required for models with
        ``normalize`` and refused otherwise."""
        if not isinstance(codes, torch.Tensor):
            raise TypeError(f"EncodecModel.decode: codes must be a tensor, got {type(codes).__name__}")
        if codes.dim() != 3 or codes.shape[0] == 0 or codes.shape[-1] == 0:
            raise ValueError(f"EncodecModel.decode: codes must be a non-empty [B, n_q, T], got {tuple(codes.shape)}")
        seg = self._segment_length()
        if seg is None:
            if scales is not None:
                raise ValueError("EncodecModel.decode: this model does not use scales")
            return self.decoder(self.quantizer.decode(codes))
        seg_frames = math.ceil(seg / self.hop_length)
        T = codes.shape[-1]
        n_seg = math.ceil(T / seg_frames)
        if self.config.normalize:
            if scales is None:
                raise ValueError("EncodecModel.decode: this model needs the scales returned by encode")
            if scales.dim() != 2 or scales.shape[0] != codes.shape[0] or scales.shape[1] != n_seg:
                raise ValueError(f"EncodecModel.decode: scales must be [B={codes.shape[0]}, S={n_seg}] for "
                                 f"{T} frames of {seg_frames}-frame segments, got {tuple(scales.shape)}")
            if not bool(torch.isfinite(scales).all()):
                raise ValueError("EncodecModel.decode: scales contain NaN or Inf")
        elif scales is not None:
            raise ValueError("EncodecModel.decode: this model does not use scales")
        frames = []
        for s in range(n_seg):
            out = self.decoder(self.quantizer.decode(codes[..., s * seg_frames : (s + 1) * seg_frames]))
            if scales is not None:
                out = out * scales[:, s].to(out.dtype).view(-1, 1, 1)
            frames.append(out)
        return _linear_overlap_add(frames, self._segment_stride())

    # ------------------------------------------------------------------ streaming
    def _check_streamable(self, op: str) -> None:
        if not self.config.causal or self.config.segment is not None:
            raise ValueError(f"EncodecModel.{op}: streaming needs a causal, unsegmented model (the 24 kHz "
                             "one); segmented models (48 kHz) already encode segment by segment in encode()")

    @torch.no_grad()
    def encode_stream(self, chunks: Iterable[torch.Tensor], bandwidth: float | None = None) -> Iterator[torch.Tensor]:
        """Encode audio arriving in chunks ``[B, channels, n_i]`` (any lengths); yields codes
        ``[B, n_q, t_i]`` as soon as frames are complete. Concatenated, the codes equal
        ``encode`` of the whole signal (causal models only), with memory bounded by the chunk.
        Latency: the first codes wait until every conv's left (reflect) pad can be built from
        the signal's start (7 frames for the published layout); after that, one hop."""
        self._check_streamable("encode_stream")
        n_q = self.config.n_q_for_bandwidth(bandwidth)
        stream, seen = SEANetStream(self.encoder), 0
        dtype = self.encoder.layers[0].bias.dtype
        for chunk in chunks:
            if chunk.shape[-1] == 0:
                continue
            self._check_wav(chunk)
            seen += chunk.shape[-1]
            emb = stream.step(chunk.to(dtype))
            if emb is not None and emb.shape[-1]:
                yield self.quantizer.encode(emb, n_q=n_q)
        if seen == 0:
            raise ValueError("EncodecModel.encode_stream: empty audio (no samples in any chunk)")
        emb = stream.flush()
        if emb is not None and emb.shape[-1]:
            yield self.quantizer.encode(emb, n_q=n_q)

    @torch.no_grad()
    def decode_stream(self, code_chunks: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Decode codes arriving in chunks ``[B, n_q, t_i]``; yields audio as it is complete.
        Concatenated, it equals ``decode`` of all the codes (causal models only)."""
        self._check_streamable("decode_stream")
        stream = SEANetStream(self.decoder)
        for codes in code_chunks:
            if codes.shape[-1] == 0:
                continue
            out = stream.step(self.quantizer.decode(codes))
            if out is not None and out.shape[-1]:
                yield out
        out = stream.flush()
        if out is not None and out.shape[-1]:
            yield out

    def encode_chunked(self, wav: torch.Tensor, bandwidth: float | None = None, *, chunk_seconds: float = 1.0):
        """``encode`` with bounded working memory: causal models stream ``chunk_seconds`` at a
        time; segmented models are processed segment by segment anyway. Same result as ``encode``
        (up to ties in float rounding)."""
        if self.config.segment is not None:
            return self.encode(wav, bandwidth)
        self._check_wav(wav)
        step = max(1, int(chunk_seconds * self.sample_rate))
        chunks = (wav[..., i : i + step] for i in range(0, wav.shape[-1], step))
        return torch.cat(list(self.encode_stream(chunks, bandwidth)), dim=-1)

    @torch.no_grad()
    def decode_chunked(self, codes: torch.Tensor, scales: torch.Tensor | None = None, *,
                       chunk_frames: int | None = None) -> torch.Tensor:
        """``decode`` with bounded working memory (``chunk_frames``: default one second)."""
        if self.config.segment is not None:
            return self.decode(codes, scales)
        if scales is not None:
            raise ValueError("EncodecModel.decode_chunked: this model does not use scales")
        if codes.dim() != 3 or codes.shape[-1] == 0:
            raise ValueError(f"EncodecModel.decode_chunked: codes must be a non-empty [B, n_q, T], got {tuple(codes.shape)}")
        step = chunk_frames or self.frame_rate
        chunks = (codes[..., i : i + step] for i in range(0, codes.shape[-1], step))
        return torch.cat(list(self.decode_stream(chunks)), dim=-1)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | Path, *, config: EncodecConfig | None = None, **overrides) -> "EncodecModel":
        """Load a checkpoint.

        Args:
            path: a ``transformers`` EnCodec directory (``config.json`` + ``model.safetensors``),
                or a checkpoint file of the ``encodec`` package (read with ``weights_only=True``).
            config: the full configuration (skips reading/inferring it).
            **overrides: ``EncodecConfig`` fields replacing the read or inferred ones. For an
                ``encodec`` package file the architecture is read off the tensors; sample rate,
                causality and segmenting come from the preset the architecture matches (24 kHz mono
                weight norm; 48 kHz stereo time group norm) or must be given here.
        """
        path = Path(path)
        if path.is_dir():
            cfg_file, weights = path / "config.json", path / "model.safetensors"
            if not weights.is_file() and (path / "pytorch_model.bin").is_file():
                weights = path / "pytorch_model.bin"
            for f in (cfg_file, weights):
                if not f.is_file():
                    raise CheckpointError(f"EnCodec directory {path} has no {f.name}")
            state = convert.convert_transformers_state(read_state_dict(weights), source=str(weights))
            if config is None:
                config = EncodecConfig(**convert.transformers_config_fields(cfg_file))
        else:
            state = convert.convert_encodec_package_state(read_state_dict(path), source=str(path))
            if config is None:
                arch = convert.infer_architecture(state)
                config = _package_config(arch, overrides, source=str(path))
        if overrides:
            config = dataclasses.replace(config, **overrides)
        model = cls(config)
        load_into(model, state, source=str(path))
        return model.eval()


def _package_config(arch: dict, overrides: dict, *, source: str) -> EncodecConfig:
    """Config for an ``encodec`` package file: inferred architecture + the matching preset."""
    if arch["channels"] == 1 and arch["norm"] == "weight_norm" and arch["bins"] == 1024:
        preset = EncodecConfig.encodec_24khz()
    elif arch["channels"] == 2 and arch["norm"] == "time_group_norm":
        preset = EncodecConfig.encodec_48khz()
    elif arch["bins"] == 2048 and tuple(arch["ratios"]) == (8, 5, 4, 4):
        preset = EncodecConfig.encodec_32khz()
    elif all(k in overrides for k in ("sample_rate", "causal", "target_bandwidths")):
        preset = EncodecConfig(**{k: overrides[k] for k in ("sample_rate", "causal", "target_bandwidths")})
    else:
        raise CheckpointError(f"{source}: architecture {arch} matches no published EnCodec model; pass "
                              "sample_rate=, causal= and target_bandwidths= (and segment=/normalize= if used)")
    return dataclasses.replace(preset, **arch)


# ---------------------------------------------------------------------------- files (for the CLI)
def encode_file(path_in: str | Path, path_out: str | Path, *, checkpoint: str | Path, bandwidth: float | None = None,
                resample_input: bool = False, chunk_seconds: float | None = None) -> dict:
    """Encode an audio file (anything ``soundfile`` reads) to an ``.npz`` of codes.

    A file at another sample rate or channel count is an error unless ``resample_input``
    (then it is resampled and remixed: mono <-> stereo by averaging / duplicating).
    The npz holds ``codes`` (int16 [1, n_q, T]), ``scales`` (48 kHz models), ``sample_rate``,
    ``channels``, ``num_samples``, ``bandwidth`` and ``checkpoint`` (for ``decode_file``).
    """
    import numpy as np

    from pysonic.audio import load_audio, resample

    model = EncodecModel.from_pretrained(checkpoint)
    try:
        audio, sr = load_audio(path_in)  # [C, N] at the file's rate
    except ValueError as exc:
        raise ValueError(f"encode_file: cannot read audio {path_in}: {exc}") from exc
    wav = audio.unsqueeze(0)  # [1, C, N]
    if sr != model.sample_rate or wav.shape[1] != model.channels:
        if not resample_input:
            raise ValueError(f"encode_file: {path_in} is {sr} Hz with {wav.shape[1]} channel(s); the model "
                             f"takes {model.sample_rate} Hz with {model.channels} (pass resample_input/--resample)")
        if wav.shape[1] != model.channels:
            if model.channels == 1:
                wav = wav.mean(dim=1, keepdim=True)
            elif wav.shape[1] == 1:
                wav = wav.expand(-1, model.channels, -1).contiguous()
            else:
                raise ValueError(f"encode_file: cannot remix {wav.shape[1]} channels to {model.channels}")
        wav = resample(wav, sr, model.sample_rate)
    if chunk_seconds:
        out = model.encode_chunked(wav, bandwidth, chunk_seconds=chunk_seconds)
    else:
        out = model.encode(wav, bandwidth)
    codes, scales = out if isinstance(out, tuple) else (out, None)
    meta = dict(codes=codes.to(torch.int16).numpy(), sample_rate=model.sample_rate, channels=model.channels,
                num_samples=wav.shape[-1], bandwidth=float(bandwidth or model.bandwidths[-1]),
                checkpoint=str(Path(checkpoint).resolve()))
    if scales is not None:
        meta["scales"] = scales.numpy()
    np.savez(str(path_out), **meta)
    return {k: v for k, v in meta.items() if k not in ("codes", "scales")}


def decode_file(path_in: str | Path, path_out: str | Path, *, checkpoint: str | Path | None = None,
                chunk_frames: int | None = None, subtype: str | None = None) -> dict:
    """Decode an ``.npz`` written by :func:`encode_file` to an audio file (``soundfile``:
    format from the extension), trimmed to the original length. ``checkpoint`` defaults to the
    one recorded in the npz. ``subtype``: soundfile's sample format (default: the format's own,
    16-bit PCM for WAV, which clips at full scale; "FLOAT" keeps the decoder's output exactly)."""
    import numpy as np
    import soundfile as sf

    try:
        data = np.load(str(path_in), allow_pickle=False)
        codes = torch.from_numpy(data["codes"].astype(np.int64))
        scales = torch.from_numpy(data["scales"]) if "scales" in data.files else None
        n, recorded = int(data["num_samples"]), str(data["checkpoint"])
    except Exception as exc:
        raise ValueError(f"decode_file: {path_in} is not an EnCodec codes file: {exc}") from exc
    model = EncodecModel.from_pretrained(checkpoint or recorded)
    if int(data["sample_rate"]) != model.sample_rate:
        raise ValueError(f"decode_file: codes are for {int(data['sample_rate'])} Hz, the model is {model.sample_rate} Hz")
    with torch.no_grad():
        if chunk_frames:
            wav = model.decode_chunked(codes, scales, chunk_frames=chunk_frames)
        else:
            wav = model.decode(codes, scales)
    wav = wav[0, :, :n].float()
    try:
        sf.write(str(path_out), wav.T.numpy(), model.sample_rate, subtype=subtype)
    except (TypeError, ValueError, sf.LibsndfileError) as exc:
        raise ValueError(f"decode_file: cannot write {path_out}: {exc}") from exc
    return {"sample_rate": model.sample_rate, "channels": model.channels, "num_samples": wav.shape[-1]}
