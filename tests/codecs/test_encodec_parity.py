"""EnCodec parity against the `encodec` package and `transformers` (test-only peers).

Each peer is built at random initialisation with small widths but the published structure
(sample rate, ratios, causality, norm, codebook count and size, segmenting), every weight
randomised (weight-norm gains, GroupNorm affine, k-means codebooks that the peers leave at zero
and mark uninitialised), saved in the peer's own format and loaded with
``EncodecModel.from_pretrained``. Then:

- codes: identical, except where the peer's and our nearest codebook entries tie within fp32
  rounding (the peers use the expanded distance |x|^2 - 2x.c + |c|^2, the RVQ ops the exact
  one). Each such tie is reported; after one, that frame's later levels see a different
  residual and are not compared.
- decode of the peer's codes: max abs difference <= 1e-4 (fp32).

The `encodec` package imports torchaudio at module level (for file I/O helpers never used
here). torchaudio's wheels pin torch versions, so it is not installed: a bare stand-in module
is put into sys.modules for the import only, and removed again.
"""
from __future__ import annotations

import math

import pytest
import torch

from pysonic.codecs.encodec import EncodecModel
from tests.peers import import_encodec_package

DECODE_ATOL = 1e-4  # fp32 decode tolerance from the issue
# Relative size of a distance difference that counts as a tie: the expanded fp32 distance
# carries a rounding error of a few ulps of |x|^2 + |c|^2 (eps32 = 1.2e-7), summed over D terms.
TIE_RTOL = 1e-5

WIDTH = dict(n_filters=4, dimension=16)  # small widths; structure as published


@pytest.fixture(autouse=True)
def _plain_cpu_kernels():
    """oneDNN builds (JITs) a new primitive for every new LSTM/conv shape, seconds each on a
    loaded machine; these tests see many shapes once each, so the plain ATen kernels are faster.
    Both sides run under the same setting."""
    with torch.backends.mkldnn.flags(enabled=False):
        yield


