"""A PNG grid of text-to-image samples: one row per prompt, the prompt written beside its row."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from gear.data.transforms import to_uint8_image


def save_prompt_grid(images: torch.Tensor, prompts: list[str], path: str | os.PathLike, per_prompt: int,
                     scale: int = 2, padding: int = 4) -> Path:
    """``images`` (len(prompts) * per_prompt, C, H, W) in [-1, 1], grouped by prompt; each image drawn ``scale`` x."""
    if images.ndim != 4 or images.shape[0] != len(prompts) * per_prompt:
        raise ValueError(f"expected {len(prompts)} prompts x {per_prompt} images, got images of shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    pixels = to_uint8_image(images).expand(n, 3, h, w).permute(0, 2, 3, 1).cpu().numpy()
    font = ImageFont.load_default()
    cell_h, cell_w = h * scale, w * scale
    text_w = max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(p, font=font)) for p in prompts) + 2 * padding
    width = padding + per_prompt * (cell_w + padding) + text_w
    canvas = Image.new("RGB", (width, padding + len(prompts) * (cell_h + padding)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for row, prompt in enumerate(prompts):
        top = padding + row * (cell_h + padding)
        for col in range(per_prompt):
            tile = Image.fromarray(pixels[row * per_prompt + col]).resize((cell_w, cell_h), Image.Resampling.NEAREST)
            canvas.paste(tile, (padding + col * (cell_w + padding), top))
        draw.text((padding + per_prompt * (cell_w + padding), top + cell_h // 2), prompt, fill=(0, 0, 0), font=font,
                  anchor="lm")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path
