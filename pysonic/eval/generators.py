"""Generate functions for SynthBench: ``fn(prompts, durations, seed) -> (audio, sample_rate)``.

- :func:`pipeline_generator` wraps any pipeline with ``generate(prompts, duration=..., steps=...,
  guidance_scale=..., generator=..., progress=...) -> [B, C, N]`` and ``sample_rate`` (the TangoFlux
  pipeline); prompts sharing a duration go in one call, each duration group gets its own seeded
  torch.Generator (``seed * 1000 + group``), and items come back as a list of [C, N_i].
- :func:`tangoflux_generator` loads a local TangoFlux-layout directory with
  :meth:`pysonic.pipelines.TangoFlux.from_pretrained` and wraps it.
"""
from __future__ import annotations

from collections import defaultdict

import torch

__all__ = ["pipeline_generator", "tangoflux_generator"]


def pipeline_generator(pipe, *, steps: int = 25, guidance_scale: float = 4.5):
    def generate(prompts: list[str], durations: list[float], seed: int):
        groups: dict[float, list[int]] = defaultdict(list)
        for i, d in enumerate(durations):
            groups[float(d)].append(i)
        out: list[torch.Tensor | None] = [None] * len(prompts)
        for g, (d, idx) in enumerate(sorted(groups.items())):
            gen = torch.Generator().manual_seed(int(seed) * 1000 + g)
            audio = pipe.generate([prompts[i] for i in idx], duration=d, steps=steps, guidance_scale=guidance_scale,
                                  generator=gen, progress=False)
            for k, i in enumerate(idx):
                out[i] = audio[k].float().cpu()
        return out, int(pipe.sample_rate)

    return generate


def tangoflux_generator(checkpoint, *, text_encoder=None, steps: int = 25, guidance_scale: float = 4.5,
                        dtype: torch.dtype = torch.float32, device=None):
    from pysonic.pipelines import TangoFlux

    pipe = TangoFlux.from_pretrained(checkpoint, text_encoder=text_encoder, dtype=dtype, device=device)
    return pipeline_generator(pipe, steps=steps, guidance_scale=guidance_scale)
