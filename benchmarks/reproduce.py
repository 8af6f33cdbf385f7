"""The paper's claims at small scale on Fashion-MNIST: equal tokenizer budgets, controls, convergence, seeds.

    .venv/bin/python benchmarks/reproduce.py --plan         # the jobs, what the cache holds, the estimated time
    .venv/bin/python benchmarks/reproduce.py                # run (or continue) the default study; resumable
    .venv/bin/python benchmarks/reproduce.py --parts main   # one part: main, ste, ablations, families, repa
    .venv/bin/python benchmarks/reproduce.py --report-only  # the report from what the cache holds now
    .venv/bin/python benchmarks/reproduce.py --quick        # a smoke run of every part, a few minutes
    .venv/bin/python benchmarks/reproduce.py --device cuda  # the larger `gpu` preset on a GPU
    .venv/bin/python benchmarks/reproduce.py --threads 1 --worker &   # a second process on the same cache

Every training run is a job whose result is cached on disk under ``--cache-dir`` (default runs/reproduce/), keyed
by its config where it departs from the defaults (a tokenizer job's length included), where it starts (a
tokenizer job: its init's key; an AR job: its tokenizer's weights, so AR runs on bitwise-equal tokenizers are
one job), and what today's code computes with that config (a tiny probe run, see study_probe.py): an interrupted
study continues where it stopped (an AR run from its last evaluation), and a changed setting or a code change
that alters training reruns only the jobs it touches; each result records the commits it ran on. An AR run's length is not in its key: a larger --ar-steps continues the cached
AR runs from their last checkpoint (a run is a prefix of a longer one) and keeps their evaluations. Two processes
may work on one cache at once (each job is claimed with a lock file; ``--worker`` runs jobs and leaves the report
to the other): that is how ``make reproduce`` uses both cores. The AR stages train on a code store (``gear extract``) shared by every job, so an AR step costs what the
AR alone costs: no encoding, no teacher.

Main methods run every seed (GEAR, LlamaGen-REPA+), ``control_seeds`` (LlamaGen+, GEAR lambda_tok=0, STE) or
``reference_seeds`` of them (LlamaGen, LlamaGen-REPA on the warm-up tokenizer); the other parts use seed 0.
Jobs run in priority order: the main comparison over every seed, then the one-seed parts, then the controls' extra
seeds, so a study stopped early has answered the most claims.

Parts:
  main       per seed: the warm-up tokenizer trained ``joint_steps`` more steps reconstruction-only
             ("tokenizer+"), GEAR, GEAR with lambda_tok = 0, STE; then AR runs on them, evaluated densely:
             LlamaGen and LlamaGen-REPA (warm-up tokenizer), LlamaGen+ and LlamaGen-REPA+ (tokenizer+: as many
             tokenizer updates as GEAR's), GEAR, GEAR lambda_tok=0, STE
  ste        long joint runs (``long_joint_steps``): STE, GEAR, STE at 4x the learning rate (optim.lr: tokenizer
             and joint AR), STE with 4x the NTP weight on the tokenizer; codebook statistics
  ablations  T and lambda_tok of the joint stage (seed 0): rFID, codebook usage, AR FID at ``short_ar_steps``
  families   the tiny LFQ and IBQ presets: GEAR vs LlamaGen-REPA+ (seed 0)
  repa       the alignment set-up of LlamaGen-REPA (seed 0): tap layer, projector width, lambda_ar, the teacher's
             layer and input resolution (its stride-8 stage on 64 px instead of the stride-16 stage on 128 px)
The report (REPORT.md, results.json, plots) goes to --report-dir only once every job of every part is done;
before that (or with --parts), a partial report goes to <cache-dir>/report-partial/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study import (  # noqa: E402  (sibling modules, also when this file is imported by the tests)
    CONFIGS, PARTS, PRESETS, ROOT, Budget, Job, ResultCache, build_study, code_version, plan_lines, resolved_config,
    slug, tokenizer_digest,
)
from study_probe import Probe  # noqa: E402
from study_report import collect, make_figures, write_report  # noqa: E402


# ---------------------------------------------------------------------------- running the jobs


@dataclasses.dataclass
class Evaluation:
    """How the study measures a run, on ``device``: in the feature space of the Fashion-MNIST reference classifier,
    EMA weights, seed 0. The jobs and their probes (study_probe.py) both measure through it."""

    data: object
    device: str
    cfg_scale: float
    classifier: object = None

    def reference(self):
        if self.classifier is None:
            from gear.eval.runs import reference_classifier

            self.classifier = reference_classifier(self.data, device=self.device)
        return self.classifier

    def tokenizer(self, run_dir: Path, num: int) -> dict[str, float]:
        import gear
        from gear.eval.runs import reconstruction_metrics

        tok = gear.load_tokenizer(run_dir, map_location=self.device).eval()
        m = reconstruction_metrics(tok, self.data, num=num, feature="classifier", classifier=self.reference())
        return {k: float(m[k]) for k in ("rfid", "psnr", "ssim", "codebook_usage", "codebook_perplexity")}

    def generation(self, run_dir: Path, num: int) -> dict[str, float | None]:
        from gear.eval.runs import generation_metrics
        from gear.run import load_pair

        tok, gen = load_pair(run_dir, device=self.device)
        m = generation_metrics(tok, gen, self.data, num=num, cfg_scale=self.cfg_scale, feature="classifier",
                               classifier=self.reference(), seed=0)
        return {k: (float(m[k]) if m.get(k) is not None else None) for k in ("fid", "precision", "recall", "class_accuracy")}


class Runner:
    def __init__(self, budget: Budget, cache: ResultCache, data, device: str, log: Callable[[str], None],
                 code: dict[str, str] | None = None):
        self.budget, self.cache, self.data, self.device, self.log = budget, cache, data, device, log
        self.code = code or {}  # {"commit", "source"}: recorded with every result and evaluation
        self.evaluation = Evaluation(data, device, budget.cfg_scale)
        self.store = cache.root / "codes"

    def reference(self):
        return self.evaluation.reference()

    def run_all(self, jobs: list[Job], wait: bool = True) -> None:
        """Every job not yet done, in order; a job another process holds is left to it and waited for."""
        pending = [j for j in jobs if self.cache.result(j) is None]
        while pending:
            progressed = False
            for job in list(pending):
                if self.cache.result(job) is not None:
                    pending.remove(job)
                    continue
                if job.init is not None and self.cache.result(job.init) is None:
                    continue  # its tokenizer is not done yet (another process may be training it)
                if not self.cache.claim(job):
                    continue
                try:
                    if self.cache.result(job) is None:
                        self.run(job)
                finally:
                    self.cache.release(job)
                pending.remove(job)
                progressed = True
                break  # back to the first pending job: the order is the priority
            if pending and not progressed:
                if not wait:
                    return
                time.sleep(10)

    def run(self, job: Job) -> None:
        t0 = time.time()
        self.log(f"{job.name} s{job.seed}: start ({job.kind}, {job.steps} steps)")
        try:
            result = self._run_ar(job) if job.kind == "ar" else self._run_tokenizer(job)
        finally:  # every piece of a job's run counts, an interrupted one too (one killed outright cannot)
            self.cache.add_piece(job, time.time() - t0)
        result["wall_seconds"] = sum(self.cache.pieces(job))
        points = result.get("points", [])
        result["code"] = sorted(({p.get("code", "") for p in points} | {self.code.get("commit", "")}) - {""})
        result["source"] = sorted(({p.get("source", "") for p in points} | {self.code.get("source", "")}) - {""})
        self.cache.save_result(job, result)
        self.log(f"{job.name} s{job.seed}: done in {result['wall_seconds'] / 60:.1f} min")

    def _config(self, job: Job, **paths):
        init = str(self.cache.run_dir(job.init)) if job.init else ""
        return resolved_config(job, self.budget, self.cache.extra, out_dir=str(self.cache.run_dir(job)), init_dir=init, **paths)

    @staticmethod
    def _trainer(cfg):
        """The job's Trainer, continuing its checkpoint when there is one."""
        from gear.train import checkpoint as ckpt
        from gear.train.loop import Trainer

        return Trainer(cfg, resume=ckpt.checkpoint_path(cfg.train.out_dir).is_file())

    @staticmethod
    def _train_to(trainer, step: int) -> float:
        """Train on to ``step`` (checkpointed there, as at the end of a run); the loop's seconds. Continuing one
        Trainer in memory equals resuming from that checkpoint, without rebuilding data, models and teacher."""
        trainer.cfg.train.steps = step
        summary = trainer.fit()
        if summary.stopped_by:  # checkpointed short of ``step``: nothing to evaluate; rerun to continue
            raise SystemExit(f"stopped by {summary.stopped_by} at step {summary.step}; run again to continue the study")
        return summary.seconds

    def _checkpoint_step(self, run_dir: Path) -> int:
        from gear.train import checkpoint as ckpt

        path = ckpt.checkpoint_path(run_dir)
        return int(ckpt.load_checkpoint(path)["step"]) if path.is_file() else 0

    def _run_tokenizer(self, job: Job) -> dict:
        cfg = self._config(job)
        run_dir = self.cache.run_dir(job)
        if self._checkpoint_step(run_dir) == 0 and run_dir.exists():
            shutil.rmtree(run_dir)  # started but never checkpointed: metrics.jsonl is appended to, so start clean
        seconds = self._train_to(self._trainer(cfg), job.steps)
        return {"tokenizer": self.eval_tokenizer(run_dir), "loop_seconds": seconds,
                "tokenizer_weights": tokenizer_digest(run_dir)}

    def eval_tokenizer(self, run_dir: Path) -> dict:
        return self.evaluation.tokenizer(run_dir, self.budget.recon_samples)

    def _run_ar(self, job: Job) -> dict:
        import fcntl

        from gear.train.code_store import extract_for_config

        cfg = self._config(job, store=str(self.store))
        self.store.mkdir(parents=True, exist_ok=True)
        with open(self.store / ".extract.lock", "w") as lock:  # one process extracts, another waits and reuses
            fcntl.flock(lock, fcntl.LOCK_EX)
            done = extract_for_config(cfg)  # the tokenizer's codes (and the features) once, shared by every job
        if done.wrote:
            self.log(f"  extracted {', '.join(done.wrote)} in {done.seconds / 60:.1f} min")
        run_dir = self.cache.run_dir(job)
        at = self._checkpoint_step(run_dir)
        if at == 0 and run_dir.exists():
            shutil.rmtree(run_dir)
        points = [p for p in self.cache.progress(job) if p["step"] <= at]
        seconds, trainer = 0.0, None
        for step in job.evals:
            if step < at or any(p["step"] == step for p in points):
                continue
            if step > at:
                trainer = trainer or self._trainer(cfg)
                seconds += self._train_to(trainer, step)
                at = step
            points.append({**self.eval_generation(run_dir, step), "code": self.code.get("commit", ""),
                           "source": self.code.get("source", "")})
            self.cache.save_progress(job, points)
            self.log(f"  {job.name} s{job.seed} step {step}: FID {points[-1]['fid']:.2f}")
        missing = sorted(set(job.evals) - {p["step"] for p in points})
        if missing:  # below the run's checkpoint: another budget or schedule than the cached run's
            raise ValueError(f"{job.name} s{job.seed}: its cached run (checkpoint at step {at}) was never evaluated at "
                             f"steps {missing} of this schedule; choose a budget and schedule whose evaluation steps "
                             f"below {at} are among its evaluated ones ({', '.join(str(p['step']) for p in points)})")
        return {"points": points, "loop_seconds": seconds, "extract_seconds": done.seconds if done.wrote else 0.0}

    def eval_generation(self, run_dir: Path, step: int) -> dict:
        return {"step": step, **self.evaluation.generation(run_dir, self.budget.fid_samples)}

    def sample_grid(self, run_dir: Path, path: Path) -> None:
        from gear.data.transforms import save_image_grid
        from gear.run import load_pair

        tok, gen = load_pair(run_dir, device=self.device)
        per = self.budget.grid_per_class
        labels = torch.arange(gen.config.num_classes, device=self.device).repeat_interleave(per)
        with torch.no_grad():
            images = tok.decode(gen.generate(labels, cfg_scale=self.budget.cfg_scale, seed=0))
        save_image_grid(images.float().cpu(), path, nrow=per)


