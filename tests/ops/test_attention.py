"""attention: every backend x dtype against pysonic.ops.reference, gradients, opcheck, compile."""
import random

import pytest
import torch

import pysonic
from pysonic import ops
from pysonic.ops import reference
from tests.ops.utils import cpu_backends, low_precision_close

compiled = pytest.mark.skipif(pysonic.build_info()["compiled"] is False, reason="needs the compiled extension")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (B, H, Hkv, Tq, Tk, D, causal, key_lengths or None)
CASES = [
    (2, 4, 2, 37, 45, 64, False, None),      # odd lengths, grouped-query
    (1, 2, 1, 33, 70, 80, True, None),       # causal with Tq < Tk (bottom-right)
    (1, 2, 2, 70, 33, 8, True, None),        # causal with Tq > Tk: first rows see no key
    (2, 2, 1, 1, 301, 128, False, [0, 257]), # decode step over a KV cache, a batch item with no key
    (2, 3, 3, 19, 40, 1, True, [40, 7]),     # D = 1, lengths incl. Tk
    (1, 1, 1, 1, 1, 64, True, None),         # length-1 everything
    (3, 4, 1, 5, 300, 64, False, [300, 1, 129]),  # multi-query
    (1, 1, 1, 67, 1700, 16, True, None),     # several key and query tiles: online-softmax rescaling
    (2, 1, 1, 3, 1601, 8, False, [1601, 800]),  # a key tile cut by key_lengths
]


def _make(B, H, Hkv, Tq, Tk, D, dtype, *, transposed=False):
    if transposed:  # q as a view of a [B, T, H, D] projection, like an attention layer makes it
        q = torch.randn(B, Tq, H, D).to(dtype).transpose(1, 2)
        k = torch.randn(B, Tk, Hkv, D).to(dtype).transpose(1, 2)
        v = torch.randn(B, Tk, Hkv, D).to(dtype).transpose(1, 2)
    else:
        q, k, v = (torch.randn(B, h, t, D).to(dtype) for h, t in ((H, Tq), (Hkv, Tk), (Hkv, Tk)))
    return q, k, v


def _check(out, q, k, v, causal, kl, dtype, scale=None):
    ref32 = reference.attention(q.float(), k.float(), v.float(), causal, scale, kl)
    assert out.dtype == dtype and out.shape == ref32.shape
    if dtype == torch.float32:
        # fp32: blocked products and a streaming softmax vs one big matmul; a few ulp of the sum.
        torch.testing.assert_close(out, ref32, rtol=1e-5, atol=1e-5)
    else:
        low_precision_close(out, ref32, reference.attention(q, k, v, causal, scale, kl))


