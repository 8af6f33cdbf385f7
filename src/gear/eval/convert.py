"""Conversions between the project's image layouts: float NCHW in [-1, 1] and uint8 NHWC in [0, 255]."""

from __future__ import annotations

import numpy as np
import torch

from gear.data.transforms import to_uint8_image

ImageBatch = torch.Tensor | np.ndarray


def is_uint8(images: ImageBatch) -> bool:
    return images.dtype in (np.uint8, torch.uint8)


def to_uint8_nhwc(images: ImageBatch) -> np.ndarray:
    """uint8 (N, H, W, C) as is; float (N, C, H, W) in [-1, 1] is clamped and rounded like a PNG save.

    Grey images (C = 1) keep one channel; callers that need RGB use ``to_rgb``.
    """
    if is_uint8(images):
        array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else images
        if array.ndim != 4 or array.shape[-1] not in (1, 3):
            raise ValueError(f"uint8 images must be (N, H, W, C) with C in (1, 3), got shape {array.shape}")
        return np.ascontiguousarray(array)
    tensor = torch.as_tensor(images).detach().cpu()
    if not tensor.is_floating_point():
        raise ValueError(f"images must be uint8 (N, H, W, C) or float (N, C, H, W) in [-1, 1], got dtype {tensor.dtype}")
    if tensor.ndim != 4 or tensor.shape[1] not in (1, 3):
        raise ValueError(f"float images must be (N, C, H, W) with C in (1, 3), got shape {tuple(tensor.shape)}")
    if tensor.numel() and tensor.abs().max() > 2.0:
        raise ValueError(
            f"float images must be in [-1, 1], got values up to {tensor.abs().max().item():.3g}; "
            "pass [0, 255] data as a uint8 (N, H, W, C) array"
        )
    return np.ascontiguousarray(to_uint8_image(tensor).permute(0, 2, 3, 1).numpy())


def to_rgb(images_nhwc: np.ndarray) -> np.ndarray:
    """Replicate a grey channel to three; RGB passes through."""
    return np.repeat(images_nhwc, 3, axis=-1) if images_nhwc.shape[-1] == 1 else images_nhwc


def to_float_nchw(images: ImageBatch) -> torch.Tensor:
    """float32 (N, C, H, W) in [-1, 1] from either layout (uint8 NHWC is rescaled)."""
    if is_uint8(images):
        array = to_uint8_nhwc(images)
        return torch.from_numpy(array).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()
    tensor = torch.as_tensor(images)
    if not tensor.is_floating_point() or tensor.ndim != 4 or tensor.shape[1] not in (1, 3):
        raise ValueError(
            f"images must be float (N, C, H, W) in [-1, 1] with C in (1, 3) or uint8 (N, H, W, C), "
            f"got {tensor.dtype} of shape {tuple(tensor.shape)}"
        )
    return tensor.float()
