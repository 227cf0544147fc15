"""Rectified-flow Heun sampler (second order, k-diffusion's ``sample_heun`` on a flow): per step an
Euler predictor to the next sigma, a second model call there, and the update with the mean of the
two velocities; the last step (to sigma 0) stays Euler. Every update is one ``ops.flow_step``
(the mean velocity goes through it: the guided combination is linear).

The model is called ``2N - 1`` times for N steps: ``model_sigmas()`` lists them in call order.
"""
from __future__ import annotations

import torch

from pysonic import ops
from pysonic.sampling.flow_euler import FlowEulerScheduler


class FlowHeunScheduler(FlowEulerScheduler):
    """Heun's method on the same schedules as :class:`FlowEulerScheduler`."""

    order = 2

    def _call_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        # calls: t0 | t1 (corrector of step 0), t1 (step 1) | t2, t2 | ... | t_{N-1} (Euler)
        return torch.cat([t[:1], t[1:].repeat_interleave(2)])

    def set_timesteps(self, *args, **kwargs) -> None:
        super().set_timesteps(*args, **kwargs)
        self._first: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None

    def _step(self, v_cond, sample, v_uncond, g, backend):
        call = self.step_index
        i = call // 2  # the step this call belongs to (calls 2i and 2i + 1)
        dt = self._dt(i)
        if self._first is None:  # predictor (or the final Euler step)
            out = ops.flow_step(sample, v_cond, v_uncond, dt, g, backend=backend)
            if i < self.num_steps - 1:
                self._first = (sample, v_cond, v_uncond)
            return out
        x0, vc0, vu0 = self._first
        self._first = None
        vc = (vc0 + v_cond) * 0.5
        vu = None if vu0 is None else (vu0 + v_uncond) * 0.5
        return ops.flow_step(x0, vc, vu, dt, g, backend=backend)
