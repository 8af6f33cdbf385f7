"""Training checkpoints: everything needed to continue exactly, written atomically.

Random numbers need no state here: the trainer reseeds from (seed, step, rank) at every step.

A checkpoint is one ``torch.save`` file of plain tensors and numbers (loaded with ``weights_only=True``,
so loading never unpickles arbitrary objects). It is written to a temporary file in the same directory
and renamed over the old one: a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gear.files import atomic_write

CHECKPOINT_NAME = "last.pt"
FORMAT_VERSION = 1


def checkpoint_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints" / CHECKPOINT_NAME


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    payload = {"format_version": FORMAT_VERSION, **payload}
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: start the run without resume, or point to its run directory")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged zip/pickle
        raise ValueError(
            f"checkpoint {path} is unreadable ({type(err).__name__}); it is truncated or corrupt: "
            "restore it from a copy or restart the run"
        ) from None
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a gear training checkpoint (format {FORMAT_VERSION})")
    return payload
