"""Text-to-image from a run directory: the run's tokenizer, its text-conditioned generator and its text encoder.

    pipe = gear.load_text_to_image("runs/demo-t2i")
    images = pipe(["a small bright sneaker"], cfg_scale=3.0, seed=0)     # (B, 3, H, W) in [-1, 1]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from gear.models.autoencoder import Tokenizer
from gear.models.gpt_t2i import TextCondition, TextGPT
from gear.run import Run, check_pair, open_run
from gear.text.encoders import TextEncoder


@dataclass
class TextToImage:
    tokenizer: Tokenizer
    generator: TextGPT
    encoder: TextEncoder

    def encode(self, prompts: list[str]) -> TextCondition:
        """Caption features of ``prompts`` (a prompt longer than the prefix is truncated with a CaptionTruncated warning)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("no prompt given: pass at least one caption")
        return self.encoder.encode(list(prompts))

    def __call__(self, prompts: list[str], **sampling) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1], one per prompt; ``sampling``: cfg_scale, temperature, top_k, top_p, seed."""
        return self.generate(self.encode(prompts), **sampling)

    @torch.no_grad()
    def generate(self, text: TextCondition, *, cfg_scale: float = 1.5, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None,
                 on_token: Callable[[int, int], None] | None = None) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] for encoded captions, decoded by the run's tokenizer."""
        indices = self.generator.generate(text, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                                          seed=seed, on_token=on_token)
        return self.tokenizer.decode(indices).float().clamp(-1, 1)


def load_text_to_image(run_dir: str | Path | Run, *, ema: bool = True, device: str = "cpu",
                       encoder_path: str | None = None) -> TextToImage:
    """The pipeline of a text-conditioned run (its config.yaml names the encoder; ``encoder_path`` overrides
    where that encoder's folder is, e.g. on another machine)."""
    run = run_dir if isinstance(run_dir, Run) else open_run(run_dir)
    text = run.config.text
    tok = run.load_tokenizer(ema=ema, device=device)
    gen = run.load_generator(ema=ema, device=device)
    if not isinstance(gen, TextGPT) or not text.encoder:
        raise ValueError(f"{run.path} holds a class-conditional generator: sample it with class labels (--classes)")
    check_pair(tok, gen)
    encoder = TextEncoder(text.encoder, encoder_path if encoder_path is not None else text.encoder_path,
                          gen.config.text_len, device=device)
    if encoder.dim != gen.config.text_dim:
        raise ValueError(f"text encoder {text.encoder} gives {encoder.dim}-d features but the generator takes "
                         f"{gen.config.text_dim}-d ones: point encoder_path at the encoder the run was trained with")
    return TextToImage(tok, gen, encoder)
