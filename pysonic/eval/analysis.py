"""Measuring SonicSynth attributes from audio alone (numpy; no model, no caption).

Every function takes mono float audio ``x: [N]`` and its sample rate. :func:`to_mono` validates
input: empty audio or NaN/inf raise ``ValueError``; silence is a valid input whose measurements are
None (no pitch, no tempo...) or -inf (level).

What each measures (the constants are module-level and documented where defined):

- :func:`estimate_pitch`: the strongest prominent spectral peak (15 dB above the local median
  spectrum) between 40 Hz and 2.3 kHz of the median power spectrum over frames of >= 0.4 s. For the
  SonicSynth waveforms (sine, square, sawtooth, triangle) the fundamental is the strongest partial.
- :func:`spectral_peaks`: all prominent peaks within 15 dB of the strongest (chords).
- :func:`segment_pitches`: the median over frames of the strongest frequency (40 Hz - 2.3 kHz) in each
  of k equal segments (melodies/scales).
- :func:`estimate_period`: the beat or click period from the autocorrelation of a power spectral
  flux onset envelope: the shortest autocorrelation peak that is at least half of the highest one
  and an integer fraction of its lag (so a bar or a half-bar is not taken for the beat).
- :func:`spectral_slope`: the slope beta of log power vs log frequency (power ~ f^beta) fitted on
  the 30th percentile power of log-spaced bands between 100 Hz and 0.45 * sample_rate (capped at
  7 kHz); the low percentile ignores tonal lines, so a tone over noise still reads the noise.
- :func:`sweep_octaves`: the octaves a sweep covers (signed), from a frame-wise peak track.
- :func:`active_level_db` (shared with the generator) and :func:`sound_extent` (where the sound ends).
"""
from __future__ import annotations

import math

import numpy as np

from pysonic.data.synth.sounds import active_level_db

__all__ = [
    "to_mono", "estimate_pitch", "estimate_tempo_and_rate", "color_from_slope", "spectral_peaks", "segment_pitches", "onset_envelope", "estimate_period",
    "estimate_tempo", "estimate_rate", "spectral_slope", "noise_color", "sweep_octaves", "active_level_db",
    "loudness_class", "sound_extent", "cents", "LOUDNESS_BOUNDS_DB", "SILENCE_DB",
]

PITCH_RANGE_HZ = (40.0, 2300.0)
PROMINENCE_DB = 15.0       # a peak must stand this far above the local median spectrum
PEAK_FLOOR_DB = 60.0       # and within this of the strongest bin in range (ignores numerical dust)
CHORD_PEAK_DB = 15.0       # chord notes: peaks within this of the strongest
NOISE_PERCENTILE = 30.0
NOISE_BOUNDS = (-1.5, -0.5)  # beta <= -1.5: brown; <= -0.5: pink; else white (ideal: -2, -1, 0)
LOUDNESS_BOUNDS_DB = (-32.0, -20.0)  # active level: quiet < -32 <= moderate < -20 <= loud
SILENCE_DB = -60.0         # active level below this: silent
STEADY_RATIO = 0.3         # onset envelope: bins whose median power is > 0.3 x their peak are steady
EXTENT_GATE_DB = 30.0      # sound_extent: frames within 30 dB of the loudest one sound


def to_mono(audio, name: str = "audio") -> np.ndarray:
    """[N] or [C, N] (numpy or torch) -> float64 [N]; empty or non-finite audio is a ValueError."""
    if hasattr(audio, "detach"):
        audio = audio.detach().float().cpu().numpy()
    x = np.asarray(audio, dtype=np.float64)
    if x.ndim == 2:
        x = x.mean(axis=0)
    if x.ndim != 1:
        raise ValueError(f"synthbench: {name} must be [N] or [C, N], got shape {tuple(np.shape(audio))}")
    if x.size == 0:
        raise ValueError(f"synthbench: {name} is empty")
    if not np.isfinite(x).all():
        raise ValueError(f"synthbench: {name} contains NaN or inf")
    return x


def cents(f: float | None, ref: float) -> float:
    """|1200 log2(f / ref)|; inf when f is None or not positive."""
    if f is None or not f > 0:
        return math.inf
    return abs(1200.0 * math.log2(f / ref))


