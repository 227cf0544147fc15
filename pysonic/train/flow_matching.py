"""TangoFlux flow-matching training: pre-training and fine-tuning (stages 1 and 2).

What the released tangoflux/train.py + model.py ``forward(..., sft=True)`` do, step by step:

- audio: the first ``max_audio_duration`` seconds, resampled to 44.1 kHz, zero-padded to exactly
  that length (so every latent sequence has the same length: 645 frames for 30 s), mono repeated
  to stereo; encoded by the frozen VAE with a *sample* of its posterior (``latent_dist.sample()``);
- duration: the manifest's ``duration`` clamped to ``max_audio_duration``; the model's duration
  embedder clamps and normalises it again;
- text: the frozen text encoder's states of the caption (FLAN-T5, at most 64 tokens);
- timesteps: ``u = sigmoid(N(0, 1))`` (diffusers ``compute_density_for_timestep_sampling``,
  ``logit_normal``, mean 0, std 1), index ``floor(1000 u)`` into the 1000 training timesteps of
  ``FlowMatchEulerDiscreteScheduler`` (``1000, 999, ..., 1``), so ``sigma = (1000 - index) / 1000``;
  the transformer is given ``sigma`` (``timesteps / 1000``);
- noisy latents ``(1 - sigma) * latents + sigma * noise``; target ``noise - latents``; loss the
  plain mean squared error per example, averaged over the batch (no loss weighting);
- CFG text dropout ("uncondition", off in the released config): each example's whole conditioning
  sequence (text states and the duration token) is zeroed with probability 0.1; the pooled text
  projection is left as it is;
- trained: the transformer and the text projection ``fc``; the duration embedder is not in the
  released optimizer, so it keeps its initial weights (``train_duration_embedder`` turns it on).

Stages: ``stage="pretrain"`` starts from the model as constructed (random weights);
``stage="finetune"`` requires ``init_from`` (a checkpoint of the previous stage). Otherwise they
differ only in data and hyperparameters (the config's business).

Randomness: every random draw of an example (posterior sample, timestep, dropout, noise) comes
from a generator seeded by ``(seed, step, dataset index)``. A run's result therefore does not
depend on how the global batch is split over processes, nor on a resume.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from pysonic.audio import resample
from pysonic.data.manifest import fit_channels, fit_length
from pysonic.train import TrainConfig, Trainer

__all__ = [
    "FlowMatchingConfig",
    "FlowMatchingTrainer",
    "sample_sigmas",
    "example_generators",
    "collate_examples",
    "freeze_for_training",
    "load_model_weights",
    "flow_matching_loss",
    "TangoFluxTrainModule",
]

NUM_TRAIN_TIMESTEPS = 1000  # FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000) in tangoflux/model.py


@dataclass
class FlowMatchingConfig(TrainConfig):
    """:class:`TrainConfig` plus the flow-matching choices (defaults: the released training)."""

    stage: str = "pretrain"  # "pretrain" | "finetune"
    init_from: str | None = None  # weights to start from (required for "finetune")
    max_audio_duration: float = 30.0  # config["training"]["max_audio_duration"]
    uncondition: bool = False  # CFG text dropout (also on when the model config says so); released: off
    uncondition_prob: float = 0.1  # model.py: random.random() < 0.1
    logit_mean: float = 0.0  # compute_density_for_timestep_sampling(logit_mean=0, logit_std=1)
    logit_std: float = 1.0
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
    sample_posterior: bool = True  # vae.encode(...).latent_dist.sample(); False: the posterior mean
    train_duration_embedder: bool = False  # the released optimizer holds transformer + fc only

    STAGES = ("pretrain", "finetune")  # class attribute (no annotation): the stages this config runs

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        if self.stage not in self.STAGES:
            raise ValueError(f"{type(self).__name__}: stage must be one of {list(self.STAGES)}, got {self.stage!r}")
        if self.stage == "finetune" and not self.init_from:
            raise ValueError("FlowMatchingConfig: stage 'finetune' needs init_from (the pre-trained weights)")
        if not self.max_audio_duration > 0:
            raise ValueError(f"FlowMatchingConfig: max_audio_duration must be > 0, got {self.max_audio_duration}")
        if not 0.0 <= self.uncondition_prob <= 1.0:
            raise ValueError(f"FlowMatchingConfig: uncondition_prob must be in [0, 1], got {self.uncondition_prob}")
        if self.logit_std <= 0:
            raise ValueError(f"FlowMatchingConfig: logit_std must be > 0, got {self.logit_std}")
        if self.num_train_timesteps < 1:
            raise ValueError(f"FlowMatchingConfig: num_train_timesteps must be >= 1, got {self.num_train_timesteps}")


# ---------------------------------------------------------------------------- pieces


_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def example_generators(seed: int, step: int, indices: Sequence[int] | torch.Tensor) -> list[torch.Generator]:
    """One CPU generator per example, seeded by ``(seed, step, index)``."""
    out = []
    for i in (indices.tolist() if isinstance(indices, torch.Tensor) else indices):
        g = torch.Generator()
        g.manual_seed((seed * _MIX[0] + step * _MIX[1] + int(i) * _MIX[2]) % (2**63 - 1))
        out.append(g)
    return out


def sample_sigmas(generators: Sequence[torch.Generator], *, logit_mean: float = 0.0, logit_std: float = 1.0,
                  num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """TangoFlux's training sigmas, one per generator -> float32 ``[B]`` in ``(0, 1]``.

    ``u = sigmoid(N(logit_mean, logit_std))``, ``index = floor(u * T)`` (clamped to ``T - 1``
    where fp32 rounds ``u`` to 1), ``sigma = (T - index) / T``.
    """
    T = int(num_train_timesteps)
    u = torch.stack([torch.normal(logit_mean, logit_std, (1,), generator=g)[0] for g in generators]).sigmoid()
    index = (u * T).long().clamp_(0, T - 1)
    return ((T - index).double() / T).float()


def freeze_for_training(model: nn.Module, *, train_duration_embedder: bool = False) -> None:
    """Set ``requires_grad`` as the released optimizer does: the transformer and the text
    projection trained, the duration embedder frozen unless asked."""
    model.requires_grad_(True)
    if not train_duration_embedder:
        model.duration_embed.requires_grad_(False)


def collate_examples(items: list[Mapping[str, Any]], *, sample_rate: int, channels: int, max_duration: float,
                     audio_keys: tuple[str, ...] = ("audio",)) -> dict[str, Any]:
    """Batch examples as the trainers want them.

    Each item holds ``"caption"`` (str), ``"duration"`` (seconds), ``"index"`` (int) and, per key
    of ``audio_keys``, either a waveform ``[C, N]`` (optional ``"sample_rate"`` beside it, default
    ``sample_rate``) or precomputed latents under ``"<key>_latents"`` ``[T, D]``. Waveforms are
    resampled, fitted to ``channels`` and padded/cropped to ``int(sample_rate * max_duration)``.
    Other keys (e.g. SonicSynth's ``"attributes"``) are dropped.
    """
    if not items:
        raise ValueError("collate_examples: empty batch")
    n = int(sample_rate * max_duration)
    out: dict[str, Any] = {}
    for key in audio_keys:
        lat_key = f"{key}_latents" if key != "audio" else "latents"
        if all(lat_key in it for it in items):
            out[lat_key] = torch.stack([torch.as_tensor(it[lat_key], dtype=torch.float32) for it in items])
            continue
        wavs = []
        for it in items:
            if key not in it:
                raise ValueError(f"collate_examples: an item has neither {key!r} nor {lat_key!r}")
            w = torch.as_tensor(it[key], dtype=torch.float32)
            if w.dim() == 1:
                w = w[None]
            if w.dim() != 2:
                raise ValueError(f"collate_examples: {key!r} must be [C, N], got shape {tuple(w.shape)}")
            w = resample(w, int(it.get("sample_rate", sample_rate)), sample_rate)
            wavs.append(fit_length(fit_channels(w, channels), n))
        out[key] = torch.stack(wavs)
    out["caption"] = [str(it["caption"]) for it in items]
    out["duration"] = torch.tensor([min(float(it["duration"]), max_duration) for it in items], dtype=torch.float32)
    out["index"] = torch.tensor([int(it["index"]) for it in items], dtype=torch.long)
    return out


class IndexedDataset(torch.utils.data.Dataset):
    """Adds ``"index"`` to each item of a map-style dataset of dicts (unless it has one), and the
    dataset's ``sample_rate`` attribute (e.g. SonicSynth's) to items that carry none."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset
        self.sample_rate = getattr(dataset, "sample_rate", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = self.dataset[i]
        if not isinstance(item, Mapping):
            raise TypeError(f"IndexedDataset: items must be dicts, item {i} is {type(item).__name__}")
        extra = {}
        if "index" not in item:
            extra["index"] = i
        if self.sample_rate is not None and "sample_rate" not in item:
            extra["sample_rate"] = int(self.sample_rate)
        return {**item, **extra} if extra else item


# ---------------------------------------------------------------------------- trainer


class TangoFluxTrainModule(nn.Module):
    """What the trainer optimises (and DDP wraps): the TangoFluxModel, called as the release's
    training forward does, with its frozen DPO reference transformer beside it.

    ``forward(latents, sigma, text_states, text_mask, duration, *, drop=None, reference=False)``:
    the conditioning (pooled text projection, text + duration-token sequence) is computed once
    by the trained model; ``drop`` [B] bool zeroes the whole sequence of those examples (text
    and duration token, not the pooled projection: the release's "uncondition"); with
    ``reference=True`` it returns ``(velocity, reference velocity)``, the reference transformer
    fed with the same conditioning (as the release's ``ref_transformer``).

    The reference is not a submodule (kept out of checkpoints, EMA and DDP): it is rebuilt
    from the starting weights when a run resumes.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._reference: list[nn.Module] = []  # a list hides it from nn.Module's registry

    @property
    def reference(self) -> nn.Module | None:
        return self._reference[0] if self._reference else None

    def set_reference(self, transformer: nn.Module) -> None:
        self._reference[:] = [transformer.eval().requires_grad_(False)]

    def forward(self, latents, sigma, text_states, text_mask, duration, *, drop=None, reference: bool = False):
        m = self.model
        sigma, duration = m._check(latents, sigma, text_states, text_mask, duration)
        dtype = m.text_proj.weight.dtype
        latents, text_states = latents.to(dtype), text_states.to(dtype)
        pooled = m.pooled_text(text_states, text_mask)
        ctx = m.context(text_states, duration)
        if drop is not None:
            ctx = ctx * (~drop).to(ctx.dtype)[:, None, None]
        pred = m.transformer(latents, ctx, pooled, sigma)
        if not reference:
            return pred
        if self.reference is None:
            raise ValueError("TangoFluxTrainModule: reference=True but no reference transformer is set")
        with torch.no_grad():
            ref = self.reference(latents, ctx.detach(), pooled.detach(), sigma)
        return pred, ref


class FlowMatchingTrainer(Trainer):
    """Stage 1 / 2 trainer.

    Args:
        model: a :class:`pysonic.models.tangoflux.TangoFluxModel` (trained in place).
        config: :class:`FlowMatchingConfig`.
        dataset: map-style dataset of dicts (``audio`` [C, N] or ``latents`` [T, D], ``caption``,
            ``duration``), e.g. :class:`pysonic.data.manifest.AudioCaptionDataset` or SonicSynth.
        text_encoder: frozen; ``encode(list[str]) -> (states [B, L, D], mask [B, L] bool)``.
        vae: the frozen VAE (``encode_distribution``); may be None when items carry ``latents``.
        optimizer: default AdamW over the trained parameters (``config.lr``, ``betas``,
            ``weight_decay``; the release: lr 5e-4, betas (0.9, 0.95), weight decay 0.01).

    ``final.safetensors`` holds the TangoFluxModel's own state dict (EMA weights with EMA on).
    """

    audio_keys: tuple[str, ...] = ("audio",)

    def __init__(self, model: nn.Module, config: FlowMatchingConfig, dataset, *, text_encoder,
                 vae: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None, dist=None) -> None:
        if config.init_from:
            load_model_weights(model, config.init_from)
        freeze_for_training(model, train_duration_embedder=config.train_duration_embedder)
        self.tangoflux = model
        # CFG text dropout: the train config's switch, or the model config's (where the release keeps it)
        self.uncondition = bool(config.uncondition or getattr(getattr(model, "config", None), "uncondition", False))
        self.sample_rate = int(getattr(vae, "sampling_rate", 44_100)) if vae is not None else 44_100
        self.audio_channels = int(vae.config.audio_channels) if vae is not None else 2
        collate = _Collate(self.sample_rate, self.audio_channels, float(config.max_audio_duration), self.audio_keys)
        super().__init__(TangoFluxTrainModule(model), config, IndexedDataset(dataset), collate_fn=collate,
                         optimizer=optimizer, dist=dist)
        device = self.dist.device
        self.vae = vae.to(device).eval().requires_grad_(False) if vae is not None else None
        self.text_encoder = text_encoder
        if isinstance(text_encoder, nn.Module):
            self.text_encoder = text_encoder.to(device).eval().requires_grad_(False)
        elif hasattr(text_encoder, "to"):
            self.text_encoder = text_encoder.to(device) or text_encoder

    def final_weights(self) -> dict[str, torch.Tensor]:
        """The TangoFluxModel's keys (no wrapper prefix)."""
        return {k[len("model."):]: v for k, v in super().final_weights().items() if k.startswith("model.")}

    # -- encoding (frozen parts, outside autocast: fp32 latents and text states)
    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(self.dist.device.type, enabled=False):
            states, mask = self.text_encoder.encode(list(captions))
        return states.to(self.dist.device).float(), mask.to(self.dist.device).bool()

    @torch.no_grad()
    def encode_audio(self, batch: Mapping[str, Any], key: str, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """Latents ``[B, T, D]`` of ``batch[key]`` (or its precomputed latents); draws the posterior
        sample from ``generators``."""
        lat_key = f"{key}_latents" if key != "audio" else "latents"
        device = self.dist.device
        if lat_key in batch:
            return batch[lat_key].to(device).float()
        if self.vae is None:
            raise ValueError(f"{type(self).__name__}: the batch holds audio but no vae was given")
        with torch.autocast(device.type, enabled=False):
            mean, std = self.vae.encode_distribution(batch[key].to(device))
            mean, std = mean.float(), std.float()
            if self.config.sample_posterior:
                eps = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in generators]).to(device)
                z = mean + std * eps
            else:
                z = mean
        return z.transpose(1, 2).contiguous()  # [B, D, T] -> [B, T, D]

    def draw(self, generators: Sequence[torch.Generator], shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-example ``(sigma [B], drop [B] bool, noise [B, *shape])`` from the generators."""
        cfg = self.config
        device = self.dist.device
        sigma = sample_sigmas(generators, logit_mean=cfg.logit_mean, logit_std=cfg.logit_std,
                              num_train_timesteps=cfg.num_train_timesteps)
        drop = torch.stack([torch.rand((), generator=g) for g in generators]) < cfg.uncondition_prob
        noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
        return sigma.to(device), drop.to(device) & self.uncondition, noise.to(device)

    def compute_loss(self, model, batch):
        cfg = self.config
        gens = example_generators(cfg.seed, int(self.step), batch["index"])
        latents = self.encode_audio(batch, "audio", gens)
        states, mask = self.encode_text(batch["caption"])
        duration = batch["duration"].to(self.dist.device)
        sigma, drop, noise = self.draw(gens, tuple(latents.shape[1:]))
        loss = flow_matching_loss(model, latents, sigma, noise, states, mask, duration,
                                  drop=drop if self.uncondition else None)
        return loss, {"sigma_mean": float(sigma.mean()), "dropped": float(drop.float().mean())}


def flow_matching_loss(model: nn.Module, latents: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
                       text_states: torch.Tensor, text_mask: torch.Tensor, duration: torch.Tensor, *,
                       drop: torch.Tensor | None = None) -> torch.Tensor:
    """The release's ``sft`` loss for given draws.

    Args:
        model: a :class:`TangoFluxTrainModule` (or its DDP wrapper).
        latents: [B, T, D] clean latents; sigma: [B]; noise: [B, T, D].
        text_states, text_mask, duration: the conditioning; drop: [B] bool CFG dropout or None.

    Returns:
        ``mean_b mean((v(x_sigma) - (noise - latents))^2)`` with ``x_sigma = (1 - sigma) latents + sigma noise``.
    """
    s = sigma.view(-1, *([1] * (latents.dim() - 1)))
    noisy = (1.0 - s) * latents + s * noise
    pred = model(noisy, sigma, text_states, text_mask, duration, drop=drop)
    target = noise - latents
    return ((pred.float() - target.float()) ** 2).flatten(1).mean(1).mean()


class _Collate:
    """Picklable collate (DataLoader workers)."""

    def __init__(self, sample_rate: int, channels: int, max_duration: float, audio_keys: tuple[str, ...]) -> None:
        self.kw = dict(sample_rate=sample_rate, channels=channels, max_duration=max_duration, audio_keys=audio_keys)

    def __call__(self, items):
        return collate_examples(items, **self.kw)


def load_model_weights(model: nn.Module, source: str | Path) -> None:
    """Load weights into a TangoFluxModel from ``source``: its own state dict (a previous stage's
    ``final.safetensors``), the release's ``tangoflux.safetensors``, or a release directory."""
    from pysonic.checkpoints import load_into, read_state_dict

    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"init_from: no such file or directory {str(path)!r}")
    if path.is_dir():
        path = path / "tangoflux.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"init_from: {str(source)!r} is a directory without tangoflux.safetensors")
    state = read_state_dict(path)
    if set(state) == set(model.state_dict()):
        load_into(model, state, source=str(path))
    else:  # the release's layout (errors name what does not match)
        model.load_release_state_dict(state, source=str(path))
