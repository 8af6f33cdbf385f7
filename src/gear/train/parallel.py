"""How a stage's modules spread over several processes: DDP replicas, or (train.parallel=fsdp) the generator,
its EMA and the projector sharded alike (``sharding.py``)."""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gear.train import sharding
from gear.train.steps import Modules


def shard_generator(m: Modules, ema_generator: nn.Module, is_main: bool) -> nn.Module | None:
    """Shard the generator, its EMA and the projector over all processes. Returns rank 0's unsharded copy of the
    EMA generator, which the gathered states are loaded into for sample grids and exports (None elsewhere)."""
    plain = copy.deepcopy(ema_generator) if is_main else None
    for mod in (m.generator, ema_generator):
        sharding.shard(mod, mod.layers)
    if m.projector is not None:
        sharding.shard(m.projector)
    return plain


def wrap_for_processes(m: Modules, trained: dict[str, nn.Module], device: torch.device) -> Modules:
    """The modules the step functions call when several processes train: DDP-wrapped unless sharded."""
    ids = [device.index] if device.type == "cuda" else None

    def wrap(mod: nn.Module) -> nn.Module:
        return mod if sharding.is_sharded(mod) else DDP(mod, device_ids=ids, broadcast_buffers=False)

    return Modules(
        tokenizer=wrap(m.tokenizer) if "tokenizer" in trained else m.tokenizer,
        teacher=m.teacher,
        generator=wrap(m.generator) if m.generator is not None else None,
        projector=wrap(m.projector) if m.projector is not None else None,
        discriminator=m.discriminator,  # only used frozen (the GAN term of the tokenizer loss)
        discriminator_loss=wrap(m.discriminator_loss) if m.discriminator_loss is not None else None,
        perceptual=m.perceptual,
    )


def no_sync(wrapped: Modules, last: bool) -> contextlib.ExitStack:
    """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP) on every micro-batch but the last of a step."""
    stack = contextlib.ExitStack()
    if not last:
        for mod in vars(wrapped).values():
            if isinstance(mod, DDP):
                stack.enter_context(mod.no_sync())
            elif sharding.is_sharded(mod):
                stack.enter_context(sharding.no_gradient_sync(mod))
    return stack
