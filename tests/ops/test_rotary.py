"""rotary: every backend x dtype against pysonic.ops.reference, gradients, opcheck, compile."""
import pytest
import torch

import pysonic
from pysonic import ops
from pysonic.ops import reference
from tests.ops.utils import cpu_backends, low_precision_close

compiled = pytest.mark.skipif(not pysonic.build_info()["compiled"], reason="needs the compiled extension")

# (B, H, T, D, R, layout): layout "contig" [B,H,T,D]; "bthd" a transposed view of [B,T,H,D]
# (how attention layers hold q/k); "slice" channels 0..D of a wider tensor (row stride > D);
# "chanstride" every other channel (channel stride 2).
CASES = [
    (2, 3, 5, 64, 64, "contig"),
    (1, 4, 17, 64, 32, "bthd"),  # partial rotary R < D
    (2, 1, 1, 8, 8, "contig"),  # T = 1, H = 1
    (1, 2, 7, 9, 6, "slice"),  # odd D, R < D
    (3, 2, 4, 40, 2, "bthd"),  # R = 2: one pair
    (1, 3, 6, 96, 96, "chanstride"),
    (1, 1, 3, 5, 0, "contig"),  # R = 0: pure pass-through
    (2, 5, 33, 128, 100, "slice"),  # half = 50: vector body + scalar tail
]


def _x(B, H, T, D, layout, dtype):
    if layout == "contig":
        return torch.randn(B, H, T, D).to(dtype)
    if layout == "bthd":
        return torch.randn(B, T, H, D).to(dtype).transpose(1, 2)
    if layout == "slice":
        return torch.randn(B, H, T, D + 3).to(dtype)[..., :D]
    return torch.randn(B, H, T, 2 * D).to(dtype)[..., ::2]


def _angles(T, R, dtype=torch.float32):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, R, 2, dtype=torch.float64) / max(R, 1)))
    freqs = (torch.arange(T, dtype=torch.float64)[:, None] + 3.0) * inv_freq[None]
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def _case_id(case):
    return "x".join(map(str, case[:5])) + "-" + case[5]


