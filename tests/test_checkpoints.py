"""Safe checkpoint reading and strict loading."""
import pytest
import torch
from safetensors.torch import save_file

from pysonic.checkpoints import CheckpointError, load_into, read_state_dict


def test_read_safetensors_and_torch(tmp_path):
    model = torch.nn.Linear(3, 2)
    save_file(model.state_dict(), str(tmp_path / "m.safetensors"))
    torch.save({"model": model.state_dict()}, tmp_path / "m.pt")
    a = read_state_dict(tmp_path / "m.safetensors")
    b = read_state_dict(tmp_path / "m.pt", key="model")
    for k, v in model.state_dict().items():
        assert torch.equal(a[k], v) and torch.equal(b[k], v)
    other = torch.nn.Linear(3, 2)
    load_into(other, b)
    assert torch.equal(other.weight, model.weight)


class NotATensor:  # any class: unpickling it would run code from the file's author
    pass


def test_refuses_arbitrary_pickles(tmp_path):
    torch.save({"model": NotATensor()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights-only"):
        read_state_dict(tmp_path / "evil.pt", key="model")


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "nope.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="cannot read"):
        read_state_dict(tmp_path / "bad.safetensors")
    torch.save({"net": {}}, tmp_path / "wrapped.pt")
    with pytest.raises(CheckpointError, match="'model'"):
        read_state_dict(tmp_path / "wrapped.pt", key="model")
    model = torch.nn.Linear(3, 2)
    state = dict(model.state_dict())
    with pytest.raises(CheckpointError, match="missing tensors: \\['bias'\\]"):
        load_into(model, {"weight": state["weight"]})
    with pytest.raises(CheckpointError, match="unexpected tensors: \\['extra'\\]"):
        load_into(model, {**state, "extra": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="weight: checkpoint \\(2, 4\\)"):
        load_into(model, {**state, "weight": torch.zeros(2, 4)})
