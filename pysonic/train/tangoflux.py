"""``pysonic train tangoflux --config FILE``: TangoFlux's three training stages from one config file.

The config (YAML or JSON) has these top-level keys; relative paths are taken from the working
directory (as the release's train.json does):

- ``stage``: ``pretrain`` | ``finetune`` | ``crpo``;
- ``model``: the model's hyperparameters (the release's ``config.json`` keys, see
  :class:`pysonic.models.tangoflux.TangoFluxConfig`), or the path of such a ``config.json``;
  default: the released model;
- ``vae``: the Oobleck VAE (a diffusers directory, a release directory with ``vae.safetensors``,
  or the weights file);
- ``text_encoder``: a local text-encoder directory (FLAN-T5 through ``transformers``, or a
  pysonic ``WordTextEncoder``);
- ``data``: ``train_manifest`` (pretrain / finetune: the JSON manifest with ``audio``,
  ``caption``, ``duration``); for ``crpo``: ``prompts`` (a prompt bank: JSON or one prompt a
  line) and ``scorer`` (a local ``transformers`` ClapModel + ClapProcessor directory);
- ``train``: the trainer's settings, :class:`pysonic.train.flow_matching.FlowMatchingConfig`
  (pretrain / finetune) or :class:`pysonic.train.crpo.CRPOConfig` fields (``out_dir``,
  ``steps``, ``lr``, ``init_from``, ...).

Unknown keys anywhere are an error naming them. Example configs of the three stages are in
``configs/tangoflux/``. Several processes: ``torchrun --nproc_per_node=N -m pysonic train tangoflux
--config FILE``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Mapping

from pysonic.train.config_file import read_config_file

STAGES = ("pretrain", "finetune", "crpo")
_TOP = {"stage", "model", "vae", "text_encoder", "data", "train"}
_DATA = {"pretrain": {"train_manifest"}, "finetune": {"train_manifest"}, "crpo": {"prompts", "scorer"}}


def read_config(path: str | Path) -> dict:
    """Parse a YAML (``.yaml``/``.yml``, needs PyYAML), TOML or JSON config file."""
    return read_config_file(path, what="train tangoflux")


def check_config(cfg: Mapping[str, Any]) -> None:
    """Structural checks; the trainer's own config checks its values."""
    unknown = sorted(set(cfg) - _TOP)
    if unknown:
        raise ValueError(f"train tangoflux: unknown config keys {unknown}; known: {sorted(_TOP)}")
    stage = cfg.get("stage")
    if stage not in STAGES:
        raise ValueError(f"train tangoflux: 'stage' must be one of {list(STAGES)}, got {stage!r}")
    for key in ("vae", "text_encoder"):
        if not isinstance(cfg.get(key), str):
            raise ValueError(f"train tangoflux: {key!r} must name a local path")
    data = cfg.get("data")
    if not isinstance(data, Mapping):
        raise ValueError(f"train tangoflux: 'data' must be a mapping with {sorted(_DATA[stage])}")
    wanted = _DATA[stage]
    unknown = sorted(set(data) - wanted)
    missing = sorted(wanted - set(data))
    if unknown or missing:
        raise ValueError(f"train tangoflux: stage {stage!r} needs data keys {sorted(wanted)}"
                         + (f"; unknown {unknown}" if unknown else "") + (f"; missing {missing}" if missing else ""))
    if not isinstance(cfg.get("train"), Mapping):
        raise ValueError("train tangoflux: 'train' must be a mapping (out_dir, steps, ...)")
    if "stage" in cfg["train"]:
        raise ValueError("train tangoflux: give the stage at the top level, not in 'train'")


