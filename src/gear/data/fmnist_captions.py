"""Captioned Fashion-MNIST, built deterministically from the idx files: the offline text-to-image data set.

Each image gets one caption from a template over its class name (or a synonym) and two attributes measured on the
image itself:

- brightness: the mean grey level of the garment's pixels (those above ``INK``) -> dark | grey | bright;
- size: the number of the garment's pixels -> small | medium | large.

Both are cut at per-class tertiles of the training split, so within every class each word covers a third of the
images and neither attribute is decided by the class. Some templates and one synonym per class never appear in
training captions: ``prompts(..., templates="heldout")`` builds evaluation prompts from them.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch

from gear.data.fashion_mnist import NATIVE_SIZE, FashionMNIST, load_split, resolve_root

INK = 25  # grey level above which a pixel belongs to the garment
BRIGHTNESS = ("dark", "grey", "bright")
SIZE = ("small", "medium", "large")
ATTRIBUTES = {"brightness": BRIGHTNESS, "size": SIZE}
# The last name of each class is held out of the training captions.
NAMES = (
    ("t-shirt", "top", "tee"),
    ("trousers", "pants", "slacks"),
    ("pullover", "sweater", "jumper"),
    ("dress", "frock", "gown"),
    ("coat", "jacket", "overcoat"),
    ("sandal", "strappy sandal", "flip-flop"),
    ("shirt", "button-up shirt", "blouse"),
    ("sneaker", "trainer", "running shoe"),
    ("bag", "handbag", "purse"),
    ("ankle boot", "boot", "bootie"),
)
# {a}: "a" or "an" for the word after it; templates without {bright} or {size} leave that attribute unsaid.
TRAIN_TEMPLATES = (
    "{a} {size} {bright} {noun}",
    "a photo of {a} {bright} {noun}",
    "{a} {noun} that is {size}",
    "{bright} {noun}, {size}",
    "a picture of {a} {noun}",
    "{a} {size}, {bright} {noun} on a black background",
)
HELDOUT_TEMPLATES = (
    "an image showing {a} {bright} {noun} of {size} size",
    "{size} and {bright}: {a} {noun}",
    "product shot of {a} {noun}, {bright} and {size}",
)
TEMPLATE_SETS = {"train": TRAIN_TEMPLATES, "heldout": HELDOUT_TEMPLATES}


class CaptionedSample(NamedTuple):
    """A data set item with its caption; the default collate stacks tensors and lists the captions."""

    image: torch.Tensor  # float32 (3, S, S) in [-1, 1]
    label: torch.Tensor  # int64 scalar (class id; 0 for data without classes)
    index: int
    caption: str


def measure(grey: np.ndarray) -> np.ndarray:
    """Brightness and size of uint8 grey images (N, H, W) -> float64 (N, 2): garment mean level, garment pixels."""
    grey = np.asarray(grey, dtype=np.uint8).reshape(len(grey), -1)
    ink = grey > INK
    area = ink.sum(axis=1, dtype=np.int64)
    total = np.where(ink, grey, 0).sum(axis=1, dtype=np.int64)
    level = np.where(area > 0, total / np.maximum(area, 1), 0.0)
    return np.stack([level, area.astype(np.float64)], axis=1)


@lru_cache(maxsize=4)
def thresholds(root: str | None = None) -> np.ndarray:
    """Per-class tertile cuts of the training split: (10 classes, 2 attributes, 2 cuts)."""
    images, labels = load_split(root, "train")
    values, labels = measure(images.numpy()), labels.numpy()
    return np.stack([np.quantile(values[labels == c], [1 / 3, 2 / 3], axis=0).T for c in range(len(NAMES))])


def attribute_levels(values: np.ndarray, labels: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    """(N, 2) measured values of images of classes ``labels`` -> (N, 2) tertile levels in {0, 1, 2}."""
    per_image = cuts[labels]  # (N, 2, 2)
    return (values[:, :, None] > per_image).sum(-1)


def grey_28(images: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1] (N, C, S, S) at the data set's 32 px layout (28 px padded) or 28 px -> uint8 (N, 28, 28)."""
    grey = images.float().mean(1)
    if grey.shape[-1] == 32:
        grey = grey[:, 2:30, 2:30]
    elif grey.shape[-1] != NATIVE_SIZE:
        grey = torch.nn.functional.interpolate(grey[:, None], size=(NATIVE_SIZE, NATIVE_SIZE), mode="bilinear",
                                               antialias=True)[:, 0]
    return grey.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).numpy()


