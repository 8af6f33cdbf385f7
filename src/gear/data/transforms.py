"""Small image transforms on PIL images, uint8 arrays and tensors (no torchvision), and PNG sample grids.

Pipeline used by the data sets: PIL image -> ``resize_short_side`` -> uint8 HWC array -> crop / flip ->
``to_tensor_minus1_1`` -> float32 CHW in [-1, 1]. The reverse for viewing: ``to_uint8_image`` and
``save_image_grid``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


class Sample(NamedTuple):
    """One data set item. The default DataLoader collate stacks it field by field into a batch ``Sample``."""

    image: torch.Tensor  # float32 (3, S, S) in [-1, 1]
    label: torch.Tensor  # int64 scalar (class id)
    index: int  # position in the split; a stable key, e.g. for caching teacher features


def generator_for(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator seeded from ``(seed, epoch, index)`` alone, so augmentations do not depend on worker
    count, loading order or how many items were drawn before (a resumed run sees the same crops)."""
    if seed < 0 or epoch < 0 or index < 0:
        raise ValueError(f"seed, epoch and index must be >= 0, got {seed}, {epoch}, {index}")
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def to_tensor_minus1_1(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (H, W, C) or (H, W) -> float32 (C, H, W) in [-1, 1] (a grey image gets C = 1)."""
    t = torch.from_numpy(np.array(image)) if isinstance(image, np.ndarray) else image  # copy: PIL arrays are read-only
    if t.dtype != torch.uint8 or t.ndim not in (2, 3):
        raise ValueError(f"expected a uint8 (H, W, C) or (H, W) image, got {t.dtype} of shape {tuple(t.shape)}")
    if t.ndim == 2:
        t = t.unsqueeze(-1)
    return t.permute(2, 0, 1).float().div(127.5).sub(1.0).contiguous()


def resize_short_side(
    image: Image.Image, size: int, resample: int = Image.Resampling.BICUBIC, box_prereduce: bool = False
) -> Image.Image:
    """Scale so that the shorter side is ``size``, keeping the aspect ratio.

    ``box_prereduce`` first halves the image with a box filter while its short side is >= 2 * size, as the
    ADM evaluation pipeline does (see ``center_crop_arr``).
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if box_prereduce:
        while min(image.size) >= 2 * size:
            image = image.resize(tuple(s // 2 for s in image.size), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    new = tuple(max(size, round(s * scale)) for s in image.size)
    return image if new == image.size else image.resize(new, resample=resample)


def _check_crop(array: np.ndarray, size: int) -> tuple[int, int]:
    h, w = array.shape[:2]
    if size < 1 or h < size or w < size:
        raise ValueError(f"cannot crop {size}x{size} from an image of {h}x{w}; resize its short side first")
    return h, w


def center_crop(array: np.ndarray, size: int) -> np.ndarray:
    """The central ``size`` x ``size`` window of an (H, W, ...) array."""
    h, w = _check_crop(array, size)
    top, left = (h - size) // 2, (w - size) // 2
    return array[top : top + size, left : left + size]


def random_crop(array: np.ndarray, size: int, generator: torch.Generator) -> np.ndarray:
    """A uniformly placed ``size`` x ``size`` window of an (H, W, ...) array; offsets come from ``generator``."""
    h, w = _check_crop(array, size)
    top = int(torch.randint(h - size + 1, (1,), generator=generator))
    left = int(torch.randint(w - size + 1, (1,), generator=generator))
    return array[top : top + size, left : left + size]


def hflip(array: np.ndarray) -> np.ndarray:
    """Mirror an (H, W, ...) array left to right."""
    return array[:, ::-1]


def center_crop_arr(image: Image.Image, size: int) -> np.ndarray:
    """ADM-style preprocessing (the one behind the ImageNet FID reference batches): box-filter halving,
    bicubic short-side resize, center crop. Returns uint8 (size, size, 3)."""
    image = resize_short_side(image.convert("RGB"), size, box_prereduce=True)
    return center_crop(np.asarray(image), size)


def square_view(image: Image.Image, size: int) -> torch.Tensor:
    """An RGB image as a tokenizer sees it: short side resized (bicubic) to ``size``, centre ``size`` x ``size``
    crop, float32 (3, size, size) in [-1, 1]."""
    return to_tensor_minus1_1(center_crop(np.asarray(resize_short_side(image.convert("RGB"), size)), size))


def pad_to(image: torch.Tensor, size: int, value: float = 0.0) -> torch.Tensor:
    """Pad the last two dims of ``image`` symmetrically to ``size`` x ``size`` (an odd remainder goes
    to the bottom / right)."""
    h, w = image.shape[-2:]
    if h > size or w > size:
        raise ValueError(f"cannot pad an image of {h}x{w} to {size}x{size}; it is already larger")
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(image, (left, size - w - left, top, size - h - top), value=value)


def to_uint8_image(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] -> uint8 in [0, 255], same shape (values outside [-1, 1] are clipped)."""
    return images.detach().float().clamp(-1.0, 1.0).add(1.0).mul(127.5).round().to(torch.uint8)


def save_image_grid(
    images: torch.Tensor, path: str | os.PathLike, nrow: int = 8, padding: int = 2, pad_value: int = 0
) -> Path:
    """Write images in [-1, 1] of shape (N, 3, H, W) (or (N, 1, H, W)) as one PNG grid with ``nrow`` images
    per row and ``padding`` pixels of ``pad_value`` between and around them. Returns the path."""
    if images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(f"expected images of shape (N, 3, H, W) or (N, 1, H, W) with N >= 1, got {tuple(images.shape)}")
    if nrow < 1 or padding < 0:
        raise ValueError(f"nrow must be >= 1 and padding >= 0, got nrow={nrow}, padding={padding}")
    n, c, h, w = images.shape
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    pixels = to_uint8_image(images).expand(n, 3, h, w).permute(0, 2, 3, 1).cpu().numpy()
    grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, 3), pad_value, dtype=np.uint8)
    for i in range(n):
        top = padding + (i // cols) * (h + padding)
        left = padding + (i % cols) * (w + padding)
        grid[top : top + h, left : left + w] = pixels[i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path, format="PNG")
    return path
