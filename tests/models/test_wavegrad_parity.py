"""WaveGrad parity with the two peer implementations at random initialisation.

* LMNT ``wavegrad`` package (test-only dependency, installed with --no-deps): its model is
  built here, saved in its own checkpoint format and loaded with ``WaveGrad.from_pretrained``;
  generation runs its own ``inference.predict`` with the noise injected.
* ivanvovk/WaveGrad (not packaged): stored vectors made by its own code
  (``tests/data/wavegrad/make_ivanvovk_vectors.py``) with a reduced network.
"""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from pysonic.checkpoints import CheckpointError
from pysonic.models.wavegrad import WaveGrad, WaveGradNet, from_ivanvovk_json, ivanvovk_default, lmnt_default

DATA = Path(__file__).resolve().parents[1] / "data" / "wavegrad" / "ivanvovk_small"

NET_ATOL = 1e-4  # fp32 network output, max abs (the bound)
GEN_ATOL = 1e-3  # 6-iteration generation with the same injected noise, max abs (the bound)
BETAS_6 = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py


def _fast_orthogonal(tensor, gain=1.0):
    """Stand-in for nn.init.orthogonal_ (a QR per layer, ~1 min for the full model on a busy CPU):
    same per-row scale, no orthogonality. Parity does not depend on which random weights are used."""
    fan_in = tensor[0].numel()
    with torch.no_grad():
        return tensor.normal_(0.0, gain / fan_in**0.5)


def _perturb(module: torch.nn.Module, std: float) -> None:
    """Move every parameter off its initialisation (the peers zero their biases)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn_like(p))


@pytest.fixture(scope="module")
def lmnt_checkpoint(tmp_path_factory):
    lmnt_model = pytest.importorskip("wavegrad.model", reason="LMNT wavegrad package not installed")
    from wavegrad.params import AttrDict, params

    torch.manual_seed(7)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.init, "orthogonal_", _fast_orthogonal)
        peer = lmnt_model.WaveGrad(AttrDict(params)).eval()
    _perturb(peer, 0.01)
    directory = tmp_path_factory.mktemp("lmnt")
    # The package's own checkpoint layout (wavegrad/learner.py `state_dict`).
    torch.save({"step": 0, "model": peer.state_dict(), "params": dict(params)}, directory / "weights.pt")
    return peer, directory


def test_lmnt_network_parity(lmnt_checkpoint):
    peer, directory = lmnt_checkpoint
    ours = WaveGrad.from_pretrained(directory)
    assert ours.config.n_mels == 128 and ours.hop_length == 300
    g = torch.Generator().manual_seed(1)
    mel = torch.rand(2, 128, 3, generator=g)
    audio = torch.randn(2, 900, generator=g).clamp(-1, 1)
    level = torch.tensor([0.3, 0.85])
    with torch.no_grad():
        expected = peer(audio, mel, level).squeeze(1)
        got = ours.net(audio, mel, level)
    assert expected.abs().max() > 0.05  # a live network, not a zero output
    torch.testing.assert_close(got, expected, atol=NET_ATOL, rtol=0)


def test_lmnt_generation_parity(lmnt_checkpoint, monkeypatch):
    peer, directory = lmnt_checkpoint
    # The package's inference module imports torchaudio only to write files; stub it.
    monkeypatch.setitem(sys.modules, "torchaudio", types.ModuleType("torchaudio"))
    monkeypatch.setattr(torch.nn.init, "orthogonal_", _fast_orthogonal)  # predict() builds its own model
    inference = pytest.importorskip("wavegrad.inference")
    g = torch.Generator().manual_seed(2)
    mel = torch.rand(2, 128, 3, generator=g)
    noise = torch.randn(6, 2, 900, generator=g)
    queue = list(noise)
    monkeypatch.setattr(torch, "randn", lambda *a, **k: queue.pop(0).clone())
    monkeypatch.setattr(torch, "randn_like", lambda x, **k: queue.pop(0).clone())
    expected, sr = inference.predict(mel, model_dir=str(directory), params={"noise_schedule": BETAS_6}, device=torch.device("cpu"))
    monkeypatch.undo()
    assert not queue and sr == 22050

    ours = WaveGrad.from_pretrained(directory / "weights.pt")
    got = ours.generate(mel, iterations=6, schedule=BETAS_6, noise=noise)
    assert got.shape == (2, 900)
    assert (expected.abs() < 0.999).float().mean() > 0.2  # not all clamped: the comparison sees the values
    torch.testing.assert_close(got, expected, atol=GEN_ATOL, rtol=0)


def _ivanvovk():
    vectors = torch.load(DATA / "vectors.pt", weights_only=True)
    return WaveGrad.from_pretrained(DATA), vectors


def test_ivanvovk_network_parity():
    ours, v = _ivanvovk()
    assert ours.config.interpolation == "linear" and ours.config.pe_scale == 5000.0
    with torch.no_grad():
        got = ours.net(v["audio"], v["mel"], v["noise_level"])
    torch.testing.assert_close(got, v["net_out"], atol=NET_ATOL, rtol=0)


def test_ivanvovk_generation_parity():
    ours, v = _ivanvovk()
    got = ours.generate(v["mel"], iterations=6, schedule=v["betas"], noise=v["gen_noise"])
    assert (v["gen_out"].abs() < 0.999).float().mean() > 0.2
    torch.testing.assert_close(got, v["gen_out"], atol=GEN_ATOL, rtol=0)


def test_ivanvovk_checkpoint_file_and_config():
    ours = WaveGrad.from_pretrained(DATA / "checkpoint_1.pt")  # the file; config.json found beside it
    cfg = from_ivanvovk_json(json.loads((DATA / "config.json").read_text()))
    assert ours.config.factors == cfg.factors == [5, 3, 2] and ours.hop_length == 30


def test_default_configs_parameter_counts():
    # ivanvovk/WaveGrad README: 15,810,401 parameters; LMNT: 128 mel input channels instead of 80.
    assert sum(p.numel() for p in WaveGradNet(ivanvovk_default()).parameters()) == 15_810_401
    lmnt_model = pytest.importorskip("wavegrad.model")
    from wavegrad.params import AttrDict, params

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.init, "orthogonal_", _fast_orthogonal)
        peer = lmnt_model.WaveGrad(AttrDict(params))
    assert sum(p.numel() for p in WaveGradNet(lmnt_default()).parameters()) == sum(p.numel() for p in peer.parameters())


def test_mismatched_checkpoint_names_tensors(tmp_path):
    ckpt = torch.load(DATA / "checkpoint_1.pt", weights_only=True)
    state = dict(ckpt["model"])
    state.pop("nn.ublock_postconv.conv1d.bias")
    state["nn.extra.weight"] = torch.zeros(1)
    state["nn.dblock_preconv.conv1d.weight"] = torch.zeros(32, 1, 3)
    torch.save({"model": state}, tmp_path / "checkpoint_5.pt")
    (tmp_path / "config.json").write_text((DATA / "config.json").read_text())
    with pytest.raises(CheckpointError) as info:
        WaveGrad.from_pretrained(tmp_path)
    msg = str(info.value)
    assert "out_conv.bias" in msg and "nn.extra.weight" in msg and "audio_conv.weight" in msg


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        WaveGrad.from_pretrained(tmp_path)
