"""Generative model families, one module each (tangoflux, soundstorm, musicgen, wavegrad, musicldm)."""
