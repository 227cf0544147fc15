"""What a SonicSynth item is: the attribute dataclasses, note names, held-out values, sampling.

An item is a :class:`SynthSpec`: one or two :class:`Sound` layers (two for a mixture "X over Y":
the first is the foreground, the second the background, 12 dB quieter), a loudness class and a
duration. Everything audible is fixed by the spec plus the item's random generator (noise and drum
samples), so rendering is exact and analysers can check it.

Held-out values (never in ``split="train"``, always in ``split="heldout"``):

- pitches within 2% of 300, 700 and 1200 Hz (:data:`HELDOUT_PITCHES`, :data:`HELDOUT_PITCH_TOL`),
  whether written in Hz or as a note name (of A2..A6 only F5 = 698.5 Hz falls there). In train no
  named pitch (tone, chord root, scale start, sweep end point, beep pitch) and no rendered note of a
  chord or scale lies in these bands;
- tempos from 95 to 105 BPM (:data:`HELDOUT_BPM`).

A held-out item contains at least one held-out value; every attribute still gets held-out items
(noise colour, for example, through "a 700 Hz sine tone over pink noise").
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = [
    "Sound", "SynthSpec", "KINDS", "WAVEFORMS", "NOISE_COLORS", "LOUDNESS_DB", "HELDOUT_PITCHES",
    "HELDOUT_PITCH_TOL", "HELDOUT_BPM", "note_to_midi", "midi_to_note", "midi_to_hz", "hz_to_midi",
    "is_heldout_pitch", "is_heldout_bpm", "spec_is_heldout", "sample_spec", "sample_sound",
    "MAJOR_SCALE", "CHORD_INTERVALS",
]

KINDS = ("tone", "chord", "scale", "drums", "noise", "sweep", "clicks", "silence", "mixture")
WAVEFORMS = ("sine", "square", "sawtooth", "triangle")
NOISE_COLORS = ("white", "pink", "brown")
# Target level of each loudness class in dBFS, measured as pysonic.eval's "active level" (power
# mean of the 50 ms frames within 20 dB of the loudest one). Classes are 12 dB apart; items are
# drawn within +-2 dB of the target, so the class boundaries (-32, -20 dBFS) have 4 dB of margin.
LOUDNESS_DB = {"quiet": -38.0, "moderate": -26.0, "loud": -14.0}
LOUDNESS_JITTER_DB = 2.0
MIXTURE_BACKGROUND_DB = -12.0  # background layer level relative to the foreground
MIN_TONE_OVER_DRUMS_HZ = 200.0  # mixtures "tone over drums": the tone stays above the kick drum

HELDOUT_PITCHES = (300.0, 700.0, 1200.0)
HELDOUT_PITCH_TOL = 0.02  # relative: |f / p - 1| <= 2%
HELDOUT_BPM = (95.0, 105.0)  # inclusive

PITCH_RANGE_HZ = (55.0, 1760.0)   # tones: A2..A6
MIDI_RANGE = (45, 93)             # A2..A6
BPM_RANGE = (60, 180)
RATE_RANGE = (1, 10)              # clicks/beeps per second (integers)
SWEEP_RANGE_HZ = (100.0, 4000.0)  # sweep end points (at least 2 octaves apart)
BEEP_DEFAULT_HZ = 1000.0          # beep pitch when the caption does not name one

MAJOR_SCALE = (0, 2, 4, 5, 7, 9, 11, 12)
CHORD_INTERVALS = {"major": (0, 4, 7), "minor": (0, 3, 7)}

_NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
_NOTE_RE = re.compile(r"^([A-Ga-g])(#?)(-?\d)$")


def note_to_midi(name: str) -> int:
    """``"A4"`` -> 69; sharps as ``"C#4"``."""
    m = _NOTE_RE.match(name.strip())
    if m is None:
        raise ValueError(f"note_to_midi: not a note name like 'A4' or 'C#3': {name!r}")
    pc = _NOTE_NAMES.index(m.group(1).upper() + m.group(2))
    return pc + 12 * (int(m.group(3)) + 1)


def midi_to_note(midi: int) -> str:
    return f"{_NOTE_NAMES[midi % 12]}{midi // 12 - 1}"


def midi_to_hz(midi: float) -> float:
    return 440.0 * 2.0 ** ((midi - 69) / 12.0)


def hz_to_midi(hz: float) -> float:
    return 69.0 + 12.0 * math.log2(hz / 440.0)


def is_heldout_pitch(hz: float) -> bool:
    return any(abs(hz / p - 1.0) <= HELDOUT_PITCH_TOL + 1e-12 for p in HELDOUT_PITCHES)  # 294 Hz is in


def is_heldout_bpm(bpm: float) -> bool:
    return HELDOUT_BPM[0] <= bpm <= HELDOUT_BPM[1]


@dataclass(frozen=True)
class Sound:
    """One layer. Only the fields of its kind are set (None otherwise).

    kind: one of tone, chord, scale, drums, noise, sweep, clicks, silence.
    freq: tone pitch, chord root, scale start note, sweep start, or beep pitch (Hz).
    note: the note name when the caption names the pitch as a note (tone, chord, scale).
    waveform: tone waveform; chords and scales use sine or triangle (not named in captions).
    quality: chord "major" / "minor".  direction: scale or sweep "rising" / "falling".
    freq_end: sweep end (Hz).  bpm: drums tempo.  pattern: drums "rock" (kick 1+3, snare 2+4,
    hi-hat eighths) or "dance" (kick every beat, snare 2+4, off-beat hi-hat); not in captions.
    color: noise colour.  rate: clicks/beeps per second.  click: "click" or "beep".
    freq_named: whether the caption states freq (beeps, sweeps).
    """

    kind: str
    freq: float | None = None
    note: str | None = None
    waveform: str | None = None
    quality: str | None = None
    direction: str | None = None
    freq_end: float | None = None
    bpm: float | None = None
    pattern: str | None = None
    color: str | None = None
    rate: int | None = None
    click: str | None = None
    freq_named: bool = False

    def pitches(self) -> list[float]:
        """Every fundamental this layer names or renders as a held note (Hz)."""
        if self.kind == "tone":
            return [self.freq]
        if self.kind == "chord":
            root = hz_to_midi(self.freq)
            return [midi_to_hz(root + i) for i in CHORD_INTERVALS[self.quality]]
        if self.kind == "scale":
            root = hz_to_midi(self.freq)
            sign = 1 if self.direction == "rising" else -1
            return [midi_to_hz(root + sign * i) for i in MAJOR_SCALE]
        if self.kind == "sweep":
            return [self.freq, self.freq_end]
        if self.kind == "clicks" and self.click == "beep":
            return [self.freq]
        return []


@dataclass(frozen=True)
class SynthSpec:
    """A whole item: layers (1, or 2 for a mixture: foreground then background), loudness, duration.

    loudness_stated: whether the caption names the loudness (otherwise it is "moderate").
    level_db: the exact active level of the whole item in dBFS (drawn around LOUDNESS_DB).
    """

    layers: tuple[Sound, ...]
    duration: float
    loudness: str = "moderate"
    loudness_stated: bool = False
    level_db: float = LOUDNESS_DB["moderate"]
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def kind(self) -> str:
        return "mixture" if len(self.layers) > 1 else self.layers[0].kind

    def to_dict(self) -> dict:
        d = {"kind": self.kind, "duration": self.duration, "loudness": self.loudness,
             "loudness_stated": self.loudness_stated,
             "level_db": self.level_db if math.isfinite(self.level_db) else None,  # None: silence
             "layers": [{k: v for k, v in asdict(s).items() if v is not None} for s in self.layers]}
        return d

    @staticmethod
    def from_dict(d: dict) -> "SynthSpec":
        layers = tuple(Sound(**layer) for layer in d["layers"])
        return SynthSpec(layers=layers, duration=float(d["duration"]), loudness=d.get("loudness", "moderate"),
                         loudness_stated=bool(d.get("loudness_stated", False)),
                         level_db=-math.inf if d.get("level_db", 0.0) is None
                         else float(d.get("level_db", LOUDNESS_DB[d.get("loudness", "moderate")])))


def spec_is_heldout(spec: SynthSpec) -> bool:
    """True if any held-out value (pitch band or tempo) appears in the spec."""
    for s in spec.layers:
        if any(is_heldout_pitch(p) for p in s.pitches()):
            return True
        if s.kind == "drums" and is_heldout_bpm(s.bpm):
            return True
    return False


# --------------------------------------------------------------------------------------------
# sampling

def _heldout_hz(rng: np.random.Generator) -> float:
    """An integer frequency inside one of the held-out bands."""
    p = HELDOUT_PITCHES[rng.integers(len(HELDOUT_PITCHES))]
    lo, hi = math.ceil(p * (1 - HELDOUT_PITCH_TOL)), math.floor(p * (1 + HELDOUT_PITCH_TOL))
    return float(rng.integers(lo, hi + 1))


def _train_hz(rng: np.random.Generator, lo: float, hi: float) -> float:
    """A log-uniform integer frequency in [lo, hi] outside the held-out bands."""
    while True:
        f = float(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))
        if lo <= f <= hi and not is_heldout_pitch(f):
            return f


def _heldout_midis(lo: int, hi: int) -> list[int]:
    return [m for m in range(lo, hi + 1) if is_heldout_pitch(midi_to_hz(m))]


def sample_sound(rng: np.random.Generator, kind: str, split: str, *, heldout_ok: bool = True) -> Sound:
    """One layer of ``kind``. For split="heldout" (and heldout_ok) the layer carries a held-out value
    where the kind has one (tone, chord, scale, drums, sweep, beeps); noise and silence have none."""
    held = split == "heldout" and heldout_ok
    if kind == "tone":
        wf = WAVEFORMS[rng.integers(len(WAVEFORMS))]
        if rng.random() < 0.35:  # named as a note
            if held:
                m = int(rng.choice(_heldout_midis(*MIDI_RANGE)))
            else:
                m = int(rng.choice([m for m in range(MIDI_RANGE[0], MIDI_RANGE[1] + 1)
                                    if not is_heldout_pitch(midi_to_hz(m))]))
            return Sound("tone", freq=midi_to_hz(m), note=midi_to_note(m), waveform=wf)
        f = _heldout_hz(rng) if held else _train_hz(rng, *PITCH_RANGE_HZ)
        return Sound("tone", freq=f, waveform=wf, freq_named=True)
    if kind in ("chord", "scale"):
        timbre = ("sine", "triangle")[rng.integers(2)]
        if kind == "chord":
            quality = ("major", "minor")[rng.integers(2)]
            lo, hi = MIDI_RANGE[0], MIDI_RANGE[1] - 12  # the fifth stays <= E6
            direction = None
        else:
            quality = None
            direction = ("rising", "falling")[rng.integers(2)]
            lo, hi = (MIDI_RANGE[0], MIDI_RANGE[1] - 12) if direction == "rising" else (MIDI_RANGE[0] + 12, MIDI_RANGE[1])
        while True:
            m = int(rng.choice(_heldout_midis(lo, hi))) if held else int(rng.integers(lo, hi + 1))
            s = Sound(kind, freq=midi_to_hz(m), note=midi_to_note(m), waveform=timbre, quality=quality,
                      direction=direction, freq_named=True)
            if held or not any(is_heldout_pitch(p) for p in s.pitches()):
                return s
    if kind == "drums":
        if held:
            bpm = int(rng.integers(int(HELDOUT_BPM[0]), int(HELDOUT_BPM[1]) + 1))
        else:
            while True:
                bpm = int(rng.integers(BPM_RANGE[0], BPM_RANGE[1] + 1))
                if not is_heldout_bpm(bpm):
                    break
        return Sound("drums", bpm=float(bpm), pattern=("rock", "dance")[rng.integers(2)])
    if kind == "noise":
        return Sound("noise", color=NOISE_COLORS[rng.integers(len(NOISE_COLORS))])
    if kind == "sweep":
        direction = ("rising", "falling")[rng.integers(2)]
        named = held or rng.random() < 0.5
        while True:
            if held:
                a = _heldout_hz(rng)
                b = _train_hz(rng, *SWEEP_RANGE_HZ)
                if rng.random() < 0.5:
                    a, b = b, a
            else:
                a, b = _train_hz(rng, *SWEEP_RANGE_HZ), _train_hz(rng, *SWEEP_RANGE_HZ)
            if max(a, b) / min(a, b) >= 4.0:
                break
        lo, hi = min(a, b), max(a, b)
        f0, f1 = (lo, hi) if direction == "rising" else (hi, lo)
        return Sound("sweep", freq=f0, freq_end=f1, direction=direction, waveform="sine", freq_named=named)
    if kind == "clicks":
        rate = int(rng.integers(RATE_RANGE[0], RATE_RANGE[1] + 1))
        if held or rng.random() < 0.5:
            named = held or rng.random() < 0.5
            f = (_heldout_hz(rng) if held else _train_hz(rng, 200.0, 1760.0)) if named else BEEP_DEFAULT_HZ
            return Sound("clicks", rate=rate, click="beep", freq=f, freq_named=named, waveform="sine")
        return Sound("clicks", rate=rate, click="click")
    if kind == "silence":
        return Sound("silence")
    raise ValueError(f"sample_sound: unknown kind {kind!r}; expected one of {KINDS[:-1]}")


# Relative frequency of each kind in the dataset.
# Mixtures: a tone over noise or drums, or beeps over noise.
KIND_WEIGHTS = {"tone": 0.24, "chord": 0.09, "scale": 0.09, "drums": 0.12, "noise": 0.09, "sweep": 0.09,
                "clicks": 0.1, "silence": 0.03, "mixture": 0.15}
# Kinds that carry a held-out value, for split="heldout".
_HELDOUT_KINDS = ("tone", "chord", "scale", "drums", "sweep", "clicks", "mixture")


def _min_duration(s: Sound) -> float:
    """Periodic sounds last at least 4 periods (a tempo or rate needs them to be measurable)."""
    if s.kind == "drums":
        return 4 * 60.0 / s.bpm
    if s.kind == "clicks":
        return 4.0 / s.rate
    if s.kind == "scale":
        return 2.0  # 8 notes of >= 0.25 s
    return 0.0


def sample_spec(rng: np.random.Generator, *, split: str = "train", kind: str | None = None,
                duration: float | tuple[float, float] = (1.0, 5.0), loudness: str | None = None) -> SynthSpec:
    """Draw one item. ``kind=None`` draws it by KIND_WEIGHTS; a ``(lo, hi)`` duration is drawn
    uniformly (0.1 s steps) and raised to the kind's minimum (capped at hi); a float is fixed."""
    if split not in ("train", "heldout"):
        raise ValueError(f"sample_spec: split must be 'train' or 'heldout', got {split!r}")
    if kind is None:
        kinds = _HELDOUT_KINDS if split == "heldout" else tuple(KIND_WEIGHTS)
        w = np.array([KIND_WEIGHTS[k] for k in kinds])
        kind = kinds[rng.choice(len(kinds), p=w / w.sum())]
    if kind == "mixture":
        fg_kind = ("tone", "clicks")[int(rng.random() < 0.25)]
        # beeps only over noise: over drums their rate and the tempo could not be told apart
        bg_kind = "noise" if fg_kind == "clicks" else ("noise", "drums")[int(rng.random() < 0.35)]
        # held-out mixtures: the held-out value sits in the foreground (noise has none)
        fg = sample_sound(rng, fg_kind, split)
        if fg.kind == "clicks":  # beeps over a background (clicks are lost in noise and drums)
            while fg.click != "beep":
                fg = sample_sound(rng, fg_kind, split)
        # a tone over drums stays above the kick (155 -> 45 Hz), where a louder tone would mask it
        while bg_kind == "drums" and fg.freq < MIN_TONE_OVER_DRUMS_HZ:
            fg = sample_sound(rng, fg_kind, split)
        bg = sample_sound(rng, bg_kind, split, heldout_ok=False)
        layers = (fg, bg)
    else:
        layers = (sample_sound(rng, kind, split),)
    if isinstance(duration, (tuple, list)):
        lo, hi = float(duration[0]), float(duration[1])
        d = round(float(rng.uniform(lo, hi)), 1)
        d = min(max(d, math.ceil(10 * max(_min_duration(s) for s in layers) - 1e-9) / 10, lo), hi)
    else:
        d = float(duration)
    if layers[0].kind == "silence":
        return SynthSpec(layers=layers, duration=d, loudness="moderate", loudness_stated=False, level_db=-math.inf)
    stated = loudness is not None or (layers[0].click != "click" and rng.random() < 0.4)
    if loudness is None:
        loudness = ("quiet", "moderate", "loud")[rng.integers(3)] if stated else "moderate"
    if loudness not in LOUDNESS_DB:
        raise ValueError(f"sample_spec: loudness must be one of {tuple(LOUDNESS_DB)}, got {loudness!r}")
    level = LOUDNESS_DB[loudness] + float(rng.uniform(-LOUDNESS_JITTER_DB, LOUDNESS_JITTER_DB))
    return SynthSpec(layers=layers, duration=d, loudness=loudness, loudness_stated=stated, level_db=round(level, 2))


def with_heldout_check(spec: SynthSpec, split: str) -> SynthSpec:
    """Assert the split invariant (used by the dataset): train specs contain no held-out value."""
    if split == "train" and spec_is_heldout(spec):
        raise AssertionError(f"train spec contains a held-out value: {spec}")
    return spec

