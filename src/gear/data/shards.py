"""Captioned WebDataset shards at cluster scale (``data.stream_split=shards``, the default for webdataset).

Each process, and each loader worker inside it, is one *reader* that reads its own shards: in epoch ``e`` the shard
list is shuffled from ``(seed, e)``, then split by process and by worker as WebDataset's ``split_by_node`` and
``split_by_worker`` split it (``order[rank::processes][worker::workers]``), so every shard is read once per epoch
in all. A reader passes its samples through a shuffle buffer of ``data.shuffle_buffer`` samples (drawn from
``(seed, epoch, reader)``) and makes local batches of them; the global batch is the processes' local batches, as
for the other data sets. Step ``s`` is served by reader ``s % workers`` of its process, so the stream is a
pure function of the layout (processes, workers), the seed and the data.

Resume without replay: each batch carries its reader's state after it (epoch, shard order, the shard it has open
and how many samples it has read from it, the samples still in its shuffle buffer by shard and place, how many
shuffle draws it made). The training process keeps the state of the last batch it trained on per reader, and the
checkpoint holds them all (``state_dict``). A resume with the same layout hands each reader its state: it reopens
only the shards it has open or has samples of in its buffer, skips the samples it already passed, and continues
the same stream (no sample twice, none skipped); a shard whose samples were all trained on is never read again.
A resume with another layout starts every reader at the epoch after the furthest one saved, and says so.

A sample's ``index`` is ``shard number * SHARD_STRIDE + place in the shard``: the same in every layout and epoch.
A bad sample (``data.on_bad_sample=skip``) gives its place in the batch to the next readable one of its reader; the
batch reports the substitution as the other data sets do (``requested`` vs ``samples.index``).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from gear.data.bad_samples import BadSample, StreamBadSamples
from gear.data.captioned import CaptionTransform, decode_webdataset_sample
from gear.data.fmnist_captions import CaptionedSample
from gear.data.shard_io import expand_shards, is_local, local_path, read_shard
from gear.data.transforms import generator_for

SHARD_STRIDE = 2**32
UNEVEN_SHARDS = 2.0  # largest / smallest shard (bytes, local shards) above which a run is warned


class UnevenShards(UserWarning):
    """Shards of very different sizes: readers finish their epochs at different steps."""


@dataclass(frozen=True)
class Layout:
    """Who reads what: this process's place, its loader workers, and the steps its batches are for."""

    rank: int
    processes: int
    workers: int  # readers per process (1 when the shards are read in the training process)
    local_batch: int
    start_step: int
    end_step: int | None  # no batch is made for this step or later (None: endless)

    @property
    def readers(self) -> int:
        return self.processes * self.workers


class ReaderBatch(NamedTuple):
    """A local batch as a reader sends it to the training process."""

    step: int
    samples: CaptionedSample              # collated
    requested: torch.Tensor               # the sample each place was for (differs where a bad one was replaced)
    skipped: dict[int, tuple[str, str]]   # bad samples met while making it: index -> (source, reason)
    reader: int
    state: dict[str, Any]                 # the reader's state after this batch
    bytes_read: int                       # by this reader since it started


def sample_index(shard: int, place: int) -> int:
    return shard * SHARD_STRIDE + place


