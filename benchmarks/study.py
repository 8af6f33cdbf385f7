"""What the reproduction study trains: its budget, its jobs (one training run each), their keys and the on-disk
cache of their results. ``benchmarks/reproduce.py`` runs them; ``benchmarks/study_report.py`` reads them back."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
PARTS = ("main", "ste", "ablations", "families", "repa")


@dataclass(frozen=True)
class Budget:
    """Every number that sets the cost of the study; each one is a command-line option (--warmup-steps ...)."""

    warmup_steps: int = 400                # tokenizer warm-up, once per tokenizer family, shared by every seed
    joint_steps: int = 200                 # joint stage (GEAR, STE, ...) = extra reconstruction steps of tokenizer+
    ar_steps: int = 4000                   # the AR budget of the main comparison, the same for every method
    dense_until: int = 600                 # FID every dense_every AR steps up to here (the steep part) ...
    dense_every: int = 50
    sparse_every: int = 200                # ... then every sparse_every steps
    short_ar_steps: int = 500              # AR steps of the ablation, family and REPA-check runs (FID at the end)
    long_joint_steps: int = 400            # the joint runs of the STE collapse study
    batch_size: int = 32
    seeds: tuple[int, ...] = (0, 1, 2)     # GEAR and LlamaGen-REPA+ (the main comparison) run every seed ...
    control_seeds: int = 3                 # ... LlamaGen+, GEAR lambda_tok=0 and STE the first control_seeds ...
    reference_seeds: int = 1               # ... LlamaGen and LlamaGen-REPA on the warm-up tokenizer the first few
    fid_samples: int = 500                 # per FID on the reference classifier's features
    recon_samples: int = 1000              # held-out images per tokenizer evaluation
    cfg_scale: float = 1.5
    grid_per_class: int = 8
    data_limit: int = 0                    # 0 = the whole training split
    generator: str = "gpt-tiny"

    def __post_init__(self) -> None:
        for name in ("warmup_steps", "joint_steps", "ar_steps", "dense_every", "sparse_every", "short_ar_steps",
                     "long_joint_steps", "batch_size", "grid_per_class", "control_seeds", "reference_seeds"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.short_ar_steps > self.ar_steps:
            raise ValueError(f"--short-ar-steps ({self.short_ar_steps}) must be <= --ar-steps ({self.ar_steps})")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds must be distinct integers such as 0,1,2, got {self.seeds}")
        for name in ("control_seeds", "reference_seeds"):
            if getattr(self, name) > len(self.seeds):
                raise ValueError(f"--{name.replace('_', '-')} ({getattr(self, name)}) must be <= the number of --seeds ({len(self.seeds)})")
        if self.fid_samples < 10 or self.recon_samples < 10:
            raise ValueError("--fid-samples and --recon-samples must be >= 10")


PRESETS = {
    "cpu": Budget(),
    # smoke run of every part: a few minutes on 2 cores
    "quick": Budget(warmup_steps=8, joint_steps=6, ar_steps=12, dense_until=8, dense_every=4, sparse_every=4,
                    short_ar_steps=8, long_joint_steps=10, seeds=(0, 1), control_seeds=2, fid_samples=40, recon_samples=40,
                    grid_per_class=2, batch_size=16, data_limit=512),
    # one GPU: a 5M-parameter AR, 4x the batch and longer schedules (about an hour on one H100-class GPU)
    "gpu": Budget(warmup_steps=2000, joint_steps=1000, ar_steps=8000, dense_until=3000, dense_every=100, sparse_every=500,
                  short_ar_steps=3000, long_joint_steps=4000, batch_size=128, seeds=(0, 1, 2, 3, 4), control_seeds=5, reference_seeds=5,
                  fid_samples=2000, recon_samples=2000, generator="gpt-mini"),
}

# Seconds for one one-thread process while a second one runs beside it on 2 quiet cores (how `make reproduce`
# runs), used by --plan only; measured on this study's own runs (2026-11-30, runs/reproduce/*.log): an AR step
# on the code store and one FID from 1000- and 3000-step continuations (5.3 and 17.5 min), a tokenizer step
# from the 200- and 400-step runs (2.0 and 4.0 min), a joint step from the 200- and 400-step joint runs (3.9 and
# 7.9 min); the teacher's features on 60k images once (8.5 min) and a tokenizer's codes (0.8 min).
COSTS = {"tokenizer": 0.58, "joint": 1.18, "joint-ste": 1.18, "ar": 0.24, "ar-repa": 0.24, "fid": 13.0,
         "tokenizer-eval": 8.0, "extract": 48.0, "features": 510.0, "setup": 6.0}

COLLAPSE_FACTOR = 0.5     # "collapsed": codebook perplexity below this share of the warm-up tokenizer's
CONVERGED_DROP = 0.05     # "converged": the seed-mean FID fell by less than this share over the last quarter


def eval_schedule(total: int, dense_until: int, dense_every: int, sparse_every: int) -> tuple[int, ...]:
    """FID steps: every ``dense_every`` up to ``dense_until``, then every ``sparse_every``; always ``total``."""
    if total < 1:
        raise ValueError(f"need total >= 1, got {total}")
    steps = set(range(dense_every, min(dense_until, total) + 1, dense_every))
    steps |= set(range(dense_until + sparse_every, total + 1, sparse_every)) if dense_until < total else set()
    return tuple(sorted(steps | {total}))


def slug(name: str) -> str:
    return name.lower().replace(" ", "-").replace("=", "").replace("+", "-plus").replace("_", "-")


# ---------------------------------------------------------------------------- jobs and their cache


@dataclass(frozen=True)
class Job:
    """One training run: ``kind`` tokenizer | joint | ar, from ``config`` with ``overrides``, starting from the
    tokenizer of ``init`` (a job); an ar job evaluates FID at ``evals``."""

    kind: str
    name: str
    config: str
    seed: int
    steps: int
    overrides: tuple[str, ...] = ()
    init: Job | None = None
    evals: tuple[int, ...] = ()


PATH_KEYS = (("train", "out_dir"), ("model", "tokenizer_init"), ("data", "code_store"), ("train", "progress"))
# An AR run is a prefix of a longer one (constant learning rate after warm-up; data order and dropout seeded by the
# step), so its key leaves out its length and whatever follows from it: a larger --ar-steps continues the cached
# runs from their last checkpoint, and their evaluations so far are kept by step.
AR_LENGTH_KEYS = (("train", "steps"), ("train", "sample_every"), ("train", "checkpoint_every"), ("train", "log_every"))


def resolved_config(job: Job, budget: Budget, extra: list[str], out_dir: str = "", init_dir: str = "", store: str = ""):
    from gear.config import load_config

    b = budget
    every = max(job.steps // 4, 1) if job.kind != "ar" else job.steps  # ar runs are checkpointed at each evaluation
    return load_config(CONFIGS / job.config, [
        f"train.out_dir={out_dir}", f"train.steps={job.steps}", f"train.seed={job.seed}", f"train.batch_size={b.batch_size}",
        f"data.limit={b.data_limit}", "train.progress=false", f"train.sample_every={job.steps}",
        f"train.checkpoint_every={every}", f"eval.cfg_scale={b.cfg_scale}", f"eval.samples_per_class={b.grid_per_class}",
        f"train.log_every={max(1, min(10, job.steps // 10))}", f"model.generator={b.generator}",
        *([f"model.tokenizer_init={init_dir}"] if init_dir else []), *([f"data.code_store={store}"] if store else []),
        *job.overrides, *extra])


def job_key(job: Job, budget: Budget, extra: list[str], behaviour: Callable[[Job], str],
            init_weights: str | None = None) -> str:
    """A hash of what the job computes: its configuration where it departs from the defaults (paths and, for an
    AR run, its length aside), where it starts from, its evaluations, and ``behaviour(job)``: what the code does
    with that configuration today (``study_probe.Probe``: a tiny run of the job's own configuration). A new
    config field that defaults to the old behaviour leaves keys as they were; a code change that alters training
    changes the keys of the jobs it alters, and only theirs.

    An AR run starts from its tokenizer's weights: given ``init_weights`` (``tokenizer_digest`` of the finished
    init), that is its starting point, so two AR runs of one config on bitwise-equal tokenizers are one job;
    otherwise (and for tokenizer jobs, which also read their init's discriminator) it is the init's key."""
    if job.init is None:
        init = None
    elif job.kind == "ar" and init_weights:
        init = {"tokenizer_weights": init_weights}
    else:
        init = job_key(job.init, budget, extra, behaviour)
    spec = {"kind": job.kind, "config": config_delta(job, budget, extra), "init": init,
            "evals": None if job.kind == "ar" else list(job.evals),
            "evaluation": {"fid_samples": budget.fid_samples, "recon_samples": budget.recon_samples},
            "behaviour": behaviour(job)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]


def config_delta(job: Job, budget: Budget, extra: list[str] | tuple[str, ...]) -> dict:
    """The job's resolved config without paths (and an AR run's length), only where it departs from the defaults."""
    return _config_delta(job, budget, tuple(extra))


@functools.lru_cache(maxsize=None)
def _config_delta(job: Job, budget: Budget, extra: tuple[str, ...]) -> dict:
    from gear.config import Config

    cfg = resolved_config(job, budget, list(extra)).to_dict()
    for section, key in PATH_KEYS + (AR_LENGTH_KEYS if job.kind == "ar" else ()):
        cfg[section].pop(key, None)
    return departures(cfg, json.loads(json.dumps(Config().to_dict(), default=str)))


def departures(tree: dict, defaults: dict) -> dict:
    """The entries of a config tree that differ from ``defaults`` (nested by section); fields that ``defaults``
    lacks are kept."""
    out = {}
    for name, value in tree.items():
        value = json.loads(json.dumps(value, default=str))
        if isinstance(value, dict) and isinstance(defaults.get(name), dict):
            inner = departures(value, defaults[name])
            if inner:
                out[name] = inner
        elif name not in defaults or defaults[name] != value:
            out[name] = value
    return out


def tokenizer_digest(run_dir: Path, ema: bool = True) -> str:
    """A hash of the tokenizer an AR stage reads from a run (its class, config and every tensor, bit for bit)."""
    import torch

    import gear

    tok = gear.load_tokenizer(run_dir, ema=ema)
    digest = hashlib.sha256(f"{type(tok).__name__} {tok.config!r}".encode())
    for name, tensor in sorted(tok.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


STUDY_CODE = ("study.py", "study_probe.py", "reproduce.py")  # the benchmarks' files that train and evaluate


def source_fingerprint(paths: list[Path] | None = None) -> str:
    """What the code says, not how it is written: a hash of the syntax trees (docstrings aside; comments and
    layout do not reach them) of ``paths`` (default: the ``gear`` package Python imports, wherever it is, and the
    study's own training and evaluation files), with torch's version. Probes are remeasured when it changes; the
    report shows it next to the commit."""
    import ast

    import torch

    import gear

    if paths is None:
        paths = [Path(gear.__file__).resolve().parent, *(Path(__file__).resolve().parent / f for f in STUDY_CODE)]
    digest = hashlib.sha256(torch.__version__.encode())
    for base in paths:
        for path in sorted(base.rglob("*.py")) if base.is_dir() else [base]:
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                body = getattr(node, "body", None)
                if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                        and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                        and isinstance(body[0].value.value, str)):
                    node.body = body[1:] or [ast.Pass()]
            name = path.relative_to(base) if base.is_dir() else path.name
            digest.update(str(name).encode() + ast.dump(tree).encode())
    return digest.hexdigest()[:12]


def code_version(root: Path = ROOT) -> str:
    """The commit the code is at, with ``+changes`` when a Python file under src/ or benchmarks/ differs from it
    (the reports and figures the study writes there do not count)."""
    import subprocess

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    commit = git("rev-parse", "--short=10", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--", ":(glob)src/**/*.py", ":(glob)benchmarks/**/*.py")
    return commit + ("+changes" if changed else "")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ResultCache:
    """``<root>/jobs/<name>-s<seed>-<key>/``: ``run/`` (the training run), ``progress.json`` (evaluations so far),
    ``result.json`` (written last, atomically: a job with it is done; an AR job only when it holds every evaluation
    of the job's schedule), ``lock`` (the pid working on it)."""

    def __init__(self, root: Path, budget: Budget, extra: list[str], behaviour: Callable[[Job], str]):
        self.root, self.budget, self.extra, self.behaviour = Path(root), budget, list(extra), behaviour
        self._keys: dict[Job, str] = {}
        self._dirs: dict[Job, Path] = {}

    def key(self, job: Job) -> str:
        if job in self._keys:
            return self._keys[job]
        weights = None
        if job.kind == "ar" and job.init is not None:
            ema = resolved_config(job, self.budget, self.extra).model.init_from_ema  # the weights the AR reads
            weights = self.tokenizer_weights(job.init, ema)
        key = job_key(job, self.budget, self.extra, self.behaviour, weights)
        if job.kind != "ar" or job.init is None or weights is not None:  # final once its tokenizer is trained
            self._keys[job] = key
        return key

    def tokenizer_weights(self, job: Job, ema: bool = True) -> str | None:
        """``tokenizer_digest`` of a finished tokenizer job (kept in its result; added to older results)."""
        result = self.result(job)
        if result is None:
            return None
        name = "tokenizer_weights" if ema else "tokenizer_weights_live"
        if name not in result:
            result[name] = tokenizer_digest(self.run_dir(job), ema=ema)
            self.save_result(job, result)
        return result[name]

    def same_run(self, a: Job, b: Job) -> bool:
        """Whether two jobs are one run in this cache (the same key: e.g. one AR config on bitwise-equal tokenizers)."""
        return self.key(a) == self.key(b)  # the key holds the kind and the seed

    def dir(self, job: Job) -> Path:
        """``jobs/<name>-s<seed>-<key>`` of the first job with this key: jobs with one key are one run. Which job's
        name it bears is settled once, atomically, in ``jobs/.keys/`` (two processes may ask at once)."""
        if job in self._dirs:
            return self._dirs[job]
        key = self.key(job)
        jobs = self.root / "jobs"
        if job not in self._keys:  # a provisional key (its tokenizer is not trained yet): nothing runs under it
            return jobs / f"{slug(job.name)}-s{job.seed}-{key}"
        index = jobs / ".keys" / f"s{job.seed}-{key}"
        if not index.is_file():
            same = sorted(p.name for p in jobs.glob(f"*-s{job.seed}-{key}"))  # made before the index existed
            index.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(index, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "w") as f:
                    f.write(same[0] if same else f"{slug(job.name)}-s{job.seed}-{key}")
        for _ in range(100):  # the other process may be between creating and writing it
            name = index.read_text().strip()
            if name:
                break
            time.sleep(0.01)
        self._dirs[job] = jobs / name
        return self._dirs[job]

    def pieces(self, job: Job) -> list[float]:
        """The seconds of every piece the job's run was trained and evaluated in (``pieces.json``)."""
        path = self.dir(job) / "pieces.json"
        return json.loads(path.read_text()) if path.is_file() else []

    def add_piece(self, job: Job, seconds: float) -> None:
        self._write(self.dir(job) / "pieces.json", [*self.pieces(job), seconds])

    def run_dir(self, job: Job) -> Path:
        return self.dir(job) / "run"

    def result(self, job: Job) -> dict | None:
        path = self.dir(job) / "result.json"
        if not path.is_file():
            return None
        result = json.loads(path.read_text())
        if job.kind == "ar":  # the run may have been evaluated for another budget: this job's schedule, or not done
            points = {p["step"]: p for p in result.get("points", [])}
            if not all(s in points for s in job.evals):
                return None  # a shorter budget's run: it continues to this one's length
            result = {**result, "points": [points[s] for s in job.evals]}
        return result

    def save_result(self, job: Job, result: dict) -> None:
        self._write(self.dir(job) / "result.json", result)

    def progress(self, job: Job) -> list[dict]:
        path = self.dir(job) / "progress.json"
        return json.loads(path.read_text()) if path.is_file() else []

    def save_progress(self, job: Job, points: list[dict]) -> None:
        self._write(self.dir(job) / "progress.json", points)

    @staticmethod
    def _write(path: Path, payload) -> None:
        from gear.files import atomic_write

        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=1)))

    def claim(self, job: Job) -> bool:
        """Take the job for this process; False while another live process holds it (a dead one's lock is taken)."""
        lock = self.dir(job) / "lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(lock.read_text() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid == os.getpid():
                    return True
                if pid and _alive(pid):
                    return False
                lock.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return True
        return False

    def release(self, job: Job) -> None:
        (self.dir(job) / "lock").unlink(missing_ok=True)


