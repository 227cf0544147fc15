"""save_audio / load_audio (soundfile), the band-limited resampler and BS.1770 loudness."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import pysonic
from pysonic.audio import loudness, resample

sf = pytest.importorskip("soundfile")


def _sine(freq, rate, n, phase=0.0):
    t = torch.arange(n, dtype=torch.float64) / rate
    return torch.sin(2 * math.pi * freq * t + phase)


@pytest.mark.parametrize("orig,new", [(44100, 16000), (16000, 44100), (48000, 44100), (44100, 48000), (8000, 12000), (44100, 22050)])
def test_resample_sine(orig, new):
    n = orig // 4 + 37  # not a whole number of blocks
    y = resample(_sine(440, orig, n).float(), orig, new)
    assert y.shape == (math.ceil(n * new / orig),) and y.dtype == torch.float32
    ref = _sine(440, new, y.shape[0])
    mid = slice(y.shape[0] // 8, -y.shape[0] // 8)  # away from the zero-padded edges
    assert (y[mid] - ref[mid]).abs().max().item() < 1e-4  # passband: exact to ~1e-5
    if new < orig:  # a tone above the new Nyquist frequency is removed, not aliased
        alias = resample(_sine(0.55 * new, orig, n).float(), orig, new)
        assert alias[mid].abs().max().item() < 1e-3  # stop band: about -90 dB


def test_resample_shapes():
    x = torch.randn(2, 3, 1001)
    y = resample(x, 16000, 24000)
    assert y.shape == (2, 3, 1502)
    torch.testing.assert_close(y[1, 2], resample(x[1, 2], 16000, 24000))  # batch = items
    assert torch.equal(resample(x, 8000, 8000), x)
    assert resample(torch.zeros(2, 0), 8000, 16000).shape == (2, 0)
    assert resample(torch.ones(1), 16000, 8000).shape == (1,)
    with pytest.raises(ValueError, match="new_rate"):
        resample(x, 16000, 0)
    with pytest.raises(TypeError, match="floating"):
        resample(torch.ones(3, dtype=torch.int64), 2, 3)
    with pytest.raises(ValueError, match="too fine"):
        resample(x, 44100, 44101)


def test_loudness_reference_levels():
    # BS.1770: a 0 dBFS 997 Hz sine in one channel reads -3.01 LKFS; in two channels +0.00
    s = _sine(997, 48000, 48000 * 3).float()
    assert abs(loudness(s, 48000) + 3.01) < 0.02
    assert abs(loudness(torch.stack([s, s]), 48000)) < 0.02
    assert abs(loudness(_sine(997, 44100, 44100 * 3).float() * 0.1, 44100) + 23.01) < 0.02  # -20 dB
    assert loudness(torch.zeros(2, 48000), 48000) == float("-inf")
    assert math.isfinite(loudness(s[:1000], 48000))  # shorter than one 400 ms block


@pytest.mark.parametrize("normalize", ["peak", "loudness", None])
def test_save_load_round_trip(tmp_path, normalize):
    audio = torch.stack([_sine(440, 16000, 8000), _sine(660, 16000, 8000)]).float() * 0.3
    path = pysonic.save_audio(tmp_path / "x.wav", audio[None], 16000, normalize=normalize, subtype="FLOAT")
    back, sr = pysonic.load_audio(path)
    assert sr == 16000 and back.shape == (2, 8000) and back.dtype == torch.float32
    if normalize is None:
        torch.testing.assert_close(back, audio, rtol=0, atol=1e-7)
    elif normalize == "peak":
        assert abs(back.abs().max().item() - 0.99) < 1e-6
        torch.testing.assert_close(back / back.abs().max(), audio / audio.abs().max(), rtol=0, atol=1e-6)
    else:
        assert abs(loudness(back, sr) - (-23.0)) < 0.05


def test_loudness_never_clips(tmp_path):
    quiet_spike = torch.zeros(1, 48000)
    quiet_spike[0, 100] = 0.5  # very low loudness, a large peak: the gain is capped at the peak
    pysonic.save_audio(tmp_path / "s.wav", quiet_spike, 48000, normalize="loudness", subtype="FLOAT")
    back, _ = pysonic.load_audio(tmp_path / "s.wav")
    assert abs(back.abs().max().item() - 0.99) < 1e-6


def test_load_resamples_and_formats(tmp_path):
    x = _sine(300, 22050, 22050).float()[None].repeat(2, 1) * 0.5
    sf.write(str(tmp_path / "a.flac"), x.T.numpy(), 22050)  # PCM_16 FLAC
    y, sr = pysonic.load_audio(tmp_path / "a.flac", sample_rate=44100)
    assert sr == 44100 and y.shape == (2, 44100)
    ref = _sine(300, 44100, 44100).float() * 0.5
    assert (y[0, 4000:-4000] - ref[4000:-4000]).abs().max().item() < 1e-3  # 16-bit quantisation + filter
    mono, _ = pysonic.load_audio(pysonic.save_audio(tmp_path / "m.wav", np.zeros(100, dtype=np.float32), 8000, normalize=None))
    assert mono.shape == (1, 100)


def test_errors(tmp_path):
    a = torch.zeros(2, 10)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        pysonic.save_audio(tmp_path / "nowhere" / "x.wav", a, 8000)
    with pytest.raises(ValueError, match="normalize"):
        pysonic.save_audio(tmp_path / "x.wav", a, 8000, normalize="rms")
    with pytest.raises(ValueError, match="sample_rate"):
        pysonic.save_audio(tmp_path / "x.wav", a, 0)
    with pytest.raises(ValueError, match="shape"):
        pysonic.save_audio(tmp_path / "x.wav", torch.zeros(2, 2, 10), 8000)
    with pytest.raises(ValueError, match="channels"):
        pysonic.save_audio(tmp_path / "x.wav", torch.zeros(10, 2), 8000)  # [N, C] by mistake
    with pytest.raises(ValueError, match="NaN"):
        pysonic.save_audio(tmp_path / "x.wav", torch.full((1, 10), float("nan")), 8000)
    with pytest.raises(TypeError, match="tensor"):
        pysonic.save_audio(tmp_path / "x.wav", [0.0, 1.0], 8000)
    with pytest.raises(ValueError, match="cannot write"):
        pysonic.save_audio(tmp_path / "x.notaformat", a, 8000)
    with pytest.raises(FileNotFoundError, match="missing"):
        pysonic.load_audio(tmp_path / "missing.wav")
    (tmp_path / "junk.wav").write_bytes(b"not audio at all")
    with pytest.raises(ValueError, match="cannot read"):
        pysonic.load_audio(tmp_path / "junk.wav")
    with pytest.raises(ValueError, match="sample_rate"):
        pysonic.load_audio(tmp_path / "junk.wav", sample_rate=-1)
