"""WaveGrad vocoder: loading checkpoints and sampling with the fused diffusion step."""
from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from pysonic import ops
from pysonic.memory import block_cache
from pysonic.checkpoints import CheckpointError, load_into, read_state_dict
from pysonic.models.wavegrad.config import WaveGradConfig, from_ivanvovk_json, ivanvovk_default, lmnt_default
from pysonic.models.wavegrad.convert import convert
from pysonic.models.wavegrad.mel import MelSpectrogram
from pysonic.models.wavegrad.model import WaveGradNet, to_channels_last
from pysonic.models.wavegrad.schedules import fibonacci_betas, linear_betas

# Noise schedules shipped with the package (schedules.json beside this file), by iteration count.
# Each was produced by pysonic's own search (pysonic.models.wavegrad.search); the file records how.
SCHEDULE_FILE = Path(__file__).with_name("schedules.json")


def _packaged_schedules() -> dict[int, Sequence[float]]:
    if not SCHEDULE_FILE.is_file():
        return {}
    obj = json.loads(SCHEDULE_FILE.read_text())
    return {int(n): entry["betas"] for n, entry in obj["schedules"].items()}


PACKAGED_SCHEDULES: dict[int, Sequence[float]] = _packaged_schedules()


def check_betas(betas, *, where: str = "WaveGrad.generate") -> torch.Tensor:
    """Validate a noise schedule: 1-D, non-empty, finite, every beta in (0, 1). Returns float64 CPU."""
    if isinstance(betas, torch.Tensor):
        b = betas.detach().to("cpu", torch.float64)
    else:
        try:
            b = torch.tensor(list(betas), dtype=torch.float64)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{where}: schedule must be a sequence or 1-D tensor of betas, got {type(betas).__name__}") from exc
    if b.dim() != 1 or b.numel() == 0:
        raise ValueError(f"{where}: schedule must be a non-empty 1-D sequence of betas, got shape {tuple(b.shape)}")
    if not torch.isfinite(b).all() or not ((b > 0) & (b < 1)).all():
        bad = b[~((b > 0) & (b < 1))]
        raise ValueError(f"{where}: every beta must be in the open interval (0, 1); got {bad[:5].tolist()}")
    return b


def step_coefficients(betas: torch.Tensor, clip: str) -> list[dict[str, float]]:
    """Per-step sampler coefficients, indexed by step n (0 = last).

    ``clip="output"`` (LMNT): ``c1 = 1 / sqrt(alpha_n)``, ``c2 = (1 - alpha_n) / sqrt(1 - alpha_bar_n)``,
    ``sigma = sqrt((1 - alpha_bar_{n-1}) / (1 - alpha_bar_n) * beta_n)`` (0 for n = 0), computed in
    float64 as its numpy code does.

    ``clip="denoised"`` (ivanvovk): the clean-signal estimate ``y0 = y0_c1 * (x - y0_c2 * eps)`` and the
    posterior ``coef1 * y0 + coef2 * x + sigma * z``, computed in float32 like its registered
    buffers: with betas near 1e-6, ``1 - alpha_bar`` loses digits in float32 and its checkpoints'
    samples depend on that, so this reproduces it rather than the exact values.
    The noise level fed to the network is ``sqrt(alpha_bar_n)`` in both.
    """
    dt = torch.float32 if clip == "denoised" else torch.float64
    b = betas.to(dt)
    a = 1.0 - b
    ab = torch.cumprod(a, 0)
    ab_prev = torch.cat([torch.ones(1, dtype=dt), ab[:-1]])
    var = b * (1.0 - ab_prev) / (1.0 - ab)
    level = ab.sqrt()
    c1 = 1.0 / a.sqrt()
    c2 = (1.0 - a) / (1.0 - ab).sqrt()
    recip = (1.0 / ab).sqrt()
    coef1 = b * ab_prev.sqrt() / (1.0 - ab)
    coef2 = (1.0 - ab_prev) * a.sqrt() / (1.0 - ab)
    out = []
    for n in range(b.numel()):
        out.append({
            "level": float(level[n]), "c1": float(c1[n]), "c2": float(c2[n]),
            "sigma": math.sqrt(float(var[n])) if n > 0 else 0.0,
            "y0_c1": float(recip[n]), "y0_c2": float((1.0 - ab[n]).sqrt()),
            "coef1": float(coef1[n]), "coef2": float(coef2[n]),
        })
    return out


