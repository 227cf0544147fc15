"""TangoFlux's JSON manifests and its audio clip loading.

Two manifests, each a JSON list of objects (JSON lines are read too):

- training manifest: ``{"audio": path, "caption": str, "duration": seconds}``. The released
  TangoFlux files name the fields ``"location"`` and ``"captions"`` (train.py's
  ``--audio_column`` / ``--text_column`` defaults); both spellings are read.
- pair manifest (CRPO / DPO): ``{"chosen": path, "reject": path, "caption": str, "duration": s}``
  (``"captions"`` read too), as tangoflux/label_crpo.py writes it.

Relative audio paths are looked up beside the manifest, then in the working directory (the
released sample ``data/train.json`` lists ``data/test.wav`` relative to the repository root).

Clips are loaded as tangoflux/utils.py ``read_wav_file`` does: the first ``max_duration`` seconds,
resampled to the VAE rate, each channel zero-padded (or cropped) to ``max_duration`` seconds; mono
is repeated to fill the channels ("fake stereo"). Differences, on purpose: a file with more than
the wanted channels is averaged to mono and repeated (the release takes its first channel), and a
one-channel target averages stereo to mono.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch.utils.data import Dataset

from pysonic.audio import resample

__all__ = [
    "ManifestError",
    "read_manifest",
    "read_pair_manifest",
    "write_manifest",
    "write_pair_manifest",
    "load_clip",
    "fit_channels",
    "fit_length",
    "AudioCaptionDataset",
    "PairDataset",
]

_AUDIO_KEYS = ("audio", "location")
_CAPTION_KEYS = ("caption", "captions")


class ManifestError(ValueError):
    """A manifest that cannot be read: names the file and the entry."""


# ---------------------------------------------------------------------------- manifests


def _load_json_records(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"manifest: no such file {str(path)!r}")
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    try:
        if stripped.startswith("["):
            records = json.loads(text)
        else:  # JSON lines (datasets' load_dataset("json") reads both)
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise ManifestError(f"manifest {str(path)!r}: not valid JSON ({exc})") from None
    if not isinstance(records, list):
        raise ManifestError(f"manifest {str(path)!r}: expected a JSON list of objects")
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise ManifestError(f"manifest {str(path)!r}: entry {i} is {type(r).__name__}, not an object")
    return records


def _field(path: Path, i: int, record: Mapping, keys: tuple[str, ...]) -> Any:
    for k in keys:
        if k in record:
            return record[k]
    raise ManifestError(f"manifest {str(path)!r}: entry {i} has none of the fields {list(keys)}")


def _duration(path: Path, i: int, record: Mapping) -> float:
    if "duration" not in record:
        raise ManifestError(f"manifest {str(path)!r}: entry {i} has no 'duration'")
    d = record["duration"]
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or d <= 0:
        raise ManifestError(f"manifest {str(path)!r}: entry {i} has duration {d!r}; expected a positive number of seconds")
    return float(d)


def _resolve(path: Path, i: int, audio: Any) -> str:
    if not isinstance(audio, str) or not audio:
        raise ManifestError(f"manifest {str(path)!r}: entry {i} has audio path {audio!r}; expected a string")
    p = Path(audio)
    if p.is_absolute():
        return str(p)
    beside = path.parent / p
    if beside.exists() or not p.exists():
        return str(beside)  # a file missing in both places is reported (beside the manifest) when loaded
    return str(p)


def _caption(path: Path, i: int, record: Mapping) -> str:
    c = _field(path, i, record, _CAPTION_KEYS)
    if not isinstance(c, str):
        raise ManifestError(f"manifest {str(path)!r}: entry {i} has caption {c!r}; expected a string")
    return c


def read_manifest(path: str | Path) -> list[dict]:
    """Training manifest -> ``[{"audio": str, "caption": str, "duration": float}, ...]``."""
    path = Path(path)
    out = []
    for i, r in enumerate(_load_json_records(path)):
        out.append({
            "audio": _resolve(path, i, _field(path, i, r, _AUDIO_KEYS)),
            "caption": _caption(path, i, r),
            "duration": _duration(path, i, r),
        })
    return out


def read_pair_manifest(path: str | Path) -> list[dict]:
    """Pair manifest -> ``[{"chosen": str, "reject": str, "caption": str, "duration": float}, ...]``."""
    path = Path(path)
    out = []
    for i, r in enumerate(_load_json_records(path)):
        out.append({
            "chosen": _resolve(path, i, _field(path, i, r, ("chosen",))),
            "reject": _resolve(path, i, _field(path, i, r, ("reject",))),
            "caption": _caption(path, i, r),
            "duration": _duration(path, i, r),
        })
    return out


def _write_json(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(records, indent=1), encoding="utf-8")
    tmp.replace(path)


def write_manifest(path: str | Path, records: Iterable[Mapping]) -> Path:
    """Write a training manifest (fields ``audio``, ``caption``, ``duration``); returns the path."""
    path = Path(path)
    rows = [{"audio": str(r["audio"]), "caption": str(r["caption"]), "duration": float(r["duration"])} for r in records]
    _write_json(path, rows)
    return path


def write_pair_manifest(path: str | Path, pairs: Iterable[Mapping]) -> Path:
    """Write a pair manifest (fields ``chosen``, ``reject``, ``caption``, ``duration``)."""
    path = Path(path)
    rows = [
        {"chosen": str(p["chosen"]), "reject": str(p["reject"]), "caption": str(p["caption"]),
         "duration": float(p["duration"])}
        for p in pairs
    ]
    _write_json(path, rows)
    return path


# ---------------------------------------------------------------------------- audio


def fit_channels(wav: torch.Tensor, channels: int) -> torch.Tensor:
    """[C, N] -> [channels, N]: kept when C == channels; mono repeated; otherwise averaged to mono
    and repeated."""
    if wav.shape[0] == channels:
        return wav
    mono = wav if wav.shape[0] == 1 else wav.mean(0, keepdim=True)
    return mono.expand(channels, -1).contiguous()


def fit_length(wav: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad at the end, or crop, the last axis to ``length`` (tangoflux/utils.py ``pad_wav``)."""
    n = wav.shape[-1]
    if n == length:
        return wav
    if n > length:
        return wav[..., :length]
    return torch.nn.functional.pad(wav, (0, length - n))


