"""``pysonic codec``: EnCodec audio <-> codes files.

    pysonic codec encode IN.wav -o OUT.npz --checkpoint PATH [--bandwidth 6] [--resample]
    pysonic codec decode IN.npz -o OUT.wav [--checkpoint PATH]

``--checkpoint`` is a ``transformers`` EnCodec directory or an ``encodec`` package checkpoint
file. Input audio at another sample rate or channel count is an error unless ``--resample``
(then it is resampled and remixed to the model's). The ``.npz`` records the checkpoint it was
made with, so ``decode`` needs ``--checkpoint`` only to use another copy of the same model.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("codec", help="EnCodec: encode audio to codes (.npz) and decode back",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="codec_command", metavar="<encode|decode>")
    sub.required = True

    enc = sub.add_parser("encode", help="audio file -> codes .npz")
    enc.add_argument("input", type=Path, help="audio file (any format soundfile reads)")
    enc.add_argument("-o", "--output", type=Path, required=True, help="codes file to write (.npz)")
    enc.add_argument("--checkpoint", type=Path, required=True,
                     help="transformers EnCodec directory or encodec package checkpoint file")
    enc.add_argument("--bandwidth", type=float, default=None,
                     help="kbps, one of the model's bandwidths (default: the highest)")
    enc.add_argument("--resample", action="store_true",
                     help="resample/remix input at another sample rate or channel count")
    enc.add_argument("--chunk-seconds", type=float, default=None,
                     help="encode in chunks of this many seconds (bounded memory; causal models)")
    enc.set_defaults(func=_encode)

    dec = sub.add_parser("decode", help="codes .npz -> audio file")
    dec.add_argument("input", type=Path, help="codes file written by `pysonic codec encode`")
    dec.add_argument("-o", "--output", type=Path, required=True, help="audio file to write (format from the extension)")
    dec.add_argument("--checkpoint", type=Path, default=None,
                     help="model to decode with (default: the checkpoint recorded in the .npz)")
    dec.add_argument("--subtype", default=None,
                     help="sample format (soundfile subtype, e.g. PCM_16, PCM_24, FLOAT; default: the format's own)")
    dec.add_argument("--chunk-frames", type=int, default=None,
                     help="decode this many code frames at a time (bounded memory; causal models)")
    dec.set_defaults(func=_decode)


def _need_file(path: Path, what: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")


def _need_parent(path: Path) -> None:
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output directory {path.parent} does not exist")


def _encode(args) -> int:
    from pysonic.codecs.encodec import encode_file

    _need_file(args.input, "input")
    _need_file(args.checkpoint, "checkpoint")
    _need_parent(args.output)
    if args.chunk_seconds is not None and args.chunk_seconds <= 0:
        raise ValueError(f"--chunk-seconds must be > 0, got {args.chunk_seconds}")
    info = encode_file(args.input, args.output, checkpoint=args.checkpoint, bandwidth=args.bandwidth,
                       resample_input=args.resample, chunk_seconds=args.chunk_seconds)
    print(f"{args.input} -> {args.output}: {info['num_samples']} samples at {info['sample_rate']} Hz, "
          f"{info['bandwidth']:g} kbps", file=sys.stderr)
    return 0


def _decode(args) -> int:
    from pysonic.codecs.encodec import decode_file

    _need_file(args.input, "input")
    if args.checkpoint is not None:
        _need_file(args.checkpoint, "checkpoint")
    _need_parent(args.output)
    if args.chunk_frames is not None and args.chunk_frames <= 0:
        raise ValueError(f"--chunk-frames must be > 0, got {args.chunk_frames}")
    info = decode_file(args.input, args.output, checkpoint=args.checkpoint, chunk_frames=args.chunk_frames,
                       subtype=args.subtype)
    print(f"{args.input} -> {args.output}: {info['num_samples']} samples, {info['channels']} channel(s) "
          f"at {info['sample_rate']} Hz", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------- pysonic train codec
# `pysonic train codec` is pysonic.train.codec:main (registered in pysonic/cli/train.py); its
# arguments are defined here so that both entry points parse the same way.
def add_train_arguments(parser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="training config (.yaml, .json or .toml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set steps=1000 --set out_dir=runs/x")


def parse_overrides(items: list[str]) -> dict:
    import json

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out
