"""The TangoFlux pipeline against the `tangoflux` package (its own model and diffusers' VAE at
random init, saved in the release layout, a tiny local T5), plus batching, schedulers and errors."""
from __future__ import annotations

import shutil

import pytest
import torch

from pysonic.codecs.oobleck import OobleckConfig
from pysonic.pipelines import AudioOutput, TangoFlux
from pysonic.text import TextEncoder
from tests.models.tangoflux.release import TINY_MODEL, TINY_VAE, shared_release

GEN_TOL = 1e-3  # fp32 max abs after a full 10-step generation (issue 5)
VAE_TOL = 1e-4  # fp32 max abs of the VAE decode of the same latents (issue 5)
SR = TINY_VAE["sampling_rate"]
T = TINY_MODEL["audio_seq_len"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path, t5, pkg, vae = shared_release(tmp_path_factory)
    pipe = TangoFlux.from_pretrained(path, text_encoder=t5, vae_config=OobleckConfig(**TINY_VAE))
    return path.parent, pkg, vae, pipe


def test_generation_matches_package(setup):
    _, pkg, vae, pipe = setup
    prompt, duration, steps = "dogs barking loudly", 2.5, 10
    torch.manual_seed(7)  # the package draws its noise with the global RNG after encoding the text
    with torch.no_grad():
        ref_z = pkg.inference_flow(prompt, num_inference_steps=steps, guidance_scale=4.5, duration=duration,
                                   disable_progress=True)
        # TangoFluxInference.generate: decode all frames, crop to int(duration * sampling_rate)
        ref_full = vae.decode(ref_z.transpose(2, 1)).sample
        ref_wav = ref_full[0][:, : int(duration * SR)]
    # a generator seeded like the package's global RNG draws the same initial noise
    z = pipe.generate_latents(prompt, duration=duration, steps=steps, generator=torch.Generator().manual_seed(7),
                              progress=False)
    assert ref_z.abs().max() > 1
    assert (z - ref_z).abs().max().item() <= GEN_TOL
    wav = pipe.decode(z, duration)
    assert wav.shape == (1, 2, int(duration * SR)) and wav.dtype == torch.float32
    assert (wav[0] - ref_wav).abs().max().item() <= GEN_TOL
    # the VAE alone, on the package's latents: partial (cropped) and full decode
    with torch.no_grad():
        assert (pipe.decode(ref_z, duration)[0] - ref_wav).abs().max().item() <= VAE_TOL
        full = pipe.vae.decode(ref_z.transpose(1, 2))
    assert (full - ref_full).abs().max().item() <= VAE_TOL


def test_batch_equals_items(setup):
    _, _, _, pipe = setup
    prompts = ["rain", "a bird singing on the roof", "car"]  # token lengths 2, 7, 2
    n = 2
    noise = torch.randn(len(prompts) * n, T, 64)
    kw = dict(duration=2.0, steps=2, guidance_scale=3.0, progress=False)
    batch = pipe.generate(prompts, num_samples_per_prompt=n, latents=noise, **kw)
    assert batch.shape == (6, 2, 200)
    for i, p in enumerate(prompts):
        one = pipe.generate(p, num_samples_per_prompt=n, latents=noise[i * n : (i + 1) * n], **kw)
        assert (one - batch[i * n : (i + 1) * n]).abs().max().item() <= 1e-5  # fp32, batch-size dependent blocking


def test_seeds_shapes_and_call(setup):
    _, _, _, pipe = setup
    kw = dict(duration=1.0, steps=2, progress=False)
    a = pipe.generate("rain", generator=torch.Generator().manual_seed(1), **kw)
    b = pipe.generate("rain", generator=torch.Generator().manual_seed(1), **kw)
    c = pipe.generate("rain", generator=torch.Generator().manual_seed(2), **kw)
    assert a.shape == (1, 2, SR) and torch.equal(a, b) and not torch.allclose(a, c)
    out = pipe("rain", audio_length_in_s=1.0, num_inference_steps=2, generator=torch.Generator().manual_seed(1), progress=False)
    assert isinstance(out, AudioOutput) and out.sample_rate == SR and torch.equal(out.audios, a)
    # the longest request is capped by the frames the model generates (the release's crop)
    assert pipe.generate("rain", duration=30, steps=1, progress=False).shape[-1] == T * 4


def _count_calls(pipe, monkeypatch):
    calls = []
    orig = pipe.model.velocity

    def counting(x, *a, **k):
        calls.append(x.shape[0])
        return orig(x, *a, **k)

    monkeypatch.setattr(pipe.model, "velocity", counting)
    return calls


def test_heun_no_guidance_and_short_latents(setup, monkeypatch):
    _, _, _, pipe = setup
    calls = _count_calls(pipe, monkeypatch)
    noise = torch.randn(1, T, 64)
    e = pipe.generate("rain", duration=1.0, steps=3, latents=noise, progress=False)
    assert calls == [2] * 3  # CFG batch [uncond; cond]
    calls.clear()
    h = pipe.generate("rain", duration=1.0, steps=3, latents=noise, scheduler="heun", progress=False)
    assert calls == [2] * 5 and not torch.allclose(e, h)
    calls.clear()
    pipe.generate("rain", duration=1.0, steps=3, guidance_scale=1.0, latents=noise, progress=False)
    assert calls == [1] * 3  # guidance_scale <= 1: no unconditional pass
    calls.clear()
    z = pipe.generate_latents("rain", duration=1.0, steps=1, latent_frames="duration", progress=False)
    assert z.shape == (1, 25, 64)  # 100 samples / hop 4


def test_progress_bar(setup, capsys):
    _, _, _, pipe = setup
    pipe.generate("rain", duration=1.0, steps=2, latent_frames="duration")
    assert "TangoFlux" in capsys.readouterr().err
    pipe.generate("rain", duration=1.0, steps=2, latent_frames="duration", progress=False)
    assert "TangoFlux" not in capsys.readouterr().err


def test_text_encoder_weights_from_checkpoint(setup):
    root, pkg, _, pipe = setup
    own = TangoFlux.from_pretrained(root / "release", text_encoder=root / "t5", vae_config=OobleckConfig(**TINY_VAE),
                                    text_encoder_weights="encoder")
    s1, _ = pipe.text_encoder.encode(["rain"])
    s2, _ = own.text_encoder.encode(["rain"])
    with torch.no_grad():
        ref = pkg.text_encoder(input_ids=pkg.tokenizer(["rain"], return_tensors="pt").input_ids)[0]
    torch.testing.assert_close(s1, ref, rtol=0, atol=1e-5)  # the release's T5 tensors are used
    assert not torch.allclose(s2, ref)


def test_bad_requests(setup):
    _, _, _, pipe = setup
    for bad in (0.5, 31, 30.5, "10", None, True):
        with pytest.raises(ValueError, match="duration"):
            pipe.generate("rain", duration=bad, progress=False)
    for prompt in ([], [1], 3, None):
        with pytest.raises(TypeError, match="prompt"):
            pipe.generate(prompt, progress=False)
    with pytest.raises(ValueError, match="steps"):
        pipe.generate("rain", steps=0, progress=False)
    with pytest.raises(ValueError, match="num_samples_per_prompt"):
        pipe.generate("rain", num_samples_per_prompt=0, progress=False)
    with pytest.raises(ValueError, match="guidance_scale"):
        pipe.generate("rain", guidance_scale=float("nan"), progress=False)
    with pytest.raises(ValueError, match="latents"):
        pipe.generate("rain", latents=torch.randn(2, T, 64), progress=False)
    with pytest.raises(ValueError, match="scheduler"):
        pipe.generate("rain", scheduler="ddim", steps=1, progress=False)
    with pytest.raises(ValueError, match="latent_frames"):
        pipe.generate("rain", latent_frames="half", progress=False)


def test_missing_files_are_named(setup, tmp_path):
    root, _, _, _ = setup
    kw = dict(text_encoder=root / "t5", vae_config=OobleckConfig(**TINY_VAE))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        TangoFlux.from_pretrained(tmp_path / "nowhere", **kw)
    for name in ("config.json", "tangoflux.safetensors", "vae.safetensors"):
        d = tmp_path / name.replace(".", "_")
        shutil.copytree(root / "release", d)
        (d / name).unlink()
        with pytest.raises(FileNotFoundError, match=name.replace(".", r"\.")) as info:
            TangoFlux.from_pretrained(d, **kw)
        assert str(d) in str(info.value)
    with pytest.raises(FileNotFoundError, match="text encoder directory"):
        TangoFlux.from_pretrained(root / "release", text_encoder=tmp_path / "no_t5", vae_config=OobleckConfig(**TINY_VAE))
    with pytest.raises(ValueError, match="text_encoder"):
        TangoFlux.from_pretrained(root / "release", text_encoder_weights="bogus", **kw)


def test_diffusers_vae_folder_and_bf16(setup, tmp_path):
    root, _, vae, pipe = setup
    d = tmp_path / "release"
    shutil.copytree(root / "release", d)
    (d / "vae.safetensors").unlink()
    vae.save_pretrained(d / "vae")  # a diffusers folder: its config.json is read
    p2 = TangoFlux.from_pretrained(d, text_encoder=root / "t5", dtype=torch.bfloat16)
    assert p2.vae.config.sampling_rate == SR and p2.dtype == torch.bfloat16
    noise = torch.randn(1, T, 64)
    kw = dict(duration=2.0, steps=2, latents=noise, progress=False)
    a32, a16 = pipe.generate("rain", **kw), p2.generate("rain", **kw)
    assert a16.dtype == torch.float32 and a16.shape == a32.shape
    assert (a16 - a32).abs().max() < 0.1 * a32.abs().max()  # bf16 weights: same audio to ~1%


class HashEncoder(TextEncoder):
    """A stand-in text encoder (one random vector per character): any TextEncoder plugs in."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim
        self.table = torch.nn.Parameter(torch.randn(256, dim))

    def _encode(self, prompts, length):
        ids = [[ord(c) % 256 for c in p] + [0] for p in prompts]
        L = length or max(map(len, ids))
        states = torch.zeros(len(ids), L, self.dim)
        mask = torch.zeros(len(ids), L, dtype=torch.bool)
        for i, row in enumerate(ids):
            row = row[:L]
            states[i, : len(row)] = self.table[row]
            mask[i, : len(row)] = True
        return states, mask


def test_another_text_encoder_plugs_in(setup):
    _, _, _, pipe = setup
    other = TangoFlux(pipe.model, pipe.vae, HashEncoder(TINY_MODEL["joint_attention_dim"]))
    noise = torch.randn(2, T, 64)
    kw = dict(duration=1.0, steps=2, progress=False)
    batch = other.generate(["ab", "abcd"], latents=noise, **kw)
    one = other.generate("abcd", latents=noise[1:], **kw)
    assert batch.shape == (2, 2, SR) and (batch[1:] - one).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="width"):
        TangoFlux(pipe.model, pipe.vae, HashEncoder(8))
    with pytest.raises(TypeError, match="TextEncoder"):
        TangoFlux(pipe.model, pipe.vae, object())
