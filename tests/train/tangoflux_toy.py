"""Tiny TangoFlux parts for the training tests (random weights, built here), and a script the DDP
and kill tests launch: ``python -m tests.train.tangoflux_toy OUT_DIR STEPS [batch_size=4] [stage=pretrain|dpo]``."""
from __future__ import annotations

import math
import sys

import torch

from pysonic.codecs.oobleck import OobleckConfig, OobleckVAE
from pysonic.models.tangoflux import TangoFluxConfig, TangoFluxModel
from pysonic.text.word_encoder import WordEncoderConfig, WordTextEncoder, build_vocab

CAPTIONS = ["a low hum", "a high beep", "loud noise", "quiet clicks"]
SAMPLE_RATE = 800  # the tiny VAE's rate (hop 8: 100 latent frames a second)
LATENT_FRAMES = 12
LATENT_DIM = 8

MODEL_CONFIG = dict(num_layers=1, num_single_layers=1, in_channels=LATENT_DIM, attention_head_dim=128,
                    num_attention_heads=1, joint_attention_dim=32, audio_seq_len=LATENT_FRAMES, max_duration=2.0,
                    duration_features=8)
VAE_CONFIG = dict(encoder_hidden_size=2 * LATENT_DIM, downsampling_ratios=(2, 4), channel_multiples=(1, 2),
                  decoder_channels=8, decoder_input_channels=LATENT_DIM, sampling_rate=SAMPLE_RATE)


def tiny_model(seed: int = 0) -> TangoFluxModel:
    torch.manual_seed(seed)
    return TangoFluxModel(TangoFluxConfig(**MODEL_CONFIG))


def tiny_vae(seed: int = 1) -> OobleckVAE:
    torch.manual_seed(seed)
    return OobleckVAE(OobleckConfig(**VAE_CONFIG))


def tiny_text_encoder(seed: int = 2) -> WordTextEncoder:
    torch.manual_seed(seed)
    return WordTextEncoder(WordEncoderConfig(vocab=build_vocab(CAPTIONS), dim=32, layers=1, heads=2))


def pattern(k: int, frames: int = LATENT_FRAMES) -> torch.Tensor:
    """A fixed latent sequence [frames, LATENT_DIM] for caption k (what the model should learn)."""
    t = torch.arange(frames, dtype=torch.float32)[:, None]
    c = torch.arange(LATENT_DIM, dtype=torch.float32)[None]
    return torch.sin(0.5 * (k + 1) * t + c) * (1.0 + 0.25 * k)


class LatentData(torch.utils.data.Dataset):
    """Precomputed-latent items: caption k -> pattern(k)."""

    def __init__(self, n: int = 8) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        k = i % len(CAPTIONS)
        return {"latents": pattern(k), "caption": CAPTIONS[k], "duration": 0.5 + 0.25 * k}


class PairLatentData(torch.utils.data.Dataset):
    """DPO pairs: chosen = pattern(k), reject = pattern(k + 1) (another caption's)."""

    def __init__(self, n: int = 8) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        k = i % len(CAPTIONS)
        return {"chosen_latents": pattern(k), "reject_latents": pattern((k + 1) % len(CAPTIONS)),
                "caption": CAPTIONS[k], "duration": 1.0}


class AudioData(torch.utils.data.Dataset):
    """Waveform items (encoded by the VAE in the trainer): a tone per caption, mono or stereo."""

    def __init__(self, n: int = 8, seconds: float = 0.12) -> None:
        self.n, self.seconds = n, seconds

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        k = i % len(CAPTIONS)
        t = torch.arange(int(SAMPLE_RATE * self.seconds)) / SAMPLE_RATE
        wav = 0.5 * torch.sin(2 * math.pi * (40 + 60 * k) * t)
        return {"audio": wav[None] if i % 2 else torch.stack([wav, -wav]), "caption": CAPTIONS[k], "duration": self.seconds}


def tiny_clap_dir(path):
    """A tiny random ClapModel + ClapProcessor saved in ``path`` (8 kHz features, word tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import (ClapAudioConfig, ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor,
                              ClapTextConfig, RobertaTokenizerFast)

    words = ["<s>", "<pad>", "</s>", "<unk>"] + sorted({w for c in CAPTIONS for w in c.split()})
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tok = RobertaTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    fe = ClapFeatureExtractor(feature_size=16, sampling_rate=8000, hop_length=80, max_length_s=1, fft_window_size=256,
                              truncation="rand_trunc")
    torch.manual_seed(0)
    text = ClapTextConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=32, max_position_embeddings=40)
    audio = ClapAudioConfig(spec_size=64, window_size=4, num_mel_bins=16, patch_size=4, patch_stride=(4, 4), depths=[1, 1],
                            num_attention_heads=[1, 2], hidden_size=32, patch_embeds_hidden_size=16, num_classes=4)
    model = ClapModel(ClapConfig(text_config=text.to_dict(), audio_config=audio.to_dict(), projection_dim=8)).eval()
    model.save_pretrained(path)
    ClapProcessor(feature_extractor=fe, tokenizer=tok).save_pretrained(path)
    return path


def fixed_loss(trainer, batch, step: int = 0) -> float:
    """The trainer's loss on ``batch`` with the draws of ``step`` (same noise before and after training)."""
    saved = trainer.step
    trainer.step = step
    try:
        with torch.no_grad():
            loss, _ = trainer.compute_loss(trainer.model, batch)
    finally:
        trainer.step = saved
    return float(loss)


def script_trainer(out, steps: int, *, batch_size: int = 4, ckpt_every: int = 2, stage: str = "pretrain"):
    """The trainer the script runs (also built in-process by the tests, as the reference)."""
    from pysonic.train.crpo import CRPOConfig, DPOTrainer
    from pysonic.train.flow_matching import FlowMatchingConfig, FlowMatchingTrainer

    common = dict(out_dir=str(out), steps=steps, batch_size=batch_size, lr=2e-3, log_every=1, ckpt_every=ckpt_every,
                  progress=False, max_audio_duration=0.12)
    if stage == "dpo":
        cfg = CRPOConfig(**{**common, "max_audio_duration": 1.0}, gen_duration=1.0, lr_decay="linear")
        return DPOTrainer(tiny_model(), cfg, PairLatentData(), text_encoder=tiny_text_encoder())
    return FlowMatchingTrainer(tiny_model(), FlowMatchingConfig(**common, uncondition=True, uncondition_prob=0.3),
                               AudioData(), text_encoder=tiny_text_encoder(), vae=tiny_vae())


if __name__ == "__main__":  # the DDP and kill tests
    out, steps = sys.argv[1], int(sys.argv[2])
    extra = dict(arg.split("=", 1) for arg in sys.argv[3:])
    trainer = script_trainer(out, steps, batch_size=int(extra.get("batch_size", 4)),
                             ckpt_every=int(extra.get("ckpt_every", 2)), stage=extra.get("stage", "pretrain"))
    delay = float(extra.get("delay", 0))
    if delay:
        import time

        def on_log(step, logs):
            print(f"step {step}", flush=True)
            time.sleep(delay)

        trainer.on_log = on_log
    trainer.fit()
    print("done", flush=True)
