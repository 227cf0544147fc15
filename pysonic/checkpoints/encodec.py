"""EnCodec checkpoint layouts -> :class:`pysonic.codecs.encodec.EncodecModel` names.

Two upstream layouts:

- Hugging Face ``transformers`` (``EncodecModel`` directory: ``config.json`` +
  ``model.safetensors``): ``encoder.layers.{i}.conv.weight_g`` (or the parametrization names
  ``conv.parametrizations.weight.original0/1`` that newer versions save),
  ``encoder.layers.{i}.norm.*``, ``...block.{j}.conv.*``, ``...shortcut.conv.*``,
  ``...lstm.*``, ``quantizer.layers.{l}.codebook.{embed,inited,cluster_size,embed_avg}``.
- the ``encodec`` package (a bare ``state_dict`` file, e.g. ``encodec_24khz-d7cc33bc.th``):
  ``encoder.model.{i}.conv.conv.weight_g``, ``...conv.norm.*``, transposed convs
  ``decoder.model.{i}.convtr.convtr.*``, ``quantizer.vq.layers.{l}._codebook.*``.

pysonic's names: ``{encoder,decoder}.layers.{i}.{weight_g,weight_v,weight,bias,norm.*}``,
``...block.{j}.*``, ``...shortcut.*``, ``...lstm.*`` and one stacked
``quantizer.codebooks: [n_q, bins, dim]``. The EMA training state (``cluster_size``,
``embed_avg``) is dropped; ``inited == 0`` (a k-means codebook that was never initialised, i.e.
all zeros) is an error. Keys that match no rule are passed through unchanged so that strict
loading names them as unexpected.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping

import torch

from pysonic.checkpoints.io import CheckpointError

_PARAM = r"(weight_g|weight_v|weight|bias)"
# transformers: "<prefix>.conv.weight_g" / "<prefix>.conv.parametrizations.weight.original0"
_HF_CONV = re.compile(r"^(.*)\.conv\.(?:parametrizations\.weight\.(original[01])|" + _PARAM + r")$")
_HF_CODEBOOK = re.compile(r"^quantizer\.layers\.(\d+)\.codebook\.(embed|inited|cluster_size|embed_avg)$")
# encodec package: "<prefix>.conv.conv.weight_g", "<prefix>.conv.norm.weight", "<prefix>.convtr.convtr.bias"
_PKG_CONV = re.compile(r"^(.*)\.(conv|convtr)\.(conv|convtr|norm)\." + _PARAM + r"$")
_PKG_CODEBOOK = re.compile(r"^quantizer\.vq\.layers\.(\d+)\._codebook\.(embed|inited|cluster_size|embed_avg)$")
_ORIGINAL = {"original0": "weight_g", "original1": "weight_v"}


def _stack_codebooks(books: dict[int, dict[str, torch.Tensor]], source: str) -> torch.Tensor:
    levels = sorted(books)
    if levels != list(range(len(levels))):
        raise CheckpointError(f"{source}: codebook levels are not 0..{len(levels) - 1}: {levels}")
    embeds = []
    for level in levels:
        entry = books[level]
        if "embed" not in entry:
            raise CheckpointError(f"{source}: codebook level {level} has no 'embed' tensor")
        inited = entry.get("inited")
        if inited is not None and not bool(inited.float().min() > 0):
            raise CheckpointError(
                f"{source}: codebook level {level} is marked uninitialised (inited=0): the k-means "
                "initialisation never ran, so its entries are placeholders")
        embeds.append(entry["embed"])
    shapes = {tuple(e.shape) for e in embeds}
    if len(shapes) != 1:
        raise CheckpointError(f"{source}: codebook levels have different shapes: {sorted(shapes)}")
    return torch.stack(embeds)


def convert_transformers_state(state: Mapping[str, torch.Tensor], *, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Rename a ``transformers`` ``EncodecModel`` state dict to pysonic's names."""
    out: dict[str, torch.Tensor] = {}
    books: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = _HF_CODEBOOK.match(key)
        if m:
            books.setdefault(int(m.group(1)), {})[m.group(2)] = value
            continue
        m = _HF_CONV.match(key)
        if m:
            name = _ORIGINAL[m.group(2)] if m.group(2) else m.group(3)
            out[f"{m.group(1)}.{name}"] = value
            continue
        out[key] = value  # norm.*, lstm.*, or unknown (reported by strict loading)
    if books:
        out["quantizer.codebooks"] = _stack_codebooks(books, source)
    return out


