"""A deterministic stream of batches indexed by step, so that a resumed run sees exactly the same data.

Step ``s`` of the global stream takes batch ``s % per_epoch`` of epoch ``s // per_epoch``, where each
epoch is a permutation drawn from ``(seed, epoch)`` and the last incomplete batch is dropped. With
several processes, rank ``r`` takes the r-th contiguous slice of the global batch, so the union over
ranks equals the one-process batch and a run can resume with a different number of processes.

WebDataset shards are a stream. With ``data.stream_split=shards`` (gear.data.shards) each process and loader worker
reads its own shards and the checkpoint holds where each reader is (``stream_state`` / ``restore_stream_state``);
with ``exact`` every process reads every shard in the training process and keeps its slice of each global batch.
"""

from __future__ import annotations

import signal
import sys
from typing import Any, Iterator, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from gear.data.shards import ReaderBatch, ShardedCaptions, merge_states
from gear.train.distributed import gather_objects


class StepBatchSampler(Sampler[list[int]]):
    def __init__(self, num_items: int, global_batch: int, seed: int, start_step: int = 0, rank: int = 0, world_size: int = 1):
        if global_batch % world_size:
            raise ValueError(f"train.batch_size={global_batch} must be divisible by the {world_size} processes")
        if num_items < global_batch:
            raise ValueError(f"the data set has {num_items} images, fewer than one batch of {global_batch}")
        self.num_items, self.global_batch, self.seed = num_items, global_batch, seed
        self.start_step, self.rank, self.world_size = start_step, rank, world_size
        self.per_epoch = num_items // global_batch
        self.local_batch = global_batch // world_size

    def global_indices(self, step: int) -> torch.Tensor:
        epoch, j = divmod(step, self.per_epoch)
        perm = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        return perm[j * self.global_batch : (j + 1) * self.global_batch]

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            idx = self.global_indices(step)[self.rank * self.local_batch : (self.rank + 1) * self.local_batch]
            epoch = step // self.per_epoch
            # The epoch travels inside the index so that augmentations depend on (seed, epoch, image) only.
            yield [epoch * self.num_items + int(i) for i in idx]
            step += 1

    def __len__(self) -> int:  # an endless stream; DataLoader only needs this for its own bookkeeping
        return 2**62


class EpochIndexed(Dataset):
    """Decodes ``epoch * N + i`` into ``dataset.set_epoch(epoch); dataset[i]`` (works inside workers too)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self.n = len(dataset)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: int):
        epoch, i = divmod(key, self.n)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        return self.dataset[i]


class StepBatch(NamedTuple):
    samples: Any             # the collated Sample batch
    requested: torch.Tensor  # the data-set indices asked for; samples.index differs where a bad item was replaced


def _ignore_interrupt(worker_id: int) -> None:
    # Ctrl-C reaches the whole foreground process group: it is for the trainer, which stops after its step and
    # then shuts the workers down. (SIGTERM is not ignored: multiprocessing ends workers with it.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _as_sent(batch: ReaderBatch) -> ReaderBatch:
    return batch


def stream_state(dataset: Dataset) -> dict[str, Any]:
    """Where the shard readers of every process are, for the checkpoint ({} for data that resumes from the step
    alone). Collective: every process calls it."""
    mine = dataset.state_dict() if isinstance(dataset, ShardedCaptions) else {}
    return merge_states(gather_objects(mine))


def restore_stream_state(dataset: Dataset, state: dict[str, Any] | None) -> None:
    """Hand a checkpoint's ``stream_state`` to the data set (before ``batch_stream``)."""
    if isinstance(dataset, ShardedCaptions):
        dataset.load_state_dict(state or {})


def shard_batches(dataset: ShardedCaptions, global_batch: int, seed: int, start_step: int, rank: int, world_size: int,
                  num_workers: int = 0, pin_memory: bool = False, end_step: int | None = None) -> Iterator[StepBatch]:
    """The shard split's batches: this process's readers in turn (loader worker ``w`` makes the batches of steps
    ``s % num_workers == w``), each batch's reader state noted in ``dataset`` as it is handed on."""
    note = dataset.configure(rank, world_size, num_workers, global_batch // world_size, start_step, end_step)
    if note and rank == 0:
        print(note, file=sys.stderr)
    loader = DataLoader(dataset, batch_size=None, collate_fn=_as_sent, num_workers=num_workers, pin_memory=pin_memory,
                        generator=torch.Generator().manual_seed(seed),  # private, as for the map-style loader below
                        worker_init_fn=_ignore_interrupt if num_workers > 0 else None)
    for step, batch in enumerate(loader, start=start_step):
        if batch.step != step:
            raise RuntimeError(f"the shard readers sent the batch of step {batch.step} for step {step}")
        dataset.trained(batch)
        yield StepBatch(batch.samples, batch.requested)


def batch_stream(dataset: Dataset, global_batch: int, seed: int, start_step: int, rank: int, world_size: int,
                 num_workers: int = 0, pin_memory: bool = False, end_step: int | None = None) -> Iterator[StepBatch]:
    """The batches of steps ``start_step``, ``start_step + 1``, ... (up to ``end_step``, which lets shard readers
    stop reading at the run's last step) for process ``rank`` of ``world_size``."""
    if isinstance(dataset, IterableDataset) and global_batch % world_size:
        raise ValueError(f"train.batch_size={global_batch} must be divisible by the {world_size} processes")
    if isinstance(dataset, ShardedCaptions):
        yield from shard_batches(dataset, global_batch, seed, start_step, rank, world_size, num_workers, pin_memory,
                                 end_step)
        return
    if isinstance(dataset, IterableDataset):  # the exact split positions itself and is read in-process
        dataset.configure(start_step, rank, world_size, global_batch)
        loader = DataLoader(dataset, batch_size=global_batch // world_size, pin_memory=pin_memory)
        for step, samples in enumerate(loader, start=start_step):  # a stream substitutes its bad samples itself
            yield StepBatch(samples, dataset.positions(step, rank, world_size, global_batch))
        return
    sampler = StepBatchSampler(len(dataset), global_batch, seed, start_step, rank, world_size)
    # A private generator: otherwise creating the iterator draws from the global RNG, and a resumed run's
    # dropout masks would differ from those of an uninterrupted one.
    loader = DataLoader(EpochIndexed(dataset), batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                        persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(seed),
                        worker_init_fn=_ignore_interrupt if num_workers > 0 else None)
    n = len(dataset)
    for keys, samples in zip(sampler, loader):  # the sampler is a pure function of the step: the same keys again
        yield StepBatch(samples, torch.tensor(keys) % n)
