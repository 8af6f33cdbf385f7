"""A reference batch for `gear eval adm` from a run's own held-out split: its first N images, uint8 NHWC RGB under
``arr_0`` (grey replicated to three channels), at the run's image size, with their labels under ``arr_1``.

    python scripts/reference_npz.py runs/demo/ar --num 500 --out runs/fmnist-test-500.npz

For Fashion-MNIST this is the test split (the data set, size and crop come from the run's config.yaml), the
counterpart of ImageNet's VIRTUAL_imagenet256_labeled.npz for a run trained here. The images are streamed into the
file batch by batch, so any --num the split holds fits in memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import numpy as np
import torch

from gear.data import build_dataset
from gear.eval.convert import to_rgb, to_uint8_nhwc
from gear.eval.export import write_adm_npz_chunks
from gear.run import read_run_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a run directory (its config.yaml names the data)")
    p.add_argument("--num", type=int, default=500, help="the first N images of the held-out split")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--out", required=True, help="the .npz to write")
    args = p.parse_args(argv)
    data = read_run_config(args.run_dir).data
    split = build_dataset(dataclasses.replace(data, limit=0), "test")
    if not 1 <= args.num <= len(split):
        p.error(f"--num must be in 1..{len(split)} (the held-out split's size), got {args.num}")

    labels = np.zeros(args.num, dtype=np.int64)

    def chunks():  # each image read once; its label is recorded as it goes by (written after the images)
        for start in range(0, args.num, args.batch_size):
            items = [split[i] for i in range(start, min(start + args.batch_size, args.num))]
            labels[start:start + len(items)] = [int(item.label) for item in items]
            yield to_rgb(to_uint8_nhwc(torch.stack([item.image for item in items])))

    path = write_adm_npz_chunks(chunks(), args.num, args.out, labels=labels)
    print(f"wrote {path}: the first {args.num} images of {data.name}'s held-out split at {data.image_size} px")
    return 0


if __name__ == "__main__":
    sys.exit(main())