def _audio(channels: int, n: int, sample_rate: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    t = torch.arange(n) / sample_rate
    tone = 0.3 * torch.sin(2 * math.pi * 440 * t) + 0.2 * torch.sin(2 * math.pi * 97 * t + 1.0)
    wav = tone + 0.1 * torch.randn(2, channels, n, generator=g)
    wav[1] *= 0.25  # second batch item quieter: exercises the per-item scales
    return wav


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Random values in every parameter and buffer (gains != |v|, non-trivial GroupNorm)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("weight_g", "original0")) or "norm.weight" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif name.endswith("bias") or "norm.bias" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _fill_codebooks(embeds: list[torch.Tensor], inited: list[torch.Tensor], scale: float, seed: int) -> None:
    """Random codebooks, shrinking per level like a trained RVQ, marked initialised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for level, (e, i) in enumerate(zip(embeds, inited)):
            e.copy_(torch.randn(e.shape, generator=g) * scale * 0.7**level)
            i.fill_(1.0)


def _check_codes(ours: torch.Tensor, theirs: torch.Tensor, latents, books: torch.Tensor, record,
                 our_latents=None) -> None:
    """codes [B, n_q, T]; latents() -> the peer's latent [B, D, T] (only computed on a mismatch);
    books [L, K, D]; our_latents() -> pysonic's latent for the same input (None: taken equal).

    A differing code is accepted only as a tie: its distance and the peer's code's distance to
    the peer's residual differ by no more than (a) fp32 rounding of the distances (TIE_RTOL) plus
    (b) what the measured difference between the two encoders' latents can move them: with
    r' = r + delta, |d(r', c) - d(r, c)| <= 2 |delta| |r - c| + |delta|^2. Both encoders compute
    the same function in fp32 with differently ordered sums (pysonic runs channels-last 2-D
    convolutions), so delta is fp32 rounding of the encoder, measured here, not assumed.
    """
    assert ours.shape == theirs.shape
    if torch.equal(ours, theirs):
        record("code_ties", 0)
        return
    emb = latents()
    residual = emb.double().transpose(1, 2).reshape(-1, emb.shape[1])  # [B*T, D]
    if our_latents is None:
        delta = torch.zeros(residual.shape[0], dtype=torch.float64)
    else:
        mine = our_latents().double().transpose(1, 2).reshape(-1, emb.shape[1])
        delta = (mine - residual).norm(dim=1)  # [B*T]
        latent_err = float((mine - residual).abs().max())
        record("latent_max_abs_diff", latent_err)
        # the slack below is only for rounding: the latents themselves must agree like the decode
        assert latent_err <= DECODE_ATOL, f"encoder latents differ by {latent_err}"
    o = ours.transpose(1, 2).reshape(-1, ours.shape[1])
    t = theirs.transpose(1, 2).reshape(-1, theirs.shape[1])
    live = torch.ones(o.shape[0], dtype=torch.bool)
    ties = 0
    for level in range(o.shape[1]):
        book = books[level].double()
        diff = live & (o[:, level] != t[:, level])
        for row in diff.nonzero().flatten().tolist():
            r = residual[row]
            d_o = (r - book[o[row, level]]).square().sum()
            d_t = (r - book[t[row, level]]).square().sum()
            scale = r.square().sum() + book[torch.stack([o[row, level], t[row, level]])].square().sum(-1).max()
            dl = delta[row]
            moved = 2 * dl * (d_o.sqrt() + d_t.sqrt()) + 2 * dl**2
            assert abs(d_o - d_t) <= TIE_RTOL * scale + moved, (
                f"code mismatch at frame {row} level {level}: ours {int(o[row, level])} dist {float(d_o):.8g}, "
                f"peer {int(t[row, level])} dist {float(d_t):.8g}: not a tie")
            ties += 1
        live &= ~diff
        residual = residual - book[t[:, level]]
    record("code_ties", ties)
    if ties:
        print(f"EnCodec parity: {ties} code(s) differ by an fp32 distance tie")


# ---------------------------------------------------------------------------- encodec package
def _package_model(kind: str):
    encodec = import_encodec_package()
    from encodec import modules as m
    from encodec import quantization as qt

    if kind == "24khz":
        sr, ch, causal, norm, bws, ratios, bins, true_skip, normalize, segment = \
            24_000, 1, True, "weight_norm", [1.5, 3.0, 6.0, 12.0, 24.0], [8, 5, 4, 2], 1024, False, False, None
    elif kind == "48khz":
        sr, ch, causal, norm, bws, ratios, bins, true_skip, normalize, segment = \
            48_000, 2, False, "time_group_norm", [3.0, 6.0, 12.0, 24.0], [8, 5, 4, 2], 1024, False, True, 1.0
    else:  # the MusicGen 32 kHz codec, built from the package's modules
        sr, ch, causal, norm, bws, ratios, bins, true_skip, normalize, segment = \
            32_000, 1, False, "weight_norm", [2.2], [8, 5, 4, 4], 2048, True, False, None
    arch = dict(channels=ch, dimension=WIDTH["dimension"], n_filters=WIDTH["n_filters"], ratios=ratios,
                norm=norm, causal=causal, true_skip=true_skip)
    enc, dec = m.SEANetEncoder(**arch), m.SEANetDecoder(**arch)
    frame_rate = math.ceil(sr / math.prod(ratios))
    n_q = int(1000 * bws[-1] // (frame_rate * math.log2(bins)))
    quant = qt.ResidualVectorQuantizer(dimension=WIDTH["dimension"], n_q=n_q, bins=bins)
    model = encodec.EncodecModel(enc, dec, quant, bws, sr, ch, normalize=normalize, segment=segment)
    _randomise(model, seed=1)
    cbs = [layer._codebook for layer in quant.vq.layers]
    _fill_codebooks([c.embed for c in cbs], [c.inited for c in cbs], scale=1.0, seed=2)
    return model.eval()


def _package_codes(model, wav, bandwidth):
    model.set_target_bandwidth(bandwidth)
    frames = model.encode(wav)
    codes = torch.cat([c for c, _ in frames], dim=-1)
    scales = torch.cat([s for _, s in frames], dim=1) if frames[0][1] is not None else None
    return frames, codes, scales


CASES = [("24khz", 1.5, 0.5), ("24khz", 24.0, 0.5), ("48khz", 24.0, 1.03), ("32khz", 2.2, 0.5)]


@pytest.mark.parametrize("kind,bandwidth,seconds", CASES)
def test_parity_encodec_package(kind, bandwidth, seconds, tmp_path, record_property):
    peer = _package_model(kind)
    path = tmp_path / f"encodec_{kind}.th"
    torch.save(peer.state_dict(), path)
    ours = EncodecModel.from_pretrained(path)
    assert ours.sample_rate == peer.sample_rate and ours.channels == peer.channels
    assert ours.frame_rate == peer.frame_rate and list(ours.bandwidths) == list(peer.target_bandwidths)

    n = int(seconds * peer.sample_rate) + 7  # not a multiple of the hop
    wav = _audio(peer.channels, n, peer.sample_rate)
    with torch.no_grad():
        frames, codes_peer, scales_peer = _package_codes(peer, wav, bandwidth)
        out = ours.encode(wav, bandwidth=bandwidth)
        codes, scales = out if isinstance(out, tuple) else (out, None)
        assert codes.shape == codes_peer.shape
        if scales_peer is not None:
            torch.testing.assert_close(scales, scales_peer, rtol=1e-6, atol=0)
        books = torch.stack([layer._codebook.embed for layer in peer.quantizer.vq.layers])
        _check_codes(codes, codes_peer, lambda: _package_latents(peer, wav, scales_peer), books, record_property,
                     our_latents=lambda: _our_latents(ours, wav, scales_peer))

        ref = peer.decode(frames)
        dec = ours.decode(codes_peer, scales_peer)
    assert dec.shape == ref.shape
    err = (dec - ref).abs().max().item()
    record_property("decode_max_abs_err", err)
    assert err <= DECODE_ATOL, err


def _our_latents(ours, wav, scales):
    """pysonic's encoder latents, segment by segment as ``encode`` runs them, concatenated."""
    outs = []
    seg = ours._segment_length() or wav.shape[-1]
    for s, off in enumerate(range(0, wav.shape[-1], ours._segment_stride() or seg)):
        x = wav[..., off : off + seg]
        outs.append(ours.encoder(x / scales[:, s].view(-1, 1, 1) if ours.config.normalize else x))
    return torch.cat(outs, dim=-1)


