"""CRPO (CLAP-Ranked Preference Optimization): TangoFlux's third stage.

One round, as the release does it (tangoflux/generate_crpo_dataset.py, label_crpo.py,
train_dpo.py and model.py ``forward(..., sft=False)``):

1. generate ``num_candidates`` (5) clips per prompt with the current model (50 Euler steps,
   guidance 4.5, 10 s);
2. score each clip against its prompt with a CLAP-style model (cosine of the normalised audio and
   text embeddings) and keep the best as ``chosen`` and the worst as ``reject``; write the clips,
   the scores and the pair manifest (``chosen``, ``reject``, ``caption``, ``duration``);
3. train on the pairs with the DPO loss for flow matching against a frozen reference, the model as
   it was when the round started:
   per pair, one timestep (logit-normal, as in :mod:`pysonic.train.flow_matching`) and one noise
   shared by chosen and reject; ``e_w``, ``e_l`` the model's per-example MSE to the target
   ``noise - latents``, ``r_w``, ``r_l`` the reference's;
   ``loss = -logsigmoid(-beta / 2 * ((e_w - e_l) - (r_w - r_l))).mean() + e_w.mean()``
   with ``beta = 2000``;

then the next round starts from the trained weights (its reference is the new starting point).
As in the release, the reference is a frozen copy of the *transformer*: it is fed the conditioning
(pooled text projection, text + duration token) computed by the trained model.

Several processes: generation and scoring run on rank 0 (the others wait), DPO runs on all.

Differences from the release, on purpose: the clips are generated at the round's duration and
kept at that length (the release generates 645 frames and keeps 220, 10.2 s), and the pair
manifest records that duration (the release copies the prompt bank's).
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pysonic.audio import resample
from pysonic.data.manifest import PairDataset, write_pair_manifest
from pysonic.train import init_distributed
from pysonic.train.flow_matching import (
    FlowMatchingConfig,
    FlowMatchingTrainer,
    example_generators,
    load_model_weights,
)

__all__ = [
    "CRPOConfig",
    "DPOTrainer",
    "AudioTextScorer",
    "ClapScorer",
    "dpo_flow_loss",
    "dpo_step_loss",
    "read_prompts",
    "build_pairs",
    "run_crpo",
]

BETA_DPO = 2000.0  # model.py: self.beta_dpo = 2000


@dataclass
class CRPOConfig(FlowMatchingConfig):
    """Flow-matching config plus the CRPO round settings; ``steps`` is the number of DPO steps
    of each round."""

    stage: str = "crpo"
    beta_dpo: float = BETA_DPO
    rounds: int = 1
    prompts_per_round: int | None = None  # None: every prompt each round (the release samples 20000)
    num_candidates: int = 5  # generate_crpo_dataset.py --num_samples
    gen_steps: int = 50  # --num_steps
    guidance_scale: float = 4.5  # --guidance_scale
    gen_duration: float = 10.0  # inference_flow(duration=10)
    gen_batch_prompts: int = 1  # prompts per generation call

    STAGES = ("crpo",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.uncondition:
            raise ValueError("CRPOConfig: uncondition (CFG dropout) is not part of DPO training")
        if self.rounds < 1:
            raise ValueError(f"CRPOConfig: rounds must be >= 1, got {self.rounds}")
        if self.num_candidates < 2:
            raise ValueError(f"CRPOConfig: num_candidates must be >= 2 (best vs worst), got {self.num_candidates}")
        if self.prompts_per_round is not None and self.prompts_per_round < 1:
            raise ValueError(f"CRPOConfig: prompts_per_round must be >= 1 or None, got {self.prompts_per_round}")
        if self.gen_steps < 1 or self.gen_batch_prompts < 1:
            raise ValueError("CRPOConfig: gen_steps and gen_batch_prompts must be >= 1")
        if not 0 < self.gen_duration <= self.max_audio_duration:
            raise ValueError(
                f"CRPOConfig: gen_duration must be in (0, max_audio_duration={self.max_audio_duration}], got {self.gen_duration}"
            )
        if not self.beta_dpo > 0:
            raise ValueError(f"CRPOConfig: beta_dpo must be > 0, got {self.beta_dpo}")


# ---------------------------------------------------------------------------- DPO loss


def dpo_flow_loss(pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor, *, beta: float = BETA_DPO
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TangoFlux's DPO loss for flow matching.

    Args:
        pred, ref_pred, target: ``[2B, ...]``, the chosen examples first, then the rejected ones.
        beta: ``beta_dpo``.

    Returns:
        the loss and ``{"raw_model_loss", "raw_ref_loss", "implicit_acc"}`` (as the release logs).
    """
    e = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
    r = F.mse_loss(ref_pred.float(), target.float(), reduction="none").flatten(1).mean(1)
    e_w, e_l = e.chunk(2)
    r_w, r_l = r.chunk(2)
    inside = -0.5 * beta * ((e_w - e_l) - (r_w - r_l))
    loss = -F.logsigmoid(inside).mean() + e_w.mean()
    logs = {
        "raw_model_loss": 0.5 * (e_w.mean() + e_l.mean()).detach(),
        "raw_ref_loss": r.mean().detach(),
        "implicit_acc": (inside > 0).float().mean().detach(),
    }
    return loss, logs


