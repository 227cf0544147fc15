"""TangoFlux end to end at the released configuration (random weights), pysonic vs the `tangoflux`
package (diffusers' FluxTransformer2DModel and AutoencoderOobleck) in the same run.

Groups:
- ``tangoflux velocity``: one model call at 645 latent frames, CFG batch of 2, 64 text tokens + the
  duration token, fp32 and bf16 (the package under plain bf16 autocast; pysonic with bf16 weights);
- ``tangoflux vae decode``: the VAE part of a 10 s request (30 s too when heavy; the package decodes
  all 645 frames then crops; pysonic decodes the frames the crop keeps plus the receptive field);
- ``tangoflux generate`` (heavy: ``PYSONIC_BENCH_HEAVY=1``): full 25-step requests of 10 s and 30 s,
  with the transformer (sampling) and VAE (decode) seconds of the timed round in ``extra_info``;
  ``pysonic_duration_frames`` samples only the latent frames the duration needs (an option that
  differs from the released behaviour, which always samples 645 frames).

The text encoder is a one-layer random T5 of FLAN-T5-large's width (no hub): its cost is negligible
next to 25 steps of the transformer. Run:
``python -m pytest benchmarks/bench_tangoflux.py --benchmark-only -q`` (add PYSONIC_BENCH_HEAVY=1 for
the full requests: about 2 x 2 minutes per request per dtype on 2 cores).
"""
from __future__ import annotations

import copy
import os
import time

import pytest
import torch

from pysonic.codecs.oobleck import OobleckVAE, convert_state_dict
from pysonic.checkpoints import load_into
from pysonic.models.tangoflux import TangoFluxModel
from pysonic.pipelines import TangoFlux