class WaveGrad(nn.Module):
    """Mel-conditioned diffusion vocoder (Chen et al., 2020).

    Args:
        config: a :class:`WaveGradConfig` (default: ivanvovk/WaveGrad's published one).
    """

    def __init__(self, config: WaveGradConfig | None = None):
        super().__init__()
        self.config = config or ivanvovk_default()
        self.net = WaveGradNet(self.config)
        self.mel = MelSpectrogram(self.config.mel)

    @property
    def hop_length(self) -> int:
        return self.config.hop_length

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, path: str | Path, *, config: WaveGradConfig | None = None) -> "WaveGrad":
        """Load a checkpoint from a local file or directory (never the network).

        Recognised layouts:

        * ivanvovk/WaveGrad: ``checkpoint_<N>.pt`` holding ``{'model': state_dict, ...}`` and its
          ``config.json`` (``model_config`` / ``data_config``) in the same directory; the
          directory or the ``.pt`` file may be given (the highest N is taken for a directory).
        * LMNT ``wavegrad`` package: ``weights.pt`` / ``weights-<step>.pt`` holding
          ``{'model': state_dict, ...}`` (its configuration is fixed: :func:`lmnt_default`).
        * pysonic: ``model.safetensors`` + ``config.json`` written by :meth:`save_pretrained`.

        Args:
            path: the directory or checkpoint file.
            config: overrides the configuration found beside the checkpoint.

        Raises:
            CheckpointError: no checkpoint found, or tensors missing, unexpected or mis-shaped
                (each named).
        """
        path = Path(path)
        ckpt, config_file = _locate(path)
        if ckpt.suffix == ".safetensors":
            state = read_state_dict(ckpt)
        else:
            state = read_state_dict(ckpt, key="model")
        state, fmt = convert(state)
        if config is None:
            config = _read_config(config_file, fmt)
        model = cls(config)
        load_into(model.net, state, source=f"{ckpt} ({fmt} WaveGrad layout)")
        return model.eval()

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``model.safetensors`` and ``config.json`` (pysonic layout)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.net.state_dict().items()}
        save_file(state, str(directory / "model.safetensors"))
        (directory / "config.json").write_text(json.dumps({"pysonic_wavegrad": self.config.to_dict()}, indent=2))

    # ------------------------------------------------------------------ sampling

    def resolve_schedule(self, iterations: int, schedule=None) -> torch.Tensor:
        """The betas for ``generate``: given ones, a named schedule, or a packaged one.

        ``schedule`` may be a sequence / 1-D tensor of betas (its length must equal
        ``iterations``), ``"linear"`` (betas from 1e-6 to 0.01), ``"fibonacci"``
        (:func:`fibonacci_betas` from 1e-6, 9e-6), or None: a schedule shipped
        for that iteration count, or the training schedule when ``iterations`` equals its length.
        """
        where = "WaveGrad.generate"
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"{where}: iterations must be a positive int, got {iterations!r}")
        if schedule is None:
            if iterations in PACKAGED_SCHEDULES:
                return check_betas(PACKAGED_SCHEDULES[iterations], where=where)
            if iterations == self.config.train_steps:
                return linear_betas(iterations, *self.config.train_betas_range)
            raise ValueError(
                f"{where}: no noise schedule for {iterations} iterations (packaged: {sorted(PACKAGED_SCHEDULES)}, "
                f"training: {self.config.train_steps}); pass schedule=<betas> or schedule='linear'"
            )
        if isinstance(schedule, str):
            if schedule == "linear":
                return linear_betas(iterations)
            if schedule == "fibonacci":
                return fibonacci_betas(iterations)
            raise ValueError(f"{where}: unknown schedule name {schedule!r} (known: 'linear', 'fibonacci')")
        betas = check_betas(schedule, where=where)
        if betas.numel() != iterations:
            raise ValueError(f"{where}: schedule has {betas.numel()} betas but iterations={iterations}; pass iterations={betas.numel()}")
        return betas

    def _check_mel(self, mel) -> torch.Tensor:
        where = "WaveGrad.generate"
        if not isinstance(mel, torch.Tensor):
            raise TypeError(f"{where}: mel must be a tensor [B, n_mels, T], got {type(mel).__name__}")
        if mel.dim() == 2:
            mel = mel.unsqueeze(0)
        if mel.dim() != 3:
            raise ValueError(f"{where}: mel must be [B, n_mels, T] or [n_mels, T], got shape {tuple(mel.shape)}")
        if not mel.is_floating_point():
            raise TypeError(f"{where}: mel must be floating point, got {mel.dtype}")
        if mel.shape[1] != self.config.n_mels:
            raise ValueError(f"{where}: mel has {mel.shape[1]} bands but this model takes n_mels={self.config.n_mels}")
        if mel.shape[0] == 0 or mel.shape[2] == 0:
            raise ValueError(f"{where}: mel is empty (shape {tuple(mel.shape)}); need B >= 1 and T >= 1 frames")
        if not torch.isfinite(mel).all():
            raise ValueError(f"{where}: mel contains NaN or infinite values")
        return mel

    @torch.inference_mode()
    def generate(
        self,
        mel: torch.Tensor,
        iterations: int = 6,
        schedule=None,
        generator: torch.Generator | None = None,
        *,
        noise: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
        backend: str = "auto",
        progress: bool = False,
    ) -> torch.Tensor:
        """Synthesize audio from mels.

        Args:
            mel: [B, n_mels, T] (or [n_mels, T]) in the checkpoint's mel scale.
            iterations: number of denoising iterations.
            schedule: betas (sequence or 1-D tensor), ``"linear"``, ``"fibonacci"``, or None (see
                :meth:`resolve_schedule`).
            generator: torch.Generator for the starting noise and the per-step noise.
            noise: instead of drawing, the noise to use: [iterations, B, T * hop]; ``noise[0]`` is the
                start, ``noise[k]`` is added after iteration k (the last iteration adds none).
            dtype: the network's dtype: torch.float32, or torch.bfloat16 (weights and activations;
                the sample and the update stay float32).
            backend: backend of ``pysonic.ops.diffusion_step``.
            progress: show a tqdm progress bar.

        Returns:
            wav [B, T * hop] float32 in [-1, 1].
        """
        mel = self._check_mel(mel)
        betas = self.resolve_schedule(iterations, schedule)
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"WaveGrad.generate: dtype must be float32, bfloat16 or float16, got {dtype}")
        param = next(self.net.parameters())
        device = param.device
        mel = mel.to(device=device, dtype=param.dtype)
        batch, length = mel.shape[0], mel.shape[2] * self.hop_length
        if noise is not None:
            expected = (iterations, batch, length)
            if not isinstance(noise, torch.Tensor) or tuple(noise.shape) != expected:
                got = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
                raise ValueError(f"WaveGrad.generate: noise must be a tensor of shape {expected}, got {got}")
            noise = noise.to(device=device, dtype=torch.float32)

        def draw(k: int) -> torch.Tensor:
            if noise is not None:
                return noise[k]
            return torch.randn(batch, length, generator=generator, device=device, dtype=torch.float32)

        coefs = step_coefficients(betas, self.config.clip)
        # Inference layout: [B, C, 1, T] channels-last activations in `dtype`. The weights are
        # cached in that layout and dtype across calls until they change (net.prepare(None) frees them).
        self.net.prepare(dtype)
        # On CPU, activations (tens of MB each) reuse freed blocks: fresh pages cost ~12% here.
        with block_cache() if device.type == "cpu" else contextlib.nullcontext():
            mel_features = self.net.encode_mel(to_channels_last(mel, dtype))
            x = draw(0)
            steps = range(iterations - 1, -1, -1)
            if progress:
                from tqdm import tqdm

                steps = tqdm(steps, desc="WaveGrad", total=iterations)
            for k, n in enumerate(steps):
                x = self._iteration(x, n, k, coefs[n], mel_features, draw, backend)
        return x

    def _iteration(self, x, n, k, c, mel_features, draw, backend):
        """One denoising iteration at step n (the k-th done): the network, then one fused update."""
        batch = x.shape[0]
        level = torch.full((batch,), c["level"], device=x.device, dtype=torch.float32)
        eps = self.net(x, None, level, mel_features=mel_features, channels_last=True).to(torch.float32)
        step_noise = draw(k + 1) if n > 0 else None
        if self.config.clip == "output":
            # LMNT: x <- clamp(c1 * (x - c2 * eps) + sigma * z, -1, 1).
            x = ops.diffusion_step(x, eps, step_noise, c["c1"], c["c2"], c["sigma"], clip=1.0, backend=backend)
        else:
            # ivanvovk (clip_denoised): y0 = clamp((x - sqrt(1 - ab) * eps) / sqrt(ab), -1, 1), then the
            # posterior mean coef1 * y0 + coef2 * x plus sigma * z.
            x = ops.diffusion_step_x0(x, eps, step_noise, c["y0_c1"], c["y0_c2"], c["coef1"], c["coef2"], c["sigma"],
                                      clip=1.0, backend=backend)
        return x


