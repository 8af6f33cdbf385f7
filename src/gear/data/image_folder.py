"""Images in the ImageNet layout ``<root>/<class>/<image>``, labelled by sorted class folder name.

Augmentation is reproducible: the random crop and flip of item ``i`` come from a generator seeded with
``(seed, epoch, i)`` (see ``generator_for``). Call ``set_epoch(epoch)`` before each epoch, as with a
``DistributedSampler``; a resumed run that sets the same epoch sees the same crops. With DataLoader workers,
do not use ``persistent_workers=True``: the workers would keep a copy made before ``set_epoch``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from gear.data.bad_samples import BadSample, BadSamples
from gear.data.transforms import Sample, center_crop, generator_for, hflip, random_crop, resize_short_side, to_tensor_minus1_1

EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CROPS = ("resize", "adm")


def find_classes(root: Path) -> list[str]:
    """Sorted names of the visible subdirectories of ``root``."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist; expected the layout {root}/<class>/<image>")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"image folder {root} has no class folders; expected the layout {root}/<class>/<image>")
    return classes


def find_images(directory: Path, extensions: tuple[str, ...]) -> list[Path]:
    """Image files under ``directory`` (recursively, following links), in sorted order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames.sort()
        found += [Path(dirpath, f) for f in sorted(filenames) if f.lower().endswith(extensions)]
    return found


DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def load_rgb(path: Path) -> Image.Image:
    """Decode an image fully as RGB; a file PIL cannot read raises ValueError naming it."""
    try:
        return decode_rgb(path)
    except DECODE_ERRORS as err:
        raise ValueError(f"cannot read image {path} ({type(err).__name__}: {err}); remove or replace the file") from None


def decode_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


class ImageFolder(Dataset):
    """Class-labelled images as float32 (3, image_size, image_size) in [-1, 1].

    train: short-side resize (bicubic) to ``image_size``, random ``image_size`` crop, horizontal flip with
    probability 0.5 (if ``random_flip``). eval: the same resize, then a center crop. ``crop="adm"`` adds the ADM
    box-filter halving before the resize (eval then equals ``center_crop_arr``, the preprocessing of the
    ImageNet FID reference batches). ``limit`` keeps the first ``limit`` files in sorted order. A file that cannot
    be decoded stops with its name (``on_bad_sample="stop"``) or is replaced by the next readable one ("skip",
    see ``gear.data.bad_samples``).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        image_size: int = 256,
        train: bool = True,
        extensions: tuple[str, ...] = EXTENSIONS,
        seed: int = 0,
        random_flip: bool = True,
        crop: str = "resize",
        limit: int | None = None,
        on_bad_sample: str = "stop",
    ) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be None (all images) or >= 1, got {limit}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.root = Path(root)
        self.image_size, self.train, self.seed, self.random_flip, self.crop = image_size, train, seed, random_flip, crop
        self.classes = find_classes(self.root)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        extensions = tuple(e.lower() for e in extensions)
        self.samples: list[tuple[Path, int]] = []
        for name in self.classes:
            files = find_images(self.root / name, extensions)
            if not files:
                raise ValueError(f"class folder {self.root / name} holds no image with an extension in {extensions}")
            self.samples += [(f, self.class_to_idx[name]) for f in files]
        self.samples = self.samples[:limit]
        self.epoch = 0
        self.bad_samples = BadSamples(on_bad_sample, self._load_at_epoch, len(self.samples))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentations of this epoch (they depend only on seed, epoch and index)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def resized(self, index: int) -> np.ndarray:
        """Item ``index`` decoded and short-side resized to image_size (before any crop or flip), uint8 HWC."""
        path = self.samples[index][0]
        try:
            image = decode_rgb(path)
        except DECODE_ERRORS as err:
            raise BadSample(str(path), f"{type(err).__name__}: {err}") from None
        return np.asarray(resize_short_side(image, self.image_size, box_prereduce=self.crop == "adm"))

    def draws_flip(self, generator: torch.Generator) -> bool:
        """The flip decision, drawn after the crop offsets (a code store replays this to pick the flipped codes)."""
        return self.random_flip and bool(torch.rand((), generator=generator) < 0.5)

    def flipped(self, index: int, epoch: int) -> bool:
        """Whether item ``index`` is flipped in ``epoch``, for an image whose resized size is exactly
        image_size x image_size (its crop is then fixed, and the crop's draws are replayed without decoding)."""
        generator = generator_for(self.seed, epoch, index)
        random_crop(np.empty((self.image_size, self.image_size), dtype=np.uint8), self.image_size, generator)
        return self.draws_flip(generator)

    def __getitem__(self, index: int) -> Sample:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a data set of {len(self)} images")
        return self.bad_samples.read(index)

    def _load_at_epoch(self, index: int) -> Sample:
        return self.load(index, generator_for(self.seed, self.epoch, index) if self.train else None)

    def load(self, index: int, generator: torch.Generator | None = None) -> Sample:
        """Item ``index`` with its random crop / flip drawn from ``generator`` (train), or deterministic (eval)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a data set of {len(self)} images")
        if self.train and generator is None:
            raise ValueError("a train ImageFolder needs a generator for its random crop; use dataset[index]")
        label = self.samples[index][1]
        pixels = self.resized(index)
        if self.train:
            pixels = random_crop(pixels, self.image_size, generator)
            if self.draws_flip(generator):
                pixels = hflip(pixels)
        else:
            pixels = center_crop(pixels, self.image_size)
        return Sample(to_tensor_minus1_1(pixels), torch.tensor(label, dtype=torch.int64), index)
