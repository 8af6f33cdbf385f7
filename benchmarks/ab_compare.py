"""Two versions of the code side by side in one run: the working tree (A) against a git ref (B).

The ref's ``src/`` is exported with ``git archive`` into a temporary folder; each version runs in its own
worker process (``PYTHONPATH`` pointing at its ``src/``) that builds the same seeded modules and then times
one piece per request. The parent alternates A/B/B/A/... so load from other jobs on the machine falls on
both alike, and reports medians and the ratio A / B. Both workers run the same steps from the same seeds,
so their first-step losses and final parameters are compared too (equal up to float rounding unless a
change is meant to alter the numbers).

Pieces:
  joint-issue   GEAR joint step (tokenizer update with the top-256 soft branch, then the AR update) at the
                size first measured against the official code: AR 12 x 384, K = 4096, 16 px VQ tokenizer
                with channel multipliers (1, 2), L1 + codebook losses, batch 16, a fixed random 768-d target
  joint-demo    the demo's joint step (configs/fmnist-joint.yaml: vq-tiny + gpt-tiny, perceptual + GAN,
                EfficientNet-Lite0 targets computed once as the demo caches them), batch 32 of Fashion-MNIST
  sample-b      generate() at GPT-B, 16 x 16 tokens, batch 4, CFG 1.5, seed 0 (random weights)

    .venv/bin/python benchmarks/ab_compare.py --ref HEAD --pieces joint-issue joint-demo --rounds 9 --threads 1

``--compile-a`` runs A with ``torch.compile`` on the modules the trainer compiles under ``train.compile=true``
(tokenizer, generator, discriminator); with ``--ref HEAD`` and a clean tree that times compiled against eager.
Give it a few ``--warmup`` calls: the first ones compile (and recompile when the stage toggles ``requires_grad``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PIECES = {
    "joint-issue": dict(
        overrides=["model.tokenizer=vq-tiny", "model.tokenizer_overrides={codebook_size: 4096, channel_mult: [1, 2]}",
                   "model.generator=gpt-mini", "model.generator_overrides={n_layer: 12, dim: 384, n_head: 6}",
                   "data.image_size=16", "loss.perceptual_weight=0", "loss.gan_weight=0", "align.tap_layer=4"],
        batch=16, num_classes=10, target_dim=768),
    "joint-demo": dict(config="configs/fmnist-joint.yaml", overrides=["model.tokenizer_init="],
                       batch=32, num_classes=10, target_dim=0),
    "sample-b": dict(preset="gpt-b", batch=4, cfg_scale=1.5),
}


# ----------------------------------------------------------------------------------------- worker side


def build_joint(spec: dict, seed: int):
    """Modules, optimizers, step config and one batch, built by the version's own stage functions (as its trainer
    builds them). Versions before ``gear.train.stage`` cannot be compared."""
    import torch

    from gear.config import load_config
    try:
        from gear.train import stage, steps
    except ImportError:
        raise SystemExit("ab_compare: this version predates gear.train.stage (the shared build of a stage); "
                         "compare against a later ref") from None

    config = spec.get("config")
    compiled = ["train.compile=true"] if os.environ.get("GEAR_AB_COMPILE") == "1" else []
    cfg = load_config(ROOT / config if config else None, [*spec["overrides"], "train.stage=joint", *compiled])
    torch.manual_seed(seed)
    # target_dim: no teacher; a fixed random target of that width stands in for its features
    m = stage.build_modules(cfg, spec["num_classes"], target_dim=spec["target_dim"])
    images, labels = first_images(cfg, spec["batch"], seed)
    grid = cfg.data.image_size // m.tokenizer.downsample
    if spec["target_dim"]:
        target = torch.randn(spec["batch"], grid * grid, spec["target_dim"], generator=torch.Generator().manual_seed(seed))
    else:
        with torch.no_grad():  # computed once, as the demo caches them
            target = m.teacher(images, grid).float()
    trained = stage.trained_modules("joint", m)
    opts = stage.build_optimizers(cfg, trained)
    for mod in trained.values():
        mod.train()
    step_cfg = steps.StepConfig.from_config(cfg, tap_layer=stage.tap_layer(cfg, m.generator.config.n_layer),
                                            class_dropout=m.generator.config.class_dropout, soft_statistics=False)
    return m, opts, step_cfg, images, labels, target


def first_images(cfg, batch: int, seed: int):
    import torch

    if cfg.data.name == "fashion-mnist":
        try:
            from gear.data import build_dataset

            data = build_dataset(cfg.data, "train")
            samples = [data[i] for i in range(batch)]
            return torch.stack([s.image for s in samples]), torch.tensor([int(s.label) for s in samples])
        except (FileNotFoundError, OSError):
            pass
    g = torch.Generator().manual_seed(seed)
    size = cfg.data.image_size
    return torch.rand(batch, 3, size, size, generator=g) * 2 - 1, torch.randint(0, 10, (batch,), generator=g)


def worker(piece: str, seed: int) -> None:
    """Build the piece, then answer requests on stdin: ``run`` -> seconds of one call; ``digest`` -> numbers to compare."""
    import torch

    spec = PIECES[piece]
    calls = 0
    if piece.startswith("joint"):
        from gear.train import steps

        m, opts, step_cfg, images, labels, target = build_joint(spec, seed)
        first: dict[str, float] = {}

        def call():
            nonlocal first
            torch.manual_seed(seed * 1000 + calls)  # dropout masks from the call count, as the trainer's from the step
            result = steps.gear_step(m, opts, step_cfg, images, labels, target)
            steps.apply_all(opts)
            if not first:
                first = {k: float(v) for k, v in result.metrics.items()}

        def digest():
            mods = {"tokenizer": m.tokenizer, "generator": m.generator, "projector": m.projector,
                    "discriminator": m.discriminator}
            sums = {k: float(sum(p.detach().double().abs().sum() for p in mod.parameters()))
                    for k, mod in mods.items() if mod is not None}
            return {"first_step": first, "param_abs_sums": sums}
    else:
        from gear.models.gpt import build_generator

        torch.manual_seed(seed)
        gen = build_generator(spec["preset"])
        with torch.no_grad():
            torch.nn.init.normal_(gen.output.weight, std=0.02)  # a zero output layer would sample uniformly
        labels = torch.arange(spec["batch"]) % gen.config.num_classes
        tokens = []

        def call():
            tokens.append(gen.generate(labels, cfg_scale=spec["cfg_scale"], seed=0))

        def digest():
            return {"tokens_equal_across_calls": all(torch.equal(t, tokens[0]) for t in tokens),
                    "tokens": tokens[0].flatten().tolist()}

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = line.strip()
        if request == "run":
            t0 = time.perf_counter()
            call()
            calls += 1
            print(json.dumps({"seconds": time.perf_counter() - t0}), flush=True)
        elif request == "digest":
            print(json.dumps(digest()), flush=True)
        else:
            break


# ----------------------------------------------------------------------------------------- parent side


class Worker:
    def __init__(self, src: Path, piece: str, threads: int, seed: int, compile: bool = False):
        env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "GEAR_AB_COMPILE": "1" if compile else "0"}
        cmd = [sys.executable, __file__, "--worker", piece, "--seed", str(seed), "--threads", str(threads)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        self.ask(None)

    def ask(self, request: str | None) -> dict:
        if request is not None:
            self.proc.stdin.write(request + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker exited with code {self.proc.wait()}")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def export_ref(ref: str, into: Path) -> Path:
    """The ref's src/ tree, written under ``into`` (no git worktree is registered)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "src"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "src"


