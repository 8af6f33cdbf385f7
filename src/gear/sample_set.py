"""Sample sets for the ADM evaluator: ``num`` class-conditional samples of a tokenizer + generator pair, drawn in
chunks fixed by sample index, shared out over the processes torchrun starts, kept on disk as they finish and
streamed into one ``.npz`` (uint8 NHWC under ``arr_0``, the labels under ``arr_1``).

    gear sample RUN --num 50000 --npz samples.npz
    torchrun --nproc_per_node 8 -m gear.cli sample RUN --num 50000 --npz samples.npz --device cuda

Chunk c holds samples [c * chunk_size, (c + 1) * chunk_size): their labels are fixed by their indices (class-balanced,
or drawn from the chunk's own seed) and the chunk is one ``generate`` call with its own seed, derived from the set's
seed and c. So the images, bit for bit, do not depend on how many processes drew them (they do depend on the chunk
size, which is a batch). Process r of W draws every W-th chunk still missing. Each finished chunk is written to
``OUT.npz.chunks/chunk_NNNNNN.npy`` atomically and a restart skips it; ``settings.json`` there records what the
chunks were drawn with, and a restart with other settings is refused. Process 0 streams the chunks into the
``.npz`` and removes the directory.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from gear.config import EvalConfig
from gear.data.transforms import to_uint8_image
from gear.eval.convert import to_rgb
from gear.eval.export import write_adm_npz_chunks
from gear.files import atomic_write
from gear.models.autoencoder import Tokenizer
from gear.models.gpt import GPT
from gear.sample import Sampling
from gear.train.distributed import barrier, gather_objects

DEFAULT_CHUNK_SIZE = 100  # samples per chunk: one decode batch (x2 rows with guidance)
LABEL_MODES = ("balanced", "random")
SETTINGS_FILE = "settings.json"


@dataclass(frozen=True, kw_only=True)
class SampleSetSettings:
    """What decides a sample set's images: count, labels, guidance, filters, seed and chunk size."""

    num: int
    classes: tuple[int, ...] = ()  # () = every class of the generator
    labels: str = "balanced"  # balanced: sample i is of class classes[i % K]; random: uniform draws (LlamaGen's)
    cfg_scale: float = EvalConfig.cfg_scale
    cfg_interval: int = -1  # -1: guidance on every token; N: on the first N + 1 after the prefill's (LlamaGen's)
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    chunk_size: int = DEFAULT_CHUNK_SIZE

    @property
    def num_chunks(self) -> int:
        return -(-self.num // self.chunk_size)

    def chunk_range(self, chunk: int) -> range:
        return range(chunk * self.chunk_size, min((chunk + 1) * self.chunk_size, self.num))

    def resolved_classes(self, num_classes: int) -> tuple[int, ...]:
        return self.classes or tuple(range(num_classes))

    def check(self, gen: GPT) -> None:
        """Raise ValueError naming the first setting the generator cannot sample with."""
        if self.num < 1:
            raise ValueError(f"--num must be >= 1, got {self.num}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk size must be >= 1, got {self.chunk_size}")
        if self.labels not in LABEL_MODES:
            raise ValueError(f"labels must be one of {', '.join(LABEL_MODES)}, got {self.labels!r}")
        if self.cfg_interval < -1:
            raise ValueError(f"cfg interval must be >= -1 (-1 = guidance on every token), got {self.cfg_interval}")
        n = gen.config.num_classes
        bad = [c for c in self.classes if not 0 <= c < n]
        if bad:
            raise ValueError(f"classes {','.join(map(str, bad))} are outside this generator's classes 0..{n - 1}")
        Sampling(cfg_scale=self.cfg_scale, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                 seed=self.seed).check_sampling(gen.config.vocab_size)

    def chunk_seed(self, chunk: int, stream: str = "tokens") -> int:
        """A seed of its own for each chunk (and for its label draw), independent of the other chunks'."""
        digest = hashlib.sha256(f"{self.seed}/{chunk}/{stream}".encode()).digest()
        return int.from_bytes(digest[:8], "little") >> 1

    def chunk_labels(self, chunk: int, num_classes: int) -> torch.Tensor:
        """The labels (int64) of the chunk's samples."""
        classes = torch.tensor(self.resolved_classes(num_classes))
        span = self.chunk_range(chunk)
        indices = torch.arange(span.start, span.stop)
        if self.labels == "balanced":
            return classes[indices % len(classes)]
        draw = torch.Generator().manual_seed(self.chunk_seed(chunk, "labels"))
        return classes[torch.randint(len(classes), (len(indices),), generator=draw)]

    def all_labels(self, num_classes: int) -> np.ndarray:
        return torch.cat([self.chunk_labels(c, num_classes) for c in range(self.num_chunks)]).numpy()


@dataclass(frozen=True)
class SampleSetResult:
    path: Path | None  # the .npz (process 0; None on the others)
    num: int
    drawn: int  # samples this process drew now (the rest were on disk or drawn by other processes)


def chunk_dir(npz: str | Path) -> Path:
    """Where the finished chunks of ``npz`` wait: ``OUT.npz.chunks/``."""
    npz = Path(npz)
    return npz.with_name(npz.name + ".chunks")


def chunk_file(directory: Path, chunk: int) -> Path:
    return directory / f"chunk_{chunk:06d}.npy"


@torch.no_grad()
def draw_chunk(tok: Tokenizer, gen: GPT, settings: SampleSetSettings, chunk: int) -> np.ndarray:
    """The chunk's images, uint8 (n, H, W, 3)."""
    device = gen.tok_embeddings.weight.device
    labels = settings.chunk_labels(chunk, gen.config.num_classes).to(device)
    indices = gen.generate(labels, cfg_scale=settings.cfg_scale, cfg_interval=settings.cfg_interval,
                           temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                           seed=settings.chunk_seed(chunk))
    images = to_uint8_image(tok.decode(indices)).permute(0, 2, 3, 1).cpu().numpy()
    return to_rgb(np.ascontiguousarray(images))


def write_sample_set(tok: Tokenizer, gen: GPT, settings: SampleSetSettings, npz: str | Path, *, source: str = "",
                     rank: int = 0, world_size: int = 1, progress: bool = False,
                     on_chunk: Callable[[int], None] | None = None) -> SampleSetResult:
    """Draw this process's share of the missing chunks, then (process 0) write ``npz`` from all of them.

    Every process of a torchrun group calls it with the same arguments. ``source`` names the weights (run
    directory, EMA or live) in ``settings.json``, so that a restart on other weights is refused. ``on_chunk(c)`` is
    called after chunk c is on disk.
    """
    settings.check(gen)
    npz = Path(npz)
    if npz.suffix != ".npz":
        raise ValueError(f"--npz {npz}: the sample file must end in .npz")
    if npz.exists():
        raise ValueError(f"{npz} already exists; remove it or choose another --npz")
    directory = chunk_dir(npz)
    claim(directory, {"source": source, "image_size": gen.config.grid_size * tok.downsample, **asdict(settings)})
    # every process lists the finished chunks before any writes one: process 0's list is everyone's
    missing = [c for c in range(settings.num_chunks) if not chunk_file(directory, c).is_file()]
    mine = gather_objects(missing)[0][rank::world_size]

    total = sum(len(settings.chunk_range(c)) for c in mine)
    bar = tqdm(total=total, disable=not progress, unit="img", dynamic_ncols=True,
               desc="sampling" + (f" (process 0 of {world_size})" if world_size > 1 else ""))
    with bar:
        for c in mine:
            images = draw_chunk(tok, gen, settings, c)
            atomic_write(chunk_file(directory, c), lambda tmp: np.save(tmp, images), suffix=".npy")
            bar.update(len(images))
            if on_chunk is not None:
                on_chunk(c)
    barrier()
    if rank != 0:
        return SampleSetResult(None, settings.num, total)
    labels = settings.all_labels(gen.config.num_classes)
    write_adm_npz_chunks(read_chunks(directory, settings), settings.num, npz, labels=labels)
    shutil.rmtree(directory)
    return SampleSetResult(npz, settings.num, total)


def claim(directory: Path, record: dict) -> None:
    """Create the chunk directory with ``settings.json``, or check that the one there records the same settings."""
    file = directory / SETTINGS_FILE
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    record = json.loads(text)  # tuples as lists, as they are read back
    if file.is_file():
        held = json.loads(file.read_text())
        if held != record:
            changed = sorted(k for k in held.keys() | record.keys() if held.get(k) != record.get(k))
            raise ValueError(f"{directory} holds chunks drawn with other settings ({', '.join(changed)} differ); "
                             "rerun with those settings to continue it, or remove it to start over")
        return
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(file, lambda tmp: Path(tmp).write_text(text))


def read_chunks(directory: Path, settings: SampleSetSettings) -> Iterator[np.ndarray]:
    """The finished chunks in order, each read from disk when it is needed (memory-mapped)."""
    for c in range(settings.num_chunks):
        file = chunk_file(directory, c)
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing: rerun the same command to draw it")
        chunk = np.load(file, mmap_mode="r")
        if len(chunk) != len(settings.chunk_range(c)):
            raise ValueError(f"{file} holds {len(chunk)} images, not {len(settings.chunk_range(c))}: remove it and "
                             "rerun the same command to draw it again")
        yield chunk
