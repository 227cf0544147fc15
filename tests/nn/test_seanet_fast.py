"""SEANet's inference fast path (channels-last 2-D convs, fused ELU + reflect pad, in-place ops,
weight norm folded once, single-thread LSTM recurrence) equals the plain autograd path, and the
folded-weight cache follows parameter changes."""
from __future__ import annotations

import pytest
import torch

from pysonic.codecs.encodec import EncodecConfig, EncodecModel
from pysonic.nn.seanet import SLSTM


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


def test_lstm_inference_threads_are_restored():
    lstm = SLSTM(8, 1).eval()
    x = torch.randn(1, 8, 20)
    threads = torch.get_num_threads()
    with torch.no_grad():
        y = lstm(x)
    assert torch.get_num_threads() == threads
    torch.testing.assert_close(y, lstm(x).detach())