# ---------------------------------------------------------------------------- command line

_PARSERS: dict[str, Callable[[str], object]] = {
    "int": int,
    "float": float,
    "str": str,
    "tuple[int, ...]": lambda text: tuple(int(x) for x in text.split(",") if x.strip()),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="the budget to start from: cpu (default), quick, gpu (default with --device cuda)")
    p.add_argument("--quick", action="store_true", help="same as --preset quick: a smoke run of every part")
    for f in dataclasses.fields(Budget):
        p.add_argument("--" + f.name.replace("_", "-"), type=_PARSERS[f.type], default=None,
                       help=f"default {getattr(PRESETS['cpu'], f.name)}")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--cache-dir", type=Path, default=ROOT / "runs" / "reproduce",
                   help="the jobs' runs and results, and the code store (continue a study by pointing here again)")
    p.add_argument("--report-dir", type=Path, default=ROOT / "benchmarks" / "results",
                   help="REPORT.md, results.json, plots, sample grids: only once every job is done")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every stage (part of every job's key), repeatable")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    p.add_argument("--plan", action="store_true", help="list the jobs, what is done and the estimated time; trains nothing but the jobs' "
                   "probes (about 2 s each, once per code change: they are part of the keys)")
    p.add_argument("--report-only", action="store_true", help="write the report from the cache; run nothing")
    p.add_argument("--worker", action="store_true", help="run jobs beside another process on the same cache, and "
                   "write no report (that process does)")
    return p


