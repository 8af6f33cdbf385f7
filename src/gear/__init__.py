"""gear: train a VQ image tokenizer and an autoregressive image generator jointly (GEAR).

The public API::

    tok = gear.build_tokenizer("vq-16")             # a preset, with optional config overrides
    gpt = gear.build_generator("gpt-b", num_classes=1000)
    tok = gear.load_tokenizer("runs/demo/joint")     # a saved model directory, or a run directory
    gpt = gear.load_generator("runs/demo/ar")
    tok = gear.load_tokenizer("pretrain256_16384.ckpt", preset="lfq-16")    # a released checkpoint file
    gpt = gear.load_generator("c2i_XL_384.pt", preset="gpt-xl", grid_size=24)
    images = tok.decode(gpt.generate(labels, cfg_scale=1.5, seed=0))

    pipe = gear.load_text_to_image("runs/demo-t2i")   # a text-conditioned run: tokenizer, generator, text encoder
    images = pipe(["a small bright sneaker"], cfg_scale=3.0, seed=0)

    run = gear.open_run("runs/demo/ar")              # a run directory: its config, kind and models (gear.run)
    tok, gpt = run.load_pair()
"""

from __future__ import annotations

from pathlib import Path

from gear.models.autoencoder import TOKENIZER_PRESETS, Tokenizer, TokenizerConfig, build_tokenizer
from gear.models.gpt import GPT, GPT_PRESETS, GPTConfig, build_generator
from gear.models.released import RELEASED_SUFFIXES, is_released_file, released_generator, released_tokenizer
from gear.models.gpt_t2i import TextCondition, TextGPT
from gear.run import GENERATOR_DIR, TOKENIZER_DIR, Run, is_text_run, model_dir, open_run

__version__ = "0.1.0"

__all__ = [
    "GPT", "GPTConfig", "GPT_PRESETS", "Run", "TOKENIZER_PRESETS", "TextCondition", "TextGPT", "Tokenizer", "TokenizerConfig",
    "build_generator", "build_tokenizer", "is_text_run", "load_generator", "load_text_to_image", "load_tokenizer", "open_run",
]


def load_tokenizer(path: str | Path, ema: bool = True, map_location: str = "cpu", preset: str | None = None,
                   **overrides) -> Tokenizer:
    """A tokenizer from a ``save_pretrained`` directory, a run directory (its EMA weights by default), or a
    released checkpoint file (.pt/.pth/.ckpt/.bin/.safetensors) with the ``preset`` of its architecture and
    TokenizerConfig ``overrides``."""
    if _released(path, preset, overrides):
        return released_tokenizer(path, preset, ema=ema, **overrides)[0].to(map_location)
    return Tokenizer.from_pretrained(model_dir(path, TOKENIZER_DIR, ema=ema), map_location=map_location)


def load_generator(path: str | Path, ema: bool = True, map_location: str = "cpu", preset: str | None = None,
                   **overrides) -> GPT | TextGPT:
    """A generator from a ``save_pretrained`` directory, a run directory (its EMA weights by default), or a
    released checkpoint file with the ``preset`` of its architecture and GPTConfig ``overrides`` (the token
    grid is not stored in LlamaGen's files: pass ``grid_size=24`` for its 384 px models); a TextGPT when it is text-conditioned."""
    if _released(path, preset, overrides):
        return released_generator(path, preset, ema=ema, **overrides)[0].to(map_location)
    return GPT.from_pretrained(model_dir(path, GENERATOR_DIR, ema=ema), map_location=map_location)


def _released(path: str | Path, preset: str | None, overrides: dict) -> bool:
    if is_released_file(path):
        if preset is None:
            raise ValueError(f"{path} is a checkpoint file: pass preset=NAME for its architecture (see `gear presets`)")
        return True
    if preset is not None or overrides:
        raise ValueError(f"{path} is not a checkpoint file ({', '.join(RELEASED_SUFFIXES)}): preset and overrides "
                         "apply only to those; a saved model directory carries its own config.json")
    return False


def load_text_to_image(run_dir: str | Path, ema: bool = True, device: str = "cpu", encoder_path: str | None = None):
    """A text-conditioned run's TextToImage pipeline: ``pipe(prompts, cfg_scale=..., seed=...)`` -> images."""
    from gear.text.pipeline import load_text_to_image as load

    return load(run_dir, ema=ema, device=device, encoder_path=encoder_path)
