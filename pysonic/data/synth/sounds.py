"""Rendering a :class:`~pysonic.data.synth.spec.SynthSpec` to a waveform (numpy float64, mono).

Exact parameters (the analysers in ``pysonic.eval.synthbench`` rely on them):

- tones: band-limited additive synthesis (harmonics up to 0.45 * sample_rate) through an 8192-point
  single-period wavetable; sine, square (odd harmonics 1/k), sawtooth (1/k), triangle (odd, 1/k^2);
  10 ms raised-cosine fades at both ends;
- chords: root, third (+4 major / +3 minor semitones) and fifth (+7), equal amplitudes, sine or triangle;
- scales: the 8 notes of a major scale (0 2 4 5 7 9 11 12 semitones) from the start note, up or down,
  each an eighth of the duration with 10 ms fades;
- drums: a kick (pitch drop 155 -> 45 Hz), snare (noise + 185 Hz body) and hi-hat (twice-differenced
  noise) drawn once per item and placed on an eighth-note grid: "rock" = kick on beats 1 and 3,
  snare on 2 and 4, hi-hat on every eighth; "dance" = kick on every beat, snare on 2 and 4, hi-hat
  on the off-beats; first beat at 20 ms;
- noise: Gaussian noise shaped in the frequency domain to power ~ f^0 (white), f^-1 (pink),
  f^-2 (brown), flat below 20 Hz, no DC;
- sweeps: exponential sine chirp from freq to freq_end;
- clicks: a 3 ms decaying noise burst; beeps: a sine burst of min(80 ms, 40% of the period) with 5 ms
  fades; one every 1/rate seconds from 20 ms on;
- levels: the background of a mixture is 12 dB below the foreground (active levels, see
  :func:`active_level_db`); the sum is scaled so its active level is the spec's level_db, then
  scaled down to 0.99 peak if it would clip.
"""
from __future__ import annotations

import math

import numpy as np

from pysonic.data.synth.spec import CHORD_INTERVALS, MAJOR_SCALE, MIXTURE_BACKGROUND_DB, Sound, SynthSpec, hz_to_midi, midi_to_hz

__all__ = ["render_spec", "render_sound", "active_level_db", "MIN_SAMPLE_RATE"]

MIN_SAMPLE_RATE = 10_000  # sweeps reach 4 kHz
_TABLE = 8192
_FADE_S = 0.010
_LEVEL_FRAME_S = 0.050
_LEVEL_GATE_DB = 20.0