def caption(template: str, noun: str, brightness: int, size: int) -> str:
    text = template.format(a="{a}", noun=noun, bright=BRIGHTNESS[brightness], size=SIZE[size])
    before, sep, after = text.partition("{a}")
    if not sep:
        return text
    return before + ("an" if after.strip()[:1] in tuple("aeiou") else "a") + after


def names(label: int, heldout: bool = False) -> tuple[str, ...]:
    return NAMES[label][-1:] if heldout else NAMES[label][:-1]


def training_captions(labels: np.ndarray, levels: np.ndarray) -> list[str]:
    """The caption of each training image: template and name from a hash of the image's index alone."""
    index = np.arange(len(labels), dtype=np.uint64)
    h = (index * np.uint64(0x9E3779B1) + np.uint64(0x7F4A7C15)) & np.uint64(0xFFFFFFFF)
    template = (h >> np.uint64(8)) % np.uint64(len(TRAIN_TEMPLATES))
    name = (h >> np.uint64(20)) % np.uint64(len(NAMES[0]) - 1)
    return [caption(TRAIN_TEMPLATES[int(t)], names(int(c))[int(n)], int(b), int(s))
            for t, n, c, (b, s) in zip(template, name, labels, levels)]


class Prompt(NamedTuple):
    text: str
    label: int
    levels: tuple[int, int]  # brightness, size


def prompts(num: int, templates: str = "heldout", heldout_names: bool = False, seed: int = 0) -> list[Prompt]:
    """``num`` evaluation prompts with both attributes: classes in turn, attributes and template drawn from ``seed``."""
    if templates not in TEMPLATE_SETS:
        raise ValueError(f"templates must be one of {tuple(TEMPLATE_SETS)}, got {templates!r}")
    pool = [t for t in TEMPLATE_SETS[templates] if "{bright}" in t and "{size}" in t]
    rng = np.random.default_rng([11, seed])
    out = []
    for i in range(num):
        label = i % len(NAMES)
        levels = (int(rng.integers(3)), int(rng.integers(3)))
        nouns = names(label, heldout_names)
        text = caption(pool[rng.integers(len(pool))], nouns[rng.integers(len(nouns))], *levels)
        out.append(Prompt(text, label, levels))
    return out


def demo_prompts() -> list[str]:
    """One held-out-template prompt per class, for sample grids."""
    return [p.text for p in prompts(len(NAMES), "heldout", seed=1)]


class CaptionedFashionMNIST(FashionMNIST):
    """Fashion-MNIST with one deterministic caption per image (``captions`` lists the distinct ones)."""

    def __init__(self, root: str | os.PathLike | None = None, split: str = "train", image_size: int = 32,
                 limit: int | None = None) -> None:
        super().__init__(root, split, image_size, limit)
        cuts = thresholds(str(resolve_root(root)))
        labels = self.labels.numpy()
        levels = attribute_levels(measure(self.images.numpy()), labels, cuts)
        self.image_captions = training_captions(labels, levels)
        self.captions = sorted(set(self.image_captions))

    demo_prompts = staticmethod(demo_prompts)

    def __getitem__(self, index: int) -> CaptionedSample:
        sample = super().__getitem__(index)
        return CaptionedSample(*sample, self.image_captions[int(index)])
