"""Datasets and audio data: manifests (``pysonic.data.manifest``)."""
