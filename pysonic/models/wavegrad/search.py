"""Noise-schedule search for few-iteration WaveGrad sampling.

WaveGrad is trained on 1000 linear betas but samples well in 6 iterations once the betas of the
short schedule are chosen for the trained network (Chen et al., 2020, section 4; ivanvovk/WaveGrad
README, "Noise schedule grid search"). :func:`search_schedule` scores candidate schedules by
generating audio from the mels of ground-truth recordings and measuring the spectral distance of
the result to them; the best candidate wins. Candidates come from:

* :func:`grid_candidates` (few iterations): ``beta_k = m_k * 10 ** e_k`` with exponents ``e_k``
  evenly spaced over ``log10(betas_range)`` and a multiplier ``m_k`` in 1..9 per step: a 9-ary
  grid over every step's beta, walked with an even stride when it has more points than the budget.
* :func:`fibonacci_candidates` (25 or so iterations): Fibonacci-sequence schedules
  (:func:`~pysonic.models.wavegrad.schedules.fibonacci_betas`) over a grid of starting pairs; the
  original starts from ``(1e-6, 9e-6)``.
* :func:`linear_candidates` (many iterations): linear betas over a grid of end points.

``refine`` then rescales one beta at a time around the best schedule (the "by hand" refinement the
original describes). Candidates run in parallel worker processes (each builds the model from its
weights and uses ``threads_per_worker`` threads); every candidate sees the same starting and step
noise, so scores differ only by schedule.

Schedules save and load as JSON (:func:`save_schedule`, :func:`load_schedule`) and pass to
``WaveGrad.generate(schedule=...)``.
"""
from __future__ import annotations

import json
import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterable, Sequence

import torch

from pysonic.models.wavegrad.schedules import fibonacci_betas, linear_betas
from pysonic.models.wavegrad.vocoder import WaveGrad, check_betas

_LOG10_FLOOR = -5.0  # log10-mel floor of the distance: silence is not allowed to dominate it


# ------------------------------------------------------------------------------- candidates

def grid_candidates(iterations: int, betas_range: tuple[float, float] = (1e-6, 1e-1), *,
                    multipliers: Sequence[int] = tuple(range(1, 10)), max_candidates: int = 2000) -> list[list[float]]:
    """Multiplier-grid schedules: ``beta_k = multipliers[j_k] * base_k``.

    ``base_k`` runs geometrically from ``betas_range[0]`` to ``betas_range[1]`` over the steps. The
    full grid has ``len(multipliers) ** iterations`` points; when that exceeds ``max_candidates``,
    points are taken at an even stride through its lexicographic order (so every step's multiplier
    still takes every value). Schedules with a beta >= 1 are dropped.
    """
    if iterations < 1:
        raise ValueError(f"grid_candidates: iterations must be >= 1, got {iterations}")
    lo, hi = betas_range
    if not 0 < lo <= hi < 1:
        raise ValueError(f"grid_candidates: betas_range must satisfy 0 < low <= high < 1, got {betas_range}")
    if iterations == 1:
        bases = [hi]
    else:
        bases = [lo * (hi / lo) ** (k / (iterations - 1)) for k in range(iterations)]
    m = len(multipliers)
    total = m ** iterations
    count = min(total, max_candidates)
    out = []
    for i in range(count):
        index = (i * total) // count  # even stride through the grid
        digits = []
        for _ in range(iterations):
            index, d = divmod(index, m)
            digits.append(d)
        # digits come least significant first: the last (largest) beta varies slowest, so the
        # coarse walk sweeps the betas that set the starting noise level.
        betas = [multipliers[d] * b for d, b in zip(digits, bases)]
        if max(betas) < 1:
            out.append(betas)
    return out


def fibonacci_candidates(iterations: int, firsts: Iterable[float] = (1e-7, 3e-7, 1e-6, 3e-6, 1e-5),
                         ratios: Iterable[float] = (3.0, 6.0, 9.0, 15.0)) -> list[list[float]]:
    """Fibonacci schedules ``b[k] = b[k-1] + b[k-2]`` from ``(first, first * ratio)``; the original's
    default is ``first=1e-6, ratio=9``. Starting pairs whose sequence reaches 1 are skipped."""
    out = []
    for first in firsts:
        for ratio in ratios:
            try:
                out.append(fibonacci_betas(iterations, first, first * ratio).tolist())
            except ValueError:
                continue
    return out


def linear_candidates(iterations: int, starts: Iterable[float] = (1e-6, 1e-5, 1e-4),
                      ends: Iterable[float] | None = None) -> list[list[float]]:
    """Linear schedules from each start to each end (default ends: 12 values from 0.01 * 1000 /
    iterations up to 0.9, log-spaced), keeping those with ``start < end < 1``."""
    if ends is None:
        first = min(0.5, 0.01 * 1000 / iterations)
        ends = torch.logspace(math.log10(first), math.log10(0.9), 12, dtype=torch.float64).tolist()
    return [linear_betas(iterations, s, e).tolist() for s in starts for e in ends if s < e < 1]


