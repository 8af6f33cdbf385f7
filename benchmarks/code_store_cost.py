"""Cost of an ar step on a code store vs encoding on the fly (Fashion-MNIST, the reproduction's tiny models).

    .venv/bin/python benchmarks/code_store_cost.py                 # 1 thread, REPA and NTP-only, 5 rounds
    .venv/bin/python benchmarks/code_store_cost.py --threads 2 --rounds 3 --steps 20

The two variants run interleaved (A, B, A, B, ...) in one process so that load from other programs falls on
both alike; the ratio of their medians is what to read. On the fly, the teacher runs on every batch (the
first epoch of a run, where its feature cache has nothing yet: a 60k-image epoch is 1875 steps of 32).
Each timed step is what the loop does per step: next batch, teacher features, the update, the EMA.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def trainer(tokenizer_dir: Path, out: Path, lambda_ar: float, batch: int, store: Path | None, limit: int):
    from gear.config import load_config
    from gear.train.loop import Trainer

    extra = [f"data.code_store={store}"] if store else []
    cfg = load_config(ROOT / "configs" / "fmnist-ar.yaml", [
        f"model.tokenizer_init={tokenizer_dir}", f"train.out_dir={out}", f"align.lambda_ar={lambda_ar}",
        f"train.batch_size={batch}", f"data.limit={limit}", "train.progress=false", "train.cache_teacher_features=false",
        *extra])
    return Trainer(cfg)


def time_steps(tr, n: int) -> float:
    """Seconds per step over ``n`` steps of the loop's per-step work, continuing the trainer's stream."""
    from gear.train.stage import set_learning_rates
    from gear.train.steps import STEPS, apply_all, ar_step_on_codes

    step_fn = ar_step_on_codes if tr.code_store is not None else STEPS["ar"]
    t0 = time.perf_counter()
    for _ in range(n):
        batch = next(tr.stream)
        batch = getattr(batch, "samples", batch)  # the data stream's StepBatch, or the store's CodeBatch
        set_learning_rates(tr.opts, tr.cfg.optim, tr.step)
        images, labels = batch.image.to(tr.device), batch.label.to(tr.device)
        target = tr.targets(images, batch.index)
        step_fn(tr.wrapped, tr.opts, tr.step_config(), images, labels, target)
        apply_all(tr.opts)
        tr.emas["generator"].update(tr.trained["generator"])
        tr.step += 1
    return (time.perf_counter() - t0) / n


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=20, help="steps per timed round")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, default=4096, help="training images encoded into the store")
    p.add_argument("--tokenizer", default="", help="a run or model directory (default: a fresh vq-tiny)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "code_store_cost.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from gear.data import DataConfig, build_dataset
    from gear.models.autoencoder import build_tokenizer
    from gear.train.batches import batch_stream
    from gear.train.code_store import extract_for_config

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok_dir = Path(args.tokenizer) if args.tokenizer else tmp / "tokenizer"
        if not args.tokenizer:
            torch.manual_seed(0)
            build_tokenizer("vq-tiny").save_pretrained(tok_dir)
        store = tmp / "store"
        pairs = {}
        for lam in (0.5, 0.0):
            fly = trainer(tok_dir, tmp / f"fly{lam}", lam, args.batch_size, None, args.limit)
            t0 = time.perf_counter()
            extract_for_config(_store_cfg(fly.cfg, store))
            extract_s = time.perf_counter() - t0
            stored = trainer(tok_dir, tmp / f"store{lam}", lam, args.batch_size, store, args.limit)
            for tr in (fly, stored):
                t = tr.cfg.train
                tr.stream = (tr.code_store.stream(t.batch_size, t.seed, 0) if tr.code_store is not None
                             else batch_stream(tr.dataset, t.batch_size, t.seed, 0, 0, 1))
                time_steps(tr, 2)  # warm-up: first calls allocate
            pairs[lam] = (fly, stored, extract_s)
        rows, ratios = [], {}
        times = {lam: ([], []) for lam in pairs}
        for _ in range(args.rounds):
            for lam, (fly, stored, _) in pairs.items():
                times[lam][0].append(time_steps(fly, args.steps))
                times[lam][1].append(time_steps(stored, args.steps))
        for lam, (a, b) in times.items():
            ma, mb = statistics.median(a), statistics.median(b)
            ratios[lam] = ma / mb
            name = "NTP + REPA (lambda_ar 0.5)" if lam else "NTP only"
            rows.append(f"| {name} | {ma * 1000:.0f} | {mb * 1000:.0f} | {ma / mb:.2f}x | {pairs[lam][2]:.1f} |")
    n = len(build_dataset(DataConfig(limit=args.limit), "train"))
    lines = [
        "# AR step cost: code store vs encoding on the fly", "",
        f"- Command: `{' '.join(['python', 'benchmarks/code_store_cost.py', *(argv if argv is not None else sys.argv[1:])])}`",
        f"- {args.threads} torch thread(s), batch {args.batch_size}, vq-tiny + gpt-tiny (the reproduction's models), "
        f"medians of {args.rounds} interleaved rounds of {args.steps} steps; teacher efficientnet-lite0 on every batch "
        "on the fly (the first epoch, before a feature cache could hit).", "",
        "| ar step | on the fly (ms) | from the store (ms) | speed-up | extraction (s) |", "|---|---|---|---|---|", *rows, "",
        f"Extraction: {n} images (the REPA row includes the teacher's features; the NTP row found the codes already "
        "written). Per 1000 images it scales linearly; the 60k training split takes 60000 / "
        f"{n} times as long.", "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


def _store_cfg(cfg, store: Path):
    import copy

    out = copy.deepcopy(cfg)
    out.data.code_store = str(store)
    return out


if __name__ == "__main__":
    main()
