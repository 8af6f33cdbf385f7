"""The trainer's record of data items it trained without (``data.on_bad_sample=skip``): RUN/bad_samples.jsonl."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from torch.utils.data import Dataset
from tqdm.auto import tqdm

from gear.train.distributed import gather_objects

FILE_NAME = "bad_samples.jsonl"


class BadSampleLog:
    """Counts skipped items over all processes (``count``, kept in checkpoints) and lists them (rank 0)."""

    def __init__(self, dataset: Dataset, run_dir: Path, is_main: bool):
        self.dataset, self.path, self.is_main = dataset, Path(run_dir) / FILE_NAME, is_main
        self.count = 0
        self._announced: set[int] = set()

    def record(self, step: int, replaced: list[tuple[int, int]]) -> None:
        """Every process calls this when any process replaced an item in this step (it gathers them all)."""
        mine = [(index, substitute, *self._why(index)) for index, substitute in replaced]
        everything = sorted({entry for part in gather_objects(mine) for entry in part})
        self.count += len(everything)
        if not self.is_main:
            return
        lines = []
        for index, substitute, source, reason in everything:
            lines.append(json.dumps({"step": step, "index": index, "replaced_by": substitute, "source": source,
                                     "error": reason}))
            if index not in self._announced:
                self._announced.add(index)
                tqdm.write(f"step {step}: skipped unreadable {source} ({reason}); trained on item {substitute} instead "
                           f"(data.on_bad_sample=skip, listed in {self.path})", file=sys.stderr)
        with open(self.path, "a") as f:
            f.write("\n".join(lines) + "\n")

    def _why(self, index: int) -> tuple[str, str]:
        """(source, reason) of an item this process replaced: a map-style data set decodes it once more (its data
        workers keep no record); a stream remembers what it skipped."""
        error = self.dataset.bad_samples.error(index)
        return (error.source, error.reason) if error is not None else ("?", "readable now")
