"""Do the study's two tokenizer continuations differ in anything besides the soft branch?

benchmarks/study.py trains, from the same warm-up tokenizer and for the same number of steps,
  A  "tokenizer+"          fmnist-tokenizer.yaml continued (reconstruction + perceptual + GAN), and
  B  "GEAR lambda_tok=0"   fmnist-joint.yaml, train.joint_mode=gear align.lambda_tok=0 (the joint stage with the
                           REPA gradient into the tokenizer off; the AR trains beside it on the hard codes).
This script builds both jobs exactly as the study does (``study.tokenizer_jobs`` + ``study.resolved_config``, on a
tiny budget), steps the two Trainers side by side on one process and, after every step, compares the tokenizer
(parameters and buffers), its EMA, its optimizer state and the discriminator of A and B: the first step where they
differ, and at the end ||A - B|| relative to how far A moved from the warm-up (||A - A0||). It also checks that both
paths fed the tokenizer the same images and that the global RNG was in the same state at each tokenizer forward.

Each variant applies config overrides (to both paths, or to one) that remove one candidate difference, or add one
(positive controls, which show the comparison can see a difference); a last check runs both paths through
``Trainer.fit`` (as benchmarks/reproduce.py does: logging, previews, checkpoints) and compares what they saved.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/tokenizer_paths.py --steps 12 --warmup-steps 12

``--warmup RUN_DIR`` starts from an existing tokenizer run instead of training a tiny warm-up first.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study import Budget, resolved_config, tokenizer_jobs, warmup_job  # noqa: E402

A_LABEL, B_LABEL = "tokenizer+", "GEAR lambda_tok=0"


@dataclass(frozen=True)
class Variant:
    name: str
    both: tuple[str, ...] = ()      # overrides of both paths
    only_a: tuple[str, ...] = ()
    only_b: tuple[str, ...] = ()
    b_label: str = B_LABEL          # the study job that path B is (tokenizer+ for the noise floor)
    note: str = ""


AR_NO_DROPOUT = "model.generator_overrides={token_dropout: 0.0, resid_dropout: 0.0, ffn_dropout: 0.0, class_dropout: 0.0}"
VARIANTS = {v.name: v for v in (
    Variant("study", note="the two jobs as study.py defines them"),
    Variant("noise-floor", b_label=A_LABEL, note="B = tokenizer+ again: run-to-run differences of one path"),
    # positive controls: a difference the comparison must see
    Variant("ctl-soft-branch", only_b=("align.lambda_tok=0.5",), note="control: B with the soft branch on (GEAR)"),
    Variant("ctl-data-order", only_b=("train.seed=1",), note="control: B with another seed (data order)"),
    # candidate differences removed (or exercised) by config
    Variant("no-clip", both=("optim.grad_clip=0",), note="no gradient clipping"),
    Variant("disc-fresh", both=("model.discriminator_init=fresh",), note="fresh discriminator in both"),
    Variant("no-gan", both=("loss.gan_weight=0",), note="no discriminator at all"),
    Variant("b-no-align", only_b=("align.lambda_ar=0",), note="B without teacher, projector and AR REPA"),
    Variant("b-ar-no-dropout", only_b=(AR_NO_DROPOUT,), note="B's AR draws no random numbers"),
    Variant("live-init", both=("model.init_from_ema=false",), note="both start from the warm-up's live weights"),
    Variant("warmup-wd", both=("optim.warmup_steps=5", "optim.weight_decay=0.05"), note="lr warm-up and weight decay"),
    # (without the teacher cache: on CPU, bf16 autocast refuses to stack its float16 features, gear/train/targets.py)
    Variant("bf16", both=("train.precision=bf16", "train.cache_teacher_features=false"), note="bf16 autocast (CPU)"),
    Variant("accum2", both=("train.grad_accum_steps=2",), note="2 micro-batches per step"),
    Variant("tok-dropout", both=("model.tokenizer_overrides={dropout: 0.1}",), note="a tokenizer that draws dropout"),
    Variant("tok-dropout-accum2", both=("model.tokenizer_overrides={dropout: 0.1}", "train.grad_accum_steps=2"),
            note="tokenizer dropout, 2 micro-batches"),
    Variant("tok-dropout-accum2-ar-no-dropout", both=("model.tokenizer_overrides={dropout: 0.1}", "train.grad_accum_steps=2"),
            only_b=(AR_NO_DROPOUT,), note="same, B's AR without random draws"),
)}


# ---------------------------------------------------------------------------- building the two paths


def budget_for(args) -> Budget:
    return Budget(warmup_steps=args.warmup_steps, joint_steps=args.steps, batch_size=args.batch, data_limit=args.limit,
                  seeds=(args.seed,), control_seeds=1, reference_seeds=1, generator=args.generator)


def job_config(label: str, args, work: Path, name: str, warm_dir: Path, extra: list[str]):
    b = budget_for(args)
    job = tokenizer_jobs(b, warmup_job(b), args.seed, args.steps)[label]
    out = work / name
    if out.exists():
        shutil.rmtree(out)
    return resolved_config(job, b, [f"train.device={args.device}", *extra], out_dir=str(out), init_dir=str(warm_dir))


def train_warmup(args, work: Path) -> Path:
    from gear.train.loop import Trainer

    b = budget_for(args)
    out = work / "warmup"
    if out.exists():
        shutil.rmtree(out)
    cfg = resolved_config(warmup_job(b), b, [f"train.device={args.device}"], out_dir=str(out))
    t0 = time.time()
    Trainer(cfg).fit()
    print(f"warm-up: {args.warmup_steps} steps of fmnist-tokenizer.yaml in {time.time() - t0:.0f} s -> {out}")
    return out


class Side:
    """One path's Trainer, stepped by hand as ``Trainer.fit`` steps it, with what each step fed the tokenizer."""

    def __init__(self, cfg):
        from gear.train.loop import Trainer

        self.cfg = cfg
        self.t = Trainer(cfg)
        self.rng: list[str] = []       # the global RNG's state at each tokenizer forward
        self.batches: list[list[int]] = []
        self.metrics: list[dict] = []
        self.t.m.tokenizer.register_forward_pre_hook(lambda mod, args: self.rng.append(digest(torch.random.get_rng_state())))
        step_fn = self.t.step_fn

        def recording(*a, **k):
            result = step_fn(*a, **k)
            self.metrics.append({k: float(v) for k, v in result.metrics.items()})
            return result
        self.t.step_fn = recording
        for module in self.t.trained.values():  # as fit() does
            module.train()
        self.stream = self.t._batches()
        self.start_step = self.t.step
        self.init = self.states()

    def step(self) -> None:
        batch = next(self.stream)
        self.batches.append(batch.samples.index.tolist())
        self.t.train_step(batch)

    def states(self) -> dict[str, dict[str, torch.Tensor]]:
        t = self.t
        out = {"tokenizer": t.m.tokenizer.state_dict(), "tokenizer EMA": t.emas["tokenizer"].module.state_dict()}
        if t.m.discriminator is not None:
            out["discriminator"] = t.m.discriminator.state_dict()
        for group in ("tokenizer", "discriminator"):
            if group in t.opts:
                opt = t.opts[group].optimizer
                names = [n for n, _ in _named(t, group)]
                out[f"{group} optimizer"] = {f"{names[i]}.{k}": v for i, p in enumerate(opt.param_groups[0]["params"])
                                            for k, v in opt.state.get(p, {}).items()}
        return {k: {n: v.detach().clone() for n, v in s.items()} for k, s in out.items()}


