"""pysonic bench synth: the oracle scores 100% through the command line; checkpoints not loadable yet."""
import json

from pysonic.cli import main


def test_bench_synth_oracle(tmp_path, capsys):
    out = tmp_path / "report.json"
    md = tmp_path / "report.md"
    rc = main(["bench", "synth", "--oracle", "--n", "2", "--attributes", "pitch,clicks", "--split", "heldout",
               "--out", str(out), "--markdown", str(md), "--spectrogram", str(tmp_path / "s.png")])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["generator"] == "oracle" and list(report["splits"]) == ["heldout"]
    assert report["splits"]["heldout"]["overall"]["correct"] == 1.0
    assert "| pitch |" in capsys.readouterr().out and "| clicks |" in md.read_text()
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_synth_checkpoint_errors(tmp_path, capsys):
    assert main(["bench", "synth", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert main(["bench", "synth", "--checkpoint", str(tmp_path)]) == 2
    assert "not available yet" in capsys.readouterr().err
    assert main(["bench", "synth", "--checkpoint", str(tmp_path), "--generator", "json:nothing_here"]) == 2
    assert "--generator" in capsys.readouterr().err
    # a TangoFlux-layout directory goes to the pipeline loader, whose errors name the missing file
    (tmp_path / "tangoflux.safetensors").write_bytes(b"")
    assert main(["bench", "synth", "--checkpoint", str(tmp_path)]) == 2
    assert "config.json not found" in capsys.readouterr().err


def test_bench_synth_generator_factory(tmp_path, capsys, monkeypatch):
    import sys
    import types

    from pysonic.eval.synthbench import oracle_generator

    mod = types.ModuleType("fake_factory")
    seen = []
    mod.make = lambda path: seen.append(path) or oracle_generator(16000)
    monkeypatch.setitem(sys.modules, "fake_factory", mod)
    rc = main(["bench", "synth", "--checkpoint", str(tmp_path), "--generator", "fake_factory:make", "--n", "2",
               "--attributes", "loudness", "--split", "train"])
    assert rc == 0 and seen == [str(tmp_path)]
    assert "| loudness | 100% |" in capsys.readouterr().out


def test_pipeline_generator_groups_durations():
    import torch

    from pysonic.eval.generators import pipeline_generator

    calls = []

    class FakePipe:
        sample_rate = 100

        def generate(self, prompts, *, duration, steps, guidance_scale, generator, progress):
            calls.append((list(prompts), duration, steps, guidance_scale, progress))
            noise = torch.randn(len(prompts), 1, int(duration * 100), generator=generator)
            return noise

    fn = pipeline_generator(FakePipe(), steps=3, guidance_scale=2.0)
    out, sr = fn(["a", "b", "c"], [1.0, 2.0, 1.0], 5)
    assert sr == 100 and [x.shape[-1] for x in out] == [100, 200, 100]
    assert calls[0][:2] == (["a", "c"], 1.0) and calls[1][:2] == (["b"], 2.0) and calls[0][2:] == (3, 2.0, False)
    again, _ = fn(["a", "b", "c"], [1.0, 2.0, 1.0], 5)
    assert all(torch.equal(x, y) for x, y in zip(out, again))  # seeded
