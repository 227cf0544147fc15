"""``pysonic vocode``: mel spectrograms (or a recording's own mel) to audio with WaveGrad.

    pysonic vocode --checkpoint CKPT --mel-filelist mels.txt --iterations 6 --out DIR
    pysonic vocode IN.wav --checkpoint CKPT -o OUT.wav

``--checkpoint`` is a local WaveGrad checkpoint: an ivanvovk/WaveGrad ``checkpoint_<N>.pt`` (with
its config.json beside it), an LMNT ``weights.pt``, or a pysonic directory (``save_pretrained``).
A mel filelist has one path per line (``.npy`` or ``.pt``, [n_mels, T] or [1, n_mels, T], in the
checkpoint's mel scale; relative paths are relative to the filelist); each becomes
``DIR/<name>.wav``. With an audio file, its mel is computed with the checkpoint's front end and
resynthesised (a vocoder round trip). ``--schedule`` takes a betas file (JSON, .npy, .pt),
``linear`` or ``fibonacci``; by default the schedule shipped for that iteration count is used.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from pysonic.cli import CLIError

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("vocode", help="mel spectrograms or audio to audio (WaveGrad)", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", nargs="?", default=None, metavar="IN.wav", help="audio file to resynthesise")
    p.add_argument("--checkpoint", required=True, help="WaveGrad checkpoint file or directory")
    p.add_argument("--mel-filelist", default=None, help="text file listing .npy/.pt mels, one per line")
    p.add_argument("-o", "--output", default=None, help="output audio file (with IN.wav)")
    p.add_argument("--out", default=None, help="output directory (with --mel-filelist)")
    p.add_argument("--iterations", type=int, default=6, help="sampler iterations (default 6)")
    p.add_argument("--schedule", default=None, help="betas file (.json/.npy/.pt), 'linear' or 'fibonacci'")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler noise (default: random)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="network dtype (default fp32)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def read_filelist(path: Path) -> list[Path]:
    if not path.is_file():
        raise CLIError(f"mel filelist not found: {path}")
    entries = []
    for line in path.read_text().splitlines():
        line = line.split("|", 1)[0].strip()  # "path|..." filelists keep the path first
        if not line or line.startswith("#"):
            continue
        p = Path(line)
        entries.append(p if p.is_absolute() else path.parent / p)
    if not entries:
        raise CLIError(f"mel filelist {path} lists no files")
    return entries


def load_mel(path: Path):
    import numpy as np
    import torch

    if not path.is_file():
        raise CLIError(f"mel file not found: {path}")
    if path.suffix == ".npy":
        mel = torch.from_numpy(np.load(path, allow_pickle=False))
    elif path.suffix == ".pt":
        mel = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(mel, torch.Tensor):
            raise CLIError(f"{path} does not hold a tensor (got {type(mel).__name__})")
    else:
        raise CLIError(f"mel files must be .npy or .pt, got {path}")
    if mel.dim() == 3 and mel.shape[0] == 1:
        mel = mel[0]
    if mel.dim() != 2:
        raise CLIError(f"{path}: a mel must be [n_mels, T] or [1, n_mels, T], got shape {tuple(mel.shape)}")
    return mel.float()


def resolve_schedule(arg: str | None):
    if arg is None or arg in ("linear", "fibonacci"):
        return arg
    from pysonic.models.wavegrad import load_schedule

    path = Path(arg)
    if not path.is_file():
        raise CLIError(f"--schedule: file not found: {path} (or use 'linear' / 'fibonacci')")
    return load_schedule(path)


def run(args) -> int:
    if (args.input is None) == (args.mel_filelist is None):
        raise CLIError("give either IN.wav (with -o OUT.wav) or --mel-filelist LIST (with --out DIR)")
    if args.input is not None and args.output is None:
        raise CLIError("-o OUT.wav is required with an input audio file")
    if args.mel_filelist is not None and args.out is None:
        raise CLIError("--out DIR is required with --mel-filelist")
    import torch

    from pysonic.audio import load_audio, save_audio
    from pysonic.models.wavegrad import WaveGrad

    mel_files = read_filelist(Path(args.mel_filelist)) if args.mel_filelist is not None else []
    schedule = resolve_schedule(args.schedule)
    model = WaveGrad.from_pretrained(args.checkpoint)
    dtype = getattr(torch, DTYPES[args.dtype])
    model.resolve_schedule(args.iterations, schedule)  # a missing schedule fails before any work
    generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None

    def vocode(mel):
        return model.generate(mel[None], args.iterations, schedule, generator=generator, dtype=dtype,
                              progress=not args.no_progress)[0]

    t0, seconds = time.perf_counter(), 0.0
    if args.input is not None:
        out = Path(args.output)
        if not out.parent.is_dir():
            raise CLIError(f"output directory does not exist: {out.parent}")
        audio, _ = load_audio(args.input, model.sample_rate)
        wav = audio.mean(0)  # mono
        if wav.shape[0] <= model.config.mel.n_fft // 2:
            raise CLIError(f"{args.input} is too short: {wav.shape[0]} samples (need more than {model.config.mel.n_fft // 2})")
        n = wav.shape[0]
        if model.config.mel.drop_last_frame:  # pad as ivanvovk's test set does, so frames * hop >= n
            wav = torch.nn.functional.pad(wav, (0, (n // model.hop_length + 1) * model.hop_length - n))
        synth = vocode(model.mel(wav))[:n]
        save_audio(out, synth, model.sample_rate, normalize=None)
        seconds = synth.shape[0] / model.sample_rate
        print(f"wrote {out}")
    else:
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        for path in mel_files:
            synth = vocode(load_mel(path))
            target = out_dir / f"{path.stem}.wav"
            save_audio(target, synth, model.sample_rate, normalize=None)
            seconds += synth.shape[0] / model.sample_rate
            print(f"wrote {target}")
    elapsed = time.perf_counter() - t0
    if seconds > 0:
        print(f"{seconds:.2f} s of audio in {elapsed:.2f} s (RTF {elapsed / seconds:.3f})")
    return 0
