"""What completion does and does not preserve: held-out Fashion-MNIST images with the top half of their tokens kept
(`gear edit --keep top:50%`), the bottom half sampled by a class-conditional run's AR.

Prints, for ``--num`` held-out test images:
- the reference classifier's accuracy on completions conditioned on the image's true class, and on completions
  conditioned on another class (drawn per image, seeded): how often they read as that class, and how often still as
  the original one; next to the classifier's accuracy on the originals and on their plain reconstructions;
- how much the kept half changes after decoding: PSNR of the top half of the completion against the original's top
  half, next to the top half of the plain reconstruction (the tokenizer alone) against the original. The decoder's
  receptive field crosses the border, so the kept half is not pixel-identical even though its tokens are.

    .venv/bin/python benchmarks/edit_completion.py runs/demo/ar --num 500 --cfg-scale 1.5
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from gear.data import build_dataset, to_uint8_image
from gear.edit import parse_region
from gear.eval.classifier import predict
from gear.eval.image_metrics import psnr_per_image
from gear.eval.runs import reference_classifier
from gear.models.sampling import KnownTokens
from gear.run import open_run


def measure(run_dir: str, *, num: int, cfg_scale: float, seed: int, batch_size: int, device: str,
            cache_dir: str | None = None) -> dict:
    run = open_run(run_dir)
    if run.kind != "class" or run.config.data.name != "fashion-mnist":
        raise SystemExit(f"{run_dir}: a class-conditional Fashion-MNIST run is needed (it is a {run.kind} run on "
                         f"{run.config.data.name})")
    tok, gen = run.load_pair(device=device)
    data = run.config.data
    classifier = reference_classifier(data, Path(cache_dir) if cache_dir else None, device=device)  # trains once, cached
    return completion_metrics(tok, gen, data, classifier, num=num, cfg_scale=cfg_scale, seed=seed, batch_size=batch_size,
                              device=device)


@torch.no_grad()
def completion_metrics(tok, gen, data, classifier, *, num: int, cfg_scale: float, seed: int, batch_size: int,
                       device: str) -> dict:
    test = build_dataset(dataclasses.replace(data, limit=0), "test")
    if len(test) < num:
        raise SystemExit(f"the held-out split has {len(test)} images, fewer than --num {num}")
    grid, classes = gen.config.grid_size, gen.config.num_classes
    half = grid // 2
    keep = parse_region(keep="top:50%").mask(grid, (grid, grid), grid)  # token rows: no pixels involved
    pick = torch.Generator().manual_seed(seed)
    top_px = half * tok.downsample
    out = {k: [] for k in ("label", "other", "orig", "recon", "true", "swap")}
    for start in range(0, num, batch_size):
        items = [test[i] for i in range(start, min(start + batch_size, num))]
        images = torch.stack([s.image for s in items]).to(device)
        labels = torch.tensor([int(s.label) for s in items], device=device)
        other = (labels.cpu() + torch.randint(1, classes, (len(items),), generator=pick)) % classes
        codes = tok.encode(images)
        known = KnownTokens(codes, keep.to(device).expand_as(codes))
        batch_seed = seed * 1_000_003 + start
        out["label"].append(labels.cpu())
        out["other"].append(other)
        out["orig"].append(images.cpu())
        out["recon"].append(tok.decode(codes).float().clamp(-1, 1).cpu())
        for key, cond in (("true", labels), ("swap", other.to(device))):
            tokens = gen.generate(cond, cfg_scale=cfg_scale, seed=batch_seed, known=known)
            assert torch.equal(tokens[:, :half], codes[:, :half])  # the kept tokens, unchanged
            out[key].append(tok.decode(tokens).float().clamp(-1, 1).cpu())
        print(f"  {min(start + batch_size, num)}/{num}", flush=True)
    o = {k: torch.cat(v) for k, v in out.items()}
    model = classifier.model

    def accuracy(images: torch.Tensor, target: torch.Tensor) -> float:
        return float((predict(model, images) == target).float().mean())

    def top_psnr(images: torch.Tensor) -> float:
        a, b = to_uint8_image(images[..., :top_px, :]), to_uint8_image(o["orig"][..., :top_px, :])
        return float(torch.tensor(psnr_per_image(a, b, data_range=255)).clamp(max=100).mean())

    label, other = o["label"], o["other"]
    return {
        "num": num, "cfg_scale": cfg_scale, "seed": seed, "kept": f"top {half} of {grid} token rows",
        "acc_original": accuracy(o["orig"], label), "acc_reconstruction": accuracy(o["recon"], label),
        "acc_completion_true_class": accuracy(o["true"], label),
        "acc_completion_other_class_as_other": accuracy(o["swap"], other),
        "acc_completion_other_class_as_original": accuracy(o["swap"], label),
        "psnr_top_half_reconstruction": top_psnr(o["recon"]),
        "psnr_top_half_completion_true_class": top_psnr(o["true"]),
        "psnr_top_half_completion_other_class": top_psnr(o["swap"]),
        "classifier_test_accuracy": classifier.test_accuracy,
    }


def table(m: dict) -> str:
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    return "\n".join([
        f"{m['num']} held-out Fashion-MNIST test images, {m['kept']} kept, cfg {m['cfg_scale']}, seed {m['seed']} "
        f"(reference classifier: {pct(m['classifier_test_accuracy'])} on the whole test split)",
        "",
        "| images | classifier says the conditioning class | says the original class | PSNR of the kept (top) half |",
        "|---|---|---|---|",
        f"| originals | | {pct(m['acc_original'])} | |",
        f"| reconstructions (tokenizer alone) | | {pct(m['acc_reconstruction'])} | "
        f"{m['psnr_top_half_reconstruction']:.2f} dB |",
        f"| completions, true class | {pct(m['acc_completion_true_class'])} | {pct(m['acc_completion_true_class'])} | "
        f"{m['psnr_top_half_completion_true_class']:.2f} dB |",
        f"| completions, another class | {pct(m['acc_completion_other_class_as_other'])} | "
        f"{pct(m['acc_completion_other_class_as_original'])} | {m['psnr_top_half_completion_other_class']:.2f} dB |",
    ])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="a class-conditional Fashion-MNIST run (e.g. runs/demo/ar)")
    p.add_argument("--num", type=int, default=500)
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--cache-dir", default=None, help="where the reference classifier is cached (default $GEAR_CACHE)")
    p.add_argument("--out", default=None, help="also write the table here (markdown)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    metrics = measure(args.run_dir, num=args.num, cfg_scale=args.cfg_scale, seed=args.seed, batch_size=args.batch_size,
                      device=args.device, cache_dir=args.cache_dir)
    text = table(metrics)
    print(text)
    if args.out:
        Path(args.out).write_text(f"# Completion of the top half\n\n`python benchmarks/edit_completion.py "
                                  f"{args.run_dir} --num {args.num} --cfg-scale {args.cfg_scale}`\n\n{text}\n")
    return metrics


if __name__ == "__main__":
    main()
