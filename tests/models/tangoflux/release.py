"""Tiny TangoFlux releases for tests: the `tangoflux` package's own model at random init, saved in
the published layout, plus a tiny local T5 (config + hand-built tokenizer, no hub).

``make_release(dir)`` writes ``config.json``, ``tangoflux.safetensors`` (the package model's
state dict without the tied ``text_encoder.encoder.embed_tokens.weight``, as released) and the VAE
(``vae.safetensors`` in diffusers' key layout), and returns the package objects for comparison.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch

# A reduced TangoFlux: the package hard-codes 64 latent channels, so in_channels stays 64. Its
# context width is 64 and the head dim 128 (one head); the projections map between them.
TINY_MODEL = dict(
    num_layers=1,
    num_single_layers=2,
    in_channels=64,
    attention_head_dim=128,  # the package passes no axes_dims_rope: diffusers' (16, 56, 56) needs 128
    num_attention_heads=1,
    joint_attention_dim=64,  # = the tiny T5's d_model, as the release requires
    audio_seq_len=97,  # the package reads it from the config (645 released); 97 frames = 3.88 s here
    max_duration=30,
)
# A reduced Oobleck VAE: hop 4, 100 Hz: 97 frames = 388 samples, so durations of 1-3 s crop for real.
TINY_VAE = dict(
    encoder_hidden_size=128,  # 2 x 64 latent channels
    downsampling_ratios=[2, 2],
    channel_multiples=[1, 2],
    decoder_channels=4,
    decoder_input_channels=64,
    audio_channels=2,
    sampling_rate=100,
)
WORDS = ["dog", "bark", "ing", "rain", "fall", "s", "on", "a", "roof", "bird", "sing", "loud", "ly", "car", "engine", "the"]


def import_tangoflux_package():
    """The `tangoflux` package (0.1.0, installed with --no-deps), skipped with the reason if absent.

    It imports `datasets` at module level for training data only; when `datasets` is not
    installed, an empty stand-in is put in place for the import and removed straight after.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    stub = None
    if importlib.util.find_spec("datasets") is None:
        stub = types.ModuleType("datasets")
        stub.load_dataset = stub.Audio = None
        sys.modules.setdefault("datasets", stub)
    try:
        pytest.importorskip("tangoflux")
        import tangoflux.model

        return tangoflux.model
    finally:
        if stub is not None and sys.modules.get("datasets") is stub:
            del sys.modules["datasets"]


def make_t5(path: Path, d_model: int = 64, seed: int = 0) -> Path:
    """A tiny T5 encoder directory (config.json + model.safetensors + tokenizer files)."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(f"\u2581{w}", -3.0 - i * 0.1) for i, w in enumerate(WORDS)]
    vocab += [(w, -5.0 - i * 0.1) for i, w in enumerate(WORDS)]
    vocab += [(c, -8.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tok = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)
    tok.save_pretrained(path)
    g = torch.Generator().manual_seed(seed)
    cfg = T5Config(vocab_size=len(vocab), d_model=d_model, d_kv=8, d_ff=48, num_layers=2, num_heads=2,
                   relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0)
    model = T5EncoderModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model.save_pretrained(path)
    return path


def perturb_(params, scale: float = 0.5) -> None:
    """Move every parameter off its init: matrices by ``scale / sqrt(fan_in)`` x N(0, 1) (so
    activations keep their size through the layers), vectors by ``scale / 5`` x N(0, 1). The
    adaLN and output projections start at zero, which would hide wiring bugs."""
    with torch.no_grad():
        for p in params:
            std = scale / p[0].numel() ** 0.5 if p.dim() >= 2 else scale / 5
            p.add_(torch.randn_like(p) * std)


def make_release(path: Path, t5_dir: Path, *, perturb: float = 0.5, seed: int = 0, vae_layout: str = "file"):
    """Write a tiny release into ``path``; returns (package TangoFlux model, diffusers VAE), every
    parameter (T5 included) perturbed with :func:`perturb_`."""
    from diffusers import AutoencoderOobleck
    from safetensors.torch import save_file

    tfm = import_tangoflux_package()
    torch.manual_seed(seed)
    config = {**TINY_MODEL, "text_encoder_name": str(t5_dir), "uncondition": False}
    model = tfm.TangoFlux(config).eval()
    vae = AutoencoderOobleck(**TINY_VAE).eval()
    perturb_(list(model.parameters()) + list(vae.parameters()), perturb)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
             if k != "text_encoder.encoder.embed_tokens.weight"}  # tied to text_encoder.shared.weight
    save_file(state, str(path / "tangoflux.safetensors"))
    if vae_layout == "file":
        save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(path / "vae.safetensors"))
    else:  # diffusers directory inside the release
        vae.save_pretrained(path / "vae")
    return model, vae


_SHARED: dict[str, tuple] = {}


def shared_release(tmp_path_factory, vae_layout: str = "file"):
    """One tiny release (and T5) per test session and VAE layout, shared by the test modules:
    returns (release dir, T5 dir, package model, diffusers VAE). Tests must not modify them."""
    if vae_layout not in _SHARED:
        root = tmp_path_factory.mktemp(f"tangoflux_release_{vae_layout}")
        t5 = make_t5(root / "t5")
        pkg, vae = make_release(root / "release", t5, vae_layout=vae_layout)
        _SHARED[vae_layout] = (root / "release", t5, pkg, vae)
    return _SHARED[vae_layout]