def _locate(path: Path) -> tuple[Path, Path | None]:
    """(checkpoint file, config.json or None) for a file or directory."""
    if path.is_file():
        cfg = path.parent / "config.json"
        return path, cfg if cfg.is_file() else None
    if not path.is_dir():
        raise CheckpointError(f"WaveGrad.from_pretrained: {path} is neither a file nor a directory")
    cfg = path / "config.json"
    cfg = cfg if cfg.is_file() else None
    for name in ("model.safetensors", "weights.pt"):
        if (path / name).is_file():
            return path / name, cfg
    numbered = []
    for pattern, regex in (("checkpoint_*.pt", r"checkpoint_(\d+)\.pt"), ("weights-*.pt", r"weights-(\d+)\.pt")):
        for f in path.glob(pattern):
            m = re.fullmatch(regex, f.name)
            if m:
                numbered.append((int(m[1]), f))
    if not numbered:
        raise CheckpointError(
            f"WaveGrad.from_pretrained: no checkpoint in {path} (looked for model.safetensors, weights.pt, "
            "weights-<step>.pt, checkpoint_<N>.pt)"
        )
    return max(numbered)[1], cfg


def _read_config(config_file: Path | None, fmt: str) -> WaveGradConfig:
    if config_file is not None:
        try:
            obj = json.loads(config_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"WaveGrad.from_pretrained: cannot read {config_file}: {exc}") from exc
        if isinstance(obj, dict) and "pysonic_wavegrad" in obj:
            return WaveGradConfig.from_dict(obj["pysonic_wavegrad"])
        if isinstance(obj, dict) and "model_config" in obj:
            return from_ivanvovk_json(obj)
        if fmt != "lmnt":
            raise CheckpointError(f"WaveGrad.from_pretrained: {config_file} is neither an ivanvovk nor a pysonic WaveGrad config")
    if fmt == "lmnt":
        return lmnt_default()
    if fmt == "ivanvovk":
        return ivanvovk_default()
    raise CheckpointError("WaveGrad.from_pretrained: a pysonic checkpoint needs its config.json")
