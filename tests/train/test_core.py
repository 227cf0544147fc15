"""The shared training core: atomic checkpoints, exact resume (also after SIGKILL), resumable
sharded data, LR schedule, EMA, gradient accumulation, DDP on gloo."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pysonic.checkpoints import CheckpointError
from pysonic.train import EMA, ResumableLoader, TrainConfig, latest_checkpoint, load_checkpoint, lr_factor, save_checkpoint, split_batch
from tests.train.toy import ToyData, ToyTrainer, toy_config, toy_model

REPO = Path(__file__).resolve().parents[2]


def _weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def test_save_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "ck.pt"
    save_checkpoint(target, {"a": torch.ones(3)})

    def broken_save(obj, f):  # dies half-way through writing
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(target, {"a": torch.zeros(3)})
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(target)["a"], torch.ones(3))  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temporary left behind


def test_corrupt_or_missing_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    with pytest.raises(ValueError, match="unknown keys \\['stepz'\\]"):
        TrainConfig.from_dict({"out_dir": str(tmp_path), "stepz": 3})
    with pytest.raises(ValueError, match="lr_decay"):
        TrainConfig(out_dir=str(tmp_path), steps=3, lr_decay="sometimes")
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(out_dir=str(tmp_path), steps=3, batch_size=6, grad_accum=4)


def test_lr_schedule():
    cfg = TrainConfig(out_dir="x", steps=12, warmup_steps=2, lr_decay="cosine", min_lr_ratio=0.1)
    factors = [lr_factor(cfg, s) for s in range(12)]
    assert factors[:2] == [0.5, 1.0]  # linear warm-up
    assert factors[2] == pytest.approx(1.0) and factors[-1] > 0.1
    assert all(a >= b for a, b in zip(factors[1:], factors[2:]))  # then decays monotonically
    assert lr_factor(cfg, 12) == pytest.approx(0.1)  # to the floor
    exp = TrainConfig(out_dir="x", steps=10, lr_decay="exponential", lr_decay_gamma=0.5)
    assert lr_factor(exp, 3) == pytest.approx(0.125)


def test_loader_resumes_and_shards():
    data = list(range(20))
    loader = ResumableLoader(data, 3, seed=5, collate_fn=list)
    stream = iter(loader)
    first = [next(stream) for _ in range(8)]  # crosses an epoch boundary (6 batches per epoch)
    assert len(set(sum(first[:6], []))) == 18  # an epoch: 6 full batches of distinct items
    assert first[6] != first[0]  # the next epoch is reshuffled
    resumed = ResumableLoader(data, 3, seed=5, collate_fn=list)
    resumed.load_state_dict({"epoch": 1, "position": 1, "seed": 5})
    assert next(iter(resumed)) == first[7]
    # two ranks with batch 3 see what one process with batch 6 sees, batch by batch
    whole = ResumableLoader(data, 6, seed=5, collate_fn=list).epoch_batches(0)
    ranks = [ResumableLoader(data, 3, seed=5, collate_fn=list, rank=r, world_size=2).epoch_batches(0) for r in (0, 1)]
    for k, batch in enumerate(whole):
        assert sorted(batch) == sorted(ranks[0][k] + ranks[1][k])
    with pytest.raises(ValueError, match="too few"):
        ResumableLoader(list(range(3)), 4)


def test_split_batch():
    batch = {"x": torch.arange(8).view(4, 2), "caption": ["a", "b", "c", "d"]}
    parts = split_batch(batch, 2)
    assert parts[1]["caption"] == ["c", "d"] and torch.equal(parts[1]["x"], torch.tensor([[4, 5], [6, 7]]))
    pair = split_batch([torch.zeros(4), torch.ones(4)], 4)
    assert len(pair) == 4 and pair[0][1].shape == (1,)


def test_ema_average():
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, decay=0.75)
    before = ema.module.weight.clone()
    with torch.no_grad():
        model.weight.add_(4.0)
    ema.update(model)
    torch.testing.assert_close(ema.module.weight, 0.75 * before + 0.25 * model.weight, rtol=0, atol=1e-6)


def test_loss_goes_down_and_outputs(tmp_path):
    trainer = ToyTrainer(toy_model(), toy_config(tmp_path, 30), ToyData())
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 31))
    first, last = records[0]["loss"], sum(r["loss"] for r in records[-5:]) / 5
    assert last < 0.3 * first, (first, last)
    assert {"lr", "grad_norm", "mae", "sec_per_step"} <= set(records[0])
    assert (tmp_path / "final.safetensors").is_file()
    steps = sorted(int(p.stem.split("_")[1]) for p in (tmp_path / "checkpoints").glob("step_*.pt"))
    assert steps == [24, 28, 30]  # keep_checkpoints=3


def test_resume_is_exact(tmp_path):
    """Stopped at step 7 (last checkpoint: step 4), resumed to 10 == an uninterrupted run."""
    whole = ToyTrainer(toy_model(), toy_config(tmp_path / "whole", 10), ToyData())
    whole.fit()
    stopped = ToyTrainer(toy_model(), toy_config(tmp_path / "cut", 10), ToyData(), stop_at=7)
    with pytest.raises(KeyboardInterrupt):
        stopped.fit()
    assert latest_checkpoint(tmp_path / "cut").name == "step_4.pt"
    torch.manual_seed(999)  # the resumed run must not depend on the global RNG at start
    resumed = ToyTrainer(toy_model(), toy_config(tmp_path / "cut", 10), ToyData())
    resumed.fit()
    a, b = _weights(tmp_path / "whole" / "final.safetensors"), _weights(tmp_path / "cut" / "final.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_grad_accumulation_matches_one_batch(tmp_path):
    one = ToyTrainer(toy_model(), toy_config(tmp_path / "one", 5, ema_decay=None), ToyData(), noise=False)
    one.fit()
    acc = ToyTrainer(toy_model(), toy_config(tmp_path / "acc", 5, ema_decay=None, grad_accum=4), ToyData(), noise=False)
    acc.fit()
    a, b = _weights(tmp_path / "one" / "final.safetensors"), _weights(tmp_path / "acc" / "final.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)  # summation order only


def test_bf16_autocast_trains(tmp_path):
    ToyTrainer(toy_model(), toy_config(tmp_path, 30, precision="bf16"), ToyData()).fit()
    losses = [json.loads(line)["loss"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert sum(losses[-5:]) / 5 < 0.3 * losses[0], losses


def test_divergence_is_a_clear_error(tmp_path):
    class Diverging(ToyTrainer):
        def compute_loss(self, model, batch):
            loss, logs = super().compute_loss(model, batch)
            return loss * float("nan"), logs

    with pytest.raises(FloatingPointError, match="diverged"):
        Diverging(toy_model(), toy_config(tmp_path, 3), ToyData()).fit()


def _run_toy(out, steps, *args, env=None, **popen):
    cmd = [sys.executable, "-m", "tests.train.toy", str(out), str(steps), *args]
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})}, text=True, **popen)


def test_resume_after_sigkill(tmp_path):
    """A real kill (SIGKILL while training), then a fresh process resumes to the same weights."""
    ref = _run_toy(tmp_path / "ref", 12, "ckpt_every=3")
    assert ref.wait(timeout=120) == 0
    victim = _run_toy(tmp_path / "cut", 12, "ckpt_every=3", "delay=0.2", stdout=subprocess.PIPE)
    for line in victim.stdout:
        if line.strip() == "step 8":
            victim.send_signal(signal.SIGKILL)
            break
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    assert latest_checkpoint(tmp_path / "cut").name == "step_6.pt"
    again = _run_toy(tmp_path / "cut", 12, "ckpt_every=3")
    assert again.wait(timeout=120) == 0
    a, b = _weights(tmp_path / "ref" / "final.safetensors"), _weights(tmp_path / "cut" / "final.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_ddp_two_processes_match_one(tmp_path):
    """torchrun, 2 CPU processes on gloo, batch 4 each == 1 process with batch 8 (same items)."""
    port = 29500 + os.getpid() % 1000
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           "-m", "tests.train.toy", str(tmp_path / "ddp"), "6", "batch_size=4", "noise=0"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    single = _run_toy(tmp_path / "one", 6, "batch_size=8", "noise=0")
    assert single.wait(timeout=120) == 0
    a, b = _weights(tmp_path / "ddp" / "final.safetensors"), _weights(tmp_path / "one" / "final.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)  # all-reduce summation order only
    ck = load_checkpoint(latest_checkpoint(tmp_path / "ddp"))
    assert len(ck["rng"]) == 2  # both ranks' generators are saved for exact resume
