"""The paper's claims at small scale on Fashion-MNIST: four methods with the same AR budget, several seeds.

    .venv/bin/python benchmarks/reproduce.py              # the default budget (Budget below)
    .venv/bin/python benchmarks/reproduce.py --quick      # a smoke run of the whole pipeline, a few minutes
    .venv/bin/python benchmarks/reproduce.py --ar-steps 900 --seeds 0,1,2 --set train.device=cuda

Methods (every AR trains afresh for ``ar_steps`` steps, evaluated every ``ar_steps / eval_points`` steps):
  LlamaGen       the warm-up tokenizer frozen, AR with next-token prediction only (align.lambda_ar=0)
  LlamaGen-REPA  the warm-up tokenizer frozen, AR with NTP + alignment (align.lambda_ar=0.5)
  GEAR           joint stage from the warm-up tokenizer, then the AR on the GEAR tokenizer (its EMA)
  STE            the joint stage with the straight-through estimator, then the AR on that tokenizer
One warm-up tokenizer is shared by all methods and seeds; the seeds vary the joint and AR stages.

Writes REPORT.md, results.json, PNG plots and sample grids to --report-dir; the runs go to --runs-dir.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import plots  # noqa: E402  (the sibling module, also when this file is imported by the tests)

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


@dataclass(frozen=True)
class Budget:
    """Every number that sets the cost of a run; each one is a command-line option (--warmup-steps ...)."""

    warmup_steps: int = 400                # tokenizer warm-up, once, shared by every method and seed
    joint_steps: int = 200                 # GEAR / STE joint stage, per seed
    ar_steps: int = 600                    # the AR budget, the same for every method
    eval_points: int = 6                   # FID after every ar_steps / eval_points AR steps
    batch_size: int = 32
    seeds: tuple[int, ...] = (0, 1)
    fid_samples: int = 500                 # per FID on the reference classifier's features
    recon_samples: int = 1000              # held-out images per tokenizer evaluation
    inception_samples: int = 200           # > 0: Inception FID of each method's final AR (first seed) too
    cfg_scale: float = 1.5
    grid_per_class: int = 8
    data_limit: int = 0                    # 0 = the whole training split

    def __post_init__(self) -> None:
        for name in ("warmup_steps", "joint_steps", "ar_steps", "eval_points", "batch_size", "grid_per_class"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.eval_points > self.ar_steps:
            raise ValueError(f"--eval-points ({self.eval_points}) must be <= --ar-steps ({self.ar_steps})")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds must be distinct integers such as 0,1, got {self.seeds}")
        if self.fid_samples < 10 or self.recon_samples < 10 or self.inception_samples < 0:
            raise ValueError("--fid-samples and --recon-samples must be >= 10 and --inception-samples >= 0")


QUICK = Budget(warmup_steps=10, joint_steps=6, ar_steps=12, eval_points=2, fid_samples=40, recon_samples=40,
               inception_samples=0, grid_per_class=2)


class Method(NamedTuple):
    name: str
    joint_mode: str | None  # None: the AR trains on the frozen warm-up tokenizer
    lambda_ar: float


METHODS = (
    Method("LlamaGen", None, 0.0),
    Method("LlamaGen-REPA", None, 0.5),
    Method("GEAR", "gear", 0.5),
    Method("STE", "ste", 0.5),
)
BASELINE = "LlamaGen-REPA"
COLLAPSE_FACTOR = 0.5  # "collapsed": codebook perplexity below this share of the warm-up tokenizer's


# ---------------------------------------------------------------------------- pure helpers


def eval_steps(total: int, points: int) -> list[int]:
    """``points`` evenly spaced AR steps ending at ``total``: where training pauses for an evaluation."""
    if total < 1 or not 1 <= points <= total:
        raise ValueError(f"need total >= 1 and 1 <= points <= total, got total={total}, points={points}")
    return sorted({round(total * i / points) for i in range(1, points + 1)})


class Spread(NamedTuple):
    """A value over seeds: its mean and range."""

    mean: float
    lo: float
    hi: float
    n: int

    @property
    def half_range(self) -> float:
        return (self.hi - self.lo) / 2


def aggregate(values: list[float]) -> Spread:
    if not values:
        raise ValueError("aggregate needs at least one value (one per seed)")
    return Spread(sum(values) / len(values), min(values), max(values), len(values))


def compare_lower_better(a: Spread, b: Spread) -> str:
    """How ``a`` stands against ``b`` when lower is better; seed ranges that overlap are seed noise."""
    if a.n < 2 or b.n < 2:
        return "lower (one seed: noise unknown)" if a.mean < b.mean else "not lower (one seed: noise unknown)"
    if a.lo <= b.hi and b.lo <= a.hi:
        return "within seed noise"
    return "lower" if a.mean < b.mean else "higher"


def steps_to_reach(steps: list[int], values: list[float], target: float) -> int | None:
    """The first evaluated step whose value is at or below ``target`` (None: not within the budget)."""
    if len(steps) != len(values):
        raise ValueError(f"steps and values differ in length ({len(steps)} vs {len(values)})")
    return next((s for s, v in zip(steps, values) if v <= target), None)


def collapsed(perplexity: float, reference_perplexity: float, factor: float = COLLAPSE_FACTOR) -> bool:
    return perplexity < factor * reference_perplexity


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def fmt_spread(s: Spread, digits: int = 2) -> str:
    return f"{s.mean:.{digits}f} ± {s.half_range:.{digits}f}" if s.n > 1 else f"{s.mean:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def slug(name: str) -> str:
    return name.lower().replace(" ", "-")


# ---------------------------------------------------------------------------- results


@dataclass
class TokenizerEval:
    run_dir: str
    rfid: float
    psnr: float
    ssim: float
    usage: float
    perplexity: float


@dataclass
class EvalPoint:
    step: int
    fid: float
    precision: float | None
    recall: float | None
    class_accuracy: float | None


@dataclass
class ARRun:
    method: str
    seed: int
    run_dir: str
    tokenizer: str  # key into Results.tokenizers
    points: list[EvalPoint] = field(default_factory=list)


@dataclass
class StageTime:
    steps: int = 0
    loop_seconds: float = 0.0  # inside Trainer.fit
    wall_seconds: float = 0.0  # including set-up (data, models, teacher)


@dataclass
class Results:
    budget: Budget
    command: str
    started: str
    device: str
    classifier_accuracy: float = float("nan")
    tokenizers: dict[str, TokenizerEval] = field(default_factory=dict)
    runs: list[ARRun] = field(default_factory=list)
    inception: dict[str, float] = field(default_factory=dict)  # method -> FID of its first seed's final AR
    timing: dict[str, StageTime] = field(default_factory=dict)
    eval_seconds: float = 0.0
    wall_seconds: float = 0.0
    figures: list[str] = field(default_factory=list)
    grids: dict[str, str] = field(default_factory=dict)

    def curve(self, method: str) -> tuple[list[int], list[list[float]]]:
        """(steps, FID per seed per step) over the runs of ``method`` that reached every evaluation."""
        full = eval_steps(self.budget.ar_steps, self.budget.eval_points)
        per_seed = [[p.fid for p in r.points] for r in self.runs if r.method == method and [p.step for p in r.points] == full]
        return full, per_seed

    def at_step(self, method: str, index: int, key: str = "fid") -> Spread | None:
        values = [getattr(r.points[index], key) for r in self.runs if r.method == method and len(r.points) > index]
        values = [v for v in values if v is not None]
        return aggregate(values) if values else None

    def tokenizer_spread(self, method: str, key: str) -> Spread:
        keys = dict.fromkeys(r.tokenizer for r in self.runs if r.method == method)
        return aggregate([getattr(self.tokenizers[k], key) for k in keys])


# ---------------------------------------------------------------------------- the report


def write_report(res: Results, report_dir: Path) -> Path:
    b = res.budget
    steps = eval_steps(b.ar_steps, b.eval_points)
    last = len(steps) - 1
    methods = [m.name for m in METHODS if any(r.method == m.name for r in res.runs)]
    n_seeds = len(b.seeds)
    lines = [
        "# GEAR at small scale on Fashion-MNIST: LlamaGen, LlamaGen-REPA, GEAR and STE with the same AR budget",
        "",
        f"- Command: `{res.command}`",
        f"- Date: {res.started}; wall time {res.wall_seconds / 60:.1f} min on {res.device}",
        f"- Budget: tokenizer warm-up {b.warmup_steps} steps (one tokenizer shared by every method and seed); "
        f"joint stage {b.joint_steps} steps per seed (GEAR, STE); AR {b.ar_steps} steps for every method, trained afresh; "
        f"batch {b.batch_size}; seeds {', '.join(map(str, b.seeds))} (they vary the joint and AR stages); "
        f"training data: {'the first ' + str(b.data_limit) + ' images' if b.data_limit else 'all 60k images'}.",
        f"- FID: {b.fid_samples} class-balanced samples (cfg {b.cfg_scale}, EMA weights, sampling seed 0) against the "
        f"first {b.fid_samples} held-out images, in the feature space of the project's Fashion-MNIST classifier "
        f"(test accuracy {fmt(100 * res.classifier_accuracy, 1)}%), after every {steps[0]} AR steps; precision/recall "
        f"(k = 3) and class accuracy (share of samples classified as their conditioning class) on the same samples. "
        f"Tokenizers: rFID on the same features, PSNR and codebook usage over {b.recon_samples} held-out images.",
        f"- A ± B is the mean over {n_seeds} seed(s) and half the range; two methods whose seed ranges overlap are "
        "called *within seed noise*.",
        "",
        "## Results",
        "",
    ]
    base = res.curve(BASELINE)
    base_final = aggregate([s[-1] for s in base[1]]).mean if base[1] else None
    header = ["method", "rFID", "codebook usage", "perplexity", *[f"FID @ {s}" for s in steps], "precision", "recall",
              "class acc.", f"steps to FID ≤ {BASELINE} final"]
    rows = []
    for name in methods:
        fids = [res.at_step(name, i) for i in range(len(steps))]
        reach = "-"
        s, per_seed = res.curve(name)
        if per_seed and base_final is not None:
            hit = steps_to_reach(s, [aggregate([p[i] for p in per_seed]).mean for i in range(len(s))], base_final)
            reach = str(hit) if hit is not None else f"> {b.ar_steps}"
        finals = [res.at_step(name, last, k) for k in ("precision", "recall", "class_accuracy")]
        rows.append([name, fmt_spread(res.tokenizer_spread(name, "rfid")), fmt_spread(res.tokenizer_spread(name, "usage"), 3),
                     fmt_spread(res.tokenizer_spread(name, "perplexity"), 1), *[fmt_spread(f) if f else "-" for f in fids],
                     *[fmt_spread(f, 3) if f else "-" for f in finals], reach])
    lines += markdown_table(header, rows)
    lines += ["", "rFID, usage and perplexity are those of the tokenizer each AR trained on (LlamaGen and LlamaGen-REPA "
              "share the warm-up tokenizer). Precision, recall and class accuracy are at the last step.", "",
              "### Tokenizers", ""]
    lines += markdown_table(["tokenizer", "rFID", "PSNR", "SSIM", "codebook usage", "perplexity"],
                            [[k, fmt(t.rfid), fmt(t.psnr), fmt(t.ssim, 3), fmt(t.usage, 3), fmt(t.perplexity, 1)]
                             for k, t in sorted(res.tokenizers.items(), key=lambda kv: (kv[0] != "warm-up", kv[0]))])
    lines += ["", "## Findings", "", *findings(res, steps, base_final), ""]
    if res.inception:
        lines += ["## Inception FID end point", "",
                  f"{b.inception_samples} samples of each method's final AR (seed {b.seeds[0]} only: no seed spread) "
                  f"against {b.inception_samples} held-out images, standard FID Inception. So few samples bias FID upwards; "
                  "compare methods with each other only.", ""]
        lines += markdown_table(["method", "Inception FID"], [[m, fmt(v)] for m, v in res.inception.items()])
        lines.append("")
    lines += ["## Time", ""]
    lines += markdown_table(["stage", "steps", "s/step (loop)", "minutes (with set-up)"],
                            [[k, str(t.steps), fmt(t.loop_seconds / max(t.steps, 1)), fmt(t.wall_seconds / 60, 1)]
                             for k, t in res.timing.items()])
    lines += ["", f"Evaluation (FIDs, tokenizers, grids, classifier): {res.eval_seconds / 60:.1f} min.", ""]
    lines += ["## Figures", ""]
    lines += [f"![{f}]({f})" for f in res.figures] or ["matplotlib is not installed: no plots (pip install matplotlib)."]
    lines += ["", f"## Samples (final AR of seed {b.seeds[0]}, cfg {b.cfg_scale}, one row per class)", ""]
    lines += [f"**{m}**\n\n![{m}]({g})\n" for m, g in res.grids.items()]
    path = report_dir / "REPORT.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def findings(res: Results, steps: list[int], base_final: float | None) -> list[str]:
    out = []
    if any(r.method == "GEAR" for r in res.runs) and any(r.method == BASELINE for r in res.runs):
        parts = []
        for i, s in enumerate(steps):
            g, r = res.at_step("GEAR", i), res.at_step(BASELINE, i)
            if g and r:
                parts.append(f"step {s}: {fmt_spread(g)} vs {fmt_spread(r)}, GEAR {compare_lower_better(g, r)}")
        out.append(f"- **GEAR vs {BASELINE} at equal AR steps** (FID, lower is better): " + "; ".join(parts) + ".")
    if base_final is not None:
        reached = []
        for m in (m.name for m in METHODS):
            s, per_seed = res.curve(m)
            if per_seed:
                hit = steps_to_reach(s, [sum(p[i] for p in per_seed) / len(per_seed) for i in range(len(s))], base_final)
                reached.append(f"{m} {hit if hit is not None else f'not within {s[-1]}'}")
        out.append(f"- **AR steps to reach {BASELINE}'s final FID ({base_final:.2f}, mean over seeds)**: "
                   + ", ".join(reached) + f" (resolution: the evaluation points, every {steps[0]} steps).")
    if "warm-up" in res.tokenizers and any(r.method == "STE" for r in res.runs):
        warm = res.tokenizers["warm-up"]
        ste_p, ste_u = res.tokenizer_spread("STE", "perplexity"), res.tokenizer_spread("STE", "usage")
        verdict = ("collapses the codebook" if collapsed(ste_p.mean, warm.perplexity) else
                   f"does not collapse the codebook within {res.budget.joint_steps} joint steps here")
        gear = ""
        if any(r.method == "GEAR" for r in res.runs):
            gp, gu = res.tokenizer_spread("GEAR", "perplexity"), res.tokenizer_spread("GEAR", "usage")
            gear = f", GEAR {fmt_spread(gu, 3)} / {fmt_spread(gp, 1)}"
        out.append(f"- **STE {verdict}** (rule: perplexity below {COLLAPSE_FACTOR:g}x the warm-up's). Codebook usage / "
                   f"perplexity on held-out images: STE {fmt_spread(ste_u, 3)} / {fmt_spread(ste_p, 1)}, warm-up "
                   f"{warm.usage:.3f} / {warm.perplexity:.1f}{gear}.")
    return out


# ---------------------------------------------------------------------------- the runs


def evaluated(method):
    """Counts the time a Reproduction method takes as evaluation time."""

    def wrapper(self, *args, **kwargs):
        t0 = time.time()
        try:
            return method(self, *args, **kwargs)
        finally:
            self.res.eval_seconds += time.time() - t0

    return wrapper


class Reproduction:
    def __init__(self, budget: Budget, runs_dir: Path, report_dir: Path, overrides: list[str], cache_dir: Path | None,
                 command: str):
        from gear.config import load_config

        self.budget, self.runs_dir, self.report_dir = budget, runs_dir, report_dir
        self.overrides, self.cache_dir = overrides, cache_dir
        probe = load_config(CONFIGS / "fmnist-tokenizer.yaml", overrides)
        self.data = dataclasses.replace(probe.data, limit=0)  # evaluate on the full held-out split
        want = probe.train.device
        self.device = "cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu"
        where = torch.cuda.get_device_name() if self.device == "cuda" else f"CPU ({torch.get_num_threads()} torch threads)"
        self.res = Results(budget, command, datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), where)
        self.start = time.time()
        self.classifier = None

    def log(self, message: str) -> None:
        print(f"[{(time.time() - self.start) / 60:5.1f} min] {message}", flush=True)

    def config(self, name: str, out_dir: Path, steps: int, seed: int, *extra: str):
        from gear.config import load_config

        b = self.budget
        return load_config(CONFIGS / name, [
            f"train.out_dir={out_dir}", f"train.steps={steps}", f"train.seed={seed}", f"train.batch_size={b.batch_size}",
            f"data.limit={b.data_limit}", "train.progress=false", f"train.sample_every={steps}",
            f"train.checkpoint_every={steps}", f"eval.cfg_scale={b.cfg_scale}", f"eval.samples_per_class={b.grid_per_class}",
            *extra, *self.overrides])

    def train(self, cfg, kind: str, chunks: list[int] | None = None, after: Callable[[int], None] | None = None) -> None:
        """Train ``cfg`` afresh, pausing at each of ``chunks`` (steps) to call ``after``; resume is exact."""
        from gear.train.loop import Trainer

        run_dir = Path(cfg.train.out_dir)
        if run_dir.exists():
            shutil.rmtree(run_dir)  # a fresh run: metrics.jsonl is appended to, never truncated
        done = 0
        for i, end in enumerate(chunks or [cfg.train.steps]):
            chunk = copy.deepcopy(cfg)
            chunk.train.steps = end
            t0 = time.time()
            summary = Trainer(chunk, resume=i > 0).fit()
            t = self.res.timing.setdefault(kind, StageTime())
            t.steps += end - done
            t.loop_seconds += summary.seconds
            t.wall_seconds += time.time() - t0
            self.log(f"{run_dir.name}: step {end}/{cfg.train.steps} ({summary.seconds / (end - done):.2f} s/step)")
            done = end
            if after is not None:
                after(end)

    @evaluated
    def load_classifier(self) -> None:
        from gear.eval.runs import reference_classifier

        self.classifier = reference_classifier(self.data, self.cache_dir, device=self.device)
        self.res.classifier_accuracy = self.classifier.test_accuracy

    @evaluated
    def eval_tokenizer(self, key: str, run_dir: Path) -> None:
        import gear
        from gear.eval.runs import reconstruction_metrics

        tok = gear.load_tokenizer(run_dir, map_location=self.device).eval()
        m = reconstruction_metrics(tok, self.data, num=self.budget.recon_samples, feature="classifier",
                                   classifier=self.classifier)
        self.res.tokenizers[key] = TokenizerEval(str(run_dir), m["rfid"], m["psnr"], m["ssim"], m["codebook_usage"],
                                                 m["codebook_perplexity"])
        self.log(f"tokenizer {key}: rFID {m['rfid']:.2f}, usage {m['codebook_usage']:.3f}, perplexity {m['codebook_perplexity']:.1f}")

    @evaluated
    def eval_generation(self, run_dir: Path, feature: str, num: int) -> dict:
        from gear.eval.runs import generation_metrics, load_pair

        tok, gen = load_pair(run_dir, device=self.device)
        return generation_metrics(tok, gen, self.data, num=num, cfg_scale=self.budget.cfg_scale, feature=feature,
                                  classifier=self.classifier, cache_dir=self.cache_dir, seed=0)

    def eval_point(self, run: ARRun, step: int) -> None:
        m = self.eval_generation(Path(run.run_dir), "classifier", self.budget.fid_samples)
        run.points.append(EvalPoint(step, m["fid"], m["precision"], m["recall"], m["class_accuracy"]))
        self.log(f"{run.method} seed {run.seed} step {step}: FID {m['fid']:.2f}")

    @evaluated
    def sample_grid(self, method: str, run_dir: Path) -> None:
        from gear.data.transforms import save_image_grid
        from gear.eval.runs import load_pair

        tok, gen = load_pair(run_dir, device=self.device)
        per = self.budget.grid_per_class
        labels = torch.arange(gen.config.num_classes, device=self.device).repeat_interleave(per)
        with torch.no_grad():
            images = tok.decode(gen.generate(labels, cfg_scale=self.budget.cfg_scale, seed=0))
        name = f"samples_{slug(method)}.png"
        save_image_grid(images.float().cpu(), self.report_dir / name, nrow=per)
        self.res.grids[method] = name

    def save_json(self) -> None:
        self.report_dir.mkdir(parents=True, exist_ok=True)
        (self.report_dir / "results.json").write_text(json.dumps(asdict(self.res), indent=1))

    def run(self) -> Path:
        b = self.budget
        self.load_classifier()
        warm = self.runs_dir / "warmup"
        self.train(self.config("fmnist-tokenizer.yaml", warm, b.warmup_steps, b.seeds[0]), "tokenizer warm-up")
        self.eval_tokenizer("warm-up", warm)
        for seed in b.seeds:  # seeds outermost: an interrupted run still holds complete seeds
            for method in METHODS:
                tok_key, tok_dir = "warm-up", warm
                if method.joint_mode is not None:
                    tok_key, tok_dir = f"{method.name} s{seed}", self.runs_dir / f"{slug(method.name)}-joint-s{seed}"
                    self.train(self.config("fmnist-joint.yaml", tok_dir, b.joint_steps, seed, f"model.tokenizer_init={warm}",
                                           f"train.joint_mode={method.joint_mode}"), f"joint ({method.joint_mode})")
                    self.eval_tokenizer(tok_key, tok_dir)
                ar_dir = self.runs_dir / f"{slug(method.name)}-ar-s{seed}"
                run = ARRun(method.name, seed, str(ar_dir), tok_key)
                self.res.runs.append(run)
                cfg = self.config("fmnist-ar.yaml", ar_dir, b.ar_steps, seed, f"model.tokenizer_init={tok_dir}",
                                  f"align.lambda_ar={method.lambda_ar}")
                kind = "AR, NTP + alignment" if method.lambda_ar > 0 else "AR, NTP only"
                self.train(cfg, kind, eval_steps(b.ar_steps, b.eval_points), lambda step, run=run: self.eval_point(run, step))
                self.save_json()
        first = [r for r in self.res.runs if r.seed == b.seeds[0]]
        for run in first:
            self.sample_grid(run.method, Path(run.run_dir))
            if b.inception_samples:
                m = self.eval_generation(Path(run.run_dir), "inception", b.inception_samples)
                self.res.inception[run.method] = m["fid"]
                self.log(f"{run.method}: Inception FID {m['fid']:.2f} on {b.inception_samples} samples")
        self.make_figures(warm)
        self.res.wall_seconds = time.time() - self.start
        self.save_json()
        return write_report(self.res, self.report_dir)

    def make_figures(self, warm: Path) -> None:
        curves = {m.name: self.res.curve(m.name) for m in METHODS}
        made = plots.fid_curves({k: v for k, v in curves.items() if v[1]}, self.report_dir / "fid_vs_steps.png",
                                "FID (classifier features)", f"FID during AR training ({self.budget.fid_samples} samples)")
        tokenizers = {"warm-up": (warm, 0)}
        tokenizers |= {k: (Path(t.run_dir), self.budget.warmup_steps) for k, t in self.res.tokenizers.items() if k != "warm-up"}
        usage = plots.codebook_over_training(tokenizers, self.report_dir / "codebook_usage.png")
        self.res.figures = [p.name for p in (made, usage) if p is not None]


# ---------------------------------------------------------------------------- command line

_PARSERS: dict[str, Callable[[str], object]] = {
    "int": int,
    "float": float,
    "tuple[int, ...]": lambda text: tuple(int(x) for x in text.split(",") if x.strip()),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few steps and samples: a smoke run of the whole pipeline")
    default = Budget()
    for f in dataclasses.fields(Budget):
        show = lambda v: ",".join(map(str, v)) if isinstance(v, tuple) else v  # noqa: E731
        p.add_argument("--" + f.name.replace("_", "-"), type=_PARSERS[f.type], default=None,
                       help=f"default {show(getattr(default, f.name))} (--quick: {show(getattr(QUICK, f.name))})")
    p.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "reproduce", help="where the training runs go")
    p.add_argument("--report-dir", type=Path, default=ROOT / "benchmarks" / "results",
                   help="where REPORT.md, results.json, plots and sample grids go")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every stage, e.g. --set train.device=cuda (repeatable)")
    p.add_argument("--cache-dir", type=Path, default=None, help="classifier and reference statistics cache "
                   "(default $GEAR_CACHE or ~/.cache/gear)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    return p


def budget_from_args(args: argparse.Namespace) -> Budget:
    base = QUICK if args.quick else Budget()
    return dataclasses.replace(base, **{f.name: getattr(args, f.name) for f in dataclasses.fields(Budget)
                                        if getattr(args, f.name) is not None})


def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        budget = budget_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    if args.threads:
        torch.set_num_threads(args.threads)
    python = os.path.relpath(sys.executable, ROOT) if sys.executable else "python"
    command = shlex.join([python if not python.startswith("..") else "python", "benchmarks/reproduce.py", *argv])
    repro = Reproduction(budget, args.runs_dir, args.report_dir, args.overrides, args.cache_dir, command)
    report = repro.run()
    repro.log(f"wrote {report}")
    return report


if __name__ == "__main__":
    main()
