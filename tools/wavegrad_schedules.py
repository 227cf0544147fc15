#!/usr/bin/env python
"""Produce pysonic/models/wavegrad/schedules.json: train a small WaveGrad, then search its schedules.

No trained WaveGrad and no speech corpus are available where pysonic is built, so the shipped
schedules come from this reproducible recipe:

1. ``--data``: synthetic voiced/unvoiced clips at 22,050 Hz (harmonic tones with vibrato and
   syllable-like envelopes, plus noise bursts), written as WAVs with a filelist in the original's
   format.
2. ``--steps`` training steps (batch 4 x 3600 samples) of a reduced-width WaveGrad with the ivanvovk front end (80 mels,
   hop 300, factors 5-5-3-2-2) using ``pysonic train wavegrad`` (its linear 1000-step betas).
3. :func:`pysonic.models.wavegrad.search.search_schedule` for 6, 7 and 12 iterations (multiplier
   grid + two refinement rounds), 25 (Fibonacci starts, as the original did for 25) and 50, 100,
   1000 (linear end points), scored by log-mel L1 on held-out clips.

The result fits that model; for a real checkpoint rerun the search with it and your audio::

    betas = search_schedule(WaveGrad.from_pretrained(ckpt), None, audio, iterations=6, workers=4)
    save_schedule("6.json", betas)          # then generate(..., schedule=load_schedule("6.json"))

Usage: ``python tools/wavegrad_schedules.py --work DIR [--steps N] [--workers 2] [--out FILE]``.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SMALL = {  # ivanvovk front end and factors, much narrower layers (0.3M parameters: CPU-trainable here)
    "factors": [5, 5, 3, 2, 2], "upsampling_preconv_out_channels": 96,
    "upsampling_out_channels": [64, 64, 48, 32, 32],
    "upsampling_dilations": [[1, 2, 1, 2], [1, 2, 1, 2], [1, 2, 4, 8], [1, 2, 4, 8], [1, 2, 4, 8]],
    "downsampling_preconv_out_channels": 32, "downsampling_out_channels": [32, 32, 48, 64],
    "downsampling_dilations": [[1, 2, 4]] * 4,
}


def synth_clip(g: torch.Generator, seconds: float, sr: int = 22050) -> torch.Tensor:
    n = int(seconds * sr)
    t = torch.arange(n) / sr
    f0 = 90 + 260 * torch.rand((), generator=g)
    vib = 1 + 0.02 * torch.sin(2 * math.pi * (4 + 3 * torch.rand((), generator=g)) * t)
    phase = 2 * math.pi * torch.cumsum(f0 * vib, 0) / sr
    k = torch.arange(1, 16)[:, None]
    voiced = (torch.sin(k * phase) / k ** 1.2).sum(0)
    rate = 3 + 3 * torch.rand((), generator=g)  # syllables per second
    env = torch.sin(math.pi * rate * t).abs() ** 2
    noise = torch.randn(n, generator=g) * (torch.sin(math.pi * rate * t + 1.3).abs() ** 8)
    x = 0.6 * voiced * env + 0.15 * noise
    return 0.9 * x / x.abs().max()


def make_data(work: Path, count: int = 48, test: int = 4) -> tuple[Path, Path, list[torch.Tensor]]:
    from pysonic.audio import save_audio

    g = torch.Generator().manual_seed(0)
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    paths, clips = [], []
    for i in range(count + test):
        clip = synth_clip(g, 1.2)
        save_audio(data / f"clip{i:03d}.wav", clip, 22050, normalize=None, subtype="FLOAT")
        paths.append(str(data / f"clip{i:03d}.wav"))
        clips.append(clip)
    (work / "train.txt").write_text("\n".join(paths[:count]) + "\n")
    (work / "test.txt").write_text("\n".join(paths[count:]) + "\n")
    return work / "train.txt", work / "test.txt", clips[count:]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="working directory (data, training run)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--from-checkpoint", action="store_true", help="skip training: use the run's latest checkpoint")
    p.add_argument("--search-only", action="store_true", help="skip training: use the finished run's model")
    p.add_argument("--out", default=str(ROOT / "pysonic" / "models" / "wavegrad" / "schedules.json"))
    args = p.parse_args()
    work = Path(args.work)
    torch.set_num_threads(2)
    train_list, test_list, test_clips = make_data(work)
    from pysonic.models.wavegrad import WaveGrad
    from pysonic.models.wavegrad import search as S
    from pysonic.train import wavegrad as W

    cfg = {
        "model": {"ivanvovk_json": {"model_config": SMALL, "data_config": {
            "sample_rate": 22050, "n_fft": 1024, "win_length": 1024, "hop_length": 300,
            "f_min": 80.0, "f_max": 8000, "n_mels": 80}}},
        "data": {"train_filelist": str(train_list), "test_filelist": str(test_list), "segment_length": 3600},
        # fp32: bf16 autocast backward of these convolutions is slower than fp32 on this CPU.
        "train": {"out_dir": str(work / "run"), "steps": args.steps, "batch_size": 4, "lr": 2e-3,
                  "lr_decay": "cosine", "min_lr_ratio": 0.1, "grad_clip": 1.0,
                  "precision": "fp32", "log_every": 25, "ckpt_every": 100},
        "test_every": 100,
    }
    t0 = time.time()
    if args.search_only:  # search again with the finished run's exported model
        model = WaveGrad.from_pretrained(work / "run" / "model")
        trained = f"{args.steps} steps"
    elif args.from_checkpoint:  # search with the latest checkpoint of an interrupted run
        from pysonic.train import latest_checkpoint, load_checkpoint

        ckpt = latest_checkpoint(work / "run")
        model = W.build_model(cfg["model"])
        model.net.load_state_dict(load_checkpoint(ckpt)["model"])
        trained = f"{ckpt.stem.split('_')[1]} steps"
    else:
        last = W.train(cfg)
        print("trained", last, f"{time.time() - t0:.0f} s", flush=True)
        model = WaveGrad.from_pretrained(work / "run" / "model")
        trained = f"{args.steps} steps"
    model.eval()
    audio = torch.stack([c[:3000] for c in test_clips])  # the 4 held-out clips x 3000 samples (10 frames)
    recipe = {6: "grid", 7: "grid", 12: "grid", 25: "fibonacci", 50: "linear", 100: "linear", 1000: "linear"}
    out = {"note": (
        "Searched by tools/wavegrad_schedules.py: a reduced-width WaveGrad (ivanvovk front end, hop 300) trained "
        f"{trained} (batch 4 x 3600 samples) on synthetic harmonic/noise clips, scored by log-mel L1 on 4 held-out clips. "
        "Rerun pysonic.models.wavegrad.search_schedule with your own checkpoint and audio for best results."),
        "schedules": {}}
    for n, kind in recipe.items():
        t1 = time.time()
        if kind == "grid":
            # ~2000 grid points and 2 refinement rounds: minutes on 2 cores for this small model
            cands, rounds = S.grid_candidates(n, (1e-6, 1e-1), max_candidates=2000 if n < 12 else 1000), 2
        elif kind == "fibonacci":
            cands, rounds = S.fibonacci_candidates(n), 0
        else:
            starts = (1e-6, 1e-5) if n < 100 else (1e-6,)
            ends = None if n < 100 else ([0.02, 0.05, 0.1, 0.2, 0.5, 0.9] if n == 100 else [0.01, 0.02])
            cands, rounds = S.linear_candidates(n, starts, ends), 0
        best, scores = S.search_schedule(model, None, audio, n, candidates=cands, refine_rounds=rounds,
                                         workers=args.workers, return_scores=True, progress=True)
        out["schedules"][str(n)] = {
            "betas": best.tolist(), "score": scores[0][1], "candidates": len(scores),
            "searched_with": f"{kind} candidates" + (f" + {rounds} refinement round{'s' * (rounds > 1)}" if rounds else ""),
        }
        print(n, kind, f"best {scores[0][1]:.4f} of {len(scores)} in {time.time() - t1:.0f} s", flush=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
