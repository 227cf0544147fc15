"""One TangoFlux transformer forward (the released config at random weights): 645 audio tokens,
65 text tokens (64 T5 tokens + the duration token), CFG batch of 2; pysonic's FluxTransformer vs
diffusers' FluxTransformer2DModel with the same weights, fp32 and bf16 autocast.

On CUDA when available (one H100 forward is milliseconds); on CPU it is ~1.4 TFLOP per forward,
so expect seconds per round.
"""
import pytest
import torch

from pysonic.models.tangoflux import FluxTransformer

diffusers = pytest.importorskip("diffusers")

B, TA, TT = 2, 645, 65
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    ref = diffusers.FluxTransformer2DModel(
        in_channels=64, num_layers=6, num_single_layers=18, attention_head_dim=128,
        num_attention_heads=8, joint_attention_dim=1024, pooled_projection_dim=1024, guidance_embeds=False,
    ).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours = FluxTransformer().eval()
    ours.load_diffusers_state_dict(ref.state_dict())
    x = dict(
        latents=torch.randn(B, TA, 64), text=torch.randn(B, TT, 1024), pooled=torch.randn(B, 1024),
        timestep=torch.tensor([0.7]),
    )
    x = {k: v.to(DEVICE) for k, v in x.items()}
    txt_ids = torch.zeros(TT, 3, device=DEVICE)
    audio_ids = torch.arange(TA, device=DEVICE)[:, None].expand(-1, 3).float()
    return ref.to(DEVICE), ours.to(DEVICE), x, txt_ids, audio_ids


@pytest.mark.parametrize("impl", ["pysonic", "diffusers"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_flux_transformer_forward(benchmark, models, impl, dtype):
    torch.set_num_threads(2) if DEVICE == "cpu" else None
    ref, ours, x, txt_ids, audio_ids = models
    if impl == "pysonic":
        fn = lambda: ours(**x)  # noqa: E731
    else:
        fn = lambda: ref(  # noqa: E731
            hidden_states=x["latents"], encoder_hidden_states=x["text"], pooled_projections=x["pooled"],
            timestep=x["timestep"], img_ids=audio_ids, txt_ids=txt_ids, return_dict=False,
        )[0]

    def run():
        with torch.inference_mode(), torch.autocast(DEVICE, dtype=DTYPES[dtype] or torch.float32, enabled=DTYPES[dtype] is not None):
            out = fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    n_params = sum(p.numel() for p in ours.parameters())
    T = TA + TT
    # matmuls: 2 * params * tokens; attention: 4 * T^2 * width per layer
    flops = 2.0 * n_params * B * T + 24 * 4.0 * B * T * T * 1024
    benchmark.group = f"flux_transformer fwd B={B} Ta={TA} Tt={TT} {dtype} {DEVICE}"
    benchmark.extra_info.update(op="flux_transformer", impl=impl, dtype=dtype, flops=flops, bytes=0)
    benchmark.pedantic(run, rounds=3 if DEVICE == "cpu" else 20, iterations=1, warmup_rounds=1)
