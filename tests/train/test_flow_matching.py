"""TangoFlux stages 1-2 (pysonic.train.flow_matching) with tiny random-weight parts."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pysonic.train.flow_matching import (
    FlowMatchingConfig,
    FlowMatchingTrainer,
    TangoFluxTrainModule,
    example_generators,
    sample_sigmas,
)
from tests.train.resume import check_resume_is_exact
from tests.train.tangoflux_toy import (
    AudioData,
    LatentData,
    fixed_loss,
    script_trainer,
    tiny_model,
    tiny_text_encoder,
    tiny_vae,
)

REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py


def _cfg(tmp_path, steps, **kw):
    base = dict(out_dir=str(tmp_path), steps=steps, batch_size=4, lr=3e-3, log_every=1, ckpt_every=100,
                progress=False, max_audio_duration=0.12)
    base.update(kw)
    return FlowMatchingConfig(**base)


def _batch(trainer, idx=(0, 1, 2, 3)):
    return trainer.loader.collate_fn([trainer.loader.dataset[i] for i in idx])


def test_sigmas_are_the_release_timestep_sampling():
    """diffusers' compute_density_for_timestep_sampling(logit_normal, 0, 1) indexed into
    FlowMatchEulerDiscreteScheduler(1000).timesteps, divided by 1000, as tangoflux/model.py does."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    gens = example_generators(3, 7, range(64))
    ours = sample_sigmas(gens)
    again = example_generators(3, 7, range(64))
    for g, s in zip(again, ours):
        u = compute_density_for_timestep_sampling("logit_normal", 1, logit_mean=0, logit_std=1, mode_scale=None, generator=g)
        t = sched.timesteps[(u * 1000).long()]
        sigma = sched.sigmas[(sched.timesteps == t).nonzero().item()]
        assert s.item() == pytest.approx(sigma.item(), abs=1e-7)  # exact up to fp32 rounding of k / 1000
        assert s.item() == pytest.approx((t / 1000).item(), abs=1e-7)  # what the transformer is given
    assert ours.dtype == torch.float32 and 0 < ours.min() and ours.max() <= 1


def test_draws_do_not_depend_on_the_batch_split(tmp_path):
    """Each example's noise and timestep come from (seed, step, index): a batch's loss is the mean
    of its halves' losses. This is what makes 2 processes x batch 2 equal 1 process x batch 4."""
    tr = FlowMatchingTrainer(tiny_model(), _cfg(tmp_path, 1, uncondition=True, uncondition_prob=0.5), AudioData(),
                             text_encoder=tiny_text_encoder(), vae=tiny_vae())
    whole = fixed_loss(tr, _batch(tr), step=5)
    halves = (fixed_loss(tr, _batch(tr, (0, 1)), step=5) + fixed_loss(tr, _batch(tr, (2, 3)), step=5)) / 2
    assert whole == pytest.approx(halves, rel=1e-5)
    assert fixed_loss(tr, _batch(tr), step=6) != pytest.approx(whole, rel=1e-3)  # other step, other draws


def test_uncondition_zeroes_text_and_duration_token_not_pooled():
    model = tiny_model().eval()
    te = tiny_text_encoder()
    states, mask = te.encode(["a low hum", "loud noise", "a high beep"])
    states, mask = states.detach(), mask
    lat, sigma, dur = torch.randn(3, 12, 8), torch.tensor([0.2, 0.5, 0.9]), torch.tensor([1.0, 0.5, 2.0])
    module = TangoFluxTrainModule(model)
    drop = torch.tensor([False, True, False])
    with torch.no_grad():
        out = module(lat, sigma, states, mask, dur, drop=drop)
        plain = model.velocity(lat, sigma, states, mask, dur)
        pooled = model.pooled_text(states, mask)
        ctx = torch.zeros(3, states.shape[1] + 1, states.shape[2])
        dropped = model.transformer(lat, ctx, pooled, sigma)
    torch.testing.assert_close(out[[0, 2]], plain[[0, 2]], rtol=0, atol=0)
    torch.testing.assert_close(out[1], dropped[1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out[1], plain[1], atol=1e-3)


def test_pretrain_loss_goes_down_duration_embedder_frozen(tmp_path):
    model = tiny_model()
    dur_before = {k: v.clone() for k, v in model.duration_embed.state_dict().items()}
    tr = FlowMatchingTrainer(model, _cfg(tmp_path, 40, ema_decay=0.9), LatentData(), text_encoder=tiny_text_encoder())
    b = _batch(tr)
    before = sum(fixed_loss(tr, b, 1000 + s) for s in range(8)) / 8
    tr.fit()
    after = sum(fixed_loss(tr, b, 1000 + s) for s in range(8)) / 8
    assert after < 0.6 * before, (before, after)
    # the released optimizer holds the transformer and fc only
    for k, v in model.duration_embed.state_dict().items():
        assert torch.equal(v, dur_before[k]), k
    final = load_file(tmp_path / "final.safetensors")
    assert set(final) == set(model.state_dict())  # the model's own keys (EMA weights)
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(lines) == 40 and "sigma_mean" in lines[0]


def test_resume_is_exact(tmp_path):
    """Stopped after step 3 (last checkpoint at step 2), resumed in a new trainer: the same weights
    as an uninterrupted run (VAE posterior sampling and CFG dropout included)."""
    def make(out, **kw):
        return FlowMatchingTrainer(tiny_model(), _cfg(out, 5, ckpt_every=2, uncondition=True, uncondition_prob=0.5, **kw),
                                   AudioData(), text_encoder=tiny_text_encoder(), vae=tiny_vae())

    check_resume_is_exact(make, tmp_path)


def test_ddp_two_processes_match_one(tmp_path):
    """torchrun, 2 CPU processes on gloo with batch 2 each == 1 process with batch 4."""
    port = 29700 + os.getpid() % 1000
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           "-m", "tests.train.tangoflux_toy", str(tmp_path / "ddp"), "3", "batch_size=2"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    script_trainer(tmp_path / "one", 3, batch_size=4).fit()  # the same script's trainer, in this process
    a, b = load_file(tmp_path / "ddp" / "final.safetensors"), load_file(tmp_path / "one" / "final.safetensors")
    for k in a:
        # all-reduce summation order only (measured: 5e-6 max); a missing sync differs by ~lr = 2e-3
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4)
    assert any(not torch.equal(a[k], tiny_model().state_dict()[k]) for k in a)  # it did train