def compare(piece: str, sources: dict[str, Path], rounds: int, warmup: int, threads: int, seed: int,
            compile_a: bool = False) -> dict:
    workers = {name: Worker(src, piece, threads, seed, compile=compile_a and name == "A") for name, src in sources.items()}
    try:
        for _ in range(warmup):
            for w in workers.values():
                w.ask("run")
        times: dict[str, list[float]] = {name: [] for name in workers}
        names = list(workers)
        for r in range(rounds):
            for name in names if r % 2 == 0 else names[::-1]:  # A B, B A, A B, ...
                times[name].append(workers[name].ask("run")["seconds"])
        digests = {name: w.ask("digest") for name, w in workers.items()}
    finally:
        for w in workers.values():
            w.close()
    medians = {name: statistics.median(v) for name, v in times.items()}
    ratios = sorted(a / b for a, b in zip(times["A"], times["B"]))
    return {"piece": piece, "medians": medians, "ratio": medians["A"] / medians["B"],
            "ratio_range": (ratios[0], ratios[-1]), "digests": digests}


def agreement(result: dict) -> str:
    a, b = result["digests"]["A"], result["digests"]["B"]
    if "tokens" in a:
        same = a["tokens"] == b["tokens"]
        return "same tokens" if same else f"tokens differ at {sum(x != y for x, y in zip(a['tokens'], b['tokens']))} positions"
    rel = [abs(a["first_step"][k] - b["first_step"][k]) / max(abs(b["first_step"][k]), 1e-12)
           for k in b["first_step"] if k in a["first_step"]]
    prel = [abs(a["param_abs_sums"][k] - v) / v for k, v in b["param_abs_sums"].items()]
    return f"first-step losses max rel diff {max(rel):.1e}; parameter abs-sums after all steps max rel diff {max(prel):.1e}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ref", default="HEAD", help="git ref to compare the working tree against")
    p.add_argument("--pieces", nargs="*", default=list(PIECES), choices=list(PIECES))
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="also write the table to this markdown file")
    p.add_argument("--compile-a", action="store_true", help="A's modules under torch.compile (as train.compile=true)")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.compile_a and not all(piece.startswith("joint") for piece in args.pieces):
        p.error("--compile-a compiles the joint step's modules: choose joint pieces only (--pieces joint-issue joint-demo)")
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        worker(args.worker, args.seed)
        return
    start = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="gear-ab-") as tmp:
        sources = {"A": ROOT / "src", "B": export_ref(args.ref, Path(tmp))}
        for piece in args.pieces:
            r = compare(piece, sources, args.rounds, args.warmup, args.threads, args.seed, args.compile_a)
            results.append(r)
            print(f"{piece}: A {1000 * r['medians']['A']:.1f} ms, B {1000 * r['medians']['B']:.1f} ms, "
                  f"A/B {r['ratio']:.3f} (per-round {r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f}); "
                  f"{agreement(r)}", flush=True)
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.ref], capture_output=True, text=True).stdout.strip()
    lines = [
        f"- command: `python benchmarks/ab_compare.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; A = working tree, B = {args.ref} "
        f"({rev}){'; A under torch.compile' if args.compile_a else ''}; {args.threads} thread(s) per worker; "
        f"{args.rounds} alternating rounds after {args.warmup} warm-up; "
        f"run time {time.perf_counter() - start:.0f} s",
        "",
        "| piece | A median ms | B median ms | A / B | per-round A / B | agreement |",
        "|---|---:|---:|---:|---:|---|",
    ]
    lines += [f"| {r['piece']} | {1000 * r['medians']['A']:.1f} | {1000 * r['medians']['B']:.1f} | {r['ratio']:.3f} | "
              f"{r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f} | {agreement(r)} |" for r in results]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