class DPOTrainer(FlowMatchingTrainer):
    """DPO on a pair dataset (items ``chosen``, ``reject`` audio or ``chosen_latents`` /
    ``reject_latents``, ``caption``, ``duration``).

    The reference is a frozen copy of the transformer taken after ``init_from`` is loaded and
    before any step (a resumed run rebuilds the same one); it is fed the conditioning of the
    trained model (its text projection and duration token), as the release's ``ref_transformer``.
    """

    audio_keys = ("chosen", "reject")

    def __init__(self, model: nn.Module, config: CRPOConfig, dataset, *, text_encoder, vae=None,
                 optimizer=None, dist=None) -> None:
        if config.init_from:
            load_model_weights(model, config.init_from)
            config = dataclasses.replace(config, init_from=None)
        reference = copy.deepcopy(model.transformer)
        super().__init__(model, config, dataset, text_encoder=text_encoder, vae=vae, optimizer=optimizer, dist=dist)
        self.model.set_reference(reference.to(self.dist.device))

    def compute_loss(self, model, batch):
        cfg = self.config
        gens = example_generators(cfg.seed, int(self.step), batch["index"])
        lat_w = self.encode_audio(batch, "chosen", gens)
        lat_l = self.encode_audio(batch, "reject", gens)
        if lat_w.shape != lat_l.shape:
            raise ValueError(f"DPOTrainer: chosen latents {tuple(lat_w.shape)} and reject {tuple(lat_l.shape)} differ in shape")
        states, mask = self.encode_text(batch["caption"])
        duration = batch["duration"].to(self.dist.device)
        sigma, _, noise = self.draw(gens, tuple(lat_w.shape[1:]))
        loss, logs = dpo_step_loss(model, lat_w, lat_l, sigma, noise, states, mask, duration, beta=cfg.beta_dpo)
        return loss, {k: float(v) for k, v in logs.items()}


def dpo_step_loss(model: nn.Module, lat_w: torch.Tensor, lat_l: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
                  text_states: torch.Tensor, text_mask: torch.Tensor, duration: torch.Tensor, *, beta: float = BETA_DPO
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The release's ``forward(..., sft=False)`` for given draws: one timestep and one noise per
    pair, shared by its chosen and rejected halves, chosen first.

    Args:
        model: a :class:`pysonic.train.flow_matching.TangoFluxTrainModule` with its reference set
            (or its DDP wrapper).
        lat_w, lat_l: [B, T, D] chosen and rejected latents; sigma [B]; noise [B, T, D];
        text_states, text_mask, duration: the pairs' conditioning ([B, ...]).
    """
    latents = torch.cat([lat_w, lat_l])
    noise, sigma = torch.cat([noise, noise]), torch.cat([sigma, sigma])
    states, mask, duration = text_states.repeat(2, 1, 1), text_mask.repeat(2, 1), duration.repeat(2)
    s = sigma.view(-1, *([1] * (latents.dim() - 1)))
    noisy = (1.0 - s) * latents + s * noise
    pred, ref_pred = model(noisy, sigma, states, mask, duration, reference=True)
    return dpo_flow_loss(pred, ref_pred, noise - latents, beta=beta)


# ---------------------------------------------------------------------------- scoring


class AudioTextScorer(Protocol):
    """What CRPO ranks candidates with (higher is better)."""

    def score(self, audio: torch.Tensor, sample_rate: int, captions: Sequence[str]) -> torch.Tensor:
        """audio ``[B, C, N]`` at ``sample_rate``, one caption per clip -> scores ``[B]``."""
        ...


class ClapScorer:
    """CLAP score: cosine of the normalised audio and text embeddings of a ``transformers``
    ``ClapModel`` (label_crpo.py's ``audio_embed @ text_embed.T`` with laion_clap's normalised
    embeddings). Audio is mixed to mono and resampled to the feature extractor's rate.

    Args:
        model: a ``transformers.ClapModel``.
        feature_extractor: its ``ClapFeatureExtractor``.
        tokenizer: its tokenizer.
    """

    def __init__(self, model, feature_extractor, tokenizer, *, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.feature_extractor = feature_extractor
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str | torch.device = "cpu") -> "ClapScorer":
        """Load a ``ClapModel`` + ``ClapProcessor`` directory (local only; nothing is fetched)."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"ClapScorer: no such directory {str(path)!r} (a local ClapModel + ClapProcessor directory)")
        from transformers import ClapModel, ClapProcessor

        model = ClapModel.from_pretrained(str(path), local_files_only=True)
        proc = ClapProcessor.from_pretrained(str(path), local_files_only=True)
        return cls(model, proc.feature_extractor, proc.tokenizer, device=device)

    @staticmethod
    def _features(out) -> torch.Tensor:
        emb = out if isinstance(out, torch.Tensor) else out.pooler_output
        return F.normalize(emb.float(), dim=-1)

    @torch.no_grad()
    def score(self, audio: torch.Tensor, sample_rate: int, captions: Sequence[str]) -> torch.Tensor:
        if not isinstance(audio, torch.Tensor) or audio.dim() != 3:
            raise ValueError(f"ClapScorer.score: audio must be a [B, C, N] tensor, got {getattr(audio, 'shape', type(audio))}")
        if len(captions) != audio.shape[0]:
            raise ValueError(f"ClapScorer.score: {len(captions)} captions for {audio.shape[0]} clips")
        sr = int(self.feature_extractor.sampling_rate)
        mono = resample(audio.float().mean(1).cpu(), int(sample_rate), sr)
        feats = self.feature_extractor([m.numpy() for m in mono], sampling_rate=sr, return_tensors="pt")
        feats = {k: v.to(self.device) for k, v in feats.items() if isinstance(v, torch.Tensor)}
        a = self._features(self.model.get_audio_features(**feats))
        tok = self.tokenizer(list(captions), padding=True, return_tensors="pt")
        t = self._features(self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                                        attention_mask=tok["attention_mask"].to(self.device)))
        return (a * t).sum(-1).cpu()


