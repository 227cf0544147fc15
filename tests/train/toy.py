"""A toy regression trainer for the training-core tests (also run as a script by the kill and
DDP tests: ``python -m tests.train.toy OUT_DIR STEPS [--noise]``)."""
from __future__ import annotations

import sys

import torch
from torch import nn

from pysonic.train import TrainConfig, Trainer


class ToyData(torch.utils.data.Dataset):
    """y = x @ w_true + 0.1; items are a function of the index only."""

    def __init__(self, n: int = 64, dim: int = 8) -> None:
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, dim, generator=g)
        self.y = self.x @ torch.randn(dim, 1, generator=g) + 0.1

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return {"x": self.x[i], "y": self.y[i]}


def toy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.1), nn.Tanh(), nn.Linear(16, 1))


class ToyTrainer(Trainer):
    """Uses randomness (dropout, input noise) so that exact resume needs the RNG states."""

    def __init__(self, *args, noise: bool = True, stop_at: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.noise = noise
        self.stop_at = stop_at

    def compute_loss(self, model, batch):
        x = batch["x"]
        if self.noise:
            x = x + 0.01 * torch.randn_like(x)
        else:
            model.eval()  # no dropout: a deterministic loss for the DDP comparison
        pred = model(x)
        loss = (pred.float() - batch["y"]).pow(2).mean()
        return loss, {"mae": float((pred.detach().float() - batch["y"]).abs().mean())}

    def on_log(self, step, logs):
        if self.stop_at is not None and step == self.stop_at:
            raise KeyboardInterrupt(f"stopped at step {step}")


def toy_config(out_dir, steps: int, **kw) -> TrainConfig:
    base = dict(out_dir=str(out_dir), steps=steps, batch_size=8, lr=3e-2, warmup_steps=2, lr_decay="cosine",
                ema_decay=0.9, log_every=1, ckpt_every=4, progress=False)
    base.update(kw)
    return TrainConfig(**base)


if __name__ == "__main__":  # used by the kill and DDP tests
    out, steps = sys.argv[1], int(sys.argv[2])
    extra = dict(arg.split("=", 1) for arg in sys.argv[3:])
    cfg = toy_config(out, steps, batch_size=int(extra.get("batch_size", 8)), ckpt_every=int(extra.get("ckpt_every", 4)),
                     ema_decay=None)
    trainer = ToyTrainer(toy_model(), cfg, ToyData(), noise=extra.get("noise", "1") == "1")
    import time as _t

    delay = float(extra.get("delay", 0))
    if delay:
        orig = trainer.on_log

        def on_log(step, logs):
            print(f"step {step}", flush=True)
            _t.sleep(delay)
            orig(step, logs)

        trainer.on_log = on_log
    trainer.fit()
    print("done", flush=True)