# ---------------------------------------------------------------------------- the study's jobs


def seeds_of(method: ARMethod, b: Budget) -> int:
    """How many of the seeds a main-comparison method runs."""
    if method.name in ("GEAR", BASELINE):
        return len(b.seeds)
    return b.reference_seeds if method.tokenizer == "warm-up" else b.control_seeds


class ARMethod(NamedTuple):
    name: str
    tokenizer: str   # key into the seed's tokenizer jobs
    lambda_ar: float


MAIN_METHODS = (
    ARMethod("LlamaGen", "warm-up", 0.0),
    ARMethod("LlamaGen-REPA", "warm-up", 0.5),
    ARMethod("LlamaGen+", "tokenizer+", 0.0),
    ARMethod("LlamaGen-REPA+", "tokenizer+", 0.5),
    ARMethod("GEAR", "GEAR", 0.5),
    ARMethod("GEAR lambda_tok=0", "GEAR lambda_tok=0", 0.5),
    ARMethod("STE", "STE", 0.5),
)
BASELINE = "LlamaGen-REPA+"   # the fair baseline: its tokenizer had as many updates as GEAR's
TEMPERATURES = (0.03, 0.1, 0.3, 1.0)
LAMBDA_TOKS = (0.0, 0.5, 1.5)
FAMILIES = ("lfq-tiny", "ibq-tiny")
REPA_VARIANTS = (("tap layer 1", "align.tap_layer=1"), ("tap layer 3", "align.tap_layer=3"),
                 ("tap layer 4", "align.tap_layer=4"), ("projector 128", "align.projector_dim=128"),
                 ("projector 2048", "align.projector_dim=2048"), ("lambda_ar 0.1", "align.lambda_ar=0.1"),
                 ("lambda_ar 1.5", "align.lambda_ar=1.5"),
                 ("teacher stride 8 (its stride-8 stage on 64 px)", "align.teacher=efficientnet-lite0-s8"))


