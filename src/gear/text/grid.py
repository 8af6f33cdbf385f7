"""Text-to-image sample grids: one row per prompt, the prompt written beside its row. The one path that
`gear sample --prompt` and the page (`gear serve`) take.

``PromptSettings`` holds what decides a grid (prompts, count, guidance, filters, seed), checks it and writes the
`gear sample` command line that reproduces it; ``sample_prompt_grid`` draws the images and writes the PNG.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image, ImageDraw, ImageFont

from gear.data.transforms import to_uint8_image
from gear.sample import Sampling

if TYPE_CHECKING:
    from gear.text.pipeline import TextToImage


@dataclass(frozen=True, kw_only=True)
class PromptSettings(Sampling):
    """A text-conditioned grid: one row of ``per_class`` images per prompt."""

    prompts: tuple[str, ...] = ()

    def check(self, vocab_size: int) -> None:
        """Raise ValueError naming the first setting that cannot be sampled."""
        if not any(p.strip() for p in self.prompts):
            raise ValueError("write at least one prompt (one per line)")
        if any(not p.strip() for p in self.prompts):
            raise ValueError("a prompt is blank: write one caption per line, no empty lines between")
        self.check_sampling(vocab_size)

    def command(self, run_dir: str, out: str = "samples.png") -> str:
        """The `gear sample` line that draws the same grid."""
        args = ["gear", "sample", run_dir]
        for prompt in self.prompts:
            args += ["--prompt", prompt]
        return shlex.join(args + self.sampling_args(out))


@torch.no_grad()
def sample_prompt_grid(pipe: TextToImage, settings: PromptSettings, out: str | os.PathLike,
                       on_token: Callable[[int, int], None] | None = None) -> Path:
    """Sample ``per_class`` images per prompt with the run's pipeline and write the PNG grid; returns its path."""
    settings.check(pipe.generator.config.vocab_size)
    prompts = list(settings.prompts)
    text = pipe.encode(prompts).select(torch.arange(len(prompts)).repeat_interleave(settings.per_class))
    images = pipe.generate(text, cfg_scale=settings.cfg_scale, temperature=settings.temperature, top_k=settings.top_k,
                           top_p=settings.top_p, seed=settings.seed, on_token=on_token)
    return save_prompt_grid(images.cpu(), prompts, out, per_prompt=settings.per_class)


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
