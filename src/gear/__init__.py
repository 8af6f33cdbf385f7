"""gear: train a VQ image tokenizer and an autoregressive image generator jointly (GEAR).

The public API::

    tok = gear.build_tokenizer("vq-16")             # a preset, with optional config overrides
    gpt = gear.build_generator("gpt-b", num_classes=1000)
    tok = gear.load_tokenizer("runs/demo/joint")     # a saved model directory, or a run directory
    gpt = gear.load_generator("runs/demo/ar")
    images = tok.decode(gpt.generate(labels, cfg_scale=1.5, seed=0))

    pipe = gear.load_text_to_image("runs/demo-t2i")   # a text-conditioned run: tokenizer, generator, text encoder
    images = pipe(["a small bright sneaker"], cfg_scale=3.0, seed=0)
"""

from __future__ import annotations

from pathlib import Path

from gear.models.autoencoder import TOKENIZER_PRESETS, Tokenizer, TokenizerConfig, build_tokenizer
from gear.models.gpt import GPT, GPT_PRESETS, GPTConfig, build_generator
from gear.models.gpt_t2i import TextCondition, TextGPT

__version__ = "0.1.0"

__all__ = [
    "GPT", "GPTConfig", "GPT_PRESETS", "TOKENIZER_PRESETS", "TextCondition", "TextGPT", "Tokenizer", "TokenizerConfig",
    "build_generator", "build_tokenizer", "is_text_run", "load_generator", "load_text_to_image", "load_tokenizer",
]


def load_tokenizer(path: str | Path, ema: bool = True, map_location: str = "cpu") -> Tokenizer:
    """A tokenizer from a ``save_pretrained`` directory, or from a run directory (its EMA weights by default)."""
    from gear.train.build import TOKENIZER_DIR, model_dir

    return Tokenizer.from_pretrained(model_dir(path, TOKENIZER_DIR, ema=ema), map_location=map_location)


def load_generator(path: str | Path, ema: bool = True, map_location: str = "cpu") -> GPT | TextGPT:
    """A generator from a ``save_pretrained`` directory, or from a run directory (its EMA weights by default);
    a TextGPT when it is text-conditioned."""
    from gear.train.build import GENERATOR_DIR, model_dir

    return GPT.from_pretrained(model_dir(path, GENERATOR_DIR, ema=ema), map_location=map_location)


def load_text_to_image(run_dir: str | Path, ema: bool = True, device: str = "cpu", encoder_path: str | None = None):
    """A text-conditioned run's TextToImage pipeline: ``pipe(prompts, cfg_scale=..., seed=...)`` -> images."""
    from gear.text.pipeline import load_text_to_image as load

    return load(run_dir, ema=ema, device=device, encoder_path=encoder_path)


def is_text_run(run_dir: str | Path) -> bool:
    """True when the run directory's generator is text-conditioned."""
    from gear.text.pipeline import is_text_run as check

    return check(run_dir)