def convert_encodec_package_state(state: Mapping[str, torch.Tensor], *, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Rename an ``encodec`` package ``EncodecModel`` state dict to pysonic's names."""
    out: dict[str, torch.Tensor] = {}
    books: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = _PKG_CODEBOOK.match(key)
        if m:
            books.setdefault(int(m.group(1)), {})[m.group(2)] = value
            continue
        key = re.sub(r"^(encoder|decoder)\.model\.", r"\1.layers.", key)
        m = _PKG_CONV.match(key)
        if m:
            prefix, inner, param = m.group(1), m.group(3), m.group(4)
            out[f"{prefix}.norm.{param}" if inner == "norm" else f"{prefix}.{param}"] = value
            continue
        out[key] = value
    if books:
        out["quantizer.codebooks"] = _stack_codebooks(books, source)
    return out


# transformers config.json field -> EncodecConfig field
_HF_FIELDS = {
    "target_bandwidths": "target_bandwidths",
    "sampling_rate": "sample_rate",
    "audio_channels": "channels",
    "normalize": "normalize",
    "chunk_length_s": "segment",
    "hidden_size": "dimension",
    "num_filters": "n_filters",
    "num_residual_layers": "n_residual_layers",
    "upsampling_ratios": "ratios",
    "norm_type": "norm",
    "kernel_size": "kernel_size",
    "last_kernel_size": "last_kernel_size",
    "residual_kernel_size": "residual_kernel_size",
    "dilation_growth_rate": "dilation_base",
    "use_causal_conv": "causal",
    "pad_mode": "pad_mode",
    "compress": "compress",
    "num_lstm_layers": "lstm",
    "trim_right_ratio": "trim_right_ratio",
    "codebook_size": "bins",
}


def transformers_config_fields(path: str | Path) -> dict:
    """Read a ``transformers`` EnCodec ``config.json`` into ``EncodecConfig`` keyword arguments."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read EnCodec config {path}: {exc}") from exc
    if raw.get("model_type", "encodec") != "encodec":
        raise CheckpointError(f"{path}: model_type is {raw.get('model_type')!r}, expected 'encodec'")
    fields = {ours: raw[theirs] for theirs, ours in _HF_FIELDS.items() if theirs in raw}
    if "use_conv_shortcut" in raw:
        fields["true_skip"] = not raw["use_conv_shortcut"]
    if raw.get("overlap") is not None:
        fields["overlap"] = raw["overlap"]
    dim = raw.get("codebook_dim")
    if dim is not None and dim != raw.get("hidden_size", 128):
        raise CheckpointError(f"{path}: codebook_dim {dim} != hidden_size {raw.get('hidden_size')} "
                              "(codebook projections are not part of EnCodec)")
    for key in ("target_bandwidths", "ratios"):
        if key in fields:
            fields[key] = tuple(fields[key])
    return fields


def infer_architecture(state: Mapping[str, torch.Tensor]) -> dict:
    """Architecture fields of ``EncodecConfig`` read off a converted (pysonic-named) state dict.

    Sample rate, causality, padding mode, normalisation, segmenting, bandwidths and the dilation
    base are not visible in the weights; the caller supplies them.
    """
    def weight(prefix: str) -> torch.Tensor:
        for name in ("weight_v", "weight"):
            if f"{prefix}.{name}" in state:
                return state[f"{prefix}.{name}"]
        raise CheckpointError(f"checkpoint has no conv weight at {prefix!r}")

    if "quantizer.codebooks" not in state:
        raise CheckpointError("checkpoint has no quantizer codebooks")
    enc = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    if not enc:
        raise CheckpointError("checkpoint has no encoder.layers.* tensors")
    first = weight("encoder.layers.0")
    last = weight(f"encoder.layers.{enc[-1]}")
    norm = ("weight_norm" if "encoder.layers.0.weight_g" in state
            else "time_group_norm" if "encoder.layers.0.norm.weight" in state else "none")
    ratios, res_blocks, lstm = [], [], 0
    for i in enc[1:-1]:
        p = f"encoder.layers.{i}"
        if f"{p}.block.1.bias" in state:
            res_blocks.append(p)
        elif f"{p}.lstm.weight_ih_l0" in state:
            lstm = sum(1 for k in state if k.startswith(f"{p}.lstm.weight_ih_l"))
        else:
            ratios.append(weight(p).shape[-1] // 2)
    if not ratios:
        raise CheckpointError("checkpoint: found no downsampling convs in the encoder")
    n_res = len(res_blocks) // len(ratios)
    fields = {
        "channels": first.shape[1], "n_filters": first.shape[0], "kernel_size": first.shape[-1],
        "dimension": last.shape[0], "last_kernel_size": last.shape[-1], "norm": norm,
        "ratios": tuple(reversed(ratios)), "n_residual_layers": n_res, "lstm": lstm,
        "n_q": state["quantizer.codebooks"].shape[0], "bins": state["quantizer.codebooks"].shape[1],
    }
    if res_blocks:
        hidden = weight(f"{res_blocks[0]}.block.1")
        fields["residual_kernel_size"] = hidden.shape[-1]
        fields["compress"] = max(1, first.shape[0] // hidden.shape[0])
        fields["true_skip"] = f"{res_blocks[0]}.shortcut.bias" not in state
    return fields


# ---------------------------------------------------------------------------- writing
def to_transformers_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """pysonic ``EncodecModel`` names -> ``transformers`` names (the inverse of
    :func:`convert_transformers_state`; EMA training buffers of the quantiser are dropped)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "quantizer.codebooks":
            for level, book in enumerate(value):
                embed = book.detach().clone().contiguous()
                out[f"quantizer.layers.{level}.codebook.embed"] = embed
                out[f"quantizer.layers.{level}.codebook.inited"] = torch.ones(1)
                # k-means state transformers keeps (unused at inference): one use per code
                out[f"quantizer.layers.{level}.codebook.cluster_size"] = torch.ones(embed.shape[0])
                out[f"quantizer.layers.{level}.codebook.embed_avg"] = embed.clone()
            continue
        if key.startswith("quantizer."):
            continue  # cluster_size / embed_sum: training state, not part of the model
        parts = key.split(".")
        if parts[-1] in ("weight_g", "weight_v", "weight", "bias") and parts[-2] != "norm" and "lstm" not in parts:
            key = ".".join(parts[:-1] + ["conv", parts[-1]])
        out[key] = value.detach().clone().contiguous()
    return out


def transformers_config_dict(config) -> dict:
    """An ``EncodecConfig`` as a ``transformers`` EnCodec ``config.json`` dict."""
    raw = {theirs: getattr(config, ours) for theirs, ours in _HF_FIELDS.items()}
    raw["target_bandwidths"] = list(config.target_bandwidths)
    raw["upsampling_ratios"] = list(config.ratios)
    raw.update(model_type="encodec", use_conv_shortcut=not config.true_skip, overlap=config.overlap,
               codebook_dim=config.dimension)
    return raw


def save_transformers_layout(model, path: str | Path) -> Path:
    """Write ``model`` (a pysonic ``EncodecModel``) as a ``transformers`` EnCodec directory
    (``config.json`` + ``model.safetensors``) that :meth:`EncodecModel.from_pretrained` (and
    ``transformers``) read. Files are written to temporaries and renamed into place."""
    import os

    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = {k: v.float().cpu() for k, v in to_transformers_state(model.state_dict()).items()}
    tmp = path / "model.safetensors.tmp"
    save_file(weights, str(tmp))
    os.replace(tmp, path / "model.safetensors")
    tmp = path / "config.json.tmp"
    tmp.write_text(json.dumps(transformers_config_dict(model.config), indent=2))
    os.replace(tmp, path / "config.json")
    return path