def load_clip(path: str | Path, *, sample_rate: int, channels: int, max_duration: float) -> torch.Tensor:
    """Read an audio file as TangoFlux trains on it -> float32 ``[channels, int(sample_rate * max_duration)]``.

    Only the first ``max_duration`` seconds are decoded, then resampled, then padded or cropped.
    """
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_clip: no such audio file {str(path)!r}")
    try:
        info = sf.info(str(path))
        frames = int(info.samplerate * max_duration)
        data, sr = sf.read(str(path), frames=frames, dtype="float32", always_2d=True)
    except RuntimeError as exc:  # soundfile's LibsndfileError derives from RuntimeError
        raise ValueError(f"load_clip: cannot decode {str(path)!r}: {exc}") from None
    wav = torch.from_numpy(data.T.copy())  # [C, N]
    if wav.shape[1] == 0:
        raise ValueError(f"load_clip: {str(path)!r} holds no samples")
    wav = resample(wav, sr, sample_rate)
    return fit_length(fit_channels(wav, channels), int(sample_rate * max_duration))


# ---------------------------------------------------------------------------- datasets


class AudioCaptionDataset(Dataset):
    """Map-style dataset over a training manifest.

    Item ``i``: ``{"audio": [channels, int(sample_rate * max_duration)], "caption": str,
    "duration": min(duration, max_duration), "index": i}``.
    """

    def __init__(self, manifest: str | Path | list[dict], *, sample_rate: int, channels: int,
                 max_duration: float) -> None:
        self.records = read_manifest(manifest) if isinstance(manifest, (str, Path)) else list(manifest)
        self.sample_rate, self.channels, self.max_duration = int(sample_rate), int(channels), float(max_duration)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        audio = load_clip(r["audio"], sample_rate=self.sample_rate, channels=self.channels, max_duration=self.max_duration)
        return {"audio": audio, "caption": r["caption"], "duration": min(r["duration"], self.max_duration), "index": i}


class PairDataset(Dataset):
    """Map-style dataset over a pair manifest: item ``i`` holds ``"chosen"`` and ``"reject"``
    audio loaded as in :class:`AudioCaptionDataset`, ``"caption"``, ``"duration"``, ``"index"``."""

    def __init__(self, manifest: str | Path | list[dict], *, sample_rate: int, channels: int,
                 max_duration: float) -> None:
        self.records = read_pair_manifest(manifest) if isinstance(manifest, (str, Path)) else list(manifest)
        self.sample_rate, self.channels, self.max_duration = int(sample_rate), int(channels), float(max_duration)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        kw = dict(sample_rate=self.sample_rate, channels=self.channels, max_duration=self.max_duration)
        return {"chosen": load_clip(r["chosen"], **kw), "reject": load_clip(r["reject"], **kw),
                "caption": r["caption"], "duration": min(r["duration"], self.max_duration), "index": i}
