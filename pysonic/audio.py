"""Audio files: ``save_audio`` / ``load_audio`` through ``soundfile`` (no torchaudio), a
band-limited resampler, and loudness measurement (ITU-R BS.1770 / EBU R128).

Shapes: ``audio: [channels, N]`` (a 1-D ``[N]`` is mono; ``[1, channels, N]`` is accepted for one
generated item).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

PEAK_TARGET = 0.99  # "peak" normalisation: largest |sample| after scaling (just under full scale)
LOUDNESS_TARGET = -23.0  # LUFS, EBU R128's programme loudness


# ---------------------------------------------------------------------------------------- checks
def _as_audio(op: str, audio) -> torch.Tensor:
    if isinstance(audio, np.ndarray):
        audio = torch.from_numpy(audio)
    if not isinstance(audio, torch.Tensor):
        raise TypeError(f"{op}: audio must be a tensor or numpy array, got {type(audio).__name__}")
    if audio.dim() == 3 and audio.shape[0] == 1:
        audio = audio[0]
    if audio.dim() == 1:
        audio = audio[None]
    if audio.dim() != 2:
        raise ValueError(f"{op}: audio must be [N], [channels, N] or [1, channels, N], got shape {tuple(audio.shape)}")
    if audio.shape[0] == 0 or audio.shape[0] > 64:
        raise ValueError(f"{op}: audio must have 1 to 64 channels on dim 0 ([channels, N]), got shape {tuple(audio.shape)}")
    if audio.shape[0] > 2 and audio.shape[0] > audio.shape[1]:
        raise ValueError(
            f"{op}: audio of shape {tuple(audio.shape)} has more channels than samples; pass [channels, N], not [N, channels]"
        )
    if not (audio.is_floating_point() or audio.dtype in (torch.int16, torch.int32)):
        raise TypeError(f"{op}: audio must be floating point (or int16/int32 PCM), got {audio.dtype}")
    if audio.dtype == torch.int16:
        audio = audio.float() / 32768.0
    elif audio.dtype == torch.int32:
        audio = audio.double() / 2147483648.0
    audio = audio.detach().cpu().float()
    if not torch.isfinite(audio).all():
        raise ValueError(f"{op}: audio contains NaN or infinite values")
    return audio


def _check_rate(op: str, name: str, rate) -> int:
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate < 1:
        raise ValueError(f"{op}: {name} must be a positive int (Hz), got {rate!r}")
    return int(rate)


def _soundfile(op: str):
    try:
        import soundfile
    except ImportError as exc:  # optional dependency
        raise ImportError(f"{op} needs the `soundfile` package (pip install soundfile)") from exc
    return soundfile


# ---------------------------------------------------------------------------------------- resampling
def resample(audio: torch.Tensor, orig_rate: int, new_rate: int, *, zero_crossings: int = 24,
             rolloff: float = 0.945, beta: float = 8.6) -> torch.Tensor:
    """Band-limited resampling by a rational factor (windowed-sinc polyphase filter).

    With ``orig_rate / new_rate = M / L`` in lowest terms, output sample ``j`` sits at input time
    ``j M / L``; it is a sum over input samples ``i`` of ``x[i] h(j M / L - i)`` with ``h`` a
    Kaiser-windowed sinc low-pass at ``rolloff x`` the lower Nyquist frequency, ``zero_crossings``
    zero crossings each side. The L distinct phases of ``h`` are one strided ``conv1d``.

    Args:
        audio: [..., N] float.
        orig_rate, new_rate: sample rates in Hz.
        zero_crossings: filter half-length in zero crossings of the sinc (quality vs time).
        rolloff: cutoff as a fraction of the lower Nyquist frequency (the transition band lies
            below it, so aliasing is suppressed by the window's stop band).
        beta: Kaiser window shape (8.6: about 90 dB stop band).

    Returns:
        [..., ceil(N * new_rate / orig_rate)], same dtype.
    """
    op = "resample"
    orig_rate, new_rate = _check_rate(op, "orig_rate", orig_rate), _check_rate(op, "new_rate", new_rate)
    if not isinstance(audio, torch.Tensor) or not audio.is_floating_point():
        raise TypeError(f"{op}: audio must be a floating-point tensor")
    if orig_rate == new_rate:
        return audio.clone()
    g = math.gcd(orig_rate, new_rate)
    M, L = orig_rate // g, new_rate // g  # step M input samples per L output samples
    cutoff = rolloff * min(1.0, L / M)  # in cycles per input sample x 2 (1 = input Nyquist)
    half = math.ceil(zero_crossings / cutoff)  # filter half-width in input samples
    if L * (2 * half + M) > 50_000_000:
        raise ValueError(f"{op}: {orig_rate} -> {new_rate} Hz reduces to {M}/{L}, too fine a ratio for a polyphase filter")
    shape, N = audio.shape[:-1], audio.shape[-1]
    n_out = math.ceil(N * L / M)
    if N == 0:
        return audio.new_zeros(*shape, 0)
    dt = torch.float64
    # taps h(offset - p M / L) for phase p = j mod L (h is even), input offsets [-half, half + M)
    offsets = torch.arange(-half, half + M, dtype=dt)
    t = offsets[None, :] - torch.arange(L, dtype=dt)[:, None] * M / L  # [L, K]
    x = t * cutoff
    sinc = torch.where(x == 0, torch.ones_like(x), torch.sin(math.pi * x) / (math.pi * x))
    u = t / half
    window = torch.special.i0(beta * torch.sqrt((1 - u * u).clamp_min(0))) / torch.special.i0(torch.tensor(beta, dtype=dt))
    taps = (sinc * window * cutoff).masked_fill(u.abs() > 1, 0).to(audio.dtype)  # [L, K]
    flat = audio.reshape(-1, 1, N)
    frames = math.ceil(n_out / L)  # output blocks of L samples, one per M input samples
    right = max(0, (frames - 1) * M + 2 * half + M - (N + half))
    padded = F.pad(flat, (half, right))
    # output b L + p = sum_k x[b M + offsets[k]] taps[p, k]: a correlation with stride M
    out = F.conv1d(padded, taps[:, None, :], stride=M)  # [B, L, frames]
    out = out.transpose(1, 2).reshape(flat.shape[0], -1)[:, :n_out]
    return out.reshape(*shape, n_out)


# ---------------------------------------------------------------------------------------- loudness
def _biquad_response(b, a, w: torch.Tensor) -> torch.Tensor:
    z = torch.exp(-1j * w)
    return (b[0] + b[1] * z + b[2] * z * z) / (a[0] + a[1] * z + a[2] * z * z)


def _k_weighting(fs: int) -> tuple[list[float], list[float], list[float], list[float]]:
    """BS.1770's K filter at any rate: a +4 dB high shelf (about 1.7 kHz) and a high-pass at
    about 38 Hz, from their analog prototypes by the bilinear transform (48 kHz gives the
    standard's published coefficients)."""
    f0, gain_db, q = 1681.974450955533, 3.999843853973347, 0.7071752369554196
    k = math.tan(math.pi * f0 / fs)
    vh = 10 ** (gain_db / 20)
    vb = vh ** 0.4996667741545416
    a0 = 1 + k / q + k * k
    shelf_b = [(vh + vb * k / q + k * k) / a0, 2 * (k * k - vh) / a0, (vh - vb * k / q + k * k) / a0]
    shelf_a = [1.0, 2 * (k * k - 1) / a0, (1 - k / q + k * k) / a0]
    f0, q = 38.13547087602444, 0.5003270373238773
    k = math.tan(math.pi * f0 / fs)
    a0 = 1 + k / q + k * k
    hp_b = [1.0, -2.0, 1.0]
    hp_a = [1.0, 2 * (k * k - 1) / a0, (1 - k / q + k * k) / a0]
    return shelf_b, shelf_a, hp_b, hp_a


def loudness(audio, sample_rate: int) -> float:
    """Integrated loudness in LUFS (ITU-R BS.1770-4: K-weighting, 400 ms blocks with 75% overlap,
    absolute gate -70 LUFS, relative gate -10 LU; every channel weighted 1). ``-inf`` for silence.

    The IIR K filter is applied exactly through its frequency response on a zero-padded FFT
    (the filters' impulse responses die out well within the padding).
    """
    op = "loudness"
    x = _as_audio(op, audio).double()
    fs = _check_rate(op, "sample_rate", sample_rate)
    N = x.shape[-1]
    if N == 0:
        return float("-inf")
    n_fft = 1 << math.ceil(math.log2(N + fs))  # >= 1 s of zeros after the signal
    w = 2 * math.pi * torch.fft.rfftfreq(n_fft, dtype=torch.float64)
    sb, sa, hb, ha = _k_weighting(fs)
    H = _biquad_response(sb, sa, w) * _biquad_response(hb, ha, w)
    y = torch.fft.irfft(torch.fft.rfft(x, n=n_fft) * H, n=n_fft)[:, :N]
    block, hop = round(0.4 * fs), round(0.1 * fs)
    if N < block:
        z = (y * y).mean(-1, keepdim=True)  # one block: the whole (short) signal
    else:
        z = (y * y).unfold(-1, block, hop).mean(-1)  # [C, blocks]
    power = z.sum(0)  # channel weights 1
    lk = -0.691 + 10 * torch.log10(power.clamp_min(1e-300))
    gated = power[lk > -70.0]
    if gated.numel() == 0:
        return float("-inf")
    rel = -0.691 + 10 * math.log10(gated.mean().item()) - 10.0
    gated = power[(lk > -70.0) & (lk > rel)]
    return -0.691 + 10 * math.log10(gated.mean().item())


# ---------------------------------------------------------------------------------------- files
def save_audio(path: str | Path, audio, sample_rate: int, *, normalize: str | None = "peak",
               target_lufs: float = LOUDNESS_TARGET, subtype: str | None = None) -> Path:
    """Write audio with soundfile (format from the extension: .wav, .flac, .ogg, ...).

    Args:
        path: output file; its directory must exist.
        audio: [channels, N], [N] or [1, channels, N] float tensor or array, nominally in [-1, 1].
        sample_rate: Hz.
        normalize: "peak" (scale so the largest |sample| is 0.99), "loudness" (scale to
            ``target_lufs`` integrated loudness, BS.1770; then scaled down if a peak would
            exceed 0.99), or None (write as is; PCM formats clip outside [-1, 1]).
        target_lufs: loudness target of ``normalize="loudness"``.
        subtype: soundfile subtype (e.g. "PCM_16", "FLOAT"); None is the format's default.

    Returns:
        The path written.
    """
    op = "save_audio"
    x = _as_audio(op, audio)
    sr = _check_rate(op, "sample_rate", sample_rate)
    if normalize not in ("peak", "loudness", None):
        raise ValueError(f"{op}: normalize must be 'peak', 'loudness' or None, got {normalize!r}")
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{op}: directory does not exist: {path.parent}")
    peak = x.abs().max().item() if x.numel() else 0.0
    if normalize == "peak" and peak > 0:
        x = x * (PEAK_TARGET / peak)
    elif normalize == "loudness" and peak > 0:
        lufs = loudness(x, sr)
        if math.isfinite(lufs):
            gain = 10 ** ((target_lufs - lufs) / 20)
            gain = min(gain, PEAK_TARGET / peak)  # never clip
            x = x * gain
    sf = _soundfile(op)
    try:
        sf.write(str(path), x.T.numpy(), sr, subtype=subtype)
    except (RuntimeError, TypeError, ValueError) as exc:  # unknown extension / subtype
        raise ValueError(f"{op}: cannot write {path}: {exc}") from exc
    return path


def load_audio(path: str | Path, sample_rate: int | None = None) -> tuple[torch.Tensor, int]:
    """Read an audio file with soundfile.

    Args:
        path: the file.
        sample_rate: resample to this rate (band-limited, :func:`resample`); None keeps the file's.

    Returns:
        ``(audio [channels, N] float32, sample_rate)``.
    """
    op = "load_audio"
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{op}: file not found: {path}")
    if sample_rate is not None:
        sample_rate = _check_rate(op, "sample_rate", sample_rate)
    sf = _soundfile(op)
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile.LibsndfileError and friends: not an audio file
        raise ValueError(f"{op}: cannot read {path} as audio: {exc}") from exc
    audio = torch.from_numpy(np.ascontiguousarray(data.T))
    if sample_rate is not None and sample_rate != sr:
        audio = resample(audio, sr, sample_rate)
        sr = sample_rate
    return audio, int(sr)
