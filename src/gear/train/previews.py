"""What a run shows of itself while it trains: sample and reconstruction grids, and a small FID.

Plain functions of the models and the config; the trainer calls them with its EMA models (``Trainer.preview``,
``Trainer.small_fid``) and logs what they return."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset

from gear.config import Config
from gear.data import DataConfig
from gear.data.transforms import save_image_grid
from gear.run import RECON_DIR, SAMPLES_DIR
from gear.text.conditioner import TextConditioner, grid_prompts


@torch.no_grad()
def write_grids(run_dir: Path, step: int, tokenizer: nn.Module, generator: nn.Module | None, holdout: Dataset,
                cfg: Config, *, text: TextConditioner | None, num_classes: int, device: torch.device) -> None:
    """``run_dir``/recon/step_N.png: 8 held-out images over their reconstructions; with a generator,
    ``run_dir``/samples/step_N.png: samples of eval.sample_classes (or the grid prompts of a text run)."""
    images = torch.stack([sample.image for _, sample in zip(range(8), _first(holdout))]).to(device)
    recon = tokenizer.decode(tokenizer.encode(images))
    pairs = torch.stack([images, recon], dim=1).flatten(0, 1)
    save_image_grid(pairs.float().cpu(), run_dir / RECON_DIR / f"step_{step:07d}.png", nrow=8)
    if generator is None:
        return
    e = cfg.eval
    if text is not None:
        prompts = grid_prompts(cfg, holdout)
        condition = text(prompts).select(torch.arange(len(prompts)).repeat_interleave(e.samples_per_class))
    else:
        classes = list(e.sample_classes) or list(range(min(10, num_classes)))
        condition = torch.tensor(classes, device=device).repeat_interleave(e.samples_per_class)
    indices = generator.generate(condition, cfg_scale=e.cfg_scale, seed=0)
    samples = tokenizer.decode(indices)
    save_image_grid(samples.float().cpu(), run_dir / SAMPLES_DIR / f"step_{step:07d}.png", nrow=e.samples_per_class)


def _first(dataset):
    """The items of a map-style data set in order, or of a stream as it comes."""
    return iter(dataset) if isinstance(dataset, IterableDataset) else (dataset[i] for i in range(len(dataset)))


def fid_classifier(data: DataConfig, device: torch.device) -> nn.Module | None:
    """The feature network of the small FID when it is not Inception: the reference classifier for Fashion-MNIST
    (built, and its accuracy measured, on this call: keep it)."""
    if data.name != "fashion-mnist":
        return None
    from gear.eval import runs

    return runs.reference_classifier(data, device=str(device))


def small_fid(tokenizer: nn.Module, generator: nn.Module, cfg: Config, classifier: nn.Module | None) -> dict[str, float]:
    """FID of eval.fid_samples samples: on ``classifier``'s features (cheap; see ``fid_classifier``), on Inception
    features when it is None. Returned as eval/* metrics."""
    from gear.eval import runs

    e = cfg.eval
    metrics = runs.generation_metrics(tokenizer, generator, cfg.data, num=e.fid_samples, cfg_scale=e.cfg_scale,
                                      feature="classifier" if classifier is not None else "inception",
                                      classifier=classifier, batch_size=100)
    return {f"eval/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}
