"""The default-model recipe driver (pysonic train default): a tiny recipe through every stage, the
model directory it writes, and loading that directory with TangoFlux.from_pretrained alone."""
import json

import pytest
import torch

from pysonic.train import default_model as dm

TINY = {
    "out_dir": None,
    "data": {"sample_rate": 16000, "duration": [1.0, 1.5], "seed": 0},
    "text_encoder": {"encoder": {"dim": 16, "layers": 1, "heads": 2, "max_tokens": 32}, "vocab_captions": 200,
                     "train": {"steps": 2, "batch_size": 4, "lr": 1e-3, "progress": False}},
    "vae": {"model": {"encoder_hidden_size": 4, "downsampling_ratios": [2, 4, 8, 8], "channel_multiples": [1, 1, 2, 2],
                      "decoder_channels": 4, "decoder_input_channels": 2, "audio_channels": 1, "sampling_rate": 16000,
                      "latent_packing": 2},  # hop 1024, 4 latent channels
            "scale_items": 3, "refine": {"steps": 1, "stft_weight": 0.1},
            "train": {"steps": 2, "batch_size": 2, "crop_seconds": 0.064, "progress": False}},
    "flow": {"model": {"num_layers": 1, "num_single_layers": 1, "in_channels": 4, "attention_head_dim": 16,
                       "num_attention_heads": 1, "joint_attention_dim": 16, "audio_seq_len": 24, "max_duration": 1.536,
                       "duration_features": 8, "axes_dims_rope": [4, 6, 6]},
             "items": 6, "cache_latents": True,
             "train": {"steps": 3, "batch_size": 2, "max_audio_duration": 1.536, "uncondition": True,
                       "ema_decay": 0.9, "ckpt_every": 2, "progress": False}},
}


def _cfg(tmp_path):
    return {**TINY, "out_dir": str(tmp_path / "run"), "model_dir": str(tmp_path / "model")}