def _named(t, group: str):
    return list((t.m.tokenizer if group == "tokenizer" else t.m.discriminator).named_parameters())


def digest(x: torch.Tensor) -> str:
    return hashlib.sha1(x.cpu().numpy().tobytes()).hexdigest()[:10]


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def sq(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor] | None = None) -> float:
    return sum(float(((a[k].double() - (b[k].double() if b is not None else 0)) ** 2).sum())
               for k in a if a[k].is_floating_point())


def compare(variant: Variant, args, work: Path, warm_dir: Path) -> dict:
    t0 = time.time()
    a = Side(job_config(A_LABEL, args, work, "a", warm_dir, [*variant.both, *variant.only_a]))
    b = Side(job_config(variant.b_label, args, work, "b", warm_dir, [*variant.both, *variant.only_b]))
    groups = [g for g in a.init if g in b.init]
    start_equal = {g: equal(a.init[g], b.init[g]) for g in groups}
    first = {g: None if start_equal[g] else 0 for g in groups}  # 0: already before the first step
    loss_diff = 0.0
    for step in range(1, args.steps + 1):
        done = len(a.metrics)
        a.step()
        b.step()
        sa, sb = a.states(), b.states()
        for g in groups:
            if first[g] is None and not equal(sa[g], sb[g]):
                first[g] = step
        for ma, mb in zip(a.metrics[done:], b.metrics[done:]):  # one per micro-batch
            loss_diff = max(loss_diff, abs(ma["tok/loss"] - mb["tok/loss"]))
    row = {"variant": variant, "first": first, "start_equal": start_equal, "loss_diff": loss_diff,
           "same_batches": a.batches == b.batches,
           "rng_first": next((i for i, (x, y) in enumerate(zip(a.rng, b.rng)) if x != y), None), "n_fwd": len(a.rng),
           "seconds": time.time() - t0}
    for g in groups:
        dist = sq(sa[g], sb[g]) ** 0.5
        moved = sq(sa[g], a.init[g]) ** 0.5 if a.init[g].keys() == sa[g].keys() else sq(sa[g]) ** 0.5  # optimizer: |A|
        row[g] = (dist, moved, sq(sa[g]) ** 0.5)
    row["paths"] = (a, b)
    return row


