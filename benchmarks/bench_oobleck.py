"""Oobleck VAE decode at the released configuration (random weights): pysonic vs diffusers.

Groups:
- ``oobleck decode 10 s``: 216 latent frames (10 s at 44.1 kHz) decoded in one pass by both.
- ``oobleck decode 10 s of 645 frames``: what a TangoFlux 10 s request needs. The tangoflux package
  decodes all 645 frames (30 s) and crops; pysonic decodes only frames [0, 216) plus the decoder's
  receptive field (``decode(z, frames=...)``, exact for a convolutional decoder).
Each decode takes seconds on 2 threads, so rounds are few (pedantic, 3 rounds, 1 warm-up).
"""
import pytest
import torch

from pysonic.codecs.oobleck import OobleckVAE

diffusers = pytest.importorskip("diffusers")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FRAMES_10S = 216  # ceil(10 * 44100 / 2048)
FRAMES_30S = 645  # what TangoFlux always generates


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    ref = diffusers.AutoencoderOobleck().eval()
    ours = OobleckVAE().eval()
    ours.load_state_dict(ref.state_dict())
    return {"diffusers": ref, "pysonic": ours}


def _decoder_flops(model: OobleckVAE, frames: int) -> float:
    """Multiply-adds x 2 of every conv in the decoder for `frames` latent frames."""
    flops, length = 0.0, frames
    for name, m in model.decoder.named_modules():
        if not hasattr(m, "weight_v"):
            continue
        w = m.weight_v
        if m.transposed:
            flops += 2 * w.numel() * length
            length *= m.stride
        else:
            flops += 2 * w.numel() * length
    return flops


@pytest.mark.parametrize("impl", ["pysonic", "diffusers"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_decode_10s(benchmark, models, impl, dtype):
    z = torch.randn(1, 64, FRAMES_10S, dtype=DTYPES[dtype])
    model = models[impl].to(DTYPES[dtype])
    fn = (lambda: model.decode(z)) if impl == "pysonic" else (lambda: model.decode(z).sample)
    benchmark.group = f"oobleck decode 10 s [1, 64, {FRAMES_10S}] {dtype}"
    benchmark.extra_info.update(op="oobleck_decode", impl=impl, dtype=dtype,
                                flops=_decoder_flops(models["pysonic"], FRAMES_10S), bytes=0)
    with torch.inference_mode():
        benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)
    models[impl].float()


@pytest.mark.parametrize("impl", ["pysonic", "diffusers"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_decode_10s_of_30s_latents(benchmark, models, impl, dtype):
    z = torch.randn(1, 64, FRAMES_30S, dtype=DTYPES[dtype])
    model = models[impl].to(DTYPES[dtype])
    keep = 10 * 44100
    if impl == "pysonic":
        fn = lambda: model.decode(z, frames=(0, FRAMES_10S))[..., :keep]
    else:
        fn = lambda: model.decode(z).sample[..., :keep]
    benchmark.group = f"oobleck decode 10 s of [1, 64, {FRAMES_30S}] {dtype}"
    benchmark.extra_info.update(op="oobleck_decode", impl=impl, dtype=dtype, flops=0, bytes=0)
    with torch.inference_mode():
        benchmark.pedantic(fn, rounds=2, iterations=1, warmup_rounds=1)
    models[impl].float()
