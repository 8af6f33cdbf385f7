"""Codebook usage statistics from token indices: how many codes are used and how evenly."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist


@dataclass
class CodebookStats:
    usage: float  # used_codes / codebook_size
    perplexity: float  # exp(entropy): the number of equally likely codes with the same entropy
    entropy: float  # of the empirical code distribution, in nats
    used_codes: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def stats_from_counts(counts: torch.Tensor) -> CodebookStats:
    """Statistics of a (K,) histogram of code occurrences."""
    if counts.ndim != 1 or counts.numel() == 0:
        raise ValueError(f"counts must be a non-empty (K,) histogram, got shape {tuple(counts.shape)}")
    counts = counts.detach().to("cpu", torch.float64)
    total = counts.sum()
    if total <= 0:
        raise ValueError("no indices counted yet: update the counter with at least one index batch first")
    p = counts[counts > 0] / total
    entropy = float(-(p * p.log()).sum())
    used = int((counts > 0).sum())
    return CodebookStats(usage=used / counts.numel(), perplexity=math.exp(entropy), entropy=entropy, used_codes=used)


def _histogram(indices: torch.Tensor, codebook_size: int) -> torch.Tensor:
    indices = torch.as_tensor(indices)
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise ValueError(f"indices must be an integer tensor of code ids, got dtype {indices.dtype}")
    flat = indices.reshape(-1).long()
    if flat.numel() and (flat.min() < 0 or flat.max() >= codebook_size):
        raise ValueError(f"indices must lie in [0, {codebook_size}), got [{int(flat.min())}, {int(flat.max())}]")
    return torch.bincount(flat, minlength=codebook_size)


def codebook_stats(indices: torch.Tensor, codebook_size: int) -> CodebookStats:
    """Statistics of all indices of any shape (e.g. (B, h, w) token grids over an evaluation set)."""
    if codebook_size < 1:
        raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
    return stats_from_counts(_histogram(indices, codebook_size))


class CodebookCounter:
    """Accumulates a code histogram over many batches (a whole evaluation, or a logging window).

    ``compute()`` sums the histogram over all processes when torch.distributed is initialized, so every
    rank reports the global usage; the local counts are left as they are, so ``compute()`` may be called
    any number of times. Every rank must call it (it is a collective).
    """

    def __init__(self, codebook_size: int) -> None:
        if codebook_size < 1:
            raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
        self.codebook_size = codebook_size
        self.counts: torch.Tensor | None = None  # lives on the device of the first batch (NCCL needs CUDA)

    @torch.no_grad()
    def update(self, indices: torch.Tensor) -> None:
        hist = _histogram(indices.detach(), self.codebook_size)
        self.counts = hist if self.counts is None else self.counts + hist.to(self.counts.device)

    def reset(self) -> None:
        self.counts = None

    def global_counts(self) -> torch.Tensor:
        counts = self.counts.clone() if self.counts is not None else torch.zeros(self.codebook_size, dtype=torch.int64)
        if dist.is_available() and dist.is_initialized():
            if dist.get_backend() == "nccl" and not counts.is_cuda:
                counts = counts.cuda()
            dist.all_reduce(counts)
        return counts

    def compute(self) -> CodebookStats:
        return stats_from_counts(self.global_counts())
