"""conformer_conv: every backend x dtype against pysonic.ops.reference, gradients, opcheck, compile."""
import pytest
import torch

import pysonic
from pysonic import ops
from pysonic.ops import reference
from tests.ops.utils import cpu_backends, low_precision_close

compiled = pytest.mark.skipif(not pysonic.build_info()["compiled"], reason="needs the compiled extension")

# (B, T, C, K, causal, layout): layout "contig" [B,T,2C]; "tview" a transposed view of [B,2C,T]
# (a conv layer's output); "slice" the first 2C channels of a wider tensor.
CASES = [
    (2, 7, 5, 3, False, "contig"),  # odd C, below one vector
    (1, 1, 3, 31, False, "contig"),  # T = 1 < K
    (2, 9, 33, 31, True, "tview"),  # T < K, causal, C = 33: one vector + tail
    (1, 40, 16, 1, False, "slice"),  # K = 1: pointwise
    (3, 20, 17, 4, True, "contig"),  # even K, causal
    (1, 37, 70, 5, False, "tview"),  # C = 70: two channel blocks + tail
    (1, 300, 9, 7, False, "contig"),  # T > one time block of the C++ kernel (<= 256)
]


def _case_id(case):
    B, T, C, K, causal, layout = case
    return f"{B}x{T}x{C}k{K}{'c' if causal else ''}-{layout}"


def _x(B, T, C, layout, dtype):
    if layout == "contig":
        return (2 * torch.randn(B, T, 2 * C)).to(dtype)
    if layout == "tview":
        return (2 * torch.randn(B, 2 * C, T)).to(dtype).transpose(1, 2)
    return (2 * torch.randn(B, T, 2 * C + 5)).to(dtype)[..., : 2 * C]


def _params(C, K, dtype):
    return (torch.randn(C, K) / K**0.5).to(dtype), (0.5 * torch.randn(C)).to(dtype)


