"""rvq_encode / rvq_decode: every CPU backend x dtype against pysonic.ops.reference."""
from __future__ import annotations

import random
import warnings

import pytest
import torch

import pysonic.ops as ops
from pysonic import _ext
from pysonic.ops import reference
from tests.ops.utils import cpu_backends, low_precision_close

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
ENC_BACKENDS = cpu_backends("rvq_encode")
DEC_BACKENDS = cpu_backends("rvq_decode")
needs_ext = pytest.mark.skipif(_ext._C is None, reason=f"compiled extension unavailable: {_ext.LOAD_ERROR}")

# Two exact fp32 distances can swap order when they differ by less than their rounding: a sum of
# D squares of differences carries a relative error of at most about (D + 3) * 2^-24 each. We
# accept a code that differs from the reference's when its exact (float64) distance is within
# twice that, relative to the two distances, of the minimum.
def _fp32_tol(D: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 2 * (D + 3) * 2.0**-24 * (a + b) + 1e-30


def _shape_cases(seed: int, n: int):
    """(B, T, L, K, D, n_q, non_contiguous): awkward fixed cases, then seeded random ones."""
    cases = [
        (2, 5, 3, 7, 9, 3, False),    # odd D, odd K
        (1, 1, 1, 1, 1, 1, False),    # every dim 1 (K=1: code 0 always)
        (1, 6, 4, 33, 17, 2, True),   # n_q < L, non-contiguous x
        (3, 1, 2, 40, 64, 2, False),  # T=1
        (0, 4, 2, 5, 8, 2, False),    # B=0
        (2, 0, 2, 5, 8, 1, True),     # T=0
    ]
    rng = random.Random(seed)
    for _ in range(n):
        L = rng.randint(1, 4)
        cases.append((rng.randint(1, 3), rng.randint(1, 20), L, rng.choice([1, 2, 13, 64, 100]),
                      rng.choice([1, 3, 16, 31, 48]), rng.randint(1, L), rng.random() < 0.5))
    return cases


def _make_inputs(case, dtype):
    B, T, L, K, D, n_q, noncontig = case
    # Codebook scale halves per level, like trained RVQ codebooks.
    codebooks = (torch.randn(L, K, D) * 0.5 ** torch.arange(L).view(L, 1, 1)).to(dtype)
    if noncontig:  # a strided view: D innermost with stride 2, T and B transposed in memory
        x = torch.randn(T, B, 2 * D).to(dtype)[:, :, ::2].transpose(0, 1)
        assert not x.is_contiguous() or x.numel() == 0
    else:
        x = torch.randn(B, T, D).to(dtype)
    return x, codebooks, n_q


def _suboptimal_levels(x, codebooks, codes):
    """Replay the residual chain from ``codes`` (fp32, as the kernel keeps it) and return, per
    level, how many rows chose a code whose exact distance is beyond the fp32 tolerance."""
    B, T, D = x.shape
    r = x.reshape(B * T, D).float()
    books = codebooks.float()
    flat = codes.reshape(B * T, codes.shape[-1])
    bad = []
    for level in range(flat.shape[1]):
        dist = (r.double()[:, None, :] - books[level].double()[None]).square().sum(-1)
        chosen = dist.gather(1, flat[:, level : level + 1]).squeeze(1)
        best = dist.min(1).values
        bad.append(int((chosen - best > _fp32_tol(D, chosen, best)).sum()))
        r = r - books[level][flat[:, level]]
    return bad


def _check_encode(codes, x, codebooks, n_q):
    """Codes equal the reference's, except where an fp32 near-tie was decided the other way."""
    B, T, D = x.shape
    assert codes.shape == (B, T, n_q) and codes.dtype == torch.int64
    ref = reference.rvq_encode(x, codebooks, n_q)
    rows_differ = int((codes != ref).any(-1).sum())
    if codes.numel():
        assert int(codes.min()) >= 0 and int(codes.max()) < codebooks.shape[1]
    # Every level of the kernel's own chain is optimal within fp32 rounding (this covers the
    # differing rows: from their first difference on, the kernel's residual is its own).
    assert _suboptimal_levels(x, codebooks, codes) == [0] * n_q
    # Near-ties are rare for continuous random data: a handful of rows at most.
    assert rows_differ <= max(1, (B * T) // 50), f"{rows_differ} of {B * T} rows differ from the reference"
    return rows_differ


# ----------------------------------------------------------------------------------------------
# rvq_encode


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ENC_BACKENDS)
def test_encode_matches_reference(backend, dtype):
    differ = 0
    for case in _shape_cases(seed=1, n=6):
        x, codebooks, n_q = _make_inputs(case, dtype)
        codes = ops.rvq_encode(x, codebooks, n_q=n_q, backend=backend)
        differ += _check_encode(codes, x, codebooks, n_q)
    print(f"rvq_encode[{backend}, {dtype}]: {differ} rows differ from the reference (fp32 near-ties)")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ENC_BACKENDS)
