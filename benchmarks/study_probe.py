"""What the code does with a job's configuration today: the behaviour part of a study job's cache key.

A probe is a tiny run of the job's own resolved configuration (16 images, batch 4, two steps, seed 0, on the CPU
with one thread), started from its init job's probe as the job starts from its init, then evaluated by the
study's own evaluation at a tiny size (reconstruction metrics for a tokenizer; FID for an AR run, trained on the
code store as the study's AR runs are). Its numbers are every tensor the checkpoint holds, summed per entry (its
values and their magnitudes: weights, EMAs, optimizer and discriminator states, random-generator states), and the
evaluation's metrics.

Records are kept under ``<cache>/probes/<kind>-<probe key>/<source>.json``, one per source fingerprint
(``study.source_fingerprint``), with the run of the newest one (about 50 MB): a probe is measured once per change
of the code (about two seconds), not once per study. Its behaviour hash is that of its numbers rounded to 5
significant digits, unless an earlier record of the same probe (another source) has numbers within a relative 1e-4
of these (each sum against the magnitudes of its group: one optimizer state of every parameter, say): then
the code computes what it computed before, up to float rounding, and the earlier hash is kept, and with it the
keys of the jobs cached under that code.

What a probe cannot see: code that acts only later in a run than its two steps (a schedule's later phases), only
on a GPU, or only at sizes the probe does not reach. Each job's result records the commits and source
fingerprints it ran on, and the report lists them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import re
import shutil
from pathlib import Path
from typing import Callable, Protocol

import torch

from study import Budget, Job, config_delta, resolved_config, source_fingerprint

PROBE_VERSION = 1    # raise when what a probe runs or records changes: every probe is then measured afresh
PROBE_OVERRIDES = ("data.limit=16", "train.batch_size=4", "train.steps=2", "train.seed=0", "train.log_every=1",
                   "train.checkpoint_every=2", "train.sample_every=1000000", "train.progress=false",
                   "train.device=cpu", "train.keep_checkpoints=0")
PROBE_FID_SAMPLES, PROBE_RECON_SAMPLES = 20, 16
DIGITS = 5           # of the numbers hashed
RTOL = 1e-4          # two records within this (of each sum's magnitude) compute the same


class Evaluation(Protocol):
    """The study's evaluation (``reproduce.Evaluation``), as a probe calls it."""

    def tokenizer(self, run_dir: Path, num: int) -> dict[str, float]: ...

    def generation(self, run_dir: Path, num: int) -> dict[str, float | None]: ...


def rounded(value: float) -> float | str:
    return float(f"{value:.{DIGITS}g}") if math.isfinite(value) else str(value)


def checkpoint_numbers(state, prefix: str = "") -> dict[str, float]:
    """Every tensor of a checkpoint, as the float64 sum of its entries and of their magnitudes, by its path."""
    out: dict[str, float] = {}
    if isinstance(state, torch.Tensor):
        t = state.detach().to(torch.float64)
        out[prefix] = float(t.sum())
        out[prefix + "|abs"] = float(t.abs().sum())
    elif isinstance(state, dict):
        for k in sorted(state, key=str):
            out.update(checkpoint_numbers(state[k], f"{prefix}/{k}"))
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            out.update(checkpoint_numbers(v, f"{prefix}/{i}"))
    return out


def group(name: str) -> str:
    """The tensors a checkpoint entry is judged with: its path with indices starred (one optimizer's exp_avg of
    every parameter, say), so that a tensor whose values are float noise (a gradient that cancels) is judged
    against the group's size, not its own."""
    return re.sub(r"/\d+(?=/|$)", "/*", name.removesuffix("|abs"))


def close(new: dict[str, float], old: dict[str, float], rtol: float = RTOL) -> bool:
    """Whether two probes' numbers agree up to float rounding: the same entries, each within ``rtol`` of its
    group's magnitude (a checkpoint sum: the magnitudes of its group's tensors; a metric: itself)."""
    if new.keys() != old.keys():
        return False
    scale: dict[str, float] = {}
    for k, v in old.items():
        if not isinstance(v, str) and math.isfinite(v) and (k.endswith("|abs") or k + "|abs" not in old):
            scale[group(k)] = scale.get(group(k), 0.0) + abs(v)
    for k, a in new.items():
        b = old[k]
        if isinstance(a, str) or isinstance(b, str) or not (math.isfinite(a) and math.isfinite(b)):
            if str(a) != str(b):
                return False
        elif abs(a - b) > rtol * scale.get(group(k), abs(b)) + 1e-12:
            return False
    return True


