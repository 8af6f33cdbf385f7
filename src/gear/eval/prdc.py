"""Improved precision and recall (Kynkaanniemi et al., 2019) with k-nearest-neighbour manifolds.

Each set's manifold is the union of balls around its points, each ball's radius the distance to that
point's k-th nearest neighbour within the set. Precision: the share of fake points inside the real
manifold. Recall: the share of real points inside the fake manifold.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

# Rows of a distance block are chunked so that one block holds at most this many float64 entries (128 MiB).
_BLOCK_ENTRIES = 2**24


class PrecisionRecall(NamedTuple):
    precision: float
    recall: float


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # |a|^2 + |b|^2 - 2ab in float64: one matrix product, accurate enough that a point's distance to
    # itself stays far below any neighbour radius.
    d2 = (a * a).sum(1, keepdim=True) + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return d2.clamp_min_(0.0)


def _rows_per_block(columns: int) -> int:
    return max(1, _BLOCK_ENTRIES // max(1, columns))


def knn_radii(features: torch.Tensor, k: int) -> torch.Tensor:
    """Squared distance from each point to its k-th nearest other point, (N,)."""
    n = len(features)
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, N) = [1, {n}) for a set of {n} points, got k={k}")
    radii = []
    step = _rows_per_block(n)
    for start in range(0, n, step):
        d2 = _squared_distances(features[start : start + step], features)
        # k + 1 smallest: the point itself is its own nearest neighbour at distance 0.
        radii.append(d2.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


def _coverage(manifold: torch.Tensor, radii: torch.Tensor, queries: torch.Tensor) -> float:
    """Share of ``queries`` within the radius of at least one manifold point."""
    inside = 0
    step = _rows_per_block(len(manifold))
    for start in range(0, len(queries), step):
        d2 = _squared_distances(queries[start : start + step], manifold)
        inside += int((d2 <= radii[None, :]).any(dim=1).sum())
    return inside / len(queries)


def precision_recall(real_features: np.ndarray, fake_features: np.ndarray, k: int = 3) -> PrecisionRecall:
    """Improved precision and recall of (N, D) fake features against (M, D) real features."""
    real = torch.as_tensor(np.asarray(real_features), dtype=torch.float64)
    fake = torch.as_tensor(np.asarray(fake_features), dtype=torch.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"expected real (M, D) and fake (N, D) features with one D, got {tuple(real.shape)} and {tuple(fake.shape)}")
    real_radii, fake_radii = knn_radii(real, k), knn_radii(fake, k)
    return PrecisionRecall(precision=_coverage(real, real_radii, fake), recall=_coverage(fake, fake_radii, real))
