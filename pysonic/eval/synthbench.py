"""SynthBench: objective prompt adherence of a text-to-audio generator on SonicSynth prompts.

For each attribute, ``n`` prompts are drawn (training-range values for split "train", held-out values
for split "heldout", see :mod:`pysonic.data.synth.spec`), the generator renders them, and an
analyser measures the attribute from the audio alone (:mod:`pysonic.eval.analysis`). What counts as
correct:

=========  ==================================================================================
pitch      a tone: the dominant pitch within 50 cents of the asked pitch
chord      a major/minor chord: the lowest prominent peak within 50 cents of the root, peaks at the
           third (+4 major / +3 minor semitones) and the fifth (+7), none at the other third
melody     a rising/falling major scale: split into 8 equal parts, the first within 50 cents of the
           start note, the last within 50 cents of the octave above/below it, every step moving at
           least half a semitone in the asked direction
tempo      a drum beat: tempo within 4% of the asked BPM (half or double tempo is wrong)
noise      noise colour (white/pink/brown) from the spectral slope; held-out: a tone over noise
sweep      a rising/falling sweep: the frame-wise peak frequency covers >= 1 octave that way
clicks     clicks or beeps: the event rate within 4% of the asked rate per second
loudness   quiet/moderate/loud from the active level (boundaries -32 and -20 dBFS)
duration   a continuous sound (tone, chord, noise, sweep) lasts the requested time: the output is
           that long and sounds until the requested end (|extent - duration| <= max(0.1 s, 5%),
           on the output before any crop), and its last quarter (>= 0.25 s) still passes the
           kind's check (pitch, chord, noise colour, or >= 0.25 octave of sweep the asked way)
mixture    "X over Y": every layer's own check (pitch or click rate, and noise colour or tempo)
=========  ==================================================================================

Silence is a SonicSynth kind but not a SynthBench attribute (nothing to measure but the level).

Chance level: the same checks with the prompts shuffled across all the generated audio of a split,
reported as the exact expectation over shuffles: for an attribute, the mean score of its prompts j
judged on the audio of every other prompt i != j (any attribute). ``chance_within`` is the same with
i restricted to the attribute's own prompts (higher for held-out values, which sit close together).

A generator is ``fn(prompts: list[str], durations: list[float], seed: int) -> (audio, sample_rate)``
with audio a tensor [B, C, N] (items shorter than N padded with silence) or a list of B tensors
[C, N_i]. Audio is cut to each prompt's duration before every check but the duration check.
An item whose audio cannot be analysed (NaN, empty) counts as wrong, with the reason in the report.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from pysonic.data.synth.captions import make_caption, parse_caption
from pysonic.data.synth.dataset import render_item
from pysonic.data.synth.spec import CHORD_INTERVALS, Sound, SynthSpec, hz_to_midi, sample_spec, spec_is_heldout
from pysonic.eval import analysis as A

__all__ = ["ATTRIBUTES", "SynthBench", "BenchPrompt", "measure", "judge", "oracle_generator", "to_markdown",
           "PITCH_TOL_CENTS", "RATE_TOL"]

ATTRIBUTES = ("pitch", "chord", "melody", "tempo", "noise", "sweep", "clicks", "loudness", "duration", "mixture")
PITCH_TOL_CENTS = 50.0
RATE_TOL = 0.04            # tempo and click rate: relative
SWEEP_MIN_OCTAVES = 1.0
DURATION_TOL = (0.1, 0.05)  # max(0.1 s, 5% of the duration)
TAIL_MIN_S = 0.25          # duration: the tail checked for the asked sound, at least this long
TAIL_SWEEP_OCTAVES = 0.25  # a sweep's last quarter covers >= 0.5 octave (sweeps span >= 2 octaves)

Generator = Callable[[list, list, int], tuple]


@dataclass(frozen=True)
class BenchPrompt:
    attribute: str
    caption: str
    spec: SynthSpec

    @property
    def duration(self) -> float:
        return self.spec.duration


# --------------------------------------------------------------------------------------------
# prompts

_SPLIT_CODE = {"train": 0, "heldout": 1}
_LOUDNESS_KINDS = {"train": ("tone", "chord", "noise", "drums", "sweep"), "heldout": ("tone", "chord", "drums", "sweep")}
_DURATION_KINDS = {"train": ("tone", "chord", "noise", "sweep"), "heldout": ("tone", "chord", "sweep")}
_KIND = {"pitch": "tone", "chord": "chord", "melody": "scale", "tempo": "drums", "sweep": "sweep",
         "clicks": "clicks", "mixture": "mixture"}


def _prompt_spec(attribute: str, split: str, rng: np.random.Generator, i: int) -> SynthSpec:
    if attribute in _KIND:
        return sample_spec(rng, split=split, kind=_KIND[attribute])
    if attribute == "noise":
        if split == "train":
            return sample_spec(rng, split=split, kind="noise")
        while True:  # held out: a held-out tone over noise (noise itself has no held-out value)
            spec = sample_spec(rng, split=split, kind="mixture")
            if spec.layers[0].kind == "tone" and spec.layers[1].kind == "noise":
                return spec
    if attribute == "loudness":
        kinds = _LOUDNESS_KINDS[split]
        return sample_spec(rng, split=split, kind=kinds[rng.integers(len(kinds))],
                           loudness=("quiet", "moderate", "loud")[i % 3])
    if attribute == "duration":
        kinds = _DURATION_KINDS[split]
        return sample_spec(rng, split=split, kind=kinds[rng.integers(len(kinds))])
    raise ValueError(f"SynthBench: unknown attribute {attribute!r}; expected one of {ATTRIBUTES}")


def make_prompts(attribute: str, n: int, split: str, seed: int = 0) -> list[BenchPrompt]:
    """n prompts for one attribute (deterministic in seed, split, attribute)."""
    if split not in _SPLIT_CODE:
        raise ValueError(f"SynthBench: split must be 'train' or 'heldout', got {split!r}")
    rng = np.random.default_rng([seed, _SPLIT_CODE[split], ATTRIBUTES.index(attribute)])
    out = []
    for i in range(n):
        spec = _prompt_spec(attribute, split, rng, i)
        assert spec_is_heldout(spec) == (split == "heldout"), spec
        out.append(BenchPrompt(attribute, make_caption(spec, rng), spec))
    return out


# --------------------------------------------------------------------------------------------
# measuring and judging

def measure(audio, sample_rate: int, duration: float) -> dict:
    """Everything the analysers read from one generated item; independent of the prompt, so the same
    measurement is judged against its own prompt and, for chance, against every other prompt.
    audio: [C, N] or [N] before any crop. Raises ValueError for empty or non-finite audio."""
    full = A.to_mono(audio)
    x = full[: max(1, int(round(duration * sample_rate)))]
    peaks = A.spectral_peaks(x, sample_rate, rel_db=math.inf)  # [(Hz, dB)] of all prominent peaks
    top = max((h for _, h in peaks), default=None)
    level = A.active_level_db(x, sample_rate)
    tempo, rate = A.estimate_tempo_and_rate(x, sample_rate)
    beta = A.spectral_slope(x, sample_rate)
    return {
        "f0": max(peaks, key=lambda p: p[1])[0] if peaks else None,
        "peaks": [f for f, h in peaks if h >= top - A.CHORD_PEAK_DB],
        "segments": A.segment_pitches(x, sample_rate, 8),
        "bpm": tempo, "rate": rate, "beta": beta, "color": A.color_from_slope(beta),
        "octaves": A.sweep_octaves(x, sample_rate),
        "level_db": level if math.isfinite(level) else None, "class": A.loudness_class(x, sample_rate),
        "extent": A.sound_extent(full, sample_rate), "length": full.size / sample_rate,
        "tail": _measure_tail(x, sample_rate),
    }


def _measure_tail(x, sample_rate: int) -> dict:
    """The last quarter (at least 0.25 s) of the requested duration: is the asked sound still there?"""
    n = min(x.size, max(int(0.25 * x.size), int(round(TAIL_MIN_S * sample_rate))))
    tail = x[x.size - n :]
    peaks = A.spectral_peaks(tail, sample_rate, rel_db=math.inf)
    top = max((h for _, h in peaks), default=None)
    return {"f0": max(peaks, key=lambda p: p[1])[0] if peaks else None,
            "peaks": [f for f, h in peaks if h >= top - A.CHORD_PEAK_DB],
            "color": A.noise_color(tail, sample_rate), "octaves": A.sweep_octaves(tail, sample_rate)}


def _rel_ok(value: float | None, target: float) -> bool:
    return value is not None and abs(value / target - 1.0) <= RATE_TOL


def _chord_ok(peaks: list[float], s: Sound) -> bool:
    if not peaks:
        return False
    m = [hz_to_midi(f) for f in peaks]
    root = hz_to_midi(s.freq)
    _, third, fifth = CHORD_INTERVALS[s.quality]
    other = 7 - third

    def has(iv):
        return any(abs(v - root - iv) <= PITCH_TOL_CENTS / 100 for v in m)

    return abs(m[0] - root) <= PITCH_TOL_CENTS / 100 and has(third) and has(fifth) and not has(other)


def _melody_ok(segments: list[float | None], s: Sound) -> bool:
    if any(f is None for f in segments):
        return False
    m = [hz_to_midi(f) for f in segments]
    root = hz_to_midi(s.freq)
    sign = 1 if s.direction == "rising" else -1
    tol = PITCH_TOL_CENTS / 100
    return (abs(m[0] - root) <= tol and abs(m[-1] - root - 12 * sign) <= tol
            and all(sign * (b - a) >= 0.5 for a, b in zip(m, m[1:])))


def _layer_ok(m: dict, s: Sound) -> bool:
    if s.kind == "tone":
        return A.cents(m["f0"], s.freq) <= PITCH_TOL_CENTS
    if s.kind == "clicks":
        return _rel_ok(m["rate"], s.rate)
    if s.kind == "noise":
        return m["color"] == s.color
    if s.kind == "drums":
        return _rel_ok(m["bpm"], s.bpm)
    raise ValueError(f"SynthBench: no mixture check for a {s.kind} layer")


def _tail_ok(t: dict, s: Sound) -> bool:
    """The asked sound in the last quarter of the requested duration (duration prompts are continuous)."""
    if s.kind == "tone":
        return A.cents(t["f0"], s.freq) <= PITCH_TOL_CENTS
    if s.kind == "chord":
        return _chord_ok(t["peaks"], s)
    if s.kind == "noise":
        return t["color"] == s.color
    if s.kind == "sweep":
        o = t["octaves"]
        return o is not None and (o >= TAIL_SWEEP_OCTAVES if s.direction == "rising" else o <= -TAIL_SWEEP_OCTAVES)
    return True


def judge(attribute: str, m: dict, spec: SynthSpec) -> bool:
    """Whether measurement m (from :func:`measure`) satisfies the prompt spec for this attribute."""
    s = spec.layers[0]
    if attribute == "pitch":
        return A.cents(m["f0"], s.freq) <= PITCH_TOL_CENTS
    if attribute == "chord":
        return _chord_ok(m["peaks"], s)
    if attribute == "melody":
        return _melody_ok(m["segments"], s)
    if attribute == "tempo":
        return _rel_ok(m["bpm"], s.bpm)
    if attribute == "noise":
        return m["color"] == spec.layers[-1].color
    if attribute == "sweep":
        o = m["octaves"]
        return o is not None and (o >= SWEEP_MIN_OCTAVES if s.direction == "rising" else o <= -SWEEP_MIN_OCTAVES)
    if attribute == "clicks":
        return _rel_ok(m["rate"], s.rate)
    if attribute == "loudness":
        return m["class"] == spec.loudness
    if attribute == "duration":
        d = spec.duration
        lasts = m["length"] >= d - DURATION_TOL[0] and abs(m["extent"] - d) <= max(DURATION_TOL[0], DURATION_TOL[1] * d)
        return lasts and _tail_ok(m["tail"], s)
    if attribute == "mixture":
        return all(_layer_ok(m, layer) for layer in spec.layers)
    raise ValueError(f"SynthBench: unknown attribute {attribute!r}")


# --------------------------------------------------------------------------------------------
# the benchmark

def _split_batch(audio, b: int) -> list:
    if isinstance(audio, (list, tuple)):
        items = list(audio)
    else:
        if getattr(audio, "ndim", None) not in (2, 3):
            raise ValueError(f"SynthBench: the generator must return audio [B, C, N] or a list of [C, N], "
                             f"got shape {tuple(getattr(audio, 'shape', ()))}")
        items = [audio[i] for i in range(audio.shape[0])]
    if len(items) != b:
        raise ValueError(f"SynthBench: the generator returned {len(items)} items for {b} prompts")
    return items


class SynthBench:
    """Run SynthBench against a generator.

    Args:
        n: prompts per attribute and split.
        splits: "train" (training-range values) and/or "heldout" (held-out values).
        attributes: a subset of :data:`ATTRIBUTES`.
        seed: prompt seed; the generator gets ``seed + batch index`` for each batch.
        batch_size: prompts per generator call.
    """

    def __init__(self, n: int = 20, *, splits: Sequence[str] = ("train", "heldout"),
                 attributes: Sequence[str] = ATTRIBUTES, seed: int = 0, batch_size: int = 8):
        if not isinstance(n, int) or n < 2:
            raise ValueError(f"SynthBench: n must be an int >= 2 (chance needs two prompts), got {n!r}")
        bad = [a for a in attributes if a not in ATTRIBUTES]
        if bad or not attributes:
            raise ValueError(f"SynthBench: attributes must be a non-empty subset of {ATTRIBUTES}, got {list(attributes)}")
        bad = [s for s in splits if s not in _SPLIT_CODE]
        if bad or not splits:
            raise ValueError(f"SynthBench: splits must be a non-empty subset of ('train', 'heldout'), got {list(splits)}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"SynthBench: batch_size must be a positive int, got {batch_size!r}")
        self.n, self.splits, self.attributes = n, tuple(splits), tuple(attributes)
        self.seed, self.batch_size = int(seed), batch_size

    def prompts(self, split: str) -> list[BenchPrompt]:
        return [p for a in self.attributes for p in make_prompts(a, self.n, split, self.seed)]

    def run(self, fn: Generator, *, progress: bool = False) -> dict:
        """Generate, measure and score; returns the report (see :func:`to_markdown`)."""
        t0 = time.perf_counter()
        report = {"n_per_attribute": self.n, "seed": self.seed, "attributes": list(self.attributes), "splits": {}}
        batch_index = 0
        for split in self.splits:
            prompts = self.prompts(split)
            measured: list[dict | None] = []
            errors: list[str | None] = []
            sample_rate = None
            for start in range(0, len(prompts), self.batch_size):
                batch = prompts[start : start + self.batch_size]
                audio, sr = fn([p.caption for p in batch], [p.duration for p in batch], self.seed + batch_index)
                batch_index += 1
                sample_rate = int(sr)
                for p, item in zip(batch, _split_batch(audio, len(batch))):
                    try:
                        measured.append(measure(item, sample_rate, p.duration))
                        errors.append(None)
                    except ValueError as exc:
                        measured.append(None)
                        errors.append(str(exc))
                if progress:
                    print(f"synthbench {split}: {min(start + self.batch_size, len(prompts))}/{len(prompts)}", flush=True)
            report["splits"][split] = self._score(prompts, measured, errors, sample_rate)
        report["seconds"] = round(time.perf_counter() - t0, 2)
        return report

    def _score(self, prompts, measured, errors, sample_rate) -> dict:
        per_attr, items = {}, []
        everything = range(len(prompts))
        for attr in self.attributes:
            idx = [i for i, p in enumerate(prompts) if p.attribute == attr]
            ok = [self._ok(attr, measured[i], prompts[i].spec) for i in idx]
            # chance: prompt j judged on the audio of every other prompt i (all attributes; the
            # expectation over shuffles of all prompts), and within the attribute only
            chance = [self._ok(attr, measured[i], prompts[j].spec) for j in idx for i in everything if i != j]
            within = [self._ok(attr, measured[i], prompts[j].spec) for j in idx for i in idx if i != j]
            per_attr[attr] = {"n": len(idx), "correct": float(np.mean(ok)), "chance": float(np.mean(chance)),
                              "chance_within": float(np.mean(within))}
            for i, good in zip(idx, ok):
                items.append({"attribute": attr, "caption": prompts[i].caption, "duration": prompts[i].duration,
                              "correct": bool(good), "measured": _jsonable(measured[i]), "error": errors[i]})
        overall = {k: float(np.mean([v[k] for v in per_attr.values()])) for k in ("correct", "chance", "chance_within")}
        return {"sample_rate": sample_rate, "attributes": per_attr, "overall": overall, "items": items}

    @staticmethod
    def _ok(attr: str, m: dict | None, spec: SynthSpec) -> bool:
        return m is not None and judge(attr, m, spec)


def _jsonable(m):
    if m is None:
        return None
    out = {}
    for k, v in m.items():
        if isinstance(v, float):
            out[k] = round(v, 4) if math.isfinite(v) else None
        elif isinstance(v, dict):
            out[k] = _jsonable(v)
        elif isinstance(v, list):
            out[k] = [None if x is None else round(float(x), 3) for x in v]
        else:
            out[k] = v
    return out


def to_markdown(report: dict) -> str:
    """The per-attribute table: correct and chance for each split, then the overall row."""
    splits = list(report["splits"])
    head = "| attribute | " + " | ".join(f"{s} correct | {s} chance" for s in splits) + " |"
    sep = "|---|" + "---:|---:|" * len(splits)
    rows = [head, sep]
    for attr in report["attributes"]:
        cells = []
        for s in splits:
            a = report["splits"][s]["attributes"][attr]
            cells += [f"{100 * a['correct']:.0f}%", f"{100 * a['chance']:.0f}%"]
        rows.append(f"| {attr} | " + " | ".join(cells) + " |")
    cells = []
    for s in splits:
        o = report["splits"][s]["overall"]
        cells += [f"**{100 * o['correct']:.1f}%**", f"{100 * o['chance']:.1f}%"]
    rows.append("| **overall** | " + " | ".join(cells) + " |")
    return "\n".join(rows) + f"\n\n{report['n_per_attribute']} prompts per attribute and split.\n"


def write_report(report: dict, path) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


def oracle_generator(sample_rate: int = 16000, channels: int = 1) -> Generator:
    """The ground truth as a generator: parses each prompt (:func:`parse_caption`) and renders it with
    SonicSynth. Unstated details take the parser's defaults (sine chords, rock drums...)."""
    import torch

    def generate(prompts: list[str], durations: list[float], seed: int):
        items = [render_item(parse_caption(p, float(d)), sample_rate=sample_rate, channels=channels, seed=seed + i)
                 for i, (p, d) in enumerate(zip(prompts, durations))]
        n = max(x.shape[-1] for x in items)
        out = torch.zeros(len(items), channels, n)
        for i, x in enumerate(items):
            out[i, :, : x.shape[-1]] = x
        return out, sample_rate

    return generate
