"""EnCodec training on the shared loop (:mod:`pysonic.train.loop`).

One step (Défossez et al. 2022, section 3.4, and audiocraft's compression solver):

1. ``wav [B, C, N]`` -> encoder -> residual VQ (straight-through; EMA codebook updates and
   dead-code replacement inside the quantiser, :mod:`pysonic.nn.rvq`) -> decoder -> ``y``. The
   number of codebooks is drawn per step from the model's bandwidths (the paper's bandwidth
   sampling), the same on every process (a function of the seed and the step).
2. Discriminator (optional, :class:`MultiScaleSTFTDiscriminator`): hinge loss on ``wav`` vs
   ``y.detach()``, its own AdamW.
3. Generator: waveform L1, multi-scale mel, optional multi-resolution STFT, and with the
   discriminator its hinge adversarial loss and feature matching. These depend on the model only
   through ``y``: the :class:`Balancer` turns them into one gradient on ``y`` (or, with
   ``balancer: false``, the weighted sum's gradient). The commitment loss is added directly.
   One backward call for both (one DDP reduction).

Checkpoints (core) hold the codec (with the quantiser's EMA state), its optimizer, the
discriminator and its optimizer and the balancer's averages, so resume is exact. At the end
``<out_dir>/encodec/`` holds the trained model in the ``transformers`` layout:
``EncodecModel.from_pretrained(out_dir / "encodec")`` and ``pysonic codec`` read it.

Config file (YAML, JSON or TOML): every :class:`CodecTrainConfig` field, flat; see
``configs/codec/encodec_24khz.yaml``. Run: ``pysonic train codec --config FILE [--set KEY=VALUE]``
(several processes: ``torchrun --nproc_per_node=N -m pysonic train codec --config FILE``).
"""
from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pysonic.codecs.encodec import EncodecConfig, EncodecModel
from pysonic.train.balancer import Balancer
from pysonic.train.config_file import read_config_file
from pysonic.train.discriminators import MultiScaleSTFTDiscriminator
from pysonic.train.loop import TrainConfig, Trainer
from pysonic.train.losses import (MultiResolutionSTFTLoss, MultiScaleMelLoss, feature_matching_loss,
                                  hinge_discriminator_loss, hinge_generator_loss, waveform_l1)

_PRESETS = ("encodec_24khz", "encodec_48khz", "encodec_32khz")


