"""TangoFlux (text-to-audio flow matching): the Flux transformer that predicts the velocity.

The velocity model (text projection, duration token, transformer) is ``TangoFluxModel``; the text
encoder, the VAE and the sampler are separate modules.
"""
from pysonic.models.tangoflux.model import DurationEmbedding, TangoFluxConfig, TangoFluxModel
from pysonic.models.tangoflux.transformer import FluxTransformer, FluxTransformerConfig

__all__ = ["DurationEmbedding", "FluxTransformer", "FluxTransformerConfig", "TangoFluxConfig", "TangoFluxModel"]
