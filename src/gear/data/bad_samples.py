"""What a reader does with an item it cannot decode (``data.on_bad_sample``): stop, or skip it.

A reader raises ``BadSample`` (a ValueError naming the item and the cause) from its own load function and
serves items through ``BadSamples.read``:

    self.bad_samples = BadSamples(on_bad_sample, self._load_item, len(self.items))
    def __getitem__(self, index):
        return self.bad_samples.read(index)

"stop" re-raises. "skip" returns the next readable item in a fixed order (index + 1, index + 2, ... wrapping
around), so the batch stays full and the substitute depends only on the data: every process, epoch and
resumed run picks the same one. The returned sample carries its own index (``Sample.index``), which is how the
trainer sees a substitution (``substitutions``) and lists it in the run directory.

A stream (WebDataset shards) cannot go back to an item: it substitutes the next readable sample of its own slice
itself and notes what it skipped in a ``StreamBadSamples``, which answers ``error(position)`` as ``BadSamples``
answers ``error(index)``; the trainer reads either as ``dataset.bad_samples``. (The shard split's loader workers
send what they skipped along with their batches, and the training process notes it there.)
"""

from __future__ import annotations

import warnings
from typing import Callable, Generic, Sequence, TypeVar

import torch

ON_BAD_SAMPLE = ("stop", "skip")
SKIP_HINT = "set data.on_bad_sample=skip to train on without it, or remove or replace the file"

S = TypeVar("S")


class BadSample(ValueError):
    """An item a reader cannot decode; ``source`` names it (a file path, a shard and key ...)."""

    def __init__(self, source: str, reason: str = ""):
        # one argument: a finished message (how a DataLoader worker's error is rebuilt in the main process)
        super().__init__(f"cannot read {source} ({reason}); {SKIP_HINT}" if reason else source)
        self.source, self.reason = source, reason

    def __reduce__(self):  # DataLoader workers send exceptions back pickled
        return BadSample, (self.source, self.reason)


class SkippedSample(UserWarning):
    """A manifest line, tar member or shard that holds no sample was skipped (data.on_bad_sample=skip)."""


def not_a_sample(policy: str, source: str, err: Exception) -> None:
    """A manifest line or tar member that is no sample: raise (stop) or warn and go on (skip)."""
    if policy not in ON_BAD_SAMPLE:
        raise ValueError(f"data.on_bad_sample must be one of {ON_BAD_SAMPLE}, got {policy!r}")
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if policy == "stop":
        raise BadSample(source, reason)
    warnings.warn(f"skipped {source} ({reason}): it holds no sample", SkippedSample, stacklevel=3)


class BadSamples(Generic[S]):
    """Serves ``load(index)`` for indices in [0, size) under a stop | skip policy (see the module docstring)."""

    def __init__(self, policy: str, load: Callable[[int], S], size: int):
        if policy not in ON_BAD_SAMPLE:
            raise ValueError(f"data.on_bad_sample must be one of {ON_BAD_SAMPLE}, got {policy!r}")
        self.policy, self.load, self.size = policy, load, size
        self.known_bad: set[int] = set()  # per process: not decoded again

    def read(self, index: int) -> S:
        if self.policy == "stop" or index not in self.known_bad:
            try:
                return self.load(index)
            except BadSample:
                if self.policy == "stop":
                    raise
                self.known_bad.add(index)
        for step in range(1, self.size):
            other = (index + step) % self.size
            if other in self.known_bad:
                continue
            try:
                return self.load(other)
            except BadSample:
                self.known_bad.add(other)
        raise ValueError(f"none of the {self.size} items of the data set can be read (data.on_bad_sample=skip)")

    def error(self, index: int) -> BadSample | None:
        """Why item ``index`` cannot be read (None when it can): decodes it once more."""
        try:
            self.load(index)
        except BadSample as err:
            return err
        return None


class StreamBadSamples:
    """What a stream skipped (``skip``), by stream position; ``stop`` raises at once."""

    def __init__(self, policy: str):
        if policy not in ON_BAD_SAMPLE:
            raise ValueError(f"data.on_bad_sample must be one of {ON_BAD_SAMPLE}, got {policy!r}")
        self.policy = policy
        self.skipped: dict[int, BadSample] = {}

    def bad(self, position: int, err: BadSample) -> None:
        if self.policy == "stop":
            raise err
        self.skipped[position] = err

    def error(self, position: int) -> BadSample | None:
        return self.skipped.get(position)


def substitutions(requested: Sequence[int] | torch.Tensor, returned: torch.Tensor) -> list[tuple[int, int]]:
    """(requested index, index served instead) for every position of a batch where a bad item was skipped."""
    requested = torch.as_tensor(requested, dtype=torch.long)
    returned = returned.to("cpu", torch.long)
    differ = (requested != returned).nonzero().flatten().tolist()
    return [(int(requested[i]), int(returned[i])) for i in differ]
