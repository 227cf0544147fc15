"""flow_step, diffusion_step and diffusion_step_x0 at 4M elements: fused kernel vs the unfused torch expression."""
import pytest
import torch

from pysonic import ops
from pysonic.ops import reference

N = 4 * 2**20
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _unfused_flow(x, vc, vu, dt, g):
    return x + dt * (vu + g * (vc - vu))


def _unfused_diffusion(x, eps, noise, c1, c2, sigma):
    return (c1 * (x - c2 * eps) + sigma * noise).clamp_(-1.0, 1.0)


@pytest.mark.parametrize("impl", ["pysonic", "torch_unfused", "reference"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_flow_step(benchmark, impl, dtype):
    x, vc, vu = (torch.randn(2, N // 2, dtype=DTYPES[dtype]) for _ in range(3))
    fn = {
        "pysonic": lambda: ops.flow_step(x, vc, vu, -0.04, 4.5),
        "torch_unfused": lambda: _unfused_flow(x, vc, vu, -0.04, 4.5),
        "reference": lambda: reference.flow_step(x, vc, vu, -0.04, 4.5),
    }[impl]
    benchmark.group = f"flow_step [2, {N // 2}] {dtype}"
    benchmark.extra_info.update(op="flow_step", impl=impl, dtype=dtype, flops=0, bytes=4 * x.numel() * x.element_size())
    benchmark(fn)


@pytest.mark.parametrize("impl", ["pysonic", "torch_unfused", "reference"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_diffusion_step(benchmark, impl, dtype):
    x, eps, noise = (torch.randn(2, N // 2, dtype=DTYPES[dtype]) for _ in range(3))
    c1, c2, sigma = torch.tensor([1.01, 1.02]), torch.tensor([0.1, 0.2]), torch.tensor([0.05, 0.06])
    col = lambda c: c[:, None].to(x.dtype)
    fn = {
        "pysonic": lambda: ops.diffusion_step(x, eps, noise, c1, c2, sigma, clip=1.0),
        "torch_unfused": lambda: _unfused_diffusion(x, eps, noise, col(c1), col(c2), col(sigma)),
        "reference": lambda: reference.diffusion_step(x, eps, noise, c1, c2, sigma, 1.0),
    }[impl]
    benchmark.group = f"diffusion_step [2, {N // 2}] {dtype}"
    benchmark.extra_info.update(op="diffusion_step", impl=impl, dtype=dtype, flops=0, bytes=4 * x.numel() * x.element_size())
    benchmark(fn)


def _unfused_diffusion_x0(x, eps, noise, c1, c2, p, q, sigma):
    x0 = (c1 * (x - c2 * eps)).clamp_(-1.0, 1.0)
    return p * x0 + q * x + sigma * noise


@pytest.mark.parametrize("impl", ["pysonic", "torch_unfused", "reference"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_diffusion_step_x0(benchmark, impl, dtype):
    # Reads x, eps and noise once and writes once: the same 4 passes as diffusion_step.
    x, eps, noise = (torch.randn(2, N // 2, dtype=DTYPES[dtype]) for _ in range(3))
    c1, c2 = torch.tensor([1.01, 1.02]), torch.tensor([0.1, 0.2])
    p, q, sigma = torch.tensor([0.3, 0.4]), torch.tensor([0.7, 0.6]), torch.tensor([0.05, 0.06])
    col = lambda c: c[:, None].to(x.dtype)
    fn = {
        "pysonic": lambda: ops.diffusion_step_x0(x, eps, noise, c1, c2, p, q, sigma, clip=1.0),
        "torch_unfused": lambda: _unfused_diffusion_x0(x, eps, noise, *(col(c) for c in (c1, c2, p, q, sigma))),
        "reference": lambda: reference.diffusion_step_x0(x, eps, noise, c1, c2, p, q, sigma, 1.0),
    }[impl]
    benchmark.group = f"diffusion_step_x0 [2, {N // 2}] {dtype}"
    benchmark.extra_info.update(op="diffusion_step_x0", impl=impl, dtype=dtype, flops=0, bytes=4 * x.numel() * x.element_size())
    benchmark(fn)
