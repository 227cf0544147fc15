"""pysonic's Flux transformer (TangoFlux) against diffusers' FluxTransformer2DModel.

Tiny random-weight configs; every diffusers parameter is perturbed with noise first, so no layer
sits at a degenerate init (zeroed adaLN / output layers, unit RMSNorm weights would hide wiring
bugs such as a swapped shift/scale or a missing norm).
"""
from __future__ import annotations

import pytest
import torch

from pysonic.checkpoints import CheckpointError
from pysonic.models.tangoflux import FluxTransformer, FluxTransformerConfig
from pysonic.ops import _backends
from tests.ops.utils import REQUIRED, low_precision_close

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4  # fp32 max abs: same math, different summation orders (fused attention, fused qkv)

TINY = dict(
    in_channels=8,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=12,
    pooled_projection_dim=10,
    axes_dims_rope=(4, 6, 6),
)


def _kernel_backends():
    params = []
    for backend in ("cpp", "triton"):
        reasons = [r for op in ("attention", "rotary") if (r := _backends.why_unavailable(op, backend, torch.device("cpu")))]
        marks = ()
        if reasons and backend not in REQUIRED:
            marks = pytest.mark.skip(reason=f"{backend} backend unavailable: {reasons[0]}")
        params.append(pytest.param(backend, marks=marks, id=backend))
    return params


def _pair(**overrides):
    """A perturbed diffusers model and ours with its weights."""
    kw = {**TINY, **overrides}
    ref = diffusers.FluxTransformer2DModel(**kw).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # move every parameter (incl. RMSNorm weights) off its init
    ours = FluxTransformer(FluxTransformerConfig(**kw)).eval()
    ours.load_diffusers_state_dict(ref.state_dict())
    return ref, ours


def _inputs(B=2, Ta=7, Tt=5):
    cfg = TINY
    return dict(
        latents=torch.randn(B, Ta, cfg["in_channels"]),
        text=torch.randn(B, Tt, cfg["joint_attention_dim"]),
        pooled=torch.randn(B, cfg["pooled_projection_dim"]),
        timestep=torch.rand(B),
    )


def _tangoflux_ids(B, Ta, Tt):
    """Position ids exactly as tangoflux/model.py builds them (batched, deprecated 3-D form)."""
    txt_ids = torch.zeros(B, Tt, 3)
    audio_ids = torch.arange(Ta).unsqueeze(0).unsqueeze(-1).repeat(B, 1, 3)
    return txt_ids, audio_ids


def _diffusers(ref, x, txt_ids, img_ids, guidance=None):
    return ref(
        hidden_states=x["latents"],
        encoder_hidden_states=x["text"],
        pooled_projections=x["pooled"],
        timestep=x["timestep"],
        img_ids=img_ids,
        txt_ids=txt_ids,
        guidance=guidance,
        return_dict=False,
    )[0]


@pytest.mark.parametrize("backend", [pytest.param("reference", id="reference"), *_kernel_backends()])
@torch.no_grad()
def test_matches_diffusers_with_tangoflux_ids(backend):
    ref, ours = _pair()
    x = _inputs()
    txt_ids, audio_ids = _tangoflux_ids(2, 7, 5)
    want = _diffusers(ref, x, txt_ids, audio_ids)
    got = ours(**x, backend=backend)  # default ids are TangoFlux's
    assert got.shape == want.shape == (2, 7, TINY["in_channels"])
    assert want.abs().max() > 1.0  # a meaningful output, not a degenerate one
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    # the same ids passed explicitly, in TangoFlux's batched form
    explicit = ours(**x, audio_ids=audio_ids, text_ids=txt_ids, backend=backend)
    torch.testing.assert_close(explicit, got, atol=0, rtol=0)


@torch.no_grad()
def test_matches_diffusers_with_2d_ids_and_guidance():
    """Non-trivial ids on every axis (text ids not zero) and a guidance-embedding config."""
    ref, ours = _pair(guidance_embeds=True)
    x = _inputs(B=3, Ta=6, Tt=4)
    audio_ids = torch.randint(0, 50, (6, 3)).float()
    txt_ids = torch.randint(0, 50, (4, 3)).float()
    g = torch.tensor([3.0, 4.5, 1.0])
    want = _diffusers(ref, x, txt_ids, audio_ids, guidance=g)
    got = ours(**x, audio_ids=audio_ids, text_ids=txt_ids, guidance=g)
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)


@torch.no_grad()
def test_rotary_positions_matter():
    """Shuffled audio positions change the output (the rope wiring is exercised by the parity test)."""
    _, ours = _pair()
    x = _inputs()
    a = ours(**x)
    b = ours(**x, audio_ids=torch.arange(7).flip(0))
    assert (a - b).abs().max() > 1e-3


