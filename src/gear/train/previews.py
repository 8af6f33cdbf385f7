"""What a run shows of itself while it trains: sample and reconstruction grids, and a small FID."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import torch

from torch.utils.data import IterableDataset

from gear.data.transforms import save_image_grid
from gear.text.conditioner import grid_prompts

if TYPE_CHECKING:
    from gear.train.loop import Trainer


@torch.no_grad()
def write_grids(trainer: Trainer) -> None:
    """Reconstructions of 8 held-out images and, with a generator, an EMA sample grid (eval.sample_classes)."""
    gen = trainer.ema_generator()
    if not trainer.env.is_main:
        return
    tok = trainer.emas["tokenizer"].module if "tokenizer" in trainer.emas else trainer.m.tokenizer
    images = torch.stack([sample.image for _, sample in zip(range(8), _first(trainer.holdout))]).to(trainer.device)
    recon = tok.decode(tok.encode(images))
    pairs = torch.stack([images, recon], dim=1).flatten(0, 1)
    save_image_grid(pairs.float().cpu(), trainer.run_dir / "recon" / f"step_{trainer.step:07d}.png", nrow=8)
    if gen is None:
        return
    e = trainer.cfg.eval
    if trainer.text is not None:
        prompts = grid_prompts(trainer.cfg, trainer.holdout)
        condition = trainer.text(prompts).select(torch.arange(len(prompts)).repeat_interleave(e.samples_per_class))
    else:
        classes = list(e.sample_classes) or list(range(min(10, trainer.num_classes)))
        condition = torch.tensor(classes, device=trainer.device).repeat_interleave(e.samples_per_class)
    indices = gen.generate(condition, cfg_scale=e.cfg_scale, seed=0)
    samples = tok.decode(indices)
    save_image_grid(samples.float().cpu(), trainer.run_dir / "samples" / f"step_{trainer.step:07d}.png", nrow=e.samples_per_class)


def _first(dataset):
    """The items of a map-style data set in order, or of a stream as it comes."""
    return iter(dataset) if isinstance(dataset, IterableDataset) else (dataset[i] for i in range(len(dataset)))


def small_fid(trainer: Trainer, writer) -> dict[str, float]:
    """FID of eval.fid_samples EMA samples: on the reference classifier's features for Fashion-MNIST (cheap),
    on Inception features otherwise. Logged as eval/*."""
    gen = trainer.ema_generator()
    if not trainer.env.is_main:
        return {}
    from gear.eval import runs

    e, data = trainer.cfg.eval, trainer.cfg.data
    if data.name == "fashion-mnist" and trainer.fid_classifier is None:  # built (and its accuracy measured) once
        trainer.fid_classifier = runs.reference_classifier(data, device=str(trainer.device))
    classifier = trainer.fid_classifier
    tok = trainer.emas["tokenizer"].module if "tokenizer" in trainer.emas else trainer.m.tokenizer
    metrics = runs.generation_metrics(tok, gen, data, num=e.fid_samples, cfg_scale=e.cfg_scale,
                                      feature="classifier" if classifier is not None else "inception",
                                      classifier=classifier, batch_size=100)
    logged = {f"eval/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}
    for k, v in logged.items():
        writer.add_scalar(k, v, trainer.step)
    with open(trainer.run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": trainer.step, **logged}) + "\n")
    return logged
