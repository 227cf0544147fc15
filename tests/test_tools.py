"""tools/: latent_pitch_similarity.py's two measures on encoders whose answer is known;
oracle_flow_pitch.py's stand-in latent, its pitch reading and its coded text encoder."""
import importlib.util
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lps = _load("latent_pitch_similarity")
ofp = _load("oracle_flow_pitch")


class FramedEncoder:
    """A stand-in VAE: frames of 256 samples, either as they are (waveform-like latents) or as
    their magnitude spectrum (phase-free latents)."""

    sampling_rate = 8000
    config = SimpleNamespace(audio_channels=1)

    def __init__(self, spectral: bool) -> None:
        self.spectral = spectral

    def encode_distribution(self, wav):
        frames = wav[:, 0].unfold(-1, 256, 256)  # [B, T, 256]
        if self.spectral:
            frames = torch.fft.rfft(frames * torch.hann_window(256), dim=-1).abs()
        z = frames.transpose(1, 2)
        return z, torch.ones_like(z)


def test_phase_dependence_tells_waveform_from_spectral_latents():
    assert lps.phase_dependence(FramedEncoder(spectral=True), 440.0) > 0.99
    assert abs(lps.phase_dependence(FramedEncoder(spectral=False), 440.0)) < 0.2


def test_pitch_selectivity_of_a_spectral_latent():
    """256-sample frames at 8 kHz resolve ~31 Hz: a tone 5 cents away looks the same, an octave
    away looks different."""
    enc = FramedEncoder(spectral=True)
    assert lps.frame_similarity(enc, 440.0, 0) > 0.999
    assert lps.frame_similarity(enc, 440.0, 5) > 0.99
    assert lps.frame_similarity(enc, 440.0, 1200) < 0.2


@pytest.mark.parametrize("hz", [110.0, 305.0, 440.0, 1187.0])
def test_oracle_latent_reads_a_tone_pitch_within_25_cents(hz):
    t = torch.arange(int(2.0 * ofp.SR)) / ofp.SR
    feat = ofp.features(0.3 * torch.sin(2 * math.pi * hz * t))
    assert feat.shape == (ofp.FRAMES, ofp.BANDS)
    assert abs(1200 * math.log2(ofp.pitch_of(feat, 2.0) / hz)) < 25
    # phase-free: the same tone started elsewhere in its cycle gives (nearly) the same magnitudes
    shifted = ofp.features(0.3 * torch.sin(2 * math.pi * hz * t + 1.0))
    cos = torch.nn.functional.cosine_similarity(shifted[:20].exp(), feat[:20].exp(), dim=-1)
    assert cos.min() > 0.99


def test_oracle_text_encoder_adds_the_value_code_to_numbers_only():
    plain, coded = ofp.text_encoder(0), ofp.text_encoder(64)
    a, mask = plain.encode(["a sine tone at 440 Hz"])
    b, _ = coded.encode(["a sine tone at 440 Hz"])
    changed = ((a - b).abs().amax(-1) > 0)[0].tolist()
    assert changed == [False, False, False, False, True, False, False]  # a sine tone at <num> hz <eos>


def test_oracle_model_spec_builds_both_poolings():
    from pysonic.train.tangoflux import build_model

    for pooling in ("mean", "attention"):
        model = build_model(ofp.model_spec(2, pooling))
        assert model.config.text_pooling == pooling and model.config.in_channels == ofp.BANDS
        assert hasattr(model, "pool_query") == (pooling == "attention")
    assert ofp.run_dir(Path("w"), 64, 2, "attention").name == "flow_code64_poolattention"
    assert ofp.run_dir(Path("w"), 64, 2).name == "flow_code64"  # the runs measured before keep their names
