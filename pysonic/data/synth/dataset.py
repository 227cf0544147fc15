"""The SonicSynth map-style dataset and the on-disk writer (WAVs + a TangoFlux-style manifest)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from pysonic.data.synth.captions import make_caption
from pysonic.data.synth.sounds import MIN_SAMPLE_RATE, render_spec
from pysonic.data.synth.spec import KINDS, SynthSpec, sample_spec, spec_is_heldout

__all__ = ["SonicSynth", "write_synth", "item_rng", "render_item", "synth_collate"]

_SPLIT_CODE = {"train": 0, "heldout": 1}
_DEFAULT_LENGTH = 1_000_000


def item_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of item ``index``: a function of (seed, split, index) only."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, _SPLIT_CODE[split], int(index)])


def render_item(spec: SynthSpec, *, sample_rate: int, channels: int = 1, seed: int = 0) -> torch.Tensor:
    """Render a spec to a float32 tensor [channels, N] (channels are identical copies)."""
    x = render_spec(spec, sample_rate, np.random.default_rng(seed))
    return _to_tensor(x, channels)


def _to_tensor(x: np.ndarray, channels: int) -> torch.Tensor:
    wav = torch.from_numpy(x.astype(np.float32)).unsqueeze(0)
    return wav if channels == 1 else wav.expand(channels, -1).clone()


class SonicSynth(torch.utils.data.Dataset):
    """Procedural text-audio pairs with exact ground truth.

    Item ``i`` is a pure function of ``(seed, split, i)`` (no global RNG), so the dataset works with
    any sampler, across workers, and resumes exactly.

    Args:
        split: "train" (no held-out value ever appears) or "heldout" (every item has one; see
            :mod:`pysonic.data.synth.spec`).
        sample_rate: output rate in Hz (>= 10000; 16000 is the default model's rate).
        duration: ``(lo, hi)`` seconds drawn per item (0.1 s steps; drums, clicks and scales are
            lengthened to 4 periods / 2 s within hi), or a fixed float.
        seed: dataset seed.
        length: ``len(dataset)`` (the data are procedural; any index >= 0 works).
        channels: 1 (mono) or more identical channels.
        kinds: restrict to these kinds (default: all, drawn by spec.KIND_WEIGHTS).

    Item: ``{"audio": Tensor [channels, N] float32, "caption": str, "duration": float,
    "attributes": dict}`` with N = round(duration * sample_rate); attributes is
    :meth:`SynthSpec.to_dict` (kind, layers, loudness, level_db, ...) plus "split" and "index".
    """

    def __init__(self, split: str = "train", *, sample_rate: int = 16000,
                 duration: float | tuple[float, float] = (1.0, 5.0), seed: int = 0, length: int = _DEFAULT_LENGTH,
                 channels: int = 1, kinds: tuple[str, ...] | None = None):
        if split not in _SPLIT_CODE:
            raise ValueError(f"SonicSynth: split must be 'train' or 'heldout', got {split!r}")
        if not isinstance(sample_rate, int) or sample_rate < MIN_SAMPLE_RATE:
            raise ValueError(f"SonicSynth: sample_rate must be an int >= {MIN_SAMPLE_RATE}, got {sample_rate!r}")
        if isinstance(duration, (tuple, list)):
            if len(duration) != 2 or not (0 < float(duration[0]) <= float(duration[1])):
                raise ValueError(f"SonicSynth: duration must be (lo, hi) with 0 < lo <= hi, got {duration!r}")
            duration = (float(duration[0]), float(duration[1]))
        elif not (isinstance(duration, (int, float)) and math.isfinite(duration) and duration > 0):
            raise ValueError(f"SonicSynth: duration must be a positive number or a (lo, hi) pair, got {duration!r}")
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"SonicSynth: channels must be a positive int, got {channels!r}")
        if not isinstance(length, int) or length < 0:
            raise ValueError(f"SonicSynth: length must be a non-negative int, got {length!r}")
        if kinds is not None:
            bad = [k for k in kinds if k not in KINDS]
            if bad or not kinds:
                raise ValueError(f"SonicSynth: kinds must be a non-empty subset of {KINDS}, got {kinds!r}")
            if split == "heldout" and set(kinds) <= {"noise", "silence"}:
                raise ValueError("SonicSynth: noise and silence carry no held-out value; add another kind for split='heldout'")
        self.split, self.sample_rate, self.duration = split, sample_rate, duration
        self.seed, self.length, self.channels, self.kinds = int(seed), length, channels, tuple(kinds) if kinds else None

    def __len__(self) -> int:
        return self.length

    def spec(self, index: int) -> tuple[SynthSpec, str]:
        """The item's spec and caption, without rendering audio."""
        if not 0 <= index < self.length:
            raise IndexError(f"SonicSynth: index {index} out of range [0, {self.length})")
        rng = item_rng(self.seed, self.split, index)
        while True:
            kind = None if self.kinds is None else self.kinds[rng.integers(len(self.kinds))]
            if self.split == "heldout" and kind in ("noise", "silence"):
                continue
            spec = sample_spec(rng, split=self.split, kind=kind, duration=self.duration)
            if (self.split == "heldout") == spec_is_heldout(spec):
                break  # the split invariant (sample_spec keeps it; this guards it)
        return spec, make_caption(spec, rng)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if index < 0:
            index += self.length
        spec, caption = self.spec(index)
        rng = item_rng(self.seed, self.split, index)
        audio = render_spec(spec, self.sample_rate, np.random.default_rng(rng.integers(2**63)))
        wav = _to_tensor(audio, self.channels)
        attrs = spec.to_dict()
        attrs.update(split=self.split, index=index)
        return {"audio": wav, "caption": caption, "duration": spec.duration, "attributes": attrs}


def synth_collate(batch: list[dict]) -> dict:
    """Batch SonicSynth items of different lengths: ``{"audio": [B, C, N_max] (zero-padded),
    "lengths": [B] samples, "caption": list[str], "duration": [B] float32, "attributes": list[dict]}``."""
    if not batch:
        raise ValueError("synth_collate: empty batch")
    n = max(item["audio"].shape[-1] for item in batch)
    c = batch[0]["audio"].shape[0]
    audio = torch.zeros(len(batch), c, n)
    for i, item in enumerate(batch):
        audio[i, :, : item["audio"].shape[-1]] = item["audio"]
    return {"audio": audio, "lengths": torch.tensor([item["audio"].shape[-1] for item in batch]),
            "caption": [item["caption"] for item in batch],
            "duration": torch.tensor([item["duration"] for item in batch], dtype=torch.float32),
            "attributes": [item["attributes"] for item in batch]}


def write_synth(out_dir: str | os.PathLike, n: int, *, split: str = "train", sample_rate: int = 16000,
                duration: float | tuple[float, float] = (1.0, 5.0), seed: int = 0, channels: int = 1,
                start: int = 0, manifest_name: str | None = None, key_style: str = "pysonic") -> Path:
    """Write items ``start .. start+n-1`` as 16-bit WAVs under ``out_dir/audio/`` and a manifest.

    The manifest is a JSON list with one record per item, in the format TangoFlux's train.py reads
    (``datasets.load_dataset("json")``, one column for the audio path, one for the caption, and
    ``duration`` in seconds). ``key_style="pysonic"`` writes ``{"audio", "caption", "duration"}``;
    ``key_style="tangoflux"`` writes the released script's default column names
    ``{"location", "captions", "duration"}``. Audio paths are absolute. Each record also carries the
    item's ``attributes`` (extra columns are ignored by both readers).

    Returns the manifest path (default ``out_dir/<split>.json``).
    """
    import soundfile as sf

    if not isinstance(n, int) or n < 0:
        raise ValueError(f"write_synth: n must be a non-negative int, got {n!r}")
    if key_style not in ("pysonic", "tangoflux"):
        raise ValueError(f"write_synth: key_style must be 'pysonic' or 'tangoflux', got {key_style!r}")
    ds = SonicSynth(split, sample_rate=sample_rate, duration=duration, seed=seed, channels=channels, length=start + n)
    out = Path(out_dir)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    akey, ckey = ("audio", "caption") if key_style == "pysonic" else ("location", "captions")
    records = []
    for i in range(start, start + n):
        item = ds[i]
        path = (out / "audio" / f"{split}_{seed}_{i:07d}.wav").resolve()
        sf.write(str(path), item["audio"].numpy().T, sample_rate, subtype="PCM_16")
        records.append({akey: str(path), ckey: item["caption"], "duration": item["duration"],
                        "attributes": item["attributes"]})
    manifest = out / (manifest_name or f"{split}.json")
    tmp = manifest.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(records, indent=1, allow_nan=False))
    os.replace(tmp, manifest)
    return manifest