def test_encode_default_n_q_and_larger_codebook(backend, dtype):
    # Large enough (K=256, D=64, 140 rows) for the C++ kernel to span several code and row blocks.
    x = torch.randn(2, 70, 64).to(dtype)
    codebooks = (torch.randn(3, 256, 64) * torch.tensor([1.0, 0.6, 0.3]).view(3, 1, 1)).to(dtype)
    codes = ops.rvq_encode(x, codebooks, backend=backend)
    differ = _check_encode(codes, x, codebooks, 3)
    print(f"rvq_encode[{backend}, {dtype}] K=256: {differ} rows differ from the reference")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ENC_BACKENDS)
def test_encode_clustered_codebook(backend, dtype):
    # Codes 1e-3 apart around one centre: the distance gaps are far below the error of a bf16 or
    # expanded (||c||^2 - 2 x.c) product, so every code is a candidate that only exact distances
    # can rank. x is near the centre too.
    centre = torch.randn(1, 1, 24)
    codebooks = (centre + 1e-3 * torch.randn(2, 64, 24)).to(dtype)
    x = (centre + 2e-3 * torch.randn(2, 9, 24)).to(dtype)
    codes = ops.rvq_encode(x, codebooks, backend=backend)
    differ = _check_encode(codes, x, codebooks, 2)
    print(f"rvq_encode[{backend}, {dtype}] clustered: {differ} rows differ from the reference")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ENC_BACKENDS)
def test_encode_dense_rows(backend, dtype):
    # 200 codes 1e-3 apart around one centre: on AMX the bf16 screen keeps every code, so the C++
    # kernel takes its dense path (all exact distances from a transposed copy of the level, four
    # rows at a time; K = 200 leaves a 16-code tail, 37 rows a 1-row remainder). Level 1's code
    # 150 duplicates code 20 and x sits on code 20: an exact tie that must go to the lower index.
    torch.manual_seed(3)
    centre = torch.randn(1, 1, 24)
    codebooks = centre + 1e-3 * torch.randn(2, 200, 24)
    x = centre + 2e-3 * torch.randn(1, 37, 24)
    x, codebooks = x.to(dtype), codebooks.to(dtype)
    codes = ops.rvq_encode(x, codebooks, backend=backend)
    _check_encode(codes, x, codebooks, 2)
    codebooks[0, :, :] = 0  # level 0 picks code 0 and leaves x as it is
    codebooks[1] = (centre + 1e-3 * torch.randn(200, 24)).to(dtype)
    codebooks[1, 150] = codebooks[1, 20]
    x = (codebooks[1, 20].float() + 1e-6 * torch.randn(1, 37, 24)).to(dtype)
    codes = ops.rvq_encode(x, codebooks, backend=backend)
    assert (codes[..., 0] == 0).all() and (codes[..., 1] == 20).all(), codes[..., 1]


@pytest.mark.parametrize("backend", [pytest.param("reference", id="reference"), *ENC_BACKENDS])
@pytest.mark.parametrize("dtype", DTYPES)
def test_encode_exact_ties_pick_lowest_index(backend, dtype):
    codebooks = torch.randn(2, 8, 5).to(dtype)
    codebooks[0, 5] = codebooks[0, 2]          # duplicate rows: exact ties at every x
    codebooks[0, 7] = codebooks[0, 2]
    codebooks[1, :] = codebooks[1, 3]          # level 1: all codes identical -> code 0
    x = (codebooks[0, 2].float() + 1e-3 * torch.randn(3, 4, 5)).to(dtype)  # nearest is row 2 (== 5 == 7)
    codes = ops.rvq_encode(x, codebooks, backend=backend)
    assert (codes[..., 0] == 2).all(), codes[..., 0]
    assert (codes[..., 1] == 0).all(), codes[..., 1]


