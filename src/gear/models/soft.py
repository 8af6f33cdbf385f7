"""GEAR's soft branch: the tokenizer's soft assignment over its K codes, as the frozen AR reads it.

Every quantizer returns ``d`` (B*L, K) such that ``softmax(-d / T)`` is its soft assignment (``soft_assignment``).
In the tokenizer update the AR takes that assignment instead of the hard tokens, so the alignment loss reaches the
encoder and codebook through ``d``. With ``top_k`` only the k nearest codes keep mass (``soft_tokens``); the sparse
form ``SparseSoft`` is what the AR embeds with a k-row lookup per token. ``soft_statistics`` measures how sharp the
assignment is. T is ``align.temperature``, checked > 0 where the config is validated (``gear.config.validate``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SparseSoft:
    """A soft assignment that is zero outside k codes per position: ``weights`` on the codes ``indices``.

    Equal as AR input to the dense (B, T, vocab) assignment that holds ``weights`` at ``indices`` and zeros
    elsewhere. Indexing slices the (B, T) dims of both, so ``soft[:, :-1]`` works as for a dense tensor.
    """

    indices: Tensor  # (B, T, k) int64
    weights: Tensor  # (B, T, k) float

    def __getitem__(self, key) -> SparseSoft:
        return SparseSoft(self.indices[key], self.weights[key])

    def to_dense(self, vocab_size: int) -> Tensor:
        """The (B, T, vocab_size) assignment; duplicate indices add up, as in the embedding."""
        dense = self.weights.new_zeros(*self.indices.shape[:-1], vocab_size)
        return dense.scatter_add(-1, self.indices, self.weights)


def soft_assignment(d: Tensor, temperature: float) -> Tensor:
    """``softmax(-d / temperature)`` over the codes (last dim)."""
    return torch.softmax(-d / temperature, dim=-1)


def soft_tokens(d: Tensor, temperature: float, top_k: int, batch: int, sparse: bool = False) -> Tensor | SparseSoft:
    """softmax(-d / T) of d (B*L, K) as (B, L, K); with 0 < top_k < K only the k nearest codes keep mass
    (renormalized over them), returned as a (B, L, k) ``SparseSoft`` when ``sparse``, else scattered to (B, L, K).

    The sparse form is what makes top-k cheap: its softmax runs over k codes, and the AR embeds it with a
    k-row lookup per token instead of a (B*L, K) x (K, dim) matmul. d's gradient is then nonzero on k codes only.
    """
    K = d.shape[-1]
    if not top_k or top_k >= K:
        return soft_assignment(d, temperature).view(batch, -1, K)
    nearest, idx = torch.topk(d, top_k, dim=-1, largest=False, sorted=False)  # no negated (B*L, K) copy of d
    probs = torch.softmax(nearest.float() / -temperature, dim=-1)
    if sparse:
        return SparseSoft(idx.view(batch, -1, top_k), probs.view(batch, -1, top_k))
    return torch.zeros_like(d, dtype=probs.dtype).scatter(-1, idx, probs).view(batch, -1, K)


def soft_statistics(d: Tensor, temperature: float) -> dict[str, Tensor]:
    """Entropy and top-1 mass of the full softmax(-d / T) (before any top-k truncation of the soft branch)."""
    logits = -d.float() / temperature
    # softmax rather than logp.exp(): exp is ~10x slower on the very negative logp of a sharp assignment
    logp, p = torch.log_softmax(logits, dim=-1), torch.softmax(logits, dim=-1)
    return {"soft/entropy": -(p * logp).sum(-1).mean(), "soft/top1": p.max(-1).values.mean()}
