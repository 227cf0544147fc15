"""Triton kernels for the per-step sampler updates: ``flow_step``, ``diffusion_step`` and
``diffusion_step_x0``.

Each is one memory-bound pass: each input element is read once, the output written once,
arithmetic in fp32, the result rounded to x's dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, INTERPRET, cast, check_device, check_tensor, define, launch

BLOCK = 1024  # elements per program


# Contract of _flow_step_kernel:
#   X, VC, VU, OUT: contiguous, N elements each, dtype T (fp32/bf16/fp16); VU unused unless HAS_UNCOND.
#   grid (cdiv(N, BLOCK),); program p covers elements [p*BLOCK, (p+1)*BLOCK) & < N.
#   OUT = X + dt * (VU + g * (VC - VU))   (HAS_UNCOND)
#   OUT = X + dt * VC                     (otherwise), all in fp32, rounded once to T.
@triton.jit
def _flow_step_kernel(X, VC, VU, OUT, N, dt, g, HAS_UNCOND: tl.constexpr, BLOCK: tl.constexpr, INTERP: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(VC + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_UNCOND:
        vu = tl.load(VU + offs, mask=mask, other=0.0).to(tl.float32)
        v = vu + g * (v - vu)
    tl.store(OUT + offs, cast(x + dt * v, OUT.dtype.element_ty, INTERP), mask=mask)


# Contract of _diffusion_step_kernel:
#   X, EPS, NOISE, OUT: contiguous [B, M] (M = elements per batch item), dtype T; NOISE unused
#   unless HAS_NOISE. C1, C2, SIGMA: float32 [B].
#   grid (B * cdiv(M, BLOCK),); program q covers item b = q // cdiv(M, BLOCK), elements
#   [p*BLOCK, (p+1)*BLOCK) & < M with p = q % cdiv(M, BLOCK) (1-D: no 65535 limit on B).
#   OUT[b] = c1[b] * (X[b] - c2[b] * EPS[b]) + sigma[b] * NOISE[b], clamped to [-clip, clip] when
#   HAS_CLIP; fp32 arithmetic, rounded once to T.
@triton.jit
def _diffusion_step_kernel(X, EPS, NOISE, OUT, C1, C2, SIGMA, M, clip, HAS_NOISE: tl.constexpr,
                           HAS_CLIP: tl.constexpr, BLOCK: tl.constexpr, INTERP: tl.constexpr):
    blocks = tl.cdiv(M, BLOCK)
    b = tl.program_id(0) // blocks
    offs = (tl.program_id(0) % blocks).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    base = b.to(tl.int64) * M
    c1 = tl.load(C1 + b)
    c2 = tl.load(C2 + b)
    x = tl.load(X + base + offs, mask=mask, other=0.0).to(tl.float32)
    eps = tl.load(EPS + base + offs, mask=mask, other=0.0).to(tl.float32)
    out = c1 * (x - c2 * eps)
    if HAS_NOISE:
        sigma = tl.load(SIGMA + b)
        noise = tl.load(NOISE + base + offs, mask=mask, other=0.0).to(tl.float32)
        out = out + sigma * noise
    if HAS_CLIP:
        # torch.clamp semantics, NaN included: NaN stays NaN.
        out = tl.where(out > clip, clip, tl.where(out < -clip, -clip, out))
    tl.store(OUT + base + offs, cast(out, OUT.dtype.element_ty, INTERP), mask=mask)


# Contract of _diffusion_step_x0_kernel: as _diffusion_step_kernel (same grid and layout), plus
#   P, Q: float32 [B] (coef_x0, coef_x).
#   Y0 = c1[b] * (X[b] - c2[b] * EPS[b]), clamped to [-clip, clip] when HAS_CLIP;
#   OUT[b] = P[b] * Y0 + Q[b] * X[b] + sigma[b] * NOISE[b]; fp32 arithmetic, rounded once to T.
@triton.jit
def _diffusion_step_x0_kernel(X, EPS, NOISE, OUT, C1, C2, P, Q, SIGMA, M, clip, HAS_NOISE: tl.constexpr,
                              HAS_CLIP: tl.constexpr, BLOCK: tl.constexpr, INTERP: tl.constexpr):
    blocks = tl.cdiv(M, BLOCK)
    b = tl.program_id(0) // blocks
    offs = (tl.program_id(0) % blocks).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    base = b.to(tl.int64) * M
    c1 = tl.load(C1 + b)
    c2 = tl.load(C2 + b)
    p = tl.load(P + b)
    q = tl.load(Q + b)
    x = tl.load(X + base + offs, mask=mask, other=0.0).to(tl.float32)
    eps = tl.load(EPS + base + offs, mask=mask, other=0.0).to(tl.float32)
    y0 = c1 * (x - c2 * eps)
    if HAS_CLIP:
        y0 = tl.where(y0 > clip, clip, tl.where(y0 < -clip, -clip, y0))  # NaN stays NaN
    out = p * y0 + q * x
    if HAS_NOISE:
        sigma = tl.load(SIGMA + b)
        noise = tl.load(NOISE + base + offs, mask=mask, other=0.0).to(tl.float32)
        out = out + sigma * noise
    tl.store(OUT + base + offs, cast(out, OUT.dtype.element_ty, INTERP), mask=mask)


def _check_like(op, x, **others):
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES)
    for name, t in others.items():
        if t is None:
            continue
        check_tensor(op, name, t)
        if t.shape != x.shape:
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)} but x has {tuple(x.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but x has {x.dtype}")
    check_device(op, x=x, **others)


@define("flow_step_triton")
def flow_step(x: torch.Tensor, v_cond: torch.Tensor, v_uncond: Optional[torch.Tensor], dt: float,
              guidance_scale: float) -> torch.Tensor:
    """Triton ``flow_step``: see ``pysonic.ops.reference.flow_step``."""
    _check_like("flow_step", x, v_cond=v_cond, v_uncond=v_uncond)
    x, v_cond = x.contiguous(), v_cond.contiguous()
    v_uncond = None if v_uncond is None else v_uncond.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    if n:
        launch(_flow_step_kernel)[(triton.cdiv(n, BLOCK),)](
            x, v_cond, v_cond if v_uncond is None else v_uncond, out, n, float(dt), float(guidance_scale),
            HAS_UNCOND=v_uncond is not None, BLOCK=BLOCK, INTERP=INTERPRET, num_warps=4,
        )
    return out


@flow_step.register_fake
def _(x, v_cond, v_uncond, dt, guidance_scale):
    _check_like("flow_step", x, v_cond=v_cond, v_uncond=v_uncond)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _check_diffusion(x, eps, noise, c1, c2, sigma, clip, op="diffusion_step", **more):
    _check_like(op, x, eps=eps, noise=noise)
    if x.dim() == 0:
        raise ValueError(f"{op}: x must have a batch dimension, got a scalar")
    for name, c in (("c1", c1), ("c2", c2), *more.items(), ("sigma", sigma)):
        check_tensor(op, name, c, dtypes=(torch.float32,))
        if tuple(c.shape) != (x.shape[0],):
            raise ValueError(f"{op}: {name} must have shape [B] = [{x.shape[0]}], got {list(c.shape)}")
        if c.device != x.device:
            raise ValueError(f"{op}: {name} is on {c.device} but x is on {x.device}")
    if clip is not None and not clip >= 0:
        raise ValueError(f"{op}: clip must be a number >= 0, got {clip}")


@define("diffusion_step_triton")
def diffusion_step(x: torch.Tensor, eps: torch.Tensor, noise: Optional[torch.Tensor], c1: torch.Tensor,
                   c2: torch.Tensor, sigma: torch.Tensor, clip: Optional[float]) -> torch.Tensor:
    """Triton ``diffusion_step``: see ``pysonic.ops.reference.diffusion_step`` (c1, c2, sigma: float32 [B])."""
    _check_diffusion(x, eps, noise, c1, c2, sigma, clip)
    x, eps = x.contiguous(), eps.contiguous()
    noise = None if noise is None else noise.contiguous()
    c1, c2, sigma = c1.contiguous(), c2.contiguous(), sigma.contiguous()
    out = torch.empty_like(x)
    if x.numel():
        batch = x.shape[0]
        m = x.numel() // batch
        launch(_diffusion_step_kernel)[(batch * triton.cdiv(m, BLOCK),)](
            x, eps, eps if noise is None else noise, out, c1, c2, sigma, m, 0.0 if clip is None else float(clip),
            HAS_NOISE=noise is not None, HAS_CLIP=clip is not None, BLOCK=BLOCK, INTERP=INTERPRET, num_warps=4,
        )
    return out


@diffusion_step.register_fake
def _(x, eps, noise, c1, c2, sigma, clip):
    _check_diffusion(x, eps, noise, c1, c2, sigma, clip)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@define("diffusion_step_x0_triton")
def diffusion_step_x0(x: torch.Tensor, eps: torch.Tensor, noise: Optional[torch.Tensor], c1: torch.Tensor,
                      c2: torch.Tensor, coef_x0: torch.Tensor, coef_x: torch.Tensor, sigma: torch.Tensor,
                      clip: Optional[float]) -> torch.Tensor:
    """Triton ``diffusion_step_x0``: see ``pysonic.ops.reference.diffusion_step_x0`` (coefficients: float32 [B])."""
    _check_diffusion(x, eps, noise, c1, c2, sigma, clip, op="diffusion_step_x0", coef_x0=coef_x0, coef_x=coef_x)
    x, eps = x.contiguous(), eps.contiguous()
    noise = None if noise is None else noise.contiguous()
    coefs = [c.contiguous() for c in (c1, c2, coef_x0, coef_x, sigma)]
    out = torch.empty_like(x)
    if x.numel():
        batch = x.shape[0]
        m = x.numel() // batch
        launch(_diffusion_step_x0_kernel)[(batch * triton.cdiv(m, BLOCK),)](
            x, eps, eps if noise is None else noise, out, *coefs, m, 0.0 if clip is None else float(clip),
            HAS_NOISE=noise is not None, HAS_CLIP=clip is not None, BLOCK=BLOCK, INTERP=INTERPRET, num_warps=4,
        )
    return out


@diffusion_step_x0.register_fake
def _(x, eps, noise, c1, c2, coef_x0, coef_x, sigma, clip):
    _check_diffusion(x, eps, noise, c1, c2, sigma, clip, op="diffusion_step_x0", coef_x0=coef_x0, coef_x=coef_x)
    return torch.empty_like(x, memory_format=torch.contiguous_format)
