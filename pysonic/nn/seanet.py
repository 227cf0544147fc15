"""SEANet convolutional encoder/decoder, as used by EnCodec (and the MusicGen/AudioGen codec).

The layer order and parameter names follow the published checkpoints closely, so a converter
only renames prefixes: ``layers.{i}`` is the i-th entry of the reference ``nn.Sequential``, a
weight-normalised conv holds ``weight_g`` / ``weight_v`` / ``bias`` (``torch._weight_norm`` over
dim 0, the formula both ``nn.utils.weight_norm`` and the parametrization version use), a
``time_group_norm`` conv holds ``weight`` / ``bias`` and a ``norm`` (GroupNorm with one group).

Padding (Défossez et al. 2022, EnCodec section 3.1, and the reference code):
- causal: all of ``(kernel - 1) * dilation - (stride - 1)`` on the left;
- non-causal: split, the extra sample (odd totals) on the left;
- plus "extra" right padding so the last window is full and a transposed conv can rebuild
  ``ceil(N / stride) * stride`` samples;
- reflect padding on inputs shorter than the pad gets zero-extended first.
"""
from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pysonic import ops
from pysonic.memory import block_cache

NORMS = ("none", "weight_norm", "time_group_norm")

# oneDNN convolution with fused post-ops (what torch.compile's CPU backend calls), or None.
_CONV_POINTWISE = (getattr(torch.ops.mkldnn, "_convolution_pointwise", None)
                   if torch.backends.mkldnn.is_available() else None)