@dataclass
class CodecTrainConfig(TrainConfig):
    """Codec training settings (beside :class:`TrainConfig`'s). Loss weights default to the
    EnCodec paper's (lambda_t 0.1, lambda_f 1, lambda_g 3, lambda_feat 3, commitment 1)."""

    data_dir: str = ""  # folder of audio files (pysonic.data.audio_folder.AudioFolder)
    model: str = "encodec_24khz"  # EncodecConfig preset
    model_overrides: dict = field(default_factory=dict)  # EncodecConfig fields replacing the preset's
    segment_seconds: float = 1.0  # training crop length (EnCodec: 1 s)
    crops_per_file: int = 1  # dataset items per file per epoch
    l1_weight: float = 0.1
    mel_weight: float = 1.0
    stft_weight: float = 0.0  # multi-resolution STFT loss (off in EnCodec)
    adv_weight: float = 3.0
    feat_weight: float = 3.0
    commit_weight: float = 1.0
    balancer: bool = True  # EnCodec's loss balancer; False: plain weighted sum
    balancer_ema_decay: float = 0.999
    adversarial: bool = True  # multi-scale STFT discriminator + feature matching
    disc_filters: int = 32
    disc_n_ffts: tuple = (1024, 2048, 512)
    disc_lr: float | None = None  # default: lr (constant; the LR schedule drives the codec only)
    disc_every: int = 1  # discriminator update every N steps
    mel_range: tuple = (5, 12)  # mel window sizes 2**5 .. 2**11
    n_mels: int = 64
    codebook_decay: float = 0.99
    dead_code_threshold: float = 2.0  # 0: no dead-code replacement
    codebook_data_init: bool = True  # codes start at random vectors of the first batch
    bandwidth_sampling: bool = True  # draw the number of codebooks per step from the bandwidths

    def __post_init__(self) -> None:
        super().__post_init__()
        self.disc_n_ffts = tuple(int(n) for n in self.disc_n_ffts)
        self.mel_range = tuple(int(n) for n in self.mel_range)
        problems = []
        if self.model not in _PRESETS:
            problems.append(f"model must be one of {_PRESETS} (got {self.model!r})")
        if not isinstance(self.model_overrides, dict):
            problems.append("model_overrides must be a mapping of EncodecConfig fields")
        else:
            names = {f.name for f in dataclasses.fields(EncodecConfig)}
            unknown = sorted(set(self.model_overrides) - names)
            if unknown:
                problems.append(f"model_overrides has unknown EncodecConfig fields {unknown}")
        if self.precision == "fp16":
            problems.append("precision 'fp16' is not supported by the codec trainer (use bf16 or fp32)")
        if self.grad_accum != 1:
            problems.append("grad_accum must be 1 for the codec trainer (the GAN step is not split)")
        if not self.segment_seconds > 0:
            problems.append(f"segment_seconds must be > 0 (got {self.segment_seconds})")
        if self.disc_every < 1:
            problems.append(f"disc_every must be >= 1 (got {self.disc_every})")
        weights = {k: getattr(self, k) for k in ("l1_weight", "mel_weight", "stft_weight", "adv_weight",
                                                  "feat_weight", "commit_weight")}
        if any(not w >= 0 for w in weights.values()):
            problems.append(f"loss weights must be >= 0, got {weights}")
        if len(self.mel_range) != 2 or self.mel_range[1] <= self.mel_range[0]:
            problems.append(f"mel_range must be (start, end) with end > start, got {self.mel_range}")
        if problems:
            raise ValueError("CodecTrainConfig: " + "; ".join(problems))

    def encodec_config(self) -> EncodecConfig:
        overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in self.model_overrides.items()}
        return getattr(EncodecConfig, self.model)(**overrides)


def load_config(path: str | Path, **overrides) -> CodecTrainConfig:
    """A :class:`CodecTrainConfig` from a YAML, JSON or TOML file (keys as the fields; unknown
    keys are an error naming them), with ``overrides`` applied on top."""
    raw = read_config_file(path, what="codec training config")
    raw.update(overrides)
    return CodecTrainConfig.from_dict(raw)


class CodecModule(nn.Module):
    """The trainable codec: ``forward(wav, n_q) -> (y, commit_loss, stats)``; ``.codec`` is the
    :class:`EncodecModel` (with the quantiser's EMA state enabled)."""

    def __init__(self, config: EncodecConfig, *, codebook_decay: float = 0.99, dead_code_threshold: float = 2.0,
                 data_init: bool = True) -> None:
        super().__init__()
        self.codec = EncodecModel(config)
        self.codec.quantizer.enable_ema(decay=codebook_decay, dead_code_threshold=dead_code_threshold,
                                        data_init=data_init)

    def forward(self, wav: torch.Tensor, n_q: int | None = None):
        codec = self.codec
        scale = None
        if codec.config.normalize:  # the 48 kHz model codes RMS-normalised segments
            scale = wav.mean(dim=1, keepdim=True).pow(2).mean(dim=2, keepdim=True).sqrt() + 1e-8
            wav = wav / scale
        q = codec.quantizer(codec.encoder(wav), n_q=n_q)
        y = codec.decoder(q.quantized)[..., : wav.shape[-1]]
        if scale is not None:
            y = y * scale
        return y, q.commit_loss, q.stats