def test_finetune_starts_from_init_from(tmp_path):
    src = tiny_model(seed=5)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "own.safetensors"))
    save_file({k: v.contiguous() for k, v in src.release_state_dict().items()}, str(tmp_path / "release.safetensors"))
    with pytest.raises(ValueError, match="init_from"):
        FlowMatchingConfig(out_dir=str(tmp_path), steps=1, stage="finetune")
    for name in ("own", "release"):
        model = tiny_model(seed=0)
        FlowMatchingTrainer(model, _cfg(tmp_path / name, 1, stage="finetune", init_from=str(tmp_path / f"{name}.safetensors")),
                            LatentData(), text_encoder=tiny_text_encoder())
        for k, v in src.state_dict().items():
            torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="init_from"):
        FlowMatchingTrainer(tiny_model(), _cfg(tmp_path / "x", 1, init_from=str(tmp_path / "none.safetensors")),
                            LatentData(), text_encoder=tiny_text_encoder())


def test_bf16_autocast_and_bad_config(tmp_path):
    tr = FlowMatchingTrainer(tiny_model(), _cfg(tmp_path, 2, precision="bf16"), AudioData(),
                             text_encoder=tiny_text_encoder(), vae=tiny_vae())
    logs = tr.fit()
    assert torch.isfinite(torch.tensor(logs["loss"]))
    with pytest.raises(ValueError, match="stage"):
        FlowMatchingConfig(out_dir="x", steps=1, stage="crpo")
    with pytest.raises(ValueError, match="unknown keys"):
        FlowMatchingConfig.from_dict({"out_dir": "x", "steps": 1, "uncond": True})
    with pytest.raises(ValueError, match="no vae"):
        tr2 = FlowMatchingTrainer(tiny_model(), _cfg(tmp_path / "b", 1), AudioData(), text_encoder=tiny_text_encoder())
        tr2.fit()


def test_items_at_another_rate_are_resampled(tmp_path):
    """A dataset with a ``sample_rate`` attribute (SonicSynth's convention) at 1.6 kHz: resampled to
    the VAE's 800 Hz, channels fitted, padded to max_audio_duration."""
    from pysonic.audio import resample

    class Rated(torch.utils.data.Dataset):
        sample_rate = 1600

        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"audio": torch.sin(torch.arange(160.0) * (i + 1) / 10)[None], "caption": "a low hum",
                    "duration": 0.1, "attributes": {"kind": "tone"}}

    tr = FlowMatchingTrainer(tiny_model(), _cfg(tmp_path, 1), Rated(), text_encoder=tiny_text_encoder(), vae=tiny_vae())
    batch = _batch(tr)
    assert batch["audio"].shape == (4, 2, 96) and "attributes" not in batch
    want = resample(Rated()[2]["audio"], 1600, 800)
    torch.testing.assert_close(batch["audio"][2, :, :80], want.expand(2, -1), rtol=0, atol=0)
    assert batch["audio"][:, :, 80:].abs().max() == 0
    assert torch.equal(batch["index"], torch.arange(4))


def test_uncondition_from_the_model_config(tmp_path):
    """The release keeps 'uncondition' in the model config: it turns CFG dropout on too."""
    from pysonic.models.tangoflux import TangoFluxConfig, TangoFluxModel
    from tests.train.tangoflux_toy import MODEL_CONFIG

    model = TangoFluxModel(TangoFluxConfig(**MODEL_CONFIG, uncondition=True))
    tr = FlowMatchingTrainer(model, _cfg(tmp_path, 1, uncondition_prob=1.0), LatentData(), text_encoder=tiny_text_encoder())
    _, logs = tr.compute_loss(tr.model, _batch(tr))
    assert tr.uncondition and logs["dropped"] == 1.0
    tr = FlowMatchingTrainer(tiny_model(), _cfg(tmp_path / "b", 1, uncondition_prob=1.0), LatentData(),
                             text_encoder=tiny_text_encoder())
    _, logs = tr.compute_loss(tr.model, _batch(tr))
    assert not tr.uncondition and logs["dropped"] == 0.0
