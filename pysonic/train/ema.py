"""Exponential moving average of a model's weights (for evaluation and the released weights)."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """``avg = decay * avg + (1 - decay) * current`` after every optimizer step.

    The average is kept in fp32 in a separate copy of the module (``.module``), which is what
    sampling and the final weights use. Buffers that are not floating point are copied.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA: decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        current = model.state_dict()
        for name, avg in self.module.state_dict().items():
            src = current[name]
            if avg.is_floating_point():
                avg.lerp_(src.to(avg.dtype), 1.0 - self.decay)
            else:
                avg.copy_(src)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s weights with the average."""
        own = model.state_dict()
        for name, avg in self.module.state_dict().items():
            own[name].copy_(avg.to(own[name].dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "weights": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        self.module.load_state_dict(state["weights"])
