"""Small pieces shared by several test files."""

from __future__ import annotations

import dataclasses

import torch

from gear.config import load_config
from gear.train.steps import StepConfig


class FixedTeacher(torch.nn.Module):
    """A frozen random patch embedding: enough to give the alignment loss a target of the right shape."""

    feature_dim = 24

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Conv2d(3, self.feature_dim, 4, stride=4).requires_grad_(False)

    def forward(self, images, grid):
        return self.proj(images).flatten(2).transpose(1, 2)


def step_cfg(**changes) -> StepConfig:
    """The default config's step settings (no perceptual loss, no GAN: the routing of the other terms is tested)."""
    base = StepConfig.from_config(load_config(None), tap_layer=2, class_dropout=0.1)
    return dataclasses.replace(base, **{"perceptual_weight": 0.0, "gan_weight": 0.0, **changes})
