"""The training losses against the `tangoflux` package's own ``TangoFlux.forward`` (sft=True for
stages 1-2, sft=False for the DPO of CRPO), at random init with identical weights, fed the same
draws: the package draws from the global RNG, which is replayed here in its order."""
import copy

import pytest
import torch

from pysonic.models.tangoflux import TangoFluxModel
from pysonic.text import T5TextEncoder
from pysonic.train.crpo import dpo_step_loss
from pysonic.train.flow_matching import TangoFluxTrainModule, flow_matching_loss
from tests.models.tangoflux.release import make_release, make_t5

PROMPTS = ["dog barking loudly", "rain falls on a roof", "bird"]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("release")
    t5 = make_t5(tmp / "t5")
    pkg, _ = make_release(tmp / "rel", t5)
    ours = TangoFluxModel.from_pretrained(tmp / "rel")
    te = T5TextEncoder(t5, max_length=64)  # the release's training path tokenises to 64 tokens
    # the package's T5 (perturbed too) is saved inside tangoflux.safetensors, as released
    te.load_release_weights({k[len("text_encoder."):]: v for k, v in pkg.state_dict().items() if k.startswith("text_encoder.")})
    return pkg, ours, te


def _sigmas_from_u(u):
    # FlowMatchEulerDiscreteScheduler(1000): timesteps 1000..1; sigma = timesteps[floor(1000 u)] / 1000
    return ((1000 - (u * 1000).long()).double() / 1000).float()


def test_flow_matching_loss_matches_the_package(release):
    pkg, ours, te = release
    B, T = len(PROMPTS), pkg.audio_seq_len
    latents = torch.randn(B, T, 64)
    duration = torch.tensor([3.0, 10.0, 31.0])  # 31 s is clamped by the duration embedder
    torch.manual_seed(123)
    with torch.no_grad():
        expected, *_ = pkg(latents, PROMPTS, duration=duration, sft=True)
    torch.manual_seed(123)  # replay: noise = randn_like(latents), then u = sigmoid(normal(0, 1, [B]))
    noise = torch.randn_like(latents)
    sigma = _sigmas_from_u(torch.sigmoid(torch.normal(0.0, 1.0, (B,))))
    states, mask = te.encode(PROMPTS)
    with torch.no_grad():
        got = flow_matching_loss(TangoFluxTrainModule(ours), latents, sigma, noise, states, mask, duration)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_dpo_loss_matches_the_package(release):
    pkg, ours, te = release
    B, T = len(PROMPTS), pkg.audio_seq_len
    # the reference: the starting transformer; then the trained model moves away from it
    pkg.ref_transformer = copy.deepcopy(pkg.transformer).requires_grad_(False)
    module = TangoFluxTrainModule(ours)
    module.set_reference(copy.deepcopy(ours.transformer))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in pkg.transformer.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    ours.load_release_state_dict({k: v for k, v in pkg.state_dict().items() if not k.startswith("ref_transformer.")})
    lat_w, lat_l = torch.randn(B, T, 64), torch.randn(B, T, 64)
    duration = torch.tensor([10.0, 5.0, 20.0])
    torch.manual_seed(7)
    with torch.no_grad():
        expected, raw_model, raw_ref, acc = pkg(torch.cat([lat_w, lat_l]), PROMPTS, duration=duration, sft=False)
    torch.manual_seed(7)  # replay: randn_like of all 2B latents, first half kept; u for B pairs
    noise = torch.randn(2 * B, T, 64)[:B]
    sigma = _sigmas_from_u(torch.sigmoid(torch.normal(0.0, 1.0, (B,))))
    states, mask = te.encode(PROMPTS)
    with torch.no_grad():
        got, logs = dpo_step_loss(module, lat_w, lat_l, sigma, noise, states, mask, duration, beta=pkg.beta_dpo)
    assert pkg.beta_dpo == 2000
    assert got.item() == pytest.approx(expected.item(), rel=1e-4)  # beta 2000 amplifies fp32 rounding
    assert logs["raw_model_loss"].item() == pytest.approx(float(raw_model), rel=1e-5)
    assert logs["raw_ref_loss"].item() == pytest.approx(float(raw_ref), rel=1e-5)
    assert logs["implicit_acc"].item() == pytest.approx(float(acc))
