"""A small CNN classifier for 32x32 images in [-1, 1], trained on the real training split.

It serves two purposes during and after GEAR training on Fashion-MNIST:
- class accuracy of generated samples (does the class token steer the generator?), read next to the
  classifier's own accuracy on the real test split;
- cheap penultimate features (``feature_dim``-d) for a Frechet distance ("FD-classifier") that can be
  computed every few thousand steps, where Inception FID is too slow on a CPU.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from gear.eval.convert import ImageBatch, to_float_nchw
from gear.models.pretrained import Pretrained


@dataclass
class ClassifierConfig:
    num_classes: int = 10
    image_size: int = 32
    in_channels: int = 3
    # A stride-2 4x4 stem of widths[0] channels, then one 3x3 conv + 2x2 max-pool stage per further entry.
    # No normalization layers: they cost more than the convolutions on a CPU at this size.
    widths: tuple[int, ...] = (16, 32, 64)
    feature_dim: int = 128
    dropout: float = 0.1


class Classifier(nn.Module, Pretrained):
    config_class = ClassifierConfig
    kind = "classifier"

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        if not config.widths:
            raise ValueError("widths must name at least the stem's channels, e.g. (16, 32, 64)")
        if config.image_size % 2 ** len(config.widths):
            raise ValueError(f"image_size {config.image_size} must be divisible by 2**len(widths) = {2 ** len(config.widths)}")
        self.config = config
        layers: list[nn.Module] = [nn.Conv2d(config.in_channels, config.widths[0], 4, stride=2, padding=1), nn.ReLU()]
        channels = config.widths[0]
        for width in config.widths[1:]:
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            channels = width
        self.conv = nn.Sequential(*layers)
        side = config.image_size // 2 ** len(config.widths)
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(channels * side * side, config.feature_dim), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(config.feature_dim, config.num_classes))

    def _check(self, images: torch.Tensor) -> torch.Tensor:
        c = self.config
        if images.ndim != 4 or images.shape[2:] != (c.image_size, c.image_size) or images.shape[1] not in (1, c.in_channels):
            raise ValueError(
                f"classifier expects (N, {c.in_channels}, {c.image_size}, {c.image_size}) images in [-1, 1] "
                f"(a grey channel is replicated), got shape {tuple(images.shape)}"
            )
        if images.shape[1] != c.in_channels:
            images = images.expand(-1, c.in_channels, -1, -1)
        return images.to(next(self.parameters()).device, torch.float32)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate activations, (N, feature_dim)."""
        return self.embed(self.conv(self._check(images)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits, (N, num_classes)."""
        return self.head(self.features(images))

    @property
    def name(self) -> str:
        """Identifies these weights (a digest of the parameters), for caching reference statistics."""
        digest = hashlib.sha1()
        for key, value in sorted(self.state_dict().items()):
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        return f"classifier-{digest.hexdigest()[:10]}"


@dataclass
class ClassifierResult:
    accuracy: float
    loss: float
    num: int


def train_classifier(
    images: ImageBatch,
    labels: torch.Tensor,
    steps: int,
    *,
    config: ClassifierConfig | None = None,
    batch_size: int = 128,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    warmup: int = 50,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> Classifier:
    """Train from scratch with AdamW and a linear warmup + cosine decay; returns the model in eval mode.

    On Fashion-MNIST (padded to 32 px, RGB) the default config reached 89.9% test accuracy after 1000 steps
    of batch 128 (40 s on 2 idle CPU cores) and 90.7% after 1500.

    ``images``: (N, C, H, W) float in [-1, 1] (or uint8 NHWC), held on the CPU and batched by index.
    Batches are drawn by a seeded permutation per epoch, so a run is reproducible on one device.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    images = to_float_nchw(images)
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if labels.shape != (len(images),):
        raise ValueError(f"labels must be (N,) = ({len(images)},) class ids, got shape {tuple(labels.shape)}")
    config = config or ClassifierConfig(num_classes=int(labels.max()) + 1, image_size=images.shape[-1])
    if labels.min() < 0 or labels.max() >= config.num_classes:
        raise ValueError(f"labels must lie in [0, {config.num_classes}), got [{labels.min()}, {labels.max()}]")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Classifier(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    order, cursor = torch.randperm(len(images), generator=generator), 0
    for _ in tqdm(range(steps), disable=not progress, desc="classifier"):
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(images), generator=generator), 0
        index = order[cursor : cursor + batch_size]
        cursor += batch_size
        logits = model(images[index])
        loss = F.cross_entropy(logits, labels[index].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return model.eval()


@torch.no_grad()
def predict(model: Classifier, images: ImageBatch, batch_size: int = 500) -> torch.Tensor:
    """Predicted class ids, (N,) int64 on the CPU."""
    images = to_float_nchw(images)
    return torch.cat([model(images[i : i + batch_size]).argmax(-1).cpu() for i in range(0, len(images), batch_size)])


@torch.no_grad()
def classifier_accuracy(model: Classifier, images: ImageBatch, labels: torch.Tensor, batch_size: int = 500) -> ClassifierResult:
    """Top-1 accuracy and mean cross-entropy of ``model`` on labelled images."""
    images = to_float_nchw(images)
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if labels.shape != (len(images),) or len(images) == 0:
        raise ValueError(f"need (N,) labels for N >= 1 images, got {len(images)} images and labels of shape {tuple(labels.shape)}")
    correct, loss_sum = 0, 0.0
    for i in range(0, len(images), batch_size):
        logits = model(images[i : i + batch_size]).cpu()
        target = labels[i : i + batch_size]
        correct += int((logits.argmax(-1) == target).sum())
        loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
    return ClassifierResult(accuracy=correct / len(images), loss=loss_sum / len(images), num=len(images))


def classifier_features(model: Classifier, images: ImageBatch, batch_size: int = 500) -> np.ndarray:
    """Penultimate features as float64 (N, feature_dim), the layout the Frechet distance expects."""
    images = to_float_nchw(images)
    with torch.no_grad():
        chunks = [model.features(images[i : i + batch_size]).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(chunks).double().numpy()
