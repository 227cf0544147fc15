"""Per-step sampler updates: ``flow_step`` (rectified flow, CFG), ``diffusion_step`` (DDPM-style)
and ``diffusion_step_x0`` (DDPM with a clamped clean-signal estimate).

Each is one fused, memory-bound pass; samplers call one of them once per step.
"""
from __future__ import annotations

import torch

from pysonic import _ext
from pysonic.ops import _checks, reference
from pysonic.ops._backends import resolve


def flow_step(x, v_cond, v_uncond=None, dt: float = 0.0, guidance_scale: float = 1.0, *, backend: str = "auto"):
    """Euler step of a (guided) flow: ``x + dt * (v_uncond + guidance_scale * (v_cond - v_uncond))``.

    Args:
        x: current sample, any shape, float32/bfloat16/float16.
        v_cond: conditional velocity, same shape and dtype as ``x``.
        v_uncond: unconditional velocity, or None for ``x + dt * v_cond``.
        dt: step size (negative when integrating from noise at t=1 to data at t=0).
        guidance_scale: classifier-free guidance weight.
        backend: "auto", "cpp", "cuda", "triton" or "reference".

    Returns:
        The updated sample, same shape and dtype as ``x`` (contiguous).
    """
    op = "flow_step"
    _checks.tensor(op, "x", x, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor(op, "v_cond", v_cond)
    if v_uncond is not None:
        _checks.tensor(op, "v_uncond", v_uncond)
    device = _checks.same_device(op, x=x, v_cond=v_cond, v_uncond=v_uncond)
    _checks.same_dtype(op, x=x, v_cond=v_cond, v_uncond=v_uncond)
    _checks.same_shape(op, x=x, v_cond=v_cond, v_uncond=v_uncond)
    dt, guidance_scale = float(dt), float(guidance_scale)
    chosen = resolve(op, backend, device)
    if chosen == "reference":
        return reference.flow_step(x, v_cond, v_uncond, dt, guidance_scale)
    return _dispatch(op, chosen, (x, v_cond, v_uncond, dt, guidance_scale))


def _coefficient(op, name, value, x):
    """A float or [B] tensor -> float32 [B] tensor on x's device."""
    batch = x.shape[0]
    if isinstance(value, torch.Tensor):
        if value.dim() > 1 or value.numel() not in (1, batch):
            raise ValueError(f"{op}: {name} must be a float or a tensor of shape [B] = [{batch}], got shape {tuple(value.shape)}")
        if value.device != x.device:
            raise ValueError(f"{op}: {name} is on {value.device} but x is on {x.device}")
        return value.to(torch.float32).reshape(-1).expand(batch)
    return torch.full((batch,), float(value), dtype=torch.float32, device=x.device)


def _check_diffusion(op, x, eps, noise, clip):
    """The argument checks both diffusion updates share; returns the device."""
    _checks.tensor(op, "x", x, dtypes=_checks.FLOAT_DTYPES)
    if x.dim() == 0:
        raise ValueError(f"{op}: x must have a batch dimension, got a scalar")
    _checks.tensor(op, "eps", eps)
    if noise is not None:
        _checks.tensor(op, "noise", noise)
    device = _checks.same_device(op, x=x, eps=eps, noise=noise)
    _checks.same_dtype(op, x=x, eps=eps, noise=noise)
    _checks.same_shape(op, x=x, eps=eps, noise=noise)
    if clip is not None and not clip >= 0:
        raise ValueError(f"{op}: clip must be a number >= 0, got {clip}")
    return device


def _dispatch(op, chosen, args):
    """Run ``op`` on the Triton kernel or the registered C++/CUDA kernel."""
    if chosen == "triton":
        from pysonic.ops import _triton

        return _triton.get(op)(*args)
    return getattr(torch.ops.pysonic, op)(*args)


def diffusion_step(x, eps, noise=None, c1=1.0, c2=0.0, sigma=0.0, *, clip: float | None = None, backend: str = "auto"):
    """One reverse-diffusion update: ``c1 * (x - c2 * eps) + sigma * noise``, clamped when ``clip`` is set.

    Args:
        x: current sample [B, ...], float32/bfloat16/float16.
        eps: predicted noise, same shape and dtype as ``x``.
        noise: fresh Gaussian noise like ``x``, or None (sigma treated as 0).
        c1, c2, sigma: Python floats or float tensors of shape [B] (items may be at different steps).
        clip: clamp the result to [-clip, clip] (e.g. 1.0 for waveforms), or None.
        backend: "auto", "cpp", "cuda", "triton" or "reference".

    Returns:
        The updated sample, same shape and dtype as ``x`` (contiguous).
    """
    op = "diffusion_step"
    device = _check_diffusion(op, x, eps, noise, clip)
    chosen = resolve(op, backend, device)
    if chosen == "reference":
        return reference.diffusion_step(x, eps, noise, c1, c2, sigma, clip)
    c1, c2, sigma = (_coefficient(op, n, c, x) for n, c in (("c1", c1), ("c2", c2), ("sigma", sigma)))
    return _dispatch(op, chosen, (x, eps, noise, c1, c2, sigma, None if clip is None else float(clip)))


def diffusion_step_x0(x, eps, noise=None, c1=1.0, c2=0.0, coef_x0=1.0, coef_x=0.0, sigma=0.0, *,
                      clip: float | None = 1.0, backend: str = "auto"):
    """A reverse-diffusion update through a clamped estimate of the clean signal, in one pass.

    ``x0 = clamp(c1 * (x - c2 * eps), -clip, clip)``, then ``coef_x0 * x0 + coef_x * x + sigma * noise``:
    the DDPM posterior mean of Ho et al. (2020) with the prediction clamped, as ivanvovk/WaveGrad
    (``clip_denoised=True``) and diffusers (``clip_sample=True``) sample. Without the clamp it is
    the affine :func:`diffusion_step`; with it, the clamp sits between two affine maps, which is
    why it is an op of its own.

    Args:
        x: current sample [B, ...], float32/bfloat16/float16.
        eps: predicted noise, same shape and dtype as ``x``.
        noise: fresh Gaussian noise like ``x``, or None (sigma treated as 0).
        c1, c2: the clean-signal estimate's coefficients (``1 / sqrt(alpha_bar)``, ``sqrt(1 - alpha_bar)``).
        coef_x0, coef_x: the posterior mean's coefficients of ``x0`` and ``x``.
        sigma: the posterior standard deviation. Every coefficient is a Python float or a float
            tensor of shape [B] (items may be at different steps).
        clip: clamp bound of the estimate (1.0 for waveforms in [-1, 1]), or None for no clamp.
        backend: "auto", "cpp", "cuda", "triton" or "reference".

    Returns:
        The updated sample, same shape and dtype as ``x`` (contiguous).
    """
    op = "diffusion_step_x0"
    device = _check_diffusion(op, x, eps, noise, clip)
    names = ("c1", "c2", "coef_x0", "coef_x", "sigma")
    coefs = [_coefficient(op, n, c, x) for n, c in zip(names, (c1, c2, coef_x0, coef_x, sigma))]
    chosen = resolve(op, backend, device)
    if chosen == "reference":
        return reference.diffusion_step_x0(x, eps, noise, *coefs, None if clip is None else float(clip))
    return _dispatch(op, chosen, (x, eps, noise, *coefs, None if clip is None else float(clip)))


if _ext._C is not None:  # shapes for torch.compile / fake tensors

    @torch.library.register_fake("pysonic::flow_step")
    def _flow_step_fake(x, v_cond, v_uncond, dt, guidance_scale):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("pysonic::diffusion_step")
    def _diffusion_step_fake(x, eps, noise, c1, c2, sigma, clip=None):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("pysonic::diffusion_step_x0")
    def _diffusion_step_x0_fake(x, eps, noise, c1, c2, coef_x0, coef_x, sigma, clip=1.0):
        return torch.empty_like(x, memory_format=torch.contiguous_format)
