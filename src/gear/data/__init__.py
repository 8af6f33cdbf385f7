"""Data sets returning ``Sample(image, label, index)``: Fashion-MNIST (the offline default) and ImageFolder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from gear.data.fashion_mnist import CLASSES, DEFAULT_ROOT, FashionMNIST, read_idx
from gear.data.image_folder import CROPS, ImageFolder
from gear.data.transforms import Sample, generator_for, save_image_grid, to_uint8_image

NAMES = ("fashion-mnist", "imagefolder")
SPLITS = ("train", "val", "test")  # "val" and "test" both name the held-out split
IMAGEFOLDER_SPLIT_DIRS = {"train": "train", "val": "val", "test": "val"}


@dataclass
class DataConfig:
    """The one source of defaults for data.

    imagefolder: ``root`` holds ``train/<class>/<image>`` and ``val/<class>/<image>`` (ImageNet layout).
    """

    name: str = "fashion-mnist"  # "fashion-mnist" | "imagefolder"
    root: str = ""  # "" -> the Fashion-MNIST default root ($GEAR_FASHION_MNIST or the Debian package's)
    image_size: int = 32
    limit: int = 0  # 0 = whole split; else the first N images (small demos/tests)
    num_workers: int = 0
    random_flip: bool = True  # imagefolder train split: horizontal flip with p = 0.5
    crop: str = "resize"  # imagefolder: "resize" (short-side bicubic) | "adm" (box halving first, as ADM)
    # ar stage: a directory written by `gear extract` holding the training images' codes under the frozen
    # tokenizer (and the teacher's features): the AR then trains on them without encoding. "" = encode on the fly.
    code_store: str = ""

    def __post_init__(self) -> None:
        if self.name not in NAMES:
            raise ValueError(f"data.name must be one of {NAMES}, got {self.name!r}")
        if self.image_size < 1 or self.limit < 0 or self.num_workers < 0:
            raise ValueError(
                f"data.image_size must be >= 1 and data.limit, data.num_workers >= 0, got "
                f"{self.image_size}, {self.limit}, {self.num_workers}"
            )
        if self.crop not in CROPS:
            raise ValueError(f"data.crop must be one of {CROPS}, got {self.crop!r}")


def build_dataset(cfg: DataConfig, split: str = "train", seed: int = 0) -> Dataset:
    """The data set ``cfg`` names, for ``split`` in ("train", "val", "test"). ``seed`` drives the
    reproducible imagefolder augmentations (call ``set_epoch`` on the result each epoch)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    limit = cfg.limit or None
    if cfg.name == "fashion-mnist":
        return FashionMNIST(cfg.root or None, "train" if split == "train" else "test", cfg.image_size, limit)
    if cfg.name == "imagefolder":
        if not cfg.root:
            raise ValueError("data.root must be set for data.name=imagefolder (a directory holding train/ and val/)")
        return ImageFolder(
            Path(cfg.root) / IMAGEFOLDER_SPLIT_DIRS[split],
            image_size=cfg.image_size,
            train=split == "train",
            seed=seed,
            random_flip=cfg.random_flip,
            crop=cfg.crop,
            limit=limit,
        )
    raise ValueError(f"unknown data set {cfg.name!r}; valid names: {NAMES}")


__all__ = [
    "CLASSES", "DEFAULT_ROOT", "DataConfig", "FashionMNIST", "ImageFolder", "Sample",
    "build_dataset", "generator_for", "read_idx", "save_image_grid", "to_uint8_image",
]
