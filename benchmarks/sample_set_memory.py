"""Peak memory of `gear sample RUN --num N --npz OUT` as N grows: it stays flat, since every finished chunk goes to
disk and the .npz is streamed from them one at a time.

A small random class-conditional run is saved first (vq-tiny at downsample 8 and gpt-tiny on an 8x8 grid: 64 px
images, 12 KiB each as uint8), then `gear sample` runs in a fresh process for each ``--nums`` value and the
process's peak resident memory (getrusage of the finished child) is read. The ratio of the peaks is printed next to
what holding every image as uint8 would add (the float32 batches the images are decoded from are four times that).

    PYTHONPATH=src .venv/bin/python benchmarks/sample_set_memory.py --nums 500 4000 --out benchmarks/results/sample_set_memory.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gear.models.autoencoder import build_tokenizer
from gear.models.gpt import build_generator


def save_run(root: Path) -> int:
    """A random tokenizer + generator pair as a run directory; returns the image size."""
    torch.manual_seed(0)
    tok = build_tokenizer("vq-tiny", channel_mult=(1, 1, 1, 1))
    gen = build_generator("gpt-tiny", vocab_size=tok.codebook_size, grid_size=8, num_classes=10)
    with torch.no_grad():
        torch.nn.init.normal_(gen.output.weight, std=0.02)  # the zero-initialised output layer samples uniformly
    tok.save_pretrained(root / "tokenizer")
    gen.save_pretrained(root / "generator")
    return gen.config.grid_size * tok.downsample


def peak_rss(argv: list[str], threads: int) -> tuple[float, float]:
    """Run ``argv`` in a child process; its peak resident memory (MiB) and wall time (s)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    child = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    if status != 0:
        raise SystemExit(f"{' '.join(argv)} failed (status {status})")
    return usage.ru_maxrss / 1024, time.perf_counter() - start  # ru_maxrss is in KiB on Linux


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nums", type=int, nargs=2, default=[500, 4000], help="two sample counts, small then large")
    p.add_argument("--batch-size", type=int, default=50, help="samples per chunk (its decode is the transient peak)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="", help="also write the result to this markdown file")
    args = p.parse_args(argv)
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        size = save_run(root / "run")
        for num in args.nums:
            npz = root / f"samples-{num}.npz"
            cmd = [sys.executable, "-m", "gear.cli", "sample", str(root / "run"), "--num", str(num), "--npz", str(npz),
                   "--batch-size", str(args.batch_size), "--cfg-scale", "1.0"]
            rss, seconds = peak_rss(cmd, args.threads)
            rows.append((num, rss, seconds, npz.stat().st_size / 2**20, num * size * size * 3 / 2**20))
            print(f"--num {num}: peak RSS {rss:.0f} MiB in {seconds:.0f} s", flush=True)
    (small, rss_small, *_), (large, rss_large, _, _, held_large) = rows
    held_small = rows[0][4]
    text = "\n".join([
        f"- command: `python benchmarks/sample_set_memory.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}; "
        f"{args.threads} thread(s); run time {time.perf_counter() - start:.0f} s",
        f"- `gear sample RUN --num N --npz OUT --batch-size {args.batch_size} --cfg-scale 1.0` in a fresh process per "
        f"N, on a random vq-tiny (downsample 8) + gpt-tiny (8x8 tokens) run: {size} px images",
        "",
        "| --num | peak RSS MiB | time s | .npz MiB | all images as uint8, MiB |",
        "|---:|---:|---:|---:|---:|",
        *[f"| {n} | {r:.0f} | {s:.0f} | {z:.0f} | {h:.0f} |" for n, r, s, z, h in rows],
        "",
        f"{large / small:.0f}x the samples: peak RSS x**{rss_large / rss_small:.3f}** ({rss_large - rss_small:+.0f} MiB), "
        f"where holding the images would add {held_large - held_small:.0f} MiB as uint8 "
        f"({4 * (held_large - held_small):.0f} MiB as the float32 they are decoded to)",
    ]) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