@dataclass
class Study:
    """The jobs of the chosen parts, and named handles to them for the report."""

    budget: Budget
    parts: tuple[str, ...]
    jobs: list[Job] = field(default_factory=list)
    tokenizers: dict[tuple[str, int], Job] = field(default_factory=dict)     # (label, seed) -> tokenizer/joint job
    ar: dict[tuple[str, int], Job] = field(default_factory=dict)             # (method, seed) -> ar job
    long_joint: dict[str, Job] = field(default_factory=dict)
    ablations: dict[str, tuple[Job, Job | None]] = field(default_factory=dict)  # label -> (tokenizer, ar at short)
    families: dict[tuple[str, str], tuple[Job, Job]] = field(default_factory=dict)  # (family, method) -> (tok, ar)
    repa: dict[str, Job] = field(default_factory=dict)

    def add(self, job: Job) -> Job:
        if job not in self.jobs:
            self.jobs.append(job)
        return job


def warmup_job(b: Budget, family: str = "vq-tiny") -> Job:
    name = "warmup" if family == "vq-tiny" else f"warmup-{family}"
    return Job("tokenizer", name, "fmnist-tokenizer.yaml", b.seeds[0], b.warmup_steps, (f"model.tokenizer={family}",))


def tokenizer_jobs(b: Budget, warm: Job, seed: int, steps: int, prefix: str = "") -> dict[str, Job]:
    joint = ("fmnist-joint.yaml",)
    return {
        "tokenizer+": Job("tokenizer", f"{prefix}tokenizer-plus", "fmnist-tokenizer.yaml", seed, steps, init=warm),
        "GEAR": Job("joint", f"{prefix}gear-joint", *joint, seed, steps, ("train.joint_mode=gear",), warm),
        "GEAR lambda_tok=0": Job("joint", f"{prefix}gear-lt0-joint", *joint, seed, steps,
                                 ("train.joint_mode=gear", "align.lambda_tok=0"), warm),
        "STE": Job("joint", f"{prefix}ste-joint", *joint, seed, steps, ("train.joint_mode=ste",), warm),
    }


