"""REPA: a small MLP projects the generator's hidden states into the teacher's feature space, and the loss is
minus the cosine similarity between projection and teacher feature, averaged over batch and tokens."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class Projector(nn.Module):
    """Linear(in, hidden) - SiLU - Linear(hidden, hidden) - SiLU - Linear(hidden, out), applied per token."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048) -> None:
        super().__init__()
        if min(in_dim, out_dim, hidden_dim) < 1:
            raise ValueError(f"Projector dims must be >= 1, got in={in_dim} out={out_dim} hidden={hidden_dim}")
        self.in_dim, self.out_dim = in_dim, out_dim
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, hidden: Tensor) -> Tensor:
        if hidden.shape[-1] != self.in_dim:
            raise ValueError(f"Projector expects (..., {self.in_dim}) hidden states, got {tuple(hidden.shape)}")
        return self.net(hidden)


def repa_loss(hidden: Tensor, target: Tensor) -> Tensor:
    """Mean over batch and tokens of -cos(hidden, target); both (B, L, D). The target gets no gradient."""
    if hidden.ndim != 3 or hidden.shape != target.shape:
        raise ValueError(
            f"repa_loss expects projected hidden states and teacher features of the same shape (B, L, D), "
            f"got {tuple(hidden.shape)} and {tuple(target.shape)}; check the grid and the projector's out_dim"
        )
    cos = F.cosine_similarity(hidden.float(), target.detach().float(), dim=-1, eps=1e-6)
    return -cos.mean()
