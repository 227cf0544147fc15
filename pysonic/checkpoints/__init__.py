"""Checkpoint reading: safe readers and the key-mapping converters for upstream formats."""
from pysonic.checkpoints.io import CheckpointError, load_into, read_state_dict

__all__ = ["CheckpointError", "load_into", "read_state_dict"]
