"""Noise schedules (betas) for WaveGrad sampling.

The sampler takes any betas in (0, 1); few-iteration schedules need a search (not here yet). A
Fibonacci-sequence schedule is the usual starting point for 25 or more iterations (ivanvovk/WaveGrad
README, "Noise schedule grid search"): each beta is the sum of the two before it, so the noise
grows roughly geometrically (ratio -> 1.618).
"""
from __future__ import annotations

import torch


def linear_betas(steps: int, start: float = 1e-6, end: float = 0.01) -> torch.Tensor:
    """Linearly spaced betas, float64 [steps] (the training schedule of both peers)."""
    return torch.linspace(start, end, steps, dtype=torch.float64)


def fibonacci_betas(steps: int, first: float = 1e-6, second: float = 9e-6) -> torch.Tensor:
    """``b[0] = first, b[1] = second, b[k] = b[k-1] + b[k-2]``, float64 [steps].

    Raises:
        ValueError: ``steps < 1``, a non-positive start, or a beta reaching 1 (too many steps for
            these starting values).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"fibonacci_betas: steps must be a positive int, got {steps!r}")
    if not (0 < first < 1 and 0 < second < 1):
        raise ValueError(f"fibonacci_betas: first and second must be in (0, 1), got {first}, {second}")
    betas = [float(first), float(second)][:steps]
    while len(betas) < steps:
        betas.append(betas[-1] + betas[-2])
    if betas[-1] >= 1:
        raise ValueError(
            f"fibonacci_betas: beta {len(betas) - 1} = {betas[-1]:.3g} >= 1; use fewer steps or smaller starting values"
        )
    return torch.tensor(betas, dtype=torch.float64)
