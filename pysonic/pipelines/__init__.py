"""User-facing pipelines: ``from_pretrained(path)`` on local files, ``generate(...)``."""
from pysonic.pipelines.tangoflux import AudioOutput, TangoFlux

__all__ = ["AudioOutput", "TangoFlux"]
