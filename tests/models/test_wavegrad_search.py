"""WaveGrad noise-schedule search: candidate grids, scoring, worker processes, files, shipped schedules."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pysonic.models.wavegrad import WaveGrad, fibonacci_betas
from pysonic.models.wavegrad import search as S
from pysonic.models.wavegrad.vocoder import PACKAGED_SCHEDULES, SCHEDULE_FILE

DATA = Path(__file__).resolve().parents[1] / "data" / "wavegrad" / "ivanvovk_small"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py


@pytest.fixture(scope="module")
def small():
    return WaveGrad.from_pretrained(DATA)  # n_mels 10, hop 30 (ivanvovk layout), random weights


def _audio(n=2, seconds_hops=12, hop=30):
    t = torch.arange(seconds_hops * hop, dtype=torch.float32) / 22050
    freqs = torch.tensor([220.0, 330.0])[:n, None]
    return 0.5 * torch.sin(2 * math.pi * freqs * t)


def test_grid_candidates_cover_every_multiplier_of_the_last_step():
    cands = S.grid_candidates(4, (1e-4, 1e-1), max_candidates=200)
    assert 150 <= len(cands) <= 200 and all(len(c) == 4 for c in cands)
    bases = [1e-4 * 1000 ** (k / 3) for k in range(4)]
    for c in cands:  # each beta is an integer multiple (1..9) of its step's base
        for b, base in zip(c, bases):
            assert round(b / base) in range(1, 10) and b / base == pytest.approx(round(b / base))
    assert {round(c[-1] / bases[-1]) for c in cands} == set(range(1, 10))
    assert len(S.grid_candidates(2, (1e-3, 1e-2))) == 81  # the full grid when it fits
    with pytest.raises(ValueError, match="betas_range"):
        S.grid_candidates(3, (0.0, 0.1))


def test_fibonacci_and_linear_candidates():
    fib = S.fibonacci_candidates(25)
    for c in fib:
        assert all(c[k] == pytest.approx(c[k - 1] + c[k - 2]) for k in range(2, 25)) and max(c) < 1
    assert fibonacci_betas(25).tolist() in [pytest.approx(c) for c in fib]  # the original's schedule is a candidate
    lin = S.linear_candidates(50)
    assert lin and all(len(c) == 50 and 0 < c[0] < c[-1] < 1 for c in lin)
    assert S.refine_candidates([0.1, 0.6], factors=(0.5, 2.0)) == [[0.05, 0.6], [0.2, 0.6], [0.1, 0.3]]


def test_search_picks_the_best_candidate_and_workers_agree(small):
    audio = _audio()
    cands = [[1e-4, 1e-3, 1e-2], [1e-3, 0.05, 0.5], [1e-5, 1e-2, 0.2], [5e-4, 0.02, 0.7]]
    best1, scores1 = S.search_schedule(small, None, audio, 3, candidates=cands, refine_rounds=0, workers=1,
                                       progress=False, return_scores=True)
    best2, scores2 = S.search_schedule(small, None, audio, 3, candidates=cands, refine_rounds=0, workers=2,
                                       progress=True, return_scores=True)
    assert len(scores1) == len(cands)
    assert [s for _, s in scores1] == sorted(s for _, s in scores1)
    # Same noise in every process: the two runs score every candidate identically.
    assert dict((tuple(b), s) for b, s in scores1) == pytest.approx(dict((tuple(b), s) for b, s in scores2))
    assert best1.tolist() == best2.tolist() == scores1[0][0]
    # The returned score is what generate + spectral_distance give for those betas.
    mels = small.mel(audio)
    wav = small.generate(mels, 3, best1, generator=torch.Generator().manual_seed(0))
    assert S.spectral_distance(small, wav, small.mel(audio)) == pytest.approx(scores1[0][1])


def test_refinement_never_worsens_the_best(small):
    audio = _audio(1)
    start = [[1e-3, 0.05, 0.4]]
    base = S.search_schedule(small, None, audio, 3, candidates=start, refine_rounds=0, progress=False, return_scores=True)
    refined = S.search_schedule(small, None, audio, 3, candidates=start, refine_rounds=1, progress=False, return_scores=True)
    assert len(refined[1]) == 1 + 12  # the start plus 3 betas x 4 factors
    assert refined[1][0][1] <= base[1][0][1]


def test_search_bad_input(small):
    audio = _audio()
    with pytest.raises(ValueError, match="has 2 betas, expected iterations=3"):
        S.search_schedule(small, None, audio, 3, candidates=[[0.1, 0.2]], progress=False)
    with pytest.raises(ValueError, match=r"open interval \(0, 1\)"):
        S.search_schedule(small, None, audio, 2, candidates=[[0.1, 1.5]], progress=False)
    with pytest.raises(ValueError, match="iterations"):
        S.search_schedule(small, None, audio, 0, progress=False)
    with pytest.raises(ValueError, match="1 mels but 2 audio"):
        S.search_schedule(small, small.mel(audio[:1]), audio, 2, candidates=[[0.1, 0.5]], progress=False)


def test_schedule_files_roundtrip_and_drive_generate(small, tmp_path):
    betas = torch.tensor([1e-4, 0.01, 0.3], dtype=torch.float64)
    S.save_schedule(tmp_path / "s.json", betas, searched_with="test")
    loaded = S.load_schedule(tmp_path / "s.json")
    assert loaded.tolist() == betas.tolist()
    assert json.loads((tmp_path / "s.json").read_text())["searched_with"] == "test"
    import numpy as np

    np.save(tmp_path / "s.npy", betas.numpy())
    assert S.load_schedule(tmp_path / "s.npy").tolist() == betas.tolist()
    mel = torch.randn(1, 10, 3)
    a = small.generate(mel, 3, loaded, generator=torch.Generator().manual_seed(1))
    b = small.generate(mel, 3, betas.tolist(), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    (tmp_path / "bad.json").write_text(json.dumps({"betas": [0.1, -0.2]}))
    with pytest.raises(ValueError, match="open interval"):
        S.load_schedule(tmp_path / "bad.json")


def test_shipped_schedules(small):
    obj = json.loads(SCHEDULE_FILE.read_text())
    assert sorted(PACKAGED_SCHEDULES) == [6, 7, 12, 25, 50, 100, 1000]
    for n, betas in PACKAGED_SCHEDULES.items():
        assert len(betas) == n and all(0 < b < 1 for b in betas)
        entry = obj["schedules"][str(n)]
        assert entry["searched_with"] and "score" in entry  # how each was produced is recorded
    # schedule=None takes the shipped one; other counts are a clear error.
    torch.testing.assert_close(small.resolve_schedule(6), torch.tensor(PACKAGED_SCHEDULES[6], dtype=torch.float64))
    with pytest.raises(ValueError, match="no noise schedule for 9 iterations"):
        small.resolve_schedule(9)
