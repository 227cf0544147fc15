"""The shipped default model (pysonic/assets/default): 5 s of 16 kHz audio from a prompt, end to end
(text encoder, 25 Euler steps with classifier-free guidance, VAE decode), fp32 and bf16.

Target (issue 6): under 2 s for 5 s of audio in bf16 on this CPU. Not a timed test.

    python -m pytest benchmarks/bench_default_model.py --benchmark-only -q
"""
import pytest
import torch

from pysonic.generation import DEFAULT_GUIDANCE, DEFAULT_STEPS, default_model_dir, load_pipeline

PROMPT = "a square wave at 220 Hz"
SECONDS = 5.0


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.mark.skipif(not (default_model_dir() / "config.json").is_file(), reason="no shipped default model")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_generate_5s(benchmark, dtype):
    pipe = load_pipeline(dtype=dtype)
    cfg = pipe.model.config

    def run():
        g = torch.Generator().manual_seed(0)
        return pipe.generate(PROMPT, duration=SECONDS, steps=DEFAULT_STEPS, guidance_scale=DEFAULT_GUIDANCE,
                             generator=g, progress=False)

    audio = run()  # warm-up
    assert audio.shape[-1] == int(SECONDS * pipe.sample_rate)
    benchmark.group = f"default_model generate {SECONDS:g}s {dtype}"
    params = sum(p.numel() for p in pipe.model.parameters())
    tokens = cfg.audio_seq_len + 16  # latent frames + about a prompt's text tokens and the duration token
    benchmark.extra_info.update(op="default_model_generate", impl="pysonic", dtype=dtype,
                                flops=float(2 * 2 * params * tokens * DEFAULT_STEPS),  # CFG batch of 2, 25 steps
                                bytes=float(sum(p.numel() * p.element_size() for p in pipe.model.parameters()) * DEFAULT_STEPS),
                                steps=DEFAULT_STEPS, seconds_of_audio=SECONDS, sample_rate=pipe.sample_rate)
    benchmark.pedantic(run, rounds=3, iterations=1)
