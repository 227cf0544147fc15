"""TangoFlux text-to-audio: text encoder -> flow sampling of Oobleck latents -> VAE decode.

Reads the directory of the declare-lab/TangoFlux release (``config.json``, ``tangoflux.safetensors``,
``vae.safetensors``) and a local text-encoder directory; nothing is fetched from the network.

What generation does, as the release's ``TangoFlux.inference_flow`` + ``TangoFluxInference``:

- classifier-free guidance (when ``guidance_scale > 1``) in one batched forward ordered
  ``[uncond; cond]``; uncond is the empty prompt padded to the prompt's token length;
- the duration token appended to the text; no attention mask reaches the transformer;
- sigmas ``linspace(1, 1/N, N)``, the model fed ``timestep / 1000``, Euler updates (Heun on request);
- 645 latent frames (30 s) from ``randn``, and the audio cropped to ``int(duration * 44100)``
  samples. Only the latent frames the crop keeps are decoded, plus the decoder's receptive field
  (exact: the decoder is convolutional), instead of all 645.

Batches: the release pads a batch's prompts to the longest, and since the transformer sees the
padding, a prompt's result would depend on its batch mates. Here each prompt keeps its own token
length (prompts of equal length share a forward), so a batch gives the same audio as its items one
by one.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from pysonic.checkpoints import read_state_dict
from pysonic.codecs.oobleck import OobleckConfig, OobleckVAE
from pysonic.models.tangoflux.model import TangoFluxConfig, TangoFluxModel
from pysonic.sampling import flow_scheduler
from pysonic.text.base import TextEncoder

MIN_DURATION = 1.0  # seconds; shorter requests are refused (the release's useful range)
TEXT_PREFIX = "text_encoder."  # the release saves its T5 inside tangoflux.safetensors


def _load_text_encoder(directory: Path) -> TextEncoder:
    """pysonic's ``WordTextEncoder`` when ``config.json`` says ``"type": "word_text_encoder"``,
    otherwise FLAN-T5 through ``transformers``."""
    cfg_file = directory / "config.json"
    if cfg_file.is_file():
        try:
            kind = json.loads(cfg_file.read_text()).get("type")
        except (json.JSONDecodeError, AttributeError):
            kind = None
        if kind == "word_text_encoder":
            from pysonic.text.word_encoder import WordTextEncoder

            return WordTextEncoder.from_pretrained(directory)
    from pysonic.text.t5 import T5TextEncoder

    return T5TextEncoder(directory)


@dataclass
class AudioOutput:
    """``audios``: [B, channels, N] float32; ``sample_rate`` in Hz."""

    audios: torch.Tensor
    sample_rate: int


class TangoFlux:
    """The TangoFlux text-to-audio pipeline.

    Args:
        model: the velocity model (text projection, duration token, transformer).
        vae: the Oobleck VAE (only its decoder is used here).
        text_encoder: any :class:`pysonic.text.TextEncoder` of width ``model.config.text_dim``.
        vae_dtype: dtype of the VAE decode (default: the VAE's).
    """

    def __init__(self, model: TangoFluxModel, vae: OobleckVAE, text_encoder: TextEncoder):
        if not isinstance(text_encoder, TextEncoder):
            raise TypeError(f"TangoFlux: text_encoder must be a pysonic.text.TextEncoder, got {type(text_encoder).__name__}")
        if text_encoder.dim != model.config.text_dim:
            raise ValueError(
                f"TangoFlux: the text encoder's width {text_encoder.dim} differs from the model's text width "
                f"{model.config.text_dim} (joint_attention_dim)"
            )
        if vae.config.latent_channels != model.config.in_channels:
            raise ValueError(
                f"TangoFlux: the VAE has {vae.config.latent_channels} latent channels, the model {model.config.in_channels}"
            )
        self.model = model.eval()
        self.vae = vae.eval()
        self.text_encoder = text_encoder.eval()

    @property
    def sample_rate(self) -> int:
        return self.vae.sampling_rate

    @property
    def device(self) -> torch.device:
        return self.model.text_proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.text_proj.weight.dtype

    def to(self, device=None, dtype=None) -> "TangoFlux":
        """Move the model and the VAE (device and dtype) and the text encoder (device only)."""
        self.model.to(device=device, dtype=dtype)
        self.vae.to(device=device, dtype=dtype)
        self.text_encoder.to(device=device)
        return self

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        text_encoder: str | Path | TextEncoder | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        vae_config: OobleckConfig | None = None,
        text_encoder_weights: str = "checkpoint",
    ) -> "TangoFlux":
        """Load a TangoFlux release directory (local files only).

        Args:
            path: directory with ``config.json``, ``tangoflux.safetensors`` and the VAE
                (``vae.safetensors`` in diffusers' AutoencoderOobleck key layout, or a diffusers
                ``vae/`` folder).
            text_encoder: a local T5 directory (e.g. a copy of ``google/flan-t5-large``) or a
                :class:`TextEncoder`; None uses config.json's ``text_encoder_name`` when it is an
                existing local directory.
            dtype: dtype of the model and VAE weights (e.g. ``torch.bfloat16``); the sampler's
                latents stay float32 and the text encoder stays in its own dtype.
            device: where to run.
            vae_config: VAE hyperparameters when the VAE file has no config beside it
                (default: the released VAE's).
            text_encoder_weights: "checkpoint" (the release's behaviour: the T5 tensors saved in
                ``tangoflux.safetensors`` replace the encoder's own) or "encoder" (keep them).

        Raises:
            FileNotFoundError: naming the missing file and where it was looked for.
            CheckpointError: a file that does not match the model.
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"TangoFlux.from_pretrained: checkpoint directory not found: {path}")
        if text_encoder_weights not in ("checkpoint", "encoder"):
            raise ValueError(f"TangoFlux.from_pretrained: text_encoder_weights must be 'checkpoint' or 'encoder', got {text_encoder_weights!r}")
        cfg_file, weights = path / "config.json", path / "tangoflux.safetensors"
        vae_files = [path / "vae.safetensors", path / "vae" / "diffusion_pytorch_model.safetensors"]
        for f in (cfg_file, weights):
            if not f.is_file():
                raise FileNotFoundError(f"TangoFlux.from_pretrained: {f.name} not found in {path} (looked for {f})")
        if not any(f.is_file() for f in vae_files):
            raise FileNotFoundError(
                f"TangoFlux.from_pretrained: VAE weights not found in {path} (looked for {', '.join(map(str, vae_files))})"
            )
        raw_cfg = json.loads(cfg_file.read_text())
        config = TangoFluxConfig.from_config_dict(raw_cfg)

        if text_encoder is None:
            name = Path(str(raw_cfg.get("text_encoder_name", "")))
            inside = path / name  # a model directory that carries its text encoder (the default model)
            if str(name) not in ("", ".") and not name.is_absolute() and inside.is_dir():
                name = inside
            if not name.is_dir():
                raise ValueError(
                    "TangoFlux.from_pretrained: pass text_encoder= a local text-encoder directory (e.g. a copy of "
                    f"{config.text_encoder_name}) or a TextEncoder; nothing is downloaded"
                )
            text_encoder = name
        if not isinstance(text_encoder, TextEncoder):
            text_encoder = _load_text_encoder(Path(text_encoder))

        state = read_state_dict(weights)
        model = TangoFluxModel(config)
        model.load_release_state_dict(state, source=str(weights))
        text_state = {k[len(TEXT_PREFIX):]: v for k, v in state.items() if k.startswith(TEXT_PREFIX)}
        if text_state and text_encoder_weights == "checkpoint":
            if not text_encoder.load_release_weights(text_state, source=str(weights)):
                warnings.warn(
                    f"TangoFlux: {weights} holds text-encoder tensors that {type(text_encoder).__name__} does not "
                    "take; its own weights are used", stacklevel=2,
                )
        del state
        vae = OobleckVAE.from_pretrained(path, config=vae_config)
        return cls(model, vae, text_encoder).to(device=device, dtype=dtype)

    # ------------------------------------------------------------------ generation
    def _check_request(self, prompt, duration, steps, guidance_scale, num_samples_per_prompt) -> list[str]:
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, Sequence) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"TangoFlux.generate: prompt must be a string or a non-empty list of strings, got {prompt!r:.80}")
        max_d = self.model.config.max_duration
        if isinstance(duration, bool) or not isinstance(duration, (int, float)) or not MIN_DURATION <= duration <= max_d:
            raise ValueError(f"TangoFlux.generate: duration must be a number of seconds in [{MIN_DURATION:g}, {max_d:g}], got {duration!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"TangoFlux.generate: steps must be a positive int, got {steps!r}")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale):
            raise ValueError(f"TangoFlux.generate: guidance_scale must be a finite number, got {guidance_scale!r}")
        if isinstance(num_samples_per_prompt, bool) or not isinstance(num_samples_per_prompt, int) or num_samples_per_prompt < 1:
            raise ValueError(f"TangoFlux.generate: num_samples_per_prompt must be a positive int, got {num_samples_per_prompt!r}")
        return list(prompts)

    def frames_for(self, duration: float) -> int:
        """Latent frames that hold ``int(duration * sample_rate)`` samples."""
        return math.ceil(int(duration * self.sample_rate) / self.vae.hop_length)

    @torch.no_grad()
    def generate_latents(
        self,
        prompt: str | list[str],
        *,
        duration: float = 10.0,
        steps: int = 25,
        guidance_scale: float = 4.5,
        num_samples_per_prompt: int = 1,
        generator: torch.Generator | None = None,
        scheduler: str = "euler",
        latents: torch.Tensor | None = None,
        latent_frames: str = "full",
        progress: bool = True,
        backend: str = "auto",
    ) -> torch.Tensor:
        """The sampling part of :meth:`generate`: returns latents [B, T, latent_channels] float32."""
        prompts = self._check_request(prompt, duration, steps, guidance_scale, num_samples_per_prompt)
        if latent_frames not in ("full", "duration"):
            raise ValueError(f"TangoFlux.generate: latent_frames must be 'full' or 'duration', got {latent_frames!r}")
        cfg, dev, n = self.model.config, self.device, num_samples_per_prompt
        B = len(prompts) * n
        T = cfg.audio_seq_len if latent_frames == "full" else min(cfg.audio_seq_len, self.frames_for(duration))
        shape = (B, T, cfg.in_channels)
        if latents is None:
            gdev = generator.device if generator is not None else torch.device("cpu")
            latents = torch.randn(shape, generator=generator, device=gdev, dtype=torch.float32)
        elif not isinstance(latents, torch.Tensor) or tuple(latents.shape) != shape:
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"TangoFlux.generate: latents must have shape {list(shape)} (prompts x samples, frames, channels), got {got}")
        latents = latents.to(device=dev, dtype=torch.float32)

        cfg_on = guidance_scale > 1.0  # the release's condition for classifier-free guidance
        states, mask = self.text_encoder.encode(prompts)
        lengths = mask.sum(1).tolist()
        groups: dict[int, list[int]] = {}
        for i in range(B):
            groups.setdefault(lengths[i // n], []).append(i)

        sched = flow_scheduler(scheduler)
        sched.set_timesteps(steps)
        calls = len(sched.timesteps)
        out = torch.empty_like(latents)
        from tqdm.auto import tqdm

        with tqdm(total=calls * len(groups), disable=not progress, desc="TangoFlux", unit="step") as bar:
            for L, items in groups.items():
                idx = torch.tensor(items, device=states.device)
                text, tmask = states[idx // n, :L], mask[idx // n, :L]
                if cfg_on:
                    u_states, u_mask = self.text_encoder.encode([""], length=L)
                    G = len(items)
                    text = torch.cat([u_states.expand(G, -1, -1), text])
                    tmask = torch.cat([u_mask.expand(G, -1), tmask])
                text, tmask = text.to(dev), tmask.to(dev)
                dur = torch.full((text.shape[0],), float(duration), device=dev)
                x = latents[idx.to(dev)]
                sched.set_timesteps(steps)
                for sigma in sched.model_sigmas():
                    x_in = torch.cat([x, x]) if cfg_on else x
                    v = self.model.velocity(x_in, sigma.to(dev), text, tmask, dur, backend=backend)
                    if cfg_on:
                        v_uncond, v_cond = v.chunk(2)
                        x = sched.step(v_cond, x, v_uncond=v_uncond, guidance_scale=guidance_scale, backend=backend)
                    else:
                        x = sched.step(v, x, backend=backend)
                    bar.update(1)
                out[idx.to(dev)] = x
        return out

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, duration: float, *, chunk_frames: int | None = None) -> torch.Tensor:
        """Latents [B, T, C] -> audio [B, channels, N] float32 with ``N = min(int(duration * sr), T * hop)``
        (the release's crop), decoding only the frames the crop keeps plus the receptive field."""
        T, hop = latents.shape[1], self.vae.hop_length
        keep = min(int(duration * self.sample_rate), T * hop)
        frames = min(T, math.ceil(keep / hop))
        z = latents.transpose(1, 2)
        wav = self.vae.decode(z, frames=(0, frames), chunk_frames=chunk_frames)
        return wav[..., :keep].float()

    def generate(
        self,
        prompt: str | list[str],
        *,
        duration: float = 10.0,
        steps: int = 25,
        guidance_scale: float = 4.5,
        num_samples_per_prompt: int = 1,
        generator: torch.Generator | None = None,
        scheduler: str = "euler",
        latents: torch.Tensor | None = None,
        latent_frames: str = "full",
        decode_chunk_frames: int | None = None,
        progress: bool = True,
        backend: str = "auto",
    ) -> torch.Tensor:
        """Text to audio.

        Args:
            prompt: a string or a list of strings; a batch gives the same audio as its items one by one.
            duration: seconds of audio to return, in [1, max_duration = 30].
            steps: sampler steps (model calls: ``steps`` for Euler, ``2 steps - 1`` for Heun).
            guidance_scale: classifier-free guidance weight; <= 1 disables guidance (one forward per step).
            num_samples_per_prompt: samples per prompt (output items ``[p0 s0, p0 s1, ..., p1 s0, ...]``).
            generator: random generator of the initial noise (``randn([B, T, C])``, in output order;
                a CPU generator seeded with s draws what the release draws after ``torch.manual_seed(s)``).
            scheduler: "euler" (the release) or "heun".
            latents: initial noise [B, T, C] instead of drawing it (T = 645 unless ``latent_frames="duration"``).
            latent_frames: "full" (the release: 645 frames, then crop) or "duration" (only the frames
                the duration needs: faster, but NOT the released behaviour: the model was trained on
                645-frame sequences, so the audio differs).
            decode_chunk_frames: decode at most this many latent frames at a time (bounded memory,
                same result).
            progress: show a progress bar (tqdm).
            backend: backend of the fused ops.

        Returns:
            [B, channels, N] float32 at :attr:`sample_rate` (44.1 kHz stereo for the release),
            ``N = int(duration * sample_rate)`` (at most 645 frames' worth, 29.95 s).
        """
        z = self.generate_latents(
            prompt, duration=duration, steps=steps, guidance_scale=guidance_scale,
            num_samples_per_prompt=num_samples_per_prompt, generator=generator, scheduler=scheduler,
            latents=latents, latent_frames=latent_frames, progress=progress, backend=backend,
        )
        return self.decode(z, duration, chunk_frames=decode_chunk_frames)

    def __call__(
        self,
        prompt: str | list[str],
        audio_length_in_s: float = 10.0,
        num_inference_steps: int = 25,
        guidance_scale: float = 4.5,
        num_waveforms_per_prompt: int = 1,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        return_dict: bool = True,
        **kwargs,
    ):
        """diffusers-style call (``StableAudioPipeline``'s argument names) -> ``AudioOutput`` or ``(audios,)``."""
        audios = self.generate(
            prompt, duration=audio_length_in_s, steps=num_inference_steps, guidance_scale=guidance_scale,
            num_samples_per_prompt=num_waveforms_per_prompt, generator=generator, latents=latents, **kwargs,
        )
        return AudioOutput(audios, self.sample_rate) if return_dict else (audios,)
