"""High-level evaluation of a generator (FID, precision/recall, class accuracy) and of a tokenizer
(rFID, PSNR, SSIM, codebook usage).

Both take plain callables, so they know nothing about the models: the caller wraps generator + tokenizer
into ``sample_fn(labels) -> images`` and the tokenizer into ``reconstruct_fn(images) -> images``.
The feature network is switchable: ``"inception"`` (the standard FID network; slow on a CPU) for end
points, ``"classifier"`` (the project's small classifier, a cheap Frechet distance) for training curves.
Reference statistics of the real images can be computed once with ``reference_stats`` (optionally
cached on disk) and passed in instead of the images.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator, Protocol

import numpy as np
import torch
from tqdm import tqdm

from gear.eval.classifier import Classifier, classifier_features, predict
from gear.eval.codebook import CodebookCounter
from gear.eval.convert import to_float_nchw, to_uint8_nhwc
from gear.eval.fid import FeatureStats, cached_reference_stats, compute_stats, frechet_distance, stats_key
from gear.eval.image_metrics import psnr_per_image, ssim_per_image
from gear.eval.inception import FIDInception
from gear.eval.prdc import precision_recall


class FeatureExtractor(Protocol):
    """``features`` maps float (N, C, H, W) images in [-1, 1] to (N, D) float64; ``name`` identifies the
    network and its weights (it goes into cache keys and metric reports)."""

    name: str

    def features(self, images: torch.Tensor) -> np.ndarray: ...


class ClassifierFeatures:
    """The classifier's penultimate features as a feature extractor; its name identifies the weights."""

    def __init__(self, classifier: Classifier) -> None:
        self.classifier = classifier
        self.name = classifier.name

    def features(self, images: torch.Tensor) -> np.ndarray:
        return classifier_features(self.classifier, images)


def make_feature_extractor(feature: str | FeatureExtractor = "inception", classifier: Classifier | None = None) -> FeatureExtractor:
    """``"inception"``, ``"classifier"`` (needs ``classifier``), or an extractor passed through as is.

    ``"inception"`` loads a fresh network on the CPU; to run it on a GPU, or to load it once for many
    evaluations, pass ``FIDInception().to(device)`` instead.
    """
    if not isinstance(feature, str):
        return feature
    if feature == "inception":
        return FIDInception()
    if feature == "classifier":
        if classifier is None:
            raise ValueError('feature="classifier" needs classifier=; train one with gear.eval.train_classifier')
        return ClassifierFeatures(classifier)
    raise ValueError(f'feature must be "inception", "classifier" or a feature extractor, got {feature!r}')


def _images_of(batch) -> torch.Tensor | np.ndarray:
    # Data loaders yield tuples such as (image, label, index); the images come first.
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def take(batches: Iterable, num: int, batch_size: int) -> Iterator[torch.Tensor]:
    """Exactly ``num`` images from an iterable of image batches, re-cut into batches of ``batch_size``."""
    if num < 1 or batch_size < 1:
        raise ValueError(f"num and batch_size must be >= 1, got {num} and {batch_size}")
    pending: list[torch.Tensor] = []
    have = seen = 0
    for batch in batches:
        images = to_float_nchw(_images_of(batch))[: num - seen]
        pending.append(images)
        have += len(images)
        seen += len(images)
        while have >= batch_size or (seen == num and have):
            joined = torch.cat(pending)
            yield joined[:batch_size]
            pending, have = [joined[batch_size:]], len(joined) - min(batch_size, len(joined))
        if seen == num:
            return
    raise ValueError(f"the real images ran out after {seen} images, fewer than num={num}; lower num or pass more data")


def reference_stats(
    real_images: Iterable,
    *,
    num: int,
    feature: str | FeatureExtractor = "inception",
    classifier: Classifier | None = None,
    batch_size: int = 50,
    keep_features: bool = True,
    cache_dir: str | None = None,
    dataset: str | None = None,
    progress: bool = False,
) -> FeatureStats:
    """Feature statistics of the first ``num`` real images (batches of float NCHW in [-1, 1]).

    ``keep_features`` stores the features too, for precision/recall. With ``cache_dir``, the result is
    cached under a key made of ``dataset`` (required then), the extractor's name and ``num``.
    """
    extractor = make_feature_extractor(feature, classifier)

    def compute() -> FeatureStats:
        chunks = [extractor.features(x) for x in tqdm(take(real_images, num, batch_size), disable=not progress, desc="real")]
        return compute_stats(np.concatenate(chunks), keep_features=keep_features)

    if cache_dir is None:
        return compute()
    if not dataset:
        raise ValueError("cache_dir needs dataset=, a name for the real images (e.g. 'fmnist-test'), for the cache key")
    return cached_reference_stats(stats_key(dataset, extractor.name, num), cache_dir, compute)


@dataclass
class GenerationMetrics:
    fid: float  # Frechet distance in the feature space named by ``feature``
    precision: float | None  # None when the reference holds no features
    recall: float | None
    class_accuracy: float | None  # share of samples the classifier assigns to their conditioning class
    num: int
    feature: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ReconstructionMetrics:
    rfid: float
    psnr: float  # dB, on uint8-quantized images, mean over images
    ssim: float
    codebook_usage: float | None  # None without encode_fn / codebook_size
    codebook_perplexity: float | None
    codebook_entropy: float | None
    num: int
    feature: str

    def to_dict(self) -> dict:
        return asdict(self)