def active_level_db(x: np.ndarray, sample_rate: int) -> float:
    """Level of the sounding part in dBFS: the power mean of the 50 ms frames whose power is within
    20 dB of the loudest frame (-inf for all-zero input). x: [N] or [C, N] (channels averaged)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 2:
        x = x.mean(axis=0)
    if x.size == 0:
        raise ValueError("active_level_db: empty audio")
    hop = max(1, int(round(_LEVEL_FRAME_S * sample_rate)))
    n = max(1, x.size // hop)
    frames = x[: n * hop].reshape(n, -1) if x.size >= hop else x.reshape(1, -1)
    p = (frames ** 2).mean(axis=1)
    if not np.isfinite(p).all():
        raise ValueError("active_level_db: audio contains NaN or inf")
    pmax = p.max()
    if pmax <= 0:
        return -math.inf
    gated = p[p >= pmax * 10 ** (-_LEVEL_GATE_DB / 10)]
    return float(10 * np.log10(gated.mean()))


def _fade(x: np.ndarray, sample_rate: int, seconds: float = _FADE_S) -> np.ndarray:
    n = min(int(seconds * sample_rate), x.size // 2)
    if n > 0:
        ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(n) + 0.5) / n)
        x[:n] *= ramp
        x[-n:] *= ramp[::-1]
    return x


def _wavetable(waveform: str, f0: float, sample_rate: int) -> np.ndarray:
    kmax = max(1, min(_TABLE // 2 - 1, int(0.45 * sample_rate / f0)))
    k = np.arange(1, kmax + 1)
    if waveform == "sine":
        a = (k == 1).astype(np.float64)
    elif waveform == "square":
        a = np.where(k % 2 == 1, 1.0 / k, 0.0)
    elif waveform == "sawtooth":
        a = 1.0 / k
    elif waveform == "triangle":
        a = np.where(k % 2 == 1, (-1.0) ** ((k - 1) // 2) / k ** 2, 0.0)
    else:
        raise ValueError(f"render: unknown waveform {waveform!r}")
    spec = np.zeros(_TABLE // 2 + 1, dtype=np.complex128)
    spec[1 : kmax + 1] = -1j * a * (_TABLE / 2)  # sin(2 pi k phase) per harmonic
    table = np.fft.irfft(spec, n=_TABLE)
    return np.append(table, table[0])  # wrap point for interpolation


def _oscillator(waveform: str, f0: float, n: int, sample_rate: int) -> np.ndarray:
    table = _wavetable(waveform, f0, sample_rate)
    phase = np.mod(f0 * np.arange(n, dtype=np.float64) / sample_rate, 1.0) * _TABLE
    i = phase.astype(np.int64)
    frac = phase - i
    return table[i] * (1 - frac) + table[i + 1] * frac


def _drum_hits(rng: np.random.Generator, sample_rate: int) -> dict[str, np.ndarray]:
    def t(seconds: float) -> np.ndarray:
        return np.arange(int(seconds * sample_rate)) / sample_rate

    tk = t(0.35)
    kick = np.sin(2 * np.pi * (45 * tk + 110 * 0.04 * (1 - np.exp(-tk / 0.04)))) * np.exp(-tk / 0.12)
    ts = t(0.20)
    snare = 0.7 * rng.standard_normal(ts.size) * np.exp(-ts / 0.05) + 0.5 * np.sin(2 * np.pi * 185 * ts) * np.exp(-ts / 0.07)
    th = t(0.06)
    hat = np.diff(rng.standard_normal(th.size + 2), n=2) / 2 * np.exp(-th / 0.012)
    return {"kick": _fade(kick, sample_rate, 0.002), "snare": snare, "hat": hat}


def _place(out: np.ndarray, hit: np.ndarray, start: int, gain: float) -> None:
    if start >= out.size:
        return
    m = min(hit.size, out.size - start)
    out[start : start + m] += gain * hit[:m]


def render_sound(s: Sound, n: int, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """One layer, n samples, arbitrary scale (render_spec sets the level)."""
    sr = sample_rate
    if s.kind == "silence" or n == 0:
        return np.zeros(n)
    if s.kind == "tone":
        return _fade(_oscillator(s.waveform, s.freq, n, sr), sr)
    if s.kind == "chord":
        root = hz_to_midi(s.freq)
        x = sum(_oscillator(s.waveform, midi_to_hz(root + i), n, sr) for i in CHORD_INTERVALS[s.quality])
        return _fade(x, sr)
    if s.kind == "scale":
        root = hz_to_midi(s.freq)
        sign = 1 if s.direction == "rising" else -1
        x = np.zeros(n)
        bounds = [round(i * n / len(MAJOR_SCALE)) for i in range(len(MAJOR_SCALE) + 1)]
        for j, step in enumerate(MAJOR_SCALE):
            a, b = bounds[j], bounds[j + 1]
            x[a:b] = _fade(_oscillator(s.waveform, midi_to_hz(root + sign * step), b - a, sr), sr)
        return x
    if s.kind == "drums":
        hits = _drum_hits(rng, sr)
        x = np.zeros(n)
        eighth = 30.0 / s.bpm
        k = 0
        while True:
            start = int(round((0.02 + k * eighth) * sr))
            if start >= n:
                break
            beat, on_beat = divmod(k, 2)
            if on_beat == 0:
                if s.pattern == "dance" or beat % 2 == 0:
                    _place(x, hits["kick"], start, 1.0)
                if beat % 2 == 1:
                    _place(x, hits["snare"], start, 0.8)
                if s.pattern == "rock":
                    _place(x, hits["hat"], start, 0.25)
            else:
                _place(x, hits["hat"], start, 0.25)
            k += 1
        return x
    if s.kind == "noise":
        alpha = {"white": 0.0, "pink": 1.0, "brown": 2.0}[s.color]
        white = rng.standard_normal(n)
        spec = np.fft.rfft(white)
        f = np.fft.rfftfreq(n, 1.0 / sr)
        spec *= np.maximum(f, 20.0) ** (-alpha / 2)
        spec[0] = 0
        return _fade(np.fft.irfft(spec, n=n), sr)
    if s.kind == "sweep":
        T = n / sr
        t = np.arange(n) / sr
        r = s.freq_end / s.freq
        phase = s.freq * T / math.log(r) * (np.power(r, t / T) - 1.0)
        return _fade(np.sin(2 * np.pi * phase), sr)
    if s.kind == "clicks":
        if s.click == "beep":
            length = min(0.08, 0.4 / s.rate)
            m = int(length * sr)
            hit = _fade(np.sin(2 * np.pi * s.freq * np.arange(m) / sr), sr, 0.005)
        else:
            tc = np.arange(int(0.003 * sr)) / sr
            hit = rng.standard_normal(tc.size) * np.exp(-tc / 0.0007)
        x = np.zeros(n)
        k = 0
        while (start := int(round((0.02 + k / s.rate) * sr))) < n:
            _place(x, hit, start, 1.0)
            k += 1
        return x
    raise ValueError(f"render: unknown kind {s.kind!r}")


def render_spec(spec: SynthSpec, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """The item's waveform [N] (N = round(duration * sample_rate)), float64 in [-1, 1]."""
    if sample_rate < MIN_SAMPLE_RATE:
        raise ValueError(f"SonicSynth: sample_rate must be >= {MIN_SAMPLE_RATE} (sweeps reach 4 kHz), got {sample_rate}")
    n = int(round(spec.duration * sample_rate))
    out = np.zeros(n)
    for i, layer in enumerate(spec.layers):
        x = render_sound(layer, n, sample_rate, rng)
        if layer.kind == "silence" or not np.any(x):
            continue
        rel = MIXTURE_BACKGROUND_DB if i > 0 else 0.0
        out += x * 10 ** ((rel - active_level_db(x, sample_rate)) / 20)
    if not np.any(out):
        return out
    out *= 10 ** ((spec.level_db - active_level_db(out, sample_rate)) / 20)
    peak = np.abs(out).max()
    if peak > 0.99:
        out *= 0.99 / peak
    return out