@torch.no_grad()
def test_bf16_autocast_error_like_diffusers():
    """Under bf16 autocast our error against fp32 diffusers is at most 2x diffusers' own
    bf16-autocast error (the flash-attention rule, tests.ops.utils.low_precision_close)."""
    ref, ours = _pair()
    x = _inputs()
    txt_ids, audio_ids = _tangoflux_ids(2, 7, 5)
    want = _diffusers(ref, x, txt_ids, audio_ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_lowp = _diffusers(ref, x, txt_ids, audio_ids)
        got = ours(**x)
    assert got.dtype == torch.bfloat16
    low_precision_close(got, want, ref_lowp, floor=1e-2)


@pytest.mark.parametrize("backend", _kernel_backends())
@torch.no_grad()
def test_kernel_backend_matches_reference_backend(backend):
    _, ours = _pair()
    x = _inputs(B=2, Ta=9, Tt=3)
    torch.testing.assert_close(ours(**x, backend=backend), ours(**x, backend="reference"), atol=TOL, rtol=0)


@torch.no_grad()
def test_batch_equals_items():
    _, ours = _pair()
    x = _inputs(B=3)
    batched = ours(**x)
    for i in range(3):
        item = ours(**{k: v[i : i + 1] for k, v in x.items()})
        torch.testing.assert_close(batched[i : i + 1], item, atol=TOL, rtol=0)


@torch.no_grad()
def test_scalar_timestep_broadcasts():
    """TangoFlux passes one timestep [1] for the whole CFG batch."""
    _, ours = _pair()
    x = _inputs()
    one = ours(**{**x, "timestep": torch.tensor([0.3])})
    each = ours(**{**x, "timestep": torch.tensor([0.3, 0.3])})
    torch.testing.assert_close(one, each, atol=0, rtol=0)


def test_bad_inputs():
    ours = FluxTransformer(FluxTransformerConfig(**TINY))
    x = _inputs()
    bad = [
        ({"latents": torch.randn(2, 7, 9)}, "latents"),
        ({"latents": torch.randn(7, 8)}, "latents"),
        ({"text": torch.randn(3, 5, 12)}, "text"),
        ({"text": torch.randn(2, 5, 11)}, "text"),
        ({"pooled": torch.randn(2, 11)}, "pooled"),
        ({"timestep": torch.rand(3)}, "timestep"),
        ({"audio_ids": torch.arange(6)}, "audio_ids"),
        ({"text_ids": torch.zeros(5, 2)}, "text_ids"),
        ({"guidance": torch.ones(2)}, "guidance"),
    ]
    for change, name in bad:
        with pytest.raises(ValueError, match=name):
            ours(**{**x, **change})
    with pytest.raises(TypeError, match="latents"):
        ours(**{**x, "latents": [[0.0]]})


def test_loader_names_bad_tensors():
    ref = diffusers.FluxTransformer2DModel(**TINY)
    state = ref.state_dict()
    ours = FluxTransformer(FluxTransformerConfig(**TINY))
    missing = {k: v for k, v in state.items() if k != "transformer_blocks.1.attn.add_k_proj.weight"}
    with pytest.raises(CheckpointError, match=r"missing.*transformer_blocks\.1\.attn\.add_k_proj\.weight"):
        ours.load_diffusers_state_dict(missing)
    with pytest.raises(CheckpointError, match=r"unexpected.*extra\.weight"):
        ours.load_diffusers_state_dict({**state, "extra.weight": torch.zeros(1)})
    wrong = {**state, "proj_out.weight": torch.zeros(3, 32)}
    with pytest.raises(CheckpointError, match="proj_out.weight"):
        ours.load_diffusers_state_dict(wrong)
    wrong = {**state, "single_transformer_blocks.0.proj_mlp.weight": torch.zeros(128, 31)}
    with pytest.raises(CheckpointError, match="proj_mlp"):
        ours.load_diffusers_state_dict(wrong)
    # a full TangoFlux checkpoint holds the transformer under "transformer."
    ours.load_diffusers_state_dict({**{f"transformer.{k}": v for k, v in state.items()}, "fc.0.weight": torch.zeros(1)}, prefix="transformer.")
    torch.testing.assert_close(ours.proj_out.weight, state["proj_out.weight"], atol=0, rtol=0)


def test_released_config_matches_tangoflux_build():
    """The default config has exactly the tensors of FluxTransformer2DModel as tangoflux/model.py
    builds it (checked on the meta device: no memory, no time)."""
    with torch.device("meta"):
        ref = diffusers.FluxTransformer2DModel(
            in_channels=64,
            num_layers=6,
            num_single_layers=18,
            attention_head_dim=128,
            num_attention_heads=8,
            joint_attention_dim=1024,
            pooled_projection_dim=1024,
            guidance_embeds=False,
        )
        ours = FluxTransformer()
    ours.load_diffusers_state_dict(ref.state_dict())  # raises on any missing/unexpected/mis-shaped tensor
    n_ref = sum(p.numel() for p in ref.parameters())
    assert sum(p.numel() for p in ours.parameters()) == n_ref
