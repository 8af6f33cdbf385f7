"""Cost of a text-to-image AR step relative to a class-conditional one (configs/fmnist-t2i.yaml vs fmnist-ar.yaml).

Both trainers are built in one process on the same frozen tokenizer; steps run in interleaved blocks (A/B/A/B) so that
load from other jobs cancels; prints the per-step time ratio. Multiply the class AR's measured demo step time by it to
size the text-to-image demo.

    .venv/bin/python benchmarks/t2i_step_cost.py --tokenizer runs/demo/joint --threads 1
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from gear.config import load_config
from gear.train.batches import batch_stream
from gear.train.loop import Trainer
from gear.train.steps import STEPS, apply_all


def stepper(config: str, tokenizer: str, out_dir: str):
    trainer = Trainer(load_config(config, [f"model.tokenizer_init={tokenizer}", f"train.out_dir={out_dir}",
                                           "train.progress=false"]))
    t = trainer.cfg.train
    stream = batch_stream(trainer.dataset, t.batch_size, t.seed, 0, 0, 1)
    for module in trainer.trained.values():
        module.train()

    def step() -> None:
        batch = next(stream).samples
        cond = trainer.text(batch.caption) if trainer.text is not None else batch.label
        target = trainer.targets(batch.image, batch.index)
        STEPS["ar"](trainer.wrapped, trainer.opts, trainer.step_config(), batch.image, cond, target)
        apply_all(trainer.opts)
        trainer.step += 1

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", required=True, help="a run directory holding the frozen tokenizer")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="steps per block")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        steps = {"class": stepper("configs/fmnist-ar.yaml", args.tokenizer, f"{tmp}/a"),
                 "text": stepper("configs/fmnist-t2i.yaml", args.tokenizer, f"{tmp}/b")}
        seconds = {name: 0.0 for name in steps}
        for fn in steps.values():  # warm-up
            fn()
        for _ in range(args.rounds):
            for name, fn in steps.items():
                start = time.perf_counter()
                for _ in range(args.steps):
                    fn()
                seconds[name] += time.perf_counter() - start
    n = args.rounds * args.steps
    print(f"class-conditional AR step: {seconds['class'] / n:.3f} s; text-to-image AR step: {seconds['text'] / n:.3f} s "
          f"({n} steps each, interleaved, {args.threads} thread(s))")
    print(f"ratio text / class: {seconds['text'] / seconds['class']:.2f}")


if __name__ == "__main__":
    main()
