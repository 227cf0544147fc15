"""TangoFlux (text-to-audio flow matching): the Flux transformer that predicts the velocity.

The text encoder, the VAE and the sampler are separate modules.
"""
from pysonic.models.tangoflux.transformer import FluxTransformer, FluxTransformerConfig

__all__ = ["FluxTransformer", "FluxTransformerConfig"]
