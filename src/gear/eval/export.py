"""Export samples for the ADM evaluator (guided-diffusion's evaluations/evaluator.py), which reads a
``.npz`` whose first array, ``arr_0``, holds uint8 (N, H, W, 3) RGB images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from gear.files import atomic_write
from gear.eval.convert import ImageBatch, to_rgb, to_uint8_nhwc


def save_adm_npz(images: ImageBatch, path: str | os.PathLike) -> Path:
    """Write ``images`` (float (N, C, H, W) in [-1, 1] or uint8 (N, H, W, C)) as uint8 NHWC RGB under ``arr_0``.

    Float images are clamped and rounded to uint8; grey images are replicated to three channels.
    The file is written atomically; ``.npz`` is appended to ``path`` if missing. Returns the final path.
    """
    array = to_rgb(to_uint8_nhwc(images))
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    return atomic_write(path, lambda tmp: np.savez(tmp, arr_0=array), suffix=".npz")