@pytest.mark.parametrize("backend", cpu_backends("conformer_conv"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_conformer_conv_matches_reference(backend, dtype, case):
    B, T, C, K, causal, layout = case
    x = _x(B, T, C, layout, dtype)
    w, b = _params(C, K, dtype)
    out = ops.conformer_conv(x, w, b, causal=causal, backend=backend)
    assert out.shape == (B, T, C) and out.dtype == dtype and out.is_contiguous()
    ref32 = reference.conformer_conv(x.float(), w.float(), b.float(), causal)
    if dtype == torch.float32:
        # fp32: a K-term dot product per output, summed in a different order than conv1d, and
        # sigmoid via exp: relative differences of a few 1e-7 times sqrt(K).
        torch.testing.assert_close(out, ref32, rtol=1e-5, atol=1e-5)
    else:
        low_precision_close(out, ref32, reference.conformer_conv(x, w, b, causal))


@compiled
@pytest.mark.parametrize("causal", [False, True])
def test_conformer_conv_float16_and_float64_cpp(causal):
    x = 2 * torch.randn(2, 19, 2 * 40)
    w, b = _params(40, 7, torch.float32)
    x16, w16, b16 = x.half(), w.half(), b.half()
    low_precision_close(
        ops.conformer_conv(x16, w16, b16, causal=causal, backend="cpp"),
        reference.conformer_conv(x16.float(), w16.float(), b16.float(), causal),
        reference.conformer_conv(x16, w16, b16, causal),
    )
    x64, w64, b64 = x.double(), w.double(), b.double()
    # float64 computes in float64: agrees with the float64 reference to rounding.
    torch.testing.assert_close(
        ops.conformer_conv(x64, w64, b64, causal=causal, backend="cpp"),
        reference.conformer_conv(x64, w64, b64, causal),
        rtol=1e-12,
        atol=1e-12,
    )


def _grads(fn, x, w, b, grad):
    x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
    return torch.autograd.grad(fn(x, w, b), (x, w, b), grad)


@pytest.mark.parametrize("backend", cpu_backends("conformer_conv"))
@pytest.mark.parametrize("case", [CASES[0], CASES[4], CASES[5], CASES[6]], ids=_case_id)
def test_conformer_conv_gradients_match_reference(backend, case):
    B, T, C, K, causal, layout = case
    x = _x(B, T, C, layout, torch.float32)
    w, b = _params(C, K, torch.float32)
    grad = torch.randn(B, T, C)
    got = _grads(lambda x, w, b: ops.conformer_conv(x, w, b, causal=causal, backend=backend), x, w, b, grad)
    want = _grads(lambda x, w, b: reference.conformer_conv(x, w, b, causal), x, w, b, grad)
    # grad_x: K-term sums per element; grad_weight/grad_bias: sums over B*T terms in fp32
    # (scale ~ sqrt(B*T)), so an absolute tolerance of 1e-4 at these sizes.
    for name, g, ref in zip(("x", "weight", "bias"), got, want):
        assert g.shape == ref.shape and g.dtype == ref.dtype
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-4, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("backend", cpu_backends("conformer_conv"))
@pytest.mark.parametrize("causal", [False, True])
def test_conformer_conv_gradients_bfloat16(backend, causal):
    B, T, C, K = 2, 45, 24, 9
    x = _x(B, T, C, "contig", torch.bfloat16)
    w, b = _params(C, K, torch.bfloat16)
    grad = torch.randn(B, T, C).bfloat16()
    got = _grads(lambda x, w, b: ops.conformer_conv(x, w, b, causal=causal, backend=backend), x, w, b, grad)
    f32 = lambda t: t.float()
    want32 = _grads(lambda x, w, b: reference.conformer_conv(x, w, b, causal), f32(x), f32(w), f32(b), f32(grad))
    wantl = _grads(lambda x, w, b: reference.conformer_conv(x, w, b, causal), x, w, b, grad)
    for g, r32, rl in zip(got, want32, wantl):
        assert g.dtype == torch.bfloat16
        low_precision_close(g, r32, rl)


@compiled
@pytest.mark.parametrize("causal", [False, True])
def test_conformer_conv_gradcheck_cpp(causal):
    B, T, C, K = 2, 6, 3, 3
    x = torch.randn(B, T, 2 * C, dtype=torch.float64, requires_grad=True)
    w = torch.randn(C, K, dtype=torch.float64, requires_grad=True)
    b = torch.randn(C, dtype=torch.float64, requires_grad=True)
    fn = lambda x, w, b: ops.conformer_conv(x, w, b, causal=causal, backend="cpp")
    assert torch.autograd.gradcheck(fn, (x, w, b))


@compiled
def test_conformer_conv_gradients_many_batch_items_cpp():
    # B * time segments > 64: the C++ backward sums several items per partial group.
    x = _x(67, 3, 5, "contig", torch.float32)
    w, b = _params(5, 3, torch.float32)
    grad = torch.randn(67, 3, 5)
    got = _grads(lambda x, w, b: ops.conformer_conv(x, w, b, backend="cpp"), x, w, b, grad)
    want = _grads(lambda x, w, b: reference.conformer_conv(x, w, b), x, w, b, grad)
    for g, ref in zip(got, want):
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-4)  # sums over B*T = 201 terms


@compiled
def test_conformer_conv_backward_is_thread_count_independent():
    # grad_weight/grad_bias reduce per-(batch, time segment) partials in a fixed order.
    x = torch.randn(3, 600, 2 * 40)
    w, b = _params(40, 15, torch.float32)
    grad = torch.randn(3, 600, 40)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.pysonic.conformer_conv_backward(grad, x, w, b, False)
        torch.set_num_threads(2)
        two = torch.ops.pysonic.conformer_conv_backward(grad, x, w, b, False)
    finally:
        torch.set_num_threads(threads)
    for a, c in zip(one, two):
        assert torch.equal(a, c)


@compiled
def test_conformer_conv_opcheck():
    for causal, K in ((False, 5), (True, 4)):
        x = torch.randn(2, 11, 2 * 7, requires_grad=True)
        w = torch.randn(7, K, requires_grad=True)
        b = torch.randn(7, requires_grad=True)
        torch.library.opcheck(torch.ops.pysonic.conformer_conv, (x, w, b, causal))
        grad = torch.randn(2, 11, 7)
        torch.library.opcheck(
            torch.ops.pysonic.conformer_conv_backward, (grad, x.detach(), w.detach(), b.detach(), causal)
        )
    xb = torch.randn(1, 5, 2 * 34).bfloat16()
    wb, bb = _params(34, 3, torch.bfloat16)
    torch.library.opcheck(torch.ops.pysonic.conformer_conv, (xb, wb, bb, False))


def test_conformer_conv_compile_fullgraph():
    conv_w, conv_b = _params(12, 7, torch.float32)
    conv_w.requires_grad_()
    pointwise = torch.nn.Linear(8, 24)

    def block(h):
        return ops.conformer_conv(pointwise(h), conv_w, conv_b, causal=False) * 0.5

    h = torch.randn(2, 13, 8)
    fn = torch.compile(block, fullgraph=True, backend="aot_eager")
    got, want = fn(h), block(h)
    torch.testing.assert_close(got, want)
    (gw,) = torch.autograd.grad(got.square().sum(), (conv_w,))
    (ww,) = torch.autograd.grad(want.square().sum(), (conv_w,))
    torch.testing.assert_close(gw, ww)


@pytest.mark.parametrize("backend", cpu_backends("conformer_conv"))
@pytest.mark.parametrize("shape", [(0, 5, 3), (2, 0, 3), (2, 4, 0)], ids=str)
def test_conformer_conv_empty(backend, shape):
    B, T, C = shape
    x = torch.randn(B, T, 2 * C, requires_grad=True)
    w = torch.randn(C, 3, requires_grad=True)
    b = torch.randn(C, requires_grad=True)
    out = ops.conformer_conv(x, w, b, backend=backend)
    assert out.shape == (B, T, C)
    gx, gw, gb = torch.autograd.grad(out.sum(), (x, w, b), allow_unused=True)
    assert gx.shape == x.shape and torch.all(gx == 0)
    assert gw.shape == w.shape and torch.all(gw == 0)
    assert gb.shape == b.shape and torch.all(gb == 0)


def test_conformer_conv_bad_input():
    x = torch.randn(2, 5, 8)
    w, b = torch.randn(4, 3), torch.randn(4)
    with pytest.raises(ValueError, match="conformer_conv: x must have 3 dimensions"):
        ops.conformer_conv(x[0], w, b)
    with pytest.raises(TypeError, match="conformer_conv: x must have dtype"):
        ops.conformer_conv(x.long(), w, b)
    with pytest.raises(ValueError, match="conformer_conv: weight must have 2 dimensions"):
        ops.conformer_conv(x, w[0], b)
    with pytest.raises(ValueError, match="conformer_conv: bias must have 1 dimensions"):
        ops.conformer_conv(x, w, b[None])
    with pytest.raises(TypeError, match="conformer_conv: weight must be a torch.Tensor"):
        ops.conformer_conv(x, None, b)
    with pytest.raises(ValueError, match="conformer_conv: x must have an even number of channels 2C"):
        ops.conformer_conv(torch.randn(2, 5, 9), w, b)
    with pytest.raises(ValueError, match="conformer_conv: x has 8 channels but weight has C = 3"):
        ops.conformer_conv(x, torch.randn(3, 3), torch.randn(3))
    with pytest.raises(ValueError, match="conformer_conv: bias must have C = 4"):
        ops.conformer_conv(x, w, torch.randn(5))
    with pytest.raises(ValueError, match="conformer_conv: kernel size K = 4 .* must be odd"):
        ops.conformer_conv(x, torch.randn(4, 4), b)
    with pytest.raises(ValueError, match="conformer_conv: weight must have a kernel size K >= 1"):
        ops.conformer_conv(x, torch.randn(4, 0), b, causal=True)
    with pytest.raises(TypeError, match="conformer_conv: weight has dtype"):
        ops.conformer_conv(x.bfloat16(), w, b.bfloat16())
    with pytest.raises(ValueError, match="conformer_conv: bias is on meta"):
        ops.conformer_conv(x, w, b.to("meta"))
    with pytest.raises(ValueError, match="backend"):
        ops.conformer_conv(x, w, b, backend="metal")
    with pytest.raises(ops.BackendUnavailable, match="conformer_conv"):
        ops.conformer_conv(x, w, b, backend="cuda")


@compiled
def test_conformer_conv_cpp_op_checks():
    # The compiled ops check their arguments themselves (callable without the wrapper).
    x = torch.randn(2, 5, 8)
    w, b = torch.randn(4, 3), torch.randn(4)
    with pytest.raises(RuntimeError, match="conformer_conv: kernel size K = 4"):
        torch.ops.pysonic.conformer_conv(x, torch.randn(4, 4), b, False)
    with pytest.raises(RuntimeError, match="conformer_conv: x must have 2C = 6"):
        torch.ops.pysonic.conformer_conv(x, torch.randn(3, 3), torch.randn(3), False)
    with pytest.raises(RuntimeError, match="conformer_conv: bias must have the dtype of x"):
        torch.ops.pysonic.conformer_conv(x, w, b.double(), False)
    with pytest.raises(RuntimeError, match="conformer_conv: x has unsupported dtype"):
        torch.ops.pysonic.conformer_conv(x.int(), w.int(), b.int(), False)
    with pytest.raises(RuntimeError, match="conformer_conv_backward: grad_out must have shape"):
        torch.ops.pysonic.conformer_conv_backward(torch.randn(2, 5, 3), x, w, b, False)
    with pytest.raises(RuntimeError, match="conformer_conv_backward: grad_out must have the dtype"):
        torch.ops.pysonic.conformer_conv_backward(torch.randn(2, 5, 4).double(), x, w, b, False)
