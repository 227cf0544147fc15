"""Regenerate the ivanvovk/WaveGrad test vectors in this folder (not run by the test suite).

Needs a copy of https://github.com/ivanvovk/WaveGrad (its ``model/`` package) outside this
repository; none of its code is stored here. Usage:

    python tests/data/wavegrad/make_ivanvovk_vectors.py /path/to/WaveGrad

Writes ``ivanvovk_small/``: ``config.json`` (its JSON format, a reduced network), ``checkpoint_1.pt``
(``{'model': state_dict}`` with every parameter perturbed away from its initialisation, and the
noise-schedule buffers its model registers) and ``vectors.pt`` (network inputs/output and a
6-iteration generation with injected noise).
"""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

CONFIG = {
    "model_config": {
        "factors": [5, 3, 2],
        "upsampling_preconv_out_channels": 24,
        "upsampling_out_channels": [16, 12, 8],
        "upsampling_dilations": [[1, 2, 1, 2], [1, 2, 4, 8], [1, 2, 4, 8]],
        "downsampling_preconv_out_channels": 32,
        "downsampling_out_channels": [12, 16],
        "downsampling_dilations": [[1, 2, 4], [1, 2, 4]],
    },
    "data_config": {
        "sample_rate": 22050, "n_fft": 64, "win_length": 64, "hop_length": 30,
        "f_min": 80.0, "f_max": 8000, "n_mels": 10,
    },
    "training_config": {"training_noise_schedule": {"n_iter": 1000, "betas_range": [1e-6, 0.01]}},
}
BETAS_6 = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]


def _ns(obj):
    if isinstance(obj, dict):
        return SimpleNamespace(**{k: _ns(v) for k, v in obj.items()})
    return obj


def main(peer: str) -> None:
    if not hasattr(np, "product"):  # removed in numpy 2; the peer still calls it
        np.product = np.prod
    sys.path.insert(0, peer)
    from model import WaveGrad  # the peer's package

    out = Path(__file__).parent / "ivanvovk_small"
    out.mkdir(exist_ok=True)
    torch.manual_seed(1234)
    model = WaveGrad(_ns(CONFIG)).eval()
    with torch.no_grad():
        for p in model.parameters():  # no layer left at its (zero-bias) initialisation
            p.add_(0.05 * torch.randn_like(p))
    betas = torch.tensor(BETAS_6, dtype=torch.float32)
    model.set_new_noise_schedule(init=lambda **kw: betas, init_kwargs={"steps": len(BETAS_6)})
    torch.save({"iteration": 1, "model": model.state_dict()}, out / "checkpoint_1.pt")
    (out / "config.json").write_text(json.dumps(CONFIG, indent=1))

    batch, frames, hop = 2, 7, 30
    mel = torch.randn(batch, 10, frames)
    audio = torch.randn(batch, frames * hop).clamp(-1, 1)
    level = torch.tensor([0.35, 0.9])
    with torch.no_grad():
        net_out = model.nn(mel, audio, level[:, None])
        gen_noise = torch.randn(len(BETAS_6), batch, frames * hop)
        queue = list(gen_noise)
        real_randn, real_randn_like = torch.randn, torch.randn_like
        torch.randn = lambda *a, **k: queue.pop(0).clone()
        torch.randn_like = lambda y, **k: queue.pop(0).clone()
        try:
            gen_out = model.sample(mel)
        finally:
            torch.randn, torch.randn_like = real_randn, real_randn_like
        assert not queue
    torch.save(
        {"mel": mel, "audio": audio, "noise_level": level, "net_out": net_out, "betas": betas,
         "gen_noise": gen_noise, "gen_out": gen_out},
        out / "vectors.pt",
    )
    print("net_out absmax", net_out.abs().max().item(), "gen_out absmax", gen_out.abs().max().item())


if __name__ == "__main__":
    main(sys.argv[1])