def behaviour_hash(numbers: dict[str, float]) -> str:
    rounded_numbers = {k: rounded(v) if not isinstance(v, str) else v for k, v in numbers.items()}
    return hashlib.sha256(json.dumps(rounded_numbers, sort_keys=True).encode()).hexdigest()[:12]


class Probe:
    """``probe(job)`` -> the hash of what the job's configuration computes with today's code."""

    def __init__(self, root: Path, budget: Budget, extra: list[str], evaluation: Evaluation,
                 log: Callable[[str], None] = print, source: str | None = None):
        self.root, self.budget, self.extra, self.evaluation, self.log = Path(root), budget, list(extra), evaluation, log
        self.source = source or source_fingerprint()
        self._hashes: dict[Job, str] = {}
        self._keys: dict[Job, str] = {}

    def __call__(self, job: Job) -> str:
        if job not in self._hashes:
            self._hashes[job] = self.measure(job)["behaviour"]
        return self._hashes[job]

    def key(self, job: Job) -> str:
        """The probe's identity: its configuration and its init's probe (not the source: records of one probe under
        several sources are kept side by side and compared)."""
        if job not in self._keys:
            spec = {"kind": job.kind, "config": config_delta(job, self.budget, [*self.extra, *PROBE_OVERRIDES]),
                    "init": self.key(job.init) if job.init else None, "probe": PROBE_VERSION}
            self._keys[job] = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]
        return self._keys[job]

    def dir(self, job: Job) -> Path:
        return self.root / f"{job.kind}-{self.key(job)}"

    def run_dir(self, job: Job) -> Path:
        return self.dir(job) / f"run-{self.source}"

    def measure(self, job: Job) -> dict:
        """The probe's record under today's source ({"behaviour", "numbers", "source", "same_as"}), read or made."""
        path = self.dir(job) / f"{self.source}.json"
        if path.is_file():
            return json.loads(path.read_text())
        if job.init is not None:
            self.measure(job.init)  # its starting point first (outside this probe's lock)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / ".lock", "w") as lock:  # a second process waits, then reads what the first wrote
            fcntl.flock(lock, fcntl.LOCK_EX)
            if path.is_file():
                return json.loads(path.read_text())
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                with torch.random.fork_rng(devices=[]):
                    numbers = self._run(job)
            finally:
                torch.set_num_threads(threads)
            earlier = sorted((p for p in path.parent.glob("*.json") if p != path), key=lambda p: -p.stat().st_mtime)
            same = next((r for r in map(lambda p: json.loads(p.read_text()), earlier) if close(numbers, r["numbers"])), None)
            record = {"behaviour": same["behaviour"] if same else behaviour_hash(numbers), "numbers": numbers,
                      "source": self.source, "same_as": same["source"] if same else None}
            from gear.files import atomic_write

            atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
            for old in path.parent.glob("*-*"):  # the runs of other sources (their records stay)
                if old.is_dir() and not old.name.endswith(self.source):
                    shutil.rmtree(old, ignore_errors=True)
            self.log(f"probed {job.name} ({job.kind}): {record['behaviour']}"
                     + (f" (as under source {same['source']})" if same else ""))
            return record

    def _run(self, job: Job) -> dict[str, float]:
        from gear.train import checkpoint as ckpt
        from gear.train.code_store import extract_for_config
        from gear.train.loop import Trainer

        run_dir, store = self.run_dir(job), self.dir(job) / f"store-{self.source}"
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(store, ignore_errors=True)
        if job.init is not None and not self.run_dir(job.init).is_dir():  # removed since it was measured
            self._run(job.init)
        init = str(self.run_dir(job.init)) if job.init else ""
        cfg = resolved_config(job, self.budget, [*self.extra, *PROBE_OVERRIDES], out_dir=str(run_dir), init_dir=init,
                              store=str(store) if job.kind == "ar" else "")
        if job.kind == "ar":
            extract_for_config(cfg)
        Trainer(cfg).fit()
        numbers = checkpoint_numbers(ckpt.load_checkpoint(ckpt.checkpoint_path(run_dir)))
        if job.kind == "ar":
            metrics = self.evaluation.generation(run_dir, PROBE_FID_SAMPLES)
        else:
            metrics = self.evaluation.tokenizer(run_dir, PROBE_RECON_SAMPLES)
        numbers.update({f"eval/{k}": float(v) for k, v in metrics.items() if v is not None})
        return numbers
