"""Convolutional encoder/decoder around a quantizer: the image tokenizer.

Two backbone families (``TokenizerConfig.backbone``):
- "conv": the LlamaGen/taming backbone of VQ-16 and IBQ-16, defined here. Parameter names follow the
  LlamaGen VQ-16 tokenizer (``encoder.conv_blocks.*``, ``encoder.mid.*``, ``quant_conv``,
  ``quantize.embedding.weight``, ...) so its released checkpoint loads with a plain ``load_state_dict``
  (taming-named IBQ files are renamed by ``gear.models.released``). Attention runs only at the lowest
  resolution (after every res block of the last level) and in the middle block.
- "magvit2": the Open-MAGVIT2 backbone of LFQ-16 (``gear.models.magvit2``), without quant convs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from gear.models import magvit2
from gear.models.pretrained import Pretrained, preset_name
from gear.models.quantizers import QUANTIZERS, QuantizerOutput, build_quantizer


BACKBONES = ("conv", "magvit2")


@dataclass
class TokenizerConfig:
    """Defaults are LlamaGen VQ-16 (16384 x 8 cosine codebook, downsample 16)."""

    quantizer: str = "vq"  # a family of gear.models.quantizers.QUANTIZERS: "vq" | "lfq" | "ibq"
    codebook_size: int = 16384
    codebook_dim: int = 8
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # downsample = 2 ** (len - 1)
    num_res_blocks: int = 2
    z_channels: int = 256
    dropout: float = 0.0
    commitment_beta: float = 0.25
    entropy_ratio: float = 0.05
    entropy_temperature: float = 0.01
    image_channels: int = 3
    norm_groups: int = 32  # GroupNorm groups; every feature width must be divisible by it
    backbone: str = "conv"  # "conv" (LlamaGen/taming: VQ-16, IBQ-16) | "magvit2" (Open-MAGVIT2: LFQ-16)

    def __post_init__(self) -> None:
        self.channel_mult = tuple(self.channel_mult)
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer must be one of {tuple(QUANTIZERS)}, got {self.quantizer!r}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.backbone == "magvit2" and (self.z_channels != self.codebook_dim or self.dropout):
            raise ValueError(
                "the magvit2 backbone has no quant convs and no dropout: it needs z_channels == codebook_dim and "
                f"dropout 0, got z_channels={self.z_channels}, codebook_dim={self.codebook_dim}, dropout={self.dropout}"
            )
        QUANTIZERS[self.quantizer].check_settings(self.codebook_size, self.codebook_dim, self.commitment_beta,
                                                  self.entropy_ratio, self.entropy_temperature)
        if not self.channel_mult or any(not isinstance(m, int) or m < 1 for m in self.channel_mult):
            raise ValueError(f"channel_mult must be a non-empty tuple of positive ints, got {self.channel_mult}")
        for name in ("base_channels", "num_res_blocks", "z_channels", "image_channels", "norm_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        widths = sorted({self.base_channels * m for m in self.channel_mult})
        if any(w % self.norm_groups for w in widths):
            raise ValueError(f"feature widths {widths} must all be divisible by norm_groups={self.norm_groups}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, with 1x1-conv projections."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (proj(y).flatten(2).transpose(1, 2) for proj in (self.q, self.k, self.v))  # (B, hw, C)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        # Pad right/bottom only: with stride 2 this halves even sizes exactly (the released weights expect it).
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid_block(channels: int, groups: int, dropout: float) -> nn.ModuleList:
    return nn.ModuleList(
        [ResnetBlock(channels, channels, groups, dropout), AttnBlock(channels, groups), ResnetBlock(channels, channels, groups, dropout)]
    )


class _Level(nn.Module):
    """One resolution: res blocks, each followed by attention at the lowest resolution, then a resample."""

    def __init__(self, in_ch: int, out_ch: int, n_blocks: int, attention: bool, resample: str | None, c: TokenizerConfig):
        super().__init__()
        self.res = nn.ModuleList()
        self.attn = nn.ModuleList()
        for i in range(n_blocks):
            self.res.append(ResnetBlock(in_ch if i == 0 else out_ch, out_ch, c.norm_groups, c.dropout))
            if attention:
                self.attn.append(AttnBlock(out_ch, c.norm_groups))
        self.downsample = Downsample(out_ch) if resample == "down" else None
        self.upsample = Upsample(out_ch) if resample == "up" else None

    def forward(self, x: Tensor) -> Tensor:
        for i, res in enumerate(self.res):
            x = res(x)
            if len(self.attn):
                x = self.attn[i](x)
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


class Encoder(nn.Module):
    def __init__(self, c: TokenizerConfig):
        super().__init__()
        widths = [c.base_channels * m for m in c.channel_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(c.image_channels, c.base_channels, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        in_ch = c.base_channels
        for level, out_ch in enumerate(widths):
            resample = "down" if level != last else None
            self.conv_blocks.append(_Level(in_ch, out_ch, c.num_res_blocks, level == last, resample, c))
            in_ch = out_ch
        self.mid = _mid_block(in_ch, c.norm_groups, c.dropout)
        self.norm_out = _norm(in_ch, c.norm_groups)
        self.conv_out = nn.Conv2d(in_ch, c.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for block in self.conv_blocks:
            h = block(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Mirror of the encoder; conv_blocks[0] is the lowest resolution. One extra res block per level."""

    def __init__(self, c: TokenizerConfig):
        super().__init__()
        widths = [c.base_channels * m for m in c.channel_mult]
        in_ch = widths[-1]
        self.conv_in = nn.Conv2d(c.z_channels, in_ch, 3, padding=1)
        self.mid = _mid_block(in_ch, c.norm_groups, c.dropout)
        self.conv_blocks = nn.ModuleList()
        for level in reversed(range(len(widths))):
            resample = "up" if level != 0 else None
            lowest = level == len(widths) - 1
            self.conv_blocks.append(_Level(in_ch, widths[level], c.num_res_blocks + 1, lowest, resample, c))
            in_ch = widths[level]
        self.norm_out = _norm(in_ch, c.norm_groups)
        self.conv_out = nn.Conv2d(in_ch, c.image_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for block in self.conv_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


@dataclass
class TokenizerOutput:
    reconstruction: Tensor  # (B, image_channels, H, W)
    quant: QuantizerOutput


class Tokenizer(nn.Module, Pretrained):
    """images (B, 3, H, W) in [-1, 1] <-> token grids (B, H / downsample, W / downsample)."""

    config_class = TokenizerConfig
    kind = "tokenizer"

    def preset(self) -> str | None:
        return preset_name(self.config, TOKENIZER_PRESETS)

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.config = config
        if config.backbone == "magvit2":  # the encoder's output is the quantizer's input
            self.encoder, self.decoder = magvit2.Encoder(config), magvit2.Decoder(config)
            self.quant_conv, self.post_quant_conv = nn.Identity(), nn.Identity()
        else:
            self.encoder, self.decoder = Encoder(config), Decoder(config)
            self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_dim, 1)
            self.post_quant_conv = nn.Conv2d(config.codebook_dim, config.z_channels, 1)
        self.quantize = build_quantizer(
            config.quantizer,
            config.codebook_size,
            config.codebook_dim,
            beta=config.commitment_beta,
            entropy_ratio=config.entropy_ratio,
            entropy_temperature=config.entropy_temperature,
        )

    @property
    def downsample(self) -> int:
        return self.config.downsample

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def forward(self, images: Tensor) -> TokenizerOutput:
        """One encoder + quantizer + decoder pass."""
        quant = self.quantize(self.quant_conv(self.encoder(self._check_images(images))))
        return TokenizerOutput(reconstruction=self.decode_latent(quant.z_q), quant=quant)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """images -> int64 token grid (B, h, w)."""
        latent = self.quant_conv(self.encoder(self._check_images(images)))
        return self.quantize(latent, with_entropy=False).indices

    @torch.no_grad()
    def decode(self, indices: Tensor) -> Tensor:
        """int64 token grid (B, h, w) -> images (B, 3, h * downsample, w * downsample); no gradient (as ``encode``),
        so the inference-mode tokens of ``generate`` decode outside ``torch.no_grad`` too."""
        return self.decode_latent(self.quantize.decode_indices(indices))

    def decode_latent(self, z_q: Tensor) -> Tensor:
        """Quantized latent (B, codebook_dim, h, w) -> images."""
        if z_q.ndim != 4 or z_q.shape[1] != self.config.codebook_dim:
            raise ValueError(f"expected a latent of shape (B, {self.config.codebook_dim}, h, w), got {tuple(z_q.shape)}")
        return self.decoder(self.post_quant_conv(z_q))

    def decoder_last_layer(self) -> nn.Parameter:
        """Weight of the decoder's final conv (for the adaptive GAN loss weight)."""
        return self.decoder.conv_out.weight

    def _check_images(self, images: Tensor) -> Tensor:
        c, s = self.config.image_channels, self.downsample
        if images.ndim != 4 or images.shape[1] != c or not images.is_floating_point():
            raise ValueError(f"expected float images of shape (B, {c}, H, W) in [-1, 1], got {tuple(images.shape)} {images.dtype}")
        if images.shape[2] % s or images.shape[3] % s:
            raise ValueError(f"image height and width must be multiples of {s}, got {tuple(images.shape[2:])}; pad or resize")
        return images


