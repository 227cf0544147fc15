"""Codec training: losses, discriminator, balancer, and the trainer end to end on a tiny codec
(loss goes down, exact resume, DDP with 2 CPU processes on gloo, export, command line)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from pysonic.codecs.encodec import EncodecModel
from pysonic.train.balancer import Balancer
from pysonic.train.codec import CodecTrainConfig, CodecTrainer, load_config
from pysonic.train.discriminators import MultiScaleSTFTDiscriminator
from pysonic.train.losses import (MultiResolutionSTFTLoss, MultiScaleMelLoss, feature_matching_loss,
                                  hinge_discriminator_loss, hinge_generator_loss, mel_filterbank, waveform_l1)

REPO = Path(__file__).resolve().parents[2]
SR = 8000
# a tiny EnCodec: 4 filters, 16-dim latent, hop 16, one LSTM layer, 2 codebooks of 64 (3 kbps each)
TINY = dict(sample_rate=SR, n_filters=4, dimension=16, ratios=[4, 4], lstm=1, bins=64, target_bandwidths=[3.0, 6.0])


@pytest.fixture(autouse=True)
def _plain_cpu_kernels():
    # oneDNN JIT-compiles a primitive per new conv/LSTM shape (seconds each on a loaded machine)
    with torch.backends.mkldnn.flags(enabled=False):
        yield


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio")
    rng = np.random.default_rng(0)
    t = np.arange(SR) / SR
    for i in range(6):
        x = 0.4 * np.sin(2 * np.pi * (200 + 100 * i) * t) + 0.02 * rng.standard_normal(SR)
        sf.write(root / f"tone{i}.wav", x.astype(np.float32), SR)
    return root


def _config(out, data, steps, **kw) -> CodecTrainConfig:
    base = dict(out_dir=str(out), steps=steps, batch_size=4, lr=3e-3, log_every=1, ckpt_every=100, progress=False,
                data_dir=str(data), model_overrides=dict(TINY), segment_seconds=0.1, crops_per_file=2,
                disc_filters=4, disc_n_ffts=[64, 128, 32], mel_range=[5, 9], n_mels=16, dead_code_threshold=1.0)
    base.update(kw)
    return CodecTrainConfig(**base)


def _log(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------- losses
def test_losses_zero_on_identical_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 4000, generator=g) * 0.3
    y = x + 0.1 * torch.randn(2, 1, 4000, generator=g)
    mel = MultiScaleMelLoss(SR, range_start=5, range_end=9, n_mels=16)
    stft = MultiResolutionSTFTLoss([(64, 16), (128, 32)])
    for loss in (waveform_l1, mel, stft):
        assert float(loss(x, x)) == pytest.approx(0.0, abs=1e-6)
        assert float(loss(y, x)) > 1e-3
        assert float(loss(torch.cat([y, y[..., :7]], -1), x)) == pytest.approx(float(loss(y, x)))  # cropped to target
    assert float(waveform_l1(y, x)) == pytest.approx(float((y - x).abs().mean()))
    with pytest.raises(ValueError, match="fewer than"):
        waveform_l1(x[..., :10], x)
    with pytest.raises(ValueError, match=r"\[B, C, N\]"):
        mel(x[0], x[0])


def test_mel_filterbank():
    fb = mel_filterbank(256, 16, SR)
    assert fb.shape == (16, 129) and float(fb.min()) >= 0 and float(fb.max()) <= 1.0
    peaks = fb.argmax(dim=1)
    assert bool((peaks[1:] > peaks[:-1]).all())  # filters ordered by frequency
    assert bool((fb.sum(0)[1:-1] > 0).all())  # every inner FFT bin is covered


def test_adversarial_losses():
    real, fake = [torch.tensor([2.0, 0.5])], [torch.tensor([-2.0, 0.5])]
    # relu(1 - real) = [0, 0.5] -> 0.25 ; relu(1 + fake) = [0, 1.5] -> 0.75
    assert float(hinge_discriminator_loss(real, fake)) == pytest.approx(1.0)
    assert float(hinge_generator_loss(fake)) == pytest.approx((3.0 + 0.5) / 2)
    r = [[torch.ones(2, 3), 2 * torch.ones(2, 3)]]
    f = [[torch.zeros(2, 3), 2 * torch.ones(2, 3)]]
    assert float(feature_matching_loss(r, f)) == pytest.approx(0.5)  # layer terms 1 and 0
    f2 = [[torch.stack([torch.zeros(3), torch.ones(3)]), 2 * torch.ones(2, 3)]]
    assert float(feature_matching_loss(r, f2, per_item=True)) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        hinge_generator_loss([])


def test_discriminator_shapes_and_gradient():
    torch.manual_seed(0)
    disc = MultiScaleSTFTDiscriminator(channels=2, filters=4, n_ffts=(64, 128, 32))
    wav = torch.randn(3, 2, 800, requires_grad=True)
    logits, feats = disc(wav)
    assert len(logits) == len(feats) == 3 and all(len(f) == 5 for f in feats)
    assert all(lg.shape[0] == 3 and lg.shape[1] == 1 for lg in logits)
    hinge_generator_loss(logits).backward()
    assert wav.grad is not None and torch.isfinite(wav.grad).all() and wav.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\[B, 2, N\]"):
        disc(torch.randn(1, 1, 800))


def test_balancer_shares_the_gradient_by_weight():
    y = torch.randn(4, 1, 50, requires_grad=True)
    big = 1000 * y.pow(2).mean()  # a loss with a huge gradient scale
    small = 1e-3 * y.mean()
    bal = Balancer({"big": 1.0, "small": 3.0})
    g = bal.gradient({"big": big, "small": small}, y)
    gb = torch.autograd.grad(big, y, retain_graph=True)[0]
    gs = torch.autograd.grad(small, y, retain_graph=True)[0]
    nb, ns = gb.flatten(1).norm(dim=1).mean(), gs.flatten(1).norm(dim=1).mean()
    # first step: the averages equal the current norms; each loss gets its weight's share of a
    # unit-norm (per item) gradient, divided by the batch (a batch mean)
    expected = (0.25 * gb / nb + 0.75 * gs / ns) / 4
    torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-9)
    plain = Balancer({"big": 1.0, "small": 3.0}, balance_grads=False).gradient({"big": big, "small": small}, y)
    torch.testing.assert_close(plain, gb + 3 * gs)
    # the moving averages are state (checkpointed): a restored balancer gives the same next gradient
    clone = Balancer({"big": 1.0, "small": 3.0})
    clone.load_state_dict(bal.state_dict())
    big2 = 500 * y.pow(2).mean()
    torch.testing.assert_close(clone.gradient({"big": big2, "small": small}, y), bal.gradient({"big": big2, "small": small}, y))
    with pytest.raises(ValueError, match="no weight"):
        bal.gradient({"other": small}, y)


# ---------------------------------------------------------------------------- trainer
def test_trainer_loss_goes_down_and_exports(audio_dir, tmp_path):
    # reconstruction only (no discriminator) so the curve is not a two-player game's
    out = tmp_path / "run"
    trainer = CodecTrainer(_config(out, audio_dir, 20, lr=5e-3, adversarial=False, bandwidth_sampling=False))
    trainer.fit()
    recs = _log(out)
    assert [r["step"] for r in recs] == list(range(1, 21))
    first = sum(r["mel"] for r in recs[:3]) / 3
    last = sum(r["mel"] for r in recs[-3:]) / 3
    assert last < 0.75 * first, (first, last)  # measured ~75 -> ~38-50 (random crops make it noisy)
    assert {"l1", "mel", "commit", "codebook_usage", "dead_codes_replaced", "grad_norm", "lr"} <= set(recs[0])
    # the export is a transformers-layout EnCodec the inference model (and the CLI) load
    model = EncodecModel.from_pretrained(out / "encodec")
    assert model.sample_rate == SR and model.bandwidths == (3.0, 6.0)
    trained = trainer.model.codec.eval()
    wav = 0.3 * torch.randn(1, 1, 800)
    assert torch.equal(model.encode(wav), trained.encode(wav))
    assert (out / "final.safetensors").is_file() and latest_checkpoint_name(out) == "step_20.pt"


def latest_checkpoint_name(out) -> str:
    from pysonic.train import latest_checkpoint

    return latest_checkpoint(out).name


class _Stop(CodecTrainer):
    def on_log(self, step, logs):
        if step == 3:
            raise KeyboardInterrupt("stopped")


def test_gan_training_resumes_exactly(audio_dir, tmp_path):
    """With the discriminator, balancer, bandwidth sampling and dead-code replacement: stopped
    at step 3 (last checkpoint: step 2) and resumed == an uninterrupted run, bit for bit."""
    cfg = dict(ckpt_every=2, ema_decay=0.9)
    whole = CodecTrainer(_config(tmp_path / "whole", audio_dir, 4, **cfg))
    whole.fit()
    recs = _log(tmp_path / "whole")
    for key in ("d_loss", "adv", "feat", "grad_norm_mel", "n_q"):
        assert all(math.isfinite(r[key]) for r in recs), key
    assert {r["n_q"] for r in recs} <= {1.0, 2.0}
    with pytest.raises(KeyboardInterrupt):
        _Stop(_config(tmp_path / "cut", audio_dir, 4, **cfg)).fit()
    assert latest_checkpoint_name(tmp_path / "cut") == "step_2.pt"
    torch.manual_seed(1234)  # the resumed run must not depend on the global RNG at start
    CodecTrainer(_config(tmp_path / "cut", audio_dir, 4, **cfg)).fit()
    a = load_file(str(tmp_path / "whole" / "final.safetensors"))
    b = load_file(str(tmp_path / "cut" / "final.safetensors"))
    assert set(a) == set(b) and any("cluster_size" in k for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    ck = torch.load(tmp_path / "cut" / "checkpoints" / "step_4.pt", weights_only=True)
    assert {"disc", "disc_opt", "balancer"} <= set(ck["extra"])


def test_bf16_autocast_runs(audio_dir, tmp_path):
    # bf16 autocast through the codec, the quantiser (fp32 distances and EMA) and the discriminator
    CodecTrainer(_config(tmp_path, audio_dir, 2, precision="bf16")).fit()
    recs = _log(tmp_path)
    assert len(recs) == 2 and all(math.isfinite(r[k]) for r in recs for k in ("mel", "adv", "feat", "d_loss", "commit"))


def test_config_errors(audio_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown keys"):
        CodecTrainConfig.from_dict({"out_dir": "x", "steps": 1, "stepz": 2})
    with pytest.raises(ValueError, match="model must be one of"):
        _config(tmp_path, audio_dir, 1, model="encodec_96khz")
    with pytest.raises(ValueError, match="unknown EncodecConfig fields"):
        _config(tmp_path, audio_dir, 1, model_overrides={"filterz": 3})
    with pytest.raises(ValueError, match="grad_accum"):
        _config(tmp_path, audio_dir, 1, grad_accum=2)
    with pytest.raises(ValueError, match="data_dir"):
        CodecTrainer(_config(tmp_path, "", 1))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot parse"):
        load_config(bad)


def _write_config(path, out, data, steps, **kw) -> Path:
    cfg = _config(out, data, steps, **kw).to_dict()
    path.write_text(json.dumps(cfg))
    return path


def test_command_line(audio_dir, tmp_path, capsys):
    from pysonic.cli import main

    cfg = _write_config(tmp_path / "c.json", tmp_path / "ignored", audio_dir, 50, adversarial=False)
    assert main(["train", "codec", "--config", str(cfg), "--set", "steps=2", "--set", f"out_dir={tmp_path / 'cli'}"]) == 0
    assert [r["step"] for r in _log(tmp_path / "cli")] == [1, 2]
    assert (tmp_path / "cli" / "encodec" / "config.json").is_file()
    assert main(["train", "codec", "--config", str(cfg), "--set", "nonsense"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert main(["train", "codec", "--config", str(cfg), "--set", "lr_decay=sometimes"]) == 2
    assert "lr_decay" in capsys.readouterr().err
    # the shipped example config parses (YAML)
    example = load_config(REPO / "configs" / "codec" / "encodec_24khz.yaml")
    assert example.model == "encodec_24khz" and example.encodec_config().sample_rate == 24_000


def test_ddp_two_processes_match_one(audio_dir, tmp_path):
    """torchrun, 2 CPU processes on gloo with batch 2 each == 1 process with batch 4 at the first
    step: the quantiser's EMA statistics and the balancer's norms are summed/averaged over the
    processes, and every loss is a mean of per-item terms, so the all-reduced gradients agree.
    Data initialisation and dead-code replacement draw codes from rank 0's own batch (then share
    them), so they are off here. After the first step Adam moves elements whose gradient is ~0 by
    about +-lr depending on rounding, so later steps are compared loosely."""
    kw = dict(dead_code_threshold=0.0, codebook_data_init=False, ckpt_every=2)
    port = 29500 + (os.getpid() + 7) % 1000
    cfg2 = _write_config(tmp_path / "ddp.json", tmp_path / "ddp", audio_dir, 2, batch_size=2, **kw)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           "-m", "pysonic.train.codec", "--config", str(cfg2)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    cfg1 = _write_config(tmp_path / "one.json", tmp_path / "one", audio_dir, 2, batch_size=4, **kw)
    out = subprocess.run([sys.executable, "-m", "pysonic.train.codec", "--config", str(cfg1)], cwd=REPO,
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    (a1, a2), (b1, b2) = _log(tmp_path / "ddp"), _log(tmp_path / "one")
    # step 1, before any update: losses and the discriminator's all-reduced gradient norm (fp32
    # summation order only)
    for key in ("l1", "mel", "commit", "d_loss", "d_grad_norm"):
        assert a1[key] == pytest.approx(b1[key], rel=1e-5), key
    # the codec's gradient also went through the discriminator after its first Adam step
    assert a1["grad_norm"] == pytest.approx(b1["grad_norm"], rel=1e-3)
    for key in ("l1", "mel", "commit", "d_loss"):
        assert a2[key] == pytest.approx(b2[key], rel=1e-3), key
    # the EMA codebooks were updated from statistics summed over both processes
    a, b = load_file(str(tmp_path / "ddp" / "final.safetensors")), load_file(str(tmp_path / "one" / "final.safetensors"))
    for k in ("codec.quantizer.codebooks", "codec.quantizer.cluster_size", "codec.quantizer.embed_sum"):
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    ck = torch.load(tmp_path / "ddp" / "checkpoints" / "step_2.pt", weights_only=True)
    assert len(ck["rng"]) == 2
