"""tools/latent_pitch_similarity.py: its two measures on encoders whose answer is known."""
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import torch

TOOL = Path(__file__).resolve().parents[1] / "tools" / "latent_pitch_similarity.py"
spec = importlib.util.spec_from_file_location("latent_pitch_similarity", TOOL)
lps = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lps)


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
