"""Precomputed AR inputs: the codes of every training image under a frozen tokenizer, and the teacher's features.

``gear extract CONFIG`` encodes the training split once (both views, as is and mirrored, when the data set
flips) and writes two kinds of entries into the directory ``data.code_store``::

    codes-<key>/     meta.json, codes.npy (N, views, h, w) int32, labels.npy (N,) int64
    features-<key>/  meta.json, features.npy (N, views, grid*grid, D) float16

A codes entry is keyed by the tokenizer's weights and config and by the data (name, content, limit, image size,
flip, crop); a features entry by the teacher's weights, the token grid and the same data. Features are shared
by every tokenizer of one data set, so a study extracts them once. The ar stage, given ``data.code_store``,
looks up the entries of its own tokenizer and teacher; a store without them (another tokenizer, changed data) is
refused with the command that writes them. Features are kept in float16, as ``train.cache_teacher_features``
keeps them, so an AR run on the store reproduces a run with that cache to float rounding.

``CodeStore.stream`` replays ``train/batches.py``'s ``StepBatchSampler``: the same items at every step, and for a
flipping data set the view that the data set's own augmentation would draw at that (epoch, item).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from gear.data import DataConfig, FashionMNIST, ImageFolder
from gear.data.transforms import hflip, to_tensor_minus1_1
from gear.train.batches import StepBatchSampler

FORMAT = 1
META = "meta.json"


class CodeBatch(NamedTuple):
    """A batch of the AR's inputs: ``codes`` (B, h, w) int64, labels, and keys ``item * views + view``."""

    codes: Tensor
    label: Tensor
    index: Tensor

    @property
    def image(self) -> Tensor:  # the place the loop reads a batch's inputs from
        return self.codes


# ---------------------------------------------------------------------------- keys


def module_digest(module: nn.Module) -> str:
    """sha256 of a module's config (if any), parameters and buffers (persistent or not), by name."""
    h = hashlib.sha256(type(module).__name__.encode())
    config = getattr(module, "config", None)
    if dataclasses.is_dataclass(config):
        h.update(json.dumps(dataclasses.asdict(config), sort_keys=True, default=str).encode())
    tensors = dict(module.named_parameters())
    tensors |= dict(module.named_buffers())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def flips(dataset: Dataset) -> bool:
    return isinstance(dataset, ImageFolder) and dataset.train and dataset.random_flip