# ---------------------------------------------------------------------------- candidates and pairs


GenerateFn = Callable[[list[str], float, int, torch.Generator], torch.Tensor]
"""``(prompts, duration, num_samples_per_prompt, generator) -> audio [len(prompts) * n, C, N]``,
the samples of each prompt next to each other (prompt-major)."""


def read_prompts(path: str | Path) -> list[dict]:
    """A prompt bank -> ``[{"caption": str, "duration": float | None}]``.

    Accepted: a ``.txt`` file (one prompt a line), or a JSON list of strings or of objects with
    ``caption`` (or ``captions``) and an optional ``duration`` (a training manifest works).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt bank: no such file {str(path)!r}")
    if path.suffix == ".txt":
        rows: list = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"prompt bank {str(path)!r}: not valid JSON ({exc})") from None
        if not isinstance(rows, list):
            raise ValueError(f"prompt bank {str(path)!r}: expected a JSON list")
    out = []
    for i, r in enumerate(rows):
        cap = r if isinstance(r, str) else (r.get("caption", r.get("captions")) if isinstance(r, dict) else None)
        if not isinstance(cap, str) or not cap.strip():
            raise ValueError(f"prompt bank {str(path)!r}: entry {i} has no caption")
        dur = r.get("duration") if isinstance(r, dict) else None
        out.append({"caption": cap, "duration": None if dur is None else float(dur)})
    if not out:
        raise ValueError(f"prompt bank {str(path)!r} holds no prompts")
    return out


def _seed(*parts: int) -> int:
    h = 0
    for p in parts:
        h = (h * 0x100000001B3 + int(p) + 0x9E3779B9) % (2**63 - 1)
    return h


def build_pairs(out_dir: str | Path, prompts: Sequence[Mapping[str, Any]], *, generate_fn: GenerateFn,
                scorer: AudioTextScorer, sample_rate: int, num_candidates: int, duration: float,
                seed: int = 0, batch_prompts: int = 1) -> Path:
    """Generate, score and pair. Writes ``out_dir/audio/p<i>_c<j>.wav``, ``out_dir/scores.json``
    (per prompt: the candidates and their scores) and ``out_dir/pairs.json`` (best vs worst);
    returns the pair manifest's path."""
    import soundfile as sf

    out_dir = Path(out_dir)
    (out_dir / "audio").mkdir(parents=True, exist_ok=True)
    scores_out, pairs = [], []
    for b0 in range(0, len(prompts), batch_prompts):
        chunk = list(prompts[b0 : b0 + batch_prompts])
        caps = [p["caption"] for p in chunk]
        g = torch.Generator().manual_seed(_seed(seed, b0))
        audio = generate_fn(caps, duration, num_candidates, g)
        if audio.dim() != 3 or audio.shape[0] != len(caps) * num_candidates:
            raise ValueError(f"build_pairs: generate_fn returned {tuple(audio.shape)}, expected "
                             f"[{len(caps) * num_candidates}, C, N]")
        audio = audio.detach().float().cpu()
        scores = torch.as_tensor(scorer.score(audio, sample_rate, [c for c in caps for _ in range(num_candidates)]))
        scores = scores.float().view(len(caps), num_candidates)
        if not torch.isfinite(scores).all():
            raise ValueError("build_pairs: the scorer returned NaN or infinite scores")
        for k, cap in enumerate(caps):
            i = b0 + k
            paths = []
            for j in range(num_candidates):
                p = out_dir / "audio" / f"p{i:05d}_c{j}.wav"
                sf.write(str(p), audio[k * num_candidates + j].T.numpy(), sample_rate, subtype="FLOAT")
                paths.append(p)
            best, worst = int(scores[k].argmax()), int(scores[k].argmin())  # first of ties, like max()/min()
            scores_out.append({"caption": cap, "duration": duration,
                               "candidates": [{"audio": str(p.relative_to(out_dir)), "score": float(s)} for p, s in zip(paths, scores[k])]})
            pairs.append({"chosen": str(paths[best].relative_to(out_dir)), "reject": str(paths[worst].relative_to(out_dir)),
                          "caption": cap, "duration": duration})
    (out_dir / "scores.json").write_text(json.dumps(scores_out, indent=1))
    return write_pair_manifest(out_dir / "pairs.json", pairs)


