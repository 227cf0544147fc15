"""TangoFlux manifests and clip loading (pysonic.data.manifest)."""
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from pysonic.data.manifest import (
    AudioCaptionDataset,
    ManifestError,
    PairDataset,
    fit_channels,
    fit_length,
    load_clip,
    read_manifest,
    read_pair_manifest,
    write_manifest,
    write_pair_manifest,
)


def _tone(sr, seconds, freq, channels=1):
    t = np.arange(int(sr * seconds)) / sr
    x = 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    return np.stack([x * (1 - 0.5 * c) for c in range(channels)], axis=1)


def test_release_and_issue_spellings(tmp_path):
    (tmp_path / "a.wav").write_bytes(b"")
    # the released sample's fields (captions / location), paths relative to the working dir
    rel = [{"captions": "water pouring", "location": "a.wav", "duration": 10.0}]
    (tmp_path / "train.json").write_text(json.dumps(rel))
    ours = [{"caption": "a beep", "audio": str(tmp_path / "a.wav"), "duration": 3}]
    (tmp_path / "ours.jsonl").write_text("\n".join(json.dumps(r) for r in ours))  # JSON lines
    a = read_manifest(tmp_path / "train.json")
    b = read_manifest(tmp_path / "ours.jsonl")
    assert a == [{"audio": str(tmp_path / "a.wav"), "caption": "water pouring", "duration": 10.0}]
    assert b == [{"audio": str(tmp_path / "a.wav"), "caption": "a beep", "duration": 3.0}]
    # write -> read round trip, and the pair manifest
    write_manifest(tmp_path / "w.json", a)
    assert read_manifest(tmp_path / "w.json") == a
    pairs = [{"chosen": "a.wav", "reject": "a.wav", "caption": "x", "duration": 10}]
    write_pair_manifest(tmp_path / "p.json", pairs)
    assert json.loads((tmp_path / "p.json").read_text())[0].keys() == {"chosen", "reject", "caption", "duration"}
    assert read_pair_manifest(tmp_path / "p.json")[0]["chosen"] == str(tmp_path / "a.wav")


@pytest.mark.parametrize("bad, match", [
    ('"text"', "not an object"),
    ("[1]", "entry 0"),
    ('[{"caption": "x", "duration": 1}]', "audio"),
    ('[{"audio": "a.wav", "duration": 1}]', "caption"),
    ('[{"audio": "a.wav", "caption": "x"}]', "duration"),
    ('[{"audio": "a.wav", "caption": "x", "duration": -1}]', "duration"),
    ('[{"audio": "a.wav", "caption": 3, "duration": 1}]', "caption"),
    ("[{", "JSON"),
])
def test_bad_manifests_name_the_problem(tmp_path, bad, match):
    p = tmp_path / "m.json"
    p.write_text(bad)
    with pytest.raises(ManifestError, match=match):
        read_manifest(p)
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_manifest(tmp_path / "missing.json")


def test_channels_and_length():
    st = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert torch.equal(fit_channels(st, 2), st)
    assert torch.equal(fit_channels(st[:1], 2), torch.tensor([[1.0, 2.0], [1.0, 2.0]]))  # fake stereo
    assert torch.equal(fit_channels(st, 1), torch.tensor([[2.0, 3.0]]))
    assert torch.equal(fit_length(st, 3), torch.tensor([[1.0, 2.0, 0.0], [3.0, 4.0, 0.0]]))
    assert torch.equal(fit_length(st, 1), st[:, :1])


def test_load_clip_as_the_release(tmp_path):
    """First max_duration seconds, resampled, mono repeated, zero-padded at the end."""
    sf.write(tmp_path / "mono.wav", _tone(8000, 0.3, 200), 8000, subtype="FLOAT")
    sf.write(tmp_path / "stereo.wav", _tone(16000, 2.0, 300, channels=2), 16000, subtype="FLOAT")
    clip = load_clip(tmp_path / "mono.wav", sample_rate=16000, channels=2, max_duration=0.5)
    assert clip.shape == (2, 8000) and clip.dtype == torch.float32
    assert torch.equal(clip[0], clip[1])
    assert clip[:, 4900:].abs().max() == 0  # padding after 0.3 s
    assert clip[:, 100:4700].abs().max() > 0.45
    long = load_clip(tmp_path / "stereo.wav", sample_rate=16000, channels=2, max_duration=1.0)
    ref = torch.from_numpy(_tone(16000, 1.0, 300, channels=2).T.copy())
    torch.testing.assert_close(long, ref)  # same rate: cropped, channels kept
    with pytest.raises(FileNotFoundError, match="no such audio file"):
        load_clip(tmp_path / "nope.wav", sample_rate=16000, channels=2, max_duration=1)
    (tmp_path / "junk.wav").write_bytes(b"not audio")
    with pytest.raises(ValueError, match="cannot decode"):
        load_clip(tmp_path / "junk.wav", sample_rate=16000, channels=2, max_duration=1)


def test_datasets(tmp_path):
    sf.write(tmp_path / "a.wav", _tone(800, 0.2, 50), 800, subtype="FLOAT")
    sf.write(tmp_path / "b.wav", _tone(800, 0.4, 70, channels=2), 800, subtype="FLOAT")
    write_manifest(tmp_path / "m.json", [{"audio": "a.wav", "caption": "one", "duration": 5.0},
                                        {"audio": "b.wav", "caption": "two", "duration": 0.4}])
    ds = AudioCaptionDataset(tmp_path / "m.json", sample_rate=800, channels=2, max_duration=0.25)
    items = [ds[0], ds[1]]
    assert len(ds) == 2 and [it["index"] for it in items] == [0, 1]
    assert items[0]["audio"].shape == items[1]["audio"].shape == (2, 200)
    assert items[0]["duration"] == 0.25 and items[1]["duration"] == 0.25  # clamped to max_duration
    write_pair_manifest(tmp_path / "p.json", [{"chosen": "a.wav", "reject": "b.wav", "caption": "c", "duration": 0.1}])
    pd = PairDataset(tmp_path / "p.json", sample_rate=800, channels=2, max_duration=0.25)
    item = pd[0]
    assert item["chosen"].shape == item["reject"].shape == (2, 200) and item["duration"] == pytest.approx(0.1)
