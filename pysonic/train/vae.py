"""Oobleck VAE training on the shared loop (:class:`pysonic.train.Trainer`).

Loss per batch of random crops ``x`` (``[B, C, crop]``):

- reconstruction of a *sample* of the posterior ``z = mean + std * eps`` (so the decoder learns
  to decode the neighbourhood of the mean, which the flow model's samples land in):
  ``l1_weight * |x' - x| + stft_weight * MultiResolutionSTFT(x', x) + mel_weight * MultiScaleMel(x', x)``
  (:mod:`pysonic.train.losses`);
- ``kl_weight * KL(N(mean, std^2) || N(0, 1))`` averaged over latent elements (Stable Audio's
  small KL keeps the latent scale near 1, which the flow model's ``N(0, 1)`` start assumes).

No adversarial term: SonicSynth's tones, noises and clicks are reconstructed well enough by the
spectral losses alone (an adversarial stage is optional in the recipe and not implemented here).

Crops: each item's crop start is drawn from a generator seeded by ``(seed, index)``; items shorter
than the crop are zero-padded. With a procedural dataset (SonicSynth) an index is seen once, so a
crop per index is a fresh crop; a resume replays the same batches (the loader's state).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from pysonic.codecs.oobleck import OobleckVAE
from pysonic.train.loop import TrainConfig, Trainer

__all__ = ["VAETrainConfig", "VAETrainer", "VAETrainModule", "kl_to_standard_normal", "random_crop", "collate_crops"]

_MIX = (0x9E3779B97F4A7C15, 0x94D049BB133111EB)


@dataclass
class VAETrainConfig(TrainConfig):
    """:class:`TrainConfig` plus the VAE's loss weights and crop length."""

    crop_seconds: float = 1.0
    l1_weight: float = 1.0
    stft_weight: float = 1.0
    mel_weight: float = 1.0
    kl_weight: float = 1e-4
    # floors of the log spectra, in the losses' magnitude units: a floor near zero (the losses'
    # defaults) makes an inaudible noise floor cost as much as a wrong pitch, and silent stretches
    # (padding, SonicSynth's silence, gaps between clicks) then drive the decoder to output nothing
    stft_eps: float = 0.1
    mel_floor: float = 1e-2
    sample_posterior: bool = True  # decode mean + std * eps (False: the mean)
    # Peak-normalise each crop to a random level in [lo, hi] dB full scale (None: keep the data's
    # level). Quiet data (SonicSynth's rms is ~0.05) lets the decoder settle on a constant output
    # in the first steps (measured: sines at amplitude 0.05 collapse, at 0.5 they are learned).
    peak_db: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        if not self.crop_seconds > 0:
            raise ValueError(f"VAETrainConfig: crop_seconds must be > 0, got {self.crop_seconds}")
        for name in ("l1_weight", "stft_weight", "mel_weight", "kl_weight", "stft_eps", "mel_floor"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v >= 0):
                raise ValueError(f"VAETrainConfig: {name} must be a number >= 0, got {v!r}")
        if self.peak_db is not None:
            lo, hi = (float(v) for v in self.peak_db)
            if not lo <= hi <= 0:
                raise ValueError(f"VAETrainConfig: peak_db must be (lo, hi) with lo <= hi <= 0, got {self.peak_db!r}")
            self.peak_db = (lo, hi)
        if self.l1_weight + self.stft_weight + self.mel_weight <= 0:
            raise ValueError("VAETrainConfig: at least one of l1_weight, stft_weight, mel_weight must be > 0")