def _package_latents(peer, wav, scales):
    """All segments' latents concatenated along time (segmented models)."""
    outs = []
    seg = peer.segment_length or wav.shape[-1]
    for s, off in enumerate(range(0, wav.shape[-1], peer.segment_stride or seg)):
        x = wav[..., off : off + seg]
        outs.append(peer.encoder(x / scales[:, s].view(-1, 1, 1) if peer.normalize else x))
    return torch.cat(outs, dim=-1)


# ---------------------------------------------------------------------------- transformers
def _transformers_model(kind: str):
    tr = pytest.importorskip("transformers")
    base = dict(num_filters=WIDTH["n_filters"], hidden_size=WIDTH["dimension"])
    if kind == "24khz":
        cfg = tr.EncodecConfig(**base)
    elif kind == "48khz":
        cfg = tr.EncodecConfig(**base, upsampling_ratios=[8, 5, 4, 2], target_bandwidths=[3.0, 6.0, 12.0, 24.0],
                               sampling_rate=48_000, audio_channels=2, use_causal_conv=False,
                               norm_type="time_group_norm", normalize=True, chunk_length_s=1.0, overlap=0.01)
    else:
        cfg = tr.EncodecConfig(**base, upsampling_ratios=[8, 5, 4, 4], target_bandwidths=[2.2], sampling_rate=32_000,
                               codebook_size=2048, use_causal_conv=False, normalize=False, use_conv_shortcut=False)
    model = tr.EncodecModel(cfg)
    _randomise(model, seed=3)
    cbs = [layer.codebook for layer in model.quantizer.layers]
    _fill_codebooks([c.embed for c in cbs], [c.inited for c in cbs], scale=1.0, seed=4)
    return model.eval()


@pytest.mark.parametrize("kind,bandwidth,seconds", CASES)
def test_parity_transformers(kind, bandwidth, seconds, tmp_path, record_property):
    peer = _transformers_model(kind)
    peer.save_pretrained(tmp_path)
    ours = EncodecModel.from_pretrained(tmp_path)
    cfg = peer.config
    assert ours.sample_rate == cfg.sampling_rate and ours.frame_rate == cfg.frame_rate

    n = int(seconds * cfg.sampling_rate) + 7
    wav = _audio(cfg.audio_channels, n, cfg.sampling_rate)
    with torch.no_grad():
        enc = peer.encode(wav, bandwidth=bandwidth, return_dict=True)
        pad = enc.last_frame_pad_length or 0
        frames = list(enc.audio_codes)
        if pad:
            frames[-1] = frames[-1][..., :-pad]
        codes_peer = torch.cat(frames, dim=-1)
        scales_peer = torch.cat(enc.audio_scales, dim=1) if enc.audio_scales[0] is not None else None
        out = ours.encode(wav, bandwidth=bandwidth)
        codes, scales = out if isinstance(out, tuple) else (out, None)
        if scales_peer is not None:
            torch.testing.assert_close(scales, scales_peer, rtol=1e-6, atol=0)
        books = torch.stack([layer.codebook.embed for layer in peer.quantizer.layers])

        def latents():
            outs, stride = [], cfg.chunk_stride or n
            for s, off in enumerate(range(0, n, stride)):
                x = wav[..., off : off + (cfg.chunk_length or n)]
                outs.append(peer.encoder(x / scales_peer[:, s].view(-1, 1, 1) if cfg.normalize else x))
            return torch.cat(outs, dim=-1)

        _check_codes(codes, codes_peer, latents, books, record_property,
                     our_latents=lambda: _our_latents(ours, wav, scales_peer))

        ref = peer.decode(enc.audio_codes, enc.audio_scales, last_frame_pad_length=pad, return_dict=True).audio_values
        dec = ours.decode(codes_peer, scales_peer)
    assert dec.shape == ref.shape
    err = (dec - ref).abs().max().item()
    record_property("decode_max_abs_err", err)
    assert err <= DECODE_ATOL, err


def test_code_check_rejects_a_non_tie(record_property):
    """The tie allowance above accepts only ties: a code that is clearly farther fails."""
    g = torch.Generator().manual_seed(5)
    books = torch.randn(2, 8, 4, generator=g)
    emb = books[0][[1, 2, 3]].T.unsqueeze(0).clone()  # latent = entries 1, 2, 3 of level 0
    theirs = torch.tensor([[[1, 2, 3], [0, 0, 0]]])
    ours = theirs.clone()
    ours[0, 0, 1] = 5
    with pytest.raises(AssertionError, match="not a tie"):
        _check_codes(ours, theirs, lambda: emb, books, record_property)
    tie_books = books.clone()
    tie_books[0, 5] = tie_books[0, 2]  # entry 5 duplicates entry 2: an exact tie is accepted
    _check_codes(ours, theirs, lambda: emb, tie_books, record_property)
