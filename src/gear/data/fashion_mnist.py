"""Fashion-MNIST from its four original idx files (gzipped or not), read without any download.

The Debian package ``dataset-fashion-mnist`` installs them under ``DEFAULT_ROOT``; the environment variable
``GEAR_FASHION_MNIST`` or an explicit ``root`` points elsewhere.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from gear.data.transforms import Sample, pad_to, to_tensor_minus1_1

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
ROOT_ENV = "GEAR_FASHION_MNIST"
CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
SPLITS = {"train": "train", "test": "t10k"}  # split -> file name prefix
NATIVE_SIZE = 28
HINT = (
    "install the Debian package dataset-fashion-mnist, or download the four idx files into a directory "
    f"and set data.root=DIR (or {ROOT_ENV}=DIR)"
)

# idx type code -> big-endian numpy dtype
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def resolve_root(root: str | os.PathLike | None = None) -> Path:
    """An explicit ``root`` wins, then ``$GEAR_FASHION_MNIST``, then ``DEFAULT_ROOT``."""
    return Path(root or os.environ.get(ROOT_ENV) or DEFAULT_ROOT)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse one idx file (``.gz`` is decompressed): 2 zero bytes, a type code, the number of dims, then
    one big-endian uint32 per dim and the data. Raises ValueError naming the file if it is malformed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"idx file {path} not found: {HINT}")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"idx file {path} is truncated or not valid gzip ({err}): {HINT}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise ValueError(f"idx file {path} has a bad header (magic {raw[:4].hex() or 'missing'}): {HINT}")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"idx file {path} is truncated inside its header: {HINT}")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"idx file {path} holds {len(raw) - header} data bytes but its header {dims} needs {expected} "
            f"(truncated or corrupt): {HINT}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _split_file(root: Path, prefix: str, kind: str) -> Path:
    name = f"{prefix}-{kind}"
    for candidate in (root / f"{name}.gz", root / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"Fashion-MNIST file {root / name}.gz not found: {HINT}")


def load_split(root: str | os.PathLike | None = None, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """All images of a split as uint8 (N, 28, 28) and their labels as int64 (N,)."""
    if split not in SPLITS:
        raise ValueError(f"Fashion-MNIST split must be one of {tuple(SPLITS)}, got {split!r}")
    root = resolve_root(root)
    images_path = _split_file(root, SPLITS[split], "images-idx3-ubyte")
    labels_path = _split_file(root, SPLITS[split], "labels-idx1-ubyte")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (NATIVE_SIZE, NATIVE_SIZE):
        raise ValueError(f"{images_path} should hold uint8 (N, 28, 28) images, got {images.dtype} {images.shape}: {HINT}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"{labels_path} should hold {len(images)} labels, got shape {labels.shape}: {HINT}")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise ValueError(f"{labels_path} holds labels outside 0..{len(CLASSES) - 1}: {HINT}")
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


class FashionMNIST(Dataset):
    """Fashion-MNIST as RGB float images in [-1, 1].

    The 28 px images are padded symmetrically with black to 32 px when ``image_size`` is 32, kept as they
    are at 28, and resized bilinearly to any other size. The whole split is held as one uint8 tensor; ``limit`` keeps
    the first ``limit`` images. No augmentation: ``set_epoch`` exists only to match ``ImageFolder``.
    """

    classes = CLASSES
    num_classes = len(CLASSES)

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: str = "train",
        image_size: int = 32,
        limit: int | None = None,
    ) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be None (whole split) or >= 1, got {limit}")
        self.root, self.split, self.image_size = resolve_root(root), split, image_size
        images, labels = load_split(self.root, split)
        self.images, self.labels = images[:limit], labels[:limit]
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Sample:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a data set of {len(self)} images")
        grey = self.images[index]
        size = self.image_size
        if size == 32:
            grey = pad_to(grey, size, value=0)
        image = to_tensor_minus1_1(grey)  # (1, H, W)
        if image.shape[-1] != size:
            image = F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            image = image[0].clamp(-1.0, 1.0)
        return Sample(image.repeat(3, 1, 1), self.labels[index].clone(), index)
