"""Spectrogram pictures of generated prompts (for the README and for looking at failures).

:func:`save_spectrograms` draws one panel per clip with matplotlib when it is installed (titles,
time and frequency axes); without matplotlib it writes the same panels, stacked and unlabelled, with
a small built-in PNG encoder, plus a ``.txt`` beside the PNG listing the panels' titles from top to
bottom. matplotlib is optional: pysonic never requires it.
"""
from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import numpy as np

from pysonic.eval.analysis import to_mono

__all__ = ["spectrogram_db", "save_spectrograms", "save_prompt_spectrograms", "write_png"]

_DYNAMIC_DB = 80.0
_PANEL = (160, 640)  # fallback image: rows, columns per panel
# A dark-blue -> purple -> orange -> yellow ramp (anchors in RGB, evenly spaced)
_ANCHORS = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
                     [250, 193, 39], [252, 255, 164]], dtype=np.float64)


def spectrogram_db(audio, sample_rate: int, *, n_fft: int = 1024, hop: int = 256) -> np.ndarray:
    """Power spectrogram in dB relative to its maximum, clipped at -80 dB: [n_fft // 2 + 1, T]."""
    x = to_mono(audio)
    if x.size < n_fft:
        x = np.pad(x, (0, n_fft - x.size))
    frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop] * np.hanning(n_fft)
    p = np.abs(np.fft.rfft(frames, axis=1)).T ** 2
    top = p.max()
    if top <= 0:
        return np.full(p.shape, -_DYNAMIC_DB)
    return np.maximum(10 * np.log10(p / top + 1e-30), -_DYNAMIC_DB)


def _colorize(db: np.ndarray) -> np.ndarray:
    t = np.clip((db + _DYNAMIC_DB) / _DYNAMIC_DB, 0, 1) * (len(_ANCHORS) - 1)
    i = np.minimum(t.astype(int), len(_ANCHORS) - 2)
    f = (t - i)[..., None]
    return (_ANCHORS[i] * (1 - f) + _ANCHORS[i + 1] * f).round().astype(np.uint8)


def write_png(path, rgb: np.ndarray) -> None:
    """Write an RGB uint8 image [H, W, 3] as PNG (no dependency)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[r].tobytes() for r in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    Path(path).write_bytes(png)


def save_spectrograms(path, clips: list[tuple[str, object, int]], *, max_hz: float | None = 8000.0) -> Path:
    """Draw clips ``[(title, audio [C, N] or [N], sample_rate)]`` one under another into a PNG."""
    if not clips:
        raise ValueError("save_spectrograms: no clips")
    path = Path(path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
    specs = []
    for title, audio, sr in clips:
        db = spectrogram_db(audio, sr)
        top_bin = db.shape[0] if max_hz is None else min(db.shape[0], int(math.ceil(max_hz / (sr / 2) * (db.shape[0] - 1))) + 1)
        specs.append((title, db[:top_bin], sr, to_mono(audio).size / sr, (top_bin - 1) * sr / 2 / (db.shape[0] - 1)))
    if plt is not None:
        fig, axes = plt.subplots(len(specs), 1, figsize=(8, 2.0 * len(specs)), squeeze=False)
        for ax, (title, db, sr, dur, fmax) in zip(axes[:, 0], specs):
            ax.imshow(db, origin="lower", aspect="auto", extent=(0, dur, 0, fmax), vmin=-_DYNAMIC_DB, vmax=0, cmap="magma")
            ax.set_title(title, fontsize=9)
            ax.set_ylabel("Hz")
        axes[-1, 0].set_xlabel("seconds")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
    longest = max(dur for *_, dur, _ in specs)
    rows = []
    for _, db, _, dur, _ in specs:  # each panel 160 x (640 * its share of the longest clip), nearest-neighbour
        w = max(1, int(round(_PANEL[1] * dur / longest)))
        fi = np.linspace(db.shape[0] - 1, 0, _PANEL[0]).round().astype(int)  # low frequencies at the bottom
        ti = np.linspace(0, db.shape[1] - 1, w).round().astype(int)
        img = _colorize(db[np.ix_(fi, ti)])
        rows.append(np.pad(img, ((0, 4), (0, _PANEL[1] - w), (0, 0)), constant_values=255))
    write_png(path, np.concatenate(rows, axis=0))
    path.with_suffix(".txt").write_text("".join(f"{i + 1}. {title}\n" for i, (title, *_rest) in enumerate(specs)))
    return path


def save_prompt_spectrograms(path, fn, prompts: list[str], durations: list[float], seed: int = 0) -> Path:
    """Generate ``prompts`` with a SynthBench generator ``fn`` and draw them (titles: the prompts)."""
    audio, sr = fn(list(prompts), list(durations), seed)
    clips = []
    for i, (p, d) in enumerate(zip(prompts, durations)):
        clips.append((p, audio[i][..., : int(round(d * sr))], int(sr)))
    return save_spectrograms(path, clips)