def extra_padding(length: int, kernel_size: int, stride: int, padding_total: int) -> int:
    """Right padding needed so that the last conv window is full.

    ``kernel_size`` is the effective (dilated) size.
    """
    n_frames = -(-(length - kernel_size + padding_total) // stride) + 1  # ceil division
    ideal_length = (n_frames - 1) * stride + (kernel_size - padding_total)
    return max(0, ideal_length - length)


def pad1d(x: torch.Tensor, left: int, right: int, mode: str) -> torch.Tensor:
    """``F.pad`` on the last axis of ``[B, C, L]`` or ``[B, C, 1, L]``; reflect padding also works
    on inputs shorter than the pad. No padding returns ``x`` itself (no copy)."""
    if left == 0 and right == 0:
        return x
    widths = (left, right) if x.dim() == 3 else (left, right, 0, 0)
    if mode != "reflect":
        return F.pad(x, widths, mode=mode)
    length = x.shape[-1]
    extra = max(left, right) - length + 1 if length <= max(left, right) else 0
    if extra:
        x = F.pad(x, (0, extra) if x.dim() == 3 else (0, extra, 0, 0))
    out = F.pad(x, widths, mode="reflect")
    return out[..., : out.shape[-1] - extra] if extra else out


CL = torch.channels_last


def to_2d(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, L]`` -> ``[B, C, 1, L]`` in channels-last layout (memory ``[B, L, C]``).

    The encoder and decoder run their convolutions as 2-D convolutions over height-1 images in
    this layout: oneDNN then works without the layout reorders it puts around every NCL 1-D
    convolution, and reflect padding / transposed-conv trimming copy whole rows (about 2x faster
    per conv in fp32 on this CPU, measured at the 24 kHz model's first-scale shapes).
    """
    return x.unsqueeze(2).contiguous(memory_format=CL)


def to_1d(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, 1, L]`` -> contiguous ``[B, C, L]``."""
    return x.squeeze(2).contiguous()


class _NormConvBase(nn.Module):
    """Holds a conv weight either plain or weight-normalised, plus an optional GroupNorm."""

    def _init_weight(self, weight: torch.Tensor, bias: torch.Tensor, norm: str, out_channels: int) -> None:
        if norm not in NORMS:
            raise ValueError(f"SEANet conv: norm must be one of {NORMS}, got {norm!r}")
        self.norm_type = norm
        if norm == "weight_norm":
            # g: [shape[0], 1, 1], the L2 norm of v over every dim but 0 (as nn.utils.weight_norm).
            self.weight_g = nn.Parameter(torch.norm_except_dim(weight, 2, 0).clone())
            self.weight_v = nn.Parameter(weight.clone())
        else:
            self.weight = nn.Parameter(weight.clone())
        self.bias = nn.Parameter(bias.clone())
        if norm == "time_group_norm":
            # GroupNorm(1, C): normalises over channels and time together (non-causal only).
            self.norm = nn.GroupNorm(1, out_channels)

    def _weight(self) -> torch.Tensor:
        """The conv weight (``[C_out, C_in, k]``; transposed: ``[C_in, C_out, k]``)."""
        if self.norm_type == "weight_norm":
            return torch._weight_norm(self.weight_v, self.weight_g, 0)
        return self.weight

    def _weight_for(self, x: torch.Tensor) -> torch.Tensor:
        """The weight shaped for ``x``'s layout (3-D, or 4-D channels-last for ``[B, C, 1, L]``).

        Without autograd (inference) the folded weight-norm weight is computed once and kept
        until a parameter changes (in-place updates bump their version counter; ``.to()`` or
        ``load_state_dict`` with new tensors change their identity)."""
        if torch.is_grad_enabled():
            w = self._weight()
            return w if x.dim() == 3 else w.unsqueeze(2).contiguous(memory_format=CL)
        params = (self.weight_v, self.weight_g) if self.norm_type == "weight_norm" else (self.weight,)
        key = (x.dim(),) + tuple((id(p), p._version, p.data_ptr(), p.dtype, p.device) for p in params)
        cached = self.__dict__.get("_weight_cache")
        if cached is None or cached[0] != key:
            w = self._weight().detach()
            w = w.contiguous() if x.dim() == 3 else w.unsqueeze(2).contiguous(memory_format=CL)
            cached = (key, w)
            self.__dict__["_weight_cache"] = cached
        return cached[1]


class SConv1d(_NormConvBase):
    """Conv1d with causal or centred "same" padding and weight/group normalisation.

    Input ``[B, C_in, N]`` -> ``[B, C_out, ceil(N / stride)]``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                 dilation: int = 1, causal: bool = False, norm: str = "weight_norm",
                 pad_mode: str = "reflect") -> None:
        super().__init__()
        if norm == "time_group_norm" and causal:
            raise ValueError("SEANet conv: time_group_norm cannot be causal")
        proto = nn.Conv1d(in_channels, out_channels, kernel_size, stride, dilation=dilation)
        self._init_weight(proto.weight.data, proto.bias.data, norm, out_channels)
        self.stride, self.dilation, self.kernel_size = stride, dilation, kernel_size
        self.causal, self.pad_mode = causal, pad_mode

    @property
    def padding_total(self) -> int:
        return (self.kernel_size - 1) * self.dilation - (self.stride - 1)

    def _pads(self, length: int) -> tuple[int, int]:
        """(left, right) padding for an input of ``length`` samples."""
        eff_kernel = (self.kernel_size - 1) * self.dilation + 1
        total = self.padding_total
        extra = extra_padding(length, eff_kernel, self.stride, total)
        if self.causal:
            return total, extra
        right = total // 2
        return total - right, right + extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, C_in, N]``, or ``[B, C_in, 1, N]`` channels-last (see :func:`to_2d`)."""
        x = pad1d(x, *self._pads(x.shape[-1]), self.pad_mode)
        return self._conv(x)

    def forward_elu(self, x: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """``forward(elu(x))``. Inference on ``[B, C, 1, N]`` channels-last input with reflect
        padding writes the activation straight into the padded buffer (one pass over the
        activations instead of two), then mirrors the few edge samples."""
        left, right = self._pads(x.shape[-1])
        n = x.shape[-1]
        if (torch.is_grad_enabled() or x.dim() != 4 or self.pad_mode != "reflect" or n <= max(left, right)
                or (left == 0 and right == 0)):
            return self(F.elu(x, alpha))
        buf = torch.empty((x.shape[0], x.shape[1], 1, left + n + right), dtype=x.dtype, device=x.device,
                          memory_format=CL)
        ops.elu(x, alpha, out=buf[..., left : left + n])
        if left:  # buf[left - i] = buf[left + i] for i = 1..left (reflection without the edge sample)
            buf[..., :left] = buf[..., left + 1 : 2 * left + 1].flip(-1)
        if right:  # buf[left + n - 1 + i] = buf[left + n - 1 - i] for i = 1..right
            buf[..., left + n :] = buf[..., left + n - 1 - right : left + n - 1].flip(-1)
        return self._conv(buf)

    def forward_add(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """``forward(x) + other``. Inference on channels-last ``[B, C, 1, N]`` input through an
        unpadded conv adds ``other`` inside oneDNN's convolution (a binary post-op), saving a
        pass over both tensors: SEANet's residual sums run at up to 64 x 120000 values."""
        if (_CONV_POINTWISE is None or torch.is_grad_enabled() or x.dim() != 4 or self.norm_type == "time_group_norm"
                or self._pads(x.shape[-1]) != (0, 0) or other.dtype != x.dtype
                or not (x.is_contiguous(memory_format=CL) and other.is_contiguous(memory_format=CL))):
            return self(x).add_(other)
        return _CONV_POINTWISE.binary(x, other, self._weight_for(x), self.bias, [0, 0], [1, self.stride],
                                      [1, self.dilation], 1, "add", None, None, [], None)

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        w = self._weight_for(x)
        if x.dim() == 4 and self.norm_type != "time_group_norm" and not torch.is_grad_enabled():
            if x.shape[1] == 1:
                return self._conv_one_channel(x, w)
            if w.shape[0] == 1:
                return self._conv_one_output(x, w)
        if x.dim() == 3:
            y = F.conv1d(x, w, self.bias, self.stride, 0, self.dilation)
        else:
            y = F.conv2d(x, w, self.bias, (1, self.stride), 0, (1, self.dilation))
        if self.norm_type == "time_group_norm":
            y = self.norm(y)
        return y

    def _conv_one_channel(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """A 1-channel input (the waveform into EnCodec's first conv) as one matrix product of
        the overlapping windows (a strided view) with the kernel, written straight in
        channels-last order; oneDNN takes several times longer on one input channel, and its
        output then needs a layout copy."""
        B, _, _, L = x.shape
        k_eff = (self.kernel_size - 1) * self.dilation + 1
        T = (L - k_eff) // self.stride + 1
        x = x.contiguous()
        windows = x.as_strided((B, T, self.kernel_size), (x.stride(0), self.stride, self.dilation))
        y = torch.matmul(windows, w.reshape(w.shape[0], self.kernel_size).t())  # [B, T, O]
        if self.bias is not None:
            y = y.add_(self.bias)
        return y.permute(0, 2, 1).unsqueeze(2)  # [B, O, 1, T], channels-last memory

    def _conv_one_output(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """A 1-channel output (EnCodec's last decoder conv): one matrix product of the
        channels-last input with the kernel's taps, ``z[t, j] = x[t] . w[:, j]``, then
        ``y[t] = sum_j z[t * stride + j * dilation, j]`` through a strided view of ``z``.
        oneDNN ran this 32 -> 1 conv at ~20 GFLOP/s (6 ms for 10 s of audio; this: 1.5 ms)."""
        B, C, _, L = x.shape
        k, d = self.kernel_size, self.dilation
        T = (L - ((k - 1) * d + 1)) // self.stride + 1
        rows = x.permute(0, 2, 3, 1).reshape(B, L, C)  # a view: channels-last memory is [B, L, C]
        z = torch.matmul(rows, w.reshape(C, k))  # [B, L, k]
        y = z.as_strided((B, T, k), (L * k, self.stride * k, d * k + 1)).sum(-1)
        if self.bias is not None:
            y = y.add_(self.bias)
        return y.view(B, 1, 1, T)


class SConvTranspose1d(_NormConvBase):
    """ConvTranspose1d that trims its padding: ``[B, C_in, T]`` -> ``[B, C_out, T * stride]``.

    Causal: ``ceil(pad * trim_right_ratio)`` trimmed on the right, the rest on the left.
    Non-causal: ``pad // 2`` on the right, the rest on the left.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                 causal: bool = False, norm: str = "weight_norm", trim_right_ratio: float = 1.0) -> None:
        super().__init__()
        if norm == "time_group_norm" and causal:
            raise ValueError("SEANet transposed conv: time_group_norm cannot be causal")
        if not causal and trim_right_ratio != 1.0:
            raise ValueError("SEANet transposed conv: trim_right_ratio != 1 needs causal=True")
        proto = nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride)
        self._init_weight(proto.weight.data, proto.bias.data, norm, out_channels)
        self.stride, self.kernel_size = stride, kernel_size
        self.causal, self.trim_right_ratio = causal, trim_right_ratio

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, C_in, T]``, or ``[B, C_in, 1, T]`` channels-last (see :func:`to_2d`)."""
        w = self._weight_for(x)
        if x.dim() == 3:
            y = F.conv_transpose1d(x, w, self.bias, self.stride)
        else:
            y = F.conv_transpose2d(x, w, self.bias, (1, self.stride))
        if self.norm_type == "time_group_norm":
            y = self.norm(y)
        total = self.kernel_size - self.stride
        right = math.ceil(total * self.trim_right_ratio) if self.causal else total // 2
        left = total - right
        return y[..., left : y.shape[-1] - right]


class SLSTM(nn.Module):
    """Multi-layer LSTM over time with a skip connection; conv layout ``[B, C, T]`` in and out.

    Without autograd, on a CPU tensor of at most ``small_batch`` sequences in float32 or
    bfloat16 (``fast_inference``, class attribute, default True), each layer runs as one matrix
    product for the input gates plus :func:`pysonic.ops.lstm_recurrence`, whose C++ kernel keeps
    the recurrent weight in the threads' L2 caches: a batch-1 LSTM is a chain of ``T x layers``
    matrix-vector products (512 x 2048 for EnCodec), bound by how fast that weight streams in.
    Otherwise (training, large batches, GPUs): ``nn.LSTM``. The kernel uses torch's thread
    count; each step ends in a barrier, so on cores busy with other work fewer threads are
    faster (``torch.set_num_threads(1)``).
    """

    fast_inference: bool = True
    small_batch: int = 4

    def __init__(self, dim: int, num_layers: int = 2) -> None:
        super().__init__()
        self.lstm = nn.LSTM(dim, dim, num_layers)

    def run(self, seq: torch.Tensor, state=None):
        """The LSTM on ``seq`` [T, B, C] from ``state`` (``(h, c)`` each [layers, B, C], or None):
        returns ``(y [T, B, C], state)`` like ``nn.LSTM``."""
        fast = (self.fast_inference and not torch.is_grad_enabled() and seq.device.type == "cpu"
                and seq.shape[1] <= self.small_batch and seq.dtype in (torch.float32, torch.bfloat16))
        if not fast:
            return self.lstm(seq, state)
        hs, cs = [], []
        y = seq
        for k in range(self.lstm.num_layers):
            w = [getattr(self.lstm, f"{name}_l{k}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            layer_state = None if state is None else (state[0][k], state[1][k])
            y, (h, c) = ops.lstm_layer(y, *w, layer_state)
            hs.append(h)
            cs.append(c)
        return y, (torch.stack(hs), torch.stack(cs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, C, T]``, or ``[B, C, 1, T]`` channels-last (returned in the same layout)."""
        seq = (x if x.dim() == 3 else x.squeeze(2)).permute(2, 0, 1)  # [T, B, C]
        y = self.run(seq)[0] + seq
        if x.dim() == 3:
            return y.permute(1, 2, 0)
        return y.permute(1, 2, 0).unsqueeze(2).contiguous(memory_format=CL)


class SEANetResBlock(nn.Module):
    """ELU -> conv(k, dilation) -> ELU -> conv(1), plus a skip (identity or 1x1 conv).

    ``block`` keeps the reference indices: 0 ELU, 1 conv, 2 ELU, 3 conv.
    """

    def __init__(self, dim: int, *, kernel_size: int = 3, dilation: int = 1, compress: int = 2,
                 true_skip: bool = False, **conv_kw) -> None:
        super().__init__()
        hidden = dim // compress
        self.block = nn.ModuleList([
            nn.ELU(),
            SConv1d(dim, hidden, kernel_size, dilation=dilation, **conv_kw),
            nn.ELU(),
            SConv1d(hidden, dim, 1, **conv_kw),
        ])
        self.shortcut = nn.Identity() if true_skip else SConv1d(dim, dim, 1, **conv_kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            y = x
            for layer in self.block:
                y = layer(y)
            return self.shortcut(x) + y
        # inference: fused ELU + padding, in-place ELU and residual add (no autograd to feed)
        y = self.block[1].forward_elu(x, self.block[0].alpha)
        return self.block[3].forward_add(ops.elu(y, self.block[2].alpha, out=y), self.shortcut(x))


def _run_layers(layers: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    """Apply ``layers`` in order; without autograd, an ELU followed by a conv runs fused
    (:meth:`SConv1d.forward_elu`), an ELU before a transposed conv runs in place, and CPU
    tensors come from :func:`pysonic.memory.block_cache` (the activations of 10 s of 24 kHz
    audio are 30 MB each; fresh pages for them cost ~10% of an EnCodec encode)."""
    if torch.is_grad_enabled():
        for layer in layers:
            x = layer(x)
        return x
    if x.device.type == "cpu":
        with block_cache():
            return _run_layers_inference(layers, x)
    return _run_layers_inference(layers, x)


def _run_layers_inference(layers: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    i = 0
    while i < len(layers):
        layer = layers[i]
        nxt = layers[i + 1] if i + 1 < len(layers) else None
        if isinstance(layer, nn.ELU) and isinstance(nxt, SConv1d):
            x = nxt.forward_elu(x, layer.alpha)
            i += 2
            continue
        if isinstance(layer, nn.ELU) and i > 0:  # x is an intermediate we own
            x = ops.elu(x, layer.alpha, out=x)
        else:
            x = layer(x)
        if i == 0 and x.dim() == 4 and not x.is_contiguous(memory_format=CL):
            # a 1-channel input leaves the first conv's layout ambiguous: PyTorch picks NCHW
            x = x.contiguous(memory_format=CL)
        i += 1
    return x


def _conv_kw(causal: bool, norm: str, pad_mode: str) -> dict:
    return {"causal": causal, "norm": norm, "pad_mode": pad_mode}


class SEANetEncoder(nn.Module):
    """Waveform ``[B, channels, N]`` -> latent ``[B, dimension, ceil(N / hop)]``, hop = prod(ratios).

    Args (defaults are the EnCodec 24 kHz model's, from the paper and reference code):
        channels: audio channels. dimension: latent size (128). n_filters: base width (32).
        ratios: the *decoder's* upsampling ratios (8, 5, 4, 2); the encoder uses them reversed.
        n_residual_layers: residual blocks per scale (1). kernel_size / last_kernel_size: first
        and last conv (7). residual_kernel_size: 3. dilation_base: 2 (dilation 2**j in block j).
        causal: causal padding (24 kHz model: True). norm: "weight_norm" or "time_group_norm"
        (48 kHz model). pad_mode: "reflect". true_skip: identity shortcuts (MusicGen 32 kHz
        model: True). compress: residual hidden = dim // compress (2). lstm: LSTM layers (2).
    """

    def __init__(self, *, channels: int = 1, dimension: int = 128, n_filters: int = 32,
                 ratios: Sequence[int] = (8, 5, 4, 2), n_residual_layers: int = 1, kernel_size: int = 7,
                 last_kernel_size: int = 7, residual_kernel_size: int = 3, dilation_base: int = 2,
                 causal: bool = False, norm: str = "weight_norm", pad_mode: str = "reflect",
                 true_skip: bool = False, compress: int = 2, lstm: int = 2) -> None:
        super().__init__()
        kw = _conv_kw(causal, norm, pad_mode)
        self.hop_length = math.prod(ratios)
        layers: list[nn.Module] = [SConv1d(channels, n_filters, kernel_size, **kw)]
        mult = 1
        for ratio in reversed(list(ratios)):
            for j in range(n_residual_layers):
                layers.append(SEANetResBlock(mult * n_filters, kernel_size=residual_kernel_size,
                                             dilation=dilation_base**j, compress=compress,
                                             true_skip=true_skip, **kw))
            layers += [nn.ELU(), SConv1d(mult * n_filters, 2 * mult * n_filters, 2 * ratio, stride=ratio, **kw)]
            mult *= 2
        if lstm:
            layers.append(SLSTM(mult * n_filters, lstm))
        layers += [nn.ELU(), SConv1d(mult * n_filters, dimension, last_kernel_size, **kw)]
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [B, channels, N]`` -> ``[B, dimension, ceil(N / hop)]``."""
        return to_1d(_run_layers(self.layers, to_2d(x)))


class SEANetDecoder(nn.Module):
    """Latent ``[B, dimension, T]`` -> waveform ``[B, channels, T * hop]``; mirror of the encoder.

    Same arguments as :class:`SEANetEncoder`, plus ``trim_right_ratio`` (causal transposed convs:
    the share of their padding trimmed on the right, 1.0 in the published models).
    """

    def __init__(self, *, channels: int = 1, dimension: int = 128, n_filters: int = 32,
                 ratios: Sequence[int] = (8, 5, 4, 2), n_residual_layers: int = 1, kernel_size: int = 7,
                 last_kernel_size: int = 7, residual_kernel_size: int = 3, dilation_base: int = 2,
                 causal: bool = False, norm: str = "weight_norm", pad_mode: str = "reflect",
                 true_skip: bool = False, compress: int = 2, lstm: int = 2,
                 trim_right_ratio: float = 1.0) -> None:
        super().__init__()
        kw = _conv_kw(causal, norm, pad_mode)
        self.hop_length = math.prod(ratios)
        mult = 2 ** len(ratios)
        layers: list[nn.Module] = [SConv1d(dimension, mult * n_filters, kernel_size, **kw)]
        if lstm:
            layers.append(SLSTM(mult * n_filters, lstm))
        for ratio in ratios:
            layers += [nn.ELU(), SConvTranspose1d(mult * n_filters, mult * n_filters // 2, 2 * ratio, stride=ratio,
                                                  causal=causal, norm=norm, trim_right_ratio=trim_right_ratio)]
            for j in range(n_residual_layers):
                layers.append(SEANetResBlock(mult * n_filters // 2, kernel_size=residual_kernel_size,
                                             dilation=dilation_base**j, compress=compress,
                                             true_skip=true_skip, **kw))
            mult //= 2
        layers += [nn.ELU(), SConv1d(n_filters, channels, last_kernel_size, **kw)]
        self.layers = nn.ModuleList(layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``z: [B, dimension, T]`` -> ``[B, channels, T * hop]``."""
        return to_1d(_run_layers(self.layers, to_2d(z)))


# ---------------------------------------------------------------------------- streaming
class SEANetStream:
    """Chunk-by-chunk evaluation of a causal :class:`SEANetEncoder` / :class:`SEANetDecoder`.

    ``step(x)`` takes the next chunk ``[B, C, n]`` (any length, including 0) and returns what the
    network can output so far; ``flush()`` ends the stream and returns the rest. The pieces
    concatenate to the one-pass output (up to float rounding: chunked convs and the LSTM sum in a
    different order), with memory bounded by the chunk size plus each layer's context (the last
    ``(kernel - 1) * dilation`` inputs of a conv, the LSTM state, a transposed conv's overlap).

    Only causal weight-norm / no-norm networks stream exactly: a non-causal conv looks ahead and
    GroupNorm sees the whole signal, so those raise ``ValueError``.
    """

    def __init__(self, net: nn.Module) -> None:
        for m in net.modules():
            if isinstance(m, (SConv1d, SConvTranspose1d)):
                if not m.causal or m.norm_type == "time_group_norm":
                    raise ValueError("SEANetStream: only causal SEANet networks without GroupNorm can stream")
                if isinstance(m, SConvTranspose1d) and m.trim_right_ratio != 1.0:
                    raise ValueError("SEANetStream: transposed convs must trim on the right (trim_right_ratio=1)")
        self.net = net
        self.state: dict[int, dict] = {}
        self.done = False

    def step(self, x: torch.Tensor) -> torch.Tensor:
        if self.done:
            raise RuntimeError("SEANetStream: step() after flush()")
        return self._run_outer(x, final=False)

    def flush(self) -> torch.Tensor:
        if self.done:
            raise RuntimeError("SEANetStream: flush() called twice")
        self.done = True
        return self._run_outer(None, final=True)

    def _run_outer(self, x, final: bool):
        # Without autograd the chunks run in the one-pass inference layout ([B, C, 1, n]
        # channels-last, see to_2d), on the ELU and LSTM kernels, with the CPU block cache.
        fast = not torch.is_grad_enabled()
        if fast and x is not None:
            x = to_2d(x)
        device = x.device if x is not None else next(self.net.parameters()).device
        with block_cache() if fast and device.type == "cpu" else contextlib.nullcontext():
            y = self._run(self.net.layers, x, final)
        return to_1d(y) if fast and y is not None else y

    # Each module's streaming rule. ``x`` None means "no new input" (flush).
    def _run(self, layers, x, final: bool):
        i = 0
        while i < len(layers):
            layer, nxt = layers[i], layers[i + 1] if i + 1 < len(layers) else None
            if isinstance(layer, nn.ELU) and isinstance(nxt, SConv1d) and not torch.is_grad_enabled():
                # the ELU written straight behind the conv's carried context (no concatenation pass)
                x = self._conv(nxt, x, self.state.setdefault(id(nxt), {}), final, elu_alpha=layer.alpha)
                i += 2
                continue
            x = self._module(layer, x, final)
            i += 1
        return x

    def _module(self, m: nn.Module, x, final: bool):
        st = self.state.setdefault(id(m), {})
        if isinstance(m, SConv1d):
            return self._conv(m, x, st, final)
        if isinstance(m, SConvTranspose1d):
            return self._convtr(m, x, st, final)
        if isinstance(m, SLSTM):
            if x is None or x.shape[-1] == 0:
                return x
            seq = (x if x.dim() == 3 else x.squeeze(2)).permute(2, 0, 1)
            y, st["hc"] = m.run(seq, st.get("hc"))
            y = (y + seq).permute(1, 2, 0)
            return y if x.dim() == 3 else y.unsqueeze(2).contiguous(memory_format=CL)
        if isinstance(m, SEANetResBlock):
            a = self._run(m.block, x, final)
            b = x if isinstance(m.shortcut, nn.Identity) else self._module(m.shortcut, x, final)
            # the branches may hold back different amounts at the start: sum what both have
            a = _cat(st.pop("a", None), a)
            b = _cat(st.pop("b", None), b)
            if a is None or b is None:
                st["a"], st["b"] = a, b
                return None
            n = min(a.shape[-1], b.shape[-1])
            st["a"], st["b"] = a[..., n:], b[..., n:]
            return a[..., :n] + b[..., :n]
        if isinstance(m, nn.ELU):
            if x is None:
                return None
            return m(x) if torch.is_grad_enabled() else ops.elu(x, m.alpha)
        raise ValueError(f"SEANetStream: cannot stream a {type(m).__name__}")

    @staticmethod
    def _conv(m: SConv1d, x, st: dict, final: bool, elu_alpha: float | None = None):
        """The conv's rule; with ``elu_alpha``, the conv of ``elu(x)``."""
        buf = _cat(st.get("buf"), x) if elu_alpha is None else _cat_elu(st.get("buf"), x, elu_alpha)
        st["seen"] = st.get("seen", 0) + (0 if x is None else x.shape[-1])
        if buf is None:
            return None
        total, eff = m.padding_total, (m.kernel_size - 1) * m.dilation + 1
        if not st.get("started"):
            if final:  # the whole input was shorter than the left pad: the one-pass rule
                st["buf"] = None
                return m(buf)
            if buf.shape[-1] <= total:
                st["buf"] = buf
                return None
            buf = pad1d(buf, total, 0, m.pad_mode)  # left pad from the signal's first samples
            st["started"] = True
        if final:
            buf = pad1d(buf, 0, extra_padding(st["seen"], eff, m.stride, total), m.pad_mode)
            st["buf"] = None
            if buf.shape[-1] < eff:
                return buf.new_zeros(buf.shape[:1] + (m.bias.shape[0],) + buf.shape[2:-1] + (0,))
        n_out = (buf.shape[-1] - eff) // m.stride + 1 if buf.shape[-1] >= eff else 0
        if not final:
            st["buf"] = buf[..., n_out * m.stride :]
        if n_out == 0:
            return None
        return m._conv(buf[..., : (n_out - 1) * m.stride + eff])

    @staticmethod
    def _convtr(m: SConvTranspose1d, x, st: dict, final: bool):
        if x is None or x.shape[-1] == 0:
            return None  # at the end the carried overlap is dropped: it is the one-pass right trim
        if x.dim() == 3:
            y = F.conv_transpose1d(x, m._weight_for(x), None, m.stride)
        else:
            y = F.conv_transpose2d(x, m._weight_for(x), None, (1, m.stride))
        tail = st.get("tail")
        if tail is not None:
            y[..., : tail.shape[-1]] += tail
        n = x.shape[-1] * m.stride
        st["tail"] = y[..., n:].clone()
        return y[..., :n] + m.bias.view((1, -1) + (1,) * (x.dim() - 2))


def _cat(a, b):
    """``a`` and ``b`` joined on the last axis; either may be None or empty (no copy then)."""
    if a is None or (a.shape[-1] == 0 and b is not None):
        return b
    if b is None or b.shape[-1] == 0:
        return a
    return torch.cat([a, b], dim=-1)


def _cat_elu(a, b, alpha: float):
    """``_cat(a, elu(b))``, writing the ELU of ``b`` straight into the result where the layouts
    allow (the result in ``b``'s channels-last layout, batch 1)."""
    if b is None:
        return a
    if a is None or a.shape[-1] == 0:
        return ops.elu(b, alpha)
    out = torch.empty(b.shape[:-1] + (a.shape[-1] + b.shape[-1],), dtype=b.dtype, device=b.device,
                      memory_format=CL if b.dim() == 4 else torch.contiguous_format)
    out[..., : a.shape[-1]] = a
    tail = out[..., a.shape[-1] :]
    if b.dim() == 4 and b.shape[0] == 1 and b.is_contiguous(memory_format=CL):
        ops.elu(b, alpha, out=tail)  # dense with b's strides (size-1 dims aside)
    else:
        tail.copy_(ops.elu(b, alpha))
    return out