class CodecTrainer(Trainer):
    """Trains an EnCodec model (see the module docstring).

    Args:
        config: a :class:`CodecTrainConfig`.
        dataset: items ``[channels, samples]`` at the model's rate; default
            ``AudioFolder(config.data_dir, ...)`` with the model's rate and channels.
        model: a :class:`CodecModule` to start from; default a fresh one of ``config``'s
            architecture, initialised from ``config.seed`` (without touching the global RNG).
        dist: as :class:`Trainer`.
    """

    def __init__(self, config: CodecTrainConfig, dataset=None, *, model: CodecModule | None = None, dist=None) -> None:
        codec_cfg = config.encodec_config()
        if model is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                model = CodecModule(codec_cfg, codebook_decay=config.codebook_decay,
                                    dead_code_threshold=config.dead_code_threshold,
                                    data_init=config.codebook_data_init)
        if dataset is None:
            from pysonic.data.audio_folder import AudioFolder

            if not config.data_dir:
                raise ValueError("CodecTrainer: set data_dir (a folder of audio files) or pass a dataset")
            dataset = AudioFolder(config.data_dir, sample_rate=codec_cfg.sample_rate, channels=codec_cfg.channels,
                                  segment_seconds=config.segment_seconds, crops_per_file=config.crops_per_file,
                                  seed=config.seed)
        super().__init__(model, config, dataset, dist=dist)
        device = self.dist.device
        self.mel_loss = MultiScaleMelLoss(codec_cfg.sample_rate, range_start=config.mel_range[0],
                                          range_end=config.mel_range[1], n_mels=config.n_mels)
        self.stft_loss = MultiResolutionSTFTLoss() if config.stft_weight > 0 else None
        self.disc = self.ddp_disc = self.disc_opt = None
        if config.adversarial:
            self.disc = MultiScaleSTFTDiscriminator(channels=codec_cfg.channels, filters=config.disc_filters,
                                                    n_ffts=config.disc_n_ffts).to(device)
            self.ddp_disc = self.dist.wrap(self.disc)
            self.disc_opt = torch.optim.AdamW(self.disc.parameters(), lr=config.disc_lr or config.lr,
                                              betas=config.betas, weight_decay=config.weight_decay)
        weights = {"l1": config.l1_weight, "mel": config.mel_weight}
        if self.stft_loss is not None:
            weights["stft"] = config.stft_weight
        if self.disc is not None:
            weights.update(adv=config.adv_weight, feat=config.feat_weight)
        self.loss_weights = {k: w for k, w in weights.items() if w > 0}
        if not self.loss_weights:
            raise ValueError("CodecTrainer: every reconstruction/adversarial loss weight is 0")
        self.balancer = Balancer(self.loss_weights, balance_grads=config.balancer, ema_decay=config.balancer_ema_decay)

    @property
    def codec(self) -> EncodecModel:
        return self.model.codec

    def extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"balancer": self.balancer}
        if self.disc is not None:
            state.update(disc=self.disc, disc_opt=self.disc_opt)
        return state

    def sample_n_q(self, step: int) -> int | None:
        """Codebooks for ``step``: a bandwidth drawn from ``(seed, step)`` (same on every process)."""
        if not self.config.bandwidth_sampling:
            return None
        bandwidths = self.codec.config.target_bandwidths
        bw = random.Random(self.config.seed * 1_000_003 + step).choice(list(bandwidths))
        return self.codec.config.n_q_for_bandwidth(bw)

    def _check_finite(self, logs: dict[str, float]) -> None:
        bad = {k: v for k, v in logs.items() if not math.isfinite(v)}
        if bad:
            raise FloatingPointError(f"CodecTrainer: non-finite loss(es) {bad} at step {self.step}; training "
                                     "diverged (lower lr, enable grad_clip, or check the data)")

    def train_step(self, batch) -> dict[str, float]:
        cfg = self.config
        wav = batch.to(self.dist.device).float()
        if wav.dim() != 3 or wav.shape[1] != self.codec.channels:
            raise ValueError(f"CodecTrainer: batches must be [B, {self.codec.channels}, N], got {tuple(wav.shape)}")
        n_q = self.sample_n_q(self.step)
        with self.autocast():
            y, commit, qstats = self.ddp_model(wav, n_q)
        logs: dict[str, float] = {**qstats, "n_q": float(n_q or self.codec.quantizer.n_q)}

        # 2. discriminator on real vs the current reconstruction (one forward, one DDP reduction)
        if self.disc is not None and self.step % cfg.disc_every == 0:
            with self.autocast():
                logits, _ = self.ddp_disc(torch.cat([wav, y.detach().float()]))
                real = [lg[: wav.shape[0]] for lg in logits]
                fake = [lg[wav.shape[0]:] for lg in logits]
                d_loss = hinge_discriminator_loss(real, fake)
            logs["d_loss"] = float(d_loss.detach())
            self._check_finite({"d_loss": logs["d_loss"]})
            logs["d_grad_norm"] = self.backward_step(d_loss, self.disc_opt, self.disc.parameters())

        # 3. generator: losses on y, balanced into one gradient on y, plus the commitment loss
        yf = y.float()
        losses = {}
        with self.autocast():
            if "l1" in self.loss_weights:
                losses["l1"] = waveform_l1(yf, wav)
            if "mel" in self.loss_weights:
                losses["mel"] = self.mel_loss(yf, wav)
            if "stft" in self.loss_weights:
                losses["stft"] = self.stft_loss(yf, wav)
            if self.disc is not None and ("adv" in self.loss_weights or "feat" in self.loss_weights):
                fake_logits, fake_feats = self.disc(yf)  # unwrapped: gradients go to y only
                with torch.no_grad():
                    _, real_feats = self.disc(wav)
                if "adv" in self.loss_weights:
                    losses["adv"] = hinge_generator_loss(fake_logits)
                if "feat" in self.loss_weights:
                    losses["feat"] = feature_matching_loss(real_feats, fake_feats, per_item=True)
        values = {k: float(v.detach()) for k, v in losses.items()}
        self._check_finite({**values, "commit": float(commit.detach())})
        grad_y = self.balancer.gradient(losses, y)
        torch.autograd.backward([y, commit.float() * cfg.commit_weight], [grad_y, None])
        if self.disc is not None:
            self.disc_opt.zero_grad(set_to_none=True)  # nothing should have reached it; keep it clean
        logs["grad_norm"] = self.optimizer_step(self.optimizer, self.model.parameters())
        logs.update(values)
        logs.update(self.balancer.metrics)
        logs["commit"] = float(commit.detach())
        logs["loss"] = sum(self.loss_weights[k] * v for k, v in values.items()) + cfg.commit_weight * logs["commit"]
        return logs

    def fit(self) -> dict[str, float]:
        """Train (see :meth:`Trainer.fit`), then export ``<out_dir>/encodec`` (transformers layout;
        EMA weights when ``ema_decay`` is set)."""
        last = super().fit()
        if self.dist.is_main:
            from pysonic.checkpoints.encodec import save_transformers_layout

            source = self.ema.module if self.ema is not None else self.model
            save_transformers_layout(source.codec, self.out_dir / "encodec")
        self.dist.barrier()
        return last


def train(config: CodecTrainConfig) -> dict[str, float]:
    """Run a codec training job (one process, or one rank under ``torchrun``)."""
    from pysonic.train.distributed import shutdown_distributed

    try:
        return CodecTrainer(config).fit()
    finally:
        shutdown_distributed()


def main(argv: list[str] | None = None) -> int:
    """``pysonic train codec --config FILE [--set KEY=VALUE ...]`` (the registry in
    :mod:`pysonic.cli.train` calls this), also ``python -m pysonic.train.codec ...``; both run
    unchanged under ``torchrun --nproc_per_node=N``."""
    import argparse

    from pysonic.cli.codec import add_train_arguments, parse_overrides

    parser = argparse.ArgumentParser(
        prog="pysonic train codec",
        description="Train EnCodec (pysonic.train.codec). The config file (YAML, JSON or TOML) holds CodecTrainConfig "
                    "fields; --set KEY=VALUE overrides one (the value is read as JSON, else as a string).")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    train(load_config(args.config, **parse_overrides(args.overrides)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
