#!/usr/bin/env python
"""Does the default model's flow transformer learn pitch when its latent is ideal? A test with no
VAE in the loop.

The "latent" is a phase-free stand-in: log magnitude on a log-frequency axis (128 bands from 40 to
7600 Hz, STFT of 2048 samples at hop 1024, 16 kHz; 77 frames for 5.024 s), normalised to unit
variance. A steady tone gives the same frame at every time and its pitch is a bump position, so
this is the easiest latent a flow model could get. The flow model has the default recipe's
architecture and training settings; the text encoder is the shipped one (frozen), optionally with
the value place code (``--value-code K``, see :mod:`pysonic.text.word_encoder`).

Steps (each resumes from what the last one wrote under ``--work``):
  data   render SonicSynth train items and their features (20000 items: ~1 min)
  train  flow matching on them (8000 steps: ~18 min at 2 threads)
  eval   SynthBench's pitch prompts (train and held-out): the pitch read from the generated
         features (time-averaged, first ``duration`` seconds) within 50 cents of the same reading
         of the real tone; and minimal pairs "a sine/square wave at F Hz" for F from 150 to 1500

Usage: ``python tools/oracle_flow_pitch.py {data,train,eval} --work DIR [--value-code 64] [--steps N] [--guidance G]
[--heads H] [--pooling attention]``
(from a checkout: ``PYTHONPATH=.``). Measured 2026-11-22 (20000 items, 8000 steps, 15 prompts per
split): without the code 0/15 training-range and 0/15 held-out pitch prompts within 50 cents, sines
asked at 150/220/300/440/600 Hz came out at 103/274/278/274/3927 Hz; with 64 bumps 3/15 and 0/15,
107/220/294/405/613 Hz. The model card has the longer run.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SR, NFFT, HOP, BANDS, F_LO, F_HI = 16000, 2048, 1024, 128, 40.0, 7600.0
SECONDS = 5.024
SAMPLES = int(SR * SECONDS)
FRAMES = (SAMPLES - NFFT) // HOP + 1
CENTRES = F_LO * (F_HI / F_LO) ** (np.arange(BANDS) / (BANDS - 1))
TEXT_ENCODER = ROOT / "pysonic" / "assets" / "default" / "text_encoder"


def features(wav: torch.Tensor) -> torch.Tensor:
    """Mono waveform [N] (zero-padded or cut to 5.024 s) -> log magnitude [FRAMES, BANDS]: the
    STFT magnitude read at each band's centre frequency (linear interpolation between bins)."""
    x = torch.zeros(SAMPLES)
    n = min(SAMPLES, wav.numel())
    x[:n] = wav[:n]
    mag = torch.stft(x, NFFT, HOP, window=torch.hann_window(NFFT), center=False, return_complex=True).abs()
    pos = torch.tensor(CENTRES * NFFT / SR, dtype=torch.float32)
    lo = pos.floor().long()
    frac = (pos - lo)[:, None]
    return torch.log(mag[lo] * (1 - frac) + mag[lo + 1] * frac + 1e-2).T.contiguous()


def pitch_of(feat: torch.Tensor, seconds: float | None = None) -> float:
    """The strongest band of the time-averaged magnitude (first ``seconds``), refined by a parabola
    through it and its neighbours (log magnitude) -> Hz."""
    if seconds is not None:
        feat = feat[: max(1, int(seconds * SR / HOP) - 1)]
    m = feat.exp().mean(0).log()
    k = min(max(int(m.argmax()), 1), BANDS - 2)
    a, b, c = float(m[k - 1]), float(m[k]), float(m[k + 1])
    off = 0.5 * (a - c) / (a - 2 * b + c) if a - 2 * b + c != 0 else 0.0
    return float(F_LO * (F_HI / F_LO) ** ((k + off) / (BANDS - 1)))


def text_encoder(value_code: int):
    """The shipped text encoder, with the value place code of ``value_code`` bumps added (0: as shipped)."""
    from pysonic.text.word_encoder import WordEncoderConfig, WordTextEncoder

    shipped = WordTextEncoder.from_pretrained(TEXT_ENCODER)
    if not value_code:
        return shipped
    coded = WordTextEncoder(WordEncoderConfig(**{**shipped.config.__dict__, "value_code": value_code}))
    missing, unexpected = coded.load_state_dict(shipped.state_dict(), strict=False)
    assert not unexpected and set(missing) == {"value_centres", "value_projection"}, (missing, unexpected)
    return coded.eval()


def model_spec(heads: int = 2, pooling: str = "mean") -> dict:
    """The default recipe's flow model (width 64 x ``heads``, pooled text by ``pooling``), on
    BANDS channels and FRAMES frames."""
    return {"text_pooling": pooling, "num_layers": 2, "num_single_layers": 4, "in_channels": BANDS, "attention_head_dim": 64,
            "num_attention_heads": heads, "joint_attention_dim": 128, "audio_seq_len": FRAMES, "max_duration": SECONDS,
            "duration_features": 64, "axes_dims_rope": [8, 28, 28], "text_encoder_name": "text_encoder"}


class FeatureItems(torch.utils.data.Dataset):
    def __init__(self, data: dict) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data["captions"])

    def __getitem__(self, i: int) -> dict:
        d = self.data
        return {"latents": (d["feats"][i] - d["mu"]) / d["sd"], "caption": d["captions"][i],
                "duration": d["durations"][i], "index": i}


