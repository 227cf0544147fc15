"""``pysonic codec encode/decode`` on a tiny random 24 kHz model saved in the transformers layout."""
from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf
import torch

from pysonic.cli import main
from pysonic.codecs.encodec import EncodecConfig, EncodecModel
from tests.codecs.test_encodec import _save_transformers_layout


@pytest.fixture(autouse=True)
def _plain_cpu_kernels():
    # oneDNN JIT-compiles a primitive per new conv/LSTM shape (seconds on a loaded machine).
    with torch.backends.mkldnn.flags(enabled=False):
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = EncodecModel(EncodecConfig.encodec_24khz(n_filters=4, dimension=16)).eval()
    path = tmp_path_factory.mktemp("ckpt") / "encodec_tiny"
    _save_transformers_layout(model, path)
    return model, path


def _write(path, wav: torch.Tensor, sr: int) -> None:
    sf.write(str(path), wav.T.numpy(), sr, subtype="FLOAT")  # wav: [C, N]


def test_round_trip(tiny, tmp_path, capsys):
    model, ckpt = tiny
    wav = 0.3 * torch.randn(1, 2407, generator=torch.Generator().manual_seed(1))  # not a whole number of hops
    _write(tmp_path / "in.wav", wav, 24_000)
    assert main(["codec", "encode", str(tmp_path / "in.wav"), "-o", str(tmp_path / "c.npz"),
                 "--bandwidth", "6", "--checkpoint", str(ckpt)]) == 0
    data = np.load(tmp_path / "c.npz")
    codes = torch.from_numpy(data["codes"].astype(np.int64))
    expected = model.encode(wav[None], bandwidth=6.0)
    assert codes.shape == (1, 8, math.ceil(2407 / 320)) and torch.equal(codes, expected)
    assert int(data["num_samples"]) == 2407 and float(data["bandwidth"]) == 6.0

    # decode with the checkpoint recorded in the npz, float samples: exactly the model's output
    assert main(["codec", "decode", str(tmp_path / "c.npz"), "-o", str(tmp_path / "out.wav"),
                 "--subtype", "FLOAT"]) == 0
    out, sr = sf.read(str(tmp_path / "out.wav"), dtype="float32", always_2d=True)
    assert sr == 24_000 and out.shape == (2407, 1)
    with torch.no_grad():
        ref = model.decode(expected)[0, :, :2407].T.numpy()
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)  # same ops, same order: fp32 rounding only

    # an explicit checkpoint and the default (16-bit PCM) format; chunked decoding of a causal model
    assert main(["codec", "decode", str(tmp_path / "c.npz"), "-o", str(tmp_path / "out16.wav"),
                 "--checkpoint", str(ckpt), "--chunk-frames", "3"]) == 0
    out16, _ = sf.read(str(tmp_path / "out16.wav"), dtype="float32", always_2d=True)
    assert sf.info(str(tmp_path / "out16.wav")).subtype == "PCM_16"
    # 16-bit quantisation (half a step, 1/65536) plus clipping at full scale
    np.testing.assert_allclose(out16, np.clip(ref, -1, 1 - 2**-15), rtol=0, atol=2**-15 + 1e-5)
    err = capsys.readouterr().err
    assert "2407 samples" in err


def test_chunked_encode_matches(tiny, tmp_path):
    model, ckpt = tiny
    wav = 0.3 * torch.randn(1, 4000, generator=torch.Generator().manual_seed(2))
    _write(tmp_path / "in.wav", wav, 24_000)
    assert main(["codec", "encode", str(tmp_path / "in.wav"), "-o", str(tmp_path / "c.npz"),
                 "--checkpoint", str(ckpt), "--chunk-seconds", "0.05"]) == 0
    codes = np.load(tmp_path / "c.npz")["codes"]
    assert codes.shape[1] == 32  # default bandwidth: the highest
    assert torch.equal(torch.from_numpy(codes.astype(np.int64)), model.encode(wav[None]))