class _Reader:
    """One reader's sample stream (raw samples, shuffle-buffered) from a state; ``state()`` after each sample."""

    def __init__(self, owner: ShardedCaptions, reader: int, state: dict[str, Any]):
        self.owner, self.reader = owner, reader
        self.epoch, self.order = int(state["epoch"]), [int(s) for s in state["order"]]
        self.shard, self.read, self.draws = int(state["shard"]), int(state["read"]), int(state["draws"])
        self.buffer: list[list] = [[int(s), int(p), None] for s, p in state["buffer"]]  # [shard, place, raw]
        self.bytes_read = [0]

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "order": list(self.order), "shard": self.shard, "read": self.read,
                "buffer": [[s, p] for s, p, _ in self.buffer], "draws": self.draws}

    def _rng(self) -> np.random.Generator:
        bits = np.random.PCG64([self.owner.seed, self.epoch, self.reader])
        bits.advance(self.draws)  # one 64-bit draw per pick (Generator.random)
        return np.random.Generator(bits)

    def _read(self, shard: int, **kw) -> Iterator[tuple[int, dict]]:
        return read_shard(self.owner.shards[shard], self.owner.on_bad_sample, counted=self.bytes_read, **kw)

    def _refill(self) -> None:
        """Read the buffered samples again from the shards they came from (all but the open one)."""
        wanted: dict[int, dict[int, list]] = {}
        current = self.order[self.shard] if self.shard < len(self.order) else None
        for slot in self.buffer:
            if slot[0] != current:
                wanted.setdefault(slot[0], {})[slot[1]] = slot
        for shard, slots in wanted.items():
            for place, raw in self._read(shard, wanted=slots.__contains__, stop_after=max(slots)):
                slots[place][2] = raw

    def _pop(self, rng: np.random.Generator) -> list:
        j = int(rng.random() * len(self.buffer))
        self.draws += 1
        self.buffer[j], self.buffer[-1] = self.buffer[-1], self.buffer[j]
        return self.buffer.pop()

    def samples(self) -> Iterator[tuple[int, int, dict | None, str]]:
        """(epoch, sample index, raw sample or None when it could not be read again, shard URL), forever."""
        size = max(1, self.owner.shuffle_buffer if self.owner.train else 1)
        self._refill()
        while True:
            rng, given = self._rng(), 0
            fresh = self.shard == self.read == self.draws == 0 and not self.buffer  # not resumed inside the epoch
            while self.shard < len(self.order):
                shard = self.order[self.shard]
                slots = {slot[1]: slot for slot in self.buffer if slot[0] == shard}
                resume_at = self.read
                pending = None  # one sample of look-ahead: the shard counts as passed before its last one is given
                for place, raw in self._read(shard, wanted=lambda p: p >= resume_at or p in slots):
                    if place < resume_at:
                        slots[place][2] = raw
                        continue
                    if pending is not None:
                        self.read = pending[1] + 1
                        self.buffer.append(pending)
                        if len(self.buffer) >= size:
                            given += 1
                            yield self._give(self._pop(rng))
                    pending = [shard, place, raw]
                self.shard, self.read = self.shard + 1, 0
                if pending is not None:
                    self.buffer.append(pending)
                    if len(self.buffer) >= size:
                        given += 1
                        yield self._give(self._pop(rng))
            while self.buffer:
                given += 1
                yield self._give(self._pop(rng))
            if fresh and given == 0:
                raise ValueError(f"reader {self.reader}: its shards of epoch {self.epoch} "
                                 f"({', '.join(self.owner.shards[s] for s in self.order[:3])}...) hold no sample")
            self.epoch += 1
            self.order = self.owner.order(self.epoch, self.reader, self.owner.layout_readers())
            self.shard = self.read = self.draws = 0

    def _give(self, slot: list) -> tuple[int, int, dict | None, str]:
        shard, place, raw = slot
        return self.epoch, sample_index(shard, place), raw, self.owner.shards[shard]


