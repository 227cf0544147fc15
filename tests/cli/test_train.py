"""``pysonic train tangoflux --config FILE`` through the three stages, with tiny local files."""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file

from pysonic.cli import main
from pysonic.cli.train import TRAINERS, resolve
from pysonic.train.tangoflux import check_config, load_text_encoder, read_config
from tests.models.tangoflux.release import make_t5
from tests.train.tangoflux_toy import CAPTIONS, MODEL_CONFIG, tiny_clap_dir, tiny_vae

REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py


def _files(tmp_path):
    vae = tiny_vae()
    vdir = tmp_path / "vae"
    vdir.mkdir()
    (vdir / "config.json").write_text(json.dumps({"_class_name": "AutoencoderOobleck", **dataclasses.asdict(vae.config)}))
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(vdir / "diffusion_pytorch_model.safetensors"))
    t5 = make_t5(tmp_path / "t5", d_model=MODEL_CONFIG["joint_attention_dim"])
    rows = []
    for i, cap in enumerate(CAPTIONS):
        t = np.arange(int(1600 * 0.2)) / 1600  # 1.6 kHz files, resampled to the VAE's 800 Hz
        wav = 0.4 * np.sin(2 * np.pi * (50 + 40 * i) * t).astype(np.float32)
        sf.write(tmp_path / f"c{i}.wav", wav if i % 2 else np.stack([wav, wav], 1), 1600)
        rows.append({"location": f"c{i}.wav", "captions": cap, "duration": 0.2})  # the release's spelling
    (tmp_path / "train.json").write_text(json.dumps(rows))
    (tmp_path / "prompts.txt").write_text("\n".join(CAPTIONS))
    return {"model": dict(MODEL_CONFIG), "vae": str(vdir), "text_encoder": str(t5)}


@pytest.mark.filterwarnings("ignore:At least one mel filter")  # the tiny CLAP feature extractor
def test_three_stages(tmp_path, capsys):
    base = _files(tmp_path)
    common = dict(batch_size=2, lr=1e-3, log_every=1, ckpt_every=2, progress=False)

    def run(name, cfg):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(cfg))
        assert main(["train", "tangoflux", "--config", str(path)]) == 0, capsys.readouterr().err

    pre = tmp_path / "pre"
    run("pre", {**base, "stage": "pretrain", "data": {"train_manifest": str(tmp_path / "train.json")},
                "train": {**common, "out_dir": str(pre), "steps": 2, "max_audio_duration": 0.12}})
    assert (pre / "final.safetensors").is_file() and (pre / "checkpoints" / "step_2.pt").is_file()
    fin = tmp_path / "fin"
    run("fin", {**base, "stage": "finetune", "data": {"train_manifest": str(tmp_path / "train.json")},
                "train": {**common, "out_dir": str(fin), "steps": 2, "max_audio_duration": 0.12,
                          "init_from": str(pre / "final.safetensors")}})
    a, b = load_file(pre / "final.safetensors"), load_file(fin / "final.safetensors")
    assert set(a) == set(b) and any(not torch.equal(a[k], b[k]) for k in a)
    crpo = tmp_path / "crpo"
    run("crpo", {**base, "stage": "crpo",
                 "data": {"prompts": str(tmp_path / "prompts.txt"), "scorer": str(tiny_clap_dir(tmp_path / "clap"))},
                 "train": {**common, "out_dir": str(crpo), "steps": 2, "rounds": 1, "num_candidates": 2,
                           "prompts_per_round": 2, "gen_steps": 2, "gen_duration": 1.0, "max_audio_duration": 1.0,
                           "init_from": str(fin / "final.safetensors")}})
    pairs = json.loads((crpo / "round_00" / "pairs.json").read_text())
    assert len(pairs) == 2 and {p["caption"] for p in pairs} <= set(CAPTIONS)
    assert (crpo / "final.safetensors").is_file()
    log = [json.loads(line) for line in (crpo / "round_00" / "log.jsonl").read_text().splitlines()]
    assert {"loss", "implicit_acc", "raw_model_loss", "raw_ref_loss"} <= set(log[-1])


def test_config_errors(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    good = {"stage": "pretrain", "vae": "v", "text_encoder": "t", "data": {"train_manifest": "m"}, "train": {}}
    check_config(good)
    for cfg, match in [
        ({**good, "stage": "dpo"}, "stage"),
        ({**good, "extra": 1}, "unknown config keys"),
        ({**good, "data": {"prompts": "p"}}, "data keys"),
        ({**good, "vae": None}, "'vae'"),
        ({**good, "train": {"stage": "crpo"}}, "top level"),
    ]:
        with pytest.raises(ValueError, match=match):
            check_config(cfg)
    bad.write_text(json.dumps({**good, "stage": "dpo"}))
    assert main(["train", "tangoflux", "--config", str(bad)]) == 2
    assert "pysonic train: error" in capsys.readouterr().err
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot parse"):
        read_config(bad)


def test_registry_and_example_configs(tmp_path):
    assert resolve("tangoflux").__module__ == "pysonic.train.tangoflux"
    with pytest.raises(ValueError, match="unknown trainer"):
        resolve("nope")
    assert all(":" in v for v in TRAINERS.values())
    for stage in ("pretrain", "finetune", "crpo"):
        cfg = read_config(REPO / "configs" / "tangoflux" / f"{stage}.yaml")
        check_config(cfg)
        assert cfg["stage"] == stage
        from pysonic.train.crpo import CRPOConfig
        from pysonic.train.flow_matching import FlowMatchingConfig

        kind = CRPOConfig if stage == "crpo" else FlowMatchingConfig
        kind.from_dict({**cfg["train"], "stage": stage})  # every key is a real setting


def test_word_text_encoder_directory(tmp_path):
    from pysonic.text.word_encoder import WordEncoderConfig, WordTextEncoder

    WordTextEncoder(WordEncoderConfig(vocab=["<pad>", "<unk>", "<num>", "<note>", "<eos>", "hum"], dim=8, layers=1,
                                      heads=2)).save_pretrained(tmp_path / "w")
    assert isinstance(load_text_encoder(tmp_path / "w"), WordTextEncoder)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_text_encoder(tmp_path / "none")