@pytest.mark.parametrize("backend", cpu_backends("attention"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_attention_matches_reference(backend, dtype, case):
    B, H, Hkv, Tq, Tk, D, causal, kl = case
    q, k, v = _make(B, H, Hkv, Tq, Tk, D, dtype, transposed=Tq > 30)
    kl = None if kl is None else torch.tensor(kl)
    out = ops.attention(q, k, v, causal=causal, key_lengths=kl, backend=backend)
    _check(out, q, k, v, causal, kl, dtype)
    if Tk > 1000 and backend == "cpp":  # long rows, negative scale: the running max moves the other way
        out = ops.attention(q, k, v, causal=causal, scale=-0.5, key_lengths=kl, backend=backend)
        _check(out, q, k, v, causal, kl, dtype, scale=-0.5)
    if kl is not None:  # a batch item with no visible key gives exact zeros
        for b in range(B):
            if int(kl[b]) == 0:
                assert out[b].abs().max() == 0


@pytest.mark.parametrize("backend", cpu_backends("attention"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attention_random_shapes(backend, dtype):
    rng = random.Random(1)
    for _ in range(6):
        Hkv = rng.choice([1, 2, 3])
        H = Hkv * rng.choice([1, 2])
        B, Tq, Tk = rng.randint(1, 2), rng.randint(1, 40), rng.randint(1, 90)
        D = rng.choice([1, 8, 17, 64, 80, 128])
        causal = rng.random() < 0.5
        kl = torch.randint(0, Tk + 1, (B,)) if rng.random() < 0.5 else None
        scale = rng.choice([None, 0.3, -0.2])  # a negative scale flips which score is largest
        q, k, v = _make(B, H, Hkv, Tq, Tk, D, dtype)
        out = ops.attention(q, k, v, causal=causal, scale=scale, key_lengths=kl, backend=backend)
        _check(out, q, k, v, causal, kl, dtype, scale)


@pytest.mark.parametrize("backend", cpu_backends("attention"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attention_noncontiguous_views(backend, dtype):
    # q sliced from a fused qkv projection, k/v with a stride on every axis.
    qkv = torch.randn(2, 21, 3, 4, 16).to(dtype)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    out = ops.attention(q, k, v, causal=True, backend=backend)
    _check(out, q, k, v, True, None, dtype)
    # every last dim strided, and kv heads taken with a step
    qt = torch.randn(2, 4, 16, 21).to(dtype).transpose(2, 3)
    kt = torch.randn(2, 4, 16, 9).to(dtype).transpose(2, 3)[:, ::2]
    out = ops.attention(qt, kt, kt, backend=backend)
    _check(out, qt, kt, kt, False, None, dtype)
    kx = torch.randn(2, 1, 1, 16).to(dtype).expand(2, 2, 9, 16)  # stride-0 (broadcast) keys
    out = ops.attention(q[:, :2], kx, kx, backend=backend)
    _check(out, q[:, :2], kx, kx, False, None, dtype)


@pytest.mark.parametrize("backend", cpu_backends("attention"))
@pytest.mark.parametrize(
    "shape", [(0, 2, 2, 5, 7, 8), (2, 2, 2, 0, 7, 8), (2, 2, 1, 5, 0, 8), (1, 0, 0, 3, 3, 8)], ids=str
)
def test_attention_empty(backend, shape):
    B, H, Hkv, Tq, Tk, D = shape
    q, k, v = _make(B, H, Hkv, Tq, Tk, D, torch.float32)
    q.requires_grad_(True)
    out = ops.attention(q, k, v, causal=True, backend=backend)
    assert out.shape == (B, H, Tq, D)
    if out.numel():  # Tk = 0: no key anywhere, so zeros
        assert out.abs().max() == 0
    out.sum().backward()
    assert q.grad.shape == q.shape and (q.grad.numel() == 0 or q.grad.abs().max() == 0)


@pytest.mark.parametrize("backend", cpu_backends("attention"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "case",
    [(2, 4, 2, 23, 37, 16, True, [37, 11]), (1, 2, 1, 40, 20, 8, True, None), (2, 2, 2, 1, 70, 64, False, [0, 70])],
    ids=str,
)
def test_attention_gradients(backend, dtype, case):
    B, H, Hkv, Tq, Tk, D, causal, kl = case
    kl = None if kl is None else torch.tensor(kl)
    q, k, v = _make(B, H, Hkv, Tq, Tk, D, dtype)
    grad = torch.randn(B, H, Tq, D).to(dtype)
    ins = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    got = torch.autograd.grad(ops.attention(*ins, causal=causal, key_lengths=kl, backend=backend), ins, grad)
    ins32 = [t.detach().float().requires_grad_(True) for t in (q, k, v)]
    want = torch.autograd.grad(reference.attention(*ins32, causal, None, kl), ins32, grad.float())
    if dtype == torch.float32:
        for g, w in zip(got, want):
            # fp32: sums over Tq/Tk blocks in another order than the reference's autograd.
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    else:
        insl = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        lowp = torch.autograd.grad(reference.attention(*insl, causal, None, kl), insl, grad)
        for g, w, l in zip(got, want, lowp):
            assert g.dtype == dtype
            low_precision_close(g, w, l, floor=1e-3)


@compiled
@pytest.mark.parametrize("causal", [False, True])
def test_attention_gradcheck_float64(causal):
    q = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 1, 4, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 1, 4, 3, dtype=torch.float64, requires_grad=True)
    kl = torch.tensor([4, 2])
    fn = lambda q, k, v: ops.attention(q, k, v, causal=causal, key_lengths=kl, backend="cpp")  # noqa: E731
    # lse is stored in float32 (the op's contract), so analytic gradients carry ~1e-7 relative error.
    # fast_mode compares random projections of the Jacobian (full Jacobians cost ~10 s here).
    assert torch.autograd.gradcheck(fn, (q, k, v), atol=1e-5, rtol=1e-4, fast_mode=True)


@compiled
def test_attention_opcheck():
    q, k, v = _make(2, 4, 2, 9, 13, 8, torch.float32)
    kl = torch.tensor([13, 4])
    torch.library.opcheck(torch.ops.pysonic.attention, (q, k, v, True, None, kl))
    torch.library.opcheck(torch.ops.pysonic.attention, (q, k, v, False, 0.5, None))
    out, lse = torch.ops.pysonic.attention(q, k, v, True, None, kl)
    args = (torch.randn_like(out), q, k, v, out, lse, True, None, kl)
    torch.library.opcheck(torch.ops.pysonic.attention_backward, args)


@compiled
def test_attention_lse():
    q, k, v = _make(2, 2, 1, 6, 9, 8, torch.float32)
    kl = torch.tensor([0, 5])
    _, lse = torch.ops.pysonic.attention(q, k, v, True, None, kl)
    scores = (q @ k.transpose(-1, -2).expand(2, 2, 8, 9)) / 8**0.5
    visible = reference.attention_mask(2, 6, 9, True, kl, q.device).expand(2, 2, 6, 9)
    want = scores.masked_fill(~visible, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(lse, want, rtol=1e-5, atol=1e-5)


def test_attention_compile_fullgraph():
    def layer(q, k, v, kl):
        return ops.attention(q, k, v, causal=True, key_lengths=kl).sum(1)

    q, k, v = _make(2, 4, 2, 9, 13, 8, torch.float32)
    kl = torch.tensor([13, 6])
    fn = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(q, k, v, kl), layer(q, k, v, kl))


def test_attention_bad_input():
    q, k, v = _make(2, 4, 2, 5, 7, 8, torch.float32)
    with pytest.raises(ValueError, match="multiple of the 3 heads"):
        ops.attention(q, k[:, :1].expand(2, 3, 7, 8), v[:, :1].expand(2, 3, 7, 8))
    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        ops.attention(q[0], k, v)
    with pytest.raises(ValueError, match="v has shape"):
        ops.attention(q, k, v[:, :, :6])
    with pytest.raises(ValueError, match="head dim"):
        ops.attention(q, k[..., :4], v[..., :4])
    with pytest.raises(ValueError, match="batch size"):
        ops.attention(q, k[:1], v[:1])
    with pytest.raises(TypeError, match="k has dtype"):
        ops.attention(q, k.double(), v.double())
    with pytest.raises(TypeError, match="q must have dtype"):
        ops.attention(q.int(), k.int(), v.int())
    with pytest.raises(ValueError, match="exceeds the maximum of 128"):
        big = torch.randn(1, 1, 2, 129)
        ops.attention(big, big, big)
    with pytest.raises(ValueError, match=r"key_lengths must have shape \[B\]"):
        ops.attention(q, k, v, key_lengths=torch.tensor([3]))
    with pytest.raises(TypeError, match="key_lengths must have dtype"):
        ops.attention(q, k, v, key_lengths=torch.tensor([3.0, 2.0]))
    with pytest.raises(ValueError, match=r"key_lengths must lie in \[0, Tk\]"):
        ops.attention(q, k, v, key_lengths=torch.tensor([3, 8]))
    with pytest.raises(ValueError, match=r"key_lengths must lie in \[0, Tk\]"):
        ops.attention(q, k, v, key_lengths=torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match="scale"):
        ops.attention(q, k, v, scale=float("nan"))
    with pytest.raises(ValueError, match="backend"):
        ops.attention(q, k, v, backend="metal")
    with pytest.raises(ops.BackendUnavailable, match="cuda"):
        ops.attention(q, k, v, backend="cuda")


@compiled
def test_attention_cpp_checks():
    # The op itself checks too (callers may skip the wrapper): errors name the op and argument.
    q, k, v = _make(2, 4, 2, 5, 7, 8, torch.float32)
    with pytest.raises(RuntimeError, match="attention: the number of query heads"):
        torch.ops.pysonic.attention(q, k[:, :1].expand(2, 3, 7, 8), v[:, :1].expand(2, 3, 7, 8))
    with pytest.raises(RuntimeError, match="attention: key_lengths must lie in"):
        torch.ops.pysonic.attention(q, k, v, False, None, torch.tensor([8, 1]))
    with pytest.raises(RuntimeError, match="attention: head dim D = 129"):
        big = torch.randn(1, 1, 2, 129)
        torch.ops.pysonic.attention(big, big, big)
    with pytest.raises(RuntimeError, match="attention_backward: lse must have shape"):
        torch.ops.pysonic.attention_backward(q, q, k, v, q, q, False, None, None)
