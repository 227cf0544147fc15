"""``pysonic vocode``: mel filelists and audio round trips with a tiny saved WaveGrad."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pysonic.audio import load_audio, save_audio
from pysonic.cli import main
from pysonic.models.wavegrad import MelConfig, WaveGrad, WaveGradConfig

HOP = 12


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    mel = MelConfig(n_fft=64, win_length=64, hop_length=HOP, n_mels=6, f_min=20.0, f_max=8000.0)
    cfg = WaveGradConfig(
        n_mels=6, factors=[3, 2, 2], upsampling_preconv_out_channels=16, upsampling_out_channels=[12, 8, 8],
        upsampling_dilations=[[1, 2, 1, 2]] * 3, downsampling_preconv_out_channels=8,
        downsampling_out_channels=[8, 12], downsampling_dilations=[[1, 2, 4]] * 2, mel=mel,
    )
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("wavegrad")
    WaveGrad(cfg).save_pretrained(directory)
    return directory


def test_mel_filelist(checkpoint, tmp_path, capsys):
    torch.manual_seed(1)
    np.save(tmp_path / "a.npy", torch.randn(6, 7).numpy())
    torch.save(torch.randn(1, 6, 5), tmp_path / "b.pt")
    (tmp_path / "list.txt").write_text(f"a.npy\n\n{tmp_path / 'b.pt'}\n")
    out = tmp_path / "out"
    rc = main(["vocode", "--checkpoint", str(checkpoint), "--mel-filelist", str(tmp_path / "list.txt"),
               "--iterations", "3", "--schedule", "linear", "--out", str(out), "--seed", "0", "--no-progress"])
    assert rc == 0
    a, sr = load_audio(out / "a.wav")
    b, _ = load_audio(out / "b.wav")
    assert sr == 22050 and a.shape == (1, 7 * HOP) and b.shape == (1, 5 * HOP)
    assert a.abs().max() > 0
    assert "RTF" in capsys.readouterr().out
    # Same seed, same mel: the same audio as the library call (to 16-bit PCM rounding).
    model = WaveGrad.from_pretrained(checkpoint)
    ref = model.generate(torch.from_numpy(np.load(tmp_path / "a.npy"))[None], 3, "linear",
                         generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a[0], ref[0], atol=2 / 32768, rtol=0)


def test_audio_round_trip(checkpoint, tmp_path):
    t = torch.arange(1000) / 22050
    save_audio(tmp_path / "in.wav", 0.5 * torch.sin(2 * math.pi * 440 * t), 22050, normalize=None)
    rc = main(["vocode", str(tmp_path / "in.wav"), "--checkpoint", str(checkpoint), "-o", str(tmp_path / "o.wav"),
               "--iterations", "2", "--schedule", "fibonacci", "--no-progress", "--dtype", "bf16"])
    assert rc == 0
    out, sr = load_audio(tmp_path / "o.wav")
    assert sr == 22050 and out.shape == (1, 1000) and torch.isfinite(out).all()


def test_schedule_file(checkpoint, tmp_path):
    from pysonic.models.wavegrad import save_schedule

    save_schedule(tmp_path / "s.json", [1e-3, 0.1])
    np.save(tmp_path / "m.npy", torch.randn(6, 4).numpy())
    (tmp_path / "l.txt").write_text("m.npy\n")
    rc = main(["vocode", "--checkpoint", str(checkpoint), "--mel-filelist", str(tmp_path / "l.txt"),
               "--iterations", "2", "--schedule", str(tmp_path / "s.json"), "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 0 and (tmp_path / "o" / "m.wav").is_file()


@pytest.mark.parametrize("args, message", [
    ([], "either IN.wav"),
    (["x.wav"], "-o OUT.wav is required"),
    (["--mel-filelist", "nope.txt", "--out", "o"], "mel filelist not found"),
    (["--mel-filelist", "bad.txt", "--out", "o", "--schedule", "linear"], "5 bands but this model takes n_mels=6"),
    (["--mel-filelist", "bad.txt", "--out", "o", "--iterations", "9"], "no noise schedule for 9 iterations"),
    (["--mel-filelist", "bad.txt", "--out", "o", "--schedule", "nope.json"], "--schedule: file not found"),
    (["--mel-filelist", "wrongext.txt", "--out", "o", "--schedule", "linear"], "must be .npy or .pt"),
])
def test_errors(checkpoint, tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "five.npy", np.zeros((5, 4), dtype=np.float32))
    (tmp_path / "bad.txt").write_text("five.npy\n")
    (tmp_path / "wrongext.txt").write_text("mel.txt\n")
    (tmp_path / "mel.txt").write_text("0 1 2\n")
    assert main(["vocode", "--checkpoint", str(checkpoint), *args]) == 2
    assert message in capsys.readouterr().err
