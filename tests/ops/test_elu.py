"""elu: every CPU backend against pysonic.ops.reference (torch's ELU in fp32).

Tolerances: fp32 rtol/atol 1e-6 (the kernels' expm1 is a polynomial near 0 and exp - 1 below,
a few ulp from torch's; outputs lie in [-alpha, max(x)]). bf16/fp16: both round the same fp32
value once, so they differ by at most one step of the output dtype (rtol 2^-7 / 2^-10).
"""
import pytest
import torch

from pysonic import ops
from pysonic.ops import reference
from tests.ops.utils import cpu_backends

TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.bfloat16: dict(rtol=2.0**-7, atol=1e-6),
       torch.float16: dict(rtol=2.0**-10, atol=1e-6)}


def _values(n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # wide spread: both branches of the kernel's expm1, saturation near -alpha, large positives
    x = torch.randn(n, generator=g) * 4
    x[: min(n, 7)] = torch.tensor([0.0, -1e-7, -0.3499, -0.35, -0.3501, -25.0, 1e-30])[: min(n, 7)]
    return x.to(dtype)


@pytest.mark.parametrize("backend", cpu_backends("elu_out"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n", [1, 31, 32, 1000, 70_001])
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_elu_matches_reference(backend, dtype, n, alpha):
    x = _values(n, dtype)
    out = ops.elu(x, alpha, backend=backend)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out, reference.elu(x, alpha), **TOL[dtype])


@pytest.mark.parametrize("backend", cpu_backends("elu_out"))
def test_elu_layouts_and_out(backend):
    x = _values(2 * 6 * 50, torch.float32).view(2, 6, 1, 50)
    ref = reference.elu(x)
    # channels-last input: the result keeps the layout
    cl = x.contiguous(memory_format=torch.channels_last)
    out = ops.elu(cl, backend=backend)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    # in place
    y = x.clone()
    assert ops.elu(y, out=y, backend=backend) is y
    torch.testing.assert_close(y, ref, **TOL[torch.float32])
    # into a slice of a larger buffer (as SEANet writes into a padded conv input), B = 1 and B = 2
    for xb in (x[:1].contiguous(memory_format=torch.channels_last), cl):
        buf = torch.full((xb.shape[0], 6, 1, 57), 7.0).contiguous(memory_format=torch.channels_last)
        ops.elu(xb, out=buf[..., 3:53], backend=backend)
        torch.testing.assert_close(buf[..., 3:53], reference.elu(xb), **TOL[torch.float32])
        assert (buf[..., :3] == 7).all() and (buf[..., 53:] == 7).all()
    # a non-contiguous view
    t = x.transpose(0, 3)
    torch.testing.assert_close(ops.elu(t, backend=backend), reference.elu(t), **TOL[torch.float32])


@pytest.mark.parametrize("backend", cpu_backends("elu_out"))
def test_elu_special_values(backend):
    x = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 0.0, -100.0, 3.0])
    out = ops.elu(x, 2.0, backend=backend)
    assert out[0].isnan()
    assert out[1:].tolist() == [float("inf"), -2.0, 0.0, 0.0, -2.0, 3.0]
    assert ops.elu(torch.empty(0, 3), backend=backend).shape == (0, 3)


def test_elu_bad_input():
    x = torch.randn(4, 5)
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.elu(x.long())
    with pytest.raises(ValueError, match="out"):
        ops.elu(x, out=torch.empty(5, 4))
    with pytest.raises(TypeError, match="out has dtype"):
        ops.elu(x, out=torch.empty(4, 5, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="strides"):  # the kernel checks on its own too
        torch.ops.pysonic.elu_out(x, 1.0, torch.empty(5, 4).t())


def test_opcheck():
    # schema (out is mutated), fake implementation and dispatch of the registered C++ op
    x = _values(40, torch.float32).view(4, 10)
    torch.library.opcheck(torch.ops.pysonic.elu_out, (x, 1.0, torch.empty_like(x)))
