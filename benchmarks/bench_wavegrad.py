"""WaveGrad real-time factor (generation seconds / audio seconds) on CPU, beside the peers.

Default configuration (ivanvovk/WaveGrad's published network, 15.8M parameters; the LMNT
package's has 128 mel inputs instead of 80), random weights, one 2 s utterance, 2 threads.

impl:
  pysonic   ``WaveGrad.generate`` (fused diffusion steps; bf16 = bf16 weights and channels-last activations;
            the peers run bf16 under CPU autocast)
  lmnt      the LMNT ``wavegrad`` package's ``inference.predict`` (its model and loop)
  ivanvovk  ivanvovk/WaveGrad's ``WaveGrad.forward`` from a local copy of that repository whose
            path is in ``PYSONIC_WAVEGRAD_IVANVOVK`` (its code is not part of pysonic)

The original's documented table (Intel Xeon 2.3 GHz): 12 iterations RTF 4.55, 6 iterations
RTF 2.09. Environment: ``PYSONIC_WAVEGRAD_SECONDS`` (audio length, default 2),
``PYSONIC_WAVEGRAD_SLOW=1`` adds 25, 50, 100 and 1000 iterations (the default run, 6 and 12
iterations, takes a few minutes on 2 threads). Run:

    python -m pytest benchmarks/bench_wavegrad.py --benchmark-only -q
"""
from __future__ import annotations

import os
import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pysonic.models.wavegrad import WaveGrad, ivanvovk_default, lmnt_default

SECONDS = float(os.environ.get("PYSONIC_WAVEGRAD_SECONDS", "2"))
SAMPLE_RATE, HOP = 22050, 300
FRAMES = int(SECONDS * SAMPLE_RATE / HOP)
ITERATIONS = [6, 12] + ([25, 50, 100, 1000] if os.environ.get("PYSONIC_WAVEGRAD_SLOW") else [])
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IVANVOVK = os.environ.get("PYSONIC_WAVEGRAD_IVANVOVK")

# ivanvovk/WaveGrad configs/default.json, model and data parts (numbers, not code).
IVANVOVK_CONFIG = {
    "model_config": {
        "factors": [5, 5, 3, 2, 2], "upsampling_preconv_out_channels": 768,
        "upsampling_out_channels": [512, 512, 256, 128, 128],
        "upsampling_dilations": [[1, 2, 1, 2], [1, 2, 1, 2], [1, 2, 4, 8], [1, 2, 4, 8], [1, 2, 4, 8]],
        "downsampling_preconv_out_channels": 32, "downsampling_out_channels": [128, 128, 256, 512],
        "downsampling_dilations": [[1, 2, 4], [1, 2, 4], [1, 2, 4], [1, 2, 4]],
    },
    "data_config": {"sample_rate": 22050, "n_fft": 1024, "win_length": 1024, "hop_length": 300,
                    "f_min": 80.0, "f_max": 8000, "n_mels": 80},
}


def _betas(n: int) -> torch.Tensor:
    return torch.logspace(-6, -1, n, dtype=torch.float64)  # any valid schedule: cost does not depend on it


def _conv_flops(model: torch.nn.Module, run) -> float:
    """FLOPs of the Conv1d layers in one ``run()`` (2 per multiply-add), counted with hooks."""
    total = [0.0]

    def hook(mod, inp, out):
        total[0] += 2.0 * out.numel() * mod.in_channels // mod.groups * mod.kernel_size[0]

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv1d)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return total[0]


def _fast_orthogonal(tensor, gain=1.0):
    with torch.no_grad():
        return tensor.normal_(0.0, gain / tensor[0].numel() ** 0.5)


_CACHE: dict[str, object] = {}


def _pysonic():
    if "pysonic" not in _CACHE:
        torch.manual_seed(0)
        _CACHE["pysonic"] = WaveGrad(ivanvovk_default()).eval()
    return _CACHE["pysonic"]


