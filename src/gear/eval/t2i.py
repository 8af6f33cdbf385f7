"""Text adherence of a text-to-image run on captioned Fashion-MNIST (`gear eval t2i`).

For each guidance scale and prompt set (training templates; held-out templates; held-out templates with held-out
class names) it samples one image per prompt and reads back what the prompt asked for:

- class accuracy: the reference classifier's prediction against the prompt's class (chance 0.1);
- attribute match: brightness and size measured on the sample, cut at the prompt class's training tertiles, against
  the prompt's words (chance 1/3 each);
- a shuffled control: the held-out samples scored against the prompts of a fixed permutation (near chance when the
  samples follow their captions and nothing else);
- a Frechet distance on the classifier's features to the held-out split (held-out-template samples).

``ceiling``: the same class accuracy for a class-conditional AR given the class labels (what the text path could reach).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from tqdm import tqdm

from gear.data import DataConfig, build_dataset
from gear.data.fmnist_captions import ATTRIBUTES, NAMES, Prompt, attribute_levels, grey_28, measure, prompts, thresholds
from gear.data.fashion_mnist import resolve_root
from gear.eval.classifier import classifier_features, predict
from gear.eval.fid import compute_stats, fid_from_stats
from gear.text.pipeline import TextToImage

PROMPT_SETS = {"train": ("train", False), "heldout": ("heldout", False), "heldout_names": ("heldout", True)}


def adherence(images: torch.Tensor, asked: list[Prompt], classifier, cuts: np.ndarray) -> dict[str, float]:
    """Class accuracy and attribute match rates of ``images`` against the prompts ``asked``."""
    labels = np.array([p.label for p in asked])
    wanted = np.array([p.levels for p in asked])
    predicted = predict(classifier, images).numpy()
    levels = attribute_levels(measure(grey_28(images)), labels, cuts)
    out = {"class_accuracy": float((predicted == labels).mean())}
    for i, name in enumerate(ATTRIBUTES):
        out[f"{name}_match"] = float((levels[:, i] == wanted[:, i]).mean())
    return out


def _sample(pipe: TextToImage, asked: list[Prompt], cfg_scale: float, batch_size: int, seed: int, progress: bool) -> torch.Tensor:
    chunks = []
    starts = range(0, len(asked), batch_size)
    for b, start in enumerate(tqdm(starts, disable=not progress, desc=f"t2i cfg {cfg_scale}")):
        texts = [p.text for p in asked[start : start + batch_size]]
        chunks.append(pipe(texts, cfg_scale=cfg_scale, seed=seed * 1_000_003 + b).cpu())
    return torch.cat(chunks)


def t2i_metrics(pipe: TextToImage, data: DataConfig, classifier, *, num: int, cfg_scales: tuple[float, ...] = (1.0, 3.0),
                batch_size: int = 100, seed: int = 0, ceiling=None, progress: bool = False) -> dict:
    """The adherence report (see the module docstring). ``classifier``: a ReferenceClassifier; ``ceiling``: an
    optional (tokenizer, class-conditional GPT) pair."""
    if data.name != "fashion-mnist-captions":
        raise ValueError(f"gear eval t2i measures captioned Fashion-MNIST runs, not data.name={data.name}")
    if num < 10:
        raise ValueError(f"--num must be >= 10 (one prompt per class at least), got {num}")
    cuts = thresholds(str(resolve_root(data.root or None)))
    clf = classifier.model
    real = build_dataset(dataclasses.replace(data, limit=0), "test")
    real_images = torch.stack([real[i].image for i in range(min(num, len(real)))])
    real_stats = compute_stats(classifier_features(clf, real_images))
    report: dict = {"num_per_set": num, "cfg_scales": list(cfg_scales), "classifier_test_accuracy": classifier.test_accuracy,
                    "chance": {"class_accuracy": 1 / len(NAMES), **{f"{a}_match": 1 / 3 for a in ATTRIBUTES}}}
    for cfg_scale in cfg_scales:
        entry: dict = {}
        for name, (templates, heldout_names) in PROMPT_SETS.items():
            asked = prompts(num, templates, heldout_names=heldout_names, seed=seed)
            images = _sample(pipe, asked, cfg_scale, batch_size, seed, progress)
            entry[name] = adherence(images, asked, clf, cuts)
            if name == "heldout":
                order = np.random.default_rng([13, seed]).permutation(len(asked))
                entry["shuffled"] = adherence(images, [asked[i] for i in order], clf, cuts)
                entry["fid_classifier"] = fid_from_stats(compute_stats(classifier_features(clf, images)), real_stats)
        report[f"cfg_{cfg_scale:g}"] = entry
    main = report[f"cfg_{cfg_scales[-1]:g}"]
    report |= {"cfg_scale": cfg_scales[-1], "class_accuracy_heldout": main["heldout"]["class_accuracy"],
               "class_accuracy_shuffled": main["shuffled"]["class_accuracy"]}
    if ceiling is not None:
        report["ceiling_class_conditional"] = class_conditional_accuracy(*ceiling, clf, num=num, cfg_scales=cfg_scales,
                                                                         batch_size=batch_size, seed=seed)
    return report


@torch.no_grad()
def class_conditional_accuracy(tok, gen, classifier, *, num: int, cfg_scales, batch_size: int, seed: int) -> dict:
    """Class accuracy of a class-conditional AR's samples, classes in turn, at each guidance scale."""
    labels = torch.arange(num) % len(NAMES)
    out = {}
    for cfg_scale in cfg_scales:
        images = torch.cat([tok.decode(gen.generate(labels[s : s + batch_size], cfg_scale=cfg_scale,
                                                    seed=seed * 1_000_003 + b)).float().clamp(-1, 1).cpu()
                            for b, s in enumerate(range(0, num, batch_size))])
        out[f"cfg_{cfg_scale:g}"] = float((predict(classifier, images) == labels).float().mean())
    return out
