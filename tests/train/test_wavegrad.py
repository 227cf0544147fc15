"""WaveGrad trainer: the objective, loss going down, exact resume, ivanvovk configs, DDP on gloo."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pysonic.audio import save_audio
from pysonic.models.wavegrad import WaveGrad
from pysonic.train import wavegrad as W

REPO = Path(__file__).resolve().parents[2]
TINY = {  # hop 12: factors 3 * 2 * 2
    "n_mels": 6, "factors": [3, 2, 2], "upsampling_preconv_out_channels": 16, "upsampling_out_channels": [12, 8, 8],
    "upsampling_dilations": [[1, 2, 1, 2]] * 3, "downsampling_preconv_out_channels": 8,
    "downsampling_out_channels": [8, 12], "downsampling_dilations": [[1, 2, 4]] * 2,
    "mel": {"n_fft": 64, "win_length": 64, "hop_length": 12, "n_mels": 6, "f_min": 20.0, "f_max": 8000.0},
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py


@pytest.fixture(scope="module")
def filelists(tmp_path_factory):
    root = tmp_path_factory.mktemp("wavs")
    paths = []
    for i, f in enumerate([220.0, 330.0, 440.0, 550.0, 660.0, 770.0]):
        t = torch.arange(900 + 37 * i) / 22050
        save_audio(root / f"t{i}.wav", 0.5 * torch.sin(2 * math.pi * f * t), 22050, normalize=None)
        paths.append(str(root / f"t{i}.wav"))
    (root / "train.txt").write_text("\n".join(paths[:5]) + "\n")
    (root / "test.txt").write_text(paths[5] + "\n")
    return root


def _config(filelists, out_dir, steps, **train):
    return {
        "model": TINY,
        "data": {"train_filelist": str(filelists / "train.txt"), "test_filelist": str(filelists / "test.txt"),
                 "segment_length": 240},
        "train": {"out_dir": str(out_dir), "steps": steps, "batch_size": 4, "lr": 3e-3, "log_every": 1,
                  "ckpt_every": 100, "progress": False, **train},
        "test_every": 5,
    }


def _log(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]


def test_noise_levels_follow_the_training_schedule():
    levels = W.NoiseLevels(1000, (1e-6, 0.01))
    ab = torch.cumprod(1 - torch.linspace(1e-6, 0.01, 1000, dtype=torch.float64), 0)
    assert levels.bounds[0] == 1 and levels.bounds[-1] == pytest.approx(ab[-1].sqrt().item())
    torch.manual_seed(0)
    x = levels.sample(20000)
    assert x.dtype == torch.float32 and x.max() <= 1 and x.min() >= ab[-1].sqrt().item() - 1e-7
    # Continuous: uniform over steps, so about half the draws lie below the median step's level.
    mid = ab[499].sqrt().item()
    assert abs((x < mid).float().mean().item() - 0.5) < 0.02
    assert x.unique().numel() > 19000  # not 1000 discrete levels


def test_loss_goes_down_and_writes_a_loadable_model(filelists, tmp_path):
    cfg = _config(filelists, tmp_path / "run", 40, precision="bf16", lr_decay="exponential", lr_decay_gamma=0.99)
    last = W.train(cfg)
    log = [r for r in _log(tmp_path / "run") if "loss" in r]
    first5 = sum(r["loss"] for r in log[:5]) / 5
    last5 = sum(r["loss"] for r in log[-5:]) / 5
    assert last5 < 0.8 * first5, (first5, last5)  # L1 of the noise prediction falls
    assert log[-1]["lr"] == pytest.approx(3e-3 * 0.99 ** 40)
    assert all(r["grad_norm"] >= 0 for r in log)
    assert any("test_loss" in r for r in _log(tmp_path / "run"))
    assert math.isfinite(last["loss"])
    model = WaveGrad.from_pretrained(tmp_path / "run" / "model")
    wav = model.generate(torch.randn(1, 6, 4), 3, [1e-3, 1e-2, 0.2], generator=torch.Generator().manual_seed(0))
    assert wav.shape == (1, 48) and torch.isfinite(wav).all()


def test_exact_resume(filelists, tmp_path):
    W.train(_config(filelists, tmp_path / "straight", 6, ckpt_every=3))
    W.train(_config(filelists, tmp_path / "cut", 3, ckpt_every=3))  # "killed" after step 3
    W.train(_config(filelists, tmp_path / "cut", 6, ckpt_every=3))  # resumes from step_3.pt
    a = WaveGrad.from_pretrained(tmp_path / "straight" / "model").net.state_dict()
    b = WaveGrad.from_pretrained(tmp_path / "cut" / "model").net.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_ivanvovk_config_file(filelists, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ivan = {
        "model_config": {"factors": [3, 2, 2], "upsampling_preconv_out_channels": 16,
                         "upsampling_out_channels": [12, 8, 8], "upsampling_dilations": [[1, 2, 1, 2]] * 3,
                         "downsampling_preconv_out_channels": 32, "downsampling_out_channels": [8, 12],
                         "downsampling_dilations": [[1, 2, 4]] * 2},
        "data_config": {"sample_rate": 22050, "n_fft": 64, "win_length": 64, "hop_length": 12,
                        "f_min": 20.0, "f_max": 8000, "n_mels": 6},
        "training_config": {"logdir": "logs/ivan", "train_filelist_path": str(filelists / "train.txt"),
                            "test_filelist_path": str(filelists / "test.txt"), "batch_size": 2, "segment_length": 240,
                            "lr": 1e-3, "grad_clip_threshold": 1, "scheduler_step_size": 1, "scheduler_gamma": 0.9,
                            "use_fp16": True,
                            "training_noise_schedule": {"n_iter": 1000, "betas_range": [1e-6, 0.01]}},
    }
    (tmp_path / "ivan.json").write_text(json.dumps(ivan))
    cfg = W.from_ivanvovk_config(ivan, steps=2)
    assert cfg["train"]["precision"] == "bf16" and cfg["train"]["lr_decay_gamma"] == pytest.approx(0.9 ** 0.5)
    from pysonic.cli import main

    assert main(["train", "wavegrad", "--config", "ivan.json", "--steps", "2"]) == 0
    assert (tmp_path / "logs" / "ivan" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "logs" / "ivan" / "checkpoints" / "step_2.pt").is_file()


def test_bad_configs(filelists, tmp_path):
    with pytest.raises(ValueError, match="unknown config keys"):
        W.build({**_config(filelists, tmp_path, 1), "optimiser": {}})
    with pytest.raises(ValueError, match="multiple of the hop length"):
        cfg = _config(filelists, tmp_path, 1)
        W.build({**cfg, "data": {**cfg["data"], "segment_length": 250}})
    with pytest.raises(FileNotFoundError, match="filelist not found"):
        cfg = _config(filelists, tmp_path, 1)
        W.build({**cfg, "data": {**cfg["data"], "train_filelist": str(tmp_path / "nope.txt")}})
    with pytest.raises(ValueError, match="unknown keys"):
        cfg = _config(filelists, tmp_path, 1)
        W.build({**cfg, "train": {**cfg["train"], "learning_rate": 1}})
    with pytest.raises(ValueError, match="pass --steps"):
        W.from_ivanvovk_config({"training_config": {}}, steps=None)


def test_ddp_two_processes(filelists, tmp_path):
    """torchrun, 2 CPU processes on gloo: trains, checkpoints both ranks' RNG, writes one model."""
    (tmp_path / "cfg.json").write_text(json.dumps(_config(filelists, tmp_path / "ddp", 3, batch_size=2, ckpt_every=3)))
    port = 29500 + (os.getpid() + 7) % 1000
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           "-m", "pysonic", "train", "wavegrad", "--config", str(tmp_path / "cfg.json")]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    from pysonic.train import latest_checkpoint, load_checkpoint

    ck = load_checkpoint(latest_checkpoint(tmp_path / "ddp"))
    assert ck["step"] == 3 and len(ck["rng"]) == 2
    assert len([r for r in _log(tmp_path / "ddp") if "loss" in r]) == 3  # rank 0 logs alone
    WaveGrad.from_pretrained(tmp_path / "ddp" / "model")
