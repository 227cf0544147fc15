"""``pysonic generate "PROMPT" -o out.wav``: text to audio with TangoFlux.

    pysonic generate "a dog barks in the rain" -o out.wav --duration 10 --steps 25 \\
        --guidance 4.5 --seed 0 --checkpoint DIR --text-encoder DIR

``--checkpoint`` is a local TangoFlux release directory (config.json, tangoflux.safetensors,
vae.safetensors); ``--text-encoder`` a local FLAN-T5 directory (default: the release config's
``text_encoder_name`` when that is a local directory). Nothing is downloaded. Several prompts or
``--num-samples`` > 1 write ``out_0.wav``, ``out_1.wav``, ... (prompt-major order).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from pysonic.cli import CLIError

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="text to audio (TangoFlux)", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help="text prompt(s)")
    p.add_argument("-o", "--output", required=True, help="output audio file (.wav, .flac, ...)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds, 1 to 30 (default 10)")
    p.add_argument("--steps", type=int, default=25, help="sampler steps (default 25)")
    p.add_argument("--guidance", type=float, default=4.5, help="classifier-free guidance scale (default 4.5)")
    p.add_argument("--seed", type=int, default=None, help="seed of the initial noise (default: random)")
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt (default 1)")
    p.add_argument("--scheduler", choices=["euler", "heun"], default="euler", help="flow sampler (default euler)")
    p.add_argument("--checkpoint", default=None, help="TangoFlux release directory")
    p.add_argument("--text-encoder", default=None, help="local FLAN-T5 directory")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="model and VAE dtype (default fp32)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--normalize", choices=["peak", "loudness", "none"], default="peak",
                   help="output normalisation (default peak)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def resolve_checkpoint(arg: str | None) -> Path:
    """The checkpoint directory to load (a shipped default model would be resolved here)."""
    if arg is None:
        raise CLIError("--checkpoint DIR is required (a local TangoFlux release directory)")
    return Path(arg)


def output_paths(output: str, count: int) -> list[Path]:
    out = Path(output)
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(count)]


def run(args) -> int:
    import torch

    from pysonic.audio import save_audio
    from pysonic.pipelines import TangoFlux

    checkpoint = resolve_checkpoint(args.checkpoint)
    out_dir = Path(args.output).parent
    if not out_dir.is_dir():
        raise CLIError(f"output directory does not exist: {out_dir}")
    t0 = time.perf_counter()
    pipe = TangoFlux.from_pretrained(checkpoint, text_encoder=args.text_encoder,
                                     dtype=getattr(torch, DTYPES[args.dtype]), device=args.device)
    generator = None
    if args.seed is not None:
        generator = torch.Generator().manual_seed(args.seed)
    t1 = time.perf_counter()
    audio = pipe.generate(args.prompts, duration=args.duration, steps=args.steps, guidance_scale=args.guidance,
                          num_samples_per_prompt=args.num_samples, generator=generator, scheduler=args.scheduler,
                          progress=not args.no_progress)
    t2 = time.perf_counter()
    normalize = None if args.normalize == "none" else args.normalize
    for path, item in zip(output_paths(args.output, audio.shape[0]), audio):
        save_audio(path, item, pipe.sample_rate, normalize=normalize)
        print(path)
    seconds = audio.shape[-1] / pipe.sample_rate
    print(f"generated {audio.shape[0]} x {seconds:.2f} s in {t2 - t1:.1f} s (load {t1 - t0:.1f} s)")
    return 0
