"""A folder of audio files as a dataset of fixed-length random crops (for codec / vocoder training).

Files are found recursively (sorted, so the index -> file map is the same everywhere), read with
``soundfile`` (only the frames a crop needs), remixed to the target channel count (mean to mono;
mono duplicated to every channel; other counts are an error), resampled to the target rate
(:func:`pysonic.audio.resample`) and zero-padded when shorter than a crop. The crop offset is a
function of ``(seed, epoch, index)`` only, so every process, every worker and a resumed run read
exactly the same samples (the training loader calls :meth:`AudioFolder.set_epoch`).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

EXTENSIONS = (".wav", ".flac", ".ogg", ".aiff", ".aif", ".mp3")


class AudioFolder(torch.utils.data.Dataset):
    """Args:
        root: folder searched recursively for ``extensions``.
        sample_rate: rate of the returned crops (files at other rates are resampled).
        channels: channels of the returned crops.
        segment_seconds: crop length; None returns whole files (batch size 1 then, or a collate
            that pads).
        crops_per_file: items per file per epoch (``len = files * crops_per_file``).
        seed: base of the crop offsets.
        extensions: file name endings to include (case-insensitive).

    Items are ``[channels, round(segment_seconds * sample_rate)]`` float32 tensors.
    """

    def __init__(self, root: str | Path, *, sample_rate: int, channels: int = 1, segment_seconds: float | None = 1.0,
                 crops_per_file: int = 1, seed: int = 0, extensions: tuple[str, ...] = EXTENSIONS) -> None:
        import soundfile as sf

        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"AudioFolder: {root} is not a directory")
        if sample_rate < 1 or channels < 1 or crops_per_file < 1:
            raise ValueError(f"AudioFolder: sample_rate, channels and crops_per_file must be >= 1, got "
                             f"{sample_rate}, {channels}, {crops_per_file}")
        if segment_seconds is not None and not segment_seconds > 0:
            raise ValueError(f"AudioFolder: segment_seconds must be > 0 or None, got {segment_seconds}")
        exts = tuple(e.lower() for e in extensions)
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(exts))
        self.files, self.info = [], []
        for path in files:
            try:
                info = sf.info(str(path))
            except Exception as exc:  # unreadable: say which file
                raise ValueError(f"AudioFolder: cannot read {path}: {exc}") from exc
            if info.frames == 0:
                continue  # empty files carry nothing to learn from
            self.files.append(path)
            self.info.append((int(info.samplerate), int(info.channels), int(info.frames)))
        if not self.files:
            raise ValueError(f"AudioFolder: no non-empty audio files ({', '.join(exts)}) under {root}")
        self.sample_rate, self.channels = int(sample_rate), int(channels)
        self.segment = None if segment_seconds is None else max(1, round(segment_seconds * sample_rate))
        self.crops_per_file, self.seed, self.epoch = crops_per_file, int(seed), 0

    def __len__(self) -> int:
        return len(self.files) * self.crops_per_file

    def set_epoch(self, epoch: int) -> None:
        """Crops differ per epoch (called by :class:`pysonic.train.ResumableLoader`)."""
        self.epoch = int(epoch)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])

    def __getitem__(self, index: int) -> torch.Tensor:
        import soundfile as sf

        if not 0 <= index < len(self):
            raise IndexError(f"AudioFolder: index {index} out of range for {len(self)} items")
        file_index = index // self.crops_per_file
        path = self.files[file_index]
        sr, n_ch, frames = self.info[file_index]
        if self.segment is None:
            start, count = 0, frames
        else:
            # source frames for one crop, plus a margin for the resampler's edges
            need = math.ceil(self.segment * sr / self.sample_rate) + (0 if sr == self.sample_rate else 64)
            count = min(frames, need)
            start = int(self._rng(index).integers(0, frames - count + 1))
        data, _ = sf.read(str(path), start=start, frames=count, dtype="float32", always_2d=True)  # [n, C]
        wav = torch.from_numpy(np.ascontiguousarray(data.T))  # [C, n]
        wav = self._remix(wav, path)
        if sr != self.sample_rate:
            from pysonic.audio import resample

            wav = resample(wav, sr, self.sample_rate)
        if not bool(torch.isfinite(wav).all()):
            raise ValueError(f"AudioFolder: {path} contains NaN or Inf samples")
        if self.segment is not None:
            wav = wav[:, : self.segment]
            if wav.shape[-1] < self.segment:
                wav = torch.nn.functional.pad(wav, (0, self.segment - wav.shape[-1]))
        return wav.contiguous()

    def _remix(self, wav: torch.Tensor, path: Path) -> torch.Tensor:
        if wav.shape[0] == self.channels:
            return wav
        if self.channels == 1:
            return wav.mean(dim=0, keepdim=True)
        if wav.shape[0] == 1:
            return wav.expand(self.channels, -1).clone()
        raise ValueError(f"AudioFolder: cannot remix {path} ({wav.shape[0]} channels) to {self.channels} channels")
