import math

import numpy as np
import pytest
import torch

from gear.eval.classifier import ClassifierConfig, train_classifier
from gear.eval.evaluate import evaluate_generation, evaluate_reconstruction, reference_stats, take
from gear.eval.image_metrics import psnr, ssim


class PooledPixels:
    """A cheap stand-in feature extractor: 4x4 average-pooled pixels, 48-d."""

    name = "pooled-pixels"

    def __init__(self) -> None:
        self.calls = 0

    def features(self, images) -> np.ndarray:
        self.calls += 1
        x = torch.as_tensor(images).float()
        return torch.nn.functional.avg_pool2d(x, 8).flatten(1).double().numpy()


def class_images(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """Noisy 32x32 RGB images with a bright band whose position encodes the class (0, 1, 2)."""
    g = torch.Generator().manual_seed(seed)
    images = -0.5 + 0.4 * torch.randn(len(labels), 3, 32, 32, generator=g)
    for i, c in enumerate(labels.tolist()):
        images[i, :, 10 * c : 10 * c + 12] += 1.0
    return images.clamp(-1, 1)


def batches(images: torch.Tensor, size: int):
    return [(images[i : i + size], torch.zeros(len(images[i : i + size]))) for i in range(0, len(images), size)]


@pytest.fixture(scope="module")
def data():
    labels = torch.arange(120) % 3
    return class_images(labels, seed=0), labels


@pytest.fixture(scope="module")
def classifier(data):
    images, labels = data
    cfg = ClassifierConfig(num_classes=3, widths=(8, 16, 32), feature_dim=32)
    return train_classifier(images, labels, steps=30, batch_size=16, config=cfg, seed=0)


def test_take_recuts_batches_in_order():
    x = torch.randn(15, 1, 2, 2)
    parts = [x[:5], x[5:12], x[12:]]
    out = list(take(parts, 12, 4))
    assert [len(o) for o in out] == [4, 4, 4]
    torch.testing.assert_close(torch.cat(out), x[:12])
    assert [len(o) for o in take(parts, 15, 6)] == [6, 6, 3]
    with pytest.raises(ValueError, match="ran out after 15"):
        list(take(parts, 16, 4))


def test_generation_from_the_real_distribution(data, classifier):
    images, labels = data
    extractor = PooledPixels()
    # Samples are the real images of the requested class, in the order the default labels ask for them.
    by_class = {c: images[labels == c] for c in range(3)}
    served = {c: 0 for c in range(3)}

    def sample_fn(requested: torch.Tensor) -> torch.Tensor:
        out = []
        for c in requested.tolist():
            out.append(by_class[c][served[c]])
            served[c] += 1
        return torch.stack(out)

    m = evaluate_generation(sample_fn, batches(images, 32), num=120, batch_size=25, classifier=classifier, feature=extractor)
    assert abs(m.fid) < 1e-6  # the same 120 images, in another order
    assert (m.precision, m.recall) == (1.0, 1.0)
    assert m.class_accuracy >= 0.95 and m.num == 120 and m.feature == "pooled-pixels"
    assert set(m.to_dict()) == {"fid", "precision", "recall", "class_accuracy", "num", "feature"}


def test_generation_with_wrong_classes_and_shifted_images(data, classifier):
    images, labels = data
    ref = reference_stats(batches(images, 50), num=120, feature=PooledPixels())
    wrong = lambda lab: class_images((lab + 1) % 3, seed=1)  # noqa: E731
    m = evaluate_generation(wrong, ref, num=60, batch_size=30, classifier=classifier, feature=PooledPixels())
    assert m.class_accuracy <= 0.05
    shifted = lambda lab: (class_images(lab, seed=2) + 0.8).clamp(-1, 1)  # noqa: E731
    far = evaluate_generation(shifted, ref, num=60, batch_size=30, num_classes=3, feature=PooledPixels())
    near = evaluate_generation(lambda lab: class_images(lab, seed=2), ref, num=60, batch_size=30, num_classes=3, feature=PooledPixels())
    assert far.fid > 10 * near.fid and far.precision < near.precision
    assert far.class_accuracy is None


def test_classifier_features_are_the_default_cheap_option(data, classifier):
    images, labels = data
    m = evaluate_generation(lambda lab: class_images(lab, seed=3), batches(images, 40), num=60, batch_size=30,
                            classifier=classifier, feature="classifier")
    assert m.feature == classifier.name and m.fid > 0 and math.isfinite(m.fid)


def test_reference_stats_cache(tmp_path, data):
    images, _ = data
    extractor = PooledPixels()
    first = reference_stats(batches(images, 40), num=100, feature=extractor, batch_size=50, cache_dir=tmp_path, dataset="toy")
    calls = extractor.calls
    second = reference_stats(batches(images, 40), num=100, feature=extractor, batch_size=50, cache_dir=tmp_path, dataset="toy")
    assert extractor.calls == calls == 2 and first.n == second.n == 100
    np.testing.assert_array_equal(first.features, second.features)
    with pytest.raises(ValueError, match="dataset="):
        reference_stats(batches(images, 40), num=100, feature=extractor, cache_dir=tmp_path)


def test_reconstruction_metrics(data):
    images, _ = data
    perfect = evaluate_reconstruction(lambda x: x, batches(images, 32), num=64, batch_size=16, feature=PooledPixels(),
                                      codebook_size=8, encode_fn=lambda x: torch.arange(len(x) * 4).view(-1, 2, 2) % 8)
    assert abs(perfect.rfid) < 1e-6 and perfect.psnr == math.inf and perfect.ssim == pytest.approx(1.0)
    assert perfect.codebook_usage == 1.0 and perfect.codebook_perplexity == pytest.approx(8.0)

    g = torch.Generator().manual_seed(5)
    noise = 0.1 * torch.randn(images.shape, generator=g)
    noisy = lambda x: (x + noise[: len(x)]).clamp(-1, 1)  # noqa: E731  (same noise per position in each batch)
    m = evaluate_reconstruction(noisy, batches(images, 16), num=16, batch_size=16, feature=PooledPixels())
    u8 = lambda t: t.clamp(-1, 1).add(1).mul(127.5).round()  # noqa: E731
    assert m.psnr == pytest.approx(psnr(u8(images[:16]), u8(noisy(images[:16])), 255.0))
    assert m.ssim == pytest.approx(ssim(u8(images[:16]), u8(noisy(images[:16])), 255.0))
    assert m.rfid > 0 and m.codebook_usage is None
    with pytest.raises(ValueError, match="together"):
        evaluate_reconstruction(noisy, batches(images, 16), num=16, batch_size=16, feature=PooledPixels(), codebook_size=8)


def test_bad_sample_fn_and_feature_raise(data):
    images, _ = data
    with pytest.raises(ValueError, match="returned 1 images for 4"):
        evaluate_generation(lambda lab: images[:1], batches(images, 40), num=8, batch_size=4, num_classes=3, feature=PooledPixels())
    with pytest.raises(ValueError, match="needs classifier"):
        evaluate_generation(lambda lab: images[:4], batches(images, 40), num=8, batch_size=4, num_classes=3, feature="classifier")
    with pytest.raises(ValueError, match="num_classes"):
        evaluate_generation(lambda lab: images[:4], batches(images, 40), num=8, batch_size=4, feature=PooledPixels())
