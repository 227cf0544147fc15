"""SEANet's inference fast path (channels-last 2-D convs, fused ELU + reflect pad, in-place ops,
residual sums inside the conv, weight norm folded once, the LSTM kernel, the 1-channel conv as a
matrix product) equals the plain autograd path, and the folded-weight cache follows parameter
changes."""
from __future__ import annotations

import pytest
import torch

from pysonic.codecs.encodec import EncodecConfig, EncodecModel
from pysonic.nn.seanet import SLSTM, SConv1d


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    out = {}
    for kind in ("24khz", "48khz", "32khz"):
        m = EncodecModel(getattr(EncodecConfig, f"encodec_{kind}")(n_filters=4, dimension=16)).eval()
        out[kind] = m
    return out


@pytest.mark.parametrize("kind,n", [("24khz", 1), ("24khz", 2400), ("48khz", 333), ("32khz", 333), ("32khz", 5)])
def test_fast_path_equals_autograd_path(models, kind, n):
    m = models[kind]
    wav = 0.5 * torch.randn(2, m.channels, n, generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        z_fast = m.encoder(wav)
        y_fast = m.decoder(z_fast)
    z_ref = m.encoder(wav).detach()  # grad mode: the plain layer-by-layer path
    y_ref = m.decoder(z_fast).detach()
    # same math, different summation order (fused buffers, in-place adds, GroupNorm over a
    # channels-last layout): fp32 rounding only, ~1e-6 of outputs of order 1
    torch.testing.assert_close(z_fast, z_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(wav).all()  # the input is not modified in place


def test_folded_weight_cache_follows_parameter_changes(models):
    m = EncodecModel(EncodecConfig(n_filters=4, dimension=16)).eval()
    wav = 0.5 * torch.randn(1, 1, 1600)
    with torch.no_grad():
        before = m.encoder(wav)
        m.encoder.layers[0].weight_g.mul_(2.0)  # in place: the version counter moves
        after = m.encoder(wav)
    fresh = EncodecModel(m.config).eval()
    fresh.load_state_dict(m.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(after, fresh.encoder(wav))
        assert not torch.allclose(before, after)
        m.load_state_dict(EncodecModel(m.config).state_dict())  # copied into the same tensors
        other = EncodecModel(m.config).eval()
        other.load_state_dict(m.state_dict())
        torch.testing.assert_close(m.encoder(wav), other.encoder(wav))
        m.to(torch.bfloat16)  # new tensors of another dtype
        assert m.encoder(wav.bfloat16()).dtype == torch.bfloat16


def test_lstm_fast_inference_matches_nn_lstm():
    """The inference path (input-gate GEMM + ops.lstm_recurrence per layer) against nn.LSTM,
    fp32 within 1e-5; the streaming state (h, c per layer) continues like nn.LSTM's."""
    torch.manual_seed(0)
    lstm = SLSTM(32, 2).eval()
    x = torch.randn(2, 32, 50)
    with torch.no_grad():
        fast = lstm(x)
        seq = x.permute(2, 0, 1)
        y_ref, (h_ref, c_ref) = lstm.lstm(seq)
        y1, state = lstm.run(seq[:20])
        y2, (h, c) = lstm.run(seq[20:], state)
        lstm.fast_inference = False
        slow = lstm(x)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([y1, y2]), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c, c_ref, rtol=1e-5, atol=1e-5)
    assert not torch.equal(fast, x)  # the LSTM contributed, not only the skip


@pytest.mark.parametrize("stride,dilation,causal", [(1, 1, False), (2, 1, True), (1, 3, False), (4, 2, True)])
def test_one_channel_conv_inference_path(stride, dilation, causal):
    """A 1-channel input (the waveform) runs as one matrix product over strided windows at
    inference: same values as the conv (fp32 1e-6) and a channels-last result."""
    torch.manual_seed(0)
    conv = SConv1d(1, 8, 7, stride=stride, dilation=dilation, causal=causal).eval()
    x = torch.randn(2, 1, 203)
    with torch.no_grad():
        fast = conv(x[:, :, None, :])  # [B, 1, 1, N]: the inference layout
        ref = conv(x)  # 3-D: F.conv1d
    assert fast.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast[:, :, 0, :], ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("stride,dilation,causal", [(1, 1, False), (2, 1, True), (1, 3, False), (3, 2, True)])
def test_one_output_conv_inference_path(stride, dilation, causal):
    """A 1-channel output (the decoder's last conv) runs as a product with the taps and a
    strided sum at inference: same values as the conv (fp32 1e-5), for batch > 1 too."""
    torch.manual_seed(0)
    conv = SConv1d(16, 1, 7, stride=stride, dilation=dilation, causal=causal).eval()
    x = torch.randn(3, 16, 211)
    with torch.no_grad():
        fast = conv(x[:, :, None, :].contiguous(memory_format=torch.channels_last))
        ref = conv(x)  # 3-D: F.conv1d
    assert fast.shape == (3, 1, 1, ref.shape[-1])
    torch.testing.assert_close(fast[:, :, 0, :], ref, rtol=1e-5, atol=1e-5)
    assert ref.abs().max() > 1  # not a comparison of near-zeros
