"""``pysonic generate`` on a tiny TangoFlux release (the package's model at random init)."""
from __future__ import annotations

import pytest
import torch

import pysonic
from pysonic.cli import main
from pysonic.cli.generate import output_paths
from tests.models.tangoflux.release import TINY_VAE, shared_release


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    path, t5, _, _ = shared_release(tmp_path_factory, vae_layout="dir")  # diffusers vae/ folder: its config is read
    return path, t5


def _args(release, out, *extra):
    ckpt, t5 = release
    return ["generate", "rain on a roof", "-o", str(out), "--checkpoint", str(ckpt), "--text-encoder", str(t5),
            "--duration", "2", "--steps", "2", "--no-progress", *extra]


def test_generate_writes_seeded_audio(release, tmp_path, capsys):
    assert main(_args(release, tmp_path / "a.wav", "--seed", "3", "--normalize", "none")) == 0
    assert str(tmp_path / "a.wav") in capsys.readouterr().out
    a, sr = pysonic.load_audio(tmp_path / "a.wav")
    assert sr == TINY_VAE["sampling_rate"] and a.shape == (2, 2 * sr)
    # the same as the API with the same seed (16-bit PCM file)
    pipe = pysonic.TangoFlux.from_pretrained(release[0], text_encoder=release[1])
    ref = pipe.generate("rain on a roof", duration=2, steps=2, generator=torch.Generator().manual_seed(3), progress=False)
    assert (a - ref[0].clamp(-1, 1)).abs().max().item() < 1e-4
    assert main(_args(release, tmp_path / "b.wav", "--seed", "4")) == 0
    b, _ = pysonic.load_audio(tmp_path / "b.wav")
    assert not torch.allclose(a, b) and abs(b.abs().max().item() - 0.99) < 1e-3  # peak-normalised by default


def test_generate_several_outputs(release, tmp_path):
    assert main(_args(release, tmp_path / "x.flac", "--num-samples", "2", "--seed", "0", "--scheduler", "heun")) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_0.flac", "x_1.flac"]
    assert output_paths("d/o.wav", 1)[0].name == "o.wav"


def test_generate_errors(release, tmp_path, capsys):
    assert main(_args(release, tmp_path / "a.wav", "--duration", "45")) == 2
    assert "duration" in capsys.readouterr().err
    ckpt, t5 = release
    assert main(["generate", "x", "-o", str(tmp_path / "a.wav"), "--text-encoder", str(t5)]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    assert main(["generate", "x", "-o", str(tmp_path / "a.wav"), "--checkpoint", str(tmp_path), "--text-encoder", str(t5)]) == 2
    assert "config.json" in capsys.readouterr().err
    assert main(_args(release, tmp_path / "no" / "a.wav")) == 2
    assert "output directory" in capsys.readouterr().err
