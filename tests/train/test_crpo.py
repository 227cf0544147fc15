"""CRPO (pysonic.train.crpo): the DPO loss, the DPO trainer, CLAP scoring, pairs and rounds."""
import json
import math

import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from pysonic.train.crpo import (
    ClapScorer,
    CRPOConfig,
    DPOTrainer,
    build_pairs,
    dpo_flow_loss,
    pipeline_generate_fn,
    read_prompts,
    run_crpo,
)
from pysonic.train.flow_matching import FlowMatchingConfig, FlowMatchingTrainer
from tests.train.resume import check_resume_is_exact
from tests.train.tangoflux_toy import (
    CAPTIONS,
    LatentData,
    PairLatentData,
    script_trainer,
    tiny_clap_dir,
    tiny_model,
    tiny_text_encoder,
    tiny_vae,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py


def test_dpo_flow_loss_values():
    target = torch.randn(4, 5, 3)
    pred = target + 0.5 * torch.randn(4, 5, 3)
    loss, logs = dpo_flow_loss(pred, pred.clone(), target)  # the model is its reference
    e = ((pred - target) ** 2).mean((1, 2))
    assert loss.item() == pytest.approx(math.log(2) + e[:2].mean().item(), rel=1e-6)
    assert logs["implicit_acc"].item() == 0.0
    assert logs["raw_model_loss"].item() == pytest.approx(e.mean().item(), rel=1e-6)
    # better than the reference on the chosen half, worse on the rejected: the DPO term vanishes
    better = pred.clone()
    better[:2] = target[:2]
    loss, logs = dpo_flow_loss(better, pred, target, beta=2000)
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and logs["implicit_acc"].item() == 1.0
    # the other way round: -logsigmoid(-beta/2 * margin) = beta/2 * margin for a large margin
    loss, _ = dpo_flow_loss(pred, better, target, beta=2000)
    margin = e[:2].mean().item()
    assert loss.item() == pytest.approx(1000 * margin + margin, rel=1e-4)


def test_dpo_trainer_shares_noise_and_timestep_within_a_pair(tmp_path):
    """chosen == reject and model == reference: every pair's DPO term is -logsigmoid(0) = log 2,
    which holds only if both halves get the same noise and timestep."""
    class Same(PairLatentData):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            return {**item, "reject_latents": item["chosen_latents"]}

    tr = DPOTrainer(tiny_model(), CRPOConfig(out_dir=str(tmp_path), steps=1, batch_size=4, progress=False), Same(),
                    text_encoder=tiny_text_encoder())
    batch = tr.loader.collate_fn([tr.loader.dataset[i] for i in range(4)])
    with torch.no_grad():
        loss, logs = tr.compute_loss(tr.model, batch)
    assert loss.item() == pytest.approx(math.log(2) + logs["raw_model_loss"], rel=1e-5)


def _dpo_eval(tr, batch, draws=16):
    out = {}
    for s in range(draws):
        tr.step = 1000 + s
        with torch.no_grad():
            loss, logs = tr.compute_loss(tr.model, batch)
        for k, v in {"loss": float(loss), **logs}.items():
            out[k] = out.get(k, 0.0) + float(v) / draws
    tr.step = 0
    return out


def test_dpo_loss_goes_down_beta_2000(tmp_path):
    """As the release runs it: CRPO after (a short) flow-matching training, beta 2000, small lr."""
    model = tiny_model()
    FlowMatchingTrainer(model, FlowMatchingConfig(out_dir=str(tmp_path / "fm"), steps=40, batch_size=4, lr=3e-3,
                                                  progress=False, log_every=40, ckpt_every=40),
                        LatentData(), text_encoder=tiny_text_encoder()).fit()
    start = {k: v.clone() for k, v in model.transformer.state_dict().items()}
    tr = DPOTrainer(model, CRPOConfig(out_dir=str(tmp_path / "dpo"), steps=40, batch_size=4, lr=1e-5, progress=False,
                                      log_every=10, ckpt_every=40), PairLatentData(), text_encoder=tiny_text_encoder())
    batch = tr.loader.collate_fn([tr.loader.dataset[i] for i in range(4)])
    before = _dpo_eval(tr, batch)
    tr.fit()
    after = _dpo_eval(tr, batch)
    assert tr.config.beta_dpo == 2000
    assert after["loss"] < 0.9 * before["loss"], (before, after)
    assert after["implicit_acc"] > before["implicit_acc"] + 0.3, (before, after)
    # the reference stays the starting transformer; the model moved
    for k, v in tr.model.reference.state_dict().items():
        assert torch.equal(v, start[k]), k
    assert any(not torch.equal(v, start[k]) for k, v in model.transformer.state_dict().items())


def test_dpo_resume_is_exact(tmp_path):
    check_resume_is_exact(lambda out: script_trainer(out, 4, stage="dpo"), tmp_path)


@pytest.mark.filterwarnings("ignore:At least one mel filter")  # the tiny CLAP feature extractor
def test_clap_scorer_is_the_cosine_of_clap_embeddings(tmp_path):
    scorer = ClapScorer.from_pretrained(tiny_clap_dir(tmp_path / "clap"))
    g = torch.Generator().manual_seed(0)
    audio = 0.3 * torch.randn(3, 2, 800, generator=g)  # stereo at 800 Hz -> mono, resampled to 8 kHz
    caps = ["a low hum", "loud noise", "a low hum"]
    s = scorer.score(audio, 800, caps)
    assert s.shape == (3,) and torch.isfinite(s).all() and (s.abs() <= 1 + 1e-6).all()
    # one clip at a time gives the same scores (batching does not mix items)
    for i in range(3):
        assert scorer.score(audio[i : i + 1], 800, caps[i : i + 1]).item() == pytest.approx(s[i].item(), abs=1e-5)
    # the same clip against another caption scores differently
    assert scorer.score(audio[:1], 800, ["quiet clicks"]).item() != pytest.approx(s[0].item(), abs=1e-6)
    with pytest.raises(ValueError, match="captions"):
        scorer.score(audio, 800, caps[:2])
    with pytest.raises(FileNotFoundError, match="ClapScorer"):
        ClapScorer.from_pretrained(tmp_path / "missing")


class EnergyScorer:
    """A deterministic stand-in for CLAP: mean square of the clip (and it records its calls)."""

    def __init__(self):
        self.calls = []

    def score(self, audio, sample_rate, captions):
        self.calls.append((tuple(audio.shape), sample_rate, list(captions)))
        return audio.float().pow(2).mean((1, 2))


def test_build_pairs_best_vs_worst(tmp_path):
    def generate(prompts, duration, n, generator):
        amp = torch.rand(len(prompts) * n, 1, 1, generator=generator) + 0.1
        return amp * torch.ones(len(prompts) * n, 2, int(100 * duration))

    scorer = EnergyScorer()
    prompts = [{"caption": c, "duration": None} for c in CAPTIONS[:3]]
    path = build_pairs(tmp_path, prompts, generate_fn=generate, scorer=scorer, sample_rate=100, num_candidates=4,
                       duration=1.0, seed=3, batch_prompts=2)
    pairs = json.loads(path.read_text())
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert [p["caption"] for p in pairs] == CAPTIONS[:3] and all(p["duration"] == 1.0 for p in pairs)
    for p, s in zip(pairs, scores):
        vals = [c["score"] for c in s["candidates"]]
        assert p["chosen"] == s["candidates"][vals.index(max(vals))]["audio"]
        assert p["reject"] == s["candidates"][vals.index(min(vals))]["audio"]
        wav, sr = sf.read(tmp_path / p["chosen"])
        assert sr == 100 and wav.shape == (100, 2)
        assert float((wav ** 2).mean()) == pytest.approx(max(vals), rel=1e-5)
    assert scorer.calls[0][2] == [CAPTIONS[0]] * 4 + [CAPTIONS[1]] * 4  # each candidate scored with its prompt


def test_read_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("a low hum\n\nloud noise\n")
    (tmp_path / "p.json").write_text(json.dumps(["a", {"captions": "b", "duration": 5}, {"caption": "c", "audio": "x.wav"}]))
    assert [p["caption"] for p in read_prompts(tmp_path / "p.txt")] == ["a low hum", "loud noise"]
    assert read_prompts(tmp_path / "p.json")[1] == {"caption": "b", "duration": 5.0}
    (tmp_path / "bad.json").write_text(json.dumps([{"duration": 1}]))
    with pytest.raises(ValueError, match="entry 0"):
        read_prompts(tmp_path / "bad.json")


def test_crpo_rounds_end_to_end(tmp_path):
    """Two rounds with the pipeline's sampler (tiny model), a stand-in scorer, DPO on the pairs;
    round 2 starts from round 1's weights; a second call finds the rounds done."""
    model, vae, te = tiny_model(), tiny_vae(), tiny_text_encoder()
    cfg = CRPOConfig(out_dir=str(tmp_path), steps=2, batch_size=2, lr=1e-4, rounds=2, num_candidates=3, gen_steps=2,
                     gen_duration=1.0, max_audio_duration=1.0, prompts_per_round=2, progress=False, log_every=1,
                     ckpt_every=2)
    prompts = [{"caption": c, "duration": None} for c in CAPTIONS]
    scorer = EnergyScorer()
    result = run_crpo(model, cfg, prompts, text_encoder=te, vae=vae, scorer=scorer)
    assert [r["round"] for r in result["rounds"]] == [0, 1]
    for r in (0, 1):
        rdir = tmp_path / f"round_{r:02d}"
        pairs = json.loads((rdir / "pairs.json").read_text())
        assert len(pairs) == 2 and len(list((rdir / "audio").glob("*.wav"))) == 6
        assert (rdir / "final.safetensors").is_file() and (rdir / "log.jsonl").is_file()
    # generation ran through the pipeline: clips of the model's latent length, crop to the duration
    shape, sr, caps = scorer.calls[0]
    assert shape == (3, 2, 96) and sr == 800 and caps == [caps[0]] * 3  # 3 candidates of one prompt
    r0 = load_file(tmp_path / "round_00" / "final.safetensors")
    final = load_file(tmp_path / "final.safetensors")
    assert set(final) == set(model.state_dict())
    for k, v in model.state_dict().items():
        torch.testing.assert_close(final[k], v, rtol=0, atol=0)
    assert any(not torch.equal(r0[k], final[k]) for k in final)  # round 2 trained further
    again = run_crpo(tiny_model(), cfg, prompts, text_encoder=te, vae=vae, scorer=EnergyScorer())
    assert all(r.get("skipped") for r in again["rounds"])
    for k, v in load_file(tmp_path / "final.safetensors").items():
        torch.testing.assert_close(v, final[k], rtol=0, atol=0)


def test_pipeline_generate_fn_is_the_pipeline(tmp_path):
    from pysonic.pipelines.tangoflux import TangoFlux

    model, vae, te = tiny_model(), tiny_vae(), tiny_text_encoder()
    fn = pipeline_generate_fn(model, vae, te, steps=3, guidance_scale=4.5)
    got = fn(["a low hum", "loud noise"], 1.0, 2, torch.Generator().manual_seed(1))
    ref = TangoFlux(model, vae, te).generate(["a low hum", "loud noise"], duration=1.0, steps=3, guidance_scale=4.5,
                                             num_samples_per_prompt=2, generator=torch.Generator().manual_seed(1),
                                             progress=False)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    model.train()
    fn(["a low hum"], 1.0, 1, torch.Generator().manual_seed(1))
    assert model.training  # generation does not leave the model in eval mode


def test_crpo_config_checks():
    with pytest.raises(ValueError, match="num_candidates"):
        CRPOConfig(out_dir="x", steps=1, num_candidates=1)
    with pytest.raises(ValueError, match="gen_duration"):
        CRPOConfig(out_dir="x", steps=1, gen_duration=40.0)
    with pytest.raises(ValueError, match="uncondition"):
        CRPOConfig(out_dir="x", steps=1, uncondition=True)
    with pytest.raises(ValueError, match="stage"):
        CRPOConfig(out_dir="x", steps=1, stage="pretrain")
