"""``pysonic bench synth``: SynthBench prompt adherence of a generator (see pysonic.eval.synthbench).

    pysonic bench synth --checkpoint PATH [--generator MODULE:FUNCTION] [--n 20] [--out report.json]
    pysonic bench synth --oracle [--n 20] [--out report.json]     # the ground truth, ~100%

A checkpoint becomes a generate function through :func:`load_generator`: a TangoFlux-layout
directory loads through the TangoFlux pipeline (``--text-encoder``, ``--steps``, ``--guidance``,
``--dtype``); otherwise name a factory with ``--generator MODULE:FUNCTION`` (called with the
checkpoint path, returning ``fn(prompts, durations, seed) -> (audio [B, C, N], sample_rate)``).
"""
from __future__ import annotations

import argparse
import importlib
import os

from pysonic.cli import CLIError


def load_generator(checkpoint: str, factory: str | None = None, **options):
    """Checkpoint path -> SynthBench generate function.

    With ``factory`` ("module:function") that function is called with the checkpoint path. Without
    it, a TangoFlux-layout directory (``tangoflux.safetensors`` inside) is loaded with
    :func:`pysonic.eval.generators.tangoflux_generator` (``options``: text_encoder, steps,
    guidance_scale, dtype); anything else is not loadable yet (the default model's loader has
    not landed).
    """
    if not os.path.exists(checkpoint):
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    if factory is None:
        if os.path.isfile(os.path.join(checkpoint, "tangoflux.safetensors")):
            from pysonic.eval.generators import tangoflux_generator

            return tangoflux_generator(checkpoint, **options)
        raise CLIError(f"loading a generator from {checkpoint} is not available yet (not a TangoFlux directory, and "
                       "the default model's loader has not landed); pass --generator MODULE:FUNCTION, a factory "
                       "called with the checkpoint path that returns fn(prompts, durations, seed) -> (audio, "
                       "sample_rate), or use --oracle")
    module, _, name = factory.partition(":")
    if not module or not name:
        raise CLIError(f"--generator must be MODULE:FUNCTION, got {factory!r}")
    try:
        make = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise CLIError(f"--generator {factory}: {exc}") from None
    return make(checkpoint)


def _run_synth(args: argparse.Namespace) -> int:
    from pysonic.eval.synthbench import ATTRIBUTES, SynthBench, oracle_generator, to_markdown, write_report

    if args.oracle:
        fn = oracle_generator(sample_rate=args.sample_rate)
    else:
        import torch

        options = {"text_encoder": args.text_encoder, "steps": args.steps, "guidance_scale": args.guidance,
                   "dtype": {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]}
        fn = load_generator(args.checkpoint, args.generator, **options)
    splits = ("train", "heldout") if args.split == "both" else (args.split,)
    attributes = tuple(a.strip() for a in args.attributes.split(",")) if args.attributes else ATTRIBUTES
    bench = SynthBench(args.n, splits=splits, attributes=attributes, seed=args.seed, batch_size=args.batch_size)
    report = bench.run(fn, progress=args.progress)
    report["generator"] = "oracle" if args.oracle else args.checkpoint
    text = to_markdown(report)
    print(text, end="")
    if args.out:
        write_report(report, args.out)
        print(f"report written to {args.out}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if args.spectrogram:
        from pysonic.eval.spectrogram import save_prompt_spectrograms
        from pysonic.eval.synthbench import make_prompts

        firsts = [make_prompts(a, 1, splits[0], args.seed)[0] for a in attributes]
        save_prompt_spectrograms(args.spectrogram, fn, [p.caption for p in firsts], [p.duration for p in firsts], args.seed)
        print(f"spectrograms written to {args.spectrogram}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="objective benchmarks (SynthBench prompt adherence)",
                              description="Objective benchmarks.")
    sub = p.add_subparsers(dest="benchmark", metavar="<benchmark>", required=True)
    s = sub.add_parser("synth", help="SynthBench: per-attribute prompt adherence on SonicSynth prompts",
                       description="SynthBench: per-attribute prompt adherence on training-range and held-out "
                                   "values, with the chance level (prompts shuffled across the audio).")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="PATH", help="the model to evaluate")
    src.add_argument("--oracle", action="store_true", help="the ground truth: SonicSynth renders each prompt")
    s.add_argument("--generator", metavar="MODULE:FUNCTION", help="factory(checkpoint) -> generate function")
    s.add_argument("--text-encoder", metavar="DIR", help="TangoFlux directories: the local text encoder")
    s.add_argument("--steps", type=int, default=25, help="TangoFlux directories: sampler steps (default 25)")
    s.add_argument("--guidance", type=float, default=4.5, help="TangoFlux directories: CFG scale (default 4.5)")
    s.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="TangoFlux directories: weights dtype")
    s.add_argument("--n", type=int, default=20, help="prompts per attribute and split (default 20)")
    s.add_argument("--split", choices=("train", "heldout", "both"), default="both")
    s.add_argument("--attributes", metavar="A,B,...", help="comma-separated subset of the attributes (default all)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--sample-rate", type=int, default=16000, help="the oracle's sample rate (default 16000)")
    s.add_argument("--out", metavar="JSON", help="write the full report (per item measurements) here")
    s.add_argument("--markdown", metavar="MD", help="write the table here")
    s.add_argument("--spectrogram", metavar="PNG", help="also draw the first prompt of each attribute here")
    s.add_argument("--progress", action="store_true", help="print progress per batch")
    s.set_defaults(func=_run_synth)
