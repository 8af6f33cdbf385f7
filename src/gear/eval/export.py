"""Export samples for the ADM evaluator (guided-diffusion's evaluations/evaluator.py), which reads a
``.npz`` whose first array, ``arr_0``, holds uint8 (N, H, W, 3) RGB images: ``save_adm_npz`` from images in
memory, ``write_adm_npz_chunks`` from chunks streamed one by one (50,000 samples at 256 px are about 10 GB)."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable
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


def write_adm_npz_chunks(chunks: Iterable[np.ndarray], num: int, path: str | os.PathLike,
                         labels: np.ndarray | None = None) -> Path:
    """Write ``num`` uint8 (n, H, W, 3) images, given as consecutive chunks, as ``arr_0`` of an ADM-evaluator .npz
    without holding them all: the array's header goes first and each chunk's bytes are streamed into the zip member
    after it. ``labels`` (num,), when given, becomes ``arr_1``, as guided-diffusion's class-conditional samplers
    write it. Atomic like ``save_adm_npz``; a chunk of another size or layout, or a count other than ``num``, is a
    ValueError and leaves no file."""
    path = Path(path)
    if labels is not None and len(labels) != num:
        raise ValueError(f"{len(labels)} labels for {num} images")

    def write(tmp: str) -> None:
        written = 0
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open("arr_0.npy", "w", force_zip64=True) as member:  # its size is not known in advance
                for chunk in chunks:
                    if chunk.dtype != np.uint8 or chunk.ndim != 4 or chunk.shape[-1] != 3:
                        raise ValueError(f"chunks must be uint8 (n, H, W, 3), got {chunk.dtype} {chunk.shape}")
                    if written == 0:
                        shape = chunk.shape[1:]
                        header = {"descr": np.lib.format.dtype_to_descr(chunk.dtype), "fortran_order": False,
                                  "shape": (num, *shape)}
                        np.lib.format.write_array_header_1_0(member, header)
                    elif chunk.shape[1:] != shape:
                        raise ValueError(f"chunk of images {chunk.shape[1:]} after images {shape}")
                    written += len(chunk)
                    if written > num:
                        raise ValueError(f"more than the {num} images announced")
                    member.write(np.ascontiguousarray(chunk).data)
            if written != num:
                raise ValueError(f"{written} images written, {num} announced")
            if labels is not None:
                with archive.open("arr_1.npy", "w") as member:
                    np.lib.format.write_array(member, np.ascontiguousarray(labels))

    return atomic_write(path, write, suffix=".npz")
