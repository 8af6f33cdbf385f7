"""The alignment targets of a batch: the frozen teacher's patch features, optionally cached per image."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TeacherTargets:
    """``targets(images, index)``: teacher features (B, L, D) in fp32, or None without a teacher.

    With ``cache`` (data without augmentation) each image's features are computed once and kept in fp16 on the
    CPU, keyed by its data-set index."""

    def __init__(self, teacher: nn.Module | None, grid: int, device: torch.device, cache: bool):
        self.teacher, self.grid, self.device, self.cache = teacher, grid, device, cache
        self.features: dict[int, Tensor] = {}

    @torch.no_grad()
    def __call__(self, images: Tensor, index: Tensor) -> Tensor | None:
        if self.teacher is None:
            return None
        if not self.cache:
            return self.teacher(images, self.grid).float()
        keys = index.tolist()
        missing = [i for i, k in enumerate(keys) if k not in self.features]
        if missing:
            feats = self.teacher(images[missing], self.grid).float()
            for i, f in zip(missing, feats):
                self.features[keys[i]] = f.to(torch.float16).cpu()
        return torch.stack([self.features[k] for k in keys]).to(self.device, torch.float32)
