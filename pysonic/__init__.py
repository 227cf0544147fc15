"""pysonic: fast, hackable neural audio generation in PyTorch.

Layers (bottom up): ``pysonic.ops`` (fused ops with C++/CUDA/Triton kernels and a plain-PyTorch
reference), then building blocks, codecs, models, sampling, pipelines and training.
"""
from pysonic._ext import build_info
from pysonic import ops
from pysonic.audio import load_audio, save_audio
from pysonic.pipelines import TangoFlux

__version__ = "0.1.0"
__all__ = ["ops", "build_info", "__version__", "TangoFlux", "load_audio", "save_audio"]
