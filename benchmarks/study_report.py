"""The study's report: statistics over seeds, a verdict per claim of the paper, tables and figures, all read
from the result cache (nothing is recomputed)."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
import plots  # noqa: E402  (sibling modules, also when imported by the tests)
from study import (  # noqa: E402
    BASELINE, COLLAPSE_FACTOR, CONVERGED_DROP, FAMILIES, MAIN_METHODS, Job, ResultCache, Study,
)


# ---------------------------------------------------------------------------- statistics


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


def steps_to_reach(steps: list[int], values: list[float], target: float) -> float | None:
    """The AR step at which the curve first reaches ``target`` (lower is better), interpolated linearly between
    the evaluation points around the crossing; None when it does not within the budget. Before the first point
    the curve is not known, so a first value already at the target gives that first step."""
    if len(steps) != len(values):
        raise ValueError(f"steps and values differ in length ({len(steps)} vs {len(values)})")
    for i, (s, v) in enumerate(zip(steps, values)):
        if v <= target:
            if i == 0:
                return float(s)
            s0, v0 = steps[i - 1], values[i - 1]
            return s0 + (s - s0) * (v0 - target) / (v0 - v)
    return None


def converged(steps: list[int], values: list[float], drop: float = CONVERGED_DROP) -> tuple[bool | None, float]:
    """(whether, relative drop): the curve fell by less than ``drop`` of its value over the last quarter of
    its steps (value at 3/4 of the budget, interpolated, vs the final value). (None, nan) when no evaluation
    lies at or before 3/4 of the budget: the last quarter is not measured."""
    at = 0.75 * steps[-1]
    i = next(i for i, s in enumerate(steps) if s >= at)
    if steps[i] == at:
        ref = values[i]
    elif i == 0:
        return None, math.nan
    else:
        s0, s1 = steps[i - 1], steps[i]
        ref = values[i - 1] + (values[i] - values[i - 1]) * (at - s0) / (s1 - s0)
    rel = (ref - values[-1]) / ref if ref else 0.0
    return rel < drop, rel


def convergence_text(conv: bool | None, drop: float) -> str:
    return "unknown (no evaluation before the last quarter)" if conv is None else f"{'yes' if conv else 'no'} ({100 * drop:.1f}%)"


def collapsed(perplexity: float, reference_perplexity: float, factor: float = COLLAPSE_FACTOR) -> bool:
    return perplexity < factor * reference_perplexity


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def fmt_spread(s: Spread | None, digits: int = 2) -> str:
    if s is None:
        return "-"
    return f"{s.mean:.{digits}f} ± {s.half_range:.{digits}f}" if s.n > 1 else f"{s.mean:.{digits}f}"


def seed_list(seeds: tuple[int, ...]) -> str:
    return f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


# ---------------------------------------------------------------------------- results and the report


@dataclass
class Collected:
    """What the cache holds for a study, read back (nothing is recomputed)."""

    study: Study
    cache: ResultCache
    complete: bool = False

    def result(self, job: Job | None) -> dict | None:
        return self.cache.result(job) if job is not None else None

    def curves(self, method: str) -> tuple[list[int], list[list[float]]]:
        """(steps, FID per seed) over the finished main AR runs of ``method``."""
        b = self.study.budget
        steps = list(next((j.evals for (m, _), j in self.study.ar.items() if m == method), ()))
        per_seed = []
        for seed in b.seeds:
            r = self.result(self.study.ar.get((method, seed)))
            if r is not None and [p["step"] for p in r["points"]] == steps:
                per_seed.append([p["fid"] for p in r["points"]])
        return steps, per_seed

    def fid_at(self, method: str, step: int, key: str = "fid") -> Spread | None:
        steps, _ = self.curves(method)
        values = []
        for seed in self.study.budget.seeds:
            r = self.result(self.study.ar.get((method, seed)))
            for p in (r or {}).get("points", []):
                if p["step"] == step and p.get(key) is not None:
                    values.append(p[key])
        return aggregate(values) if values else None

    def tokenizer(self, label: str, key: str) -> Spread | None:
        values = [r["tokenizer"][key] for seed in self.study.budget.seeds
                  if (r := self.result(self.study.tokenizers.get((label, seed)))) is not None]
        values = list(dict.fromkeys(values)) if label == "warm-up" else values  # one warm-up shared by the seeds
        return aggregate(values) if values else None

    def mean_curve(self, method: str) -> tuple[list[int], list[float]]:
        """(steps, FID averaged over the finished seeds) of ``method``'s main AR runs."""
        steps, per_seed = self.curves(method)
        return steps, [aggregate(list(column)).mean for column in zip(*per_seed)]

    def reach(self, method: str, target: float) -> list[float | None]:
        steps, per_seed = self.curves(method)
        return [steps_to_reach(steps, values, target) for values in per_seed]