def load_text_encoder(path: str | Path):
    """A frozen text encoder from a local directory: pysonic's ``WordTextEncoder`` (its
    config.json says ``"type": "word_text_encoder"``) or FLAN-T5 through ``transformers``."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"train tangoflux: text_encoder {str(path)!r} is not a directory")
    cfg_file = path / "config.json"
    kind = json.loads(cfg_file.read_text()).get("type") if cfg_file.is_file() else None
    if kind == "word_text_encoder":
        from pysonic.text.word_encoder import WordTextEncoder

        return WordTextEncoder.from_pretrained(path)
    from pysonic.text import T5TextEncoder

    return T5TextEncoder(path, max_length=64)  # the release trains with 64 tokens (encode_text)


def build_model(spec: Any):
    """A TangoFluxModel from ``model`` (dict of the release's config.json keys, a path to one, or None)."""
    from pysonic.models.tangoflux import TangoFluxConfig, TangoFluxModel

    if spec is None:
        return TangoFluxModel()
    if isinstance(spec, str):
        p = Path(spec)
        if p.is_dir():
            p = p / "config.json"
        if not p.is_file():
            raise FileNotFoundError(f"train tangoflux: model config {str(p)!r} not found")
        spec = json.loads(p.read_text())
    if not isinstance(spec, Mapping):
        raise ValueError("train tangoflux: 'model' must be a mapping of hyperparameters or a config.json path")
    from dataclasses import fields

    names = {f.name for f in fields(TangoFluxConfig)}
    unknown = sorted(k for k in spec if k not in names and not str(k).startswith("_"))
    if unknown:
        raise ValueError(f"train tangoflux: unknown model keys {unknown}; known: {sorted(names)}")
    return TangoFluxModel(TangoFluxConfig.from_config_dict(spec))


def run(cfg: Mapping[str, Any]) -> dict:
    """Run the stage ``cfg`` describes; returns the trainer's last logged scalars (or the CRPO
    round summary)."""
    check_config(cfg)
    from pysonic.codecs.oobleck import OobleckVAE
    from pysonic.train import init_distributed

    stage = cfg["stage"]
    dist = init_distributed()
    model = build_model(cfg.get("model"))
    vae = OobleckVAE.from_pretrained(cfg["vae"])
    text_encoder = load_text_encoder(cfg["text_encoder"])
    if model.config.text_dim != getattr(text_encoder, "dim", model.config.text_dim):
        raise ValueError(f"train tangoflux: the text encoder's width {text_encoder.dim} is not the model's "
                         f"joint_attention_dim {model.config.text_dim}")
    if vae.config.latent_channels != model.config.in_channels:
        raise ValueError(f"train tangoflux: the VAE's latent width {vae.config.latent_channels} is not the model's "
                         f"in_channels {model.config.in_channels}")
    data = cfg["data"]
    if stage in ("pretrain", "finetune"):
        from pysonic.data.manifest import AudioCaptionDataset
        from pysonic.train.flow_matching import FlowMatchingConfig, FlowMatchingTrainer

        tcfg = FlowMatchingConfig.from_dict({**cfg["train"], "stage": stage})
        dataset = AudioCaptionDataset(data["train_manifest"], sample_rate=vae.sampling_rate,
                                      channels=vae.config.audio_channels, max_duration=tcfg.max_audio_duration)
        return FlowMatchingTrainer(model, tcfg, dataset, text_encoder=text_encoder, vae=vae, dist=dist).fit()
    from pysonic.train.crpo import ClapScorer, CRPOConfig, read_prompts, run_crpo

    tcfg = CRPOConfig.from_dict({**cfg["train"], "stage": stage})
    scorer = ClapScorer.from_pretrained(data["scorer"], device=dist.device)
    return run_crpo(model, tcfg, read_prompts(data["prompts"]), text_encoder=text_encoder, vae=vae,
                    scorer=scorer, dist=dist)


def main(argv: list[str]) -> int:
    """``pysonic train tangoflux --config FILE``."""
    parser = argparse.ArgumentParser(prog="pysonic train tangoflux",
                                     description="TangoFlux training: pre-training, fine-tuning or CRPO (the config's 'stage').")
    parser.add_argument("--config", required=True, help="YAML or JSON config (see configs/tangoflux/)")
    args = parser.parse_args(argv)
    result = run(read_config(args.config))
    print(json.dumps(result, default=str))
    return 0