def default_candidates(iterations: int) -> list[list[float]]:
    """The multiplier grid for up to 12 iterations, Fibonacci starts while they fit, else linear."""
    if iterations <= 12:
        return grid_candidates(iterations)
    fib = fibonacci_candidates(iterations)
    return fib if len(fib) >= 8 else linear_candidates(iterations)


def refine_candidates(betas: Sequence[float], factors: Sequence[float] = (0.5, 0.7, 1.4, 2.0)) -> list[list[float]]:
    """Schedules that differ from ``betas`` in one beta, multiplied by one of ``factors`` (kept in (0, 1))."""
    out = []
    for k in range(len(betas)):
        for f in factors:
            b = list(betas)
            b[k] = b[k] * f
            if 0 < b[k] < 1:
                out.append(b)
    return out


# ------------------------------------------------------------------------------- scoring

def spectral_distance(model: WaveGrad, wav: torch.Tensor, reference_mel: torch.Tensor) -> float:
    """Mean absolute difference between the model's log-mel of ``wav`` and ``reference_mel``.

    With the log10 front end (ivanvovk) both sides are floored at log10(1e-5) first.
    """
    mel = model.mel(wav)
    frames = min(mel.shape[-1], reference_mel.shape[-1])
    a, b = mel[..., :frames], reference_mel[..., :frames]
    if model.config.mel.compression == "log10":
        a, b = a.clamp(min=_LOG10_FLOOR), b.clamp(min=_LOG10_FLOOR)
    return float((a - b).abs().mean())


class _Scorer:
    """Scores schedules for one model and one batch of mels with fixed noise."""

    def __init__(self, model: WaveGrad, mels: torch.Tensor, target_mel: torch.Tensor, seed: int):
        self.model, self.mels, self.target_mel, self.seed = model, mels, target_mel, seed

    def __call__(self, betas: Sequence[float]) -> float:
        generator = torch.Generator().manual_seed(self.seed)
        wav = self.model.generate(self.mels, len(betas), list(betas), generator=generator)
        score = spectral_distance(self.model, wav, self.target_mel)
        return score if math.isfinite(score) else math.inf


_WORKER: dict = {}


def _worker_init(config: dict, state: dict, mels, target_mel, seed: int, threads: int) -> None:
    from pysonic.models.wavegrad.config import WaveGradConfig

    torch.set_num_threads(threads)
    model = WaveGrad(WaveGradConfig.from_dict(config))
    model.net.load_state_dict(state)
    _WORKER["scorer"] = _Scorer(model.eval(), mels, target_mel, seed)


def _worker_score(betas):
    return _WORKER["scorer"](betas)