def point_at(result: dict | None, step: int, key: str = "fid") -> float | None:
    """The value at AR step ``step`` of a finished ar job (a main run or a shorter one)."""
    for p in (result or {}).get("points", []):
        if p["step"] == step:
            return p.get(key)
    return None


def collect(study: Study, cache: ResultCache) -> Collected:
    return Collected(study, cache, all(cache.result(j) is not None for j in study.jobs))


Verdict = tuple[str, str, str]   # (claim, verdict, evidence)


def short_run_noise(c: Collected) -> float | None:
    """How far apart two one-seed runs at short_ar_steps may land by seed alone: the sum of GEAR's and the
    baseline's half seed ranges there (None until both have more than one seed)."""
    g, r = c.fid_at("GEAR", c.study.budget.short_ar_steps), c.fid_at(BASELINE, c.study.budget.short_ar_steps)
    return g.half_range + r.half_range if g and r and g.n > 1 and r.n > 1 else None


CONTROLS = (  # (control, what it is compared with, what the comparison isolates)
    ("LlamaGen-REPA+", "GEAR", "GEAR's joint stage against reconstruction-only tokenizer steps (the claim)"),
    ("GEAR lambda_tok=0", "GEAR", "the REPA gradient into the tokenizer (the soft branch), all else equal"),
    ("GEAR lambda_tok=0", BASELINE, "the joint stage without the soft branch against reconstruction-only steps"),
    ("LlamaGen+", BASELINE, "REPA in the AR, on the same tokenizers"),
    ("STE", "GEAR", "the straight-through path into the tokenizer instead of the soft branch"),
)


def control_lines(c: Collected) -> list[list[str]]:
    """Each control against what it is compared with, at the main budget's last step: the two seed spreads and
    whether the difference is outside them."""
    rows = []
    final = c.study.budget.ar_steps
    for control, other, isolates in CONTROLS:
        a, b = c.fid_at(control, final), c.fid_at(other, final)
        if a is None or b is None:
            rows.append([f"{control} vs {other}", isolates, fmt_spread(a), fmt_spread(b), "-", "not run yet"])
            continue
        runs = [(x, y) for seed in c.study.budget.seeds
                if (x := c.study.ar.get((control, seed))) is not None and (y := c.study.ar.get((other, seed))) is not None]
        if runs and all(c.cache.same_run(x, y) for x, y in runs):
            rows.append([f"{control} vs {other}", isolates, f"{fmt_spread(a)} ({a.n})", f"{fmt_spread(b)} ({b.n})",
                         fmt(0.0), f"the same runs at seeds {', '.join(str(x.seed) for x, _ in runs)}: "
                         "bitwise-equal tokenizers, one AR config"])
            continue
        verdict = compare_lower_better(a, b)
        outside = {"lower": f"outside the seed spread: {control} lower", "higher": f"outside the seed spread: {control} higher",
                   "within seed noise": "within the seed spread"}.get(verdict, verdict)
        rows.append([f"{control} vs {other}", isolates, f"{fmt_spread(a)} ({a.n})", f"{fmt_spread(b)} ({b.n})",
                     fmt(a.mean - b.mean), outside])
    return rows


def recorded(names: str | list[str] | None) -> list[str]:
    """A result's commits or sources as a list, without empty names (older results hold one string, or an empty
    name)."""
    return [x for x in ([names] if isinstance(names, str) else names or []) if x]


