"""Small pieces shared by several test files."""

from __future__ import annotations

import dataclasses

import torch

from gear.align.repa import Projector
from gear.cli import main
from gear.config import load_config
from gear.models.autoencoder import build_tokenizer
from gear.models.gpt import build_generator
from gear.train.steps import Modules, StepConfig

GRID = 8


class FixedTeacher(torch.nn.Module):
    """A frozen random patch embedding: enough to give the alignment loss a target of the right shape."""

    feature_dim = 24

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Conv2d(3, self.feature_dim, 4, stride=4).requires_grad_(False)

    def forward(self, images, grid):
        return self.proj(images).flatten(2).transpose(1, 2)


def step_cfg(**changes) -> StepConfig:
    """The default config's step settings (no perceptual loss, no GAN: the routing of the other terms is tested)."""
    base = StepConfig.from_config(load_config(None), tap_layer=2, class_dropout=0.1)
    return dataclasses.replace(base, **{"perceptual_weight": 0.0, "gan_weight": 0.0, **changes})


def tiny_modules() -> Modules:
    """vq-tiny + gpt-tiny (randomized so that logits carry gradient) + a projector onto FixedTeacher."""
    torch.manual_seed(0)
    tok = build_tokenizer("vq-tiny")
    gen = build_generator("gpt-tiny", vocab_size=tok.codebook_size, grid_size=GRID, num_classes=10)
    for p in gen.parameters():  # the output layer starts at zero
        torch.nn.init.normal_(p, std=0.05)
    teacher = FixedTeacher()
    return Modules(tokenizer=tok, generator=gen, projector=Projector(gen.config.dim, teacher.feature_dim, 64),
                   teacher=teacher)


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.rand(4, 3, 32, 32, generator=g) * 2 - 1, torch.randint(0, 10, (4,), generator=g)


TINY_RUN = [
    "data.limit=32", "train.batch_size=8", "train.log_every=1", "train.progress=false", "train.ema_decay=0.9",
    "align.projector_dim=64", "eval.samples_per_class=1", "eval.sample_classes=[0]", "train.steps=2",
    "train.sample_every=2", "train.checkpoint_every=2",
]


def tiny_runs(root):
    """A 2-step tokenizer run and a 2-step AR run on its tokenizer (the AR run holds both models), on Fashion-MNIST."""
    tok, ar = root / "tok", root / "ar"
    assert main(["train", "configs/fmnist-tokenizer.yaml", *TINY_RUN, f"train.out_dir={tok}",
                 "model.tokenizer_overrides={base_channels: 16, z_channels: 32, norm_groups: 8}"]) == 0
    assert main(["train", "configs/fmnist-ar.yaml", *TINY_RUN, f"train.out_dir={ar}", f"model.tokenizer_init={tok}"]) == 0
    return tok, ar


TINY_T2I = [
    "data.limit=64", "train.batch_size=8", "train.log_every=1", "train.progress=false", "train.ema_decay=0.9",
    "model.tokenizer_overrides={base_channels: 16, z_channels: 32, norm_groups: 8}", "align.projector_dim=64",
    "eval.samples_per_class=1", "text.max_length=16",
]


def t2i_overrides(run_dir, steps, *extra):
    return [*TINY_T2I, f"train.out_dir={run_dir}", f"train.steps={steps}", f"train.sample_every={steps}",
            f"train.checkpoint_every={steps}", *extra]


def tiny_t2i_runs(root):
    """A 2-step tokenizer, then a 30-step text-to-image AR on it (MiniLM features cached under root/cache)."""
    import pytest

    tok, t2i = root / "tok", root / "t2i"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GEAR_CACHE", str(root / "cache"))
        assert main(["train", "configs/fmnist-tokenizer.yaml", *t2i_overrides(tok, 2)]) == 0
        assert main(["train", "configs/fmnist-t2i.yaml", *t2i_overrides(t2i, 30, f"model.tokenizer_init={tok}",
                                                                        "optim.lr=2e-3", "align.lambda_ar=0")]) == 0
    return tok, t2i
