"""``pysonic train default --config configs/default/recipe.yaml``: the shipped default model from scratch.

Four stages, each resumable (a killed run picks up where it stopped when rerun with the same config):

1. ``text``: the vocabulary of SonicSynth's training captions, then the offline word encoder
   (:class:`pysonic.text.word_encoder.WordTextEncoder`) pre-trained on the caption attributes
   (:func:`pysonic.train.text_encoder.pretrain_text_encoder`) -> ``<out_dir>/text_encoder/encoder/``;
2. ``vae``: a small Oobleck VAE on SonicSynth audio (:class:`pysonic.train.vae.VAETrainer`)
   -> ``<out_dir>/vae/final.safetensors``;
3. ``flow``: the TangoFlux-architecture velocity model on SonicSynth items with the frozen VAE and
   text encoder, CFG text dropout on (:class:`pysonic.train.flow_matching.FlowMatchingTrainer`)
   -> ``<out_dir>/flow/final.safetensors``;
4. ``package``: the model directory :meth:`pysonic.TangoFlux.from_pretrained` loads with no
   other argument (:func:`write_model_dir`) -> ``model_dir``.

Config (YAML or JSON), every key checked (unknown keys are an error naming them)::

    out_dir: /work/runs/default          # run directory (checkpoints and logs of each stage)
    model_dir: /work/runs/default/model  # the packaged model (default <out_dir>/model)
    data: {sample_rate: 16000, duration: [1.0, 5.0], seed: 0}       # SonicSynth (train split)
    text_encoder: {encoder: {dim, layers, heads, max_tokens}, vocab_captions: N, train: {TrainConfig}}
    vae: {model: {OobleckConfig}, train: {VAETrainConfig without out_dir}, kinds: [...], scale_items: 64,
          refine: {steps: N, <VAETrainConfig loss fields>}}
    flow: {model: {TangoFluxConfig}, train: {FlowMatchingConfig without out_dir}}
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

STAGES = ("text", "vae", "flow", "package")
_TOP = {"out_dir", "model_dir", "data", "text_encoder", "vae", "flow"}
_DATA = {"sample_rate", "duration", "seed"}
_TEXT = {"encoder", "vocab_captions", "train"}
_VAE = {"model", "train", "kinds", "scale_items", "refine"}
_FLOW = {"model", "train", "items", "cache_latents"}


def _check_keys(where: str, d: Any, known: set[str], required: set[str] = frozenset()) -> None:
    if not isinstance(d, Mapping):
        raise ValueError(f"train default: {where!r} must be a mapping, got {type(d).__name__}")
    unknown = sorted(set(d) - known)
    missing = sorted(set(required) - set(d))
    if unknown or missing:
        raise ValueError(f"train default: {where!r}" + (f" has unknown keys {unknown}" if unknown else "")
                         + (f" lacks {missing}" if missing else "") + f"; known: {sorted(known)}")


def check_config(cfg: Mapping[str, Any]) -> None:
    _check_keys("config", cfg, _TOP, {"out_dir", "text_encoder", "vae", "flow"})
    _check_keys("data", cfg.get("data", {}), _DATA)
    _check_keys("text_encoder", cfg["text_encoder"], _TEXT, {"train"})
    _check_keys("vae", cfg["vae"], _VAE, {"model", "train"})
    _check_keys("flow", cfg["flow"], _FLOW, {"model", "train"})
    refine = cfg["vae"].get("refine")
    if refine is not None:
        if not isinstance(refine, Mapping) or not isinstance(refine.get("steps"), int) or refine["steps"] < 1:
            raise ValueError("train default: vae.refine must be a mapping with an integer 'steps' >= 1 "
                             f"(and VAETrainConfig fields to change), got {refine!r}")
        if "out_dir" in refine:
            raise ValueError("train default: vae.refine.out_dir is set by the driver (<out_dir>/vae)")
    for sec in ("text_encoder", "vae", "flow"):
        if "out_dir" in cfg[sec]["train"]:
            raise ValueError(f"train default: {sec}.train.out_dir is set by the driver (<out_dir>/{sec.split('_')[0]})")


def _synth(cfg: Mapping[str, Any], split: str = "train", kinds=None):
    from pysonic.data.synth import SonicSynth

    data = dict(cfg.get("data", {}))
    dur = data.get("duration", (1.0, 5.0))
    dur = tuple(dur) if isinstance(dur, (list, tuple)) else float(dur)
    return SonicSynth(split, sample_rate=int(data.get("sample_rate", 16000)), duration=dur,
                      seed=int(data.get("seed", 0)), kinds=tuple(kinds) if kinds else None)


def _dirs(cfg: Mapping[str, Any]) -> dict[str, Path]:
    out = Path(cfg["out_dir"])
    return {"out": out, "text": out / "text_encoder", "vae": out / "vae", "flow": out / "flow",
            "model": Path(cfg.get("model_dir") or out / "model")}


# ------------------------------------------------------------------------------------ stages


def stage_text(cfg: Mapping[str, Any], log=print) -> Path:
    """Vocabulary + word-encoder pre-training; returns the encoder directory."""
    from pysonic.text.word_encoder import WordEncoderConfig, WordTextEncoder, build_vocab
    from pysonic.train.loop import TrainConfig
    from pysonic.train.text_encoder import pretrain_text_encoder

    d = _dirs(cfg)["text"]
    enc_dir = d / "encoder"
    sec = cfg["text_encoder"]
    tcfg = TrainConfig.from_dict({**sec["train"], "out_dir": str(d)})
    synth = _synth(cfg)
    vocab_file = d / "vocab.json"
    if vocab_file.is_file():  # a resumed run keeps its vocabulary
        vocab = json.loads(vocab_file.read_text())
    else:
        n = int(sec.get("vocab_captions", 20000))
        vocab = build_vocab(synth.spec(i)[1] for i in range(n))
        d.mkdir(parents=True, exist_ok=True)
        tmp = vocab_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(vocab))
        tmp.replace(vocab_file)
    log(f"[text] vocabulary: {len(vocab)} tokens")
    encoder = WordTextEncoder(WordEncoderConfig(vocab=vocab, **dict(sec.get("encoder", {}))))
    torch_seed(tcfg.seed)
    result = pretrain_text_encoder(encoder, synth, tcfg)
    result.encoder.save_pretrained(enc_dir)
    log(f"[text] done: {result.logs}")
    return enc_dir


def torch_dataset_base():
    import torch

    return torch.utils.data.Dataset


def build_vae(spec: Mapping[str, Any]):
    from pysonic.codecs.oobleck import OobleckConfig, OobleckVAE

    import dataclasses

    names = {f.name for f in dataclasses.fields(OobleckConfig)}
    unknown = sorted(set(spec) - names)
    if unknown:
        raise ValueError(f"train default: unknown vae.model keys {unknown}; known: {sorted(names)}")
    return OobleckVAE(OobleckConfig(**spec))


def stage_vae(cfg: Mapping[str, Any], log=print) -> Path:
    from pysonic.train.vae import VAETrainConfig, VAETrainer

    d = _dirs(cfg)["vae"]
    vae = build_vae(cfg["vae"]["model"])
    if vae.sampling_rate != _synth(cfg).sample_rate:
        raise ValueError(f"train default: vae.model.sampling_rate {vae.sampling_rate} differs from data.sample_rate")
    train = dict(cfg["vae"]["train"])
    tcfg = VAETrainConfig.from_dict({**train, "out_dir": str(d)})
    torch_seed(tcfg.seed)
    data = _synth(cfg, kinds=cfg["vae"].get("kinds"))
    logs = VAETrainer(vae, tcfg, data).fit()
    log(f"[vae] done: {logs}")
    refine = dict(cfg["vae"].get("refine") or {})
    if refine:
        # the same run continued for refine.steps more steps with refine's loss settings (its LR
        # schedule spans both phases): spectral terms help the high pitches once the decoder
        # follows its input, but made it collapse when on from the start (measured)
        extra = int(refine.pop("steps"))
        tcfg = VAETrainConfig.from_dict({**train, **refine, "steps": tcfg.steps + extra, "out_dir": str(d)})
        logs = VAETrainer(vae, tcfg, data).fit()
        log(f"[vae] refined: {logs}")
    scale = measure_latent_scale(cfg, load_vae(cfg, scaled=False))
    log(f"[vae] latent scaling_factor {scale:.4g} -> {d / LATENT_SCALE_FILE}")
    return d / "final.safetensors"


LATENT_SCALE_FILE = "latent_scale.json"


def measure_latent_scale(cfg: Mapping[str, Any], vae, log=print) -> float:
    """``1 / std`` of the VAE's posterior means over the first ``vae.scale_items`` (64) SonicSynth
    items at their own level, written to ``vae/latent_scale.json``: the flow model then learns
    latents of unit spread (its ``N(0, 1)`` start), which the VAE's small KL does not ensure."""
    import torch

    from pysonic.data.manifest import fit_channels

    synth = _synth(cfg)
    n = int(cfg["vae"].get("scale_items", 64))
    sq, count = 0.0, 0
    with torch.no_grad():
        for i in range(n):
            wav = fit_channels(synth[i]["audio"], vae.config.audio_channels)[None].to(vae._dtype())
            mean, _ = vae.encode_distribution(wav)
            sq += float(mean.double().pow(2).sum())
            count += mean.numel()
    std = (sq / count) ** 0.5
    if not std > 0:
        raise RuntimeError("train default: the VAE's latents are all zero; cannot scale them")
    path = _dirs(cfg)["vae"] / LATENT_SCALE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"scaling_factor": 1.0 / std, "items": n, "latent_rms": std}))
    tmp.replace(path)
    return 1.0 / std


