"""The Open-MAGVIT2 encoder/decoder (the LFQ-16 tokenizer's backbone).

A different family from the LlamaGen/taming conv backbone in ``autoencoder.py``: res blocks without
conv biases, stride-2 convs to downsample, no attention, no quant convs (the encoder's output is the
LFQ latent), and a decoder that re-normalizes each level with an adaptive group norm whose scale and
shift are computed from the quantized latent, then upsamples with a conv and a depth-to-space shuffle.

Parameter names follow the released Open-MAGVIT2 checkpoints (``encoder.down.{i}.block.{j}``,
``encoder.mid_block.{j}``, ``decoder.adaptive.{i}.gamma``, ``decoder.up.{i}.upsample.conv1``, ...), so
their weights load without renaming. Level indices count from the highest resolution in both the
encoder and the decoder (``decoder.up[0]`` is the last level the decoder runs).
"""

from __future__ import annotations

from typing import Protocol

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class BackboneConfig(Protocol):
    """The fields of a ``gear.models.autoencoder.TokenizerConfig`` that this backbone reads."""

    image_channels: int
    base_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    z_channels: int
    norm_groups: int


def _norm(channels: int, groups: int, affine: bool = True) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=affine)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
        self.norm2 = _norm(out_ch, groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1, bias=False) if in_ch != out_ch else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.nin_shortcut is None else self.nin_shortcut(x))


def depth_to_space(x: Tensor, block: int) -> Tensor:
    """(B, C * block**2, H, W) -> (B, C, H * block, W * block), channel-major ("DCR") order.

    Input channel ``(i * block + j) * C + c`` lands at output channel c, row offset i, column offset j.
    ``F.pixel_shuffle`` reads channel ``c * block**2 + i * block + j`` instead, so it would scramble
    released weights.
    """
    b, c, h, w = x.shape
    out = c // (block * block)
    x = x.view(b, block, block, out, h, w).permute(0, 3, 4, 1, 5, 2)
    return x.reshape(b, out, h * block, w * block)


class Upsampler(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels * 4, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return depth_to_space(self.conv1(x), 2)


class AdaptiveGroupNorm(nn.Module):
    """Group norm without affine terms, then a per-image scale and shift from the quantized latent:
    scale = gamma(sqrt(var + eps)), shift = beta(mean), statistics over the latent's positions."""

    def __init__(self, z_channels: int, channels: int, groups: int, eps: float = 1e-6):
        super().__init__()
        self.gn = _norm(channels, groups, affine=False)
        self.gamma = nn.Linear(z_channels, channels)
        self.beta = nn.Linear(z_channels, channels)
        self.eps = eps

    def forward(self, x: Tensor, style: Tensor) -> Tensor:
        flat = style.flatten(2)  # (B, z, h*w)
        # The released weights were trained with torch's default (unbiased) variance.
        scale = self.gamma((flat.var(dim=-1) + self.eps).sqrt())
        shift = self.beta(flat.mean(dim=-1))
        return self.gn(x) * scale[:, :, None, None] + shift[:, :, None, None]


class _DownLevel(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, n_blocks: int, groups: int, downsample: bool):
        super().__init__()
        self.block = nn.ModuleList(ResBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(n_blocks))
        self.downsample = nn.Conv2d(out_ch, out_ch, 3, stride=2, padding=1) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class _UpLevel(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, n_blocks: int, groups: int, upsample: bool):
        super().__init__()
        self.block = nn.ModuleList(ResBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(n_blocks))
        self.upsample = Upsampler(out_ch) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return x if self.upsample is None else self.upsample(x)


class Encoder(nn.Module):
    def __init__(self, c: BackboneConfig):
        super().__init__()
        widths = [c.base_channels * m for m in c.channel_mult]
        self.conv_in = nn.Conv2d(c.image_channels, c.base_channels, 3, padding=1, bias=False)
        self.down = nn.ModuleList()
        in_ch = c.base_channels
        for level, out_ch in enumerate(widths):
            self.down.append(_DownLevel(in_ch, out_ch, c.num_res_blocks, c.norm_groups, level < len(widths) - 1))
            in_ch = out_ch
        self.mid_block = nn.ModuleList(ResBlock(in_ch, in_ch, c.norm_groups) for _ in range(c.num_res_blocks))
        self.norm_out = _norm(in_ch, c.norm_groups)
        self.conv_out = nn.Conv2d(in_ch, c.z_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        for block in self.mid_block:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """z (B, z_channels, h, w) -> images; ``adaptive[i]`` re-normalizes the input of level i from z."""

    def __init__(self, c: BackboneConfig):
        super().__init__()
        widths = [c.base_channels * m for m in c.channel_mult]
        in_ch = widths[-1]
        self.conv_in = nn.Conv2d(c.z_channels, in_ch, 3, padding=1)
        self.mid_block = nn.ModuleList(ResBlock(in_ch, in_ch, c.norm_groups) for _ in range(c.num_res_blocks))
        up: list[nn.Module] = [nn.Identity()] * len(widths)
        adaptive: list[nn.Module] = [nn.Identity()] * len(widths)
        for level in reversed(range(len(widths))):
            adaptive[level] = AdaptiveGroupNorm(c.z_channels, in_ch, c.norm_groups)
            up[level] = _UpLevel(in_ch, widths[level], c.num_res_blocks, c.norm_groups, level > 0)
            in_ch = widths[level]
        self.up = nn.ModuleList(up)
        self.adaptive = nn.ModuleList(adaptive)
        self.norm_out = _norm(in_ch, c.norm_groups)
        self.conv_out = nn.Conv2d(in_ch, c.image_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        for block in self.mid_block:
            h = block(h)
        for level in reversed(range(len(self.up))):
            h = self.up[level](self.adaptive[level](h, z))
        return self.conv_out(F.silu(self.norm_out(h)))