def kl_to_standard_normal(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``KL(N(mean, std^2) || N(0, 1))`` per element, averaged: ``0.5 (mean^2 + std^2 - 1 - log std^2)``."""
    mean, std = mean.float(), std.float()
    return 0.5 * (mean.pow(2) + std.pow(2) - 1.0 - 2.0 * torch.log(std)).mean()


def random_crop(wav: torch.Tensor, length: int, generator: torch.Generator) -> torch.Tensor:
    """A ``length``-sample window of ``wav`` ``[C, N]`` at a start drawn from ``generator``
    (zero-padded at the end when ``N < length``)."""
    if wav.dim() != 2:
        raise ValueError(f"random_crop: wav must be [C, N], got shape {tuple(wav.shape)}")
    n = wav.shape[-1]
    if n <= length:
        return torch.nn.functional.pad(wav, (0, length - n))
    start = int(torch.randint(0, n - length + 1, (1,), generator=generator))
    return wav[:, start : start + length]


def collate_crops(items: Sequence[Mapping[str, Any]], *, crop: int, channels: int, seed: int,
                  peak_db: tuple[float, float] | None = None) -> dict[str, torch.Tensor]:
    """Items with ``"audio"`` ``[C, N]`` and ``"index"`` -> ``{"audio": [B, channels, crop], "index": [B]}``;
    with ``peak_db``, each (non-silent) crop is scaled to a peak drawn uniformly in that dB range."""
    if not items:
        raise ValueError("collate_crops: empty batch")
    wavs, idx = [], []
    for it in items:
        w = torch.as_tensor(it["audio"], dtype=torch.float32)
        if w.dim() == 1:
            w = w[None]
        if w.dim() != 2 or w.shape[-1] == 0:
            raise ValueError(f"collate_crops: 'audio' must be a non-empty [C, N] waveform, got shape {tuple(w.shape)}")
        if w.shape[0] != channels:
            if w.shape[0] == 1:
                w = w.expand(channels, -1)
            elif channels == 1:
                w = w.mean(0, keepdim=True)
            else:
                raise ValueError(f"collate_crops: cannot fit {w.shape[0]} channels to {channels}")
        i = int(it["index"])
        g = torch.Generator().manual_seed((seed * _MIX[0] + i * _MIX[1]) % (2**63 - 1))
        c = random_crop(w, crop, g)
        if peak_db is not None:
            level = peak_db[0] + (peak_db[1] - peak_db[0]) * float(torch.rand((), generator=g))
            peak = float(c.abs().max())
            if peak > 1e-6:
                c = c * (10 ** (level / 20) / peak)
        wavs.append(c)
        idx.append(i)
    return {"audio": torch.stack(wavs), "index": torch.tensor(idx, dtype=torch.long)}


class _CropCollate:
    """Picklable collate (DataLoader workers)."""

    def __init__(self, crop: int, channels: int, seed: int, peak_db=None) -> None:
        self.kw = dict(crop=crop, channels=channels, seed=seed, peak_db=peak_db)

    def __call__(self, items):
        return collate_crops(items, **self.kw)


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = self.dataset[i]
        if not isinstance(item, Mapping) or "audio" not in item:
            raise TypeError(f"VAETrainer: items must be dicts with 'audio', item {i} is {type(item).__name__}")
        return {"audio": item["audio"], "index": int(item.get("index", i))}


class VAETrainModule(nn.Module):
    """What the trainer optimises (and DDP wraps): ``forward(x, eps)`` -> ``(reconstruction, mean, std)``
    with the decoder fed ``mean + std * eps`` (``eps=None``: the mean)."""

    def __init__(self, vae: OobleckVAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, eps: torch.Tensor | None = None):
        mean, std = self.vae.encode_distribution(x)
        z = mean if eps is None else mean + std * eps.to(std.dtype)
        y = self.vae.decoder(self.vae.unpack(z.to(self.vae._dtype())))[..., : x.shape[-1]]
        return y, mean, std


class VAETrainer(Trainer):
    """Trains an :class:`OobleckVAE` (encoder and decoder) on waveforms.

    Args:
        model: the VAE (trained in place).
        config: :class:`VAETrainConfig`.
        dataset: map-style dataset of dicts with ``"audio"`` ``[C, N]`` at the VAE's sample rate
            (e.g. SonicSynth); items of any length (cropped / padded to ``crop_seconds``).

    ``final.safetensors`` holds the VAE's state dict (diffusers' AutoencoderOobleck key names;
    EMA weights with EMA on).
    """

    def __init__(self, model: OobleckVAE, config: VAETrainConfig, dataset, *,
                 optimizer: torch.optim.Optimizer | None = None, dist=None) -> None:
        if not isinstance(model, OobleckVAE):
            raise TypeError(f"VAETrainer: model must be an OobleckVAE, got {type(model).__name__}")
        if not isinstance(config, VAETrainConfig):
            raise TypeError(f"VAETrainer: config must be a VAETrainConfig, got {type(config).__name__}")
        from pysonic.train.losses import MultiResolutionSTFTLoss, MultiScaleMelLoss

        hop = model.hop_length
        crop = max(hop, int(round(config.crop_seconds * model.sampling_rate / hop)) * hop)  # whole latent frames
        self.crop = crop
        collate = _CropCollate(crop, model.config.audio_channels, config.seed, config.peak_db)
        self.vae = model
        super().__init__(VAETrainModule(model), config, _Indexed(dataset), collate_fn=collate, optimizer=optimizer, dist=dist)
        # spectral losses sized to the crop (the largest FFT is at most the crop length)
        res = [(n, n // 4) for n in (256, 512, 1024, 2048) if n <= crop] or [(crop, max(1, crop // 4))]
        self.stft_loss = MultiResolutionSTFTLoss(res, eps=config.stft_eps).to(self.dist.device)
        top = max(6, min(11, crop.bit_length() - 1))
        self.mel_loss = MultiScaleMelLoss(model.sampling_rate, range_start=5, range_end=top,
                                          n_mels=64, floor=config.mel_floor).to(self.dist.device)

    def final_weights(self) -> dict[str, torch.Tensor]:
        """The VAE's own keys (no wrapper prefix)."""
        return {k[len("vae."):]: v for k, v in super().final_weights().items() if k.startswith("vae.")}

    def compute_loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        x = batch["audio"].to(self.dist.device)
        hop = self.vae.hop_length
        eps = None
        if cfg.sample_posterior:  # global RNG: restored exactly on resume by the core
            eps = torch.randn(x.shape[0], self.vae.config.latent_channels, -(-x.shape[-1] // hop), device=x.device)
        y, mean, std = model(x, eps)
        with torch.autocast(self.dist.device.type, enabled=False):
            y32, x32 = y.float(), x.float()
            from pysonic.train.losses import waveform_l1

            l1 = waveform_l1(y32, x32)
            # spectral convergence divides by the target's norm: silent items (SonicSynth's
            # "silence") are left to the L1 and mel terms
            keep = x32.pow(2).mean(dim=(1, 2)) > 1e-8
            zero = y32.new_zeros(())
            stft = self.stft_loss(y32[keep], x32[keep]) if cfg.stft_weight and bool(keep.any()) else zero
            mel = self.mel_loss(y32, x32) if cfg.mel_weight else zero  # terms weighted 0 are not computed
            kl = kl_to_standard_normal(mean, std)
            loss = cfg.l1_weight * l1 + cfg.stft_weight * stft + cfg.mel_weight * mel + cfg.kl_weight * kl
        return loss, {"l1": float(l1.detach()), "stft": float(stft.detach()), "mel": float(mel.detach()),
                      "kl": float(kl.detach()), "latent_std": float(mean.detach().float().std())}
