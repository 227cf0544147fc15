#!/usr/bin/env python
"""What an Oobleck VAE's latent frames say about a tone: how much they depend on its phase, and
how fast they change with its pitch. Both decide what a flow model must learn to follow "a tone
at F Hz".

- phase dependence: a sine at ``--base`` Hz started at 16 phases; each latent frame is compared
  (cosine similarity) with the same frame of the phase-0 tone, averaged. Near 1: the frames
  describe the tone whatever its phase (as a magnitude spectrogram does). Near 0: the frames are
  waveform-like, the tone's phase turns from frame to frame, and the flow model has to generate
  that rotation coherently over the whole clip, at a rate set by the pitch.
- pitch selectivity: for a tone some cents away, each latent frame's best match among the base
  tone's frames (best over the 16 phases), averaged: how many cents apart two pitches must be for
  their frames to look different.

Usage: ``python tools/latent_pitch_similarity.py [--vae pysonic/assets/default/vae] [--base 440]``
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OFFSETS_CENTS = (0, 5, 17, 50, 100, 200, 700)


def tone_frames(vae, freq: float, phase: float, seconds: float = 1.0) -> torch.Tensor:
    """Unit-norm latent frames [T, C] of a 0.3-amplitude sine (frames near the edges dropped)."""
    sr = vae.sampling_rate
    t = torch.arange(int(seconds * sr)) / sr
    wav = 0.3 * torch.sin(2 * math.pi * (freq * t + phase))
    with torch.no_grad():
        mean, _ = vae.encode_distribution(wav.repeat(vae.config.audio_channels, 1)[None])
    z = mean[0, :, 2:-2].T
    return z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)


def phase_dependence(vae, base: float, *, phases: int = 16) -> float:
    """Mean same-frame cosine similarity between the tone at phase 0 and at ``phases`` phases."""
    ref = tone_frames(vae, base, 0.0)
    return float(torch.stack([(tone_frames(vae, base, k / phases) * ref).sum(1).mean() for k in range(phases)]).mean())


def frame_similarity(vae, base: float, cents: float, *, phases: int = 16) -> float:
    """Mean over the detuned tone's latent frames of the best cosine similarity with any frame of
    the base tone (best over ``phases`` starting phases of the detuned tone)."""
    ref = tone_frames(vae, base, 0.0)
    detuned = base * 2 ** (cents / 1200)
    best = torch.stack([(tone_frames(vae, detuned, k / phases) @ ref.T).max(dim=1).values for k in range(phases)])
    return float(best.max(dim=0).values.mean())


def main() -> int:
    from pysonic.codecs.oobleck import OobleckVAE

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", default=str(ROOT / "pysonic" / "assets" / "default" / "vae"))
    p.add_argument("--base", type=float, default=440.0)
    args = p.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    vae = OobleckVAE.from_pretrained(args.vae).eval()
    print(f"VAE {args.vae}: hop {vae.hop_length} samples, {vae.config.latent_channels} latent channels; "
          f"base {args.base:g} Hz")
    print(f"phase dependence (same-frame similarity over 16 phases; 1 = phase-free): "
          f"{phase_dependence(vae, args.base):.3f}")
    print("| detune (cents) | best frame similarity |\n| ---: | ---: |")
    for cents in OFFSETS_CENTS:
        print(f"| {cents} | {frame_similarity(vae, args.base, cents):.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