@pytest.mark.parametrize("backend", ENC_BACKENDS)
def test_encode_non_finite_and_huge_values(backend):
    # NaN rows and 1e20-scale rows leave the screening path; the answer still equals the
    # reference (NaN distances count as smallest, as torch.argmin does).
    x = torch.randn(1, 6, 8)
    x[0, 1, 3] = float("nan")
    x[0, 2] *= 1e20
    codebooks = torch.randn(2, 10, 8)
    codebooks[1, 4, 0] = float("inf")
    codes = ops.rvq_encode(x, codebooks, backend=backend)
    torch.testing.assert_close(codes, reference.rvq_encode(x, codebooks), rtol=0, atol=0)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_encode_cpp_fp32_screen(dtype):
    # With oneDNN disabled the C++ kernel screens with an fp32 matrix product instead of bf16 AMX
    # tiles (the path non-AMX machines take); same contract.
    x = torch.randn(2, 30, 33).to(dtype)
    codebooks = torch.randn(3, 70, 33).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.backends.mkldnn.flags(enabled=False):
            codes = ops.rvq_encode(x, codebooks, backend="cpp")
    _check_encode(codes, x, codebooks, 3)


# ----------------------------------------------------------------------------------------------
# rvq_decode


def _decode_bf16_torch(codes, codebooks):
    """Plain PyTorch in bf16 (the low-precision baseline for low_precision_close)."""
    out = torch.zeros(*codes.shape[:2], codebooks.shape[-1], dtype=codebooks.dtype)
    for level in range(codes.shape[-1]):
        out = out + codebooks[level][codes[..., level].long()]
    return out


@pytest.mark.parametrize("code_dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", DEC_BACKENDS)
def test_decode_matches_reference(backend, dtype, code_dtype):
    for case in _shape_cases(seed=2, n=6):
        B, T, L, K, D, n_q, noncontig = case
        codebooks = torch.randn(L, K, D).to(dtype)
        codes = torch.randint(0, K, (B, T, n_q), dtype=code_dtype)
        if noncontig:
            codes = torch.randint(0, K, (T, B, 2 * n_q), dtype=code_dtype)[:, :, 1::2].transpose(0, 1)
        out = ops.rvq_decode(codes, codebooks, backend=backend)
        ref = reference.rvq_decode(codes, codebooks)
        assert out.shape == (B, T, D) and out.dtype == dtype
        if dtype == torch.float32:
            # fp32 sums of n_q <= 4 rows: same order as the reference -> equal up to reassociation.
            torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
        else:
            # bf16: within one bf16 rounding of the reference (both accumulate in fp32) ...
            torch.testing.assert_close(out, ref, rtol=2.0**-8, atol=1e-6)
            # ... and no worse than plain bf16 PyTorch against the fp32 reference.
            low_precision_close(out, reference.rvq_decode(codes, codebooks.float()), _decode_bf16_torch(codes, codebooks))


@pytest.mark.parametrize("backend", [pytest.param("reference", id="reference"), *DEC_BACKENDS])
@pytest.mark.parametrize("code_dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
@pytest.mark.parametrize("bad", [-1, 5, 1 << 30], ids=["negative", "K", "huge"])
def test_decode_out_of_range_codes_raise(backend, code_dtype, bad):
    codebooks = torch.randn(3, 5, 4)
    codes = torch.randint(0, 5, (2, 3, 3), dtype=code_dtype)
    codes[1, 2, 1] = bad
    with pytest.raises((ValueError, RuntimeError), match=rf"rvq_decode: .*{bad}.* out of range for level 1"):
        ops.rvq_decode(codes, codebooks, backend=backend)


def test_decode_after_encode_reduces_error():
    # The decoded approximation improves with every level (codebook scale halves per level).
    x = torch.randn(1, 64, 16)
    codebooks = torch.randn(4, 128, 16) * 0.5 ** torch.arange(4).view(4, 1, 1)
    codes = ops.rvq_encode(x, codebooks)
    errs = [(ops.rvq_decode(codes[..., :q], codebooks) - x).square().mean().item() for q in range(1, 5)]
    assert all(b < a for a, b in zip(errs, errs[1:])), errs


# ----------------------------------------------------------------------------------------------
# torch.library integration


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype):
    x = torch.randn(2, 5, 7).to(dtype)
    codebooks = torch.randn(3, 11, 7).to(dtype)
    torch.library.opcheck(torch.ops.pysonic.rvq_encode.default, (x, codebooks, 2))
    for code_dtype in (torch.int64, torch.int32):
        codes = torch.randint(0, 11, (2, 5, 3), dtype=code_dtype)
        torch.library.opcheck(torch.ops.pysonic.rvq_decode.default, (codes, codebooks))


