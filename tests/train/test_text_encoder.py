"""Pre-training the offline word encoder on SonicSynth captions (attribute heads)."""
import json

import torch

from pysonic.data.synth import SonicSynth
from pysonic.text.word_encoder import WordEncoderConfig, WordTextEncoder, build_vocab
from pysonic.train import TrainConfig
from pysonic.train.text_encoder import (CLASS_HEADS, VALUE_NORM, EncoderWithHeads, attribute_accuracy, attribute_targets,
                                        pretrain_text_encoder)


def test_targets_of_a_mixture():
    synth = SonicSynth("train", length=50, seed=3)
    for i in range(50):
        spec, caption = synth.spec(i)
        t = attribute_targets(spec.to_dict())
        if spec.kind == "mixture":
            assert (t["kind"] > 0).all()  # both slots hold a sound
        else:
            assert t["kind"][1] == 0  # the background slot is "none"
        if spec.layers[0].kind == "clicks" and not spec.layers[0].freq_named:
            assert t["freq_mask"][0] == 0  # an unnamed beep pitch is not a caption fact
        if spec.layers[0].kind == "tone":
            mean, std = VALUE_NORM["freq"]
            assert t["freq_mask"][0] == 1 and abs(2 ** (t["freq"][0] * std + mean) - spec.layers[0].freq) < 1e-3 * spec.layers[0].freq
            assert t["waveform"][0] == CLASS_HEADS["waveform"].index(spec.layers[0].waveform)


def test_pretraining_learns_the_caption_attributes(tmp_path, monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead on a loaded machine
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    synth = SonicSynth("train", length=4096, seed=1)
    vocab = build_vocab(synth.spec(i)[1] for i in range(2000))
    torch.manual_seed(0)
    enc = WordTextEncoder(WordEncoderConfig(vocab=vocab, dim=64, layers=1, heads=2))
    cfg = TrainConfig(out_dir=str(tmp_path), steps=300, batch_size=32, lr=3e-3, warmup_steps=10, log_every=10,
                      ckpt_every=1000, progress=False)
    result = pretrain_text_encoder(enc, synth, cfg)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.5 * losses[0], losses
    model = EncoderWithHeads(result.encoder)
    model.heads = result.heads
    acc = attribute_accuracy(model.eval(), SonicSynth("heldout", length=256, seed=9), n=256)
    monkeypatch.undo()
    torch.set_num_threads(threads)
    assert acc["kind"] > 0.9 and acc["direction"] > 0.9, acc  # words are learnt first (chance: 1/9, 1/2)
