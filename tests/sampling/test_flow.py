"""Flow samplers: Euler against diffusers' FlowMatchEulerDiscreteScheduler as TangoFlux drives it,
exactness on straight flows, Heun's second order, guidance, backends and bad input."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pysonic.sampling import FlowEulerScheduler, FlowHeunScheduler, flow_scheduler, tangoflux_sigmas
from tests.ops.utils import cpu_backends


def _run(sched, fn, x, steps, g=1.0, backend="auto", **kw):
    sched.set_timesteps(steps, **kw)
    for sigma in sched.model_sigmas():
        vc, vu = fn(x, sigma)
        x = sched.step(vc, x, v_uncond=vu, guidance_scale=g, backend=backend)
    return x


def _field(x, sigma):
    """A nonlinear velocity pair (cond, uncond) to drive the samplers."""
    return torch.sin(x) * sigma + 0.3, torch.cos(x) - sigma


def test_euler_matches_diffusers_tangoflux_loop():
    diffusers = pytest.importorskip("diffusers")
    steps, g = 7, 4.5
    ref = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps))  # TangoFlux's retrieve_timesteps
    ours = FlowEulerScheduler()
    ours.set_timesteps(steps)
    torch.testing.assert_close(ours.timesteps, ref.timesteps, rtol=0, atol=0)
    torch.testing.assert_close(ours.sigmas, ref.sigmas, rtol=0, atol=0)
    x0 = torch.randn(2, 5, 3)
    x_ref, x = x0.clone(), x0.clone()
    for t, sigma in zip(ref.timesteps, ours.model_sigmas()):
        # TangoFlux: timestep=torch.tensor([t / 1000]); guided velocity; scheduler.step
        torch.testing.assert_close(sigma, torch.tensor([t / 1000]), rtol=0, atol=0)
        vc, vu = _field(x_ref, t / 1000)
        x_ref = ref.step(vu + g * (vc - vu), t, x_ref).prev_sample
        vc, vu = _field(x, sigma)
        x = ours.step(vc, x, v_uncond=vu, guidance_scale=g)
    torch.testing.assert_close(x, x_ref, rtol=0, atol=1e-5)  # fp32: same update, fused evaluation order


@pytest.mark.parametrize("name", ["euler", "heun"])
def test_straight_flow_is_exact(name):
    """x_sigma = (1 - sigma) data + sigma noise has the constant velocity noise - data: both solvers
    land on the data from pure noise, on any schedule."""
    data, noise = torch.randn(3, 4), torch.randn(3, 4)
    for kw in ({"num_steps": 1}, {"num_steps": 5}, {"sigmas": [1.0, 0.7, 0.2, 0.05]}):
        out = _run(flow_scheduler(name), lambda x, s: (noise - data, None), noise.clone(), kw.pop("num_steps", None), **kw)
        torch.testing.assert_close(out, data, rtol=0, atol=1e-5)


def test_heun_is_second_order():
    """dx/dsigma = x from x(1) = 1: x(0) = exp(-1). Halving the step divides Euler's error by ~2 and Heun's by ~4."""
    exact = math.exp(-1)
    errs = {}
    for name in ("euler", "heun"):
        for n in (8, 16):
            sched = flow_scheduler(name)
            sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / n, n))
            x = torch.ones(1)
            for sigma in sched.model_sigmas():
                x = sched.step(x.clone(), x, backend="reference")
            errs[name, n] = abs(x.item() - exact)
    assert 1.7 < errs["euler", 8] / errs["euler", 16] < 2.3
    assert 3.3 < errs["heun", 8] / errs["heun", 16] < 4.7
    assert errs["heun", 16] < errs["euler", 16] / 5


def test_heun_calls_and_guidance():
    sched = FlowHeunScheduler()
    sched.set_timesteps(4)
    sig = [s.item() for s in sched.model_sigmas()]
    assert np.allclose(sig, [1.0, 0.75, 0.75, 0.5, 0.5, 0.25, 0.25])
    # Heun with guidance equals Heun on the guided field
    g = 3.0
    x0 = torch.randn(2, 6)
    a = _run(FlowHeunScheduler(), _field, x0.clone(), 4, g=g)
    guided = lambda x, s: ((lambda c, u: (u + g * (c - u), None))(*_field(x, s)))  # noqa: E731
    b = _run(FlowHeunScheduler(), guided, x0.clone(), 4)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", cpu_backends("flow_step"))
@pytest.mark.parametrize("name", ["euler", "heun"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backends_match_reference(backend, name, dtype):
    x0 = torch.randn(2, 7, 5).to(dtype)
    ref = _run(flow_scheduler(name), _field, x0.clone(), 3, g=4.5, backend="reference")
    out = _run(flow_scheduler(name), _field, x0.clone(), 3, g=4.5, backend=backend)
    tol = 1e-5 if dtype == torch.float32 else 0.1  # bf16: fused (fp32 inside) vs unfused rounding, |x| ~ 10
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=tol)


def test_errors():
    s = FlowEulerScheduler()
    with pytest.raises(RuntimeError, match="set_timesteps"):
        s.model_sigmas()
    for bad, msg in ((0, "num_steps"), (2.5, "num_steps")):
        with pytest.raises(ValueError, match=msg):
            s.set_timesteps(bad)
    for sig in ([1.0, 1.0], [0.5, 0.7], [1.5, 0.5], [0.5, 0.0], [], [[1.0]], [float("nan")]):
        with pytest.raises(ValueError, match="sigmas"):
            s.set_timesteps(sigmas=sig)
    with pytest.raises(ValueError, match="num_steps=3"):
        s.set_timesteps(3, sigmas=[1.0, 0.5])
    s.set_timesteps(1)
    x = torch.zeros(2)
    x = s.step(x, x)
    with pytest.raises(RuntimeError, match="done"):
        s.step(x, x)
    with pytest.raises(ValueError, match="scheduler"):
        flow_scheduler("dpm")
    with pytest.raises(ValueError, match="shift"):
        FlowEulerScheduler(shift=0)
    assert np.allclose(tangoflux_sigmas(4), [1.0, 0.75, 0.5, 0.25])
