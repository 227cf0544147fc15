"""AudioFolder: deterministic random crops, resampling/remixing, padding, errors."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from pysonic.data.audio_folder import AudioFolder


@pytest.fixture()
def folder(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "sub").mkdir()
    sf.write(tmp_path / "a.wav", rng.standard_normal(16000).astype(np.float32) * 0.1, 16000)
    sf.write(tmp_path / "sub" / "b.flac", rng.standard_normal((8000, 2)).astype(np.float32) * 0.1, 8000)
    sf.write(tmp_path / "short.wav", np.full(100, 0.25, dtype=np.float32), 8000)
    (tmp_path / "notes.txt").write_text("not audio")
    return tmp_path


def test_items_and_determinism(folder):
    ds = AudioFolder(folder, sample_rate=8000, channels=1, segment_seconds=0.05, crops_per_file=3, seed=7)
    assert len(ds) == 9 and [p.name for p in ds.files] == ["a.wav", "short.wav", "b.flac"]  # sorted paths
    items = [ds[i] for i in range(len(ds))]
    assert all(x.shape == (1, 400) and x.dtype == torch.float32 for x in items)
    again = AudioFolder(folder, sample_rate=8000, channels=1, segment_seconds=0.05, crops_per_file=3, seed=7)
    for i in (0, 5, 8):  # a function of (seed, epoch, index) only, in any order
        assert torch.equal(again[i], items[i])
    assert not torch.equal(items[6], items[7])  # different crops of the same file
    ds.set_epoch(1)
    assert not torch.equal(ds[6], items[6])  # a new epoch draws new crops
    other = AudioFolder(folder, sample_rate=8000, channels=1, segment_seconds=0.05, crops_per_file=3, seed=8)
    assert not torch.equal(other[6], items[6])


def test_short_files_are_padded_and_crops_are_the_file(folder):
    ds = AudioFolder(folder, sample_rate=8000, channels=1, segment_seconds=0.05, crops_per_file=1)
    short = ds[1]
    assert torch.allclose(short[0, :100], torch.full((100,), 0.25)) and short[0, 100:].abs().max() == 0
    # an 8 kHz stereo crop is the mono mix of a window of the file
    data, _ = sf.read(folder / "sub" / "b.flac", dtype="float32")
    mono = torch.from_numpy(data.mean(axis=1))
    crop = ds[2][0]
    starts = [s for s in range(len(mono) - 399) if torch.allclose(mono[s : s + 400], crop, atol=1e-6)]
    assert len(starts) == 1


def test_resample_and_remix(folder):
    ds = AudioFolder(folder, sample_rate=8000, channels=2, segment_seconds=None)
    a = ds[0]  # 16 kHz mono -> 8 kHz, duplicated to 2 channels
    assert a.shape == (2, 8000) and torch.equal(a[0], a[1])
    assert ds[2].shape == (2, 8000)
    with pytest.raises(IndexError):
        ds[3]


def test_errors(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        AudioFolder(tmp_path / "missing", sample_rate=8000)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no non-empty audio files"):
        AudioFolder(tmp_path / "empty", sample_rate=8000)
    with pytest.raises(ValueError, match="segment_seconds"):
        AudioFolder(folder, sample_rate=8000, segment_seconds=0)
    (folder / "broken.wav").write_bytes(b"RIFF not really")
    with pytest.raises(ValueError, match="broken.wav"):
        AudioFolder(folder, sample_rate=8000)
    (folder / "broken.wav").unlink()
    four = tmp_path / "four"
    four.mkdir()
    sf.write(four / "q.wav", np.zeros((800, 4), dtype=np.float32), 8000)
    with pytest.raises(ValueError, match="cannot remix"):
        AudioFolder(four, sample_rate=8000, channels=2)[0]
    bad = tmp_path / "nan"
    bad.mkdir()
    sf.write(bad / "n.wav", np.full(800, np.nan, dtype=np.float32), 8000, subtype="FLOAT")
    with pytest.raises(ValueError, match="NaN"):
        AudioFolder(bad, sample_rate=8000, segment_seconds=0.01)[0]
