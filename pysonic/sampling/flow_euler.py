"""Rectified-flow Euler sampler (TangoFlux's: diffusers' ``FlowMatchEulerDiscreteScheduler`` with
``sigmas = linspace(1, 1/N, N)`` and no shift), each update one fused ``pysonic.ops.flow_step``.

The flow runs from noise at sigma 1 to data at sigma 0; the model predicts the velocity
``d x / d sigma`` (``noise - data``). Usage::

    sched = FlowEulerScheduler()
    sched.set_timesteps(25)
    for sigma in sched.model_sigmas():            # one model call each
        v_uncond, v_cond = model(x, sigma).chunk(2)
        x = sched.step(v_cond, x, v_uncond=v_uncond, guidance_scale=4.5)
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from pysonic import ops


def tangoflux_sigmas(num_steps: int) -> np.ndarray:
    """TangoFlux's schedule: ``linspace(1, 1/N, N)`` (every Euler step has dt = -1/N)."""
    return np.linspace(1.0, 1.0 / num_steps, num_steps)


class FlowEulerScheduler:
    """First-order (Euler) flow sampler.

    Args:
        num_train_timesteps: timestep scale: ``timesteps = sigmas * num_train_timesteps`` and the
            model is fed ``timestep / num_train_timesteps`` (as TangoFlux computes it, in float32).
        shift: diffusers' static shift ``shift * s / (1 + (shift - 1) * s)``; 1 (TangoFlux) is none.
    """

    order = 1

    def __init__(self, *, num_train_timesteps: int = 1000, shift: float = 1.0):
        if num_train_timesteps < 1:
            raise ValueError(f"{type(self).__name__}: num_train_timesteps must be >= 1, got {num_train_timesteps}")
        if not shift > 0:
            raise ValueError(f"{type(self).__name__}: shift must be > 0, got {shift}")
        self.num_train_timesteps = int(num_train_timesteps)
        self.shift = float(shift)
        self.sigmas: torch.Tensor | None = None  # [N + 1] float32, ending with 0
        self.timesteps: torch.Tensor | None = None  # [number of model calls] float32
        self.step_index = 0

    # ------------------------------------------------------------------ schedule
    def _base_sigmas(self, num_steps: int | None, sigmas: Sequence[float] | None) -> torch.Tensor:
        name = type(self).__name__
        if sigmas is None:
            if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
                raise ValueError(f"{name}.set_timesteps: num_steps must be a positive int, got {num_steps!r}")
            sigmas = tangoflux_sigmas(num_steps)
        s = np.asarray(sigmas.cpu() if isinstance(sigmas, torch.Tensor) else sigmas, dtype=np.float64)
        if s.ndim != 1 or s.size == 0:
            raise ValueError(f"{name}.set_timesteps: sigmas must be a non-empty 1-D sequence, got shape {s.shape}")
        if num_steps is not None and sigmas is not None and num_steps != s.size:
            raise ValueError(f"{name}.set_timesteps: num_steps={num_steps} but {s.size} sigmas were given")
        if not np.all(np.isfinite(s)) or s.min() <= 0 or s.max() > 1 or np.any(np.diff(s) >= 0):
            raise ValueError(f"{name}.set_timesteps: sigmas must be strictly decreasing values in (0, 1], got {s.tolist()[:8]}")
        s = torch.from_numpy(s.astype(np.float32))  # diffusers rounds the schedule to float32 first
        return self.shift * s / (1 + (self.shift - 1) * s)

    def set_timesteps(self, num_steps: int | None = None, sigmas: Sequence[float] | None = None,
                      device: torch.device | str | None = None) -> None:
        """Set the schedule: ``num_steps`` of TangoFlux's ``linspace(1, 1/N, N)``, or explicit
        ``sigmas`` (strictly decreasing in (0, 1]; a final 0 is appended)."""
        s = self._base_sigmas(num_steps, sigmas)
        self.sigmas = torch.cat([s, torch.zeros(1)]).to(device)
        self.timesteps = self._call_timesteps(s * self.num_train_timesteps).to(device)
        self.step_index = 0

    def _call_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def model_sigmas(self) -> list[torch.Tensor]:
        """The sigma to feed the model at each call, as TangoFlux computes it
        (``timestep / num_train_timesteps`` in float32), each a [1] tensor."""
        self._require_schedule()
        return [(t / self.num_train_timesteps).reshape(1) for t in self.timesteps]

    @property
    def num_steps(self) -> int:
        self._require_schedule()
        return self.sigmas.numel() - 1

    def _require_schedule(self) -> None:
        if self.sigmas is None:
            raise RuntimeError(f"{type(self).__name__}: call set_timesteps(...) first")

    # ------------------------------------------------------------------ update
    def _dt(self, i: int) -> float:
        return float(self.sigmas[i + 1] - self.sigmas[i])  # float32 difference, as diffusers

    def step(self, v_cond: torch.Tensor, sample: torch.Tensor, *, v_uncond: torch.Tensor | None = None,
             guidance_scale: float = 1.0, backend: str = "auto") -> torch.Tensor:
        """One update: ``sample + dt * (v_uncond + g * (v_cond - v_uncond))`` (``sample + dt *
        v_cond`` without ``v_uncond``), in ``sample``'s dtype.

        Args:
            v_cond: [B, ...] conditional velocity at the current sigma (any float dtype).
            sample: [B, ...] current sample (keep it float32, as TangoFlux does).
            v_uncond: unconditional velocity, or None.
            guidance_scale: classifier-free guidance weight.
            backend: backend of ``pysonic.ops.flow_step``.
        """
        self._require_schedule()
        if self.step_index >= len(self.timesteps):
            raise RuntimeError(f"{type(self).__name__}.step: all {len(self.timesteps)} steps are done; call set_timesteps again")
        out = self._step(v_cond.to(sample.dtype), sample, None if v_uncond is None else v_uncond.to(sample.dtype),
                         float(guidance_scale), backend)
        self.step_index += 1
        return out

    def _step(self, v_cond, sample, v_uncond, g, backend):
        return ops.flow_step(sample, v_cond, v_uncond, self._dt(self.step_index), g, backend=backend)