def test_config_errors(tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(ValueError, match="unknown keys"):
        dm.check_config({**cfg, "extra": 1})
    with pytest.raises(ValueError, match="lacks"):
        dm.check_config({k: v for k, v in cfg.items() if k != "vae"})
    with pytest.raises(ValueError, match="out_dir"):
        dm.check_config({**cfg, "flow": {**cfg["flow"], "train": {**cfg["flow"]["train"], "out_dir": "x"}}})
    with pytest.raises(ValueError, match="unknown stages"):
        dm.run(cfg, stages=("text", "bake"))
    with pytest.raises(FileNotFoundError, match="vae"):
        dm.run(cfg, stages=("flow",))


def test_recipe_end_to_end(tmp_path):
    from pysonic.pipelines import TangoFlux

    cfg = _cfg(tmp_path)
    times = dm.run(cfg, log=lambda *a: None)
    assert set(times) == set(dm.STAGES)
    run = tmp_path / "run"
    for f in ("text_encoder/encoder/config.json", "vae/final.safetensors", "flow/final.safetensors"):
        assert (run / f).is_file(), f
    assert len(list((run / "flow").glob("latents_*/*.pt"))) == 6  # each item encoded once, then cached
    model = tmp_path / "model"
    names = {p.relative_to(model).as_posix() for p in model.rglob("*") if p.is_file()}
    assert names == {"config.json", "tangoflux.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
                     "text_encoder/config.json", "text_encoder/model.safetensors"}
    assert json.loads((model / "text_encoder" / "config.json").read_text())["type"] == "word_text_encoder"

    # the latent scale measured after the VAE stage is the packaged VAE's scaling_factor, and it
    # gives the first items' latents unit rms (what the flow model was trained on)
    scale = json.loads((run / "vae" / dm.LATENT_SCALE_FILE).read_text())["scaling_factor"]
    vcfg = json.loads((model / "vae" / "config.json").read_text())
    assert vcfg["scaling_factor"] == pytest.approx(scale) and vcfg["latent_packing"] == 2
    vae = dm.load_vae(cfg)
    synth = dm._synth(cfg)
    with torch.no_grad():
        means = torch.cat([vae.encode_distribution(synth[i]["audio"][None])[0].flatten() for i in range(3)])
    assert means.pow(2).mean().sqrt().item() == pytest.approx(1.0, rel=1e-4)

    pipe = TangoFlux.from_pretrained(model)  # no other argument
    assert pipe.sample_rate == 16000 and pipe.model.config.axes_dims_rope == (4, 6, 6)
    g = torch.Generator().manual_seed(0)
    audio = pipe.generate("a sine tone at 440 hz", duration=1.2, steps=2, generator=g, progress=False)
    assert audio.shape == (1, 1, int(1.2 * 16000)) and torch.isfinite(audio).all()

    # the packaged flow weights are the run's final (EMA) weights
    from safetensors.torch import load_file

    final = load_file(run / "flow" / "final.safetensors")
    for k, v in pipe.model.state_dict().items():
        torch.testing.assert_close(v, final[k], rtol=0, atol=0)

    # a rerun resumes every stage from its checkpoints (no new training steps) and packages again
    dm.run(cfg, stages=("flow", "package"), log=lambda *a: None)
    again = TangoFlux.from_pretrained(model)
    for k, v in again.model.state_dict().items():
        torch.testing.assert_close(v, final[k], rtol=0, atol=0)


def test_latents_are_a_function_of_the_index(tmp_path):
    from pysonic.data.synth import SonicSynth

    vae = dm.build_vae(TINY["vae"]["model"])
    synth = SonicSynth("train", sample_rate=16000, duration=(1.0, 1.5), length=4)
    a = dm.SynthLatents(synth, vae, max_duration=1.536, seed=3)
    b = dm.SynthLatents(synth, vae, max_duration=1.536, seed=3, cache_dir=tmp_path / "c")
    x, y = a[2], b[2]
    assert x["latents"].shape == (24, 4) and x["caption"] == y["caption"]
    torch.testing.assert_close(x["latents"], y["latents"], rtol=0, atol=0)
    torch.testing.assert_close(b[2]["latents"], y["latents"], rtol=0, atol=0)  # read back from the cache
    mean = dm.SynthLatents(synth, vae, max_duration=1.536, seed=3, sample_posterior=False)[2]["latents"]
    assert not torch.equal(mean, x["latents"])


def test_latent_cache_name_follows_the_latent_layout(tmp_path):
    """Cached latents of one VAE packed 4 frames per latent must not be read back for packing 16."""
    import dataclasses

    from pysonic.train.flow_matching import FlowMatchingConfig

    weights = tmp_path / "vae.safetensors"
    weights.write_bytes(b"weights")
    cfg = dm.build_vae(TINY["vae"]["model"]).config
    tcfg = FlowMatchingConfig(out_dir=str(tmp_path), steps=1, max_audio_duration=1.536)
    name = dm.latent_cache_name(weights, cfg, tcfg)
    assert name == dm.latent_cache_name(weights, dataclasses.replace(cfg), tcfg)
    for change in (dict(latent_packing=cfg.latent_packing + 1), dict(scaling_factor=2.0)):
        assert dm.latent_cache_name(weights, dataclasses.replace(cfg, **change), tcfg) != name, change
    weights.write_bytes(b"other weights")
    assert dm.latent_cache_name(weights, cfg, tcfg) != name


def test_model_config_rotary_axes():
    """The small model's head dim (64) needs its own rotary split: reachable from config.json."""
    from pysonic.models.tangoflux import TangoFluxConfig, TangoFluxModel

    assert TangoFluxConfig().transformer_config().axes_dims_rope == (16, 56, 56)  # the release's
    cfg = TangoFluxConfig.from_config_dict({"attention_head_dim": 64, "num_attention_heads": 1, "num_layers": 1,
                                            "num_single_layers": 0, "joint_attention_dim": 16, "in_channels": 2,
                                            "axes_dims_rope": [8, 28, 28]})
    assert cfg.transformer_config().axes_dims_rope == (8, 28, 28)
    TangoFluxModel(cfg)  # builds
    for bad in ([], [3, 4], "8,28,28", [8, True]):
        with pytest.raises(ValueError, match="axes_dims_rope"):
            TangoFluxConfig.from_config_dict({"axes_dims_rope": bad})
