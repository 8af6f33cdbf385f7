"""PSNR and SSIM between image batches, per image and averaged over the batch.

SSIM follows Wang et al. (2004) as scikit-image computes it with ``gaussian_weights=True,
use_sample_covariance=False``: an 11-tap Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, each channel
on its own, the map averaged over the positions where the window fits inside the image.
For tokenizer evaluation, quantize both batches to uint8 first and pass ``data_range=255``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # int(3.5 * sigma + 0.5): the Gaussian is truncated at 3.5 sigma, giving 11 taps
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _as_batch(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if isinstance(x, np.ndarray) else x).detach().cpu().to(torch.float64)
    if t.ndim == 2:
        t = t[None, None]
    elif t.ndim == 3:
        t = t[None]
    if t.ndim != 4:
        raise ValueError(f"{name} must be (H, W), (C, H, W) or (N, C, H, W), got shape {tuple(t.shape)}")
    return t


def _pair(x, y) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _as_batch(x, "x"), _as_batch(y, "y")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    return x, y


def _check_range(data_range: float) -> None:
    if not (data_range > 0 and math.isfinite(data_range)):
        raise ValueError(f"data_range must be a positive number (255 for uint8, 2 for [-1, 1]), got {data_range}")


def psnr_per_image(x, y, data_range: float) -> np.ndarray:
    """10 log10(data_range^2 / MSE) for each image, (N,) float64; identical images give inf."""
    _check_range(data_range)
    x, y = _pair(x, y)
    mse = (x - y).pow(2).flatten(1).mean(1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(data_range**2 / mse.numpy())


def psnr(x, y, data_range: float) -> float:
    return float(psnr_per_image(x, y, data_range).mean())


def _gaussian_taps() -> torch.Tensor:
    offsets = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=torch.float64)
    taps = torch.exp(-0.5 * (offsets / SSIM_SIGMA) ** 2)
    return taps / taps.sum()


def _window_mean(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    # Separable Gaussian, "valid" positions only: the same values scikit-image keeps after it crops the border.
    x = F.conv2d(x, taps.view(1, 1, -1, 1))
    return F.conv2d(x, taps.view(1, 1, 1, -1))


def ssim_per_image(x, y, data_range: float) -> np.ndarray:
    """Mean SSIM over channels and window positions for each image, (N,) float64."""
    _check_range(data_range)
    x, y = _pair(x, y)
    n, c, h, w = x.shape
    size = 2 * SSIM_RADIUS + 1
    if h < size or w < size:
        raise ValueError(f"SSIM needs images of at least {size}x{size} pixels, got {h}x{w}")
    x, y = x.reshape(n * c, 1, h, w), y.reshape(n * c, 1, h, w)
    taps = _gaussian_taps()
    mu_x, mu_y = _window_mean(x, taps), _window_mean(y, taps)
    var_x = _window_mean(x * x, taps) - mu_x**2
    var_y = _window_mean(y * y, taps) - mu_y**2
    cov_xy = _window_mean(x * y, taps) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.reshape(n, -1).mean(1).numpy()


def ssim(x, y, data_range: float) -> float:
    return float(ssim_per_image(x, y, data_range).mean())