def job_lines(c: Collected) -> tuple[list[list[str]], float, dict[str, int]]:
    """Per finished job: minutes (every piece of a continued run) and the commits it ran on; the total hours and
    how many jobs each commit ran."""
    rows, seconds, commits, seen = [], 0.0, {}, {}
    for job in c.study.jobs:
        r = c.result(job)
        if r is None:
            continue
        where = c.cache.dir(job)
        if where in seen:  # one run serving two jobs: counted once
            rows.append([job.name, str(job.seed), job.kind, str(job.steps), f"the run of {seen[where]}", "", ""])
            continue
        seen[where] = job.name
        seconds += r.get("wall_seconds", 0.0)
        code = recorded(r.get("code")) or ["not recorded"]
        for commit in code:
            commits[commit] = commits.get(commit, 0) + 1
        source = recorded(r.get("source"))
        rows.append([job.name, str(job.seed), job.kind, str(job.steps), fmt(r.get("wall_seconds", 0.0) / 60, 1),
                     ", ".join(code), ", ".join(source) or "-"])
    return rows, seconds, commits


def repa_summary(c: Collected) -> str:
    """One sentence on the alignment set-up: the default and the best variant against no alignment."""
    b = c.study.budget
    fids = {label: point_at(c.result(j), b.short_ar_steps) for label, j in c.study.repa.items()}
    fids = {k: v for k, v in fids.items() if v is not None}
    none = next((v for k, v in fids.items() if k.startswith("no alignment")), None)
    default = next((v for k, v in fids.items() if k.startswith("default")), None)
    variants = {k: v for k, v in fids.items() if not k.startswith(("no alignment", "default"))}
    if none is None or default is None:
        return "Not run yet."
    noise = short_run_noise(c)
    text = f"At AR step {b.short_ar_steps}: no alignment {none:.2f}, the default alignment {default:.2f}"
    if variants:
        best = min(variants, key=variants.get)
        text += f"; the best variant, {best}, {variants[best]:.2f} ({len(variants)} variants run)"
    yard = (f"differences within ±{noise:.2f} (the main comparison's seed spread at this step) are noise" if noise is not None
            else "one seed: no spread to judge differences by")
    return text + f"; {yard}."


def convergence_verdict(g_hits: list[float | None], b_hits: list[float | None], budget: int, conv: bool | None,
                        one_seed: bool) -> tuple[str, str]:
    """(verdict, evidence) for "GEAR converges faster" from each seed's steps to reach the baseline's final FID.
    The paper's speed-up is the baseline's budget over GEAR's steps; the baseline's own steps to reach that same
    FID (a seed mean, which noise lets it touch before its last step) are the fair yardstick."""
    ok, b_ok = [h for h in g_hits if h is not None], [h for h in b_hits if h is not None]
    if len(ok) < len(g_hits):
        return ("not reproduced" if conv and not one_seed else "inconclusive at this scale"), ""
    g_mean = sum(ok) / len(ok)
    speedup = budget / max(g_mean, 1e-9)
    text = f"; speed-up {speedup:.2f}x over the baseline's budget"
    if b_ok:
        text += f", {sum(b_ok) / len(b_ok) / max(g_mean, 1e-9):.2f}x over its own steps to reach"
    text += " (paper: about 10x)"
    if one_seed:
        return "inconclusive (one seed)", text
    if len(b_ok) == len(b_hits) and min(ok) > max(b_ok):
        return "not reproduced (GEAR reaches it later than the baseline, on every seed)", text
    if max(ok) < min(b_ok or [float("inf")]) and speedup >= 2:
        return ("reproduced" if conv else "reproduced within the budget (the baseline had not converged)"), text
    if speedup < 1.25:
        return "not reproduced", text
    return "inconclusive at this scale", text