def balanced_labels(start: int, count: int, num_classes: int) -> torch.Tensor:
    """Class ids for samples ``start .. start+count-1``, cycling through the classes (equal counts)."""
    return torch.arange(start, start + count) % num_classes


@torch.no_grad()
def evaluate_generation(
    sample_fn: Callable[[torch.Tensor], torch.Tensor],
    real: Iterable | FeatureStats,
    *,
    num: int,
    batch_size: int,
    classifier: Classifier | None = None,
    labels_fn: Callable[[int, int], torch.Tensor] | None = None,
    num_classes: int | None = None,
    feature: str | FeatureExtractor = "inception",
    k: int = 3,
    progress: bool = False,
) -> GenerationMetrics:
    """Generate ``num`` samples and compare them with ``real``.

    ``sample_fn(labels)`` maps (B,) int64 class ids to float (B, C, H, W) images in [-1, 1].
    ``labels_fn(start, count)`` gives the ids of samples start..start+count-1; by default they cycle over
    ``num_classes`` (or the classifier's classes). ``real`` is an iterable of real image batches (its
    first ``num`` images are used) or a ``FeatureStats`` from ``reference_stats`` with the same feature.
    """
    extractor = make_feature_extractor(feature, classifier)
    if labels_fn is None:
        classes = num_classes or (classifier.config.num_classes if classifier is not None else None)
        if not classes:
            raise ValueError("pass num_classes= (or labels_fn=, or a classifier) so that samples can be conditioned")
        labels_fn = lambda start, count: balanced_labels(start, count, classes)  # noqa: E731
    ref = real if isinstance(real, FeatureStats) else reference_stats(real, num=num, feature=extractor, batch_size=batch_size)

    feats, correct = [], 0
    for start in tqdm(range(0, num, batch_size), disable=not progress, desc="samples"):
        count = min(batch_size, num - start)
        labels = torch.as_tensor(labels_fn(start, count), dtype=torch.int64)
        images = to_float_nchw(sample_fn(labels))
        if len(images) != count:
            raise ValueError(f"sample_fn returned {len(images)} images for {count} labels")
        feats.append(extractor.features(images))
        if classifier is not None:
            correct += int((predict(classifier, images) == labels.cpu()).sum())
    fake = np.concatenate(feats)
    if fake.shape[1] != ref.mu.shape[0]:
        raise ValueError(f"reference statistics are {ref.mu.shape[0]}-d but {extractor.name} features are {fake.shape[1]}-d")
    stats = compute_stats(fake)
    pr = None
    if ref.features is not None and min(len(fake), len(ref.features)) > k:
        pr = precision_recall(ref.features, fake, k=k)
    return GenerationMetrics(
        fid=frechet_distance(ref.mu, ref.sigma, stats.mu, stats.sigma),
        precision=pr.precision if pr else None,
        recall=pr.recall if pr else None,
        class_accuracy=correct / num if classifier is not None else None,
        num=num,
        feature=extractor.name,
    )


@torch.no_grad()
def evaluate_reconstruction(
    reconstruct_fn: Callable[[torch.Tensor], torch.Tensor],
    real_images: Iterable,
    *,
    num: int,
    batch_size: int,
    codebook_size: int | None = None,
    encode_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    feature: str | FeatureExtractor = "inception",
    classifier: Classifier | None = None,
    progress: bool = False,
) -> ReconstructionMetrics:
    """Reconstruct the first ``num`` real images and compare: rFID, PSNR/SSIM (uint8, data_range 255),
    and, with ``encode_fn(images) -> indices`` and ``codebook_size``, codebook usage over all of them."""
    if (encode_fn is None) != (codebook_size is None):
        raise ValueError("pass encode_fn and codebook_size together (or neither) for codebook statistics")
    extractor = make_feature_extractor(feature, classifier)
    counter = CodebookCounter(codebook_size) if codebook_size is not None else None
    real_feats, recon_feats, psnrs, ssims = [], [], [], []
    for images in tqdm(take(real_images, num, batch_size), disable=not progress, desc="reconstruct"):
        recon = to_float_nchw(reconstruct_fn(images))
        if recon.shape != images.shape:
            raise ValueError(f"reconstruct_fn returned shape {tuple(recon.shape)} for input {tuple(images.shape)}")
        real_u8, recon_u8 = to_uint8_nhwc(images), to_uint8_nhwc(recon)
        psnrs.append(psnr_per_image(real_u8.transpose(0, 3, 1, 2), recon_u8.transpose(0, 3, 1, 2), 255.0))
        ssims.append(ssim_per_image(real_u8.transpose(0, 3, 1, 2), recon_u8.transpose(0, 3, 1, 2), 255.0))
        real_feats.append(extractor.features(images))
        recon_feats.append(extractor.features(recon))
        if counter is not None:
            counter.update(encode_fn(images))
    a, b = compute_stats(np.concatenate(real_feats)), compute_stats(np.concatenate(recon_feats))
    book = counter.compute() if counter is not None else None
    return ReconstructionMetrics(
        rfid=frechet_distance(a.mu, a.sigma, b.mu, b.sigma),
        psnr=float(np.concatenate(psnrs).mean()),
        ssim=float(np.concatenate(ssims).mean()),
        codebook_usage=book.usage if book else None,
        codebook_perplexity=book.perplexity if book else None,
        codebook_entropy=book.entropy if book else None,
        num=num,
        feature=extractor.name,
    )