def ar_job(name: str, tokenizer: Job, seed: int, steps: int, evals: tuple[int, ...], *overrides: str) -> Job:
    return Job("ar", name, "fmnist-ar.yaml", seed, steps, tuple(overrides), tokenizer, evals)


def build_study(b: Budget, parts: tuple[str, ...]) -> Study:
    st = Study(b, parts)
    warm = st.add(warmup_job(b))
    dense = eval_schedule(b.ar_steps, b.dense_until, b.dense_every, b.sparse_every)
    if b.short_ar_steps not in dense:  # the main curves have a point where the shorter runs stop
        dense = tuple(sorted({*dense, b.short_ar_steps}))
    seed0 = b.seeds[0]
    for seed in b.seeds:
        st.tokenizers[("warm-up", seed)] = warm

    def main_ar(method: str) -> Job | None:
        """The main comparison's seed-0 run of ``method`` when the main part runs: shorter runs of the same
        setting read its FID at short_ar_steps instead of training it again."""
        return st.ar.get((method, seed0))
    if "main" in parts:
        for seed in b.seeds:
            toks = {"warm-up": warm, **tokenizer_jobs(b, warm, seed, b.joint_steps)}
            for label, job in toks.items():
                if label in ("GEAR lambda_tok=0", "STE") and seed not in b.seeds[: b.control_seeds]:
                    continue
                st.tokenizers[(label, seed)] = st.add(job)
            for m in MAIN_METHODS:
                if seed not in b.seeds[: seeds_of(m, b)]:
                    continue
                st.ar[(m.name, seed)] = st.add(ar_job(f"{slug(m.name)}-ar", toks[m.tokenizer], seed, b.ar_steps, dense,
                                                      f"align.lambda_ar={m.lambda_ar}"))
    if "ste" in parts:
        toks = tokenizer_jobs(b, warm, seed0, b.long_joint_steps, prefix="long-")
        st.long_joint = {"STE": st.add(toks["STE"]), "GEAR": st.add(toks["GEAR"])}
        st.long_joint["STE, lr x4"] = st.add(dataclasses.replace(toks["STE"], name="long-ste-lr4-joint",
                                                                 overrides=(*toks["STE"].overrides, "optim.lr=1.6e-3")))
        st.long_joint["STE, NTP weight x4"] = st.add(dataclasses.replace(
            toks["STE"], name="long-ste-ntp4-joint", overrides=(*toks["STE"].overrides, "train.ste_ntp_weight=4.0")))
    short = (b.short_ar_steps,)
    if "ablations" in parts:
        from gear.config import AlignConfig

        defaults = AlignConfig()
        toks = tokenizer_jobs(b, warm, seed0, b.joint_steps)
        settings = [(f"T={t:g}", f"align.temperature={t}", t == defaults.temperature) for t in TEMPERATURES]
        settings += [(f"lambda_tok={lt:g}", f"align.lambda_tok={lt}", lt == defaults.lambda_tok) for lt in LAMBDA_TOKS]
        for label, override, default in settings:
            if default or override == "align.lambda_tok=0.0":  # the main comparison's GEAR / GEAR lambda_tok=0
                method = "GEAR" if default else "GEAR lambda_tok=0"
                tok = st.add(toks[method])
                ar = main_ar(method) or ar_job(f"{slug(method)}-ar-short", tok, seed0, b.short_ar_steps, short,
                                                "align.lambda_ar=0.5")
            else:
                base = toks["GEAR"]
                tok = st.add(dataclasses.replace(base, name=f"gear-{slug(label)}-joint", overrides=(*base.overrides, override)))
                ar = ar_job(f"gear-{slug(label)}-ar", tok, seed0, b.short_ar_steps, short, "align.lambda_ar=0.5")
            st.ablations[label] = (tok, st.add(ar))
    if "families" in parts:
        for family in FAMILIES:
            fwarm = st.add(warmup_job(b, family))
            toks = tokenizer_jobs(b, fwarm, seed0, b.joint_steps, prefix=f"{family}-")
            for method, label in (("LlamaGen-REPA+", "tokenizer+"), ("GEAR", "GEAR")):
                tok = st.add(toks[label])
                st.families[(family, method)] = (tok, st.add(ar_job(f"{family}-{slug(method)}-ar", tok, seed0,
                                                                    b.short_ar_steps, short, "align.lambda_ar=0.5")))
    if "repa" in parts:
        for label, override, method in (("default (tap 2, projector 512, lambda_ar 0.5)", "align.lambda_ar=0.5", "LlamaGen-REPA"),
                                        ("no alignment (LlamaGen)", "align.lambda_ar=0.0", "LlamaGen"),
                                        *((label, override, None) for label, override in REPA_VARIANTS)):
            extra = ("align.lambda_ar=0.5", override) if "lambda_ar" not in override else (override,)
            job = (main_ar(method) if method else None) or ar_job(f"repa-{slug(label.split(' (')[0])}-ar", warm, seed0,
                                                                  b.short_ar_steps, short, *extra)
            st.repa[label] = st.add(job)
    # The order is the priority. The controls' extra seeds only narrow a spread, so they wait until the main
    # comparison has every seed and each one-seed question (STE, ablations, families, REPA) has its answer.
    controls = {m.name for m in MAIN_METHODS if m.name not in ("GEAR", BASELINE)}
    later = {job for (m, s), job in st.ar.items() if m in controls and s != seed0}
    later |= {job.init for job in later} - {job.init for job in st.jobs if job not in later}
    st.jobs.sort(key=lambda job: job in later)  # stable: the rest keep their order
    return st


