"""``pysonic train wavegrad --config FILE``: train a WaveGrad vocoder (Chen et al., 2020).

Built on the shared loop (:class:`pysonic.train.Trainer`): bf16 autocast, LR schedule, gradient
clipping, JSONL logs, atomic checkpoints with exact resume, DDP under ``torchrun``.

The objective is the paper's (section 3, algorithm 1) as ivanvovk/WaveGrad trains it: a 1000-step
linear beta schedule from 1e-6 to 0.01; per item a step ``s`` uniform in 1..1000 and a continuous
noise level ``l`` uniform between ``sqrt(alpha_bar_{s-1})`` and ``sqrt(alpha_bar_s)``;
``y_noisy = l * y0 + sqrt(1 - l**2) * eps``; L1 between the predicted and the true ``eps``.
Training clips are random ``segment_length``-sample windows of the train filelist's audio
(zero-padded when shorter); their mels come from the model's own front end.

Config (JSON, or YAML with PyYAML), either pysonic's layout::

    {"model": {WaveGradConfig fields} | "ivanvovk" | "lmnt",
     "data": {"train_filelist": PATH, "test_filelist": PATH, "segment_length": 7200},
     "noise_schedule": {"n_iter": 1000, "betas_range": [1e-6, 0.01]},
     "train": {TrainConfig fields: out_dir, steps, batch_size, lr, lr_decay, precision, ...},
     "test_every": 0}

or ivanvovk/WaveGrad's own config file (``model_config``, ``data_config``, ``training_config``),
translated: its filelists, segment length, batch size, lr, ``grad_clip_threshold``,
``scheduler_gamma`` (per epoch there, applied per step here as ``gamma ** (1 / steps_per_epoch)``),
``use_fp16`` (bf16 autocast on the CPU), ``logdir`` as ``out_dir``; ``--steps`` is then required.
Filelists are in the original's format: one audio path per line (relative paths are taken from
the working directory, as there).

At the end, ``<out_dir>/model`` holds the weights in pysonic's layout
(``WaveGrad.from_pretrained(out_dir / "model")``).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from pysonic.models.wavegrad import WaveGrad, WaveGradConfig, ivanvovk_default, lmnt_default
from pysonic.models.wavegrad.config import from_ivanvovk_json
from pysonic.models.wavegrad.mel import MelSpectrogram
from pysonic.train.config_file import read_config_file
from pysonic.train.loop import TrainConfig, Trainer

_TOP = {"model", "data", "noise_schedule", "train", "test_every"}


# ------------------------------------------------------------------------------------ data

def read_filelist(path: str | Path) -> list[str]:
    """ivanvovk/WaveGrad filelist: one audio path per line (blank lines ignored)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"train wavegrad: filelist not found: {path}")
    files = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not files:
        raise ValueError(f"train wavegrad: filelist {path} lists no files")
    return files