def _score_all(scorer: _Scorer, candidates: list[list[float]], pool, progress: bool, desc: str) -> list[float]:
    if pool is None:
        results: Iterable[float] = map(scorer, candidates)
    else:
        results = pool.map(_worker_score, candidates, chunksize=max(1, min(16, len(candidates) // (8 * pool._max_workers) or 1)))
    if progress:
        from tqdm import tqdm

        results = tqdm(results, total=len(candidates), desc=desc)
    return list(results)


def search_schedule(
    model: WaveGrad,
    mels: torch.Tensor | None,
    audio: torch.Tensor,
    iterations: int = 6,
    *,
    candidates: Sequence[Sequence[float]] | None = None,
    refine_rounds: int = 1,
    workers: int = 1,
    threads_per_worker: int = 1,
    seed: int = 0,
    progress: bool = True,
    return_scores: bool = False,
    start_method: str | None = None,
):
    """Find the betas for ``iterations`` sampler steps that best resynthesise ``audio``.

    Args:
        model: a (trained) :class:`WaveGrad`.
        mels: conditioning mels [B, n_mels, T], or None to compute them from ``audio`` with the
            model's front end.
        audio: ground-truth waveforms [B, T * hop] (or [T * hop]) in [-1, 1] that ``mels`` describe.
        iterations: number of sampler steps of the schedule.
        candidates: schedules to try (each of length ``iterations``); default
            :func:`default_candidates`.
        refine_rounds: rounds of :func:`refine_candidates` around the best schedule so far.
        workers: worker processes (1: run in this process).
        threads_per_worker: torch threads in each worker.
        seed: seed of the sampler noise, the same for every candidate.
        progress: show a tqdm progress bar.
        return_scores: also return every (betas, distance) tried, best first.
        start_method: how worker processes start: "fork", "spawn" or "forkserver". Default: "fork"
            when ``threads_per_worker == 1`` (quick: workers inherit the loaded modules), else
            "spawn": a forked child that runs OpenMP with several threads after its parent used
            OpenMP deadlocks in GNU libgomp (seen here: 2 threads per forked worker hang).

    Returns:
        The best betas, float64 [iterations] (and the scores when ``return_scores``).

    Raises:
        ValueError: bad shapes, a candidate of the wrong length or with betas outside (0, 1).
    """
    where = "search_schedule"
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"{where}: iterations must be a positive int, got {iterations!r}")
    if not isinstance(audio, torch.Tensor) or not audio.is_floating_point():
        raise TypeError(f"{where}: audio must be a floating-point tensor [B, N]")
    audio = audio.detach().to("cpu", torch.float32)
    if audio.dim() == 1:
        audio = audio[None]
    if audio.dim() != 2 or audio.shape[-1] < model.hop_length:
        raise ValueError(f"{where}: audio must be [B, N] with N >= hop length {model.hop_length}, got {tuple(audio.shape)}")
    if mels is None:
        usable = audio.shape[-1] // model.hop_length * model.hop_length
        audio = audio[:, :usable]
        mels = model.mel(audio)
        if not model.config.mel.drop_last_frame:
            mels = mels[..., : usable // model.hop_length]
    mels = model._check_mel(mels.detach().to("cpu", torch.float32))
    if mels.shape[0] != audio.shape[0]:
        raise ValueError(f"{where}: {mels.shape[0]} mels but {audio.shape[0]} audio clips")
    target_mel = model.mel(audio)
    if workers < 1 or threads_per_worker < 1:
        raise ValueError(f"{where}: workers and threads_per_worker must be >= 1, got {workers}, {threads_per_worker}")
    cands = [list(map(float, c)) for c in (default_candidates(iterations) if candidates is None else candidates)]
    if not cands:
        raise ValueError(f"{where}: no candidate schedules")
    for c in cands:
        if len(c) != iterations:
            raise ValueError(f"{where}: candidate {c[:3]}... has {len(c)} betas, expected iterations={iterations}")
        check_betas(c, where=where)

    model = model.eval()
    scorer = _Scorer(model, mels, target_mel, seed)
    scores: dict[tuple, float] = {}
    pool = None
    if workers > 1:
        state = {k: v.detach().cpu() for k, v in model.net.state_dict().items()}
        if start_method is None:
            forkable = "fork" in multiprocessing.get_all_start_methods() and threads_per_worker == 1
            start_method = "fork" if forkable else "spawn"
        pool = ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context(start_method), initializer=_worker_init,
            initargs=(model.config.to_dict(), state, mels, target_mel, seed, threads_per_worker),
        )
    try:
        todo, desc = cands, f"schedule search ({iterations} iterations)"
        for round_ in range(refine_rounds + 1):
            todo = [c for c in dict.fromkeys(map(tuple, todo)) if c not in scores]
            for c, s in zip(todo, _score_all(scorer, [list(c) for c in todo], pool, progress, desc)):
                scores[c] = s
            if round_ < refine_rounds:
                best = min(scores, key=scores.get)
                todo, desc = refine_candidates(best), f"refine {round_ + 1}/{refine_rounds}"
    finally:
        if pool is not None:
            pool.shutdown()
    ranked = sorted(scores.items(), key=lambda kv: kv[1])
    if not math.isfinite(ranked[0][1]):
        raise RuntimeError(f"{where}: every candidate produced non-finite audio")
    best = torch.tensor(ranked[0][0], dtype=torch.float64)
    if return_scores:
        return best, [(list(b), s) for b, s in ranked]
    return best


# ------------------------------------------------------------------------------- files

def save_schedule(path: str | Path, betas, **metadata) -> None:
    """Write ``{"betas": [...], **metadata}`` as JSON (metadata: how it was searched, the score...)."""
    b = check_betas(betas, where="save_schedule")
    Path(path).write_text(json.dumps({"betas": b.tolist(), **metadata}, indent=1) + "\n")


def load_schedule(path: str | Path) -> torch.Tensor:
    """Read betas from a JSON file of :func:`save_schedule` (or a bare list), a ``.npy`` or a ``.pt`` file."""
    path = Path(path)
    if path.suffix == ".npy":
        import numpy as np

        return check_betas(torch.from_numpy(np.load(path)), where=f"load_schedule({path})")
    if path.suffix == ".pt":
        return check_betas(torch.load(path, weights_only=True), where=f"load_schedule({path})")
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"load_schedule: {path} is not JSON: {exc}") from exc
    betas = obj["betas"] if isinstance(obj, dict) and "betas" in obj else obj
    return check_betas(betas, where=f"load_schedule({path})")
