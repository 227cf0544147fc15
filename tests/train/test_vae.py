"""Oobleck VAE trainer (pysonic.train.vae): loss terms, crops, loss goes down, exact resume."""
import math

import pytest
import torch
from safetensors.torch import load_file

from pysonic.codecs.oobleck import OobleckConfig, OobleckVAE
from pysonic.train.vae import (VAETrainConfig, VAETrainer, collate_crops, kl_to_standard_normal,
                               random_crop)
from tests.train.resume import check_resume_is_exact

SR = 8000


def tiny_vae(seed=0):
    torch.manual_seed(seed)
    return OobleckVAE(OobleckConfig(encoder_hidden_size=8, downsampling_ratios=(2, 4), channel_multiples=(1, 2),
                                    decoder_channels=8, decoder_input_channels=4, audio_channels=1, sampling_rate=SR))


class Tones(torch.utils.data.Dataset):
    """Sines of a few pitches and lengths (one silent item, to exercise the silence guard)."""

    def __len__(self):
        return 64

    def __getitem__(self, i):
        n = 200 + 37 * (i % 7)
        if i % 9 == 4:
            return {"audio": torch.zeros(1, n)}
        f = 200.0 * 2 ** ((i % 5) / 3)
        t = torch.arange(n) / SR
        return {"audio": (0.5 * torch.sin(2 * math.pi * f * t))[None]}


def _cfg(out, steps, **kw):
    base = dict(out_dir=str(out), steps=steps, batch_size=4, lr=3e-3, crop_seconds=0.032, log_every=1,
                ckpt_every=100, progress=False)
    base.update(kw)
    return VAETrainConfig(**base)


def test_kl_matches_closed_form():
    mean, std = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 0.5, 2.0])
    expect = torch.distributions.kl_divergence(torch.distributions.Normal(mean, std),
                                               torch.distributions.Normal(0.0, 1.0)).mean()
    torch.testing.assert_close(kl_to_standard_normal(mean, std), expect)
    assert float(kl_to_standard_normal(torch.zeros(4), torch.ones(4))) == 0.0


def test_random_crop_and_collate():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(10.0)[None]
    c = random_crop(x, 4, g)
    assert c.shape == (1, 4) and torch.equal(c[0], torch.arange(c[0, 0].item(), c[0, 0].item() + 4))
    assert torch.equal(random_crop(x, 12, g), torch.cat([x, torch.zeros(1, 2)], 1))  # short: zero-padded
    items = [{"audio": torch.randn(1, 50), "index": 3}, {"audio": torch.randn(2, 20), "index": 5}]
    b = collate_crops(items, crop=32, channels=1, seed=1)
    assert b["audio"].shape == (2, 1, 32) and b["index"].tolist() == [3, 5]
    # the crop of an index is a function of (seed, index): the same in any batch
    b2 = collate_crops(items[:1], crop=32, channels=1, seed=1)
    assert torch.equal(b["audio"][0], b2["audio"][0])
    with pytest.raises(ValueError, match="collate_crops"):
        collate_crops([{"audio": torch.randn(3, 20), "index": 0}], crop=8, channels=2, seed=0)
    with pytest.raises(ValueError, match="collate_crops"):
        collate_crops([], crop=8, channels=1, seed=0)


def test_peak_normalised_crops():
    items = [{"audio": 0.01 * torch.randn(1, 400), "index": i} for i in range(6)] + [{"audio": torch.zeros(1, 400), "index": 9}]
    b = collate_crops(items, crop=64, channels=1, seed=0, peak_db=(-12.0, -6.0))
    peaks = b["audio"][:6].abs().amax(dim=(1, 2))
    assert ((peaks >= 10 ** (-12 / 20) - 1e-6) & (peaks <= 10 ** (-6 / 20) + 1e-6)).all(), peaks
    assert len(set(peaks.tolist())) > 1  # a level drawn per item
    assert b["audio"][6].abs().max() == 0  # silence stays silent
    with pytest.raises(ValueError, match="peak_db"):
        VAETrainConfig(out_dir="x", steps=1, peak_db=(-6.0, 3.0))


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="crop_seconds"):
        _cfg(tmp_path, 1, crop_seconds=0)
    with pytest.raises(ValueError, match="kl_weight"):
        _cfg(tmp_path, 1, kl_weight=-1)
    with pytest.raises(ValueError, match="at least one"):
        _cfg(tmp_path, 1, l1_weight=0, stft_weight=0, mel_weight=0)
    with pytest.raises(ValueError, match="unknown keys"):
        VAETrainConfig.from_dict({"out_dir": "x", "steps": 1, "crop": 1})
    with pytest.raises(TypeError, match="OobleckVAE"):
        VAETrainer(torch.nn.Linear(2, 2), _cfg(tmp_path, 1), Tones())


def test_loss_goes_down_and_final_weights(tmp_path):
    import json

    trainer = VAETrainer(tiny_vae(), _cfg(tmp_path, 40), Tones())
    assert trainer.crop % trainer.vae.hop_length == 0
    trainer.fit()
    logs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    first = sum(r["loss"] for r in logs[:5]) / 5
    last = sum(r["loss"] for r in logs[-5:]) / 5
    assert all(math.isfinite(r["loss"]) for r in logs)  # the silent items do not blow up the STFT term
    assert last < 0.8 * first, (first, last)
    weights = load_file(tmp_path / "final.safetensors")
    assert set(weights) == set(tiny_vae().state_dict())  # the VAE's own keys: loadable as a VAE
    vae = tiny_vae(1)
    vae.load_state_dict(weights)


def test_resume_is_exact(tmp_path):
    """Stopped after step 3 (last checkpoint at step 2) and resumed: the same weights as an
    uninterrupted run (posterior samples, crops and the bf16 autocast path included)."""
    def make(out):
        return VAETrainer(tiny_vae(), _cfg(out, 5, ckpt_every=2, precision="bf16", ema_decay=0.9), Tones())

    check_resume_is_exact(make, tmp_path)
