"""Pre-training of the offline word encoder (:class:`pysonic.text.word_encoder.WordTextEncoder`)
on SonicSynth captions: from the caption alone, predict every attribute the caption states (sound
kind and its parameters for the foreground and the background layer, loudness).

Only captions are needed (``SonicSynth.spec`` renders no audio), so this takes minutes on a CPU.
The trained encoder is then frozen and conditions the flow model, as FLAN-T5 does in TangoFlux.
Paraphrase robustness comes from the dataset's many phrasings of each attribute; values between
those seen in training (held-out pitches and tempos) are carried by the numeric features.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pysonic.data.synth.spec import KINDS, NOISE_COLORS, WAVEFORMS
from pysonic.text.word_encoder import WordTextEncoder
from pysonic.train.loop import TrainConfig, Trainer

LAYER_KINDS = ("none",) + tuple(k for k in KINDS if k != "mixture")
CLASS_HEADS = {  # head -> classes; index 0 of a layer head = "not stated" (masked out of the loss)
    "kind": LAYER_KINDS,
    "waveform": ("-",) + WAVEFORMS,
    "quality": ("-", "major", "minor"),
    "direction": ("-", "rising", "falling"),
    "color": ("-",) + NOISE_COLORS,
    "click": ("-", "click", "beep"),
}
VALUE_HEADS = ("freq", "freq_end", "bpm", "rate")  # regressed as log2(value), masked when absent
# (mean, std) of log2(value) over the SonicSynth ranges: targets are standardised so that no head
# dominates the loss (raw log2 pitches are ~6-11, and their squared error would swamp the rest)
VALUE_NORM = {"freq": (9.0, 2.0), "freq_end": (9.0, 2.0), "bpm": (6.9, 0.5), "rate": (1.7, 1.0)}
LOUDNESS = ("quiet", "moderate", "loud")
LAYERS = 2  # foreground, background


def attribute_targets(spec_dict: dict) -> dict[str, torch.Tensor]:
    """Targets of one caption: class ids [LAYERS] per class head (-100 = not stated, ignored),
    standardised log2 values [LAYERS] (:data:`VALUE_NORM`) and their masks per value head,
    loudness id (scalar)."""
    out: dict[str, torch.Tensor] = {}
    layers = spec_dict["layers"][:LAYERS]
    for head, classes in CLASS_HEADS.items():
        ids = torch.full((LAYERS,), -100, dtype=torch.long)
        for j in range(LAYERS):
            layer = layers[j] if j < len(layers) else None
            if head == "kind":
                ids[j] = classes.index(layer["kind"]) if layer else 0
            elif layer is not None and _stated(layer, head):
                ids[j] = classes.index(layer[head])
        out[head] = ids
    for head in VALUE_HEADS:
        values, mask = torch.zeros(LAYERS), torch.zeros(LAYERS)
        for j, layer in enumerate(layers):
            if layer.get(head) is not None and _value_stated(layer, head):
                mean, std = VALUE_NORM[head]
                values[j], mask[j] = (math.log2(float(layer[head])) - mean) / std, 1.0
        out[head], out[head + "_mask"] = values, mask
    out["loudness"] = torch.tensor(LOUDNESS.index(spec_dict["loudness"]))
    return out


def _value_stated(layer: dict, head: str) -> bool:
    # beeps and sweeps may leave their pitch unsaid (a default is rendered): not a caption fact
    if head in ("freq", "freq_end") and layer["kind"] in ("clicks", "sweep"):
        return bool(layer.get("freq_named"))
    return True


def _stated(layer: dict, head: str) -> bool:
    if layer.get(head) is None:
        return False
    # chords and scales are rendered with a waveform the caption does not name
    return not (head == "waveform" and layer["kind"] != "tone")


class AttributeHeads(nn.Module):
    """Encoder states -> per-layer attribute logits and log2 values. Each layer slot (foreground,
    background) and the loudness read the states through their own learned attention query, so
    word order ("X over Y") decides which slot a sound goes to."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(LAYERS + 1, dim) / math.sqrt(dim))
        self.key = nn.Linear(dim, dim)
        self.trunk = nn.Sequential(nn.Linear(dim, dim), nn.GELU())
        self.classes = nn.ModuleDict({h: nn.Linear(dim, len(c)) for h, c in CLASS_HEADS.items()})
        self.values = nn.Linear(dim, len(VALUE_HEADS))
        self.loudness = nn.Linear(dim, len(LOUDNESS))

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        scores = torch.einsum("qd,bld->bql", self.queries, self.key(states)) / math.sqrt(states.shape[-1])
        weights = scores.masked_fill(~mask[:, None, :], float("-inf")).softmax(-1)
        h = self.trunk(torch.einsum("bql,bld->bqd", weights, states))  # [B, LAYERS + 1, dim]
        layers, overall = h[:, :LAYERS], h[:, LAYERS]
        out = {k: head(layers) for k, head in self.classes.items()}
        values = self.values(layers)
        out.update({name: values[..., i] for i, name in enumerate(VALUE_HEADS)})
        out["loudness"] = self.loudness(overall)
        return out


