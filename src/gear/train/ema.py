"""Exponential moving average of a module's parameters (buffers are copied)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from gear.train.sharding import load_module_state


class EMA:
    """A frozen copy of ``model`` that tracks ``decay * ema + (1 - decay) * live`` after each update."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        live = dict(model.named_parameters())
        for name, shadow in self.module.named_parameters():
            shadow.lerp_(live[name].detach(), 1.0 - self.decay)
        live_buffers = dict(model.named_buffers())
        for name, shadow in self.module.named_buffers():
            shadow.copy_(live_buffers[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_module_state(self.module, state)  # full tensors, sharded first when the module is (FSDP)
