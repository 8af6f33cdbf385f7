"""What the trainer logs every train.log_every steps: the step metrics since the last log, averaged over steps and
processes, and how the codebook was used."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gear.train.distributed import all_reduce_mean, all_reduce_sum


class LogWindow:
    def __init__(self, codebook_size: int, device: torch.device):
        self.usage = torch.zeros(codebook_size, dtype=torch.long, device=device)  # codes of the applied steps
        self.last_batch = torch.zeros_like(self.usage)  # codes of the latest step's batch, applied or skipped
        self.values: dict[str, list[Tensor]] = {}

    def codes(self, indices: Tensor) -> Tensor:
        """How often each code occurs in ``indices``."""
        return torch.bincount(indices.flatten(), minlength=self.usage.numel())

    def add(self, batch_counts: Tensor, step_metrics: list[dict[str, Tensor]]) -> None:
        """An applied step: its codes and its metrics (one dict per micro-batch)."""
        self.usage += batch_counts
        for metrics in step_metrics:
            for k, v in metrics.items():
                self.values.setdefault(k, []).append(v.float())

    def close(self) -> dict[str, float]:
        """The window's means (every process must call it) and codebook usage; the next window starts empty."""
        batch_counts = all_reduce_sum(self.last_batch.clone())
        window_counts = all_reduce_sum(self.usage.clone())
        self.usage.zero_()
        metrics = {k: all_reduce_mean(torch.stack(v).mean()).item() for k, v in self.values.items()}
        self.values = {}
        metrics["codebook/usage_batch"] = (batch_counts > 0).float().mean().item()
        metrics["codebook/usage_window"] = (window_counts > 0).float().mean().item()
        p = window_counts.float() / window_counts.sum().clamp_min(1)
        metrics["codebook/perplexity"] = math.exp(-(p[p > 0] * p[p > 0].log()).sum().item())
        return metrics