@needs_ext
def test_torch_compile_fullgraph():
    x = torch.randn(2, 9, 12)
    codebooks = torch.randn(3, 20, 12)

    def roundtrip(x, codebooks):
        codes = ops.rvq_encode(x, codebooks, n_q=2)
        return codes, ops.rvq_decode(codes, codebooks)

    codes_eager, out_eager = roundtrip(x, codebooks)
    codes, out = torch.compile(roundtrip, fullgraph=True, backend="aot_eager")(x, codebooks)
    torch.testing.assert_close(codes, codes_eager, rtol=0, atol=0)
    torch.testing.assert_close(out, out_eager, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# bad input


def test_encode_bad_inputs():
    x, cb = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    with pytest.raises(TypeError, match="rvq_encode: x must be a torch.Tensor"):
        ops.rvq_encode([1.0], cb)
    with pytest.raises(ValueError, match="rvq_encode: x must have 3 dimensions"):
        ops.rvq_encode(x[0], cb)
    with pytest.raises(ValueError, match="rvq_encode: codebooks must have 3 dimensions"):
        ops.rvq_encode(x, cb[0])
    with pytest.raises(TypeError, match="rvq_encode: x must have dtype"):
        ops.rvq_encode(x.double(), cb)
    with pytest.raises(TypeError, match="rvq_encode: x must have dtype"):
        ops.rvq_encode(x.half(), cb.half())
    with pytest.raises(TypeError, match="rvq_encode: codebooks has dtype"):
        ops.rvq_encode(x, cb.bfloat16())
    with pytest.raises(ValueError, match="rvq_encode: x has D = 4 but codebooks has D = 3"):
        ops.rvq_encode(x, cb[..., :3])
    with pytest.raises(ValueError, match="rvq_encode: codebooks must have K >= 1"):
        ops.rvq_encode(x, cb[:, :0])
    for n_q in (0, 3, -1):
        with pytest.raises(ValueError, match=r"rvq_encode: n_q must be in \[1, L = 2\]"):
            ops.rvq_encode(x, cb, n_q=n_q)
    with pytest.raises(TypeError, match="rvq_encode: n_q must be an int"):
        ops.rvq_encode(x, cb, n_q=1.0)
    with pytest.raises(ValueError, match="rvq_encode: codebooks is on meta but x is on cpu"):
        ops.rvq_encode(x, cb.to("meta"))
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.rvq_encode(x, cb, backend="nope")


@needs_ext
def test_cpp_op_checks_its_arguments():
    x, cb = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    with pytest.raises(RuntimeError, match=r"rvq_encode: n_q must be in \[1, L = 2\], got 3"):
        torch.ops.pysonic.rvq_encode(x, cb, 3)
    with pytest.raises(RuntimeError, match="rvq_encode: codebooks must have K >= 1"):
        torch.ops.pysonic.rvq_encode(x, cb[:, :0], 1)
    with pytest.raises(RuntimeError, match="rvq_encode: x has D = 4 but codebooks has D = 3"):
        torch.ops.pysonic.rvq_encode(x, cb[..., :3], 1)
    with pytest.raises(RuntimeError, match="rvq_encode: x has dtype"):
        torch.ops.pysonic.rvq_encode(x.bfloat16(), cb, 1)
    with pytest.raises(RuntimeError, match="rvq_decode: codes must be int64 or int32"):
        torch.ops.pysonic.rvq_decode(torch.zeros(1, 2, 2), cb)
    with pytest.raises(RuntimeError, match="rvq_decode: codes has n_q = 3 levels but codebooks has only L = 2"):
        torch.ops.pysonic.rvq_decode(torch.zeros(1, 2, 3, dtype=torch.long), cb)


def test_decode_bad_inputs():
    cb = torch.randn(2, 5, 4)
    codes = torch.zeros(1, 3, 2, dtype=torch.long)
    with pytest.raises(TypeError, match="rvq_decode: codes must be a torch.Tensor"):
        ops.rvq_decode([[0, 1]], cb)
    with pytest.raises(ValueError, match="rvq_decode: codes must have 3 dimensions"):
        ops.rvq_decode(codes[0], cb)
    with pytest.raises(TypeError, match="rvq_decode: codes must have dtype"):
        ops.rvq_decode(codes.float(), cb)
    with pytest.raises(TypeError, match="rvq_decode: codebooks must have dtype"):
        ops.rvq_decode(codes, cb.double())
    with pytest.raises(ValueError, match="rvq_decode: codes has n_q = 3 levels but codebooks has only L = 2"):
        ops.rvq_decode(torch.zeros(1, 3, 3, dtype=torch.long), cb)
    with pytest.raises(ValueError, match="rvq_decode: codebooks must have K >= 1"):
        ops.rvq_decode(codes, cb[:, :0])
    with pytest.raises(ValueError, match="rvq_decode: codebooks is on meta but codes is on cpu"):
        ops.rvq_decode(codes, cb.to("meta"))