def budget_from_args(args: argparse.Namespace) -> Budget:
    preset = "quick" if args.quick else args.preset or ("gpu" if args.device == "cuda" else "cpu")
    return dataclasses.replace(PRESETS[preset], **{f.name: getattr(args, f.name) for f in dataclasses.fields(Budget)
                                                   if getattr(args, f.name) is not None})


def parse_parts(text: str) -> tuple[str, ...]:
    parts = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in parts if x not in PARTS]
    if bad or not parts:
        raise ValueError(f"--parts takes a comma-separated list of {', '.join(PARTS)}, got {text!r}")
    return parts


def main(argv: list[str] | None = None) -> Path | None:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        budget, parts = budget_from_args(args), parse_parts(args.parts)
    except ValueError as err:
        parser.error(str(err))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available() and not args.plan:
        parser.error("--device cuda: no CUDA device is visible to torch")
    from gear.config import load_config

    extra = [f"train.device={args.device}", *args.overrides]
    data = dataclasses.replace(load_config(CONFIGS / "fmnist-tokenizer.yaml", extra).data, limit=0)
    start = time.time()

    def log(message: str) -> None:
        print(f"[{(time.time() - start) / 60:6.1f} min] {message}", flush=True)

    import gear

    if Path(gear.__file__).resolve().parent != ROOT / "src" / "gear":
        log(f"note: gear is imported from {Path(gear.__file__).parent}, not this checkout's src/: the study runs that code")
    evaluation = Evaluation(data, "cpu", budget.cfg_scale)  # a probe's; the jobs' own evaluation is on --device
    probe = Probe(args.cache_dir / "probes", budget, extra, evaluation, log=log)
    cache = ResultCache(args.cache_dir, budget, extra, behaviour=probe)
    study = build_study(budget, parts)
    runner = Runner(budget, cache, data, args.device, log, code={"commit": code_version(), "source": probe.source})
    if args.device == "cpu":
        runner.evaluation = evaluation  # one classifier for both

    if args.plan:
        print("\n".join(plan_lines(study, cache, cpu=args.device == "cpu")))
        return None
    if not args.report_only:
        runner.run_all(study.jobs)
    if args.worker:
        return None
    c = collect(study, cache)
    whole = c.complete and set(parts) == set(PARTS)  # only the whole study replaces the published report
    report_dir = args.report_dir if whole else args.cache_dir / "report-partial"
    report_dir.mkdir(parents=True, exist_ok=True)
    figures = make_figures(c, report_dir)
    grids = {}
    for m in ("LlamaGen-REPA+", "GEAR", "STE"):
        job = study.ar.get((m, budget.seeds[0]))
        if job is not None and c.result(job) is not None:
            name = f"samples_{slug(m)}.png"
            runner.sample_grid(cache.run_dir(job), report_dir / name)
            grids[m] = name
    python = os.path.relpath(sys.executable, ROOT) if sys.executable else "python"
    command = shlex.join([python if not python.startswith("..") else "python", "benchmarks/reproduce.py", *argv])
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} torch threads)"
    report = write_report(c, report_dir, command, device, figures, grids)
    results = {"budget": dataclasses.asdict(budget), "complete": c.complete,
               "jobs": [{"name": j.name, "seed": j.seed, "key": cache.key(j), "result": cache.result(j)} for j in study.jobs]}
    (report_dir / "results.json").write_text(json.dumps(results, indent=1))
    log(f"wrote {report}" + ("" if whole else " (partial: the study is not finished, or only some parts were chosen)"))
    return report


if __name__ == "__main__":
    main()
