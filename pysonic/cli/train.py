"""``pysonic train <trainer> ...``: run one of the registered trainers.

Registry: :data:`TRAINERS` maps a trainer's name to ``"module:function"``, imported only when
that trainer runs (so ``pysonic --help`` stays fast). The function takes the command-line
arguments after the name (``list[str]``; it parses them itself, with
``prog="pysonic train <name>"``) and returns an exit code. To add a trainer, add ONE line::

    TRAINERS["codec"] = "pysonic.train.codec:main"

Every trainer runs unchanged under ``torchrun --nproc_per_node=N -m pysonic train <name> ...``.
"""
from __future__ import annotations

import argparse
import importlib

# name -> "module:function(argv: list[str]) -> int"; one line per trainer.
TRAINERS: dict[str, str] = {
    "tangoflux": "pysonic.train.tangoflux:main",  # pre-training, fine-tuning, CRPO (the config's stage)
    "codec": "pysonic.train.codec:main",  # EnCodec on a folder of audio
    "wavegrad": "pysonic.train.wavegrad:main",  # WaveGrad vocoder (pysonic or ivanvovk config)
    "default": "pysonic.train.default_model:main",  # the shipped default model from scratch (configs/default)
}


def resolve(name: str):
    """The entry function of trainer ``name``."""
    if name not in TRAINERS:
        raise ValueError(f"unknown trainer {name!r}; registered: {sorted(TRAINERS)}")
    module, _, func = TRAINERS[name].partition(":")
    return getattr(importlib.import_module(module), func)


def _run(args: argparse.Namespace) -> int:
    return int(resolve(args.trainer)(list(args.args)) or 0)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a model (pysonic train <trainer> --config FILE)",
        description="Train a model. Trainers: " + ", ".join(sorted(TRAINERS)) + ". "
                    "Run 'pysonic train <trainer> --help' for a trainer's options.",
    )
    p.add_argument("trainer", choices=sorted(TRAINERS), help="which trainer")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the trainer's own arguments (e.g. --config FILE)")
    p.set_defaults(func=_run)
