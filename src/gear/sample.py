"""Class-conditional sample grids from a tokenizer + generator pair: the one path `gear sample` and `gear serve` take.

``SampleSettings`` holds what decides a grid (classes, count, guidance, filters, seed), checks it against the
generator, and writes the `gear sample` command line that reproduces it; ``sample_grid`` draws the images and
writes them as one PNG, a row per class.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from gear.config import EvalConfig
from gear.data.transforms import save_image_grid
from gear.models.autoencoder import Tokenizer
from gear.models.gpt import GPT

DEFAULT_PER_CLASS = 8


def parse_classes(text: str) -> tuple[int, ...]:
    """'0,3, 7' -> (0, 3, 7); '' -> () (the default classes)."""
    try:
        return tuple(int(c) for c in text.split(",") if c.strip())
    except ValueError:
        raise ValueError(f"classes must be comma-separated integers such as 0,3,7, got {text!r}") from None


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """What every grid shares, class- or text-conditioned: count per row, guidance, filters, seed."""

    per_class: int = DEFAULT_PER_CLASS  # images per row: per class, or per prompt
    cfg_scale: float = EvalConfig.cfg_scale
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def check_sampling(self, vocab_size: int) -> None:
        """Raise ValueError naming the first value out of range."""
        if self.per_class < 1:
            raise ValueError(f"per-class count must be >= 1, got {self.per_class}")
        if not self.cfg_scale >= 0:
            raise ValueError(f"cfg scale must be >= 0 (1 = no guidance), got {self.cfg_scale}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 <= self.top_k <= vocab_size:
            raise ValueError(f"top-k must be in 0..{vocab_size} (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top-p must be in (0, 1] (1 = off), got {self.top_p}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be >= 0 and < 2**63, got {self.seed}")

    def sampling_args(self, out: str) -> list[str]:
        """The `gear sample` options for these values."""
        return ["--per-class", str(self.per_class), "--cfg-scale", str(float(self.cfg_scale)),
                "--temperature", str(float(self.temperature)), "--top-k", str(self.top_k),
                "--top-p", str(float(self.top_p)), "--seed", str(self.seed), "--out", out]


@dataclass(frozen=True, kw_only=True)
class SampleSettings(Sampling):
    """A class-conditional grid: one row per class."""

    classes: tuple[int, ...] = ()  # () = the first up to 10 classes
    cfg_interval: int = -1  # -1: guidance on every token; N: on the first N + 1 after the prefill's (LlamaGen's)

    def resolved_classes(self, num_classes: int) -> tuple[int, ...]:
        return self.classes or tuple(range(min(10, num_classes)))

    def check(self, gen: GPT) -> None:
        """Raise ValueError naming the first setting the generator cannot sample with."""
        n = gen.config.num_classes
        bad = [c for c in self.classes if not 0 <= c < n]
        if bad:
            raise ValueError(f"classes {','.join(map(str, bad))} are outside this generator's classes 0..{n - 1}")
        if self.cfg_interval < -1:
            raise ValueError(f"cfg interval must be >= -1 (-1 = guidance on every token), got {self.cfg_interval}")
        self.check_sampling(gen.config.vocab_size)

    def command(self, run_dir: str, out: str = "samples.png") -> str:
        """The `gear sample` line that draws the same grid."""
        args = ["gear", "sample", run_dir]
        if self.classes:
            args += ["--classes", ",".join(map(str, self.classes))]
        if self.cfg_interval != -1:
            args += ["--cfg-interval", str(self.cfg_interval)]
        return shlex.join(args + self.sampling_args(out))


@torch.no_grad()
def sample_images(tok: Tokenizer, gen: GPT, settings: SampleSettings,
                  on_token: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """(classes x per_class, 3, H, W) images in [-1, 1], class by class, on the CPU."""
    settings.check(gen)
    device = gen.tok_embeddings.weight.device
    classes = settings.resolved_classes(gen.config.num_classes)
    labels = torch.tensor(classes, device=device).repeat_interleave(settings.per_class)
    indices = gen.generate(labels, cfg_scale=settings.cfg_scale, cfg_interval=settings.cfg_interval,
                           temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                           seed=settings.seed, on_token=on_token)
    return tok.decode(indices).float().cpu()


def sample_grid(tok: Tokenizer, gen: GPT, settings: SampleSettings, out: str | Path,
                on_token: Callable[[int, int], None] | None = None) -> Path:
    """Sample and write the PNG grid (one row of ``per_class`` images per class); returns its path."""
    return save_image_grid(sample_images(tok, gen, settings, on_token), out, nrow=settings.per_class)