def make_data(work: Path, items: int) -> None:
    from pysonic.data.synth import SonicSynth

    synth = SonicSynth("train", sample_rate=SR, duration=(1.0, 5.0), seed=0, length=items)
    feats, captions, durations = [], [], []
    for i in range(items):
        item = synth[i]
        feats.append(features(item["audio"][0]))
        captions.append(item["caption"])
        durations.append(float(item["duration"]))
    f = torch.stack(feats)
    torch.save({"feats": f, "captions": captions, "durations": durations, "mu": float(f.mean()), "sd": float(f.std())},
               work / "data.pt")


def run_dir(work: Path, value_code: int, heads: int, pooling: str = "mean") -> Path:
    return work / (f"flow_code{value_code}" + (f"_heads{heads}" if heads != 2 else "")
                   + (f"_pool{pooling}" if pooling != "mean" else ""))


def train(work: Path, steps: int, value_code: int, heads: int = 2, pooling: str = "mean") -> None:
    from pysonic.train.flow_matching import FlowMatchingConfig, FlowMatchingTrainer
    from pysonic.train.tangoflux import build_model

    data = torch.load(work / "data.pt", weights_only=True)
    cfg = FlowMatchingConfig.from_dict(dict(
        out_dir=str(run_dir(work, value_code, heads, pooling)), steps=steps, batch_size=16, lr=1e-3, warmup_steps=100,
        lr_decay="constant", betas=[0.9, 0.95], weight_decay=0.01, grad_clip=1.0, precision="bf16", ema_decay=0.999,
        max_audio_duration=SECONDS, sample_posterior=False, uncondition=True, uncondition_prob=0.1,
        train_duration_embedder=True, log_every=100, ckpt_every=500, keep_checkpoints=2, seed=0))
    FlowMatchingTrainer(build_model(model_spec(heads, pooling)), cfg, FeatureItems(data), text_encoder=text_encoder(value_code)).fit()


class _NoVAE(torch.nn.Module):
    """What the pipeline asks of a VAE before decoding (the features are read, never decoded)."""

    def __init__(self) -> None:
        super().__init__()
        self.config = argparse.Namespace(latent_channels=BANDS)
        self.hop_length, self.sampling_rate = HOP, SR


def evaluate(work: Path, value_code: int, n: int, guidance: float = 4.5, heads: int = 2, pooling: str = "mean") -> None:
    from safetensors.torch import load_file

    from pysonic.data.synth.dataset import render_item
    from pysonic.eval.synthbench import make_prompts
    from pysonic.pipelines.tangoflux import TangoFlux
    from pysonic.train.tangoflux import build_model

    data = torch.load(work / "data.pt", weights_only=True)
    model = build_model(model_spec(heads, pooling))
    model.load_state_dict(load_file(str(run_dir(work, value_code, heads, pooling) / "final.safetensors")))
    pipe = TangoFlux(model, _NoVAE(), text_encoder(value_code))

    def generated_pitch(caption: str, seconds: float, seed: int = 0) -> float:
        z = pipe.generate_latents(caption, duration=seconds, steps=25, guidance_scale=guidance,
                                  generator=torch.Generator().manual_seed(seed), progress=False)[0]
        return pitch_of(z * data["sd"] + data["mu"], seconds)

    for split in ("train", "heldout"):
        ok = 0
        for p in make_prompts("pitch", n, split, seed=0):
            real = pitch_of(features(render_item(p.spec, sample_rate=SR)[0]), p.duration)
            got = generated_pitch(p.caption, p.duration)
            ok += abs(1200 * math.log2(got / real)) <= 50
            print(f"{split}: {p.caption!r}: asked {p.spec.layers[0].freq:.1f} Hz, real tone reads {real:.1f}, generated {got:.1f}")
        print(f"{split}: {ok}/{n} within 50 cents")
    for wave in ("sine", "square"):
        asked = (150, 220, 300, 440, 600, 800, 1000, 1500)
        got = [round(generated_pitch(f"a {wave} wave at {f} Hz", 3.0, seed=1)) for f in asked]
        print(f"minimal pairs, {wave}: asked {list(asked)} -> {got}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=("data", "train", "eval"))
    p.add_argument("--work", required=True, help="folder for the features, runs and checkpoints")
    p.add_argument("--items", type=int, default=20000)
    p.add_argument("--steps", type=int, default=8000)
    p.add_argument("--value-code", type=int, default=0, help="bumps of the text encoder's value place code (0: off)")
    p.add_argument("--n", type=int, default=15, help="SynthBench pitch prompts per split")
    p.add_argument("--guidance", type=float, default=4.5, help="classifier-free guidance scale for eval (1: none)")
    p.add_argument("--heads", type=int, default=2, help="flow model width in 64-wide heads (the recipe: 2)")
    p.add_argument("--pooling", choices=("mean", "attention"), default="mean",
                   help="pooled text for the flow model's adaLN (TangoFluxConfig.text_pooling; the recipe: mean)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    if a.step == "data":
        make_data(work, a.items)
    elif a.step == "train":
        train(work, a.steps, a.value_code, a.heads, a.pooling)
    else:
        evaluate(work, a.value_code, a.n, a.guidance, a.heads, a.pooling)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
