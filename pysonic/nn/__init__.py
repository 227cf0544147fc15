"""Shared building blocks (attention, conformer, conv blocks, embeddings, FiLM), one file each.

Import from the submodules directly, e.g. ``from pysonic.nn.film import FiLM``.
"""
