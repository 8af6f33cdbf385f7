"""Throughput and bytes read of the WebDataset readers, for one process of two: the shard split
(data.stream_split=shards) with 1, 2 and 4 loader workers against the exact split (every process reads every shard
in the training process and decodes its slice of each batch).

    .venv/bin/python benchmarks/shard_reader.py                    # 16 shards x 64 images of 96 px, one epoch
    .venv/bin/python benchmarks/shard_reader.py --shards 32 --per-shard 128 --rounds 3

Both processes' readers run here, one process after the other (rank 0, then rank 1), each for one epoch of the
global batch, so the bytes are what each process of a 2-process run reads in an epoch; samples/s is over the
whole epoch (starting the workers included) and from the first batch on (the workers running; with several
workers this overstates, as the others prepare their batches while the first one is awaited: read both). Variants run interleaved per round so that load from other programs
falls on all alike; the table shows medians, and the ratios to the exact split are what to read. Decoding is
only the reader's (no model step), so the ratios are an upper bound of what a training step sees.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def write_shards(folder: Path, shards: int, per_shard: int, pixels: int) -> str:
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(0)
    for s in range(shards):
        with wds.TarWriter(str(folder / f"train-{s:04d}.tar")) as sink:
            for i in range(per_shard):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (pixels, pixels, 3), dtype=np.uint8)).save(buf, format="PNG")
                sink.write({"__key__": f"{s:04d}_{i:05d}", "png": buf.getvalue(), "txt": f"image {s} {i}".encode()})
    return str(folder / f"train-{{0000..{shards - 1:04d}}}.tar")


def one_process(root: str, split: str, workers: int, rank: int, steps: int, batch: int,
                image_size: int) -> tuple[float, float, int]:
    """(seconds to the first batch, seconds for the others, bytes read) for process ``rank`` of 2 to make ``steps``
    local batches."""
    from gear.data import DataConfig, build_dataset
    from gear.train.batches import batch_stream

    cfg = DataConfig(name="webdataset", root=root, image_size=image_size, stream_split=split, num_workers=workers)
    dataset = build_dataset(cfg, "train", seed=0)
    t0 = time.perf_counter()
    first = None
    for _, _batch in zip(range(steps), batch_stream(dataset, batch, 0, 0, rank, 2, num_workers=workers,
                                                   end_step=steps)):
        first = first or time.perf_counter()
    return first - t0, time.perf_counter() - first, dataset.bytes_read


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--per-shard", type=int, default=64)
    p.add_argument("--pixels", type=int, default=96, help="stored image side")
    p.add_argument("--image-size", type=int, default=64, help="training image side")
    p.add_argument("--batch", type=int, default=16, help="global batch (8 per process)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    variants = [("exact", 0), *(("shards", w) for w in args.workers)]
    steps = args.shards * args.per_shard // args.batch  # one epoch
    with tempfile.TemporaryDirectory() as tmp:
        root = write_shards(Path(tmp), args.shards, args.per_shard, args.pixels)
        total = sum(f.stat().st_size for f in Path(tmp).glob("*.tar"))
        times: dict[str, list[float]] = {}  # the whole epoch
        steady: dict[str, list[float]] = {}  # from the first batch on (the workers started)
        read: dict[str, list[int]] = {}
        for _ in range(args.rounds):
            for split, workers in variants:
                name = f"{split}, {workers} workers" if split == "shards" else "exact (in-process)"
                results = [one_process(root, split, workers, rank, steps, args.batch, args.image_size) for rank in (0, 1)]
                times.setdefault(name, []).append(sum(a + b for a, b, _ in results))
                steady.setdefault(name, []).append(sum(b for _, b, _ in results))
                read[name] = [n for _, _, n in results]
    local = steps * args.batch // 2
    print(f"{args.shards} shards x {args.per_shard} PNGs of {args.pixels} px ({total / 1e6:.1f} MB), 2 processes, "
          f"global batch {args.batch}, one epoch ({steps} steps); {args.rounds} round(s), medians")
    print("| reader | samples/s per process (epoch) | vs exact | after the first batch | vs exact | "
          "MB read by rank 0 / rank 1 | of the data set |")
    print("|---|---|---|---|---|---|---|")
    out: dict[str, dict[str, float]] = {}
    base = 2 * local / statistics.median(times["exact (in-process)"])
    base_steady = 2 * (local - args.batch // 2) / statistics.median(steady["exact (in-process)"])
    for name, ts in times.items():
        rate = 2 * local / statistics.median(ts)
        rate_steady = 2 * (local - args.batch // 2) / statistics.median(steady[name])
        out[name] = {"samples_per_s": rate, "ratio": rate / base, "steady_samples_per_s": rate_steady,
                     "steady_ratio": rate_steady / base_steady, "bytes_rank0": read[name][0],
                     "bytes_rank1": read[name][1]}
        print(f"| {name} | {rate:.0f} | {rate / base:.2f}x | {rate_steady:.0f} | {rate_steady / base_steady:.2f}x | "
              f"{read[name][0] / 1e6:.1f} / {read[name][1] / 1e6:.1f} | {read[name][0] / total:.2f} / "
              f"{read[name][1] / total:.2f} |")
    return out


if __name__ == "__main__":
    main()
