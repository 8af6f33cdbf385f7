"""Sampling speed of ``gear``'s generate() against LlamaGen's ``generate()`` on the same weights, in one process.

LlamaGen's code is not part of this project: pass a checkout of FoundationVision/LlamaGen with ``--llamagen DIR``
(only ``autoregressive/models/{gpt,generate}.py`` and ``utils/drop_path.py`` are imported from it). Both models are
built at the same size; LlamaGen's loads our randomly initialised weights (the parameter names are the same), so
both compute the same function. First a greedy run (top-k 1) of each on the first few labels checks that they pick
the same tokens; then the two samplers are timed alternately (A/B/B/A...) with the evaluation defaults (temperature 1,
top-k 0, top-p 1) and CFG, and the ratio of medians is reported.

    .venv/bin/python benchmarks/sampling_vs_llamagen.py --llamagen /tmp/LlamaGen --preset gpt-b --batch 4 --rounds 5
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

from gear.models.gpt import build_generator

GREEDY_ROWS = 4


def build_pair(llamagen: Path, preset: str, seed: int):
    sys.path.insert(0, str(llamagen))
    from autoregressive.models import gpt as lg  # noqa: E402  (their module, from the given checkout)

    torch.manual_seed(seed)
    ours = build_generator(preset)
    with torch.no_grad():
        torch.nn.init.normal_(ours.output.weight, std=0.02)  # the zero-initialised output layer would sample uniformly
    c = ours.config
    theirs = lg.Transformer(lg.ModelArgs(
        dim=c.dim, n_layer=c.n_layer, n_head=c.n_head, multiple_of=c.multiple_of, vocab_size=c.vocab_size,
        block_size=c.seq_len, num_classes=c.num_classes, cls_token_num=c.cls_token_num, model_type="c2i"))
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours.eval(), theirs.eval()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llamagen", required=True, help="a checkout of FoundationVision/LlamaGen")
    p.add_argument("--preset", default="gpt-b")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="also write the result to this markdown file")
    args = p.parse_args(argv)
    if not (Path(args.llamagen) / "autoregressive" / "models" / "generate.py").is_file():
        p.error(f"--llamagen {args.llamagen} is not a LlamaGen checkout (no autoregressive/models/generate.py)")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    ours, theirs = build_pair(Path(args.llamagen), args.preset, args.seed)
    from autoregressive.models.generate import generate as llamagen_generate

    c = ours.config
    labels = torch.arange(args.batch) % c.num_classes

    def run_ours(rows=labels, **kw):
        return ours.generate(rows, cfg_scale=args.cfg_scale, **kw).flatten(1)

    def run_theirs(rows=labels, **kw):
        return llamagen_generate(theirs, rows, c.seq_len, cfg_scale=args.cfg_scale, **kw).long()

    check = labels[:GREEDY_ROWS]  # the same function on every row: a few rows show it, at a fraction of the cost
    with torch.inference_mode():
        greedy_same = torch.equal(run_ours(check, top_k=1), run_theirs(check, top_k=1))
    print(f"greedy tokens identical ({len(check)} rows): {greedy_same}", flush=True)
    pieces = {"gear": lambda: run_ours(seed=args.seed), "LlamaGen": lambda: run_theirs(temperature=1.0, top_k=0, top_p=1.0)}
    times: dict[str, list[float]] = {k: [] for k in pieces}
    names = list(pieces)
    with torch.inference_mode():
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                t0 = time.perf_counter()
                pieces[name]()
                times[name].append(time.perf_counter() - t0)
                print(f"round {r} {name}: {times[name][-1]:.2f} s", flush=True)
    tokens = args.batch * c.seq_len
    rate = {k: tokens / statistics.median(v) for k, v in times.items()}
    per_round = sorted(b / a for a, b in zip(times["gear"], times["LlamaGen"]))
    text = "\n".join([
        f"- command: `python benchmarks/sampling_vs_llamagen.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}; "
        f"{args.threads} thread(s); run time {time.perf_counter() - start:.0f} s",
        f"- compared: gear `GPT.generate` vs LlamaGen `autoregressive/models/generate.py::generate` on the same "
        f"{args.preset} weights (random, {sum(p.numel() for p in ours.parameters()) / 1e6:.0f}M parameters), "
        f"{c.grid_size}x{c.grid_size} tokens, batch {args.batch}, CFG {args.cfg_scale}, fp32 CPU, "
        f"{args.rounds} alternating rounds, medians; greedy (top-k 1) tokens identical on {len(check)} rows: {greedy_same}",
        "",
        "| sampler | median s | tokens/s |",
        "|---|---:|---:|",
        *[f"| {k} | {statistics.median(v):.2f} | {rate[k]:.1f} |" for k, v in times.items()],
        "",
        f"gear / LlamaGen tokens/s: **{rate['gear'] / rate['LlamaGen']:.2f}x** (per round {per_round[0]:.2f}-{per_round[-1]:.2f})",
    ]) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
