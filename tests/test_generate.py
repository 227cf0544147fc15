"""pysonic.generate and `pysonic generate` with the model shipped in the package (end to end)."""
import math

import pytest
import torch

import pysonic
from pysonic import generation

SHIPPED = generation.default_model_dir()


def pitch_hz(audio: torch.Tensor, sample_rate: int) -> float:
    """Frequency of the strongest spectral peak (Hann window, zero-padded FFT, parabolic
    interpolation on the log magnitude): the pitch of a pure tone."""
    x = audio.double().flatten()
    x = x - x.mean()
    n = 1 << (4 * len(x) - 1).bit_length()
    mag = torch.fft.rfft(x * torch.hann_window(len(x), dtype=torch.float64), n=n).abs()
    mag[: int(20 * n / sample_rate)] = 0  # below 20 Hz: not a pitch
    k = min(max(int(mag.argmax()), 1), len(mag) - 2)
    a, b, c = (torch.log(mag[k + d] + 1e-30).item() for d in (-1, 0, 1))
    shift = 0.5 * (a - c) / (a - 2 * b + c) if (a - 2 * b + c) != 0 else 0.0
    return (k + shift) * sample_rate / n


def test_pitch_estimator():
    sr = 16000
    t = torch.arange(sr) / sr
    for f in (110.0, 437.3, 1500.0):
        assert abs(1200 * math.log2(pitch_hz(torch.sin(2 * math.pi * f * t), sr) / f)) < 2


def test_shipped_model_files():
    names = {p.relative_to(SHIPPED).as_posix() for p in SHIPPED.rglob("*") if p.is_file()}
    assert {"config.json", "tangoflux.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/config.json", "text_encoder/model.safetensors", "MODEL_CARD.md"} <= names
    size = sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file())
    assert size < 50e6, f"the shipped model is {size / 1e6:.1f} MB"


def test_generate_default_model():
    g = torch.Generator().manual_seed(0)
    out = pysonic.generate("a sine tone at 440 Hz", duration=2.0, steps=8, generator=g)
    assert isinstance(out, pysonic.Generated)
    audio, sr = out  # unpacks as (audio, sample_rate)
    assert sr == out.sample_rate == 16000 and out.channels == 1
    assert audio.shape == (1, 1, 32000) and audio.dtype == torch.float32
    assert torch.isfinite(audio).all()
    # cached per process: the same pipeline object, and the same audio for the same seed
    assert generation.load_pipeline() is generation.load_pipeline()
    again = pysonic.generate("a sine tone at 440 Hz", duration=2.0, steps=8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again.audio, audio, rtol=0, atol=0)


# Measured with the model shipped on this branch (see MODEL_CARD.md): the model trained here in the
# time available does not yet render a pure tone's pitch; the lead decides when to drop the xfail.
PITCH_XFAIL = pytest.mark.xfail(strict=True, reason="second shipped model: its flow model does not render pitch yet; measured 280.9 Hz for 440 Hz (-777 cents), see MODEL_CARD.md")


@PITCH_XFAIL
def test_pure_tone_pitch_within_50_cents():
    f = 440.0
    out = pysonic.generate(f"a pure sine tone at {f:g} Hz", duration=2.0, steps=25,
                           generator=torch.Generator().manual_seed(0))
    est = pitch_hz(out.audio[0, 0, 4000:28000], out.sample_rate)  # away from the edges
    assert abs(1200 * math.log2(est / f)) <= 50, f"asked {f} Hz, got {est:.1f} Hz"


def test_generate_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="dtype"):
        pysonic.generate("x", dtype="fp16")
    with pytest.raises(ValueError, match="duration"):
        pysonic.generate("x", duration=60.0)
    monkeypatch.setattr(generation, "default_model_dir", lambda: tmp_path)
    with pytest.raises(FileNotFoundError, match="shipped default model"):
        pysonic.generate("x")


def test_cli_generate_default_model(tmp_path, capsys):
    from pysonic.audio import load_audio
    from pysonic.cli import main

    out = tmp_path / "tone.wav"
    assert main(["generate", "a square wave at 220 Hz", "-o", str(out), "--duration", "1.5", "--steps", "4",
                 "--seed", "0", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "16000 Hz, 1 channel" in printed
    wav, sr = load_audio(out)
    assert sr == 16000 and wav.shape == (1, 24000)
    assert main(["generate", "x", "-o", str(out), "--text-encoder", str(tmp_path)]) == 2
    assert "--checkpoint" in capsys.readouterr().err


def test_preview_model_warns_once_per_pipeline(monkeypatch):
    """While the shipped model does not follow prompts, loading it says so (once per pipeline)."""
    if generation.DEFAULT_MODEL_FOLLOWS_PROMPTS:
        pytest.skip("the shipped model follows prompts: no preview warning to check")  # strict mode fails this: drop the test then
    monkeypatch.setattr(generation, "_CACHE", {})
    with pytest.warns(UserWarning, match="does not follow prompts"):
        generation.load_pipeline()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generation.load_pipeline()  # cached: no second warning
    monkeypatch.setattr(generation, "_CACHE", {})
    with pytest.warns(UserWarning, match="does not follow prompts"):
        generation.load_pipeline(SHIPPED)  # named explicitly (as the CLI does): same warning
