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
        self._paired: nn.Module | None = None

    def _pair(self, model: nn.Module) -> None:
        """Match shadow and live tensors by name once, at the first update: by then FSDP has replaced the
        parameters of both modules with their shards."""
        live, live_buffers = dict(model.named_parameters()), dict(model.named_buffers())
        shadows = list(self.module.named_parameters())
        self._params = ([s for _, s in shadows], [live[name].detach() for name, _ in shadows])
        self._buffers = [(s, live_buffers[name]) for name, s in self.module.named_buffers()]
        self._paired = model

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        if self._paired is not model:
            self._pair(model)
        torch._foreach_lerp_(*self._params, 1.0 - self.decay)  # one fused call over all parameters
        for shadow, live in self._buffers:
            shadow.copy_(live)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_module_state(self.module, state)  # full tensors, sharded first when the module is (FSDP)
