"""WaveGrad vocoder: inputs it refuses, the sampler's use of the fused step, the mel front end."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import pysonic.ops
from pysonic.models.wavegrad import MelConfig, MelSpectrogram, WaveGrad, WaveGradConfig, mel_filterbank
from pysonic.models.wavegrad.vocoder import step_coefficients

DATA = Path(__file__).resolve().parents[1] / "data" / "wavegrad" / "ivanvovk_small"
BETAS_3 = [1e-4, 1e-2, 0.2]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py


@pytest.fixture(scope="module")
def small():
    return WaveGrad.from_pretrained(DATA)  # n_mels 10, hop 30 (ivanvovk layout)


@pytest.fixture(scope="module")
def small_lmnt_style():
    """A tiny network with the LMNT sampler (clamp every sample) and nearest resampling."""
    mel = MelConfig(n_fft=64, win_length=64, hop_length=12, n_mels=6, f_min=20.0, f_max=8000.0)
    cfg = WaveGradConfig(
        n_mels=6, factors=[3, 2, 2], upsampling_preconv_out_channels=16, upsampling_out_channels=[12, 8, 8],
        upsampling_dilations=[[1, 2, 1, 2]] * 3, downsampling_preconv_out_channels=8,
        downsampling_out_channels=[8, 12], downsampling_dilations=[[1, 2, 4]] * 2,
        interpolation="nearest", pe_scale=1.0, clip="output", mel=mel,
    )
    torch.manual_seed(3)
    return WaveGrad(cfg).eval()


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize(
    "mel, match",
    [
        (torch.randn(1, 9, 4), "9 bands but this model takes n_mels=10"),
        (torch.randn(1, 10, 0), "empty"),
        (torch.randn(0, 10, 4), "empty"),
        (torch.randn(10), r"\[B, n_mels, T\]"),
        (torch.full((1, 10, 4), float("nan")), "NaN"),
        (torch.tensor([[[math.inf] * 4] * 10]), "NaN or infinite"),
    ],
)
def test_bad_mel(small, mel, match):
    with pytest.raises(ValueError, match=match):
        small.generate(mel, iterations=3, schedule=BETAS_3)


def test_mel_must_be_float_tensor(small):
    with pytest.raises(TypeError, match="mel must be"):
        small.generate(np.zeros((1, 10, 4)), iterations=3, schedule=BETAS_3)
    with pytest.raises(TypeError, match="floating point"):
        small.generate(torch.zeros(1, 10, 4, dtype=torch.int64), iterations=3, schedule=BETAS_3)


def test_iterations_without_schedule(small):
    # 6 iterations have a shipped schedule; 5 have none and no betas were given.
    with pytest.raises(ValueError, match="no noise schedule for 5 iterations"):
        small.generate(torch.randn(1, 10, 4), iterations=5)


@pytest.mark.parametrize(
    "betas, match",
    [
        ([0.1, 0.0, 0.2], r"open interval \(0, 1\)"),
        ([0.1, 1.0, 0.2], r"open interval \(0, 1\)"),
        ([-0.1, 0.5, 0.2], r"open interval \(0, 1\)"),
        ([0.1, float("nan"), 0.2], r"open interval \(0, 1\)"),
        ([], "non-empty"),
        (torch.full((3, 1), 0.1), "1-D"),
        ([0.1, 0.2], "2 betas but iterations=3"),
    ],
)
def test_bad_betas(small, betas, match):
    with pytest.raises(ValueError, match=match):
        small.generate(torch.randn(1, 10, 4), iterations=3, schedule=betas)


@pytest.mark.parametrize("iterations", [0, -2, 2.5, True])
def test_bad_iterations(small, iterations):
    with pytest.raises(ValueError, match="iterations must be a positive int"):
        small.generate(torch.randn(1, 10, 4), iterations=iterations, schedule="linear")


def test_bad_noise_and_names(small):
    with pytest.raises(ValueError, match=r"noise must be a tensor of shape \(3, 1, 120\)"):
        small.generate(torch.randn(1, 10, 4), iterations=3, schedule=BETAS_3, noise=torch.randn(3, 1, 119))
    with pytest.raises(ValueError, match="unknown schedule name"):
        small.generate(torch.randn(1, 10, 4), iterations=3, schedule="cosine")
    with pytest.raises(TypeError, match="sequence or 1-D tensor"):
        small.generate(torch.randn(1, 10, 4), iterations=3, schedule=0.1)


def test_training_schedule_is_the_default_for_its_length(small):
    betas = small.resolve_schedule(1000)
    assert betas.shape == (1000,) and betas[0] == pytest.approx(1e-6) and betas[-1] == pytest.approx(0.01)


# ---------------------------------------------------------------- sampler

def _count_steps(monkeypatch):
    """Records (op name, clip) for every fused sampler update."""
    calls = []
    for name in ("diffusion_step", "diffusion_step_x0"):
        real = getattr(pysonic.ops, name)

        def counting(*args, _name=name, _real=real, **kwargs):
            calls.append((_name, kwargs.get("clip")))
            return _real(*args, **kwargs)

        monkeypatch.setattr(pysonic.ops, name, counting)
    return calls


def test_lmnt_sampler_one_fused_step_per_iteration(small_lmnt_style, monkeypatch):
    calls = _count_steps(monkeypatch)
    wav = small_lmnt_style.generate(torch.randn(2, 6, 5), iterations=4, schedule=[1e-4, 1e-3, 1e-2, 0.1],
                                    generator=torch.Generator().manual_seed(0))
    assert wav.shape == (2, 60) and wav.dtype == torch.float32
    assert calls == [("diffusion_step", 1.0)] * 4  # one op per iteration, clamped to [-1, 1]
    assert wav.abs().max() <= 1.0


def test_ivanvovk_sampler_clamps_the_denoised_estimate(small, monkeypatch):
    calls = _count_steps(monkeypatch)
    small.generate(torch.randn(1, 10, 2), iterations=3, schedule=BETAS_3)
    assert calls == [("diffusion_step_x0", 1.0)] * 3  # one op per iteration: clamp y0, then the posterior step


def test_step_coefficients_match_closed_form():
    betas = torch.tensor(BETAS_3, dtype=torch.float64)
    c = step_coefficients(betas, "output")
    ab = np.cumprod(1 - np.array(BETAS_3))
    for n in range(3):
        assert c[n]["c1"] == pytest.approx(1 / math.sqrt(1 - BETAS_3[n]))
        assert c[n]["c2"] == pytest.approx(BETAS_3[n] / math.sqrt(1 - ab[n]))
        assert c[n]["level"] == pytest.approx(math.sqrt(ab[n]))
    assert c[0]["sigma"] == 0.0
    assert c[2]["sigma"] == pytest.approx(math.sqrt((1 - ab[1]) / (1 - ab[2]) * BETAS_3[2]))
    # Without the clamp, the ivanvovk posterior step is the same update as c1/c2.
    for n in range(3):
        # x coefficient: coef1 / sqrt(ab) + coef2 = c1; eps coefficient: coef1 * sqrt(1 - ab) / sqrt(ab) = c1 * c2.
        assert c[n]["coef1"] * c[n]["y0_c1"] + c[n]["coef2"] == pytest.approx(c[n]["c1"], rel=1e-9)
        assert c[n]["coef1"] * c[n]["y0_c1"] * c[n]["y0_c2"] == pytest.approx(c[n]["c1"] * c[n]["c2"], rel=1e-9)


@pytest.mark.parametrize("model", ["small", "small_lmnt_style"])
def test_batch_equals_items(model, request):
    vocoder = request.getfixturevalue(model)
    n_mels, hop = vocoder.config.n_mels, vocoder.hop_length
    mel = torch.randn(3, n_mels, 4)
    noise = torch.randn(3, 3, 4 * hop)
    batch = vocoder.generate(mel, iterations=3, schedule=BETAS_3, noise=noise)
    for i in range(3):
        item = vocoder.generate(mel[i], iterations=3, schedule=BETAS_3, noise=noise[:, i : i + 1])
        torch.testing.assert_close(batch[i : i + 1], item, atol=1e-5, rtol=0)  # batched vs single convolutions


def test_generator_reproducible(small):
    mel = torch.randn(1, 10, 3)
    a = small.generate(mel, iterations=3, schedule=BETAS_3, generator=torch.Generator().manual_seed(5))
    b = small.generate(mel, iterations=3, schedule=BETAS_3, generator=torch.Generator().manual_seed(5))
    c = small.generate(mel, iterations=3, schedule=BETAS_3, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bf16_autocast_close_to_fp32(small):
    mel = torch.randn(2, 10, 4)
    noise = torch.randn(3, 2, 120)
    ref = small.generate(mel, iterations=3, schedule=BETAS_3, noise=noise)
    low = small.generate(mel, iterations=3, schedule=BETAS_3, noise=noise, dtype=torch.bfloat16)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    snr = 10 * torch.log10(ref.pow(2).sum() / (ref - low).pow(2).sum())
    assert snr > 15  # bf16 network (8-bit mantissa) on a random tiny model; 3 iterations


def test_save_pretrained_roundtrip(small, tmp_path):
    small.save_pretrained(tmp_path)
    again = WaveGrad.from_pretrained(tmp_path)
    assert again.config == small.config
    mel, noise = torch.randn(1, 10, 3), torch.randn(3, 1, 90)
    assert torch.equal(small.generate(mel, 3, BETAS_3, noise=noise), again.generate(mel, 3, BETAS_3, noise=noise))


# ---------------------------------------------------------------- mel front end

def test_filterbank_triangles():
    sr, n_fft, n_mels, f_min, f_max = 22050, 1024, 80, 80.0, 8000.0
    fb = mel_filterbank(n_freqs=n_fft // 2 + 1, f_min=f_min, f_max=f_max, n_mels=n_mels, sample_rate=sr).double()
    assert fb.shape == (513, 80) and fb.min() >= 0 and fb.max() <= 1
    # Independent construction, one filter at a time, in Hz.
    mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
    edges = 700 * (10 ** (np.linspace(mel(f_min), mel(f_max), n_mels + 2) / 2595) - 1)
    freqs = np.linspace(0, sr // 2, n_fft // 2 + 1)
    for j in (0, 17, 79):
        lo, mid, hi = edges[j : j + 3]
        tri = np.clip(np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)), 0, None)
        np.testing.assert_allclose(fb[:, j].numpy(), tri, atol=1e-6)
    assert (fb[freqs < f_min] == 0).all() and (fb[freqs > f_max] == 0).all()


def test_stft_magnitude_against_dft():
    cfg = MelConfig(n_fft=64, win_length=48, hop_length=16, n_mels=8, f_min=0.0, f_max=11025.0, power=1.0,
                    normalized=True, compression="lmnt_db", drop_last_frame=False)
    front = MelSpectrogram(cfg)
    x = torch.randn(200, dtype=torch.float64)
    # Reference: reflect-pad by n_fft // 2, periodic Hann of 48 centred in 64, direct DFT per frame.
    xp = np.pad(x.numpy(), 32, mode="reflect")
    win = np.zeros(64)
    win[8:56] = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(48) / 48)
    frames = 1 + (len(xp) - 64) // 16
    spec = np.stack([np.abs(np.fft.rfft(xp[i * 16 : i * 16 + 64] * win)) for i in range(frames)], axis=1)
    spec /= np.sqrt((win**2).sum())
    mel = front.filterbank.double().numpy().T @ spec
    ref = np.clip((20 * np.log10(np.maximum(mel, 1e-5)) - 20 + 100) / 100, 0, 1)
    got = front(x.float())
    assert got.shape == (8, 200 // 16 + 1)
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-4)


def test_ivanvovk_mel_frames_and_sine_peak():
    cfg = MelConfig()  # ivanvovk data_config: 1024 / 300 / 80 mels, log10, last frame dropped
    front = MelSpectrogram(cfg)
    t = torch.arange(20 * 300) / 22050
    wav = 0.5 * torch.sin(2 * math.pi * 1000.0 * t)
    mel = front(wav[None])
    assert mel.shape == (1, 80, 20)
    band = mel[0, :, 10].argmax().item()
    edges = 700 * (10 ** (np.linspace(2595 * np.log10(1 + 80 / 700), 2595 * np.log10(1 + 8000 / 700), 82) / 2595) - 1)
    assert edges[band] < 1000 < edges[band + 2]  # the 1 kHz tone lands in the band around it
    silent = front(torch.zeros(1, 3000))
    assert (silent == 0).all()  # log10(0) -> 0 as ivanvovk's MelSpectrogramFixed


def test_mel_bad_input():
    front = MelSpectrogram(MelConfig())
    with pytest.raises(ValueError, match="more than n_fft // 2"):
        front(torch.randn(1, 100))
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        front(torch.randn(1, 1, 3000))
    with pytest.raises(TypeError, match="floating-point"):
        front(torch.zeros(3000, dtype=torch.int16))


# ---------------------------------------------------------------- channels-last inference path

@pytest.mark.parametrize("model", ["small", "small_lmnt_style"])
def test_channels_last_path_matches_plain(model, request):
    net = request.getfixturevalue(model).net
    n_mels, hop = net.config.n_mels, net.config.hop_length
    mel, audio, level = torch.randn(2, n_mels, 5), torch.randn(2, 5 * hop).clamp(-1, 1), torch.tensor([0.2, 0.95])
    with torch.no_grad():
        plain = net(audio, mel, level)
        net.prepare(None)  # generate keeps its cache: free it to see the error
        with pytest.raises(RuntimeError, match="prepare"):
            net(audio, mel, level, channels_last=True)
        try:
            net.prepare(torch.float32)
            fast = net(audio, mel, level, channels_last=True)
            net.prepare(torch.bfloat16)
            low = net(audio, mel, level, channels_last=True)
        finally:
            net.prepare(None)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)  # same math, other conv algorithm
    assert low.dtype == torch.bfloat16
    rel = (low.float() - plain).norm() / plain.norm()
    assert rel < 0.05  # bf16 weights and activations through ~20 layers


def test_weight_cache_follows_the_weights(small):
    # generate keeps the channels-last weights between calls; changing a weight in place must
    # rebuild them (the cache is keyed on the tensors' version counters).
    mel = torch.randn(1, 10, 3)
    gen = lambda: small.generate(mel, 3, BETAS_3, generator=torch.Generator().manual_seed(0))  # noqa: E731
    first = gen()
    torch.testing.assert_close(gen(), first, rtol=0, atol=0)
    w = small.net.out_conv.weight
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w.mul_(2.0)
        assert not torch.equal(gen(), first)
    finally:
        with torch.no_grad():
            w.copy_(saved)
    torch.testing.assert_close(gen(), first, rtol=0, atol=0)


def test_noise_level_encoding_formula():
    from pysonic.nn.film import noise_level_encoding

    level = torch.tensor([0.0, 0.5, 1.0])
    enc = noise_level_encoding(level, 8, scale=5000.0)
    i = torch.arange(4, dtype=torch.float32)
    angles = 5000.0 * level[:, None] * 1e-4 ** (i / 4)
    torch.testing.assert_close(enc, torch.cat([angles.sin(), angles.cos()], 1))
    with pytest.raises(ValueError, match="shape \\[B\\]"):
        noise_level_encoding(torch.zeros(2, 2), 8)


def test_fibonacci_schedule(small):
    from pysonic.models.wavegrad import fibonacci_betas

    b = fibonacci_betas(25)
    assert b[0] == 1e-6 and b[1] == 9e-6 and b[-1] < 1
    torch.testing.assert_close(b[2:], b[1:-1] + b[:-2])
    torch.testing.assert_close(small.resolve_schedule(7, "fibonacci"), fibonacci_betas(7))
    with pytest.raises(ValueError, match=">= 1"):
        fibonacci_betas(40)
    with pytest.raises(ValueError, match="positive int"):
        fibonacci_betas(0)