class EncoderWithHeads(nn.Module):
    def __init__(self, encoder: WordTextEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.heads = AttributeHeads(encoder.dim)

    def forward(self, captions: list[str]) -> dict[str, torch.Tensor]:
        return self.heads(*self.encoder.encode(captions))


def attribute_loss(pred: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy of the class heads + squared error of log2 values (masked) + loudness."""
    logs: dict[str, float] = {}
    total = pred["loudness"].new_zeros(())
    for head in CLASS_HEADS:
        logits, ids = pred[head].float(), target[head]
        if (ids != -100).any():
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1), ignore_index=-100)
            total = total + loss
            logs[f"{head}_ce"] = float(loss.detach())
    for head in VALUE_HEADS:
        m = target[head + "_mask"]
        if m.sum() > 0:
            err = ((pred[head].float() - target[head]) ** 2 * m).sum() / m.sum()
            total = total + err
            logs[f"{head}_mse"] = float(err.detach())
    loud = F.cross_entropy(pred["loudness"].float(), target["loudness"])
    logs["loudness_ce"] = float(loud.detach())
    return total + loud, logs


class CaptionAttributes(torch.utils.data.Dataset):
    """SonicSynth captions and attribute targets (no audio): item -> (caption, targets)."""

    def __init__(self, synth) -> None:
        self.synth = synth

    def __len__(self) -> int:
        return len(self.synth)

    def __getitem__(self, index: int):
        spec, caption = self.synth.spec(int(index))
        return caption, attribute_targets(spec.to_dict())


def collate_captions(items):
    captions = [c for c, _ in items]
    targets = {k: torch.stack([t[k] for _, t in items]) for k in items[0][1]}
    return {"captions": captions, "targets": targets}


class TextEncoderTrainer(Trainer):
    """Trains :class:`EncoderWithHeads` with :func:`attribute_loss` (shared loop: checkpoints,
    resume, DDP, EMA as configured)."""

    def compute_loss(self, model, batch):
        pred = model(batch["captions"])
        targets = {k: v.to(self.dist.device) for k, v in batch["targets"].items()}
        return attribute_loss(pred, targets)


@dataclass
class TextEncoderPretrainResult:
    encoder: WordTextEncoder
    heads: AttributeHeads
    logs: dict[str, float]


def pretrain_text_encoder(encoder: WordTextEncoder, synth, config: TrainConfig) -> TextEncoderPretrainResult:
    """Pre-train ``encoder`` on the captions of ``synth`` (a SonicSynth dataset); returns the
    trained encoder (EMA weights if ``config.ema_decay``) and its heads (for evaluation)."""
    model = EncoderWithHeads(encoder)
    trainer = TextEncoderTrainer(model, config, CaptionAttributes(synth), collate_fn=collate_captions)
    logs = trainer.fit()
    if trainer.ema is not None:
        trainer.ema.copy_to(model)
    model.eval()
    return TextEncoderPretrainResult(model.encoder, model.heads, logs)


@torch.no_grad()
def attribute_accuracy(model: EncoderWithHeads, synth, n: int = 512, batch: int = 128) -> dict[str, float]:
    """Fraction of stated attributes read back correctly from ``n`` captions of ``synth``
    (classes exactly; pitches within 50 cents; tempo within 4%; rate to the nearest integer)."""
    hits: dict[str, list[float]] = {}
    data = CaptionAttributes(synth)
    for start in range(0, n, batch):
        items = [data[i] for i in range(start, min(n, start + batch))]
        b = collate_captions(items)
        pred, tgt = model(b["captions"]), b["targets"]
        for head in CLASS_HEADS:
            ok = tgt[head] != -100
            hits.setdefault(head, []).extend((pred[head].argmax(-1) == tgt[head])[ok].float().tolist())
        tol = {"freq": 1 / 24, "freq_end": 1 / 24, "bpm": math.log2(1.04), "rate": None}  # in octaves
        for head, t in tol.items():
            ok = tgt[head + "_mask"] > 0
            mean, std = VALUE_NORM[head]
            p, g = pred[head] * std + mean, tgt[head] * std + mean
            if head == "rate":
                good = (2 ** p).round() == (2 ** g).round()
            else:
                good = (p - g).abs() <= t
            hits.setdefault(head, []).extend(good[ok].float().tolist())
        hits.setdefault("loudness", []).extend((pred["loudness"].argmax(-1) == tgt["loudness"]).float().tolist())
    return {k: sum(v) / len(v) for k, v in hits.items() if v}
