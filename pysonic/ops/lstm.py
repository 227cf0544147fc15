"""The recurrent half of an LSTM layer: ``lstm_recurrence`` (small-batch inference).

A batch-1 LSTM is a chain of matrix-vector products, one per step, each needing the previous
step's output; torch's CPU path streams the whole ``4H x H`` recurrent weight from memory at
every step. The C++ kernel keeps each thread's share of the weight in its own L2 cache (see
csrc/cpu/lstm.cpp). The input projection ``x @ w_ih^T`` for all steps is one matrix product,
left to the caller (:func:`lstm_layer` does both). Not differentiable: training uses ``nn.LSTM``.
"""
from __future__ import annotations

import torch

from pysonic import _ext
from pysonic.ops import _checks, reference
from pysonic.ops._backends import resolve

_DTYPES = (torch.float32, torch.bfloat16)


def lstm_recurrence(gates_x, w_hh, h0=None, c0=None, *, backend: str = "auto"):
    """Runs the LSTM recurrence over precomputed input gates.

    Per step, with torch's gate order (input, forget, cell, output):
    ``z = gates_x[t] + h @ w_hh^T``, ``c = sigmoid(z_f) * c + sigmoid(z_i) * tanh(z_g)``,
    ``h = sigmoid(z_o) * tanh(c)``. Arithmetic and the carried state are fp32.

    Args:
        gates_x: [T, B, 4H], ``x_t @ w_ih^T + b_ih + b_hh`` for every step; float32 or bfloat16.
        w_hh: [4H, H], the recurrent weight (``nn.LSTM.weight_hh_l{k}``), gates_x's dtype.
        h0, c0: [B, H] initial state, or None for zeros.
        backend: "auto", "cpp", "cuda", "triton" or "reference".

    Returns:
        ``(y, c_T)``: y [T, B, H] with ``y[t] = h_t`` (so ``h_T = y[-1]``), c_T [B, H]; gates_x's dtype.
    """
    op = "lstm_recurrence"
    _checks.tensor(op, "gates_x", gates_x, dim=3, dtypes=_DTYPES)
    _checks.tensor(op, "w_hh", w_hh, dim=2, dtypes=_DTYPES)
    T, B, G = gates_x.shape
    H = w_hh.shape[1]
    if H < 1 or w_hh.shape[0] != 4 * H:
        raise ValueError(f"{op}: w_hh must be [4H, H] with H >= 1, got shape {tuple(w_hh.shape)}")
    if G != 4 * H:
        raise ValueError(f"{op}: gates_x must be [T, B, 4H] = [T, B, {4 * H}] for w_hh {tuple(w_hh.shape)}, got {tuple(gates_x.shape)}")
    if h0 is None:
        h0 = gates_x.new_zeros(B, H)
    if c0 is None:
        c0 = gates_x.new_zeros(B, H)
    for name, state in (("h0", h0), ("c0", c0)):
        _checks.tensor(op, name, state, dim=2)
        if tuple(state.shape) != (B, H):
            raise ValueError(f"{op}: {name} must be [B, H] = [{B}, {H}], got {tuple(state.shape)}")
    device = _checks.same_device(op, gates_x=gates_x, w_hh=w_hh, h0=h0, c0=c0)
    _checks.same_dtype(op, gates_x=gates_x, w_hh=w_hh, h0=h0, c0=c0)
    chosen = resolve(op, backend, device)
    if chosen == "reference":
        return reference.lstm_recurrence(gates_x, w_hh, h0, c0)
    if chosen == "triton":
        from pysonic.ops import _triton

        return _triton.get(op)(gates_x, w_hh, h0, c0)
    return torch.ops.pysonic.lstm_recurrence(gates_x, w_hh, h0, c0)


def lstm_layer(x, w_ih, w_hh, b_ih=None, b_hh=None, state=None, *, backend: str = "auto"):
    """One ``nn.LSTM`` layer (no projection, unidirectional) for inference.

    Args:
        x: [T, B, I] sequence-first input, float32 or bfloat16.
        w_ih: [4H, I]; w_hh: [4H, H]; b_ih, b_hh: [4H] or None (x's dtype).
        state: ``(h0, c0)`` each [B, H], or None for zeros.
        backend: passed to :func:`lstm_recurrence`.

    Returns:
        ``(y [T, B, H], (h_T, c_T))`` like ``nn.LSTM`` with one layer (h_T, c_T: [B, H]).
    """
    op = "lstm_layer"
    _checks.tensor(op, "x", x, dim=3, dtypes=_DTYPES)
    _checks.tensor(op, "w_ih", w_ih, dim=2, dtypes=_DTYPES)
    if w_ih.shape[1] != x.shape[2]:
        raise ValueError(f"{op}: w_ih must be [4H, I] with I = {x.shape[2]} (x {tuple(x.shape)}), got {tuple(w_ih.shape)}")
    T, B, _ = x.shape
    bias = None
    for b in (b_ih, b_hh):
        if b is not None:
            bias = b if bias is None else bias + b
    gates = x.reshape(T * B, -1) @ w_ih.t()
    if bias is not None:
        gates = gates + bias
    h0, c0 = state if state is not None else (None, None)
    y, c = lstm_recurrence(gates.view(T, B, -1), w_hh, h0, c0, backend=backend)
    h = y[-1] if T > 0 else (h0 if h0 is not None else y.new_zeros(B, w_hh.shape[1]))
    return y, (h, c)


if _ext._C is not None:

    @torch.library.register_fake("pysonic::lstm_recurrence")
    def _lstm_recurrence_fake(gates_x, w_hh, h0, c0):
        torch._check(gates_x.dim() == 3 and w_hh.dim() == 2, lambda: "lstm_recurrence: gates_x must be [T,B,4H], w_hh [4H,H]")
        T, B, _ = gates_x.shape
        return gates_x.new_empty((T, B, w_hh.shape[1])), gates_x.new_empty((B, w_hh.shape[1]))
