"""WaveGrad configurations: the ivanvovk/WaveGrad default and the LMNT ``wavegrad`` package's.

The network is the same family in both (Chen et al., 2020, figure 3: five UBlocks with factors
5, 5, 3, 2, 2 and four DBlocks mirroring them); they differ in mel bands, resampling mode, the
scale of the noise-level encoding, the mel front end and where the sampler clamps.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass
class MelConfig:
    """The mel front end (see :mod:`pysonic.models.wavegrad.mel`)."""

    sample_rate: int = 22050
    n_fft: int = 1024
    win_length: int = 1024
    hop_length: int = 300
    f_min: float = 80.0
    f_max: float = 8000.0
    n_mels: int = 80
    power: float = 2.0  # |STFT| ** power before the mel matrix (torchaudio's default 2)
    normalized: bool = False  # divide the STFT by sqrt(sum(window ** 2)) (torchaudio ``normalized=True``)
    # "log10": ivanvovk's log10 with log(0) -> 0 and the last frame dropped;
    # "lmnt_db": the LMNT package's 20 * log10(clamp(x, 1e-5)) - 20, mapped to [0, 1] via (x + 100) / 100.
    compression: str = "log10"
    drop_last_frame: bool = True


@dataclass
class WaveGradConfig:
    """Hyperparameters of the network and its sampler.

    Field names follow ivanvovk/WaveGrad's ``model_config`` (``configs/default.json``).
    """

    n_mels: int = 80
    factors: list[int] = field(default_factory=lambda: [5, 5, 3, 2, 2])  # UBlock upsampling factors
    upsampling_preconv_out_channels: int = 768
    upsampling_out_channels: list[int] = field(default_factory=lambda: [512, 512, 256, 128, 128])
    upsampling_dilations: list[list[int]] = field(
        default_factory=lambda: [[1, 2, 1, 2], [1, 2, 1, 2], [1, 2, 4, 8], [1, 2, 4, 8], [1, 2, 4, 8]]
    )
    downsampling_preconv_out_channels: int = 32
    downsampling_out_channels: list[int] = field(default_factory=lambda: [128, 128, 256, 512])
    downsampling_dilations: list[list[int]] = field(default_factory=lambda: [[1, 2, 4]] * 4)
    interpolation: str = "linear"  # "linear" (ivanvovk, align_corners=False) or "nearest" (LMNT)
    pe_scale: float = 5000.0  # noise level multiplier in the positional encoding (ivanvovk LINEAR_SCALE; LMNT 1)
    # Where the sampler clamps to [-1, 1]: "denoised" = the predicted clean signal before the
    # posterior mean (ivanvovk ``clip_denoised=True``), "output" = each new sample (LMNT).
    clip: str = "denoised"
    # The training noise schedule: linear betas (paper section 4; both implementations).
    train_steps: int = 1000
    train_betas_range: tuple[float, float] = (1e-6, 0.01)
    mel: MelConfig = field(default_factory=MelConfig)

    def __post_init__(self):
        self.validate()

    @property
    def hop_length(self) -> int:
        return math.prod(self.factors)

    @property
    def sample_rate(self) -> int:
        return self.mel.sample_rate

    def validate(self) -> None:
        n = len(self.factors)
        if n < 1 or any(int(f) < 1 for f in self.factors):
            raise ValueError(f"WaveGradConfig: factors must be positive integers, got {self.factors}")
        if len(self.upsampling_out_channels) != n or len(self.upsampling_dilations) != n:
            raise ValueError(
                f"WaveGradConfig: upsampling_out_channels ({len(self.upsampling_out_channels)}) and "
                f"upsampling_dilations ({len(self.upsampling_dilations)}) need one entry per factor ({n})"
            )
        if any(len(d) != 4 for d in self.upsampling_dilations):
            raise ValueError(f"WaveGradConfig: each UBlock takes 4 dilations, got {self.upsampling_dilations}")
        if len(self.downsampling_out_channels) != n - 1 or len(self.downsampling_dilations) != n - 1:
            raise ValueError(
                f"WaveGradConfig: downsampling_out_channels and downsampling_dilations need len(factors) - 1 = {n - 1} entries"
            )
        if self.interpolation not in ("linear", "nearest"):
            raise ValueError(f"WaveGradConfig: interpolation must be 'linear' or 'nearest', got {self.interpolation!r}")
        if self.clip not in ("denoised", "output"):
            raise ValueError(f"WaveGradConfig: clip must be 'denoised' or 'output', got {self.clip!r}")
        if self.mel.n_mels != self.n_mels:
            raise ValueError(f"WaveGradConfig: n_mels {self.n_mels} != mel.n_mels {self.mel.n_mels}")
        if self.mel.hop_length != self.hop_length:
            raise ValueError(
                f"WaveGradConfig: the product of factors {self.factors} = {self.hop_length} must equal the mel hop length {self.mel.hop_length}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "WaveGradConfig":
        d = dict(d)
        mel = MelConfig(**d.pop("mel", {}))
        if "train_betas_range" in d:
            d["train_betas_range"] = tuple(d["train_betas_range"])
        return cls(**d, mel=mel)


def ivanvovk_default() -> WaveGradConfig:
    """ivanvovk/WaveGrad ``configs/default.json``: 15,810,401 parameters, hop 300, 22,050 Hz, 80 mels."""
    return WaveGradConfig()


def lmnt_default() -> WaveGradConfig:
    """The LMNT ``wavegrad`` package (``wavegrad/model.py``, ``params.py``, ``preprocess.py``).

    128 mel bands (torchaudio's default, its ``first_conv`` reads 128 channels), nearest-neighbour
    resampling, the plain noise level in the encoding, clamping of every sample, and its mel:
    n_fft 2048 for a 1200-sample window, 20 Hz to Nyquist, magnitude (power 1), normalised STFT,
    dB mapped to [0, 1].
    """
    mel = MelConfig(
        sample_rate=22050, n_fft=2048, win_length=1200, hop_length=300, f_min=20.0, f_max=11025.0,
        n_mels=128, power=1.0, normalized=True, compression="lmnt_db", drop_last_frame=False,
    )
    return WaveGradConfig(n_mels=128, interpolation="nearest", pe_scale=1.0, clip="output", mel=mel)


def from_ivanvovk_json(obj: Mapping[str, Any]) -> WaveGradConfig:
    """Build a config from ivanvovk/WaveGrad's JSON config (``model_config`` + ``data_config``)."""
    try:
        mc, dc = obj["model_config"], obj["data_config"]
    except (KeyError, TypeError) as exc:
        raise ValueError("ivanvovk WaveGrad config: expected 'model_config' and 'data_config' entries") from exc
    train = obj.get("training_config", {}).get("training_noise_schedule", {})
    mel = MelConfig(
        sample_rate=int(dc["sample_rate"]), n_fft=int(dc["n_fft"]), win_length=int(dc["win_length"]),
        hop_length=int(dc["hop_length"]), f_min=float(dc["f_min"]), f_max=float(dc["f_max"]),
        n_mels=int(dc["n_mels"]),
    )
    if int(mc.get("downsampling_preconv_out_channels", 32)) != 32:
        # ivanvovk's network hard-codes 32 input channels for its first FiLM.
        raise ValueError("ivanvovk WaveGrad config: downsampling_preconv_out_channels must be 32")
    return WaveGradConfig(
        n_mels=int(dc["n_mels"]),
        factors=[int(f) for f in mc["factors"]],
        upsampling_preconv_out_channels=int(mc["upsampling_preconv_out_channels"]),
        upsampling_out_channels=[int(c) for c in mc["upsampling_out_channels"]],
        upsampling_dilations=[[int(x) for x in d] for d in mc["upsampling_dilations"]],
        downsampling_preconv_out_channels=32,
        downsampling_out_channels=[int(c) for c in mc["downsampling_out_channels"]],
        downsampling_dilations=[[int(x) for x in d] for d in mc["downsampling_dilations"]],
        interpolation="linear", pe_scale=5000.0, clip="denoised",
        train_steps=int(train.get("n_iter", 1000)),
        train_betas_range=tuple(float(b) for b in train.get("betas_range", (1e-6, 0.01))),
        mel=mel,
    )