_BIG = dict(base_channels=128, channel_mult=(1, 1, 2, 2, 4), z_channels=256)
# Widths 16, 32, 32: the full-resolution level is the expensive one on a CPU, so it is the narrowest
# (about 0.3 s for forward + backward of 32 images at 32 px on one core); attention runs at 8 x 8.
_TINY = dict(base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, z_channels=64, norm_groups=8)

TOKENIZER_PRESETS: dict[str, TokenizerConfig] = {
    # LlamaGen vq_ds16_c2i.pt: 71,883,403 parameters
    "vq-16": TokenizerConfig(quantizer="vq", codebook_size=16384, codebook_dim=8, num_res_blocks=2, **_BIG),
    # Open-MAGVIT2 pretrain256_16384.ckpt: 115,094,033 parameters
    "lfq-16": TokenizerConfig(
        quantizer="lfq", backbone="magvit2", codebook_size=2**14, codebook_dim=14, num_res_blocks=4,
        base_channels=128, channel_mult=(1, 1, 2, 2, 4), z_channels=14,
    ),
    # SEED-Voken IBQ_pretrain_16384.ckpt: 110,982,019 parameters
    "ibq-16": TokenizerConfig(quantizer="ibq", codebook_size=16384, codebook_dim=256, num_res_blocks=4, **_BIG),
    # 32 px images -> 8 x 8 token grids.
    "vq-tiny": TokenizerConfig(quantizer="vq", codebook_size=512, codebook_dim=8, **_TINY),
    "lfq-tiny": TokenizerConfig(quantizer="lfq", backbone="magvit2", codebook_size=2**9, codebook_dim=9,
                                **{**_TINY, "z_channels": 9}),
    "ibq-tiny": TokenizerConfig(quantizer="ibq", codebook_size=512, codebook_dim=32, **_TINY),
}


def build_tokenizer(preset: str, **overrides) -> Tokenizer:
    """A Tokenizer from a preset name, with config fields replaced by ``overrides``."""
    if preset not in TOKENIZER_PRESETS:
        raise ValueError(f"unknown tokenizer preset {preset!r}; valid presets: {sorted(TOKENIZER_PRESETS)}")
    fields = {f.name for f in dataclasses.fields(TokenizerConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown TokenizerConfig keys {unknown}; valid keys: {sorted(fields)}")
    return Tokenizer(dataclasses.replace(TOKENIZER_PRESETS[preset], **overrides))
