import pytest
import torch
import torch.nn.functional as F

from gear.losses import (
    LPIPS,
    PatchGANDiscriminator,
    PerceptualLoss,
    adaptive_gan_weight,
    build_perceptual_loss,
    hinge_d_loss,
    hinge_g_loss,
)


def smooth_images(b=2, size=32, seed=0):
    """Blurry random images in [-1, 1], closer to natural images than white noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(b, 3, size // 4, size // 4, generator=g) * 2 - 1
    return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def perceptual():
    return build_perceptual_loss("efficientnet-lite0")


# --- perceptual loss (EfficientNet-Lite) ----------------------------------------------------------------


def test_perceptual_zero_for_identical_and_grows_with_noise(perceptual):
    assert isinstance(perceptual, PerceptualLoss)
    y = smooth_images()
    assert perceptual(y, y).item() == pytest.approx(0.0, abs=1e-6)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(y.shape, generator=g)
    losses = [perceptual((y + s * noise).clamp(-1, 1), y).item() for s in (0.03, 0.2, 0.8)]
    assert losses[0] > 0
    assert all(a < b for a, b in zip(losses, losses[1:])), losses


def test_perceptual_is_symmetric_and_prefers_similar_images(perceptual):
    y = smooth_images(seed=0)
    other = smooth_images(seed=5)
    slightly_off = y + 0.05 * torch.randn_like(y)
    assert perceptual(slightly_off, y) < perceptual(other, y)
    torch.testing.assert_close(perceptual(other, y), perceptual(y, other), atol=1e-5, rtol=1e-5)


def test_perceptual_frozen_and_gradient_reaches_x(perceptual):
    assert all(not p.requires_grad for p in perceptual.parameters())
    y = smooth_images()
    x = (y + 0.2 * torch.randn_like(y)).requires_grad_()
    loss = perceptual(x, y)
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(b.grad is None for b in perceptual.buffers())
    assert len(perceptual.state_dict()) == 0  # the frozen network is not saved into checkpoints
    # A small step against the gradient lowers the loss: the gradient is the loss's own.
    with torch.no_grad():
        stepped = perceptual(x - 0.5 * x.grad / x.grad.norm(), y)
    assert stepped < loss


def test_perceptual_bad_input(perceptual):
    with pytest.raises(ValueError, match="same shape"):
        perceptual(smooth_images(size=32), smooth_images(size=64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        perceptual(torch.zeros(2, 1, 32, 32), torch.zeros(2, 1, 32, 32))


def test_build_perceptual_loss_names(tmp_path):
    with pytest.raises(ValueError, match="unknown perceptual loss"):
        build_perceptual_loss("alexnet")
    with pytest.raises(ValueError, match="vgg_path"):
        build_perceptual_loss("lpips")
    with pytest.raises(FileNotFoundError, match="vgg16"):
        build_perceptual_loss("lpips", vgg_path=str(tmp_path / "nope.pth"), lpips_path=str(tmp_path / "nope2.pth"))


# --- LPIPS (VGG16 + heads) from local files -------------------------------------------------------------

VGG_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
TORCHVISION_CONV_INDEX = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


def fake_lpips_files(tmp_path, head_scale=None):
    """Random weights in the layouts of torchvision's vgg16 state dict and of LPIPS v0.1's vgg.pth."""
    g = torch.Generator().manual_seed(0)
    vgg, in_ch = {}, 3
    for idx, out_ch in zip(TORCHVISION_CONV_INDEX, VGG_WIDTHS):
        vgg[f"features.{idx}.weight"] = torch.randn(out_ch, in_ch, 3, 3, generator=g) * (2 / (9 * in_ch)) ** 0.5
        vgg[f"features.{idx}.bias"] = torch.zeros(out_ch)
        in_ch = out_ch
    vgg["classifier.0.weight"] = torch.zeros(4, 4)  # a full vgg16 file also has the classifier: ignored
    heads = {}
    for k, ch in enumerate((64, 128, 256, 512, 512)):
        scale = 1.0 if head_scale is None else head_scale[k]
        heads[f"lin{k}.model.1.weight"] = torch.rand(1, ch, 1, 1, generator=g) * scale
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save(heads, tmp_path / "lpips_vgg.pth")
    return str(tmp_path / "vgg16.pth"), str(tmp_path / "lpips_vgg.pth"), vgg, heads


def test_lpips_from_local_files(tmp_path):
    vgg_path, heads_path, _, _ = fake_lpips_files(tmp_path)
    lpips = build_perceptual_loss("lpips", vgg_path=vgg_path, lpips_path=heads_path)
    assert isinstance(lpips, LPIPS)
    feats = lpips.vgg_features(torch.zeros(1, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in feats] == [(64, 64, 64), (128, 32, 32), (256, 16, 16), (512, 8, 8), (512, 4, 4)]
    y = smooth_images(2)
    assert lpips(y, y).item() == pytest.approx(0.0, abs=1e-6)
    x = (y + 0.3 * torch.randn_like(y)).requires_grad_()
    loss = lpips(x, y)
    assert loss > 0
    loss.backward()
    assert x.grad.abs().sum() > 0 and all(not p.requires_grad for p in lpips.parameters())


def test_lpips_uses_heads_and_first_vgg_layers(tmp_path):
    # Only head 0 non-zero: the loss is the weighted, unit-normalized relu1_2 difference, computed by hand.
    vgg_path, heads_path, vgg, heads = fake_lpips_files(tmp_path, head_scale=(1, 0, 0, 0, 0))
    lpips = LPIPS(vgg_path, heads_path, min_size=32)
    x, y = smooth_images(2, seed=1), smooth_images(2, seed=2)

    def relu1_2(img):
        shift, scale = torch.tensor([-0.030, -0.088, -0.188]), torch.tensor([0.458, 0.448, 0.450])
        img = (img - shift.view(1, 3, 1, 1)) / scale.view(1, 3, 1, 1)
        h = F.relu(F.conv2d(img, vgg["features.0.weight"], vgg["features.0.bias"], padding=1))
        h = F.relu(F.conv2d(h, vgg["features.2.weight"], vgg["features.2.bias"], padding=1))
        return h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)

    diff = (relu1_2(x) - relu1_2(y)).pow(2)
    expected = (diff * heads["lin0.model.1.weight"]).sum(1).mean()
    torch.testing.assert_close(lpips(x, y), expected, atol=1e-6, rtol=1e-5)


def test_lpips_rejects_wrong_files(tmp_path):
    vgg_path, heads_path, vgg, heads = fake_lpips_files(tmp_path)
    torch.save({k: v for k, v in heads.items() if not k.startswith("lin4")}, tmp_path / "short.pth")
    with pytest.raises(ValueError, match="lin4"):
        LPIPS(vgg_path, str(tmp_path / "short.pth"))
    torch.save({k: v for k, v in vgg.items() if "28" not in k}, tmp_path / "vgg_short.pth")
    with pytest.raises(ValueError, match="expected VGG16's 13"):
        LPIPS(str(tmp_path / "vgg_short.pth"), heads_path)


# --- PatchGAN discriminator and GAN losses ---------------------------------------------------------------


@pytest.mark.parametrize("size,patches", [(32, 2), (64, 6), (256, 30)])
def test_discriminator_patch_map(size, patches):
    d = PatchGANDiscriminator()
    assert d(torch.randn(2, 3, size, size)).shape == (2, 1, patches, patches)


def test_discriminator_structure_and_init():
    torch.manual_seed(0)
    d = PatchGANDiscriminator(in_channels=3, channels=64, n_layers=3)
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in d.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1] and all(c.kernel_size == (4, 4) for c in convs)
    assert len(bns) == 3
    assert sum(p.numel() for p in d.parameters()) == 2_765_633  # pix2pix's 3-layer PatchGAN with BatchNorm
    big = convs[3].weight
    assert abs(big.std().item() - 0.02) < 0.002 and abs(big.mean().item()) < 0.001
    assert all(abs(bn.weight.mean().item() - 1.0) < 0.01 for bn in bns)


def test_discriminator_rejects_too_small_or_wrong_channels():
    d = PatchGANDiscriminator()
    with pytest.raises(ValueError, match=">= 24"):
        d(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        d(torch.randn(1, 1, 32, 32))
    assert PatchGANDiscriminator(in_channels=1, n_layers=2)(torch.randn(1, 1, 16, 16)).shape == (1, 1, 2, 2)


def test_hinge_losses_by_hand():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - real) = [0, 0.5, 2] -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + fake) = [0, 1, 2]   -> mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))
    assert hinge_g_loss(fake).item() == pytest.approx(1 / 3)
    assert hinge_d_loss(torch.full((4,), 3.0), torch.full((4,), -3.0)).item() == 0.0  # beyond the margins


def test_adaptive_gan_weight_is_the_gradient_norm_ratio():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    a, b = torch.tensor([3.0, 4.0]), torch.tensor([0.6, 0.8])
    weight = adaptive_gan_weight((w * a).sum(), (w * b).sum(), w)
    assert weight.item() == pytest.approx(5.0 / (1.0 + 1e-4))
    assert not weight.requires_grad
    tiny = adaptive_gan_weight((w * a).sum(), (w * b * 1e-9).sum(), w, max_weight=100.0)
    assert tiny.item() == 100.0
