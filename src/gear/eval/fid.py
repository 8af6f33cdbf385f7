"""Frechet distance between Gaussians fitted to feature sets, and cached reference statistics."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from gear.files import atomic_write


@dataclass
class FeatureStats:
    """Mean and covariance of ``n`` feature vectors; optionally the features themselves (float32), which
    precision/recall need and the Frechet distance does not."""

    mu: np.ndarray  # (D,)
    sigma: np.ndarray  # (D, D)
    n: int
    features: np.ndarray | None = None  # (n, D)

    def save(self, path: str | os.PathLike) -> Path:
        """Write an ``.npz`` (atomically: a crash leaves no half file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"mu": self.mu, "sigma": self.sigma, "n": np.array(self.n, dtype=np.int64)}
        if self.features is not None:
            arrays["features"] = self.features
        return atomic_write(path, lambda tmp: np.savez(tmp, **arrays), suffix=".npz")

    def frechet_distance(self, other: FeatureStats) -> float:
        """FID (or sFID, on spatial features) between this set and ``other``."""
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        try:
            with np.load(path, allow_pickle=False) as data:
                features = data["features"] if "features" in data.files else None
                return cls(mu=data["mu"], sigma=data["sigma"], n=int(data["n"]), features=features)
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"cannot read feature statistics from {path} ({err}); delete it and recompute") from None


def compute_stats(features: np.ndarray, keep_features: bool = False) -> FeatureStats:
    """Fit mean and (unbiased) covariance to (N, D) features, N >= 2."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {features.shape}")
    return FeatureStats(
        mu=features.mean(axis=0),
        sigma=np.cov(features, rowvar=False),
        n=len(features),
        features=features.astype(np.float32) if keep_features else None,
    )


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).

    Singular covariances (fewer samples than dimensions) need no offset on the eigenvalue route below.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"expected mu (D,) and sigma (D, D) for one D, got {mu1.shape}, {sigma1.shape}, {mu2.shape}, {sigma2.shape}"
        )
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2))


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((sigma1 sigma2)^(1/2)) for covariance matrices, via two symmetric eigendecompositions.

    sigma1 sigma2 is similar to the PSD matrix s1^(1/2) sigma2 s1^(1/2), so the trace of its square root is the
    sum of the square roots of that matrix's eigenvalues: exact, and ~10x faster than scipy.linalg.sqrtm at
    2048 dimensions. Tiny negative eigenvalues from round-off are clipped to zero.
    """
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    inner = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((inner + inner.T) / 2.0)
    return float(np.sqrt(np.clip(eig, 0.0, None)).sum())


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    return a.frechet_distance(b)


def stats_key(dataset: str, feature: str, num: int) -> str:
    """A cache key that names what the statistics depend on: data, feature extractor and sample count."""
    return f"{dataset}-{feature}-n{num}"


def cached_reference_stats(
    key: str, cache_dir: str | os.PathLike, compute_fn: Callable[[], FeatureStats]
) -> FeatureStats:
    """Load ``cache_dir/<key>.npz`` if present, else call ``compute_fn`` once and save its result there.

    ``key`` must identify the data set, the feature extractor and the sample count (see ``stats_key``):
    statistics computed with another extractor or count are not interchangeable.
    """
    if not key:
        raise ValueError("key must be a non-empty string such as stats_key('fmnist-test', 'inception', 10000)")
    # Readable file name plus a digest of the exact key, so two keys never share a file.
    digest = hashlib.sha1(key.encode()).hexdigest()[:8]
    path = Path(cache_dir) / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', key)}-{digest}.npz"
    if path.is_file():
        return FeatureStats.load(path)
    stats = compute_fn()
    if not isinstance(stats, FeatureStats):
        raise ValueError(f"compute_fn must return a FeatureStats, got {type(stats).__name__}")
    stats.save(path)
    return stats
