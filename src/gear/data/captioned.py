"""Captioned images from disk: a JSONL manifest, or WebDataset tar shards (GEAR's format).

- ``JsonlCaptions``: one ``{"image": path, "caption": text}`` object per line; relative paths are read from the
  manifest's folder. A map-style data set (exact resume, any number of processes, as ImageFolder).
- ``WebDatasetCaptions``: tar shards read with the ``webdataset`` package (local, ``http(s)://`` or ``pipe:``, see
  gear.data.shard_io); a sample is an image (jpg, png, webp, ...) plus a caption in ``.json`` (key ``caption``) or
  ``.txt``. This is the exact split (``data.stream_split=exact``): every process reads the shards in the same order
  (shuffled per epoch from the seed) and keeps its own slice of each global batch, so the batches are the
  one-process run's; a resumed run reads the stream again up to its step. The default split, where each process
  and loader worker reads its own shards, is gear.data.shards.ShardedCaptions.

Bad samples follow ``data.on_bad_sample`` (gear.data.bad_samples): ``stop`` raises a one-line error naming the
sample; ``skip`` substitutes another one deterministically (the manifest's next readable item; in a stream, the next
readable sample of the process's own slice) and the trainer lists it in the run's bad_samples.jsonl. A manifest
line or a tar member that is not a sample at all is reported by the reader (``stop``) or skipped with a
``SkippedSample`` warning (``skip``).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset

from gear.data.fmnist_captions import CaptionedSample
from gear.data.image_folder import DECODE_ERRORS, EXTENSIONS, decode_rgb
from gear.data.transforms import center_crop, generator_for, hflip, random_crop, resize_short_side, to_tensor_minus1_1
from gear.data.bad_samples import SkippedSample  # noqa: F401  (where readers of this module look for it)
from gear.data.bad_samples import BadSample, BadSamples, StreamBadSamples, not_a_sample
from gear.data.shard_io import expand_shards, read_shard


def check_caption(value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadSample(f"caption must be a non-empty string, got {value!r}")
    return value.strip()


class CaptionTransform:
    """Short-side resize, then a random crop and flip (train, drawn from ``generator``) or a center crop."""

    def __init__(self, image_size: int, train: bool, random_flip: bool, crop: str):
        self.image_size, self.train, self.random_flip, self.crop = image_size, train, random_flip, crop

    def __call__(self, image: Image.Image, generator: torch.Generator | None) -> torch.Tensor:
        pixels = np.asarray(resize_short_side(image, self.image_size, box_prereduce=self.crop == "adm"))
        if self.train:
            pixels = random_crop(pixels, self.image_size, generator)
            if self.random_flip and torch.rand((), generator=generator) < 0.5:
                pixels = hflip(pixels)
        else:
            pixels = center_crop(pixels, self.image_size)
        return to_tensor_minus1_1(pixels)


class JsonlCaptions(Dataset):
    """Images and captions listed in a JSONL manifest."""

    classes = ()

    def __init__(self, manifest: str | os.PathLike, image_size: int = 256, train: bool = True, seed: int = 0,
                 random_flip: bool = True, crop: str = "resize", on_bad_sample: str = "stop", limit: int | None = None):
        self.manifest = Path(manifest)
        if not self.manifest.is_file():
            raise FileNotFoundError(f"caption manifest {self.manifest} not found; expected a JSONL file of "
                                    '{"image": path, "caption": text} lines')
        self.transform = CaptionTransform(image_size, train, random_flip, crop)
        self.train, self.seed, self.epoch = train, seed, 0
        self.items: list[tuple[Path, str]] = []
        with open(self.manifest, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
                        raise BadSample('expected {"image": path, "caption": text}')
                    self.items.append((self.manifest.parent / entry["image"], check_caption(entry.get("caption"))))
                except (json.JSONDecodeError, BadSample) as err:
                    not_a_sample(on_bad_sample, f"{self.manifest} line {lineno}", err)
        self.items = self.items[:limit]
        if not self.items:
            raise ValueError(f"caption manifest {self.manifest} lists no usable image")
        self.captions = sorted({c for _, c in self.items})
        self.bad_samples = BadSamples(on_bad_sample, self._load_item, len(self.items))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> CaptionedSample:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a data set of {len(self)} images")
        return self.bad_samples.read(index)

    def _load_item(self, index: int) -> CaptionedSample:
        path, text = self.items[index]
        if not path.is_file():
            raise BadSample(str(path), "no such file")
        try:
            image = decode_rgb(path)
        except DECODE_ERRORS as err:
            raise BadSample(str(path), f"{type(err).__name__}: {err}") from None
        generator = generator_for(self.seed, self.epoch, index) if self.train else None
        return CaptionedSample(self.transform(image, generator), torch.tensor(0), index, text)


def decode_webdataset_sample(sample: dict) -> tuple[Image.Image, str]:
    """The RGB image and the caption of a raw WebDataset sample (a dict of member bytes), or ``BadSample``."""
    image_key = next((k for k in sample if "." + k.lower() in EXTENSIONS), None)
    if image_key is None:
        raise BadSample(f"no image among {sorted(k for k in sample if not k.startswith('__'))}")
    try:
        with Image.open(io.BytesIO(sample[image_key])) as im:
            image = im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise BadSample(f"unreadable {image_key} image ({type(err).__name__})") from None
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadSample("invalid .json caption") from None
        text = meta.get("caption") if isinstance(meta, dict) else None
    elif "txt" in sample:
        text = sample["txt"].decode("utf-8", errors="strict") if isinstance(sample["txt"], bytes) else sample["txt"]
    else:
        raise BadSample("no .json or .txt caption")
    return image, check_caption(text)


class WebDatasetCaptions(IterableDataset):
    """An endless stream of captioned images from tar shards (``urls``: a brace pattern or a list)."""

    classes = ()

    def __init__(self, urls: str | list[str], image_size: int = 256, train: bool = True, seed: int = 0,
                 random_flip: bool = True, crop: str = "resize", on_bad_sample: str = "stop", allow_pipe: bool = False):
        self.shards = expand_shards(urls, allow_pipe)
        self.on_bad_sample = on_bad_sample
        self.counted = [0]  # bytes read from the shards by this process
        self.bad_samples = StreamBadSamples(on_bad_sample)
        self.transform = CaptionTransform(image_size, train, random_flip, crop)
        self.train, self.seed = train, seed
        self.position = (0, 0, 1, 1)  # start sample, rank, world size, global batch: set by batch_stream

    @property
    def bytes_read(self) -> int:
        """Bytes this process read from the shards."""
        return self.counted[0]

    def configure(self, start_step: int, rank: int, world_size: int, global_batch: int) -> None:
        self.position = (start_step * global_batch, rank, world_size, global_batch)

    @staticmethod
    def positions(step: int, rank: int, world_size: int, global_batch: int) -> torch.Tensor:
        """The stream positions of a process's slice of step ``step``'s batch (what it asks for)."""
        local = global_batch // world_size
        return torch.arange(local) + step * global_batch + rank * local

    def _raw(self) -> Iterator[tuple[int, str, dict]]:
        """(global position, shard, raw sample) forever: epochs of the shards, shuffled per epoch when training."""
        position, epoch = 0, 0
        while True:
            order = list(self.shards)
            if self.train:
                perm = torch.randperm(len(order), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
                order = [order[i] for i in perm]
            for shard in order:
                for _, sample in read_shard(shard, self.on_bad_sample, counted=self.counted):
                    yield position, shard, sample
                    position += 1
            if position == 0:
                raise BadSample(f"webdataset shards {self.shards[0]}...: no samples at all")
            epoch += 1

    def __iter__(self) -> Iterator[CaptionedSample]:
        start, rank, world, batch = self.position
        local = batch // world
        waiting = 0  # bad samples of this slice whose place the next readable one takes
        for position, shard, sample in self._raw():
            if position < start or (position % batch) // local != rank:
                continue
            try:
                image, text = decode_webdataset_sample(sample)
            except BadSample as err:
                self.bad_samples.bad(position, BadSample(f"{sample.get('__key__', '?')} in {shard}", str(err)))
                waiting += 1
                continue
            generator = generator_for(self.seed, 0, position) if self.train else None
            good = CaptionedSample(self.transform(image, generator), torch.tensor(0), position, text)
            for _ in range(waiting + 1):
                yield good
            waiting = 0
