"""Captions -> TextCondition for training and sampling: the run's encoder, its feature cache and the empty caption."""

from __future__ import annotations

import torch

from gear.models.gpt_t2i import TextCondition
from gear.text.cache import load_or_build
from gear.text.encoders import TextEncoder


class TextConditioner:
    """``conditioner(captions)`` -> TextCondition (on the CPU): looked up in the on-disk feature cache when the data
    set lists its captions up front (``text.cache``), else encoded with the frozen encoder every call."""

    def __init__(self, cfg, captions: list[str] | None = None, device: str | torch.device = "cpu"):
        self.cfg = cfg
        self.encoder = TextEncoder(cfg.encoder, cfg.encoder_path, cfg.max_length, device=device)
        self.null = self.encoder.encode([""], warn=False)  # the caption-dropout and CFG null condition
        self.cache = None
        if cfg.cache:
            if captions is None:
                raise ValueError("text.cache=true needs a data set that lists its captions up front "
                                 "(fashion-mnist-captions, jsonl); for webdataset shards set text.cache=false")
            self.cache = load_or_build(self.encoder, captions, cfg.cache_dir or None)

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def __call__(self, captions) -> TextCondition:
        captions = list(captions)
        if self.cache is not None and all(c in self.cache.index for c in captions):
            return self.cache.lookup(captions)
        return self.encoder.encode(captions)


def grid_prompts(cfg, dataset) -> list[str]:
    """Captions for the training-time sample grids: text.prompts, else the data set's demo prompts or first captions."""
    if cfg.text.prompts:
        return list(cfg.text.prompts)
    if hasattr(dataset, "demo_prompts"):
        return dataset.demo_prompts()
    captions = getattr(dataset, "captions", None)
    if captions:
        return list(captions[:8])
    return [sample.caption for _, sample in zip(range(8), iter(dataset))]