class AudioSegments(torch.utils.data.Dataset):
    """Audio files of a filelist as mono float32 clips at ``sample_rate``.

    Training (``segment_length`` set): a random window of that many samples (zero-padded when the
    file is shorter), drawn with torch's global generator (which the trainer checkpoints). Test
    (``segment_length=None``): the whole file, padded to a whole number of hops plus one, as
    ivanvovk's test set does.
    """

    def __init__(self, files: list[str], sample_rate: int, hop_length: int, segment_length: int | None):
        self.files, self.sample_rate, self.hop, self.segment = files, sample_rate, hop_length, segment_length

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        from pysonic.audio import load_audio

        audio, _ = load_audio(self.files[index], self.sample_rate)
        audio = audio.mean(0)
        if self.segment is None:
            pad = (audio.shape[0] // self.hop + 1) * self.hop - audio.shape[0]
            return nn.functional.pad(audio, (0, pad))
        if audio.shape[0] >= self.segment:
            start = int(torch.randint(0, audio.shape[0] - self.segment + 1, ()))
            return audio[start : start + self.segment]
        return nn.functional.pad(audio, (0, self.segment - audio.shape[0]))


# ------------------------------------------------------------------------------------ objective

class NoiseLevels:
    """The training schedule's continuous noise levels (paper section 3.1)."""

    def __init__(self, n_iter: int = 1000, betas_range: tuple[float, float] = (1e-6, 0.01)):
        lo, hi = betas_range
        if n_iter < 1 or not 0 < lo <= hi < 1:
            raise ValueError(f"train wavegrad: noise_schedule needs n_iter >= 1 and 0 < low <= high < 1, got {n_iter}, {betas_range}")
        betas = torch.linspace(lo, hi, n_iter, dtype=torch.float64)
        ab = torch.cumprod(1.0 - betas, 0)
        # sqrt(alpha_bar) with alpha_bar_{-1} = 1 in front: step s spans [bounds[s-1], bounds[s]].
        self.bounds = torch.cat([torch.ones(1, dtype=torch.float64), ab]).sqrt()
        self.n_iter = n_iter

    def sample(self, batch: int) -> torch.Tensor:
        """[batch] float32 levels: step s uniform in 1..n_iter, level uniform in its interval."""
        s = torch.randint(1, self.n_iter + 1, (batch,))
        u = torch.rand(batch, dtype=torch.float64)
        hi, lo = self.bounds[s - 1], self.bounds[s]
        return (lo + u * (hi - lo)).float()


class WaveGradTrainer(Trainer):
    """:class:`Trainer` for a :class:`~pysonic.models.wavegrad.model.WaveGradNet`."""

    def __init__(self, wavegrad: WaveGrad, config: TrainConfig, dataset, *, levels: NoiseLevels | None = None,
                 test_dataset=None, test_every: int = 0, **kwargs):
        super().__init__(wavegrad.net, config, dataset, **kwargs)
        self.wavegrad = wavegrad
        self.mel = MelSpectrogram(wavegrad.config.mel).to(self.dist.device)
        self.levels = levels or NoiseLevels(wavegrad.config.train_steps, wavegrad.config.train_betas_range)
        self.test_dataset, self.test_every = test_dataset, test_every

    def loss(self, model: nn.Module, audio: torch.Tensor) -> torch.Tensor:
        audio = audio.to(self.dist.device, torch.float32)
        with torch.autocast(self.dist.device.type, enabled=False):
            mel = self.mel(audio)
        level = self.levels.sample(audio.shape[0]).to(audio.device)
        eps = torch.randn_like(audio)
        noisy = level[:, None] * audio + (1.0 - level[:, None] ** 2).sqrt() * eps
        return nn.functional.l1_loss(model(noisy, mel, level).float(), eps)

    def compute_loss(self, model, batch):
        return self.loss(model, batch), {}

    @torch.no_grad()
    def test_loss(self) -> float:
        """Mean L1 noise-prediction loss over the test files (fixed draws: seed 0)."""
        state = torch.get_rng_state()
        torch.manual_seed(0)
        try:
            self.model.eval()
            losses = [float(self.loss(self.model, self.test_dataset[i][None])) for i in range(len(self.test_dataset))]
        finally:
            torch.set_rng_state(state)
            self.model.train()
        return sum(losses) / len(losses)

    def on_log(self, step, logs):
        if self.test_dataset is not None and self.test_every and step % self.test_every == 0 and self.dist.is_main:
            self.logger.log(step, {"test_loss": self.test_loss()})


# ------------------------------------------------------------------------------------ config

def read_config(path: str | Path) -> dict:
    """Parse a YAML, TOML or JSON config file."""
    return read_config_file(path, what="train wavegrad")


def from_ivanvovk_config(obj: Mapping[str, Any], *, steps: int | None) -> dict:
    """Translate ivanvovk/WaveGrad's config file into this trainer's layout."""
    tc = obj.get("training_config", {})
    if steps is None:
        raise ValueError("train wavegrad: an ivanvovk config counts epochs; pass --steps")
    train_files = read_filelist(tc["train_filelist_path"])
    batch = int(tc.get("batch_size", 96))
    per_epoch = max(1, len(train_files) // batch)
    gamma = float(tc.get("scheduler_gamma", 1.0)) ** (1.0 / (per_epoch * int(tc.get("scheduler_step_size", 1))))
    schedule = tc.get("training_noise_schedule", {"n_iter": 1000, "betas_range": [1e-6, 0.01]})
    return {
        "model": {"ivanvovk_json": {k: obj[k] for k in ("model_config", "data_config", "training_config") if k in obj}},
        "data": {"train_filelist": tc["train_filelist_path"], "test_filelist": tc.get("test_filelist_path"),
                 "segment_length": int(tc.get("segment_length", 7200))},
        "noise_schedule": {"n_iter": int(schedule["n_iter"]), "betas_range": list(schedule["betas_range"])},
        "train": {"out_dir": tc.get("logdir", "logs/wavegrad"), "steps": steps, "batch_size": batch,
                  "lr": float(tc.get("lr", 1e-3)), "grad_clip": float(tc.get("grad_clip_threshold", 1.0)),
                  "lr_decay": "exponential" if gamma < 1 else "constant", "lr_decay_gamma": gamma,
                  "precision": "bf16" if tc.get("use_fp16") else "fp32"},
    }


def build_model(spec) -> WaveGrad:
    if spec is None or spec == "ivanvovk":
        return WaveGrad(ivanvovk_default())
    if spec == "lmnt":
        return WaveGrad(lmnt_default())
    if isinstance(spec, Mapping) and "ivanvovk_json" in spec:
        return WaveGrad(from_ivanvovk_json(spec["ivanvovk_json"]))
    if isinstance(spec, Mapping):
        return WaveGrad(WaveGradConfig.from_dict(spec))
    raise ValueError(f"train wavegrad: 'model' must be 'ivanvovk', 'lmnt' or a mapping of WaveGradConfig fields, got {spec!r}")


def build(cfg: Mapping[str, Any], **overrides) -> WaveGradTrainer:
    """A ready :class:`WaveGradTrainer` from a config dict (pysonic layout); ``overrides`` go into ``train``."""
    unknown = sorted(set(cfg) - _TOP)
    if unknown:
        raise ValueError(f"train wavegrad: unknown config keys {unknown}; known: {sorted(_TOP)}")
    data = dict(cfg.get("data") or {})
    unknown = sorted(set(data) - {"train_filelist", "test_filelist", "segment_length"})
    if unknown:
        raise ValueError(f"train wavegrad: unknown 'data' keys {unknown}")
    if "train_filelist" not in data:
        raise ValueError("train wavegrad: data.train_filelist is required")
    train = {**dict(cfg.get("train") or {}), **{k: v for k, v in overrides.items() if v is not None}}
    config = TrainConfig.from_dict(train)
    torch.manual_seed(config.seed)  # the same initial weights in every process
    wavegrad = build_model(cfg.get("model"))
    segment = int(data.get("segment_length", 7200))
    if segment % wavegrad.hop_length:
        raise ValueError(f"train wavegrad: segment_length {segment} must be a multiple of the hop length {wavegrad.hop_length}")
    sr, hop = wavegrad.sample_rate, wavegrad.hop_length
    dataset = AudioSegments(read_filelist(data["train_filelist"]), sr, hop, segment)
    test = AudioSegments(read_filelist(data["test_filelist"]), sr, hop, None) if data.get("test_filelist") else None
    ns = cfg.get("noise_schedule") or {}
    levels = NoiseLevels(int(ns.get("n_iter", 1000)), tuple(ns.get("betas_range", (1e-6, 0.01))))
    return WaveGradTrainer(wavegrad, config, dataset, levels=levels, test_dataset=test,
                           test_every=int(cfg.get("test_every", 0) or 0))


def train(cfg: Mapping[str, Any], **overrides) -> dict[str, float]:
    """Train (resuming from the latest checkpoint of ``out_dir``) and write ``out_dir/model``."""
    trainer = build(cfg, **overrides)
    last = trainer.fit()
    if trainer.dist.is_main:
        trainer.wavegrad.net.load_state_dict(trainer.final_weights())  # the EMA weights when EMA is on
        trainer.wavegrad.save_pretrained(Path(trainer.config.out_dir) / "model")
    trainer.dist.barrier()
    return last


def main(argv: list[str] | None = None) -> int:
    """``pysonic train wavegrad --config FILE [--out-dir DIR] [--steps N]``."""
    p = argparse.ArgumentParser(prog="pysonic train wavegrad", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="JSON/YAML config (pysonic's layout or ivanvovk's)")
    p.add_argument("--out-dir", default=None, help="override train.out_dir")
    p.add_argument("--steps", type=int, default=None, help="override train.steps")
    args = p.parse_args(argv)
    cfg = read_config(args.config)
    if isinstance(cfg, Mapping) and "model_config" in cfg:
        cfg = from_ivanvovk_config(cfg, steps=args.steps)
    from pysonic.train.distributed import shutdown_distributed

    try:
        last = train(cfg, out_dir=args.out_dir, steps=args.steps)
    finally:
        shutdown_distributed()
    print(json.dumps({k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in last.items()}))
    return 0