def claim_verdicts(c: Collected) -> list[Verdict]:
    b = c.study.budget
    out: list[Verdict] = []
    # 1. STE collapses the codebook: judged on STE at the released settings, against GEAR run as long
    warm = c.tokenizer("warm-up", "codebook_perplexity")
    long_runs = {k: r for k, j in c.study.long_joint.items() if (r := c.result(j)) is not None}
    ste_short = c.tokenizer("STE", "codebook_perplexity")
    if warm is None or ("STE" not in long_runs and ste_short is None):
        out.append(("STE collapses the codebook", "inconclusive", "not run yet"))
    else:
        parts, released, variants = [], False, []
        if ste_short is not None:
            parts.append(f"STE after {b.joint_steps} joint steps: perplexity {fmt_spread(ste_short, 1)}")
            released |= collapsed(ste_short.mean, warm.mean)
        for k, r in long_runs.items():
            p = r["tokenizer"]["codebook_perplexity"]
            parts.append(f"{k} after {b.long_joint_steps}: {p:.1f} (usage {r['tokenizer']['codebook_usage']:.3f})")
            if k == "STE":
                released |= collapsed(p, warm.mean)
            elif k.startswith("STE") and collapsed(p, warm.mean):
                variants.append(k)
        gear = long_runs.get("GEAR")
        gear_collapsed = gear is not None and collapsed(gear["tokenizer"]["codebook_perplexity"], warm.mean)
        if released:
            verdict = "inconclusive (GEAR's codebook collapses too)" if gear_collapsed else "reproduced"
        elif variants:
            verdict = f"not reproduced at the released settings (collapses with {', '.join(variants)})"
        else:
            verdict = "not reproduced at this scale"
        out.append(("STE collapses the codebook", verdict, f"warm-up perplexity {warm.mean:.1f}; " + "; ".join(parts)
                    + f" (collapse: below {COLLAPSE_FACTOR:g}x the warm-up's)"))
    # 2. GEAR beats LlamaGen-REPA at equal AR steps (against the equal-budget baseline)
    steps, _ = c.curves(BASELINE)
    if steps and c.fid_at("GEAR", steps[-1]) and c.fid_at(BASELINE, steps[-1]):
        cells, verdicts = [], []
        for s in sorted({steps[len(steps) // 4], steps[len(steps) // 2], steps[-1]}):
            g, r = c.fid_at("GEAR", s), c.fid_at(BASELINE, s)
            if g and r:
                cmp = compare_lower_better(g, r)
                verdicts.append(cmp)
                cells.append(f"step {s}: {fmt_spread(g)} vs {fmt_spread(r)} ({cmp})")
        final = verdicts[-1]
        verdict = {"lower": "reproduced", "higher": "not reproduced"}.get(final, "inconclusive at this scale")
        n_g, n_b = c.fid_at("GEAR", steps[-1]).n, c.fid_at(BASELINE, steps[-1]).n
        out.append((f"GEAR beats {BASELINE} at equal AR steps (FID)", verdict,
                    "; ".join(cells) + f" (seeds: GEAR {n_g}, {BASELINE} {n_b})"))
    else:
        out.append((f"GEAR beats {BASELINE} at equal AR steps (FID)", "inconclusive", "not run yet"))
    # 3. faster convergence: steps to reach the baseline's final FID
    bs, bper = c.curves(BASELINE)
    _, gper = c.curves("GEAR")
    if bper and gper:
        target = aggregate([v[-1] for v in bper]).mean
        g_hits, b_hits = c.reach("GEAR", target), c.reach(BASELINE, target)
        conv, drop = converged(*c.mean_curve(BASELINE))
        text = (f"{BASELINE} final FID {target:.2f} (mean of {len(bper)} seeds); GEAR reaches it at "
                + ", ".join(fmt(h, 0) if h is not None else f">{bs[-1]}" for h in g_hits) + f" steps, {BASELINE} at "
                + ", ".join(fmt(h, 0) if h is not None else f">{bs[-1]}" for h in b_hits)
                + f"; {BASELINE}'s curve flattened: {convergence_text(conv, drop)}")
        verdict, more = convergence_verdict(g_hits, b_hits, bs[-1], conv, one_seed=len(gper) < 2 or len(bper) < 2)
        text += more
        out.append(("GEAR converges faster (AR steps to reach the baseline's final FID)", verdict, text))
    else:
        out.append(("GEAR converges faster (AR steps to reach the baseline's final FID)", "inconclusive", "not run yet"))
    # 4. reconstruction kept or improved (against the tokenizer with as many updates)
    g, t = c.tokenizer("GEAR", "rfid"), c.tokenizer("tokenizer+", "rfid")
    if g and t:
        cmp = compare_lower_better(g, t)
        # kept: lower, or within seed noise; with one seed a higher rFID cannot be told from noise
        verdict = {"higher": "not reproduced", "not lower (one seed: noise unknown)": "inconclusive (one seed)",
                   "lower (one seed: noise unknown)": "reproduced (one seed)"}.get(cmp, "reproduced")
        out.append(("Reconstruction kept or improved (rFID, GEAR vs tokenizer+)", verdict,
                    f"GEAR {fmt_spread(g)} vs tokenizer+ {fmt_spread(t)} ({cmp}); warm-up {fmt_spread(c.tokenizer('warm-up', 'rfid'))}"))
    else:
        out.append(("Reconstruction kept or improved (rFID, GEAR vs tokenizer+)", "inconclusive", "not run yet"))
    # 5. the gain holds for LFQ and IBQ (one seed: the main comparison's seed spread is the noise yardstick)
    noise = short_run_noise(c)
    texts, verdicts = [], []
    for family in FAMILIES:
        rs = {m: c.result(c.study.families.get((family, m), (None, None))[1]) for m in ("GEAR", BASELINE)}
        if all(rs.values()):
            g_fid, r_fid = point_at(rs["GEAR"], b.short_ar_steps), point_at(rs[BASELINE], b.short_ar_steps)
            gap = r_fid - g_fid
            v = ("inconclusive" if noise is None or abs(gap) <= noise else "reproduced" if gap > 0 else "not reproduced")
            verdicts.append(v)
            texts.append(f"{family}: GEAR {g_fid:.2f} vs {r_fid:.2f} at step {b.short_ar_steps} ({v})")
    if verdicts:
        verdict = verdicts[0] if len(set(verdicts)) == 1 else "mixed"
        if len(verdicts) < len(FAMILIES):
            verdict = f"inconclusive ({len(verdicts)} of {len(FAMILIES)} families run; so far {verdict})"
        yard = f"noise yardstick ±{noise:.2f} from the VQ seeds" if noise is not None else "no seed spread to judge by"
        verdict += "" if verdict.startswith("inconclusive (") else f" at this scale (one seed each, AR step {b.short_ar_steps})"
        out.append(("The gain holds for LFQ and IBQ (one seed)", verdict, "; ".join(texts) + f"; {yard}"))
    else:
        out.append(("The gain holds for LFQ and IBQ (one seed)", "inconclusive", "not run yet"))
    return out


def write_report(c: Collected, report_dir: Path, command: str, device: str, figures: list[str],
                 grids: dict[str, str]) -> Path:
    b = c.study.budget
    main_steps = next(iter(c.study.ar.values())).evals if c.study.ar else ()
    lines = [
        "# GEAR at small scale on Fashion-MNIST: the paper's claims with equal budgets, controls and seeds", "",
        *(["**PARTIAL: not every job of this study is done; numbers may change.**", ""] if not c.complete else []),
        f"- Command: `{command}`; written {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} on {device}; "
        f"parts: {', '.join(c.study.parts)}.",
        f"- Tokenizers: warm-up {b.warmup_steps} steps (shared); then {b.joint_steps} more steps per seed for every "
        f"method: joint (GEAR, GEAR lambda_tok=0, STE) or reconstruction only (tokenizer+). Every AR trains afresh "
        f"(batch {b.batch_size}, {b.generator}) on the codes of its frozen tokenizer, for {b.ar_steps} steps in the main "
        f"comparison and {b.short_ar_steps} in the ablation, family and REPA runs; seeds "
        f"{', '.join(map(str, b.seeds))} vary the joint and AR stages: GEAR and {BASELINE} run every seed, the "
        f"controls (LlamaGen+, GEAR lambda_tok=0, STE) {seed_list(b.seeds[:b.control_seeds])}, LlamaGen and "
        f"LlamaGen-REPA {seed_list(b.seeds[:b.reference_seeds])}.",
        f"- FID: {b.fid_samples} class-balanced samples (cfg {b.cfg_scale}, EMA weights) vs held-out images in the "
        f"feature space of the project's Fashion-MNIST classifier, at AR steps {', '.join(map(str, main_steps or (b.short_ar_steps,)))}. "
        f"rFID / usage / perplexity of tokenizers on {b.recon_samples} held-out images.",
        "- A ± B: mean over seeds and half the range; overlapping seed ranges are called *within seed noise*. "
        "Steps to reach are interpolated linearly between evaluation points.", "",
        "## The paper's claims", "",
    ]
    lines += markdown_table(["claim", "verdict", "evidence"], [list(v) for v in claim_verdicts(c)])
    lines += ["", "## Main comparison", ""]
    if c.study.ar:
        show = [s for s in main_steps if s in (main_steps[0], b.short_ar_steps, main_steps[len(main_steps) // 2], main_steps[-1])]
        base = c.curves(BASELINE)[1]
        target = aggregate([v[-1] for v in base]).mean if base else None
        rows = []
        for m in MAIN_METHODS:
            hits = c.reach(m.name, target) if target is not None else []
            final = c.fid_at(m.name, main_steps[-1])
            rows.append([m.name, str(final.n) if final else "-", m.tokenizer, fmt_spread(c.tokenizer(m.tokenizer, "rfid")),
                         fmt_spread(c.tokenizer(m.tokenizer, "codebook_perplexity"), 1),
                         *[fmt_spread(c.fid_at(m.name, s)) for s in show],
                         fmt_spread(c.fid_at(m.name, main_steps[-1], "precision"), 3),
                         fmt_spread(c.fid_at(m.name, main_steps[-1], "recall"), 3),
                         ", ".join(fmt(h, 0) if h is not None else "-" for h in hits) or "-"])
        lines += markdown_table(["method", "seeds", "tokenizer", "rFID", "perplexity", *[f"FID @ {s}" for s in show], "precision",
                                 "recall", f"steps to {BASELINE} final (per seed)"], rows)
        conv = [f"{m} {convergence_text(*converged(*c.mean_curve(m)))}" for m in ("LlamaGen-REPA", BASELINE, "GEAR")
                if c.curves(m)[1]]
        lines += ["", f"Convergence criterion: the seed-mean FID falls by less than {100 * CONVERGED_DROP:g}% over the "
                  f"last quarter of the AR budget. Holds: {', '.join(conv) or '-'}.", ""]
        lines += ["## Controls", "", f"FID at AR step {b.ar_steps}, mean ± half the seed range (seeds); a difference is "
                  "called outside the seed spread when the two ranges do not overlap.", ""]
        lines += markdown_table(["comparison", "what it isolates", "control", "compared with", "difference", "verdict"],
                                control_lines(c)) + [""]
    if c.study.long_joint:
        lines += ["## STE: the codebook over joint training", ""]
        warm = c.tokenizer("warm-up", "codebook_perplexity")
        rows = [[k, fmt(r['tokenizer']['codebook_usage'], 3), fmt(r['tokenizer']['codebook_perplexity'], 1),
                 fmt(r['tokenizer']['codebook_perplexity'] / warm.mean) if warm else "-", fmt(r['tokenizer']['rfid'])]
                for k, j in c.study.long_joint.items() if (r := c.result(j)) is not None]
        lines += markdown_table(["joint run", "usage", "perplexity", "perplexity / warm-up's", "rFID"], rows) + [
            "", f"After {b.long_joint_steps} joint steps from the warm-up (seed {b.seeds[0]}); the figure shows the training-batch "
            "statistics along the way. 'lr x4' raises optim.lr (tokenizer and joint AR); 'NTP weight x4' sets "
            "train.ste_ntp_weight=4 (the NTP loss in the tokenizer update).", ""]
    if c.study.ablations:
        lines += [f"## Ablations (seed {b.seeds[0]} only: no spread)", ""]
        rows = []
        for label, (tok, ar) in c.study.ablations.items():
            t, a = c.result(tok), c.result(ar)
            rows.append([label, *(fmt(t["tokenizer"][k], d) if t else "-" for k, d in (("rfid", 2), ("codebook_usage", 3),
                                                                                       ("codebook_perplexity", 1))),
                         fmt(point_at(a, b.short_ar_steps))])
        noise = short_run_noise(c)
        lines += markdown_table(["joint setting", "rFID", "usage", "perplexity", f"AR FID @ {b.short_ar_steps}"], rows) + [
            "", f"AR FID differences within ±{noise:.2f} (the main comparison's seed spread at step {b.short_ar_steps}) "
            "are noise." if noise is not None else "One seed: no spread to judge AR FID differences by.", ""]
    if c.study.families:
        lines += [f"## Tokenizer families (seed {b.seeds[0]})", ""]
        rows = []
        for (family, method), (tok, ar) in c.study.families.items():
            t, a = c.result(tok), c.result(ar)
            rows.append([family, method, fmt(t["tokenizer"]["rfid"]) if t else "-", fmt(point_at(a, b.short_ar_steps))])
        lines += markdown_table(["family", "method", "rFID", f"AR FID @ {b.short_ar_steps}"], rows) + [""]
    if c.study.repa:
        lines += [f"## The REPA set-up of LlamaGen-REPA (warm-up tokenizer, seed {b.seeds[0]})", ""]
        rows = [[label, fmt(point_at(c.result(j), b.short_ar_steps))] for label, j in c.study.repa.items()]
        lines += markdown_table(["alignment", f"AR FID @ {b.short_ar_steps}"], rows) + [
            "", "Default teacher: EfficientNet-Lite0's stride-16 stage (112-d) on a 16 x grid px input (128 px); the "
            "stride-8 variant takes the stride-8 stage (40-d) on 64 px. Each variant changes one setting.", "",
            repa_summary(c), ""]
    lines += ["## Figures", "", *[f"![{f}]({f})" for f in figures], ""]
    if grids:
        lines += [f"## Samples (seed {b.seeds[0]}, final AR, one row per class)", ""]
        lines += [f"**{m}**\n\n![{m}]({g})\n" for m, g in grids.items()]
    rows, seconds, commits = job_lines(c)
    lines += ["## Jobs: time and code", "", f"Jobs done: {len(rows)} of {len(c.study.jobs)}; their wall time adds up to "
              f"{seconds / 3600:.2f} h (two processes overlap; a continued AR run counts every piece). Commits: "
              + ", ".join(f"{k} ({v} jobs)" for k, v in commits.items()) + ". 'source' is the library's source "
              "fingerprint (benchmarks/study.py: source_fingerprint) the job ran on; a job is reused across commits "
              "only while its probe (benchmarks/study_probe.py) computes the same numbers. A piece of a run killed "
              "outright (SIGKILL) is not in its minutes.", ""]
    lines += markdown_table(["job", "seed", "kind", "steps", "minutes", "commit", "source"], rows) + [""]
    report_dir.mkdir(parents=True, exist_ok=True)
    path = report_dir / "REPORT.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def make_figures(c: Collected, report_dir: Path) -> list[str]:
    made = []
    curves = {m.name: c.curves(m.name) for m in MAIN_METHODS}
    path = plots.fid_curves({k: v for k, v in curves.items() if v[1]}, report_dir / "fid_vs_steps.png",
                            "FID (classifier features)", "FID during AR training (band: seed range)")
    made.append(path)
    # the long joint runs when there are any (their first steps are the short runs'), and seed 0's tokenizer+
    seed0 = c.study.budget.seeds[0]
    long_runs = {f"{k} ({c.study.budget.long_joint_steps} steps)": (c.cache.run_dir(j), 0)
                 for k, j in c.study.long_joint.items() if c.result(j) is not None}
    shown = ("tokenizer+",) if long_runs else ("tokenizer+", "GEAR", "STE")
    runs = {f"{k} s{s}": (c.cache.run_dir(j), 0) for (k, s), j in c.study.tokenizers.items()
            if k in shown and s == seed0 and c.result(j) is not None} | long_runs
    made.append(plots.codebook_over_training(runs, report_dir / "codebook_vs_joint_steps.png",
                                             xlabel="joint (or tokenizer+) steps after the warm-up"))
    return [p.name for p in made if p is not None]
