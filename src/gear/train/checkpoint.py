"""Training checkpoints: everything needed to continue exactly, written atomically, with older ones kept.

Random numbers need no state here: the trainer reseeds from (seed, step, rank) at every step.

A checkpoint is one ``torch.save`` file of plain tensors and numbers (loaded with ``weights_only=True``,
so loading never unpickles arbitrary objects). It is written to a temporary file in the same directory, flushed
to disk and renamed over the old one: a crash or a full disk mid-write leaves the previous checkpoint intact.

``checkpoints/last.pt`` is the latest. With ``keep`` > 0 (``train.keep_checkpoints``) every checkpoint is also
``checkpoints/step_0000500.pt`` (a hard link to the same file where the file system allows, so no second
write), and the ``keep`` most recent step files besides the latest stay: when last.pt is unreadable,
``load_for_resume`` falls back to the newest readable one.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gear.files import UnsafeFileError, atomic_write, fsync_dir, load_tensors, save_tensors
from gear.run import CHECKPOINT_DIR, checkpoint_path

STEP_PATTERN = re.compile(r"^step_(\d+)\.pt$")
FORMAT_VERSION = 1


def step_checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:07d}.pt"


def step_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """The step-numbered checkpoints of a run, newest first."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), folder / name) for name in os.listdir(folder) if (m := STEP_PATTERN.match(name))]
    return sorted(found, reverse=True)


def has_checkpoint(run_dir: str | Path) -> bool:
    return checkpoint_path(run_dir).is_file() or bool(step_checkpoints(run_dir))


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    payload = {"format_version": FORMAT_VERSION, **payload}
    return atomic_write(path, lambda tmp: save_tensors(payload, tmp))


def save_run_checkpoint(run_dir: str | Path, step: int, payload: dict[str, Any], keep: int) -> Path:
    """Write the checkpoint of ``step`` as last.pt (and as a step file when ``keep`` > 0); prune older step files.

    Step files of later steps are dropped too: they belong to a timeline this run abandoned when it resumed from
    an older checkpoint."""
    last = checkpoint_path(run_dir)
    _remove_temporaries(last.parent)
    if keep <= 0:
        return save_checkpoint(last, payload)
    numbered = save_checkpoint(step_checkpoint_path(run_dir, step), payload)
    try:
        atomic_write(last, lambda tmp: (os.remove(tmp), os.link(numbered, tmp)))
    except OSError:  # no hard links here (some network and FUSE file systems): a second copy
        atomic_write(last, lambda tmp: shutil.copyfile(numbered, tmp))
    for other_step, path in step_checkpoints(run_dir):
        if other_step > step or (other_step < step and keep <= 0):
            path.unlink(missing_ok=True)
        elif other_step < step:
            keep -= 1
    fsync_dir(last.parent)
    return last


def _remove_temporaries(folder: Path) -> None:
    """Temporary files of writes that a killed process never finished (only this run's writer uses the folder)."""
    if folder.is_dir():
        for path in folder.glob(".*.tmp"):
            path.unlink(missing_ok=True)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: start the run without resume, or point to its run directory")
    try:
        payload = load_tensors(path, "checkpoint")
    except ValueError as err:
        if "truncated or corrupt" in str(err):
            raise ValueError(f"{err}: restore it from a copy or restart the run") from None
        raise
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a gear training checkpoint (format {FORMAT_VERSION})")
    return payload


@dataclass
class Resumed:
    payload: dict[str, Any]
    path: Path
    note: str = ""          # set when last.pt could not be used: which file was used instead, and why


def load_for_resume(run_dir: str | Path) -> Resumed:
    """last.pt, or when it is missing or unreadable the newest readable step checkpoint (saying so in ``note``)."""
    last = checkpoint_path(run_dir)
    try:
        return Resumed(load_checkpoint(last), last)
    except (ValueError, FileNotFoundError) as err:
        failure = err
    for step, path in step_checkpoints(run_dir):
        if last.is_file() and os.path.samefile(path, last):
            continue  # the same file under a second name
        try:
            payload = load_checkpoint(path)
        except (ValueError, FileNotFoundError):
            continue
        return Resumed(payload, path, f"{last} {_why(failure)}: resuming from {path} (step {step}) instead")
    raise failure


def _why(err: Exception) -> str:
    if isinstance(err, FileNotFoundError):
        return "is missing"
    if isinstance(err, UnsafeFileError):
        return "holds pickled objects that could run code"
    return "is unreadable (truncated, corrupt or not a gear checkpoint)"
