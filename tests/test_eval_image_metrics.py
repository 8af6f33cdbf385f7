import math

import numpy as np
import pytest
import torch

from gear.eval.image_metrics import psnr, psnr_per_image, ssim, ssim_per_image


def naive_ssim(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    """SSIM of one (H, W) channel with an explicit 11x11 Gaussian window, position by position."""
    t = np.arange(-5, 6)
    g = np.exp(-(t**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            a, b = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
            cov = (w * (a - ma) * (b - mb)).sum()
            values.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


@pytest.fixture
def pair():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(2, 3, 14, 13)).astype(np.float64)
    y = np.clip(x + rng.normal(0, 25, size=x.shape), 0, 255)
    return x, y


def test_psnr_hand_values():
    x = np.zeros((2, 1, 4, 4))
    y = x.copy()
    y[0] += 0.1  # MSE 0.01 at range 1 -> 20 dB
    y[1, 0, 0, 0] = 1.0  # MSE 1/16 -> 10 log10(16)
    np.testing.assert_allclose(psnr_per_image(x, y, 1.0), [20.0, 10 * math.log10(16)])
    assert psnr(x, y, 1.0) == pytest.approx((20.0 + 10 * math.log10(16)) / 2)
    assert psnr(x, x, 1.0) == math.inf


def test_ssim_matches_a_naive_window_loop(pair):
    x, y = pair
    expected = [np.mean([naive_ssim(x[n, c], y[n, c], 255.0) for c in range(3)]) for n in range(2)]
    np.testing.assert_allclose(ssim_per_image(x, y, 255.0), expected, rtol=1e-10)
    assert ssim(torch.from_numpy(x), torch.from_numpy(y), 255.0) == pytest.approx(np.mean(expected), rel=1e-10)


def test_ssim_closed_form_for_constant_images():
    a, b = 0.3, 0.7
    x, y = np.full((1, 12, 12), a), np.full((1, 12, 12), b)
    c1 = 0.01**2
    assert ssim(x, y, 1.0) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-9)
    assert ssim(x, x, 1.0) == pytest.approx(1.0)


def test_matches_scikit_image(pair):
    metrics = pytest.importorskip("skimage.metrics")
    x, y = pair
    for n in range(2):
        ref = metrics.structural_similarity(
            x[n], y[n], data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, channel_axis=0
        )
        assert ssim(x[n], y[n], 255.0) == pytest.approx(ref, rel=1e-9)
        assert psnr(x[n], y[n], 255.0) == pytest.approx(metrics.peak_signal_noise_ratio(x[n], y[n], data_range=255), rel=1e-9)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="same shape"):
        psnr(np.zeros((3, 8, 8)), np.zeros((3, 8, 9)), 1.0)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(np.zeros((3, 8, 8)), np.zeros((3, 8, 8)), 1.0)
    with pytest.raises(ValueError, match="data_range"):
        psnr(np.zeros((4, 4)), np.ones((4, 4)), 0.0)
