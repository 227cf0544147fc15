"""The training loop every pysonic trainer shares: precision, accumulation, clipping, LR schedule,
EMA, logging, atomic checkpoints and exact resume, one or several processes.

A family's trainer subclasses :class:`Trainer` and writes ``compute_loss`` (or ``train_step`` when
one step needs several optimizers, as GANs do).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from pysonic.train.checkpoint import checkpoint_dir, latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from pysonic.train.data import ResumableLoader
from pysonic.train.distributed import DistContext, init_distributed
from pysonic.train.ema import EMA
from pysonic.train.logger import ScalarLogger

_DECAYS = ("constant", "cosine", "linear", "exponential")
_PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Settings every trainer shares. ``batch_size`` is per process and per optimizer step;
    ``grad_accum`` splits it into that many micro-batches (same result, less memory)."""

    out_dir: str
    steps: int
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    lr_decay: str = "constant"  # constant | cosine | linear | exponential (after warm-up)
    lr_decay_gamma: float = 1.0  # per-step factor for "exponential"
    min_lr_ratio: float = 0.0  # floor of the decay, as a fraction of lr
    grad_clip: float | None = 1.0  # max global grad norm; None: no clipping
    grad_accum: int = 1
    precision: str = "fp32"  # fp32 | bf16 (autocast, CPU or CUDA) | fp16 (CUDA, with a GradScaler)
    ema_decay: float | None = None
    log_every: int = 10
    ckpt_every: int = 500
    keep_checkpoints: int = 3
    seed: int = 0
    num_workers: int = 0
    log_format: str = "jsonl"
    progress: bool = True

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        problems = []
        if self.steps < 1:
            problems.append(f"steps must be >= 1 (got {self.steps})")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1 (got {self.batch_size})")
        if self.grad_accum < 1 or self.batch_size % self.grad_accum:
            problems.append(f"grad_accum ({self.grad_accum}) must be >= 1 and divide batch_size ({self.batch_size})")
        if not self.lr > 0:
            problems.append(f"lr must be > 0 (got {self.lr})")
        if self.lr_decay not in _DECAYS:
            problems.append(f"lr_decay must be one of {_DECAYS} (got {self.lr_decay!r})")
        if self.precision not in _PRECISIONS:
            problems.append(f"precision must be one of {_PRECISIONS} (got {self.precision!r})")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            problems.append(f"ema_decay must be in (0, 1) or None (got {self.ema_decay})")
        if self.log_every < 1 or self.ckpt_every < 1:
            problems.append("log_every and ckpt_every must be >= 1")
        if problems:
            raise ValueError("TrainConfig: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """Build from a dict (e.g. a config file section); unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown keys {unknown}; known keys: {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(d["betas"])
        return d


def lr_factor(config: TrainConfig, step: int) -> float:
    """Multiplier of ``config.lr`` at optimizer step ``step`` (0-based): linear warm-up, then decay."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.min_lr_ratio
    if config.lr_decay == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if config.lr_decay == "linear":
        return 1 - (1 - floor) * progress
    if config.lr_decay == "exponential":
        return max(floor, config.lr_decay_gamma ** (step - config.warmup_steps))
    return 1.0


def split_batch(batch, parts: int) -> list:
    """Split a batch (tensors, lists, tuples, dicts of them) into ``parts`` micro-batches along dim 0."""
    if parts == 1:
        return [batch]
    if isinstance(batch, torch.Tensor):
        return list(batch.chunk(parts))
    if isinstance(batch, dict):
        split = {k: split_batch(v, parts) for k, v in batch.items()}
        return [{k: split[k][i] for k in batch} for i in range(parts)]
    if isinstance(batch, (list, tuple)):
        if batch and all(isinstance(v, (torch.Tensor, dict)) for v in batch):
            # a structure of per-field batches (what default_collate makes of tuple items)
            split = [split_batch(v, parts) for v in batch]
            return [type(batch)(s[i] for s in split) for i in range(parts)]
        if len(batch) % parts:
            raise ValueError(f"split_batch: {len(batch)} items do not split into {parts} micro-batches")
        n = len(batch) // parts  # a list of items (e.g. captions)
        return [batch[i * n : (i + 1) * n] for i in range(parts)]
    raise TypeError(f"split_batch: cannot split a {type(batch).__name__} into micro-batches")


def _rng_state() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Runs ``config.steps`` optimizer steps of ``model`` on ``dataset``.

    Args:
        model: the module to train (moved to the process's device).
        config: a :class:`TrainConfig`.
        dataset: a map-style dataset; see :class:`ResumableLoader`.
        collate_fn: list of items -> batch.
        optimizer: default AdamW over the parameters that require grad.
        dist: default :func:`init_distributed` (torchrun environment, or one process).

    Subclasses implement :meth:`compute_loss`, or override :meth:`train_step` for several
    optimizers, and list extra stateful objects in :meth:`extra_state`.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, dataset, *, collate_fn=None,
                 optimizer: torch.optim.Optimizer | None = None, dist: DistContext | None = None) -> None:
        self.config = config
        self.dist = dist or init_distributed()
        if config.precision == "fp16" and self.dist.device.type != "cuda":
            raise ValueError("Trainer: precision 'fp16' needs CUDA; use 'bf16' on the CPU")
        # Seeded per rank so that ranks draw different noise; restored exactly on resume.
        torch.manual_seed(config.seed + self.dist.rank)
        random.seed(config.seed + self.dist.rank)
        np.random.seed((config.seed + self.dist.rank) % 2**32)
        self.model = model.to(self.dist.device)
        self.ddp_model = self.dist.wrap(self.model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("Trainer: the model has no parameter that requires grad")
        self.optimizer = optimizer or torch.optim.AdamW(params, lr=config.lr, betas=config.betas,
                                                        weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(config, s))
        self.scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" else None
        self.ema = EMA(self.model, config.ema_decay) if config.ema_decay else None
        self.loader = ResumableLoader(dataset, config.batch_size, seed=config.seed, collate_fn=collate_fn,
                                      rank=self.dist.rank, world_size=self.dist.world_size,
                                      num_workers=config.num_workers)
        self.logger = ScalarLogger(config.out_dir, config.log_format, enabled=self.dist.is_main)
        self.out_dir = Path(config.out_dir)
        self.step = 0

    # ---- what a family's trainer writes -------------------------------------------------------
    def compute_loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Return the scalar loss to minimise and extra scalars to log (runs under autocast)."""
        raise NotImplementedError(f"{type(self).__name__} must implement compute_loss or train_step")

    def extra_state(self) -> dict[str, Any]:
        """Objects with ``state_dict``/``load_state_dict`` to checkpoint beside the defaults."""
        return {}

    def on_log(self, step: int, logs: dict[str, float]) -> None:
        """Called on every process after each logging step with the averaged scalars."""

    # ---- building blocks ----------------------------------------------------------------------
    def autocast(self):
        """The autocast context of ``config.precision`` (a no-op in fp32)."""
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.config.precision)
        return torch.autocast(self.dist.device.type, dtype=dtype, enabled=dtype is not None)

    def backward(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss.detach()).all():
            raise FloatingPointError(f"{type(self).__name__}: the loss is {loss.item()} at step {self.step}; "
                                     "training diverged (lower lr, enable grad_clip, or check the data)")
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def optimizer_step(self, optimizer: torch.optim.Optimizer, parameters) -> float:
        """Unscale, clip to ``config.grad_clip``, step and zero the grads; returns the grad norm."""
        params = [p for p in parameters if p.grad is not None]
        if self.scaler:
            self.scaler.unscale_(optimizer)
        if self.config.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])) if params else torch.zeros(())
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def backward_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, parameters) -> float:
        """``backward`` then ``optimizer_step``: one optimizer's whole update (for GAN trainers)."""
        self.backward(loss)
        return self.optimizer_step(optimizer, parameters)

    def train_step(self, batch) -> dict[str, float]:
        """One optimizer step on ``batch`` (split into ``grad_accum`` micro-batches)."""
        micro = split_batch(batch, self.config.grad_accum)
        totals: dict[str, float] = {}
        for i, part in enumerate(micro):
            last = i == len(micro) - 1
            sync = self.ddp_model.no_sync() if (self.dist.distributed and not last) else contextlib.nullcontext()
            with sync:
                with self.autocast():
                    loss, logs = self.compute_loss(self.ddp_model, part)
                self.backward(loss / len(micro))
            for k, v in {"loss": float(loss.detach()), **logs}.items():
                totals[k] = totals.get(k, 0.0) + float(v) / len(micro)
        totals["grad_norm"] = self.optimizer_step(self.optimizer, self.model.parameters())
        return totals

    # ---- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        rng = self.dist.all_gather_objects(_rng_state())  # every rank's generators
        state = {
            "step": self.step,
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "loader": self.loader.state_dict(),
            "rng": rng,
            "extra": {name: obj.state_dict() for name, obj in self.extra_state().items()},
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.load_state_dict(state["loader"])
        if self.ema is not None:
            if "ema" not in state:
                raise ValueError("Trainer: the checkpoint has no EMA weights but ema_decay is set")
            self.ema.load_state_dict(state["ema"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        extra = self.extra_state()
        missing = sorted(set(extra) - set(state.get("extra", {})))
        if missing:
            raise ValueError(f"Trainer: the checkpoint lacks state for {missing}")
        for name, obj in extra.items():
            obj.load_state_dict(state["extra"][name])
        rng = state["rng"]
        if len(rng) != self.dist.world_size:
            raise ValueError(f"Trainer: checkpoint from {len(rng)} process(es), this run has {self.dist.world_size}; "
                             "resume with the same number of processes")
        _set_rng_state(rng[self.dist.rank])

    def save(self) -> Path | None:
        """Write ``<out_dir>/checkpoints/step_<N>.pt`` (rank 0) and prune old ones."""
        state = self.state_dict()  # collective: every rank takes part
        path = None
        if self.dist.is_main:
            path = save_checkpoint(checkpoint_dir(self.out_dir) / f"step_{self.step}.pt", state)
            prune_checkpoints(self.out_dir, self.config.keep_checkpoints)
        self.dist.barrier()
        return path

    def resume(self) -> bool:
        """Load the latest checkpoint of ``out_dir`` if there is one; True if it did."""
        path = latest_checkpoint(self.out_dir)
        if path is None:
            return False
        self.load_state_dict(load_checkpoint(path))
        return True

    def final_weights(self) -> dict[str, torch.Tensor]:
        source = self.ema.module if self.ema is not None else self.model
        return {k: v.detach().float().contiguous().clone().cpu() for k, v in source.state_dict().items()}

    # ---- the loop -----------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        """Train until ``config.steps`` (resuming from the latest checkpoint), write
        ``final.safetensors``, and return the last logged scalars."""
        from safetensors.torch import save_file

        cfg = self.config
        self.resume()
        window: dict[str, float] = {}
        count = 0
        last: dict[str, float] = {}
        started = time.perf_counter()
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (cfg.progress and self.dist.is_main),
                   desc=type(self).__name__, dynamic_ncols=True)
        batches = iter(self.loader)
        while self.step < cfg.steps:
            self.model.train()
            logs = self.train_step(next(batches))
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update(self.model)
            self.step += 1
            bar.update(1)
            for k, v in logs.items():
                window[k] = window.get(k, 0.0) + float(v)
            count += 1
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                keys = sorted(window)
                values = self.dist.all_reduce_mean(torch.tensor([window[k] / count for k in keys], dtype=torch.float64))
                last = dict(zip(keys, values.tolist()))
                last["lr"] = self.scheduler.get_last_lr()[0]
                last["sec_per_step"] = (time.perf_counter() - started) / count
                self.logger.log(self.step, last)
                self.on_log(self.step, last)
                bar.set_postfix(loss=f"{last.get('loss', float('nan')):.4g}")
                window, count, started = {}, 0, time.perf_counter()
            if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                self.save()
        bar.close()
        if self.dist.is_main:
            final = self.out_dir / "final.safetensors"
            tmp = final.with_suffix(".safetensors.tmp")
            save_file(self.final_weights(), str(tmp))
            tmp.replace(final)
        self.dist.barrier()
        self.logger.close()
        return last