def data_key(dataset: Dataset, data: DataConfig) -> dict:
    """What identifies the training images: the config fields that change them and a digest of their content."""
    h = hashlib.sha256()
    if isinstance(dataset, FashionMNIST):
        h.update(dataset.images.numpy().tobytes())
        h.update(dataset.labels.numpy().tobytes())
    elif isinstance(dataset, ImageFolder):
        for path, label in dataset.samples:  # names, sizes and modification times: no need to read every file
            st = os.stat(path)
            h.update(f"{path.relative_to(dataset.root)}\t{label}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    else:
        raise ValueError(f"a code store cannot identify the content of a {type(dataset).__name__} data set")
    return {"name": data.name, "content": h.hexdigest(), "limit": data.limit, "image_size": data.image_size,
            "flip": flips(dataset), "crop": data.crop if data.name == "imagefolder" else "", "items": len(dataset)}


def _entry_name(kind: str, key: dict) -> str:
    return f"{kind}-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}"


def codes_key(tokenizer: nn.Module, data: dict, bf16: bool) -> dict:
    return {"format": FORMAT, "tokenizer": module_digest(tokenizer), "data": data, "bf16": bf16}


def features_key(teacher: nn.Module, grid: int, data: dict, bf16: bool) -> dict:
    key = {"format": FORMAT, "teacher": getattr(teacher, "name", type(teacher).__name__),
           "teacher_weights": module_digest(teacher), "grid": grid, "data": data, "bf16": bf16}
    if hasattr(teacher, "targets_version"):  # a teacher whose computation changed names it (keys of others unchanged)
        key["teacher_version"] = teacher.targets_version
    return key


# ---------------------------------------------------------------------------- extraction


def views_of(dataset: Dataset, index: int) -> tuple[list[Tensor], int]:
    """The images a training step can see for item ``index`` (as is, and mirrored when the data set flips), and
    its label."""
    if isinstance(dataset, ImageFolder):
        pixels = dataset.resized(index)
        if pixels.shape[:2] != (dataset.image_size, dataset.image_size):
            raise ValueError(
                f"{dataset.samples[index][0]} is {pixels.shape[1]}x{pixels.shape[0]} after resizing, so its random crop "
                f"changes every epoch and a code store cannot hold it: crop the images square or train without data.code_store")
        views = [pixels, hflip(pixels)] if flips(dataset) else [pixels]
        return [to_tensor_minus1_1(np.ascontiguousarray(v)) for v in views], dataset.samples[index][1]
    sample = dataset[index]
    return [sample.image], int(sample.label)


@dataclass
class Extracted:
    codes: Path
    features: Path | None
    wrote: list[str]   # the entries written now (the others were already there)
    seconds: float


def extract(root: str | Path, dataset: Dataset, data: DataConfig, tokenizer: nn.Module, teacher: nn.Module | None,
            batch_size: int = 256, device: torch.device | str = "cpu", bf16: bool = False) -> Extracted:
    """Write the codes of ``tokenizer`` (and the features of ``teacher``) for ``dataset`` into ``root``, skipping
    entries already there. ``bf16``: encode under bf16 autocast, as the ar stage does on CUDA."""
    start = time.time()
    root = Path(root)
    device = torch.device(device)
    dkey = data_key(dataset, data)
    tokenizer = tokenizer.to(device).eval()
    grid = data.image_size // tokenizer.downsample
    ckey = codes_key(tokenizer, dkey, bf16)
    jobs = {"codes": (root / _entry_name("codes", ckey), ckey)}
    if teacher is not None:
        fkey = features_key(teacher, grid, dkey, bf16)
        jobs["features"] = (root / _entry_name("features", fkey), fkey)
    todo = {kind: job for kind, job in jobs.items() if not (job[0] / META).is_file()}
    if todo:
        _write(todo, dataset, tokenizer, teacher.to(device) if teacher is not None else None, grid, batch_size, device, bf16)
    return Extracted(jobs["codes"][0], jobs["features"][0] if "features" in jobs else None,
                     [p.name for p, _ in todo.values()], time.time() - start)


def _write(todo: dict, dataset: Dataset, tokenizer, teacher, grid: int, batch_size: int, device, bf16: bool) -> None:
    n, views = len(dataset), 2 if flips(dataset) else 1
    tmp = {kind: path.with_name(f".{path.name}.{os.getpid()}.tmp") for kind, (path, _) in todo.items()}
    for path in tmp.values():
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
    arrays: dict[str, np.ndarray] = {}
    if "codes" in todo:
        arrays["codes"] = np.lib.format.open_memmap(tmp["codes"] / "codes.npy", "w+", np.int32, (n, views, grid, grid))
        labels = np.zeros(n, dtype=np.int64)
    if "features" in todo:
        shape = (n, views, grid * grid, teacher.feature_dim)
        arrays["features"] = np.lib.format.open_memmap(tmp["features"] / "features.npy", "w+", np.float16, shape)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        for lo in range(0, n, batch_size):
            items = range(lo, min(lo + batch_size, n))
            loaded = [views_of(dataset, i) for i in items]
            images = torch.stack([v for views_i, _ in loaded for v in views_i]).to(device)
            if "codes" in todo:
                codes = tokenizer.encode(images).view(len(items), views, grid, grid)
                arrays["codes"][lo : lo + len(items)] = codes.cpu().numpy().astype(np.int32)
                labels[lo : lo + len(items)] = [label for _, label in loaded]
            if "features" in todo:
                feats = teacher(images, grid).float().to(torch.float16)
                arrays["features"][lo : lo + len(items)] = feats.view(len(items), views, grid * grid, -1).cpu().numpy()
    for kind, (path, key) in todo.items():
        arrays[kind].flush()
        if kind == "codes":
            np.save(tmp[kind] / "labels.npy", labels)
        meta = {"key": key, "items": n, "views": views, "grid": grid, "shape": list(arrays[kind].shape)}
        (tmp[kind] / META).write_text(json.dumps(meta, indent=1))  # last: an entry without it is incomplete
        del arrays[kind]
        if (path / META).is_file():  # another process wrote the same entry meanwhile: keep that one
            shutil.rmtree(tmp[kind])
            continue
        if path.exists():  # an incomplete entry left by a crash
            shutil.rmtree(path)
        os.replace(tmp[kind], path)


# ---------------------------------------------------------------------------- reading


def _open_entry(root: Path, kind: str, key: dict, what: str) -> tuple[Path, dict]:
    path = root / _entry_name(kind, key)
    if not (path / META).is_file():
        others = sum(1 for p in root.glob(f"{kind}-*") if (p / META).is_file()) if root.is_dir() else 0
        raise ValueError(f"data.code_store={root} holds no {kind} of {what} on this data ({others} other {kind} "
                         f"entries, stale or for other runs): run `gear extract` with this run's config first")
    meta = json.loads((path / META).read_text())
    if meta.get("key") != key:
        raise ValueError(f"{path} was written for other weights or data than its name says: delete it and run `gear extract` again")
    return path, meta


class CodeStore:
    """The store entries of one ar run, checked against its tokenizer, teacher, data and precision (``bf16``: the
    run encodes under bf16 autocast, as on CUDA; such codes are stored apart from float32 ones)."""

    def __init__(self, root: str | Path, dataset: Dataset, data: DataConfig, tokenizer: nn.Module,
                 teacher: nn.Module | None = None, bf16: bool = False):
        self.root, self.dataset = Path(root), dataset
        dkey = data_key(dataset, data)
        self.grid = data.image_size // tokenizer.downsample
        path, meta = _open_entry(self.root, "codes", codes_key(tokenizer, dkey, bf16), "this tokenizer")
        self.views = int(meta["views"])
        self.codes = np.load(path / "codes.npy", mmap_mode="r")
        self.labels = torch.from_numpy(np.load(path / "labels.npy"))
        expected = (len(dataset), self.views, self.grid, self.grid)
        if self.codes.shape != expected or len(self.labels) != len(dataset):
            raise ValueError(f"{path} holds codes of shape {self.codes.shape}, expected {expected}: delete it and extract again")
        self.features = None
        if teacher is not None:
            fpath, _ = _open_entry(self.root, "features", features_key(teacher, self.grid, dkey, bf16), f"teacher {getattr(teacher, 'name', type(teacher).__name__)}")
            self.features = np.load(fpath / "features.npy", mmap_mode="r")
            if self.features.shape[:3] != (len(dataset), self.views, self.grid * self.grid):
                raise ValueError(f"{fpath} holds features of shape {self.features.shape}: delete it and extract again")

    def stream(self, global_batch: int, seed: int, start_step: int, rank: int = 0, world_size: int = 1) -> Iterator[CodeBatch]:
        """The batches ``batch_stream`` would give from ``start_step`` on, as codes."""
        n = len(self.dataset)
        for keys in StepBatchSampler(n, global_batch, seed, start_step, rank, world_size):
            epochs, items = np.divmod(np.asarray(keys, dtype=np.int64), n)
            if self.views == 2:
                view = np.array([self.dataset.flipped(int(i), int(e)) for i, e in zip(items, epochs)], dtype=np.int64)
            else:
                view = np.zeros_like(items)
            codes = torch.from_numpy(self.codes[items, view].astype(np.int64))
            yield CodeBatch(codes, self.labels[items], torch.from_numpy(items * self.views + view))

    def features_of(self, index: Tensor) -> Tensor:
        """The teacher's features (B, grid*grid, D) float32 of the views ``index`` (keys of ``CodeBatch.index``)."""
        if self.features is None:
            raise ValueError("this code store was opened without a teacher")
        items, view = np.divmod(index.cpu().numpy(), self.views)
        return torch.from_numpy(self.features[items, view].astype(np.float32))


def extract_for_config(cfg, batch_size: int = 256) -> Extracted:
    """``gear extract``: the entries an ar config (``train.stage=ar``) reads from its ``data.code_store``."""
    from gear.align.teachers import build_teacher
    from gear.data import build_dataset
    from gear.train.build import tokenizer_from_config
    from gear.train.stage import uses_bf16

    if cfg.train.stage != "ar":
        raise ValueError(f"gear extract reads the config of an ar stage (train.stage=ar), got train.stage={cfg.train.stage}")
    if not cfg.data.code_store:
        raise ValueError("set data.code_store=DIR, the directory the codes go to (and that the ar run reads)")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    want = cfg.train.device
    device = torch.device("cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu")
    bf16 = uses_bf16(cfg, device)  # as the ar stage encodes
    dataset = build_dataset(cfg.data, "train", seed=cfg.train.seed)
    teacher = build_teacher(cfg.align.teacher, path=cfg.align.teacher_path or None) if cfg.align.lambda_ar > 0 else None
    return extract(cfg.data.code_store, dataset, cfg.data, tokenizer_from_config(cfg), teacher, batch_size, device, bf16)