# ---------------------------------------------------------------------------- the plan


def estimate_seconds(study: Study, cache: ResultCache | None = None) -> float:
    """Estimated seconds for the jobs not yet done (COSTS) on one one-thread process; two take about half."""
    total, tokenizers, keys = 0.0, set(), set()
    for job in study.jobs:
        if cache is not None and (cache.result(job) is not None or cache.key(job) in keys):
            continue  # done, or one run with a job already counted
        if cache is not None:
            keys.add(cache.key(job))
        total += COSTS["setup"]
        if job.kind == "ar":  # a continued run costs its steps and evaluations past the last one cached
            repa = "align.lambda_ar=0.0" not in job.overrides
            done = max((p["step"] for p in cache.progress(job)), default=0) if cache is not None else 0
            total += (max(job.steps - done, 0) * COSTS["ar-repa" if repa else "ar"]
                      + sum(s > done for s in job.evals) * COSTS["fid"])
            if job.init not in tokenizers:
                tokenizers.add(job.init)
                total += COSTS["extract"]
        else:
            kind = "joint-ste" if job.kind == "joint" and "train.joint_mode=ste" in job.overrides else job.kind
            total += job.steps * COSTS[kind] + COSTS["tokenizer-eval"]
    return total + COSTS["features"]


def plan_lines(study: Study, cache: ResultCache, cpu: bool = True) -> list[str]:
    lines = [f"{'job':34} {'seed':>4} {'kind':>9} {'steps':>6} {'evals':>5}  state"]
    for job in study.jobs:
        state = "done" if cache.result(job) is not None else (
            f"{len(cache.progress(job))} evals done" if cache.progress(job) else "to do")
        lines.append(f"{job.name:34} {job.seed:>4} {job.kind:>9} {job.steps:>6} {len(job.evals):>5}  {state}")
    todo = estimate_seconds(study, cache)
    done = sum(cache.result(j) is not None for j in study.jobs)
    if not cpu:  # COSTS are CPU measurements
        lines.append(f"{len(study.jobs)} jobs, {done} done; no GPU step costs are measured yet, so no time estimate")
        return lines
    lines.append(f"{len(study.jobs)} jobs, {done} done; left: estimated {todo / 2 / 3600:.1f} h on 2 quiet cores with two "
                 f"processes of one thread each (make reproduce: --threads 1, started twice)")
    return lines
