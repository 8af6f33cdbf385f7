"""The approximate soft branch (``align.soft_branch=shared``) against the exact one: gradient agreement and step time.

shared takes the alignment gradient at the hard tokens from the AR update's own forward and applies it to the soft
embedding to first order, so the frozen AR no longer runs on the soft input. This measures, on the joint step's
modules (benchmarks/ab_compare.py's `joint-demo` and `joint-issue` sizes):
  - cosine between the tokenizer gradients (encoder + codebook) of the two alignment terms, with the AR as the
    AR update runs it (dropout, class dropout; mean over seeds) and without dropout (the linearization alone);
  - the time of a whole joint step with each, interleaved rounds in one process, medians.

    .venv/bin/python benchmarks/soft_branch.py --threads 1 --rounds 5 --out benchmarks/results/soft_branch.md
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ab_compare  # noqa: E402
from gear.train import steps  # noqa: E402


def tokenizer_grads(m, cfg, images, labels, target, branch: str, seed: int) -> torch.Tensor:
    """The alignment term's gradient w.r.t. the tokenizer's encoder and codebook, flattened (float64)."""
    params = [p for n, p in m.tokenizer.named_parameters() if n.startswith(("encoder.", "quant_conv.", "quantize."))]
    out = m.tokenizer(images)
    torch.manual_seed(seed)
    if branch == "exact":
        align = steps.tokenizer_terms(m, dataclasses.replace(cfg, l1_weight=0.0, perceptual_weight=0.0, gan_weight=0.0),
                                      images, labels, target, out)["align_tok"]
    else:
        _, _, grad = steps.hard_point_gradient(m, cfg, out.quant.indices, labels, target)
        soft = steps.soft_tokens(out.quant.d, cfg.temperature, cfg.soft_top_k, len(labels), sparse=True)
        with steps.frozen(m.generator, m.projector):
            align = (grad * m.generator.embed_tokens(soft[:, :-1])).sum()
    g = torch.autograd.grad(align, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if x is None else x).flatten() for p, x in zip(params, g)]).double()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def agreement(piece: str, temperatures, seeds: int) -> list[dict]:
    m, _, cfg, images, labels, target = ab_compare.build_joint(ab_compare.PIECES[piece], 0)
    rows = []
    for T in temperatures:
        c = dataclasses.replace(cfg, temperature=T)
        exact = tokenizer_grads(m, c, images, labels, target, "exact", 0)
        with_dropout = [cosine(exact, tokenizer_grads(m, c, images, labels, target, "shared", s)) for s in range(seeds)]
        m.generator.eval()  # no dropout; the class dropout off too
        plain = cosine(exact, tokenizer_grads(m, dataclasses.replace(c, class_dropout=0.0), images, labels, target, "shared", 0))
        m.generator.train()
        rows.append({"T": T, "train": statistics.mean(with_dropout), "spread": (min(with_dropout), max(with_dropout)),
                     "no_dropout": plain})
        print(f"{piece} T={T}: cos {rows[-1]['train']:.3f} (dropout), {plain:.3f} (no dropout)", flush=True)
    return rows


def step_times(piece: str, rounds: int) -> dict[str, float]:
    m, opts, cfg, images, labels, target = ab_compare.build_joint(ab_compare.PIECES[piece], 0)
    times: dict[str, list[float]] = {"exact": [], "shared": []}
    for r in range(rounds + 1):  # round 0 warms up
        for branch in ("exact", "shared") if r % 2 == 0 else ("shared", "exact"):
            t0 = time.perf_counter()
            steps.gear_step(m, opts, dataclasses.replace(cfg, soft_branch=branch), images, labels, target)
            steps.apply_all(opts)
            if r:
                times[branch].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{piece}: exact {1000 * med['exact']:.0f} ms, shared {1000 * med['shared']:.0f} ms", flush=True)
    return med


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pieces", nargs="*", default=["joint-demo", "joint-issue"], choices=["joint-demo", "joint-issue"])
    p.add_argument("--temperatures", type=float, nargs="*", default=[0.1, 0.05, 0.01])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    lines = [
        "# Soft branch: exact vs shared (approximate, opt-in)", "",
        f"- command: `python benchmarks/soft_branch.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}; "
        f"{args.threads} thread(s); fresh modules of each size (benchmarks/ab_compare.py), top-256 assignment", "",
        "| size | T | gradient cosine, AR as trained (mean, range over seeds) | without dropout |", "|---|---:|---:|---:|"]
    timing = []
    for piece in args.pieces:
        for r in agreement(piece, args.temperatures, args.seeds):
            lines.append(f"| {piece} | {r['T']} | {r['train']:.3f} ({r['spread'][0]:.3f}-{r['spread'][1]:.3f}) | "
                         f"{r['no_dropout']:.3f} |")
        med = step_times(piece, args.rounds)
        timing.append(f"| {piece} | {1000 * med['exact']:.0f} | {1000 * med['shared']:.0f} | {med['shared'] / med['exact']:.3f} |")
    lines += ["", f"Joint step, {args.rounds} interleaved rounds, medians:", "",
              "| size | exact ms | shared ms | shared / exact |", "|---|---:|---:|---:|", *timing, "",
              f"Run time {time.perf_counter() - start:.0f} s."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
