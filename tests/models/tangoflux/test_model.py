"""TangoFluxModel (text projection + duration token + Flux transformer) against the `tangoflux`
package's own model at random init, loaded from the release's key layout."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from pysonic.checkpoints import CheckpointError
from pysonic.models.tangoflux import FluxTransformerConfig, TangoFluxConfig, TangoFluxModel
from tests.models.tangoflux.release import TINY_MODEL, shared_release
from tests.ops.utils import low_precision_close

TOL = 1e-4  # fp32 max abs: same math, different summation orders (fused attention / qkv)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    path, _, pkg, _ = shared_release(tmp_path_factory)
    return path, pkg, TangoFluxModel.from_pretrained(path)


def _package_velocity(pkg, latents, sigma, states, mask, duration):
    """Exactly the computation of tangoflux's inference_flow / forward for one model call."""
    masked = torch.where(mask[..., None].expand_as(states), states, torch.tensor(float("nan")))
    pooled = pkg.fc(torch.nanmean(masked, dim=1))
    ctx = torch.cat([states, pkg.encode_duration(duration)], dim=1)
    B, T = latents.shape[:2]
    txt_ids = torch.zeros(B, ctx.shape[1], 3)
    audio_ids = torch.arange(T).unsqueeze(0).unsqueeze(-1).repeat(B, 1, 3)
    return pkg.transformer(hidden_states=latents, timestep=sigma, guidance=None, pooled_projections=pooled,
                           encoder_hidden_states=ctx, txt_ids=txt_ids, img_ids=audio_ids, return_dict=False)[0]


def _inputs(B=3, T=11, L=6, D=TINY_MODEL["joint_attention_dim"]):
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 4:] = False
    mask[B - 1, 1:] = False  # the empty prompt: only its end-of-sequence token
    return dict(latents=torch.randn(B, T, 64), sigma=torch.rand(B), text_states=torch.randn(B, L, D),
                text_mask=mask, duration=torch.tensor([10.0, 2.5, 45.0][:B]))  # 45 s is clamped to 30


def test_velocity_matches_package(release):
    _, pkg, ours = release
    x = _inputs()
    with torch.no_grad():
        ref = _package_velocity(pkg, x["latents"], x["sigma"], x["text_states"], x["text_mask"], x["duration"])
        out = ours.velocity(**x)
    assert out.shape == ref.shape and ref.abs().max() > 0.5
    err = (out - ref).abs().max().item()
    assert err <= TOL, (err, ref.abs().max().item())


def test_velocity_scalar_sigma_and_duration_broadcast(release):
    _, _, ours = release
    x = _inputs(B=2)
    with torch.no_grad():
        a = ours.velocity(x["latents"], 0.4, x["text_states"], x["text_mask"], 7)
        b = ours.velocity(x["latents"], torch.full((2,), 0.4), x["text_states"], x["text_mask"], torch.tensor([7.0, 7.0]))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_batch_equals_items(release):
    _, _, ours = release
    x = _inputs()
    with torch.no_grad():
        full = ours.velocity(**x)
        for i in range(3):
            one = ours.velocity(**{k: v[i : i + 1] for k, v in x.items()})
            assert (one - full[i : i + 1]).abs().max().item() <= 1e-5  # fp32: batch-size dependent matmul blocking


def test_bf16_autocast_within_flash_attention_rule(release):
    _, pkg, ours = release
    x = _inputs()
    with torch.no_grad():
        ref32 = _package_velocity(pkg, x["latents"], x["sigma"], x["text_states"], x["text_mask"], x["duration"])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref16 = _package_velocity(pkg, x["latents"], x["sigma"], x["text_states"], x["text_mask"], x["duration"])
            out = ours.velocity(**x)
    low_precision_close(out, ref32, ref16)


def test_bf16_weights_within_flash_attention_rule(release):
    """The pipeline's dtype=torch.bfloat16 runs the model with bf16 weights (faster than autocast
    on this CPU): its error against fp32 is within 2x the package's under plain bf16 autocast."""
    import copy

    _, pkg, ours = release
    x = _inputs()
    ours16 = copy.deepcopy(ours).to(torch.bfloat16)
    with torch.no_grad():
        ref32 = _package_velocity(pkg, x["latents"], x["sigma"], x["text_states"], x["text_mask"], x["duration"])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref16 = _package_velocity(pkg, x["latents"], x["sigma"], x["text_states"], x["text_mask"], x["duration"])
        out = ours16.velocity(**x)
    assert out.dtype == torch.bfloat16
    low_precision_close(out, ref32, ref16)


def test_release_state_dict_round_trip(release):
    path, _, ours = release
    saved = {k: v for k, v in load_file(str(path / "tangoflux.safetensors")).items() if not k.startswith("text_encoder.")}
    mine = ours.release_state_dict()
    assert sorted(mine) == sorted(saved)
    for k in saved:
        torch.testing.assert_close(mine[k], saved[k], rtol=0, atol=0)