def _pow2(seconds: float, sample_rate: int) -> int:
    return 1 << max(6, int(round(math.log2(seconds * sample_rate))))


def _frames_power(x: np.ndarray, frame: int, hop: int, nfft: int) -> np.ndarray:
    """Power spectra of Hann-windowed frames: [T, nfft // 2 + 1] (a short input is one zero-padded frame)."""
    if x.size < frame:
        x = np.pad(x, (0, frame - x.size))
    idx = np.arange(0, x.size - frame + 1, hop)
    frames = np.lib.stride_tricks.sliding_window_view(x, frame)[idx] * np.hanning(frame)
    return np.abs(np.fft.rfft(frames, n=nfft, axis=1)) ** 2


def _interp_peak(db: np.ndarray, i: int) -> tuple[float, float]:
    """Parabolic interpolation of a peak at bin i: (fractional bin, height)."""
    if 0 < i < db.size - 1:
        a, b, c = db[i - 1], db[i], db[i + 1]
        den = a - 2 * b + c
        if den < 0:
            d = min(0.5, max(-0.5, 0.5 * (a - c) / den))  # an edge of a range need not be a maximum
            return i + d, b - 0.25 * (a - c) * d
    return float(i), float(db[i])


def _prominent_peaks(power: np.ndarray, sample_rate: int, nfft: int, fmin: float, fmax: float) -> list[tuple[float, float]]:
    """(Hz, dB) of local maxima in [fmin, fmax] standing PROMINENCE_DB above the local median."""
    db = 10 * np.log10(power + 1e-30)
    hz_per_bin = sample_rate / nfft
    lo, hi = max(1, int(fmin / hz_per_bin)), min(db.size - 2, int(fmax / hz_per_bin) + 1)
    if hi <= lo:
        return []
    w = max(3, int(50.0 / hz_per_bin)) | 1  # +-25 Hz median window
    padded = np.pad(db, w // 2, mode="edge")
    floor = np.median(np.lib.stride_tricks.sliding_window_view(padded, w)[lo:hi], axis=1)
    seg = db[lo:hi]
    top = seg.max()
    is_max = (seg > db[lo - 1 : hi - 1]) & (seg >= db[lo + 1 : hi + 1])
    keep = is_max & (seg >= floor + PROMINENCE_DB) & (seg >= top - PEAK_FLOOR_DB)
    out = []
    for j in np.flatnonzero(keep):
        b, h = _interp_peak(db, lo + j)
        out.append((b * hz_per_bin, h))
    return out


def _median_power(x: np.ndarray, sample_rate: int, seconds: float = 0.4) -> tuple[np.ndarray, int]:
    # frames of >= 0.4 s (8192 samples at 16 kHz): main lobes of +-4 Hz or narrower, so the notes of a
    # low chord (A2 minor: 110, 131, 165 Hz) stay apart from each other and from the +-25 Hz median floor
    frame = 1 << max(6, int(math.ceil(math.log2(seconds * sample_rate))))
    nfft = 4 * frame
    p = _frames_power(x, frame, frame // 4, nfft)
    return np.median(p, axis=0), nfft


def spectral_peaks(x: np.ndarray, sample_rate: int, rel_db: float = CHORD_PEAK_DB) -> list[tuple[float, float]]:
    """(Hz, dB) of the prominent peaks within rel_db of the strongest one, ascending in frequency."""
    power, nfft = _median_power(x, sample_rate)
    peaks = _prominent_peaks(power, sample_rate, nfft, *PITCH_RANGE_HZ)
    if not peaks:
        return []
    top = max(h for _, h in peaks)
    return sorted((f, h) for f, h in peaks if h >= top - rel_db)


def estimate_pitch(x: np.ndarray, sample_rate: int) -> float | None:
    """The dominant pitch in Hz (None when nothing tonal is there)."""
    power, nfft = _median_power(x, sample_rate)
    peaks = _prominent_peaks(power, sample_rate, nfft, *PITCH_RANGE_HZ)
    return max(peaks, key=lambda p: p[1])[0] if peaks else None


def _frame_pitches(x: np.ndarray, sample_rate: int, seconds: float = 0.128, gate_db: float = 30.0):
    """(frame centre times [T], strongest frequency in PITCH_RANGE_HZ per frame [T], NaN for frames
    more than gate_db below the loudest)."""
    frame = _pow2(seconds, sample_rate)
    hop, nfft = frame // 4, 4 * frame
    p = _frames_power(x, frame, hop, nfft)
    times = (np.arange(p.shape[0]) * hop + frame / 2) / sample_rate
    energy = p.sum(axis=1)
    f = np.full(p.shape[0], np.nan)
    if energy.max() <= 0:
        return times, f
    hz_per_bin = sample_rate / nfft
    lo, hi = max(1, int(PITCH_RANGE_HZ[0] / hz_per_bin)), min(p.shape[1] - 2, int(PITCH_RANGE_HZ[1] / hz_per_bin))
    db = 10 * np.log10(p + 1e-30)
    for t in np.flatnonzero(energy >= energy.max() * 10 ** (-gate_db / 10)):
        b, _ = _interp_peak(db[t], lo + int(np.argmax(db[t, lo:hi])))
        f[t] = b * hz_per_bin
    return times, f


def segment_pitches(x: np.ndarray, sample_rate: int, k: int = 8) -> list[float | None]:
    """Median frame pitch (Hz) in each of k equal segments of x (frames wholly inside a segment)."""
    frame = _pow2(0.128, sample_rate)
    times, f = _frame_pitches(x, sample_rate)
    dur = x.size / sample_rate
    half = frame / 2 / sample_rate
    out: list[float | None] = []
    for j in range(k):
        a, b = j * dur / k, (j + 1) * dur / k
        sel = f[(times - half >= a - 1e-9) & (times + half <= b + 1e-9)]
        sel = sel[np.isfinite(sel)]
        out.append(float(np.exp(np.median(np.log(sel)))) if sel.size else None)
    return out


def onset_envelope(x: np.ndarray, sample_rate: int) -> tuple[np.ndarray, float]:
    """Power spectral flux (sum over non-steady bins of the positive power increase), 32 ms frames,
    5 ms hop: (env [T], frames/s)."""
    frame = _pow2(0.032, sample_rate)
    hop = max(1, int(round(0.005 * sample_rate)))
    p = _frames_power(x, frame, hop, frame)
    # Steady bins (a held tone: median power within 5 dB of the peak) are left out: a drum hit
    # under a louder tone changes their power by interference, with a random sign.
    steady = np.median(p, axis=0) > STEADY_RATIO * p.max(axis=0)
    flux = np.maximum(np.diff(p[:, ~steady], axis=0), 0.0).sum(axis=1)
    return np.concatenate([[0.0], flux]), sample_rate / hop


def estimate_period(env: np.ndarray, rate: float, min_s: float, max_s: float) -> float | None:
    """The repetition period (s) of an onset envelope within [min_s, max_s] (None if none is clear)."""
    e = env - env.mean()
    n = e.size
    lo, hi = int(math.floor(min_s * rate)), min(int(math.ceil(max_s * rate)), env.size // 2)  # >= 2 periods
    if n < 3 or hi >= n - 1 or not np.any(e):
        hi = min(hi, n - 2)
        if hi <= lo:
            return None
    spec = np.fft.rfft(e, n=2 * n)
    acf = np.fft.irfft(np.abs(spec) ** 2)[:n] / (n - np.arange(n))  # unbiased
    if acf[0] <= 0:
        return None
    seg = acf[lo : hi + 1]
    peaks = [lo + j for j in range(1, seg.size - 1) if seg[j] > seg[j - 1] and seg[j] >= seg[j + 1] and seg[j] > 0]
    if not peaks:
        return None
    best = max(peaks, key=lambda i: acf[i])
    chosen = best
    for i in sorted(peaks):
        ratio = best / i
        if acf[i] >= 0.5 * acf[best] and abs(ratio - round(ratio)) <= 0.06 * ratio:
            chosen = i
            break
    b, _ = _interp_peak(acf, chosen)
    return b / rate


def estimate_tempo_and_rate(x: np.ndarray, sample_rate: int) -> tuple[float | None, float | None]:
    """(:func:`estimate_tempo`, :func:`estimate_rate`) from one onset envelope."""
    env, rate = onset_envelope(x, sample_rate)
    beat = estimate_period(env, rate, 60.0 / 200.0, 60.0 / 50.0)
    event = estimate_period(env, rate, 1.0 / 12.0, 1.0 / 0.8)
    return (None if beat is None else 60.0 / beat), (None if event is None else 1.0 / event)


def estimate_tempo(x: np.ndarray, sample_rate: int) -> float | None:
    """Beats per minute in [50, 200] (None for silence or no periodicity)."""
    env, rate = onset_envelope(x, sample_rate)
    period = estimate_period(env, rate, 60.0 / 200.0, 60.0 / 50.0)
    return None if period is None else 60.0 / period


def estimate_rate(x: np.ndarray, sample_rate: int) -> float | None:
    """Events per second in [0.8, 12]."""
    env, rate = onset_envelope(x, sample_rate)
    period = estimate_period(env, rate, 1.0 / 12.0, 1.0 / 0.8)
    return None if period is None else 1.0 / period


def spectral_slope(x: np.ndarray, sample_rate: int) -> float | None:
    """beta in power ~ f^beta (white 0, pink -1, brown -2); None for silence."""
    frame = _pow2(0.256, sample_rate)
    p = _frames_power(x, frame, frame // 2, frame).mean(axis=0)
    f = np.fft.rfftfreq(frame, 1.0 / sample_rate)
    edges = np.geomspace(100.0, min(0.45 * sample_rate, 7000.0), 13)
    lf, lp = [], []
    for a, b in zip(edges[:-1], edges[1:]):
        band = p[(f >= a) & (f < b)]
        if band.size:
            v = np.percentile(band, NOISE_PERCENTILE)
            if v > 0:
                lf.append(math.log10(math.sqrt(a * b)))
                lp.append(math.log10(v))
    if len(lf) < 3:
        return None
    return float(np.polyfit(lf, lp, 1)[0])


def noise_color(x: np.ndarray, sample_rate: int) -> str | None:
    """"white", "pink" or "brown" from :func:`spectral_slope` (None for silence)."""
    return color_from_slope(spectral_slope(x, sample_rate))


def color_from_slope(beta: float | None) -> str | None:
    if beta is None:
        return None
    return "brown" if beta <= NOISE_BOUNDS[0] else "pink" if beta <= NOISE_BOUNDS[1] else "white"


def sweep_octaves(x: np.ndarray, sample_rate: int) -> float | None:
    """Signed octaves covered by the frame-wise peak frequency (least-squares line over the sounding
    frames); None when fewer than 3 frames have a pitch."""
    frame = _pow2(0.064, sample_rate)
    hop, nfft = frame // 2, 2 * frame
    p = _frames_power(x, frame, hop, nfft)
    energy = p.sum(axis=1)
    if energy.max() <= 0:
        return None
    t, lf = [], []
    hz_per_bin = sample_rate / nfft
    lo = int(40.0 / hz_per_bin)
    for i in np.flatnonzero(energy >= energy.max() * 0.01):
        j = lo + int(np.argmax(p[i, lo:]))
        t.append(i * hop / sample_rate)
        lf.append(math.log2(max(j, 1) * hz_per_bin))
    if len(t) < 3:
        return None
    slope = np.polyfit(t, lf, 1)[0]
    return float(slope * (t[-1] - t[0]))


def loudness_class(x: np.ndarray, sample_rate: int) -> str:
    """"quiet", "moderate", "loud" from the active level, or "silent" below SILENCE_DB."""
    level = active_level_db(x, sample_rate)
    if level < SILENCE_DB:
        return "silent"
    return "quiet" if level < LOUDNESS_BOUNDS_DB[0] else "moderate" if level < LOUDNESS_BOUNDS_DB[1] else "loud"


def sound_extent(x: np.ndarray, sample_rate: int) -> float:
    """Seconds until the end of the last 50 ms frame within 30 dB of the loudest frame (0 for silence)."""
    hop = max(1, int(round(0.05 * sample_rate)))
    n = -(-x.size // hop)
    padded = np.pad(x, (0, n * hop - x.size))
    p = (padded.reshape(n, hop) ** 2).mean(axis=1)
    if p.max() <= 0:
        return 0.0
    last = np.flatnonzero(p >= p.max() * 10 ** (-EXTENT_GATE_DB / 10))[-1]
    return min((last + 1) * hop, x.size) / sample_rate
