"""SynthBench: the ground truth scores ~100% at chance <= 20%, every check rejects wrong audio, and
bad audio (silence, NaN, empty) gives a clear error or a documented result."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pysonic.data.synth import Sound, SynthSpec, render_item
from pysonic.data.synth.spec import midi_to_hz
from pysonic.eval import analysis as A
from pysonic.eval.synthbench import ATTRIBUTES, SynthBench, judge, make_prompts, measure, oracle_generator, to_markdown

SR = 16000


@pytest.fixture(scope="module")
def oracle_report():
    return SynthBench(4, seed=1, batch_size=16).run(oracle_generator(SR))


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_oracle_scores_and_chance(oracle_report, split):
    rep = oracle_report["splits"][split]
    assert rep["sample_rate"] == SR
    for attr in ATTRIBUTES:
        assert rep["attributes"][attr]["n"] == 4
        assert rep["attributes"][attr]["correct"] >= 0.95, (attr, [i for i in rep["items"] if not i["correct"]])
    assert rep["overall"]["chance"] <= 0.20, rep["overall"]
    # per attribute, chance cannot exceed what a single fixed answer could score (loudness 3 classes...)
    assert rep["attributes"]["pitch"]["chance"] < 0.3
    table = to_markdown(oracle_report)
    assert "| pitch |" in table and "**overall**" in table


def test_prompts_are_deterministic_and_split_correctly():
    a = make_prompts("tempo", 5, "heldout", seed=3)
    assert [p.caption for p in a] == [p.caption for p in make_prompts("tempo", 5, "heldout", seed=3)]
    assert all(95 <= p.spec.layers[0].bpm <= 105 for p in a)
    assert all(not 95 <= p.spec.layers[0].bpm <= 105 for p in make_prompts("tempo", 20, "train", seed=3))
    loud = make_prompts("loudness", 6, "train", seed=0)
    assert [p.spec.loudness for p in loud] == ["quiet", "moderate", "loud"] * 2 and all(p.spec.loudness_stated for p in loud)


def _spec(*layers, duration=3.0, loudness="moderate"):
    from pysonic.data.synth.spec import LOUDNESS_DB

    return SynthSpec(layers=tuple(layers), duration=duration, loudness=loudness, loudness_stated=True,
                     level_db=LOUDNESS_DB[loudness])


def _measure(spec, seed=0):
    return measure(render_item(spec, sample_rate=SR, seed=seed), SR, spec.duration)


def test_pitch_rejects_a_semitone_off():
    for wf in ("sine", "square", "sawtooth", "triangle"):
        m = _measure(_spec(Sound("tone", freq=midi_to_hz(57), waveform=wf)))
        assert judge("pitch", m, _spec(Sound("tone", freq=midi_to_hz(57), waveform="sine")))
        assert not judge("pitch", m, _spec(Sound("tone", freq=midi_to_hz(58), waveform="sine")))
        assert not judge("pitch", m, _spec(Sound("tone", freq=midi_to_hz(45), waveform="sine")))  # octave
    m = _measure(_spec(Sound("tone", freq=440.0 * 2 ** (40 / 1200), waveform="sine")))  # 40 cents sharp: within 50
    assert judge("pitch", m, _spec(Sound("tone", freq=440.0, waveform="sine")))


def test_chord_and_melody_checks():
    c = midi_to_hz(60)
    m = _measure(_spec(Sound("chord", freq=c, quality="major", waveform="triangle")))
    assert judge("chord", m, _spec(Sound("chord", freq=c, quality="major")))
    assert not judge("chord", m, _spec(Sound("chord", freq=c, quality="minor")))
    assert not judge("chord", m, _spec(Sound("chord", freq=midi_to_hz(61), quality="major")))
    up = _measure(_spec(Sound("scale", freq=c, direction="rising", waveform="sine"), duration=2.4))
    assert judge("melody", up, _spec(Sound("scale", freq=c, direction="rising"), duration=2.4))
    assert not judge("melody", up, _spec(Sound("scale", freq=c, direction="falling"), duration=2.4))
    assert not judge("melody", up, _spec(Sound("scale", freq=midi_to_hz(62), direction="rising"), duration=2.4))


def test_tempo_and_rate_checks():
    m = _measure(_spec(Sound("drums", bpm=120.0, pattern="rock"), duration=4.0))
    assert judge("tempo", m, _spec(Sound("drums", bpm=118.0)))          # 1.7% off: within 4%
    assert not judge("tempo", m, _spec(Sound("drums", bpm=126.0)))      # 5% off
    assert not judge("tempo", m, _spec(Sound("drums", bpm=60.0)))       # half tempo is wrong
    m = _measure(_spec(Sound("clicks", rate=5, click="click"), duration=2.0))
    assert judge("clicks", m, _spec(Sound("clicks", rate=5, click="click")))
    assert not judge("clicks", m, _spec(Sound("clicks", rate=6, click="click")))
    assert not judge("clicks", m, _spec(Sound("clicks", rate=10, click="click")))


def test_noise_sweep_loudness_duration_checks():
    for color in ("white", "pink", "brown"):
        m = _measure(_spec(Sound("noise", color=color)), seed=4)
        for other in ("white", "pink", "brown"):
            assert judge("noise", m, _spec(Sound("noise", color=other))) == (other == color)
    up = _measure(_spec(Sound("sweep", freq=200.0, freq_end=3000.0, direction="rising")))
    assert judge("sweep", up, _spec(Sound("sweep", direction="rising")))
    assert not judge("sweep", up, _spec(Sound("sweep", direction="falling")))
    steady = _measure(_spec(Sound("tone", freq=440.0, waveform="sine")))
    assert not judge("sweep", steady, _spec(Sound("sweep", direction="rising")))
    assert not judge("sweep", steady, _spec(Sound("sweep", direction="falling")))
    quiet = _measure(_spec(Sound("tone", freq=440.0, waveform="sine"), loudness="quiet"))
    assert judge("loudness", quiet, _spec(Sound("tone", freq=440.0), loudness="quiet"))
    assert not judge("loudness", quiet, _spec(Sound("tone", freq=440.0), loudness="loud"))
    # 2 s of sound padded with silence to 4 s fails a 4 s request, passes a 2 s one
    x = render_item(_spec(Sound("tone", freq=440.0, waveform="sine"), duration=2.0), sample_rate=SR)
    padded = torch.cat([x, torch.zeros(1, 2 * SR)], dim=1)
    assert not judge("duration", measure(padded, SR, 4.0), _spec(Sound("tone", freq=440.0), duration=4.0))
    assert judge("duration", measure(padded, SR, 2.0), _spec(Sound("tone", freq=440.0), duration=2.0))
    # a generator output shorter than asked fails too
    assert not judge("duration", measure(x, SR, 3.0), _spec(Sound("tone", freq=440.0), duration=3.0))
    # the asked sound must still be there at the end: noise of the right length fails a tone prompt,
    # and a tone that turns into another pitch for its last second fails too
    noise = render_item(_spec(Sound("noise", color="white"), duration=2.0), sample_rate=SR)
    assert not judge("duration", measure(noise, SR, 2.0), _spec(Sound("tone", freq=440.0), duration=2.0))
    assert judge("duration", measure(noise, SR, 2.0), _spec(Sound("noise", color="white"), duration=2.0))
    other = render_item(_spec(Sound("tone", freq=660.0, waveform="sine"), duration=1.0), sample_rate=SR)
    switched = torch.cat([x[:, : SR], other], dim=1)
    assert not judge("duration", measure(switched, SR, 2.0), _spec(Sound("tone", freq=440.0), duration=2.0))


def test_mixture_needs_every_layer():
    spec = _spec(Sound("tone", freq=440.0, waveform="square"), Sound("noise", color="pink"))
    m = _measure(spec, seed=2)
    assert judge("mixture", m, spec)
    assert not judge("mixture", m, _spec(Sound("tone", freq=440.0), Sound("noise", color="brown")))
    assert not judge("mixture", m, _spec(Sound("tone", freq=466.16), Sound("noise", color="pink")))
    over_drums = _spec(Sound("tone", freq=330.0, waveform="sine"), Sound("drums", bpm=90.0, pattern="dance"), duration=3.0)
    m = _measure(over_drums)
    assert judge("mixture", m, over_drums)
    assert not judge("mixture", m, _spec(Sound("tone", freq=330.0), Sound("drums", bpm=180.0)))


def test_silence_nan_and_empty():
    silence = measure(torch.zeros(1, SR), SR, 1.0)  # documented: nothing measured, every check fails
    assert silence["f0"] is None and silence["bpm"] is None and silence["color"] is None
    assert silence["class"] == "silent" and silence["extent"] == 0.0 and silence["level_db"] is None
    for attr, spec in [("pitch", _spec(Sound("tone", freq=440.0))), ("noise", _spec(Sound("noise", color="white"))),
                       ("loudness", _spec(Sound("tone", freq=440.0), loudness="quiet")),
                       ("duration", _spec(Sound("tone", freq=440.0), duration=1.0))]:
        assert not judge(attr, silence, spec)
    bad = torch.zeros(1, SR)
    bad[0, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        measure(bad, SR, 1.0)
    with pytest.raises(ValueError, match="empty"):
        measure(torch.zeros(1, 0), SR, 1.0)
    with pytest.raises(ValueError, match="shape"):
        A.to_mono(np.zeros((1, 2, 3)))
    assert A.cents(None, 440.0) == math.inf


def test_bench_survives_a_broken_generator():
    def nan_gen(prompts, durations, seed):
        return torch.full((len(prompts), 1, SR), float("nan")), SR

    rep = SynthBench(2, splits=("train",), attributes=("pitch", "loudness")).run(nan_gen)
    split = rep["splits"]["train"]
    assert split["overall"]["correct"] == 0.0
    assert all("NaN" in it["error"] for it in split["items"])

    def short_batch(prompts, durations, seed):
        return torch.zeros(len(prompts) - 1, 1, SR), SR

    with pytest.raises(ValueError, match="returned 1 items for 2 prompts"):
        SynthBench(2, splits=("train",), attributes=("pitch",)).run(short_batch)
    with pytest.raises(ValueError, match="attributes"):
        SynthBench(2, attributes=("timbre",))
    with pytest.raises(ValueError, match="n must be"):
        SynthBench(1)
    with pytest.raises(ValueError, match="splits"):
        SynthBench(2, splits=("test",))


def test_spectrogram_png(tmp_path):
    import struct

    from pysonic.eval.spectrogram import save_prompt_spectrograms, spectrogram_db

    path = save_prompt_spectrograms(tmp_path / "s.png", oracle_generator(SR), ["a sine tone at 440 Hz", "pink noise"],
                                    [1.0, 0.5])
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100 and height > 100
    db = spectrogram_db(torch.zeros(SR), SR)  # silence: flat at the floor, no division by zero
    assert np.isfinite(db).all() and db.max() == db.min()