HEAVY = os.environ.get("PYSONIC_BENCH_HEAVY") == "1"
B, T, L = 2, 645, 64  # CFG batch, latent frames (30 s), text tokens
STEPS, GUIDANCE = 25, 4.5
PROMPT = "a dog barks while rain falls on a tin roof"
DTYPES = ["fp32", "bf16"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tests.models.tangoflux.release import import_tangoflux_package, make_t5

    diffusers = pytest.importorskip("diffusers")
    tfm = import_tangoflux_package()
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("tangoflux_bench")
    t5 = make_t5(root / "t5", d_model=1024)
    torch.manual_seed(0)
    pkg = tfm.TangoFlux({"text_encoder_name": str(t5)}).eval()  # the released config (its defaults)
    vae = diffusers.AutoencoderOobleck().eval()  # the released VAE config
    with torch.no_grad():
        for p in pkg.transformer.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # off the zero init of adaLN / output layers
    ours = TangoFluxModel().eval()
    ours.load_release_state_dict(pkg.state_dict())
    ovae = OobleckVAE().eval()
    load_into(ovae, convert_state_dict(vae.state_dict()))
    from pysonic.text.t5 import T5TextEncoder

    enc = T5TextEncoder(t5)
    enc.load_release_weights({k[len("text_encoder."):]: v for k, v in pkg.state_dict().items() if k.startswith("text_encoder.")})
    pipes = {
        "fp32": TangoFlux(ours, ovae, enc),
        "bf16": TangoFlux(copy.deepcopy(ours).to(torch.bfloat16), copy.deepcopy(ovae).to(torch.bfloat16), enc),
    }
    return pkg, vae, pipes


def _autocast(dtype):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")


def _velocity_flops(pipe) -> float:
    n_params = sum(p.numel() for p in pipe.model.transformer.parameters())
    tokens = T + L + 1
    return 2.0 * n_params * B * tokens + 24 * 4.0 * B * tokens * tokens * 1024


@pytest.mark.parametrize("impl", ["pysonic", "tangoflux"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_velocity(benchmark, models, impl, dtype):
    pkg, _, pipes = models
    pipe = pipes[dtype]
    torch.manual_seed(1)
    x, states = torch.randn(B, T, 64), torch.randn(B, L, 1024)
    mask, dur, sigma = torch.ones(B, L, dtype=torch.bool), torch.full((B,), 10.0), torch.tensor([0.7])

    def package():
        masked = torch.where(mask[..., None].expand_as(states), states, torch.tensor(float("nan")))
        pooled = pkg.fc(torch.nanmean(masked, dim=1))
        ctx = torch.cat([states, pkg.encode_duration(dur)], dim=1)
        return pkg.transformer(hidden_states=x, timestep=sigma, guidance=None, pooled_projections=pooled,
                               encoder_hidden_states=ctx, txt_ids=torch.zeros(L + 1, 3),
                               img_ids=torch.arange(T)[:, None].expand(-1, 3).float(), return_dict=False)[0]

    def run():
        with torch.inference_mode():
            if impl == "pysonic":
                return pipe.model.velocity(x, sigma, states, mask, dur)
            with _autocast(dtype):
                return package()

    benchmark.group = f"tangoflux velocity B={B} T={T} L={L + 1} {dtype}"
    benchmark.extra_info.update(op="tangoflux_velocity", impl=impl, dtype=dtype, flops=_velocity_flops(pipe), bytes=0)
    benchmark.pedantic(run, rounds=2, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["pysonic", "tangoflux"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seconds", [10, 30] if HEAVY else [10])  # the package's work is the same for both
def test_vae_decode(benchmark, models, impl, dtype, seconds):
    _, vae, pipes = models
    pipe = pipes[dtype]
    torch.manual_seed(2)
    z = torch.randn(1, T, 64)

    def run():
        with torch.inference_mode():
            if impl == "pysonic":
                return pipe.decode(z, seconds)
            with _autocast(dtype):  # TangoFluxInference.generate: decode every frame, then crop
                return vae.decode(z.transpose(2, 1)).sample[0][:, : int(seconds * 44100)]

    benchmark.group = f"tangoflux vae decode {seconds}s {dtype}"
    benchmark.extra_info.update(op="tangoflux_vae_decode", impl=impl, dtype=dtype, flops=0, bytes=0)
    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=1)


@pytest.mark.skipif(not HEAVY, reason="full 25-step requests take minutes: set PYSONIC_BENCH_HEAVY=1")
@pytest.mark.parametrize("impl", ["pysonic", "tangoflux", "pysonic_duration_frames"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seconds", [10, 30])
def test_generate(benchmark, models, impl, dtype, seconds):
    pkg, vae, pipes = models
    pipe = pipes[dtype]
    split = {}

    def run():
        with torch.inference_mode():
            t0 = time.perf_counter()
            if impl.startswith("pysonic"):
                # pysonic_duration_frames: only the frames the duration needs (NOT the released behaviour)
                frames = "duration" if impl == "pysonic_duration_frames" else "full"
                z = pipe.generate_latents(PROMPT, duration=seconds, steps=STEPS, guidance_scale=GUIDANCE,
                                          generator=torch.Generator().manual_seed(0), progress=False,
                                          latent_frames=frames)
                t1 = time.perf_counter()
                wav = pipe.decode(z, seconds)
            else:
                with _autocast(dtype):
                    torch.manual_seed(0)
                    z = pkg.inference_flow(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                                           duration=seconds, disable_progress=True)
                    t1 = time.perf_counter()
                    wav = vae.decode(z.transpose(2, 1)).sample.cpu()[0][:, : int(seconds * 44100)]
            t2 = time.perf_counter()
        split.update(transformer_s=round(t1 - t0, 2), vae_s=round(t2 - t1, 2), rtf=round((t2 - t0) / seconds, 2))
        return wav

    benchmark.group = f"tangoflux generate {seconds}s {STEPS} steps {dtype}"
    benchmark.extra_info.update(op="tangoflux_generate", impl=impl, dtype=dtype, flops=0, bytes=0)
    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(split)