def test_loader_names_bad_keys(release, tmp_path):
    path, _, _ = release
    state = load_file(str(path / "tangoflux.safetensors"))
    model = TangoFluxModel(TangoFluxConfig.from_config_dict(json.loads((path / "config.json").read_text())))
    cases = {
        "fc.0.bias": lambda s: s.pop("fc.0.bias"),
        "surprise.weight": lambda s: s.__setitem__("surprise.weight", torch.zeros(1)),
        "duration_emebdder.time_positional_embedding.1.weight": lambda s: s.__setitem__(
            "duration_emebdder.time_positional_embedding.1.weight", torch.zeros(3, 3)),
        "transformer.proj_out.weight": lambda s: s.pop("transformer.proj_out.weight"),
    }
    for name, edit in cases.items():
        bad = dict(state)
        edit(bad)
        f = tmp_path / "bad.safetensors"
        save_file(bad, str(f))
        short = name.removeprefix("transformer.")  # transformer keys are named under that prefix
        with pytest.raises(CheckpointError, match=short.replace(".", r"\.")):
            model.load_release_state_dict(f)
    with pytest.raises(CheckpointError, match="config.json"):
        TangoFluxModel.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="nothere"):
        TangoFluxModel.from_pretrained(tmp_path / "nothere.safetensors")


def test_config_defaults_are_the_release():
    cfg = TangoFluxConfig()
    assert (cfg.num_layers, cfg.num_single_layers, cfg.in_channels, cfg.attention_head_dim, cfg.num_attention_heads,
            cfg.joint_attention_dim, cfg.audio_seq_len, cfg.max_duration) == (6, 18, 64, 128, 8, 1024, 645, 30)
    assert cfg.transformer_config() == FluxTransformerConfig()
    released = {"num_layers": 6, "num_single_layers": 18, "in_channels": 64, "attention_head_dim": 128,
                "joint_attention_dim": 1024, "num_attention_heads": 8, "audio_seq_len": 645, "max_duration": 30,
                "uncondition": False, "text_encoder_name": "google/flan-t5-large"}
    assert TangoFluxConfig.from_config_dict(released) == cfg
    with pytest.warns(UserWarning, match="lr"):
        assert TangoFluxConfig.from_config_dict({"lr": 1e-4}) == cfg
    with pytest.raises(ValueError, match="num_layers"):
        TangoFluxConfig.from_config_dict({"num_layers": "six"})
    with pytest.raises(ValueError, match="max_duration"):
        TangoFluxConfig.from_config_dict({"max_duration": 0})
    assert dataclasses.replace(cfg, num_layers=1).num_layers == 1


def test_bad_inputs(release):
    _, _, ours = release
    x = _inputs(B=2)
    bad = {
        "latents": (x["latents"][..., :5], "latents"),
        "text_states": (x["text_states"][..., :5], "text_states"),
        "text_mask": (x["text_mask"].float(), "text_mask"),
        "sigma": (torch.rand(3), "sigma"),
        "duration": (torch.rand(3), "duration"),
    }
    for key, (value, name) in bad.items():
        with pytest.raises(ValueError, match=f"TangoFluxModel.velocity: {name}"):
            ours.velocity(**{**x, key: value})
    empty = x["text_mask"].clone()
    empty[0] = False
    with pytest.raises(ValueError, match="no valid token"):
        ours.velocity(**{**x, "text_mask": empty})
    with pytest.raises(TypeError, match="latents"):
        ours.velocity(**{**x, "latents": [1.0]})


def test_attention_text_pooling():
    """text_pooling="attention": zero query at init = the mean over unmasked tokens; a query that
    matches one token's state pools (nearly) that token; padding never counts; bad names raise."""
    cfg = TangoFluxConfig(**{**TINY_MODEL, "text_pooling": "attention"})
    torch.manual_seed(0)
    model = TangoFluxModel(cfg).eval()
    mean_model = TangoFluxModel(TangoFluxConfig(**TINY_MODEL)).eval()
    mean_model.load_state_dict(model.state_dict(), strict=False)
    assert "pool_query" in dict(model.named_parameters()) and "pool_query" not in dict(mean_model.named_parameters())
    states = torch.randn(2, 5, cfg.text_dim)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    with torch.no_grad():
        torch.testing.assert_close(model.pooled_text(states, mask), mean_model.pooled_text(states, mask))
        model.pool_query.copy_(states[1, 2] * 50)  # item 1's third token dominates its softmax
        want = torch.relu(model.text_proj(states[1, 2]))
        torch.testing.assert_close(model.pooled_text(states, mask)[1], want, rtol=1e-4, atol=1e-4)
        padded = states.clone()
        padded[1, 3:] = 1e4  # padding may hold anything
        torch.testing.assert_close(model.pooled_text(padded, mask), model.pooled_text(states, mask))
    with pytest.raises(ValueError, match="text_pooling"):
        TangoFluxConfig.from_config_dict({**TINY_MODEL, "text_pooling": "max"})
    with pytest.raises(ValueError, match="text_pooling"):
        TangoFluxModel(TangoFluxConfig(**{**TINY_MODEL, "text_pooling": "max"}))