def pipeline_generate_fn(model: nn.Module, vae: nn.Module, text_encoder, *, steps: int, guidance_scale: float) -> GenerateFn:
    """A :data:`GenerateFn` through :class:`pysonic.pipelines.tangoflux.TangoFlux` (the released
    sampler: Euler, CFG against the empty prompt)."""
    from pysonic.pipelines.tangoflux import TangoFlux

    pipe = TangoFlux(model=model, vae=vae, text_encoder=text_encoder)

    def generate(prompts: list[str], duration: float, n: int, generator: torch.Generator) -> torch.Tensor:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return pipe.generate(prompts, duration=duration, steps=steps, guidance_scale=guidance_scale,
                                     num_samples_per_prompt=n, generator=generator, progress=False)
        finally:
            model.train(was_training)

    return generate


# ---------------------------------------------------------------------------- rounds


def run_crpo(model: nn.Module, config: CRPOConfig, prompts: Sequence[Mapping[str, Any]], *, text_encoder, vae,
             scorer: AudioTextScorer, generate_fn: GenerateFn | None = None, dist=None) -> dict:
    """Run ``config.rounds`` CRPO rounds in ``config.out_dir/round_<r>`` and leave the final
    weights in ``model`` (and in ``config.out_dir/final.safetensors``).

    A finished round (its ``final.safetensors`` exists) is skipped; an interrupted one resumes
    from its pair manifest and its last checkpoint. Generation and scoring run on rank 0 only.
    """
    from pysonic.checkpoints import read_state_dict, load_into

    dist = dist or init_distributed()
    out = Path(config.out_dir)
    if config.init_from:
        load_model_weights(model, config.init_from)
    model.to(dist.device)  # rank 0 generates with these before the first trainer moves them
    vae.to(dist.device)
    text_encoder.to(dist.device)
    if generate_fn is None:
        generate_fn = pipeline_generate_fn(model, vae, text_encoder, steps=config.gen_steps,
                                           guidance_scale=config.guidance_scale)
    sr = int(getattr(vae, "sampling_rate", 44_100))
    ch = int(vae.config.audio_channels) if vae is not None else 2
    history = []
    for r in range(config.rounds):
        rdir = out / f"round_{r:02d}"
        final = rdir / "final.safetensors"
        if final.is_file():
            load_into(model, read_state_dict(final), source=str(final))
            history.append({"round": r, "skipped": True})
            continue
        pairs = rdir / "pairs.json"
        if not pairs.is_file():
            if dist.is_main:
                g = torch.Generator().manual_seed(_seed(config.seed, r))
                order = torch.randperm(len(prompts), generator=g).tolist()
                chosen = [prompts[i] for i in order[: config.prompts_per_round or len(prompts)]]
                build_pairs(rdir, chosen, generate_fn=generate_fn, scorer=scorer, sample_rate=sr,
                            num_candidates=config.num_candidates, duration=config.gen_duration,
                            seed=_seed(config.seed, r, 1), batch_prompts=config.gen_batch_prompts)
            dist.barrier()
        dataset = PairDataset(pairs, sample_rate=sr, channels=ch, max_duration=config.max_audio_duration)
        rcfg = dataclasses.replace(config, out_dir=str(rdir), init_from=None)
        trainer = DPOTrainer(model, rcfg, dataset, text_encoder=text_encoder, vae=vae, dist=dist)
        result = trainer.fit()
        # the next round starts from what this round saved (EMA weights when EMA is on)
        load_into(model, read_state_dict(final), source=str(final))
        history.append({"round": r, **(result or {})})
    if dist.is_main:
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "final.safetensors.tmp"
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
        tmp.replace(out / "final.safetensors")
    dist.barrier()
    return {"rounds": history}
