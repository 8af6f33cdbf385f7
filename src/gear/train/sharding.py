"""FSDP2 for the AR: ``train.parallel=fsdp`` shards the generator (block by block) and its projector over all
processes, so that each GPU holds 1/N of their weights, gradients, AdamW moments and EMA. The tokenizer and the
discriminator stay replicated (DDP): they are small next to a GPT-L/XL.

Checkpoints always hold full, unsharded tensors in the layout of the plain modules: a run saved under FSDP
resumes under DDP, in one process, or on another number of processes, and the other way round. Gathering is
collective (every rank calls it); only rank 0 keeps the gathered tensors.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor


def shard(module: nn.Module, blocks: nn.ModuleList | None = None) -> None:
    """Shard ``module`` in place: each of ``blocks`` is its own FSDP unit (gathered only while it runs), the rest
    of the module (embeddings, output layer) one root unit."""
    for block in blocks or ():
        fully_shard(block)
    fully_shard(module)


def is_sharded(module: nn.Module | None) -> bool:
    return isinstance(module, FSDPModule)


def gather(tree: Any, keep: bool) -> Any:
    """``tree`` (a state dict, or an optimizer state dict) with every DTensor replaced by its full tensor on the
    CPU where ``keep`` (rank 0), by None elsewhere. Collective: all ranks call it on trees of the same layout."""
    if isinstance(tree, DTensor):
        full = tree.full_tensor()
        return full.cpu() if keep else None
    if isinstance(tree, dict):
        return {k: gather(v, keep) for k, v in tree.items()}
    if isinstance(tree, list):
        return [gather(v, keep) for v in tree]
    return tree


def _shard_like(value: Any, like: torch.Tensor) -> Any:
    if isinstance(like, DTensor) and isinstance(value, torch.Tensor) and value.shape == like.shape:
        return distribute_tensor(value.to(like.device, like.dtype), like.device_mesh, like.placements)
    return value


def load_module_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``module.load_state_dict`` of a full state dict, sharded first where the module's tensors are DTensors."""
    own = module.state_dict()
    module.load_state_dict({k: _shard_like(v, own[k]) if k in own else v for k, v in state.items()})


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """``optimizer.load_state_dict`` of a full state dict: moments of sharded parameters are sharded like them."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    # an index past the parameters is left for load_state_dict to reject with its own message
    per_param = {i: {k: _shard_like(v, params[i]) for k, v in s.items()} if i < len(params) else s
                 for i, s in state.get("state", {}).items()}
    # the kernel choice (fused / foreach) is this process's, not the saving one's: a fused run may resume sharded
    kernels = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict({**state, "state": per_param})
    for group, kernel in zip(optimizer.param_groups, kernels):
        group.update(kernel)


@contextmanager
def no_gradient_sync(module: FSDPModule) -> Iterator[None]:
    """Keep gradients local (no reduce-scatter) for a micro-batch that is not the last of an optimizer step: the
    FSDP counterpart of DDP's ``no_sync``."""
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)