def load_vae(cfg: Mapping[str, Any], *, scaled: bool = True):
    """The trained VAE; with ``scaled``, its ``scaling_factor`` from ``vae/latent_scale.json``."""
    from pysonic.checkpoints import load_into, read_state_dict

    path = _dirs(cfg)["vae"] / "final.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"train default: {path} not found: run the 'vae' stage first")
    spec = dict(cfg["vae"]["model"])
    scale_file = path.with_name(LATENT_SCALE_FILE)
    if scaled and scale_file.is_file():
        spec["scaling_factor"] = float(json.loads(scale_file.read_text())["scaling_factor"])
    vae = build_vae(spec)
    load_into(vae, read_state_dict(path), source=str(path))
    return vae.eval()


def load_text_encoder(cfg: Mapping[str, Any]):
    from pysonic.text.word_encoder import WordTextEncoder

    path = _dirs(cfg)["text"] / "encoder"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"train default: {path} not found: run the 'text' stage first")
    return WordTextEncoder.from_pretrained(path)


def build_flow_model(spec: Mapping[str, Any]):
    from pysonic.train.tangoflux import build_model

    return build_model(dict(spec))


class SynthLatents(torch_dataset_base()):
    """SonicSynth items encoded by the frozen VAE inside the dataset, so that DataLoader workers
    (``flow.train.num_workers``) encode the next batch while the main process trains.

    Item ``i``: the audio fitted to ``max_duration`` seconds (zero-padded or cropped, as
    :func:`pysonic.train.flow_matching.collate_examples` does), encoded to ``(mean, std)``, and
    ``latents = mean + std * eps`` with ``eps`` from a generator seeded by ``(seed, i)``
    (``sample_posterior=False``: the mean) -> ``{"latents" [T, D], "caption", "duration", "index"}``.
    A pure function of ``i``: resumes are exact whatever the number of workers. With
    ``cache_dir``, an item's latents are written there the first time (atomically) and read back
    afterwards, so later epochs over a finite item set skip the VAE (the cache belongs to one VAE:
    the driver keys it by the VAE weights' checksum).
    """

    def __init__(self, synth, vae, *, max_duration: float, seed: int = 0, sample_posterior: bool = True,
                 cache_dir: str | Path | None = None) -> None:
        self.synth, self.vae = synth, vae.eval().requires_grad_(False)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.n = int(vae.sampling_rate * max_duration)
        self.seed, self.sample_posterior = int(seed), bool(sample_posterior)
        self.sample_rate = vae.sampling_rate

    def __len__(self) -> int:
        return len(self.synth)

    def __getitem__(self, i: int) -> dict:
        import torch

        from pysonic.data.manifest import fit_channels, fit_length

        i = int(i)
        cached = self.cache_dir / f"{i}.pt" if self.cache_dir is not None else None
        if cached is not None and cached.is_file():
            try:
                return torch.load(cached, weights_only=True)
            except Exception:  # a torn file from a killed run: recompute it
                pass
        item = self.synth[i]
        wav = fit_length(fit_channels(item["audio"], self.vae.config.audio_channels), self.n)
        with torch.no_grad():
            mean, std = self.vae.encode_distribution(wav[None].to(self.vae._dtype()))
        mean, std = mean[0].float(), std[0].float()
        z = mean
        if self.sample_posterior:
            g = torch.Generator().manual_seed((self.seed * 0x9E3779B97F4A7C15 + int(i) * 0x94D049BB133111EB) % (2**63 - 1))
            z = mean + std * torch.randn(mean.shape, generator=g)
        out = {"latents": z.T.contiguous(), "caption": item["caption"], "duration": float(item["duration"]),
               "index": i}
        if cached is not None:
            import os

            tmp = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")
            torch.save(out, tmp)
            os.replace(tmp, cached)
        return out


