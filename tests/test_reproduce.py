"""benchmarks/reproduce.py: its pure helpers and the report (fast), and the whole --quick pipeline (slow)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import re
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
reproduce = importlib.import_module("reproduce")
plots = importlib.import_module("plots")

NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?|nan|inf", re.IGNORECASE)


def results_table(report: str) -> tuple[list[str], dict[str, list[str]]]:
    """The header and the rows (method -> cells) of the table under '## Results'."""
    section = report.split("## Results", 1)[1]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        if not line.startswith("| "):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != len(header):
            break
        rows[cells[0]] = cells
    return header, rows


def numbers(cell: str) -> list[float]:
    return [float(x) for x in NUMBER.findall(cell)]


# ---------------------------------------------------------------------------- helpers


def test_eval_steps_are_even_and_end_at_the_budget():
    assert reproduce.eval_steps(600, 4) == [150, 300, 450, 600]
    steps = reproduce.eval_steps(10, 3)
    assert len(steps) == 3 and steps[-1] == 10 and steps == sorted(set(steps))
    assert reproduce.eval_steps(5, 5) == [1, 2, 3, 4, 5]
    for total, points in ((0, 1), (10, 0), (3, 4)):
        with pytest.raises(ValueError):
            reproduce.eval_steps(total, points)


def test_aggregate_and_the_seed_noise_rule():
    s = reproduce.aggregate([3.0, 5.0])
    assert (s.mean, s.lo, s.hi, s.n, s.half_range) == (4.0, 3.0, 5.0, 2, 1.0)
    with pytest.raises(ValueError):
        reproduce.aggregate([])
    a, b = reproduce.aggregate([10.0, 12.0]), reproduce.aggregate([11.5, 14.0])
    assert reproduce.compare_lower_better(a, b) == "within seed noise"  # ranges overlap
    c = reproduce.aggregate([20.0, 21.0])
    assert reproduce.compare_lower_better(a, c) == "lower"
    assert reproduce.compare_lower_better(c, a) == "higher"
    one = reproduce.aggregate([1.0])
    assert "one seed" in reproduce.compare_lower_better(one, c)


def test_steps_to_reach_the_first_step_at_or_below_the_target():
    steps = [100, 200, 300]
    assert reproduce.steps_to_reach(steps, [30.0, 20.0, 10.0], 20.0) == 200
    assert reproduce.steps_to_reach(steps, [30.0, 20.0, 10.0], 35.0) == 100
    assert reproduce.steps_to_reach(steps, [30.0, 20.0, 10.0], 5.0) is None
    assert reproduce.steps_to_reach(steps, [9.0, 20.0, 10.0], 10.0) == 100  # the first hit, even if it goes back up
    with pytest.raises(ValueError):
        reproduce.steps_to_reach(steps, [1.0], 1.0)


def test_collapse_rule():
    assert reproduce.collapsed(10.0, 100.0)
    assert not reproduce.collapsed(80.0, 100.0)
    assert reproduce.collapsed(80.0, 100.0, factor=0.9)


def test_budget_checks_and_command_line():
    with pytest.raises(ValueError, match="eval-points"):
        reproduce.Budget(ar_steps=3, eval_points=4)
    with pytest.raises(ValueError, match="seeds"):
        reproduce.Budget(seeds=(0, 0))
    with pytest.raises(ValueError, match="ar-steps"):
        reproduce.Budget(ar_steps=0)
    parser = reproduce.build_parser()
    assert reproduce.budget_from_args(parser.parse_args([])) == reproduce.Budget()
    quick = reproduce.budget_from_args(parser.parse_args(["--quick", "--ar-steps", "20", "--seeds", "3,4"]))
    assert quick == dataclasses.replace(reproduce.QUICK, ar_steps=20, seeds=(3, 4))
    assert reproduce.QUICK.ar_steps < reproduce.Budget().ar_steps and reproduce.QUICK.fid_samples < reproduce.Budget().fid_samples
    with pytest.raises(ValueError):
        reproduce.budget_from_args(parser.parse_args(["--eval-points", "0"]))


# ---------------------------------------------------------------------------- the report from made-up results


def synthetic_results(tmp_path: Path):
    r = reproduce
    budget = r.Budget(warmup_steps=5, joint_steps=3, ar_steps=40, eval_points=4, seeds=(0, 1), fid_samples=20,
                      recon_samples=20)
    res = r.Results(budget, "python benchmarks/reproduce.py", "2026-01-01 00:00 UTC", "CPU", classifier_accuracy=0.9)
    res.tokenizers["warm-up"] = r.TokenizerEval(str(tmp_path), 5.0, 25.0, 0.8, 0.9, 300.0)
    for seed in (0, 1):
        res.tokenizers[f"GEAR s{seed}"] = r.TokenizerEval(str(tmp_path), 4.0 + seed, 25.0, 0.8, 0.95, 320.0 + seed)
        res.tokenizers[f"STE s{seed}"] = r.TokenizerEval(str(tmp_path), 30.0, 15.0, 0.5, 0.02, 4.0 + seed)
    # FID falls with steps; GEAR starts lower than the baselines, STE stays high
    offset = {"LlamaGen": 40.0, "LlamaGen-REPA": 30.0, "GEAR": 5.0, "STE": 90.0}
    for seed in (0, 1):
        for m in r.METHODS:
            tok = "warm-up" if m.joint_mode is None else f"{m.name} s{seed}"
            run = r.ARRun(m.name, seed, str(tmp_path), tok)
            for step in r.eval_steps(budget.ar_steps, budget.eval_points):
                fid = offset[m.name] + 400.0 / step + 0.5 * seed
                run.points.append(r.EvalPoint(step, fid, 0.5, 0.4 + 0.01 * seed, 0.7))
            res.runs.append(run)
    res.timing["AR, NTP only"] = r.StageTime(80, 40.0, 50.0)
    return res


def test_report_has_a_row_per_method_and_states_the_findings(tmp_path):
    res = synthetic_results(tmp_path)
    text = reproduce.write_report(res, tmp_path).read_text()
    header, rows = results_table(text)
    assert set(rows) == {m.name for m in reproduce.METHODS}
    fid_cols = [i for i, h in enumerate(header) if h.startswith("FID @")]
    assert [h for h in header if h.startswith("FID @")] == ["FID @ 10", "FID @ 20", "FID @ 30", "FID @ 40"]
    for name, cells in rows.items():
        values = [v for i in fid_cols for v in numbers(cells[i])]
        assert len(values) == 8 and all(math.isfinite(v) for v in values)  # mean and half-range per step
        run_final = [run.points[-1].fid for run in res.runs if run.method == name]
        assert numbers(cells[fid_cols[-1]])[0] == pytest.approx(sum(run_final) / 2, abs=0.01)
    reach = header.index(f"steps to FID ≤ {reproduce.BASELINE} final")
    base_final = 30.0 + 10.0 + 0.25
    gear_hit = next(s for s in (10, 20, 30, 40) if 5.0 + 400.0 / s + 0.25 <= base_final)
    assert rows["GEAR"][reach] == str(gear_hit)
    assert rows["LlamaGen"][reach] == "> 40" and rows[reproduce.BASELINE][reach] == "40"
    assert "GEAR lower" in text and "STE collapses the codebook" in text
    assert "python benchmarks/reproduce.py" in text and "2026-01-01" in text and "batch 32" in text


def test_report_says_within_seed_noise_when_the_ranges_overlap(tmp_path):
    res = synthetic_results(tmp_path)
    for run in res.runs:
        if run.method == "GEAR":  # move GEAR onto the baseline, inside its seed range
            for p in run.points:
                p.fid = 30.0 + 400.0 / p.step + 0.5 * (1 - run.seed)
    text = reproduce.write_report(res, tmp_path).read_text()
    finding = next(line for line in text.splitlines() if "GEAR vs" in line)
    assert finding.count("within seed noise") == 4 and "GEAR lower" not in finding


def test_codebook_metrics_are_read_from_a_run_log(tmp_path):
    rows = [{"step": 10, "codebook/usage_window": 0.5, "codebook/perplexity": 100.0}, {"step": 20, "tok/l1": 0.1},
            {"step": 30, "codebook/usage_window": 0.25, "codebook/perplexity": 40.0}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    series = plots.read_metrics(tmp_path, ("codebook/usage_window", "codebook/perplexity"))
    assert series["codebook/usage_window"] == ([10, 30], [0.5, 0.25])
    assert series["codebook/perplexity"] == ([10, 30], [100.0, 40.0])


# ---------------------------------------------------------------------------- the whole pipeline, --quick


def _fashion_mnist_installed() -> bool:
    from gear.data.fashion_mnist import resolve_root

    return (resolve_root() / "train-images-idx3-ubyte.gz").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not _fashion_mnist_installed(), reason="Fashion-MNIST idx files not installed")
def test_quick_pipeline_writes_a_report_with_finite_numbers(tmp_path):
    # one thread: on shared cores a second one can make every step several times slower
    report = reproduce.main(["--quick", "--threads", "1", "--runs-dir", str(tmp_path / "runs"),
                             "--report-dir", str(tmp_path / "results")])
    text = report.read_text()
    header, rows = results_table(text)
    assert set(rows) == {m.name for m in reproduce.METHODS}
    numeric = [i for i, h in enumerate(header) if h.startswith("FID @") or h in ("rFID", "codebook usage", "perplexity")]
    assert len(numeric) == 3 + reproduce.QUICK.eval_points
    for cells in rows.values():
        values = [v for i in numeric for v in numbers(cells[i])]
        assert values and all(math.isfinite(v) for v in values), cells
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    assert len(results["runs"]) == len(reproduce.METHODS) * len(reproduce.QUICK.seeds)
    for method in rows:
        assert (tmp_path / "results" / f"samples_{reproduce.slug(method)}.png").is_file()
    if plots.have_matplotlib():
        assert (tmp_path / "results" / "fid_vs_steps.png").is_file()
        assert (tmp_path / "results" / "codebook_usage.png").is_file()
