"""Datasets: the procedural SonicSynth generator (``pysonic.data.synth``) and manifests of audio files."""
