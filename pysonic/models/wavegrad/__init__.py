"""WaveGrad: a mel-conditioned diffusion vocoder (Chen et al., 2020).

``WaveGrad.from_pretrained(path).generate(mel, iterations=6, schedule=betas)``. Loads the
ivanvovk/WaveGrad and the LMNT ``wavegrad`` package checkpoints. ``search_schedule`` finds the
betas of a few-iteration schedule for a trained model.
"""
from pysonic.models.wavegrad.config import MelConfig, WaveGradConfig, from_ivanvovk_json, ivanvovk_default, lmnt_default
from pysonic.models.wavegrad.mel import MelSpectrogram, mel_filterbank
from pysonic.models.wavegrad.model import WaveGradNet
from pysonic.models.wavegrad.schedules import fibonacci_betas, linear_betas
from pysonic.models.wavegrad.vocoder import WaveGrad, check_betas
from pysonic.models.wavegrad.search import load_schedule, save_schedule, search_schedule

__all__ = [
    "MelConfig", "WaveGradConfig", "from_ivanvovk_json", "ivanvovk_default", "lmnt_default",
    "MelSpectrogram", "mel_filterbank", "WaveGradNet", "WaveGrad", "check_betas", "linear_betas", "fibonacci_betas",
    "search_schedule", "save_schedule", "load_schedule",
]