def _lmnt(tmp_dir):
    if "lmnt" not in _CACHE:
        lmnt_model = pytest.importorskip("wavegrad.model", reason="LMNT wavegrad package not installed")
        sys.modules.setdefault("torchaudio", types.ModuleType("torchaudio"))  # imported by inference.py for file I/O only
        import wavegrad.inference as inference
        from wavegrad.params import AttrDict, params

        init = torch.nn.init.orthogonal_
        torch.nn.init.orthogonal_ = _fast_orthogonal  # QR init of 16M weights takes a minute; values do not matter here
        try:
            torch.manual_seed(0)
            model = lmnt_model.WaveGrad(AttrDict(params))
            torch.save({"model": model.state_dict()}, f"{tmp_dir}/weights.pt")
            # Loads and caches the model (a 1-iteration schedule: its default has 1000).
            inference.predict(torch.rand(1, 128, 2), model_dir=str(tmp_dir), params={"noise_schedule": [0.5]}, device=torch.device("cpu"))
        finally:
            torch.nn.init.orthogonal_ = init
        _CACHE["lmnt"] = (inference, str(tmp_dir))
    return _CACHE["lmnt"]


def _ivanvovk():
    if not IVANVOVK:
        pytest.skip("set PYSONIC_WAVEGRAD_IVANVOVK to a local copy of ivanvovk/WaveGrad to measure it")
    if "ivanvovk" not in _CACHE:
        if not hasattr(np, "product"):  # removed in numpy 2, still used there
            np.product = np.prod
        sys.path.insert(0, IVANVOVK)
        from model import WaveGrad as Peer

        def ns(o):
            return SimpleNamespace(**{k: ns(v) for k, v in o.items()}) if isinstance(o, dict) else o

        torch.manual_seed(0)
        _CACHE["ivanvovk"] = Peer(ns(IVANVOVK_CONFIG)).eval()
    return _CACHE["ivanvovk"]


@pytest.mark.parametrize("impl", ["pysonic", "lmnt", "ivanvovk"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("iterations", ITERATIONS)
def test_wavegrad_rtf(benchmark, impl, dtype, iterations, tmp_path_factory):
    torch.set_num_threads(2)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")
    betas = _betas(iterations)
    if impl == "pysonic":
        model = _pysonic()
        mel = torch.randn(1, 80, FRAMES)
        fn = lambda: model.generate(mel, iterations, betas, generator=torch.Generator().manual_seed(0), dtype=DTYPES[dtype])  # noqa: E731
        net = model.net
        one = lambda: model.net(torch.randn(1, FRAMES * HOP), mel, torch.tensor([0.5]))  # noqa: E731
    elif impl == "lmnt":
        inference, model_dir = _lmnt(tmp_path_factory.mktemp("lmnt"))
        mel = torch.rand(1, 128, FRAMES)

        def fn():
            with autocast:
                return inference.predict(mel, model_dir=model_dir, params={"noise_schedule": betas.tolist()}, device=torch.device("cpu"))[0]

        net = inference.models[model_dir]
        one = lambda: net(torch.randn(1, FRAMES * HOP), mel, torch.tensor([0.5]))  # noqa: E731
    else:
        model = _ivanvovk()
        mel = torch.randn(1, 80, FRAMES)
        model.set_new_noise_schedule(init=lambda **kw: betas.float(), init_kwargs={"steps": iterations})

        def fn():
            with autocast:
                return model.forward(mel)

        net = model.nn
        one = lambda: net(mel, torch.randn(1, FRAMES * HOP), torch.tensor([[0.5]]))  # noqa: E731
    with torch.inference_mode():
        flops = iterations * _conv_flops(net, one)  # also warms up the convolution kernels
    benchmark.group = f"wavegrad {iterations} iterations {SECONDS:g} s {dtype}"
    benchmark.extra_info.update(op="wavegrad_generate", impl=impl, dtype=dtype, flops=flops, bytes=0,
                                iterations=iterations, audio_seconds=SECONDS)
    rounds = 3 if iterations <= 12 else 1
    with torch.inference_mode():
        out = benchmark.pedantic(fn, rounds=rounds, iterations=1)
    assert out.shape[-1] == FRAMES * HOP
    benchmark.extra_info["rtf"] = benchmark.stats.stats.median / SECONDS