class ShardedCaptions(IterableDataset):
    """Captioned images from tar shards, split over processes and loader workers by shard (module docstring)."""

    classes = ()

    def __init__(self, urls: str | list[str], image_size: int = 256, train: bool = True, seed: int = 0,
                 random_flip: bool = True, crop: str = "resize", on_bad_sample: str = "stop",
                 shuffle_buffer: int = 1000, allow_pipe: bool = False):
        if shuffle_buffer < 0:
            raise ValueError(f"data.shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.shards = expand_shards(urls, allow_pipe)
        self.on_bad_sample, self.shuffle_buffer = on_bad_sample, shuffle_buffer
        self.bad_samples = StreamBadSamples(on_bad_sample)
        self.transform = CaptionTransform(image_size, train, random_flip, crop)
        self.train, self.seed = train, seed
        self.layout: Layout | None = None  # set by configure (gear.train.batches.batch_stream)
        self.saved: dict[str, Any] = {}    # the checkpoint's reader states (load_state_dict)
        self.states: dict[int, dict[str, Any]] = {}  # this process's readers, after the last batch trained on
        self.bytes_by_reader: dict[int, int] = {}

    # ---------------------------------------------------------------- the split

    def layout_readers(self) -> int:
        return self.layout.readers if self.layout is not None else 1

    def order(self, epoch: int, reader: int, readers: int) -> list[int]:
        """The shard numbers reader ``reader`` of ``readers`` reads in ``epoch``, in order."""
        if self.train:
            perm = torch.randperm(len(self.shards), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            everything = perm.tolist()
        else:
            everything = list(range(len(self.shards)))
        workers = self.layout.workers if self.layout is not None else 1
        rank, worker = divmod(reader, workers)
        processes = readers // workers
        return everything[rank::processes][worker::workers]  # split_by_node, then split_by_worker

    def fresh_state(self, epoch: int, reader: int) -> dict[str, Any]:
        return {"epoch": epoch, "order": self.order(epoch, reader, self.layout_readers()), "shard": 0, "read": 0,
                "buffer": [], "draws": 0, "pending": []}

    def configure(self, rank: int, processes: int, workers: int, local_batch: int, start_step: int,
                  end_step: int | None = None) -> str:
        """Place this process's readers; returns a line to show when the saved stream cannot be continued."""
        self.layout = layout = Layout(rank, processes, max(1, workers), local_batch, start_step, end_step)
        if len(self.shards) < layout.readers:
            raise ValueError(f"{len(self.shards)} webdataset shards cannot feed {layout.readers} readers ({processes} "
                             f"processes x {layout.workers} loader workers): use fewer data.num_workers, more shards, "
                             "or data.stream_split=exact")
        self._warn_if_uneven()
        mine = range(rank * layout.workers, (rank + 1) * layout.workers)
        saved, note = self.saved, ""
        same = (saved.get("processes"), saved.get("workers"), saved.get("shards")) == (processes, layout.workers,
                                                                                     len(self.shards))
        if saved and same:
            self.states = {g: saved["readers"][g] for g in mine}
        else:
            epoch = 0
            if saved:
                epoch = max(int(s["epoch"]) for s in saved["readers"]) + 1
                note = (f"data: the checkpoint's shard stream was read by {saved.get('processes')} processes x "
                        f"{saved.get('workers')} loader workers over {saved.get('shards')} shards, this run has "
                        f"{processes} x {layout.workers} over {len(self.shards)}: it starts at epoch {epoch} (the rest "
                        f"of epoch {epoch - 1} is not trained on)")
            elif start_step > 0:
                note = (f"data: the checkpoint holds no shard reader state (it was written with data.stream_split="
                        f"exact or by an older version): the shard stream starts at epoch 0 at step {start_step}")
            self.states = {g: self.fresh_state(epoch, g) for g in mine}
        return note

    def _warn_if_uneven(self) -> None:
        if not all(is_local(s) for s in self.shards):
            return
        sizes = [os.path.getsize(local_path(s)) for s in self.shards]
        if min(sizes) > 0 and max(sizes) / min(sizes) > UNEVEN_SHARDS:
            warnings.warn(f"webdataset shard sizes range from {min(sizes)} to {max(sizes)} bytes: readers with bigger "
                          "shards finish their epochs later, so an epoch's samples spread over more steps; shards of "
                          "similar sizes keep the epochs of all readers together", UnevenShards, stacklevel=2)

    # ---------------------------------------------------------------- the stream

    def __iter__(self) -> Iterator[ReaderBatch] | Iterator[CaptionedSample]:
        if self.layout is None:
            return self._in_order()
        return self._batches()

    def _in_order(self) -> Iterator[CaptionedSample]:
        """All shards in order, one sample at a time (held-out previews)."""
        while True:
            given = 0
            for number, url in enumerate(self.shards):
                for place, raw in read_shard(url, self.on_bad_sample):
                    try:
                        image, text = decode_webdataset_sample(raw)
                    except BadSample as err:
                        self.bad_samples.bad(sample_index(number, place),
                                             BadSample(f"{raw.get('__key__', '?')} in {url}", str(err)))
                        continue
                    given += 1
                    yield CaptionedSample(self.transform(image, None), torch.tensor(0), sample_index(number, place), text)
            if not given:
                raise ValueError(f"webdataset shards {self.shards[0]}...: no readable sample")

    def _batches(self) -> Iterator[ReaderBatch]:
        layout = self.layout
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if (info.num_workers if info is not None else 1) != layout.workers:
            raise RuntimeError(f"configured for {layout.workers} readers per process, run by "
                               f"{info.num_workers if info else 1}")
        step = layout.start_step + worker
        reader_id = layout.rank * layout.workers + step % layout.workers
        state = self.states[reader_id]
        reader = _Reader(self, reader_id, state)
        waiting = [int(i) for i in state.get("pending", [])]  # bad samples whose places the next readable ones take
        samples, requested, skipped = [], [], {}
        if layout.end_step is not None and step >= layout.end_step:
            return
        for epoch, index, raw, url in reader.samples():
            try:
                if raw is None:
                    raise BadSample("its shard could not be read again")
                image, text = decode_webdataset_sample(raw)
            except BadSample as err:
                source = f"{raw.get('__key__', '?') if raw else index % SHARD_STRIDE} in {url}"
                if self.on_bad_sample == "stop":
                    raise BadSample(source, str(err)) from None
                skipped[index] = (source, str(err))
                waiting.append(index)
                continue
            generator = generator_for(self.seed, epoch, index) if self.train else None
            samples.append(CaptionedSample(self.transform(image, generator), torch.tensor(0), index, text))
            requested.append(waiting.pop(0) if waiting else index)
            if len(samples) == layout.local_batch:
                yield ReaderBatch(step, default_collate(samples), torch.tensor(requested), skipped, reader_id,
                                  {**reader.state(), "pending": list(waiting)}, reader.bytes_read[0])
                samples, requested, skipped = [], [], {}
                step += layout.workers
                if layout.end_step is not None and step >= layout.end_step:
                    return

    # ---------------------------------------------------------------- the training process's record

    def trained(self, batch: ReaderBatch) -> None:
        """The training process took ``batch``: its reader's state and bad samples become the record."""
        self.states[batch.reader] = batch.state
        self.bytes_by_reader[batch.reader] = batch.bytes_read
        for index, (source, reason) in batch.skipped.items():
            self.bad_samples.skipped[index] = BadSample(source, reason)

    @property
    def bytes_read(self) -> int:
        """Bytes this process's readers read from the shards (as of the batches trained on)."""
        return sum(self.bytes_by_reader.values())

    def state_dict(self) -> dict[str, Any]:
        """This process's part of the checkpoint: its layout and its readers' states."""
        if self.layout is None:
            return {}
        return {"processes": self.layout.processes, "workers": self.layout.workers, "shards": len(self.shards),
                "readers": {g: self.states[g] for g in sorted(self.states)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The checkpoint's state (every process's readers, as ``merge_states`` joins them); used by ``configure``."""
        self.saved = state or {}


def merge_states(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Every process's ``state_dict()`` as one checkpoint entry (readers listed by global reader number)."""
    if not parts or not all(parts):
        return {}
    readers = {g: s for part in parts for g, s in part["readers"].items()}
    head = parts[0]
    return {"split": "shards", "processes": head["processes"], "workers": head["workers"], "shards": head["shards"],
            "readers": [readers[g] for g in range(len(readers))]}
