"""What the code does with a job's configuration today: the behaviour part of a study job's cache key.

A probe is a tiny run of the job's own resolved configuration (16 images, batch 4, two steps, seed 0, on the CPU
with one thread), started from its init job's probe as the job starts from its init, followed by the job's own
evaluation at a tiny size (reconstruction metrics for a tokenizer, FID for an AR run, through the code store as
the study's AR runs read it). Its numbers (every tensor the checkpoint holds, summed per entry: weights, EMAs,
optimizer and discriminator states, random-generator states; the evaluation's metrics), rounded to 5 significant
digits so that float noise between machines does not count, are hashed into the job's key. A code change that
alters what a job computes changes its probe and so its key; one that does not (a refactor, a new option that
defaults to the old behaviour) leaves both alone, and the cached job is reused.

Probes are kept under ``<cache>/probes/``, by the probe's configuration and ``study.source_fingerprint()``: they
are measured once per change of the library's code (about five seconds each), not once per study.

What a probe cannot see: code that acts only later in a run than its two steps (a schedule's later phases), only
on a GPU, or only at sizes the probe does not reach. Each job's result records the commit and the source
fingerprint it ran on, and the report lists them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
from pathlib import Path
from typing import Callable

import torch

from study import Budget, Job, config_delta, resolved_config, source_fingerprint

PROBE_OVERRIDES = ("data.limit=16", "train.batch_size=4", "train.steps=2", "train.seed=0", "train.log_every=1",
                   "train.checkpoint_every=2", "train.sample_every=1000000", "train.progress=false",
                   "train.device=cpu", "train.keep_checkpoints=0")
DIGITS = 5


def rounded(value: float) -> float | str:
    if not math.isfinite(value):
        return str(value)
    return float(f"{value:.{DIGITS}g}")


def checkpoint_numbers(state, prefix: str = "") -> dict[str, float | str]:
    """Every tensor of a checkpoint, as the float64 sum of its entries and of their magnitudes, by its path."""
    out: dict[str, float | str] = {}
    if isinstance(state, torch.Tensor):
        t = state.detach().double() if state.is_floating_point() or state.is_complex() else state.detach().to(torch.float64)
        out[prefix] = rounded(float(t.sum()))
        out[prefix + "|abs"] = rounded(float(t.abs().sum()))
    elif isinstance(state, dict):
        for k in sorted(state, key=str):
            out.update(checkpoint_numbers(state[k], f"{prefix}/{k}"))
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            out.update(checkpoint_numbers(v, f"{prefix}/{i}"))
    return out


class Probe:
    """``probe(job)`` -> the hash of what the job's configuration computes with today's code (measured once per
    source fingerprint and probe configuration, kept under ``root``)."""

    def __init__(self, root: Path, budget: Budget, extra: list[str], data, reference: Callable[[], object],
                 log: Callable[[str], None] = print):
        self.root, self.budget, self.extra, self.data = Path(root), budget, list(extra), data
        self.reference, self.log = reference, log
        self.source = source_fingerprint()
        self._hashes: dict[Job, str] = {}
        self._keys: dict[Job, str] = {}

    def __call__(self, job: Job) -> str:
        if job not in self._hashes:
            self._hashes[job] = self.measure(job)["behaviour"]
        return self._hashes[job]

    def key(self, job: Job) -> str:
        """The probe's own identity: its configuration, its init's probe, the source it runs."""
        if job not in self._keys:
            probe_extra = [*self.extra, *PROBE_OVERRIDES]
            spec = {"kind": job.kind, "config": config_delta(job, self.budget, probe_extra),
                    "init": self.key(job.init) if job.init else None, "source": self.source}
            self._keys[job] = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]
        return self._keys[job]

    def dir(self, job: Job) -> Path:
        return self.root / f"{job.kind}-{self.key(job)}"

    def measure(self, job: Job) -> dict:
        """The probe's record ({"behaviour", "numbers", "source"}), from disk or measured now."""
        path = self.dir(job) / "behaviour.json"
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
            record = {"behaviour": hashlib.sha256(json.dumps(numbers, sort_keys=True).encode()).hexdigest()[:12],
                      "numbers": numbers, "source": self.source}
            from gear.files import atomic_write

            atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
            self.log(f"probed {job.name} ({job.kind}): {record['behaviour']}")
            return record

    def _run(self, job: Job) -> dict[str, float | str]:
        import shutil

        from gear.eval.runs import generation_metrics, reconstruction_metrics
        from gear.run import load_pair
        from gear.train import checkpoint as ckpt
        from gear.train.code_store import extract_for_config
        from gear.train.loop import Trainer

        run_dir, store = self.dir(job) / "run", self.dir(job) / "store"
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(store, ignore_errors=True)
        init = str(self.dir(job.init) / "run") if job.init else ""
        cfg = resolved_config(job, self.budget, [*self.extra, *PROBE_OVERRIDES], out_dir=str(run_dir), init_dir=init,
                              store=str(store) if job.kind == "ar" else "")
        if job.kind == "ar":
            extract_for_config(cfg)
        Trainer(cfg).fit()
        numbers = checkpoint_numbers(ckpt.load_checkpoint(ckpt.checkpoint_path(run_dir)))
        import dataclasses

        data = dataclasses.replace(self.data, limit=0)
        if job.kind == "ar":
            tok, gen = load_pair(run_dir, device="cpu")
            m = generation_metrics(tok, gen, data, num=20, cfg_scale=self.budget.cfg_scale, feature="classifier",
                                   classifier=self.reference(), seed=0)
            keys = ("fid", "precision", "recall", "class_accuracy")
        else:
            import gear

            tok = gear.load_tokenizer(run_dir, map_location="cpu").eval()
            m = reconstruction_metrics(tok, data, num=16, feature="classifier", classifier=self.reference())
            keys = ("rfid", "psnr", "ssim", "codebook_usage", "codebook_perplexity")
        numbers.update({f"eval/{k}": rounded(float(m[k])) for k in keys if m.get(k) is not None})
        return numbers