def latent_cache_name(vae_weights: Path, vae_config, tcfg) -> str:
    """The latent cache's folder name: it belongs to these VAE weights *and* this latent layout
    (scale, packing), and to the item crop (seed, duration, posterior sampling)."""
    import hashlib

    h = hashlib.sha256(Path(vae_weights).read_bytes())
    h.update(repr((vae_config.scaling_factor, vae_config.latent_packing)).encode())
    return f"latents_{h.hexdigest()[:16]}_{tcfg.seed}_{tcfg.max_audio_duration:g}_{int(tcfg.sample_posterior)}"


def stage_flow(cfg: Mapping[str, Any], log=print) -> Path:
    from pysonic.train.flow_matching import FlowMatchingConfig, FlowMatchingTrainer

    d = _dirs(cfg)["flow"]
    model = build_flow_model(cfg["flow"]["model"])
    vae, text = load_vae(cfg), load_text_encoder(cfg)
    if model.config.text_dim != text.dim:
        raise ValueError(f"train default: flow.model.joint_attention_dim {model.config.text_dim} is not the "
                         f"text encoder's width {text.dim}")
    if model.config.in_channels != vae.config.latent_channels:
        raise ValueError(f"train default: flow.model.in_channels {model.config.in_channels} is not the VAE's "
                         f"latent width {vae.config.latent_channels}")
    tcfg = FlowMatchingConfig.from_dict({**cfg["flow"]["train"], "out_dir": str(d)})
    torch_seed(tcfg.seed)
    synth = _synth(cfg)
    if cfg["flow"].get("items"):  # a finite item set (epochs over it), e.g. to reuse cached latents
        synth.length = int(cfg["flow"]["items"])
    cache = None
    if cfg["flow"].get("cache_latents", False):
        cache = d / latent_cache_name(_dirs(cfg)["vae"] / "final.safetensors", vae.config, tcfg)
    data = SynthLatents(synth, vae, max_duration=tcfg.max_audio_duration, seed=tcfg.seed,
                        sample_posterior=tcfg.sample_posterior, cache_dir=cache)
    logs = FlowMatchingTrainer(model, tcfg, data, text_encoder=text, vae=vae).fit()
    log(f"[flow] done: {logs}")
    return d / "final.safetensors"


