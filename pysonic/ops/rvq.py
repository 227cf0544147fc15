"""Residual vector quantisation: ``rvq_encode`` (codes from vectors) and ``rvq_decode`` (back).

Used by the EnCodec-style codecs (``pysonic.nn`` RVQ module) to turn encoder frames into the
discrete tokens the language models predict, and tokens back into frames. Neither op is
differentiable (codes are integers; training uses the straight-through estimator in the module),
so no autograd is registered.
"""
from __future__ import annotations

import torch

from pysonic import _ext
from pysonic.ops import _checks, reference
from pysonic.ops._backends import resolve

_RVQ_DTYPES = (torch.float32, torch.bfloat16)
_CODE_DTYPES = (torch.int64, torch.int32)


def _check_codebooks(op: str, codebooks) -> None:
    _checks.tensor(op, "codebooks", codebooks, dim=3, dtypes=_RVQ_DTYPES)
    if codebooks.shape[1] == 0:
        raise ValueError(f"{op}: codebooks must have K >= 1 codes per level, got shape {tuple(codebooks.shape)}")


def rvq_encode(x, codebooks, *, n_q: int | None = None, backend: str = "auto"):
    """Residual VQ codes of ``x``: level by level, the nearest code, subtracted from the residual.

    At each level the code is the nearest by squared L2 distance (ties to the lowest index); the
    residual is kept in fp32 whatever the input dtype. The C++ kernel screens codes with a
    matrix product and an error bound, then decides among the surviving candidates by exact
    fp32 distances, so it agrees with :func:`pysonic.ops.reference.rvq_encode` except where two
    distances differ only by fp32 rounding. Not differentiable.

    Args:
        x: vectors [B, T, D], float32 or bfloat16, any strides.
        codebooks: [L, K, D], same dtype and device as ``x``, K >= 1.
        n_q: number of levels to use, 1 <= n_q <= L (default L).
        backend: "auto", "cpp", "cuda", "triton" or "reference".

    Returns:
        codes [B, T, n_q] int64, each in [0, K).
    """
    op = "rvq_encode"
    _checks.tensor(op, "x", x, dim=3, dtypes=_RVQ_DTYPES)
    _check_codebooks(op, codebooks)
    device = _checks.same_device(op, x=x, codebooks=codebooks)
    _checks.same_dtype(op, x=x, codebooks=codebooks)
    if x.shape[2] != codebooks.shape[2]:
        raise ValueError(f"{op}: x has D = {x.shape[2]} but codebooks has D = {codebooks.shape[2]} (x {tuple(x.shape)}, codebooks {tuple(codebooks.shape)})")
    L = codebooks.shape[0]
    if n_q is None:
        n_q = L
    if isinstance(n_q, bool) or not isinstance(n_q, int):
        raise TypeError(f"{op}: n_q must be an int or None, got {type(n_q).__name__}")
    if not 1 <= n_q <= L:
        raise ValueError(f"{op}: n_q must be in [1, L = {L}], got {n_q}")
    chosen = resolve(op, backend, device)
    if chosen == "reference":
        return reference.rvq_encode(x, codebooks, n_q)
    if chosen == "triton":
        from pysonic.ops import _triton

        return _triton.get(op)(x, codebooks, n_q)
    return torch.ops.pysonic.rvq_encode(x, codebooks, n_q)


def _check_code_range(op: str, codes, K: int) -> None:
    """Raise naming the first out-of-range code (for backends whose kernel cannot raise)."""
    if codes.numel() == 0:
        return
    bad = (codes < 0) | (codes >= K)
    if bool(bad.any()):
        b, t, level = (int(i) for i in bad.nonzero()[0])
        value = int(codes[b, t, level])
        raise ValueError(f"{op}: codes[{b}, {t}, {level}] = {value} is out of range for level {level} (expected 0 <= code < K = {K})")


def rvq_decode(codes, codebooks, *, backend: str = "auto"):
    """Sum over levels of the looked-up codes: ``out[b, t] = sum_l codebooks[l, codes[b, t, l]]``.

    Accumulates in fp32 and returns the codebooks' dtype. A code outside [0, K) is an error that
    names the level and the value (never an out-of-bounds read). Not differentiable.

    Args:
        codes: [B, T, n_q] int64 or int32, n_q <= L, any strides.
        codebooks: [L, K, D] float32 or bfloat16 on the device of ``codes``.
        backend: "auto", "cpp", "cuda", "triton" or "reference".

    Returns:
        [B, T, D] in ``codebooks.dtype`` (contiguous).
    """
    op = "rvq_decode"
    _checks.tensor(op, "codes", codes, dim=3, dtypes=_CODE_DTYPES)
    _check_codebooks(op, codebooks)
    device = _checks.same_device(op, codes=codes, codebooks=codebooks)
    L, K = codebooks.shape[0], codebooks.shape[1]
    if codes.shape[2] > L:
        raise ValueError(f"{op}: codes has n_q = {codes.shape[2]} levels but codebooks has only L = {L}")
    chosen = resolve(op, backend, device)
    if chosen in ("reference", "triton"):
        _check_code_range(op, codes, K)  # the C++/CUDA kernels check inside
    if chosen == "reference":
        return reference.rvq_decode(codes, codebooks)
    if chosen == "triton":
        from pysonic.ops import _triton

        return _triton.get(op)(codes, codebooks)
    return torch.ops.pysonic.rvq_decode(codes, codebooks)


if _ext._C is not None:

    @torch.library.register_fake("pysonic::rvq_encode")
    def _rvq_encode_fake(x, codebooks, n_q):
        torch._check(x.dim() == 3 and codebooks.dim() == 3, lambda: "rvq_encode: x must be [B,T,D], codebooks [L,K,D]")
        return x.new_empty((x.shape[0], x.shape[1], n_q), dtype=torch.int64)

    @torch.library.register_fake("pysonic::rvq_decode")
    def _rvq_decode_fake(codes, codebooks):
        torch._check(codes.dim() == 3 and codebooks.dim() == 3, lambda: "rvq_decode: codes must be [B,T,n_q], codebooks [L,K,D]")
        return codebooks.new_empty((codes.shape[0], codes.shape[1], codebooks.shape[2]))
