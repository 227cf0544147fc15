"""SonicSynth: determinism, every kind renders, captions parse back, held-out values, levels, files."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import soundfile as sf
import torch

from pysonic.data.synth import (HELDOUT_BPM, KINDS, LOUDNESS_DB, SonicSynth, active_level_db, is_heldout_bpm,
                                is_heldout_pitch, parse_caption, sample_spec, spec_is_heldout, synth_collate, tokenize,
                                vocabulary, write_synth)
from pysonic.data.synth.spec import note_to_midi, midi_to_hz, midi_to_note

SR = 16000


def test_item_format_and_determinism():
    a = SonicSynth("train", seed=3, sample_rate=SR)
    b = SonicSynth("train", seed=3, sample_rate=SR)
    # any access order gives the same item (map-style, a pure function of (seed, split, index))
    later = [b[i] for i in (7, 2, 5)]
    for i, item in zip((7, 2, 5), later):
        ref = a[i]
        assert torch.equal(ref["audio"], item["audio"])
        assert ref["caption"] == item["caption"] and ref["attributes"] == item["attributes"]
    item = a[2]
    assert set(item) == {"audio", "caption", "duration", "attributes"}
    assert item["audio"].dtype == torch.float32 and item["audio"].shape == (1, round(item["duration"] * SR))
    assert 1.0 <= item["duration"] <= 5.0
    other = SonicSynth("train", seed=4, sample_rate=SR)
    assert [other[i]["caption"] for i in range(6)] != [a[i]["caption"] for i in range(6)]
    # negative index like a sequence; the sample rate only changes the rendering
    assert a[-1]["attributes"]["index"] == len(a) - 1
    c = SonicSynth("train", seed=3, sample_rate=22050)
    assert c[2]["caption"] == item["caption"] and c[2]["audio"].shape[1] == round(item["duration"] * 22050)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_renders(kind):
    ds = SonicSynth("train", seed=0, sample_rate=SR, kinds=(kind,), duration=(1.0, 3.0), channels=2)
    for i in range(3):
        item = ds[i]
        x = item["audio"]
        assert x.shape[0] == 2 and torch.equal(x[0], x[1])
        assert torch.isfinite(x).all() and x.abs().max() <= 0.99 + 1e-6
        assert item["attributes"]["kind"] == kind
        if kind == "silence":
            assert x.abs().max() == 0
        else:
            assert x.abs().max() > 1e-3


def test_fixed_duration_and_periodic_minimum():
    ds = SonicSynth("train", seed=1, sample_rate=SR, duration=2.5)
    assert all(ds[i]["audio"].shape[1] == 40000 for i in range(5))
    # drums get >= 4 beats and clicks >= 4 periods when a range allows it
    ds = SonicSynth("train", seed=1, sample_rate=SR, kinds=("drums", "clicks"), duration=(1.0, 5.0))
    for i in range(20):
        spec, _ = ds.spec(i)
        s = spec.layers[0]
        period = 60.0 / s.bpm if s.kind == "drums" else 1.0 / s.rate
        assert spec.duration >= min(4 * period, 5.0) - 1e-9


def _check_parse(spec, caption):
    p = parse_caption(caption, spec.duration)
    assert len(p.layers) == len(spec.layers), caption
    assert (p.loudness, p.loudness_stated) == (spec.loudness, spec.loudness_stated), caption
    for a, b in zip(p.layers, spec.layers):
        assert a.kind == b.kind, caption
        if b.kind in ("tone", "chord", "scale"):
            assert a.freq == pytest.approx(b.freq, rel=1e-9), caption
        if b.kind == "tone":
            assert a.waveform == b.waveform, caption
        assert (a.quality, a.bpm, a.color, a.rate, a.click) == (b.quality, b.bpm, b.color, b.rate, b.click), caption
        if b.kind in ("scale", "sweep"):
            assert a.direction == b.direction, caption
        if b.freq_named and b.kind in ("sweep", "clicks"):
            assert (a.freq, a.freq_end) == (b.freq, b.freq_end), caption


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_captions_parse_back_and_use_the_vocabulary(split):
    ds = SonicSynth(split, seed=11, sample_rate=SR)
    vocab = set(vocabulary())
    phrasings = set()
    for i in range(600):
        spec, caption = ds.spec(i)
        _check_parse(spec, caption)
        assert set(tokenize(caption)) <= vocab, caption
        phrasings.add(re.sub(r"\d+|[A-G]#?\d", "N", caption))
    assert len(phrasings) > 150  # many phrasings, not one template per kind


def test_tokenize_conventions():
    assert tokenize("a 700-hertz sine tone") == ["a", "7", "0", "0", "-", "hertz", "sine", "tone"]
    assert tokenize("an A4 square wave") == ["an", "A", "4", "square", "wave"]
    assert tokenize("the note F#5, loud") == ["the", "note", "F", "#", "5", ",", "loud"]
    assert tokenize("120 BPM") == ["1", "2", "0", "bpm"]


def test_note_names():
    assert note_to_midi("A4") == 69 and note_to_midi("C#4") == 61 and midi_to_note(57) == "A3"
    assert midi_to_hz(note_to_midi("A2")) == pytest.approx(110.0 / 2 * 2) and midi_to_hz(45) == pytest.approx(110.0)
    assert midi_to_hz(93) == pytest.approx(1760.0)
    with pytest.raises(ValueError, match="note_to_midi"):
        note_to_midi("H4")


def _named_values(caption):
    hz = [float(m) for m in re.findall(r"(\d+)(?:-| )(?:Hz|hertz)", caption)]
    hz += [float(m) for m in re.findall(r"from (\d+) to", caption)]
    hz += [midi_to_hz(note_to_midi(m)) for m in re.findall(r"(?<![A-Za-z0-9])([A-G]#?\d)(?![A-Za-z0-9])", caption)]
    bpm = [float(m) for m in re.findall(r"(\d+) (?:BPM|bpm|beats per minute)", caption)]
    return hz, bpm


def test_heldout_values_never_in_train():
    rng = np.random.default_rng(0)
    for _ in range(3000):
        spec = sample_spec(rng, split="train")
        assert not spec_is_heldout(spec), spec
        for s in spec.layers:
            assert not any(is_heldout_pitch(p) for p in s.pitches())
    ds = SonicSynth("train", seed=2, sample_rate=SR)
    for i in range(2000):
        _, caption = ds.spec(i)
        hz, bpm = _named_values(caption)
        assert not any(is_heldout_pitch(f) for f in hz), caption
        assert not any(is_heldout_bpm(b) for b in bpm), caption
    held = SonicSynth("heldout", seed=2, sample_rate=SR)
    kinds = set()
    for i in range(300):
        spec, caption = held.spec(i)
        hz, bpm = _named_values(caption)
        assert any(is_heldout_pitch(f) for f in hz) or any(is_heldout_bpm(b) for b in bpm), caption
        kinds.add(spec.kind)
    assert kinds == {"tone", "chord", "scale", "drums", "sweep", "clicks", "mixture"}
    assert is_heldout_pitch(294.0) and not is_heldout_pitch(293.0) and is_heldout_pitch(698.46)
    assert is_heldout_bpm(HELDOUT_BPM[0]) and not is_heldout_bpm(94)


def test_levels_match_the_loudness_class():
    ds = SonicSynth("train", seed=5, sample_rate=SR)
    seen = set()
    for i in range(120):
        item = ds[i]
        a = item["attributes"]
        x = item["audio"][0].numpy()
        if a["kind"] == "silence":
            assert a["level_db"] is None and not x.any()
            continue
        level = active_level_db(x, SR)
        target = LOUDNESS_DB[a["loudness"]]
        # exact level unless the peak limiter (0.99) had to act; always within the class (+-6 dB)
        if np.abs(x).max() < 0.989:
            # float32 storage only: the level is exact
            assert abs(level - a["level_db"]) <= 0.01, (item["caption"], level, a["level_db"])
        assert abs(level - target) < 6.0, (item["caption"], level, target)
        seen.add(a["loudness"])
    assert seen == {"quiet", "moderate", "loud"}


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        SonicSynth("test")
    with pytest.raises(ValueError, match="sample_rate"):
        SonicSynth(sample_rate=8000)
    with pytest.raises(ValueError, match="duration"):
        SonicSynth(duration=(3.0, 1.0))
    with pytest.raises(ValueError, match="duration"):
        SonicSynth(duration=float("nan"))
    with pytest.raises(ValueError, match="kinds"):
        SonicSynth(kinds=("guitar",))
    with pytest.raises(ValueError, match="held-out"):
        SonicSynth("heldout", kinds=("noise",))
    with pytest.raises(IndexError):
        SonicSynth(length=3).spec(3)
    with pytest.raises(ValueError, match="parse_caption"):
        parse_caption("a dog barking")


@pytest.mark.parametrize("key_style,keys", [("pysonic", ("audio", "caption")), ("tangoflux", ("location", "captions"))])
def test_write_synth(tmp_path, key_style, keys):
    manifest = write_synth(tmp_path, 3, seed=7, sample_rate=SR, duration=(1.0, 1.5), key_style=key_style, start=2)
    records = json.loads(manifest.read_text())
    ds = SonicSynth("train", seed=7, sample_rate=SR, duration=(1.0, 1.5))
    assert len(records) == 3
    for i, rec in zip(range(2, 5), records):
        item = ds[i]
        assert rec[keys[1]] == item["caption"] and rec["duration"] == item["duration"]
        wav, sr = sf.read(rec[keys[0]], dtype="float32", always_2d=True)
        assert sr == SR and wav.shape == (item["audio"].shape[1], 1)
        np.testing.assert_allclose(wav[:, 0], item["audio"][0].numpy(), atol=1.0 / 32768 + 1e-7)  # 16-bit PCM


def test_collate_pads_a_batch():
    ds = SonicSynth("train", seed=0, sample_rate=SR, duration=(1.0, 2.0))
    items = [ds[i] for i in range(4)]
    batch = synth_collate(items)
    n = max(it["audio"].shape[1] for it in items)
    assert batch["audio"].shape == (4, 1, n) and batch["caption"] == [it["caption"] for it in items]
    for i, it in enumerate(items):
        assert batch["lengths"][i] == it["audio"].shape[1]
        assert torch.equal(batch["audio"][i, :, : it["audio"].shape[1]], it["audio"])
        assert not batch["audio"][i, :, it["audio"].shape[1]:].any()
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=synth_collate)
    assert next(iter(loader))["audio"].shape[0] == 3