def write_model_dir(out: str | Path, *, model, vae, text_encoder, extra: Mapping[str, Any] | None = None) -> Path:
    """Write the directory :meth:`pysonic.TangoFlux.from_pretrained` loads with no other argument:

    - ``config.json``: the TangoFlux config (+ ``"text_encoder_name": "text_encoder"``, a path
      relative to the directory, and ``extra`` entries starting with ``_``);
    - ``tangoflux.safetensors``: the velocity model in the release's key layout;
    - ``vae/config.json`` + ``vae/diffusion_pytorch_model.safetensors``: the VAE (diffusers layout,
      sample rate and channels in its config);
    - ``text_encoder/``: the :class:`WordTextEncoder` (``config.json`` type ``word_text_encoder``).
    """
    import dataclasses

    from safetensors.torch import save_file

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "vae").mkdir(parents=True)
    mcfg = dataclasses.asdict(model.config)
    mcfg["text_encoder_name"] = "text_encoder"
    for k, v in mcfg.items():
        if isinstance(v, tuple):
            mcfg[k] = list(v)
    mcfg.update({k: v for k, v in (extra or {}).items() if str(k).startswith("_")})
    (tmp / "config.json").write_text(json.dumps(mcfg, indent=1))
    save_file({k: v.detach().float().contiguous() for k, v in model.release_state_dict().items()},
              str(tmp / "tangoflux.safetensors"))
    vcfg = {"_class_name": "AutoencoderOobleck", **dataclasses.asdict(vae.config)}
    vcfg = {k: list(v) if isinstance(v, tuple) else v for k, v in vcfg.items()}
    (tmp / "vae" / "config.json").write_text(json.dumps(vcfg, indent=1))
    save_file({k: v.detach().float().contiguous() for k, v in vae.state_dict().items()},
              str(tmp / "vae" / "diffusion_pytorch_model.safetensors"))
    text_encoder.save_pretrained(tmp / "text_encoder")
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    return out