def test_resample_and_remix(tiny, tmp_path, capsys):
    model, ckpt = tiny
    t = torch.arange(4410) / 44_100
    stereo = torch.stack([0.3 * torch.sin(2 * math.pi * 440 * t), 0.2 * torch.sin(2 * math.pi * 660 * t)])
    _write(tmp_path / "st.wav", stereo, 44_100)
    args = ["codec", "encode", str(tmp_path / "st.wav"), "-o", str(tmp_path / "c.npz"), "--checkpoint", str(ckpt)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "pysonic codec: error:" in err and "44100 Hz with 2 channel(s)" in err and "--resample" in err
    assert not (tmp_path / "c.npz").exists()
    assert main(args + ["--resample", "--bandwidth", "1.5"]) == 0
    data = np.load(tmp_path / "c.npz")
    assert data["codes"].shape == (1, 2, math.ceil(2400 / 320)) and int(data["num_samples"]) == 2400
    assert main(["codec", "decode", str(tmp_path / "c.npz"), "-o", str(tmp_path / "o.flac")]) == 0
    info = sf.info(str(tmp_path / "o.flac"))
    assert (info.samplerate, info.channels, info.frames) == (24_000, 1, 2400)


def test_errors(tiny, tmp_path, capsys):
    _, ckpt = tiny
    _write(tmp_path / "in.wav", 0.1 * torch.randn(1, 800), 24_000)

    def fails(args, *needles):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("pysonic codec: error:"), err
        for needle in needles:
            assert needle in err, (needle, err)

    enc = ["codec", "encode", str(tmp_path / "in.wav"), "-o", str(tmp_path / "c.npz")]
    fails(enc + ["--checkpoint", str(ckpt), "--bandwidth", "5"], "bandwidth 5.0 kbps is not one of")
    fails(enc + ["--checkpoint", str(tmp_path / "nope")], "checkpoint", "does not exist")
    fails(["codec", "encode", str(tmp_path / "missing.wav"), "-o", str(tmp_path / "c.npz"), "--checkpoint", str(ckpt)],
          "input", "does not exist")
    fails(["codec", "encode", str(tmp_path / "in.wav"), "-o", str(tmp_path / "no_dir" / "c.npz"),
           "--checkpoint", str(ckpt)], "output directory")
    (tmp_path / "junk.wav").write_bytes(b"not audio at all")
    fails(["codec", "encode", str(tmp_path / "junk.wav"), "-o", str(tmp_path / "c.npz"), "--checkpoint", str(ckpt)],
          "cannot read audio")
    bad = torch.zeros(1, 800)
    bad[0, 5] = float("nan")
    _write(tmp_path / "nan.wav", bad, 24_000)
    fails(["codec", "encode", str(tmp_path / "nan.wav"), "-o", str(tmp_path / "c.npz"), "--checkpoint", str(ckpt)],
          "NaN or Inf")
    fails(["codec", "decode", str(tmp_path / "in.wav"), "-o", str(tmp_path / "o.wav")], "not an EnCodec codes file")
    # codes outside the codebook (a hand-edited file)
    assert main(enc + ["--checkpoint", str(ckpt)]) == 0
    capsys.readouterr()
    data = dict(np.load(tmp_path / "c.npz"))
    data["codes"][0, 0, 0] = 1024
    np.savez(tmp_path / "bad.npz", **data)
    fails(["codec", "decode", str(tmp_path / "bad.npz"), "-o", str(tmp_path / "o.wav")], "codes must be in [0, 1024)")
    fails(["codec", "decode", str(tmp_path / "c.npz"), "-o", str(tmp_path / "o.wav"), "--subtype", "NOPE"],
          "cannot write")
    with pytest.raises(SystemExit):  # argparse: -o is required
        main(["codec", "encode", str(tmp_path / "in.wav"), "--checkpoint", str(ckpt)])


def test_help_lists_codec(capsys):
    with pytest.raises(SystemExit) as info:
        main(["codec", "encode", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--bandwidth" in out and "--resample" in out
