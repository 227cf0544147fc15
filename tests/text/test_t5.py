"""The TextEncoder interface and the local-only T5 encoder (tiny T5 built here, no hub)."""
from __future__ import annotations

import pytest
import torch

from pysonic.checkpoints import CheckpointError
from pysonic.text import T5TextEncoder, TextEncoder
from tests.models.tangoflux.release import shared_release


@pytest.fixture(scope="module")
def enc(tmp_path_factory):
    _, t5, _, _ = shared_release(tmp_path_factory)
    return T5TextEncoder(t5)


def test_encode_matches_transformers(enc):
    from transformers import AutoTokenizer, T5EncoderModel

    tok = AutoTokenizer.from_pretrained(str(enc.path))
    model = T5EncoderModel.from_pretrained(str(enc.path)).eval()
    prompts = ["rain", "a bird singing on the roof"]
    states, mask = enc.encode(prompts)
    batch = tok(prompts, padding=True, truncation=True, max_length=512, return_tensors="pt")
    with torch.no_grad():
        ref = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)[0]
    assert mask.dtype == torch.bool and mask.tolist() == (batch.attention_mask == 1).tolist()
    torch.testing.assert_close(states, ref, rtol=0, atol=1e-6)
    assert states.shape == (2, 8, enc.dim) and mask.sum(1).tolist() == [2, 8]  # rain </s>; a bird sing ing on the roof </s>


def test_length_and_max_length(enc, tmp_path_factory):
    s, m = enc.encode([""], length=5)  # TangoFlux's unconditional input: </s> then padding
    assert s.shape == (1, 5, enc.dim) and m.tolist() == [[True, False, False, False, False]]
    s, m = enc.encode("a bird singing on the roof", length=3)  # truncated (keeps </s>)
    assert m.shape == (1, 3) and m.all()
    short = T5TextEncoder(enc.path, max_length=4)
    assert short.encode(["a bird singing on the roof loudly"])[0].shape[1] == 4


def test_errors(enc, tmp_path):
    with pytest.raises(TypeError, match="prompts"):
        enc.encode(3)
    with pytest.raises(TypeError, match="every prompt"):
        enc.encode(["a", None])
    with pytest.raises(ValueError, match="empty list"):
        enc.encode([])
    with pytest.raises(ValueError, match="length"):
        enc.encode(["a"], length=0)
    with pytest.raises(FileNotFoundError, match="not found"):
        T5TextEncoder(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="config.json"):
        T5TextEncoder(tmp_path)
    with pytest.raises(CheckpointError, match="shared.weight"):
        enc.load_release_weights({"shared.weight": torch.zeros(3, 3)})
    assert isinstance(enc, TextEncoder) and enc.device == torch.device("cpu")
    assert TextEncoder().load_release_weights({}) is False