# ---------------------------------------------------------------------------- what each path is built with


def describe(a, b) -> list[str]:
    """The settings the two built Trainers actually hold for the tokenizer and the discriminator."""
    from gear.train.stage import learning_rate

    lines = []
    ca, cb = flat(a.cfg.to_dict()), flat(b.cfg.to_dict())
    ca.pop("train.out_dir"), cb.pop("train.out_dir")
    lines.append("resolved configs, keys that differ (A tokenizer+ | B GEAR lambda_tok=0):")
    for k in sorted(set(ca) | set(cb)):
        if ca.get(k) != cb.get(k):
            lines.append(f"  {k:36} {ca.get(k)!r:>24} | {cb.get(k)!r}")
    for name, p in (("A", a), ("B", b)):
        t = p.t
        lines.append(f"path {name} ({t.stage} stage): trained modules {list(t.trained)}; optimizers:")
        for group, u in t.opts.items():
            g = u.optimizer.param_groups[0]
            members = {id(q) for q in u.params}
            owners = [m for m, mod in t.trained.items() if any(id(q) in members for q in mod.parameters())]
            lines.append(f"    {group:13} over {owners}: {len(u.params)} tensors, lr {g['lr']:g}, betas {g['betas']}, "
                         f"eps {g['eps']:g}, wd {g['weight_decay']:g}, fused {g['fused']}, clip {u.grad_clip:g} "
                         f"(per optimizer), accumulate {u.accumulate}")
        last = t.cfg.train.steps - 1
        lrs = [learning_rate(t.cfg.optim, "tokenizer", s) for s in (0, 1, last)]
        lines.append(f"    EMA: {[(k, e.decay) for k, e in t.emas.items()]}; discriminator from {t.discriminator_source}; "
                     f"step counter starts at {p.start_step}; GAN active from step {t.cfg.loss.gan_start}; "
                     f"tokenizer lr at steps 0, 1, {last}: {lrs}")
        modes = {k: getattr(t.m, k).training for k in ("tokenizer", "discriminator", "perceptual", "teacher", "generator")
                 if getattr(t.m, k) is not None}
        lines.append(f"    train mode: {modes}; tokenizer dropout {t.m.tokenizer.config.dropout}; "
                     f"precision {'bf16' if t.cfg.train.precision == 'bf16' else 'fp32 (CPU auto)'}")
    return lines


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and not k.endswith("_overrides"):
            out |= flat(v, f"{prefix}{k}.")
        else:
            out[prefix + k] = v
    return out


# ---------------------------------------------------------------------------- the whole run, as the study runs it


def fit_both(args, work: Path, warm_dir: Path) -> list[str]:
    """Both jobs through Trainer.fit (logging, previews, checkpoints as in reproduce.py); then what they saved."""
    from safetensors.torch import load_file

    from gear.train.checkpoint import load_checkpoint
    from gear.train.loop import Trainer

    dirs = {}
    for name, label in (("fit-a", A_LABEL), ("fit-b", B_LABEL)):
        cfg = job_config(label, args, work, name, warm_dir, [])
        t = Trainer(cfg)
        t.cfg.train.steps = args.steps
        t.fit()
        dirs[name] = Path(cfg.train.out_dir)
    lines = [f"Trainer.fit, {args.steps} steps each, then the saved files (A vs B):"]
    for sub in ("tokenizer", "tokenizer-live"):
        sa, sb = (load_file(dirs[n] / sub / "model.safetensors") for n in ("fit-a", "fit-b"))
        lines.append(f"  {sub + '/model.safetensors':34} {'bitwise equal' if equal(sa, sb) else 'DIFFERENT'} "
                     f"(||A-B|| = {sq(sa, sb) ** 0.5:.3g})")
    ca, cb = (load_checkpoint(dirs[n] / "checkpoints" / "last.pt") for n in ("fit-a", "fit-b"))
    for what, xa, xb in (("checkpoint discriminator", ca["modules"]["discriminator"], cb["modules"]["discriminator"]),
                         ("checkpoint tokenizer EMA", ca["emas"]["tokenizer"], cb["emas"]["tokenizer"])):
        lines.append(f"  {what:34} {'bitwise equal' if equal(xa, xb) else 'DIFFERENT'} (||A-B|| = {sq(xa, xb) ** 0.5:.3g})")
    for group in ("tokenizer", "discriminator"):
        oa, ob = ca["optimizers"][group], cb["optimizers"][group]
        same = oa["param_groups"] == ob["param_groups"] and all(
            equal(oa["state"][i], ob["state"][i]) for i in oa["state"]) and oa["state"].keys() == ob["state"].keys()
        lines.append(f"  {'checkpoint ' + group + ' optimizer':34} {'bitwise equal' if same else 'DIFFERENT'}")
    return lines