@pytest.mark.parametrize("backend", cpu_backends("rotary"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["halfsplit", "interleaved"])
@pytest.mark.parametrize("angles_in_x_dtype", [False, True], ids=["fp32angles", "xangles"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_rotary_matches_reference(backend, dtype, interleaved, angles_in_x_dtype, case):
    B, H, T, D, R, layout = case
    x = _x(B, H, T, D, layout, dtype)
    cos, sin = _angles(T, R, dtype if angles_in_x_dtype else torch.float32)
    out = ops.rotary(x, cos, sin, interleaved=interleaved, backend=backend)
    assert out.shape == (B, H, T, D) and out.dtype == dtype
    ref32 = reference.rotary(x.float(), cos.float(), sin.float(), interleaved)
    if dtype == torch.float32:
        # fp32: two products and a sum per output; fma vs separate ops differ by a few ulp.
        torch.testing.assert_close(out, ref32, rtol=1e-5, atol=1e-6)
    else:
        low_precision_close(out, ref32, reference.rotary(x, cos.to(dtype), sin.to(dtype), interleaved))
    # Pass-through channels are copied exactly.
    torch.testing.assert_close(out[..., R:], x[..., R:], rtol=0, atol=0)


@pytest.mark.parametrize("interleaved", [False, True], ids=["halfsplit", "interleaved"])
@compiled
def test_rotary_float16_and_float64_cpp(interleaved):
    x = torch.randn(2, 3, 11, 48)
    cos, sin = _angles(11, 40)
    ref32 = reference.rotary(x, cos, sin, interleaved)
    x16 = x.half()
    low_precision_close(
        ops.rotary(x16, cos, sin, interleaved=interleaved, backend="cpp"),
        reference.rotary(x16.float(), cos, sin, interleaved),
        reference.rotary(x16, cos.half(), sin.half(), interleaved),
    )
    x64 = x.double()
    out64 = ops.rotary(x64, cos.double(), sin.double(), interleaved=interleaved, backend="cpp")
    # float64 computes in float64: agrees with the float64 reference to rounding.
    torch.testing.assert_close(out64, reference.rotary(x64, cos.double(), sin.double(), interleaved), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out64.float(), ref32, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", cpu_backends("rotary"))
@pytest.mark.parametrize("interleaved", [False, True], ids=["halfsplit", "interleaved"])
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[5]], ids=_case_id)
def test_rotary_gradients_match_reference(backend, interleaved, case):
    B, H, T, D, R, layout = case
    x = _x(B, H, T, D, layout, torch.float32).requires_grad_()
    cos, sin = _angles(T, R)
    grad = torch.randn(B, H, T, D)
    (got,) = torch.autograd.grad(ops.rotary(x, cos, sin, interleaved=interleaved, backend=backend), (x,), grad)
    (want,) = torch.autograd.grad(reference.rotary(x, cos, sin, interleaved), (x,), grad)
    # grad_x is one rotation of grad: a few ulp.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@compiled
@pytest.mark.parametrize("interleaved", [False, True], ids=["halfsplit", "interleaved"])
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[5]], ids=_case_id)
def test_rotary_angle_gradients_cpp(interleaved, case):
    # The compiled op's autograd also differentiates cos and sin (plain torch ops in its backward).
    # The Triton backend treats them as constants, so only cpp is checked here.
    B, H, T, D, R, layout = case
    x = _x(B, H, T, D, layout, torch.float32).requires_grad_()
    cos, sin = (t.requires_grad_() for t in _angles(T, R))
    grad = torch.randn(B, H, T, D)
    got = torch.autograd.grad(ops.rotary(x, cos, sin, interleaved=interleaved, backend="cpp"), (x, cos, sin), grad)
    want = torch.autograd.grad(reference.rotary(x, cos, sin, interleaved), (x, cos, sin), grad)
    # grad_cos/grad_sin: sums over B*H products in fp32, in a different order.
    for name, g, w in zip(("x", "cos", "sin"), got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("backend", cpu_backends("rotary"))
def test_rotary_gradient_x_only_bfloat16(backend):
    x = torch.randn(2, 17, 3, 64).bfloat16().transpose(1, 2).requires_grad_()
    cos, sin = _angles(17, 64)
    grad = torch.randn(2, 3, 17, 64).bfloat16()
    (gx,) = torch.autograd.grad(ops.rotary(x, cos, sin, backend=backend), (x,), grad)
    x32 = x.detach().float().requires_grad_()
    (want32,) = torch.autograd.grad(reference.rotary(x32, cos, sin), (x32,), grad.float())
    xl = x.detach().requires_grad_()
    (wantl,) = torch.autograd.grad(reference.rotary(xl, cos.bfloat16(), sin.bfloat16()), (xl,), grad)
    assert gx.dtype == torch.bfloat16
    low_precision_close(gx, want32, wantl)


@compiled
@pytest.mark.parametrize("interleaved", [False, True], ids=["halfsplit", "interleaved"])
def test_rotary_gradcheck_cpp(interleaved):
    # [B,H,T,D] = [2,2,3,7] as a transposed [B,T,H,D] view; R = 6 < D.
    x = torch.randn(2, 3, 2, 7, dtype=torch.float64).transpose(1, 2).requires_grad_()
    T = x.shape[2]
    cos = torch.randn(T, 3, dtype=torch.float64, requires_grad=True)
    sin = torch.randn(T, 3, dtype=torch.float64, requires_grad=True)
    fn = lambda x, c, s: ops.rotary(x, c, s, interleaved=interleaved, backend="cpp")
    assert torch.autograd.gradcheck(fn, (x, cos, sin))
    assert torch.autograd.gradgradcheck(fn, (x, cos, sin))


@compiled
def test_rotary_opcheck():
    for interleaved in (False, True):
        x = torch.randn(2, 3, 5, 16, requires_grad=True)
        cos, sin = _angles(5, 12)
        torch.library.opcheck(torch.ops.pysonic.rotary, (x, cos, sin, interleaved))
        torch.library.opcheck(torch.ops.pysonic.rotary, (x, cos.requires_grad_(), sin.requires_grad_(), interleaved))
    xb = torch.randn(1, 7, 2, 8).bfloat16().transpose(1, 2)
    torch.library.opcheck(torch.ops.pysonic.rotary, (xb, *_angles(7, 8, torch.bfloat16), False))


def test_rotary_compile_fullgraph():
    def layer(q, k, cos, sin):
        return ops.rotary(q, cos, sin) * 2.0, ops.rotary(k, cos, sin, interleaved=True)

    q = torch.randn(2, 9, 4, 32).transpose(1, 2).requires_grad_()
    k = torch.randn(2, 4, 9, 32)
    cos, sin = _angles(9, 24)
    fn = torch.compile(layer, fullgraph=True, backend="aot_eager")
    got, want = fn(q, k, cos, sin), layer(q, k, cos, sin)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    (gq,) = torch.autograd.grad(got[0].sum(), (q,))
    (wq,) = torch.autograd.grad(want[0].sum(), (q,))
    torch.testing.assert_close(gq, wq)


@pytest.mark.parametrize("backend", cpu_backends("rotary"))
@pytest.mark.parametrize("shape", [(0, 2, 3, 8), (2, 0, 3, 8), (1, 2, 0, 8), (1, 2, 3, 0)], ids=str)
def test_rotary_empty(backend, shape):
    B, H, T, D = shape
    x = torch.randn(shape)
    R = min(D, 4)
    cos, sin = _angles(T, R)
    out = ops.rotary(x, cos, sin, backend=backend)
    assert out.shape == shape
    torch.testing.assert_close(out, reference.rotary(x, cos, sin))


def test_rotary_bad_input():
    x = torch.randn(1, 2, 5, 8)
    cos, sin = _angles(5, 8)
    with pytest.raises(ValueError, match="rotary: x must have 4 dimensions"):
        ops.rotary(x[0], cos, sin)
    with pytest.raises(TypeError, match="rotary: x must have dtype"):
        ops.rotary(x.long(), cos, sin)
    with pytest.raises(TypeError, match="rotary: cos must be a torch.Tensor"):
        ops.rotary(x, 1.0, sin)
    with pytest.raises(ValueError, match="rotary: cos must have 2 dimensions"):
        ops.rotary(x, cos[None], sin)
    with pytest.raises(ValueError, match=r"rotary: cos must have T = 5 rows"):
        ops.rotary(x, cos[:4], sin[:4])
    with pytest.raises(ValueError, match="rotary: sin has shape"):
        ops.rotary(x, cos, sin[:, :3])
    with pytest.raises(ValueError, match=r"rotary: rotary width R = .*10 exceeds the head size D = 8"):
        ops.rotary(x, *_angles(5, 10))
    with pytest.raises(TypeError, match="rotary: cos must be float32 or x's dtype"):
        ops.rotary(x, cos.double(), sin.double())
    with pytest.raises(TypeError, match="rotary: sin has dtype"):
        ops.rotary(x.bfloat16(), cos, sin.bfloat16())
    with pytest.raises(ValueError, match="rotary: cos is on meta"):
        ops.rotary(x, cos.to("meta"), sin)
    with pytest.raises(ValueError, match="backend"):
        ops.rotary(x, cos, sin, backend="metal")
    with pytest.raises(ops.BackendUnavailable, match="rotary"):
        ops.rotary(x, cos, sin, backend="cuda")


@compiled
def test_rotary_cpp_op_checks():
    # The compiled op checks its arguments itself (it is callable without the wrapper).
    x = torch.randn(1, 2, 5, 8)
    cos, sin = _angles(5, 8)
    with pytest.raises(RuntimeError, match="rotary: x must have shape"):
        torch.ops.pysonic.rotary(x[0], cos, sin)
    with pytest.raises(RuntimeError, match="rotary: cos must have T = 5"):
        torch.ops.pysonic.rotary(x, cos[:3], sin[:3])
    with pytest.raises(RuntimeError, match=r"rotary: rotary width R = .*10 exceeds"):
        torch.ops.pysonic.rotary(x, *_angles(5, 10))
    with pytest.raises(RuntimeError, match="rotary: sin must have the shape"):
        torch.ops.pysonic.rotary(x, cos, sin[:, :2])
    with pytest.raises(RuntimeError, match="rotary: x has unsupported dtype"):
        torch.ops.pysonic.rotary(x.int(), cos, sin)