def stage_package(cfg: Mapping[str, Any], log=print) -> Path:
    from pysonic.checkpoints import load_into, read_state_dict

    from pysonic.train import latest_checkpoint, load_checkpoint

    dirs = _dirs(cfg)
    path = dirs["flow"] / "final.safetensors"
    ckpt = latest_checkpoint(dirs["flow"])
    model = build_flow_model(cfg["flow"]["model"])
    step = None
    if ckpt is not None and (not path.is_file() or ckpt.stat().st_mtime > path.stat().st_mtime):
        # a run stopped before its last step (or extended past its final weights): package the
        # latest checkpoint's weights (its EMA average when it has one), as final.safetensors would
        state = load_checkpoint(ckpt)
        step = int(state["step"])
        weights = state["ema"]["weights"] if "ema" in state else state["model"]
        weights = {k[len("model."):]: v for k, v in weights.items() if k.startswith("model.")}
        load_into(model, weights, source=str(ckpt))
        log(f"[package] flow weights from {ckpt} (step {step}{', EMA' if 'ema' in state else ''})")
    elif path.is_file():
        load_into(model, read_state_dict(path), source=str(path))
    else:
        raise FileNotFoundError(f"train default: neither {path} nor a checkpoint in {dirs['flow']}: run the 'flow' stage first")
    extra = {"_recipe": json.loads(json.dumps(cfg, default=str))}
    if step is not None:
        extra["_flow_step"] = step
    out = write_model_dir(dirs["model"], model=model, vae=load_vae(cfg), text_encoder=load_text_encoder(cfg),
                          extra=extra)
    log(f"[package] wrote {out}")
    return out


def torch_seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def run(cfg: Mapping[str, Any], stages: tuple[str, ...] = STAGES, log=print) -> dict[str, float]:
    """Run ``stages`` of the recipe in order; returns the wall time of each stage in seconds."""
    check_config(cfg)
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise ValueError(f"train default: unknown stages {bad}; stages: {list(STAGES)}")
    fns = {"text": stage_text, "vae": stage_vae, "flow": stage_flow, "package": stage_package}
    times = {}
    for s in STAGES:
        if s in stages:
            t0 = time.perf_counter()
            fns[s](cfg, log=log)
            times[s] = time.perf_counter() - t0
            log(f"[{s}] {times[s]:.1f} s")
    return times


def main(argv: list[str]) -> int:
    from pysonic.train.tangoflux import read_config

    p = argparse.ArgumentParser(prog="pysonic train default",
                                description="Train the default model from scratch (text encoder, VAE, flow model, package).")
    p.add_argument("--config", required=True, help="recipe (see configs/default/recipe.yaml)")
    p.add_argument("--stages", default=",".join(STAGES),
                   help=f"comma-separated stages to run, in order (default: all of {','.join(STAGES)})")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    times = run(read_config(args.config), stages)
    print(json.dumps(times))
    return 0
