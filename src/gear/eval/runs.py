"""Evaluation of a run's models: what `gear eval gen|recon`, training-time FID and the benchmarks call.

Real images come from the run's own data config (the held-out split); reference statistics and the
Fashion-MNIST reference classifier are computed once and cached under ``cache_dir``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from gear.data import DataConfig, build_dataset, to_uint8_image
from gear.eval.classifier import Classifier, classifier_accuracy, train_classifier
from gear.eval.evaluate import evaluate_generation, evaluate_reconstruction, make_feature_extractor, reference_stats
from gear.eval.export import save_adm_npz
from gear.models.autoencoder import Tokenizer
from gear.models.gpt import GPT

CLASSIFIER_STEPS = 1500  # ~91% test accuracy on Fashion-MNIST, about a minute on 2 CPU cores


def default_cache_dir() -> Path:
    return Path(os.environ.get("GEAR_CACHE", Path.home() / ".cache" / "gear"))


def held_out_batches(data: DataConfig, num: int, batch_size: int):
    """The first ``num`` images of the held-out split, in order, as (B, 3, H, W) batches in [-1, 1]."""
    dataset = build_dataset(dataclasses.replace(data, limit=0), "test")  # the whole split, whatever training used
    if len(dataset) < num:
        raise ValueError(f"the held-out split has {len(dataset)} images, fewer than --num {num}")
    for start in range(0, num, batch_size):
        yield torch.stack([dataset[i].image for i in range(start, min(start + batch_size, num))])


def _data_key(data: DataConfig) -> str:
    """Names the real images: data set, size, crop and the resolved root (hashed), for cache keys."""
    root = str(Path(data.root).resolve()) if data.root else "default"
    digest = hashlib.sha1(f"{root}|{data.crop}".encode()).hexdigest()[:10]
    return f"{data.name}-{data.image_size}-{digest}"


@dataclass
class ReferenceClassifier:
    model: Classifier
    test_accuracy: float


def reference_classifier(data: DataConfig, cache_dir: Path | None = None, device: str = "cpu") -> ReferenceClassifier:
    """A classifier trained on the real training split (Fashion-MNIST), cached; with its test accuracy."""
    if data.name != "fashion-mnist":
        raise ValueError("a reference classifier is trained for Fashion-MNIST only; use --feature inception")
    directory = (cache_dir or default_cache_dir()) / f"classifier-{_data_key(data)}-{CLASSIFIER_STEPS}"
    full = DataConfig(name=data.name, root=data.root, image_size=data.image_size)  # never a truncated split
    test = build_dataset(full, "test")
    test_images, test_labels = _stack(test)
    if (directory / "model.safetensors").is_file():
        model = Classifier.from_pretrained(directory).to(device).eval()
    else:
        images, labels = _stack(build_dataset(full, "train"))
        with torch.random.fork_rng(devices=[]):  # training seeds the global RNG; a caller's run must not notice
            model = train_classifier(images, labels, CLASSIFIER_STEPS, device=device, progress=True)
        model.save_pretrained(directory)
    accuracy = classifier_accuracy(model, test_images, test_labels).accuracy
    return ReferenceClassifier(model, accuracy)


def _stack(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    samples = [dataset[i] for i in range(len(dataset))]
    return torch.stack([s.image for s in samples]), torch.tensor([int(s.label) for s in samples])


def generation_metrics(tok: Tokenizer, gen: GPT, data: DataConfig, *, num: int, cfg_scale: float, cfg_interval: int = -1,
                       temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, feature: str = "inception",
                       batch_size: int = 50, seed: int = 0, classifier: ReferenceClassifier | None = None,
                       cache_dir: Path | None = None, npz: str | None = None, progress: bool = False) -> dict:
    """FID (and precision/recall, class accuracy) of ``num`` class-balanced samples vs the held-out split, drawn with
    the sampling options of ``gear.models.sampling.generate``."""
    clf = classifier.model if classifier is not None else None
    extractor = make_feature_extractor(feature, clf)
    ref = reference_stats(held_out_batches(data, num, batch_size), num=num, feature=extractor, batch_size=batch_size,
                          cache_dir=str(cache_dir or default_cache_dir()), dataset=_data_key(data) + "-test", progress=progress)
    samples: list[torch.Tensor] = []  # uint8, and only when they are exported
    device = next(gen.parameters()).device
    batches = 0

    def sample_fn(labels: torch.Tensor) -> torch.Tensor:
        nonlocal batches
        # one seed per batch, derived from the run seed: the same call gives the same samples
        indices = gen.generate(labels.to(device), cfg_scale=cfg_scale, cfg_interval=cfg_interval, temperature=temperature,
                               top_k=top_k, top_p=top_p, seed=seed * 1_000_003 + batches)
        batches += 1
        images = tok.decode(indices).float().cpu().clamp(-1, 1)
        if npz:
            samples.append(to_uint8_image(images))
        return images

    metrics = evaluate_generation(sample_fn, ref, num=num, batch_size=batch_size, classifier=clf,
                                  num_classes=gen.config.num_classes, feature=extractor, progress=progress)
    result = {**metrics.to_dict(), "cfg_scale": cfg_scale, "cfg_interval": cfg_interval, "temperature": temperature,
              "top_k": top_k, "top_p": top_p, "seed": seed}
    if classifier is not None:
        result["classifier_test_accuracy"] = classifier.test_accuracy
    if npz:
        save_adm_npz(torch.cat(samples).permute(0, 2, 3, 1).numpy(), npz)
        result["npz"] = str(npz)
    return result


def reconstruction_metrics(tok: Tokenizer, data: DataConfig, *, num: int, feature: str = "inception", batch_size: int = 50,
                           classifier: ReferenceClassifier | None = None, progress: bool = False) -> dict:
    device = next(tok.parameters()).device

    def reconstruct(images: torch.Tensor) -> torch.Tensor:
        return tok.decode(tok.encode(images.to(device))).float().cpu().clamp(-1, 1)

    def encode(images: torch.Tensor) -> torch.Tensor:
        return tok.encode(images.to(device))

    metrics = evaluate_reconstruction(reconstruct, held_out_batches(data, num, batch_size), num=num, batch_size=batch_size,
                                      codebook_size=tok.codebook_size, encode_fn=encode, feature=feature,
                                      classifier=classifier.model if classifier is not None else None, progress=progress)
    return metrics.to_dict()


def write_json(metrics: dict, out: str | Path | None) -> str:
    text = json.dumps(metrics, indent=2)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    return text