# ---------------------------------------------------------------------------- report


def fmt_row(row: dict, groups: list[str]) -> str:
    v: Variant = row["variant"]
    parts = []
    for g in groups:
        if g not in row:
            parts.append(f"{'-':>22}")
            continue
        dist, moved, _ = row[g]
        first = row["first"][g]
        where = "never" if first is None else "start" if first == 0 else f"step {first}"
        parts.append(f"{where:>10} {dist / moved if moved else 0.0:>11.3g}")
    rng = "same" if row["rng_first"] is None else f"fwd {row['rng_first'] + 1}/{row['n_fwd']}"
    return (f"{v.name:34} " + " ".join(parts) + f"  {'same' if row['same_batches'] else 'DIFF':>7}  {rng:>11}"
            f"  {row['loss_diff']:>9.2g}  {row['seconds']:>4.0f}s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--warmup", default="", help="a tokenizer run directory to start both paths from (default: train one)")
    p.add_argument("--warmup-steps", type=int, default=12)
    p.add_argument("--steps", type=int, default=12, help="steps of each path")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--limit", type=int, default=64, help="data.limit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--generator", default="gpt-tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--no-fit", action="store_true", help="skip the Trainer.fit comparison")
    p.add_argument("--work", default="", help="folder for the runs (default: a temporary one, removed at the end)")
    args = p.parse_args()
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")

    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="tokenizer-paths-")
    work = Path(args.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device {args.device}; "
          f"{args.steps} steps per path, batch {args.batch}, data.limit={args.limit}, seed {args.seed}")
    warm_dir = Path(args.warmup) if args.warmup else train_warmup(args, work)

    groups = ["tokenizer", "tokenizer EMA", "tokenizer optimizer", "discriminator"]
    header = (f"{'variant':34} " + " ".join(f"{g[:22]:>22}" for g in groups) + f"  {'batches':>7}  {'RNG @ tok fwd':>11}"
              f"  {'max|dL_tok|':>9}  time")
    sub = f"{'':34} " + " ".join(f"{'first diff':>10} {'|A-B|/|A-A0|':>11}" for _ in groups)
    rows, described = [], False
    for name in names:
        row = compare(VARIANTS[name], args, work, warm_dir)
        if not described and name == "study":
            print("\n".join(describe(*row["paths"])))
            described = True
        for k in ("a", "b"):
            shutil.rmtree(work / k, ignore_errors=True)
        row.pop("paths")
        rows.append(row)
        print(f"  [{name}: {row['seconds']:.0f} s]", flush=True)
    print()
    print(header)
    print(sub)
    for row in rows:
        print(fmt_row(row, groups))
    print("(first diff: the first step after which the two differ (start: before any step). |A-B|/|A-A0|: the "
          "distance between the paths over the distance path A moved from the warm-up; for the optimizer state, which "
          "starts empty, over |A|. RNG: the first tokenizer forward at which the global RNG state differed. "
          "max|dL_tok|: the largest difference of the tokenizer loss at one step.)")
    print()
    for row in rows:
        v = row["variant"]
        spec = "; ".join(x for x in (f"both: {' '.join(v.both)}" if v.both else "",
                                     f"A: {' '.join(v.only_a)}" if v.only_a else "",
                                     f"B: {' '.join(v.only_b)}" if v.only_b else "",
                                     f"B = {v.b_label}" if v.b_label != B_LABEL else "") if x)
        start = [g for g, same in row["start_equal"].items() if not same]
        print(f"  {v.name}: {v.note}{' [' + spec + ']' if spec else ''}"
              f"{'; differ at the start: ' + ', '.join(start) if start else ''}")
    if not args.no_fit:
        print()
        print("\n".join(fit_both(args, work, warm_dir)))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
