"""The device a command names (``--device``): checked once, in gear.cli, with one line saying what to use instead."""

from __future__ import annotations

import torch


def parse_device(name: str, option: str = "--device") -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``mps``, when this machine has it; otherwise ValueError naming ``option``."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"{option}={name} is not a device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{option}={name} but no CUDA device is visible; use {option}=cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"{option}={name} but this machine has {count} CUDA device(s): use cuda:0 to cuda:{count - 1}")
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{option}={name} but no Apple GPU (MPS) is available; use {option}=cpu")
        return device
    raise ValueError(f"{option}={name}: gear runs on cpu, cuda[:N] or mps, not {device.type}")
