"""Audio codecs and VAEs, one per file (EnCodec, Oobleck, mel VAE + HiFi-GAN)."""
from pysonic.codecs.encodec import EncodecConfig, EncodecModel

__all__ = ["EncodecConfig", "EncodecModel"]
