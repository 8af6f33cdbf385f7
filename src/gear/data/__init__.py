"""Data sets returning ``Sample(image, label, index)``: Fashion-MNIST (the offline default) and ImageFolder; and
captioned ones returning ``CaptionedSample(image, label, index, caption)``: captioned Fashion-MNIST (offline), a JSONL
manifest, WebDataset tar shards."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from gear.data.bad_samples import ON_BAD_SAMPLE, BadSample, BadSamples
from gear.data.captioned import JsonlCaptions, WebDatasetCaptions
from gear.data.fashion_mnist import CLASSES, DEFAULT_ROOT, FashionMNIST, read_idx
from gear.data.fmnist_captions import CaptionedFashionMNIST, CaptionedSample
from gear.data.image_folder import CROPS, ImageFolder
from gear.data.shard_io import is_pipe, refuse_pipe
from gear.data.shards import ShardedCaptions
from gear.data.transforms import Sample, generator_for, save_image_grid, to_uint8_image

CAPTIONED = ("fashion-mnist-captions", "jsonl", "webdataset")
NAMES = ("fashion-mnist", "imagefolder", *CAPTIONED)
SPLITS = ("train", "val", "test")  # "val" and "test" both name the held-out split
IMAGEFOLDER_SPLIT_DIRS = {"train": "train", "val": "val", "test": "val"}
STREAM_SPLITS = ("shards", "exact")


@dataclass
class DataConfig:
    """The one source of defaults for data.

    imagefolder: ``root`` holds ``train/<class>/<image>`` and ``val/<class>/<image>`` (ImageNet layout).
    jsonl: ``root`` is the training manifest (``{"image": path, "caption": text}`` lines), ``val_root`` the held-out one.
    webdataset: ``root`` is the training shards (``/data/train-{000000..000099}.tar``,
    ``https://host/train-{000000..000099}.tar``, ``pipe:aws s3 cp s3://bucket/train-{000000..000099}.tar -``),
    ``val_root`` the held-out ones. See docs/shards.md.
    """

    name: str = "fashion-mnist"  # "fashion-mnist" | "imagefolder" | "fashion-mnist-captions" | "jsonl" | "webdataset"
    root: str = ""  # "" -> the Fashion-MNIST default root ($GEAR_FASHION_MNIST or the Debian package's)
    image_size: int = 32
    limit: int = 0  # 0 = whole split; else the first N images (small demos/tests)
    num_workers: int = 0  # loader worker processes (webdataset shards: each reads its own shards)
    random_flip: bool = True  # imagefolder train split: horizontal flip with p = 0.5
    crop: str = "resize"  # imagefolder: "resize" (short-side bicubic) | "adm" (box halving first, as ADM)
    val_root: str = ""  # jsonl / webdataset: the held-out manifest or shards ("" = root)
    # An image that cannot be decoded: "stop" names it and stops; "skip" trains on the next readable one instead
    # (deterministic, listed in the run's bad_samples.jsonl). Fashion-MNIST is checked whole when it is read.
    on_bad_sample: str = "stop"
    # ar stage: a directory written by `gear extract` holding the training images' codes under the frozen
    # tokenizer (and the teacher's features): the AR then trains on them without encoding. "" = encode on the fly.
    code_store: str = ""
    # webdataset: "shards" = each process and loader worker reads its own shards, resumes without replay (the
    # default); "exact" = every process reads every shard and keeps its slice of each global batch, so batches equal
    # a one-process run's (small runs; in-process only; a resume reads the stream again up to its step)
    stream_split: str = "shards"
    shuffle_buffer: int = 1000  # webdataset, shard split: samples each reader shuffles among (0 or 1 = shard order)
    allow_pipe: bool = False  # webdataset: allow `pipe:` shards, which run a shell command (pipe:curl -s URL)

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
        if self.stream_split not in STREAM_SPLITS:
            raise ValueError(f"data.stream_split must be one of {STREAM_SPLITS}, got {self.stream_split!r}")
        if self.shuffle_buffer < 0:
            raise ValueError(f"data.shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        if self.name == "webdataset" and self.stream_split == "exact" and self.num_workers:
            raise ValueError("data.num_workers must be 0 with data.stream_split=exact (the shards are read in the "
                             "training process); the default data.stream_split=shards reads them in loader workers")
        pipes = [r for r in (self.root, self.val_root) if is_pipe(r)]
        if self.name == "webdataset" and pipes and not self.allow_pipe:
            raise refuse_pipe(pipes[0])
        if self.on_bad_sample not in ON_BAD_SAMPLE:
            raise ValueError(f"data.on_bad_sample must be one of {ON_BAD_SAMPLE}, got {self.on_bad_sample!r}")


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
            on_bad_sample=cfg.on_bad_sample,
        )
    if cfg.name == "fashion-mnist-captions":
        return CaptionedFashionMNIST(cfg.root or None, "train" if split == "train" else "test", cfg.image_size, limit)
    if cfg.name in ("jsonl", "webdataset"):
        root = cfg.root if split == "train" else (cfg.val_root or cfg.root)
        if not root:
            raise ValueError(f"data.root must be set for data.name={cfg.name} (the training manifest or shards)")
        options = dict(image_size=cfg.image_size, train=split == "train", seed=seed, random_flip=cfg.random_flip,
                       crop=cfg.crop, on_bad_sample=cfg.on_bad_sample)
        if cfg.name == "jsonl":
            return JsonlCaptions(root, limit=limit, **options)
        if cfg.stream_split == "exact":
            return WebDatasetCaptions(root, allow_pipe=cfg.allow_pipe, **options)
        return ShardedCaptions(root, shuffle_buffer=cfg.shuffle_buffer, allow_pipe=cfg.allow_pipe, **options)
    raise ValueError(f"unknown data set {cfg.name!r}; valid names: {NAMES}")


__all__ = [
    "CAPTIONED", "CLASSES", "DEFAULT_ROOT", "BadSample", "BadSamples", "CaptionedFashionMNIST", "CaptionedSample",
    "DataConfig", "FashionMNIST", "ImageFolder", "JsonlCaptions", "STREAM_SPLITS", "Sample", "ShardedCaptions",
    "WebDatasetCaptions",
    "build_dataset", "generator_for", "read_idx", "save_image_grid", "to_uint8_image",
]
