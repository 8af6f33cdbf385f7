"""Atomic file writes: every file the project saves (weights, checkpoints, statistics, exports) goes through here."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path: str | os.PathLike, write: Callable[[str], object], suffix: str = ".tmp") -> Path:
    """``write(tmp)`` to a temporary file in the same directory, then rename it over ``path``: a crash mid-write
    leaves the previous file intact. ``suffix`` matters to writers that append one (``np.savez`` adds .npz)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
