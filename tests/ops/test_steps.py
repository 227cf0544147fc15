"""flow_step, diffusion_step and diffusion_step_x0: every backend x dtype against pysonic.ops.reference."""
import pytest
import torch

import pysonic
from pysonic import ops
from pysonic.ops import reference
from tests.ops.utils import cpu_backends, low_precision_close

SHAPES = [(1,), (3, 5), (2, 2, 1000), (4, 64, 97), (1, 1, 1)]


def _inputs(shape, dtype, *, noncontiguous=False):
    def make():
        if noncontiguous:  # a transposed view of a contiguous tensor
            return torch.randn(*reversed(shape), dtype=torch.float32).to(dtype).permute(*reversed(range(len(shape))))
        return torch.randn(*shape).to(dtype)

    return make(), make(), make()


def _check(out, ref32, reflow, dtype):
    assert out.dtype == dtype and out.shape == ref32.shape
    if dtype == torch.float32:
        # fp32: one fused fma chain vs torch's sequence; differences are a few ulp.
        torch.testing.assert_close(out, ref32, rtol=1e-5, atol=1e-5)
    else:
        low_precision_close(out, ref32, reflow)


@pytest.mark.parametrize("backend", cpu_backends("flow_step"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("guided", [True, False])
@pytest.mark.parametrize("noncontiguous", [False, True])
def test_flow_step_matches_reference(backend, dtype, shape, guided, noncontiguous):
    x, vc, vu = _inputs(shape, dtype, noncontiguous=noncontiguous)
    vu = vu if guided else None
    out = ops.flow_step(x, vc, vu, -0.04, 4.5, backend=backend)
    ref32 = reference.flow_step(x.float(), vc.float(), None if vu is None else vu.float(), -0.04, 4.5)
    _check(out, ref32, reference.flow_step(x, vc, vu, -0.04, 4.5), dtype)


@pytest.mark.parametrize("backend", cpu_backends("diffusion_step"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("with_noise", [True, False])
@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("per_item", [True, False])
def test_diffusion_step_matches_reference(backend, dtype, shape, with_noise, clip, per_item):
    x, eps, noise = _inputs(shape, dtype, noncontiguous=len(shape) == 3)
    noise = noise if with_noise else None
    B = shape[0]
    if per_item:  # batch items at different steps
        c1, c2, sigma = torch.rand(B) + 0.5, torch.rand(B), torch.rand(B) * 0.3
    else:
        c1, c2, sigma = 1.02, 0.07, 0.2
    out = ops.diffusion_step(x, eps, noise, c1, c2, sigma, clip=clip, backend=backend)
    up = (lambda t: None if t is None else t.float())
    ref32 = reference.diffusion_step(x.float(), eps.float(), up(noise), c1, c2, sigma, clip)
    _check(out, ref32, reference.diffusion_step(x, eps, noise, c1, c2, sigma, clip), dtype)
    if clip is not None:
        assert out.abs().max() <= clip


@pytest.mark.parametrize("backend", cpu_backends("diffusion_step_x0"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("with_noise", [True, False])
@pytest.mark.parametrize("clip", [None, 1.0, 0.3])
@pytest.mark.parametrize("per_item", [True, False])
def test_diffusion_step_x0_matches_reference(backend, dtype, shape, with_noise, clip, per_item):
    x, eps, noise = _inputs(shape, dtype, noncontiguous=len(shape) == 3)
    noise = noise if with_noise else None
    B = shape[0]
    if per_item:  # batch items at different steps
        coefs = (torch.rand(B) + 0.5, torch.rand(B) + 0.5, torch.rand(B), torch.rand(B) + 0.5, torch.rand(B) * 0.3)
    else:
        coefs = (1.7, 0.8, 0.3, 0.9, 0.2)
    out = ops.diffusion_step_x0(x, eps, noise, *coefs, clip=clip, backend=backend)
    up = (lambda t: None if t is None else t.float())
    ref32 = reference.diffusion_step_x0(x.float(), eps.float(), up(noise), *coefs, clip)
    _check(out, ref32, reference.diffusion_step_x0(x, eps, noise, *coefs, clip), dtype)


def test_diffusion_step_x0_clamps_the_estimate_not_the_output():
    # Worked example: x = 2, eps = 0 -> x0 = 1.5 * 2 = 3, clamped to 1; out = 0.5 * 1 + 1.0 * 2 = 2.5
    # (the output itself is not clamped); without the clamp 0.5 * 3 + 2 = 3.5.
    x, eps = torch.full((1, 4), 2.0), torch.zeros(1, 4)
    for backend in ("reference", *ops.available_backends("diffusion_step_x0")):
        out = ops.diffusion_step_x0(x, eps, None, 1.5, 0.3, 0.5, 1.0, 0.7, clip=1.0, backend=backend)
        torch.testing.assert_close(out, torch.full((1, 4), 2.5))
        out = ops.diffusion_step_x0(x, eps, None, 1.5, 0.3, 0.5, 1.0, 0.7, clip=None, backend=backend)
        torch.testing.assert_close(out, torch.full((1, 4), 3.5))


def test_diffusion_step_x0_without_clip_is_the_affine_step():
    # Unclamped, coef_x0 * c1 * (x - c2 * eps) + coef_x * x = (coef_x0 * c1 + coef_x) * (x - k * eps).
    x, eps, z = torch.randn(3, 50), torch.randn(3, 50), torch.randn(3, 50)
    c1, c2, p, q, s = 1.3, 0.4, 0.6, 0.5, 0.1
    a = p * c1 + q
    out = ops.diffusion_step_x0(x, eps, z, c1, c2, p, q, s, clip=None)
    torch.testing.assert_close(out, ops.diffusion_step(x, eps, z, a, p * c1 * c2 / a, s), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", cpu_backends("flow_step"))
def test_steps_empty(backend):
    x = torch.empty(0, 7)
    assert ops.flow_step(x, x, x, 0.1, 2.0, backend=backend).shape == (0, 7)
    assert ops.diffusion_step(x, x, None, 1.0, 0.5, 0.0, backend=backend).shape == (0, 7)
    assert ops.diffusion_step_x0(x, x, x, 1.0, 0.5, 0.3, 0.6, 0.1, backend=backend).shape == (0, 7)


def test_flow_step_bad_input():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="v_cond"):
        ops.flow_step(x, torch.randn(2, 4), None, 0.1, 1.0)
    with pytest.raises(TypeError, match="v_cond"):
        ops.flow_step(x, torch.randn(2, 3, dtype=torch.float64), None, 0.1, 1.0)
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.flow_step(torch.ones(2, 3, dtype=torch.int64), x, None, 0.1, 1.0)
    with pytest.raises(ValueError, match="backend"):
        ops.flow_step(x, x, None, 0.1, 1.0, backend="metal")
    with pytest.raises(ops.BackendUnavailable, match="cuda"):
        ops.flow_step(x, x, None, 0.1, 1.0, backend="cuda")


def test_diffusion_step_bad_input():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="c1"):
        ops.diffusion_step(x, x, None, torch.ones(3), 0.1, 0.0)
    with pytest.raises(ValueError, match="clip"):
        ops.diffusion_step(x, x, None, 1.0, 0.1, 0.0, clip=-1.0)
    with pytest.raises(ValueError, match="noise"):
        ops.diffusion_step(x, x, torch.randn(2, 2), 1.0, 0.1, 0.0)
    with pytest.raises(ValueError, match="batch"):
        ops.diffusion_step(torch.tensor(1.0), torch.tensor(1.0), None, 1.0, 0.1, 0.0)


def test_diffusion_step_x0_bad_input():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="diffusion_step_x0: coef_x0"):
        ops.diffusion_step_x0(x, x, None, 1.0, 0.1, torch.ones(3), 0.5, 0.0)
    with pytest.raises(ValueError, match="diffusion_step_x0: clip"):
        ops.diffusion_step_x0(x, x, None, 1.0, 0.1, 0.5, 0.5, 0.0, clip=-1.0)
    with pytest.raises(ValueError, match="diffusion_step_x0: noise"):
        ops.diffusion_step_x0(x, x, torch.randn(2, 2), 1.0, 0.1, 0.5, 0.5, 0.0)
    with pytest.raises(TypeError, match="diffusion_step_x0: eps"):
        ops.diffusion_step_x0(x, x.double(), None)
    with pytest.raises(ValueError, match="batch"):
        ops.diffusion_step_x0(torch.tensor(1.0), torch.tensor(1.0), None)
    if pysonic.build_info()["compiled"]:  # the C++ op checks too, naming the op and argument
        one = torch.ones(2)
        with pytest.raises(RuntimeError, match="diffusion_step_x0: coef_x must be a scalar or have shape"):
            torch.ops.pysonic.diffusion_step_x0(x, x, None, one, one, one, torch.ones(3), one, 1.0)
        with pytest.raises(RuntimeError, match="diffusion_step_x0: clip"):
            torch.ops.pysonic.diffusion_step_x0(x, x, None, one, one, one, one, one, -1.0)


@pytest.mark.skipif(pysonic.build_info()["compiled"] is False, reason="needs the compiled extension")
def test_steps_opcheck():
    x, vc, vu = torch.randn(3, 40), torch.randn(3, 40), torch.randn(3, 40)
    torch.library.opcheck(torch.ops.pysonic.flow_step, (x, vc, vu, 0.1, 3.0))
    torch.library.opcheck(torch.ops.pysonic.flow_step, (x, vc, None, 0.1, 3.0))
    c = torch.rand(3)
    torch.library.opcheck(torch.ops.pysonic.diffusion_step, (x, vc, vu, c, c, c, 1.0))
    torch.library.opcheck(torch.ops.pysonic.diffusion_step, (x, vc, None, c, c, c, None))
    torch.library.opcheck(torch.ops.pysonic.diffusion_step_x0, (x, vc, vu, c, c, c, c, c, 1.0))
    torch.library.opcheck(torch.ops.pysonic.diffusion_step_x0, (x, vc, None, c, c, c, c, c, None))


def test_steps_compile_fullgraph():
    def sampler(x, vc, vu, eps):
        x = ops.flow_step(x, vc, vu, -0.1, 4.5)
        x = ops.diffusion_step(x, eps, None, 1.01, 0.2, 0.0, clip=1.0)
        return ops.diffusion_step_x0(x, eps, vc, 1.2, 0.3, 0.4, 0.9, 0.1, clip=1.0)

    args = [torch.randn(2, 300) for _ in range(4)]
    compiled = torch.compile(sampler, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), sampler(*args))
