"""Training: the shared loop and its pieces (checkpoints, distributed, EMA, logs, resumable data),
and one trainer per family built on them. Inference code never imports this package."""
from pysonic.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from pysonic.train.data import ResumableLoader
from pysonic.train.distributed import DistContext, init_distributed, shutdown_distributed
from pysonic.train.ema import EMA
from pysonic.train.logger import ScalarLogger
from pysonic.train.loop import TrainConfig, Trainer, lr_factor, split_batch

__all__ = [
    "DistContext", "EMA", "ResumableLoader", "ScalarLogger", "TrainConfig", "Trainer", "init_distributed",
    "latest_checkpoint", "load_checkpoint", "lr_factor", "save_checkpoint", "shutdown_distributed", "split_batch",
]
