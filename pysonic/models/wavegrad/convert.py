"""Key mapping from the upstream WaveGrad checkpoint layouts to :class:`WaveGradNet`'s names.

A key no rule knows is passed through unchanged, so strict loading
(:func:`pysonic.checkpoints.load_into`) reports it by its original name.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch

# ivanvovk/WaveGrad keeps its noise schedule as buffers of the outer module; they are not
# weights (the sampler gets its schedule from `generate`).
_IVANVOVK_SCHEDULE_BUFFERS = {
    "betas", "alphas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_recip_alphas_cumprod", "sqrt_alphas_cumprod_m1", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2",
}

_LMNT_RULES = [
    (r"downsample\.0\.(weight|bias)", r"audio_conv.\1"),
    (r"downsample\.(\d+)\.residual_dense\.(weight|bias)", lambda m: f"dblocks.{int(m[1]) - 1}.residual.{m[2]}"),
    (r"downsample\.(\d+)\.conv\.(\d+)\.(weight|bias)", lambda m: f"dblocks.{int(m[1]) - 1}.convs.{m[2]}.{m[3]}"),
    (r"film\.(\d+)\.(input_conv|output_conv)\.(weight|bias)", r"films.\1.\2.\3"),
    (r"upsample\.(\d+)\.block1\.(weight|bias)", r"ublocks.\1.residual.\2"),
    (r"upsample\.(\d+)\.block2\.0\.(weight|bias)", r"ublocks.\1.up_conv.\2"),
    (r"upsample\.(\d+)\.block2\.1\.(weight|bias)", r"ublocks.\1.convs.0.\2"),
    (r"upsample\.(\d+)\.block3\.(\d)\.(weight|bias)", lambda m: f"ublocks.{m[1]}.convs.{int(m[2]) + 1}.{m[3]}"),
    (r"first_conv\.(weight|bias)", r"mel_conv.\1"),
    (r"last_conv\.(weight|bias)", r"out_conv.\1"),
]

_IVANVOVK_RULES = [
    (r"nn\.dblock_preconv\.conv1d\.(weight|bias)", r"audio_conv.\1"),
    (r"nn\.dblocks\.(\d+)\.main_branch\.(\d+)\.convolution\.conv1d\.(weight|bias)",
     lambda m: f"dblocks.{m[1]}.convs.{int(m[2]) - 1}.{m[3]}"),
    (r"nn\.dblocks\.(\d+)\.residual_branch\.0\.conv1d\.(weight|bias)", r"dblocks.\1.residual.\2"),
    (r"nn\.films\.(\d+)\.signal_conv\.0\.conv1d\.(weight|bias)", r"films.\1.input_conv.\2"),
    (r"nn\.ublock_preconv\.conv1d\.(weight|bias)", r"mel_conv.\1"),
    (r"nn\.ublocks\.(\d+)\.first_block_main_branch\.upsampling\.2\.conv1d\.(weight|bias)", r"ublocks.\1.up_conv.\2"),
    (r"nn\.ublocks\.(\d+)\.first_block_main_branch\.modulation\.convolution\.conv1d\.(weight|bias)", r"ublocks.\1.convs.0.\2"),
    (r"nn\.ublocks\.(\d+)\.first_block_residual_branch\.0\.conv1d\.(weight|bias)", r"ublocks.\1.residual.\2"),
    (r"nn\.ublocks\.(\d+)\.second_block_main_branch\.modulation_(\d)\.convolution\.conv1d\.(weight|bias)",
     lambda m: f"ublocks.{m[1]}.convs.{int(m[2]) + 1}.{m[3]}"),
    (r"nn\.ublock_postconv\.conv1d\.(weight|bias)", r"out_conv.\1"),
]


def detect_format(state: Mapping[str, torch.Tensor]) -> str:
    """"ivanvovk", "lmnt" or "pysonic" from the key names."""
    keys = list(state)
    if any(k.startswith("nn.") for k in keys):
        return "ivanvovk"
    if any(k.startswith(("first_conv.", "downsample.", "upsample.")) for k in keys):
        return "lmnt"
    return "pysonic"


def _apply(rules, key: str) -> str:
    for pattern, repl in rules:
        m = re.fullmatch(pattern, key)
        if m:
            return repl(m) if callable(repl) else m.expand(repl)
    return key


def convert_lmnt(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LMNT ``wavegrad`` package ``checkpoint['model']`` -> pysonic names (its FiLM already stores [shift; scale])."""
    return {_apply(_LMNT_RULES, k): v for k, v in state.items()}


def convert_ivanvovk(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ivanvovk/WaveGrad ``checkpoint['model']`` -> pysonic names.

    Its FiLM has separate ``scale_conv`` and ``shift_conv``; they are stacked into one
    ``output_conv`` as ``[shift; scale]``. Schedule buffers are dropped.
    """
    out: dict[str, torch.Tensor] = {}
    film_parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        if k in _IVANVOVK_SCHEDULE_BUFFERS:
            continue
        m = re.fullmatch(r"nn\.films\.(\d+)\.(scale|shift)_conv\.conv1d\.(weight|bias)", k)
        if m:
            film_parts.setdefault((m[1], m[3]), {})[m[2]] = v
            continue
        out[_apply(_IVANVOVK_RULES, k)] = v
    for (i, kind), parts in film_parts.items():
        if set(parts) != {"scale", "shift"}:
            missing = ({"scale", "shift"} - set(parts)).pop()
            raise ValueError(f"ivanvovk WaveGrad checkpoint: nn.films.{i}.{missing}_conv.conv1d.{kind} is missing")
        out[f"films.{i}.output_conv.{kind}"] = torch.cat([parts["shift"], parts["scale"]], dim=0)
    return out


def convert(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Map any known layout to pysonic names; returns (state, detected format)."""
    fmt = detect_format(state)
    if fmt == "ivanvovk":
        return convert_ivanvovk(state), fmt
    if fmt == "lmnt":
        return convert_lmnt(state), fmt
    return dict(state), fmt
