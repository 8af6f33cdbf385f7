"""The alignment targets of a batch: the frozen teacher's patch features, optionally cached per image."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gear.train.code_store import CodeStore


class TeacherTargets:
    """``targets(images, index)``: teacher features (B, L, D) in fp32, or None without a teacher.

    With ``cache`` (data without augmentation) each image's features are computed once and kept in fp16 on the
    CPU, keyed by its data-set index. With a ``store`` (``gear extract``) they are read from it by its batch keys."""

    def __init__(self, teacher: nn.Module | None, grid: int, device: torch.device, cache: bool,
                 store: CodeStore | None = None):
        self.teacher, self.grid, self.device, self.cache, self.store = teacher, grid, device, cache, store
        self.features: dict[int, Tensor] = {}

    @torch.no_grad()
    def __call__(self, images: Tensor, index: Tensor) -> Tensor | None:
        if self.teacher is None:
            return None
        if self.store is not None:
            return self.store.features_of(index).to(self.device)
        if not self.cache:
            return self.teacher(images, self.grid).float()
        keys = index.tolist()
        missing = [i for i, k in enumerate(keys) if k not in self.features]
        if missing:
            feats = self.teacher(images[missing], self.grid).float()
            for i, f in zip(missing, feats):
                self.features[keys[i]] = f.to(torch.float16).cpu()
        # widened before the stack: CPU autocast (bf16) cannot stack float16 tensors
        return torch.stack([self.features[k].float() for k in keys]).to(self.device)
