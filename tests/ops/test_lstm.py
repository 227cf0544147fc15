"""lstm_recurrence and lstm_layer: every CPU backend against pysonic.ops.reference and nn.LSTM.

Tolerances: fp32 1e-5 (the kernels sum the H products in another order than a BLAS product;
the state stays fp32, and |h| <= 1, so errors stay at a few ulp over hundreds of steps). bf16:
every backend and the reference compute in fp32 from the same bf16 inputs and round the
outputs once, so they differ by at most one bf16 step of values in [-1, 1] (2^-7) for h.
"""
import pytest
import torch

from pysonic import ops
from pysonic.ops import reference
from tests.ops.utils import cpu_backends

# (T, B, H): EnCodec's width, widths that are not a multiple of the 16-unit block, H = 1, T = 1.
SHAPES = [(30, 1, 512), (7, 3, 24), (5, 2, 17), (4, 1, 1), (1, 4, 40)]


def _inputs(T, B, H, dtype, *, scale=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    gates = (torch.randn(T, B, 4 * H, generator=g) * 2).to(dtype)
    w = (torch.randn(4 * H, H, generator=g) * scale / H**0.5).to(dtype)
    h0 = torch.randn(B, H, generator=g).tanh().to(dtype)
    c0 = torch.randn(B, H, generator=g).to(dtype)
    return gates, w, h0, c0


@pytest.mark.parametrize("backend", cpu_backends("lstm_recurrence"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_recurrence_matches_reference(backend, dtype, shape):
    gates, w, h0, c0 = _inputs(*shape, dtype, scale=3.0)  # large weights: gates saturate and swing
    y, c = ops.lstm_recurrence(gates, w, h0, c0, backend=backend)
    y_ref, c_ref = reference.lstm_recurrence(gates, w, h0, c0)
    assert y.dtype == dtype and c.dtype == dtype and y.shape == y_ref.shape and c.shape == c_ref.shape
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0, atol=2.0**-7 + 1e-6)
    torch.testing.assert_close(y, y_ref, **tol)
    if dtype == torch.float32:
        torch.testing.assert_close(c, c_ref, **tol)
    else:  # |c| can exceed 1: one bf16 step relative
        torch.testing.assert_close(c, c_ref, rtol=2.0**-7, atol=2.0**-7)


@pytest.mark.parametrize("backend", cpu_backends("lstm_recurrence"))
def test_layer_matches_nn_lstm_and_continues_from_state(backend):
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(48, 48, 1)
    x = torch.randn(40, 2, 48)
    weights = (lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0)
    with torch.no_grad():
        y_ref, (h_ref, c_ref) = lstm(x)
        y, (h, c) = ops.lstm_layer(x, *weights, backend=backend)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(h, h_ref[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c, c_ref[0], rtol=1e-5, atol=1e-5)
        # two halves with the state carried over == one pass
        y1, state = ops.lstm_layer(x[:17], *weights, backend=backend)
        y2, (h2, c2) = ops.lstm_layer(x[17:], *weights, state, backend=backend)
        torch.testing.assert_close(torch.cat([y1, y2]), y_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c2, c_ref[0], rtol=1e-5, atol=1e-5)


def test_cpp_result_does_not_depend_on_the_thread_count():
    gates, w, h0, c0 = _inputs(50, 2, 200, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.lstm_recurrence(gates, w, h0, c0, backend="cpp")
        torch.set_num_threads(2)
        two = ops.lstm_recurrence(gates, w, h0, c0, backend="cpp")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


@pytest.mark.parametrize("backend", cpu_backends("lstm_recurrence"))
def test_empty_sequence_and_batch(backend):
    gates, w, h0, c0 = _inputs(0, 2, 16, torch.float32)
    y, c = ops.lstm_recurrence(gates, w, h0, c0, backend=backend)
    assert y.shape == (0, 2, 16)
    torch.testing.assert_close(c, c0)
    gates, w, h0, c0 = _inputs(3, 0, 16, torch.float32)
    y, c = ops.lstm_recurrence(gates, w, h0, c0, backend=backend)
    assert y.shape == (3, 0, 16) and c.shape == (0, 16)


def test_state_defaults_to_zeros():
    gates, w, _, _ = _inputs(6, 2, 16, torch.float32)
    z = torch.zeros(2, 16)
    torch.testing.assert_close(ops.lstm_recurrence(gates, w), reference.lstm_recurrence(gates, w, z, z),
                               rtol=1e-5, atol=1e-5)


def test_bad_input_is_a_clear_error():
    gates, w, h0, c0 = _inputs(4, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="w_hh must be \\[4H, H\\]"):
        ops.lstm_recurrence(gates, w[:-1], h0, c0)
    with pytest.raises(ValueError, match="gates_x must be \\[T, B, 4H\\]"):
        ops.lstm_recurrence(gates[..., :-4], w, h0, c0)
    with pytest.raises(ValueError, match="gates_x must have 3 dimensions"):
        ops.lstm_recurrence(gates[0], w, h0, c0)
    with pytest.raises(ValueError, match="c0 must be \\[B, H\\]"):
        ops.lstm_recurrence(gates, w, h0, c0[:1])
    with pytest.raises(TypeError, match="h0 has dtype"):
        ops.lstm_recurrence(gates, w, h0.double(), c0)
    with pytest.raises(TypeError, match="gates_x must have dtype"):
        ops.lstm_recurrence(gates.half(), w.half(), h0.half(), c0.half())
    with pytest.raises(ValueError, match="w_ih must be \\[4H, I\\]"):
        ops.lstm_layer(torch.randn(4, 2, 8), torch.randn(64, 9), w)
    with pytest.raises(RuntimeError, match="w_hh must be \\[4H, H\\]"):  # the kernel checks on its own too
        torch.ops.pysonic.lstm_recurrence(gates, w[:-1], h0, c0)


def test_opcheck():
    # schema, fake (meta) implementation and dispatch of the registered C++ op
    gates, w, h0, c0 = _inputs(3, 2, 16, torch.float32)
    torch.library.opcheck(torch.ops.pysonic.lstm_recurrence, (gates, w, h0, c0))
