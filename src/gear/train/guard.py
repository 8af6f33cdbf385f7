"""The non-finite guard: an iteration whose losses or gradient norms are not all finite changes nothing.

After the backward passes of an iteration and before any optimizer step, ``StepGuard.check`` looks at every
metric of the iteration (the loss terms, the totals and the gradient norms, of every micro-batch). One non-finite
value on any process skips the whole update on every process: no optimizer steps, no EMA update, and the
modules' buffers (BatchNorm statistics, which a forward changes) are put back. The skip is counted; after
``train.max_bad_steps`` skips in a row the run stops with ``Diverged``, naming the step and the loss term, and
the last checkpoint (never written from a non-finite state) stays the last good one.

The same all-reduce carries the processes' stop requests (SIGTERM / SIGINT) and bad-sample counts, so an
iteration costs one synchronization and all processes agree on skipping and stopping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gear.train.distributed import all_reduce_sum


class RunStopped(RuntimeError):
    """The run cannot go on (a full disk, a diverged loss ...); its last checkpoint is intact."""


class Diverged(RunStopped):
    """Too many non-finite iterations in a row: the run stopped (its last checkpoint is finite)."""


@dataclass
class Verdict:
    bad_term: str = ""        # the first non-finite metric of this process ("" when every metric is finite here)
    bad_value: float = 0.0
    skip: bool = False        # some process saw a non-finite value: nobody steps
    stop: bool = False        # some process was asked to stop (SIGTERM / SIGINT)
    bad_samples: int = 0      # skipped data items over all processes in this iteration


class StepGuard:
    """Counts skipped iterations (``skipped`` in all, ``in_a_row`` now); both go into checkpoints."""

    def __init__(self, max_bad_steps: int):
        self.max_bad_steps = max_bad_steps
        self.skipped = 0
        self.in_a_row = 0
        self._buffers: list[tuple[Tensor, Tensor]] = []

    def snapshot(self, modules: list[nn.Module]) -> None:
        """Remember the buffers a forward may change, to put them back if the iteration is skipped."""
        self._buffers = [(b, b.detach().clone()) for m in modules for b in m.buffers()]

    def check(self, metrics: list[dict[str, Tensor]], stop: bool, bad_samples: int, device: torch.device) -> Verdict:
        values = [v.detach().float().reshape(()) for ms in metrics for v in ms.values()]
        finite = torch.stack(values).isfinite().all() if values else torch.ones((), dtype=torch.bool, device=device)
        flags = torch.cat([(~finite).float().reshape(1).to(device), torch.tensor([float(stop), float(bad_samples)]).to(device)])
        skip, stop_any, samples = all_reduce_sum(flags).tolist()  # the iteration's one host synchronization
        verdict = Verdict(skip=skip > 0, stop=stop_any > 0, bad_samples=int(samples))
        if verdict.skip:
            verdict.bad_term, verdict.bad_value = _first_non_finite(metrics)
        return verdict

    def skip(self) -> None:
        """Put the buffers back and count the skip."""
        with torch.no_grad():
            for live, saved in self._buffers:
                live.copy_(saved)
        self.skipped += 1
        self.in_a_row += 1

    def passed(self) -> None:
        self.in_a_row = 0

    @property
    def exhausted(self) -> bool:
        return self.in_a_row >= self.max_bad_steps

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped, self.in_a_row = int(state.get("skipped", 0)), int(state.get("in_a_row", 0))


def _first_non_finite(metrics: list[dict[str, Tensor]]) -> tuple[str, float]:
    for ms in metrics:
        for name, value in ms.items():
            v = float(value.detach().float())
            if not math.isfinite(v):
                return name, v
    return "", 0.0  # finite here: another process saw it


def first_non_finite_tensor(tree, prefix: str = "") -> str:
    """The key path of the first floating tensor in a nested dict/list that holds a NaN or inf ("" if none)."""
    if isinstance(tree, Tensor):
        return prefix if tree.is_floating_point() and not bool(torch.isfinite(tree).all()) else ""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    for key, value in items:
        found = first_non_finite_tensor(value, f"{prefix}.{key}" if prefix else str(key))
        if found:
            return found
    return ""
