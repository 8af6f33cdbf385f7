"""benchmarks/reproduce.py: its statistics, the job keys and result cache, the claims report (fast), and the
whole --quick study, interrupted and continued (slow)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
reproduce = importlib.import_module("reproduce")
study = importlib.import_module("study")
study_report = importlib.import_module("study_report")
plots = importlib.import_module("plots")

SMALL = study.Budget(warmup_steps=5, joint_steps=3, ar_steps=40, dense_until=20, dense_every=10, sparse_every=20,
                         short_ar_steps=20, long_joint_steps=6, seeds=(0, 1, 2), control_seeds=2, fid_samples=20,
                         recon_samples=20)


# ---------------------------------------------------------------------------- statistics


def test_eval_schedule_is_dense_then_sparse_and_ends_at_the_budget():
    assert study.eval_schedule(2000, 1000, 50, 250)[:3] == (50, 100, 150)
    s = study.eval_schedule(2000, 1000, 50, 250)
    assert s[19] == 1000 and s[20:] == (1250, 1500, 1750, 2000)
    assert study.eval_schedule(110, 100, 50, 40) == (50, 100, 110)  # the budget is always evaluated
    assert study.eval_schedule(30, 100, 10, 50) == (10, 20, 30)
    with pytest.raises(ValueError):
        study.eval_schedule(0, 10, 5, 5)


def test_aggregate_and_the_seed_noise_rule():
    s = study_report.aggregate([3.0, 5.0])
    assert (s.mean, s.lo, s.hi, s.n, s.half_range) == (4.0, 3.0, 5.0, 2, 1.0)
    with pytest.raises(ValueError):
        study_report.aggregate([])
    a, b = study_report.aggregate([10.0, 12.0]), study_report.aggregate([11.5, 14.0])
    assert study_report.compare_lower_better(a, b) == "within seed noise"
    c = study_report.aggregate([20.0, 21.0])
    assert study_report.compare_lower_better(a, c) == "lower" and study_report.compare_lower_better(c, a) == "higher"
    assert "one seed" in study_report.compare_lower_better(study_report.aggregate([1.0]), c)


def test_steps_to_reach_interpolates_between_evaluations():
    steps = [100, 200, 300]
    assert study_report.steps_to_reach(steps, [30.0, 20.0, 10.0], 20.0) == 200
    assert study_report.steps_to_reach(steps, [30.0, 20.0, 10.0], 25.0) == pytest.approx(150.0)
    assert study_report.steps_to_reach(steps, [30.0, 20.0, 10.0], 12.0) == pytest.approx(280.0)
    assert study_report.steps_to_reach(steps, [30.0, 20.0, 10.0], 35.0) == 100  # already there at the first point
    assert study_report.steps_to_reach(steps, [30.0, 20.0, 10.0], 5.0) is None
    assert study_report.steps_to_reach(steps, [30.0, 9.0, 10.0], 10.0) == pytest.approx(100 + 100 * 20 / 21)  # first crossing
    with pytest.raises(ValueError):
        study_report.steps_to_reach(steps, [1.0], 1.0)


def test_convergence_criterion_reads_the_last_quarter():
    flat, drop = study_report.converged([100, 200, 300, 400], [300.0, 100.0, 51.0, 50.0])
    assert flat and drop == pytest.approx(1 / 51)
    steep, drop = study_report.converged([100, 200, 300, 400], [300.0, 200.0, 100.0, 50.0])
    assert not steep and drop == pytest.approx(0.5)
    _, drop = study_report.converged([200, 400], [100.0, 50.0])  # 3/4 of 400 = 300: interpolated to 75
    assert drop == pytest.approx(1 / 3)
    unknown, drop = study_report.converged([350, 400], [100.0, 99.0])  # nothing measured at 300: no verdict
    assert unknown is None and math.isnan(drop)


def test_budget_checks_presets_and_command_line():
    with pytest.raises(ValueError, match="short-ar-steps"):
        study.Budget(ar_steps=10, short_ar_steps=20)
    with pytest.raises(ValueError, match="seeds"):
        study.Budget(seeds=(0, 0))
    with pytest.raises(ValueError, match="control-seeds"):
        study.Budget(seeds=(0, 1), control_seeds=3)
    parser = reproduce.build_parser()
    assert reproduce.budget_from_args(parser.parse_args([])) == study.PRESETS["cpu"]
    assert reproduce.budget_from_args(parser.parse_args(["--device", "cuda"])) == study.PRESETS["gpu"]
    quick = reproduce.budget_from_args(parser.parse_args(["--quick", "--ar-steps", "20", "--seeds", "3,4"]))
    assert quick == dataclasses.replace(study.PRESETS["quick"], ar_steps=20, seeds=(3, 4))
    assert len(study.PRESETS["cpu"].seeds) >= 3
    assert reproduce.parse_parts("main, ste") == ("main", "ste")
    with pytest.raises(ValueError, match="--parts"):
        reproduce.parse_parts("main,everything")


# ---------------------------------------------------------------------------- jobs and the result cache


def test_the_study_gives_every_ar_an_equally_trained_tokenizer():
    st = study.build_study(SMALL, study.PARTS)
    assert len(st.jobs) == len(set(st.jobs))
    for (method, seed), job in st.ar.items():
        tok = job.init
        updates = tok.steps + (tok.init.steps if tok.init else 0)
        expected = SMALL.warmup_steps if method in ("LlamaGen", "LlamaGen-REPA") else SMALL.warmup_steps + SMALL.joint_steps
        assert updates == expected, method
        assert job.steps == SMALL.ar_steps and job.evals[-1] == SMALL.ar_steps and SMALL.short_ar_steps in job.evals
    assert {s for (_, s) in st.ar} == set(SMALL.seeds)
    # shorter runs of a main setting reuse the main run rather than train it again
    assert st.repa["no alignment (LlamaGen)"] is st.ar[("LlamaGen", 0)]
    assert st.ablations["T=0.1"][1] is st.ar[("GEAR", 0)] and st.ablations["lambda_tok=0"][1] is st.ar[("GEAR lambda_tok=0", 0)]
    only_repa = study.build_study(SMALL, ("repa",))
    assert all(j.steps == SMALL.short_ar_steps for j in only_repa.repa.values())


def test_the_controls_extra_seeds_run_last():
    st = study.build_study(SMALL, study.PARTS)
    later = [st.ar[(m, s)] for (m, s) in st.ar if m in ("LlamaGen+", "GEAR lambda_tok=0", "STE") and s != SMALL.seeds[0]]
    later += [st.tokenizers[(t, s)] for (t, s) in st.tokenizers if t in ("GEAR lambda_tok=0", "STE") and s != SMALL.seeds[0]]
    assert later and set(st.jobs[-len(later):]) == set(later)
    first = st.jobs[: len(st.jobs) - len(later)]
    assert st.ar[("GEAR", SMALL.seeds[-1])] in first and st.long_joint["STE"] in first and st.repa
    assert all(job.init is None or st.jobs.index(job.init) < st.jobs.index(job) for job in st.jobs)


def same(job):
    return "b"


def test_job_keys_follow_what_a_job_computes():
    st = study.build_study(SMALL, ("main",))
    gear = st.ar[("GEAR", 0)]
    key = study.job_key(gear, SMALL, [], same)
    assert study.job_key(gear, SMALL, [], same) == key
    changed = [
        study.job_key(dataclasses.replace(gear, overrides=("align.lambda_ar=0.25",)), SMALL, [], same),
        study.job_key(dataclasses.replace(gear, seed=7), SMALL, [], same),
        study.job_key(gear, SMALL, ["optim.lr=1e-3"], same),
        study.job_key(gear, dataclasses.replace(SMALL, fid_samples=30), [], same),
        study.job_key(dataclasses.replace(gear, init=dataclasses.replace(gear.init, steps=4)), SMALL, [], same),  # its tokenizer
    ]
    assert key not in changed and len(set(changed)) == len(changed)
    # an AR run is a prefix of a longer one: its length and evaluations are not part of its key (a tokenizer's are)
    longer = dataclasses.replace(gear, steps=80, evals=(10, 40, 80))
    assert study.job_key(longer, dataclasses.replace(SMALL, ar_steps=80), [], same) == key
    assert study.job_key(dataclasses.replace(gear.init, steps=9), SMALL, [], same) != study.job_key(gear.init, SMALL, [], same)
    # where runs are written is not part of what they compute
    paths = study.resolved_config(gear, SMALL, [], out_dir="/a", init_dir="/b", store="/c")
    assert paths.train.out_dir == "/a" and paths.model.tokenizer_init == "/b" and paths.data.code_store == "/c"


def test_job_keys_follow_the_codes_behaviour_and_not_new_default_fields():
    st = study.build_study(SMALL, ("main",))
    gear, plus = st.ar[("GEAR", 0)], st.ar[("LlamaGen-REPA+", 0)]
    joint = gear.init

    def changed_joint(job):  # the code now computes something else for the GEAR joint stage only
        return "new" if job == joint else "b"

    assert study.job_key(gear, SMALL, [], changed_joint) != study.job_key(gear, SMALL, [], same)  # and the AR on it
    assert study.job_key(joint, SMALL, [], changed_joint) != study.job_key(joint, SMALL, [], same)
    assert study.job_key(plus, SMALL, [], changed_joint) == study.job_key(plus, SMALL, [], same)
    # the config part is what departs from the defaults: a field the code gains, at its default, changes nothing
    delta = study.config_delta(gear, SMALL, [])
    assert delta["train"]["stage"] == "ar" and "grad_checkpointing" not in delta["train"]
    assert "out_dir" not in delta["train"] and "steps" not in delta["train"]
    tree = {"train": {"stage": "ar", "seed": 0, "new_field": 1.0}, "align": {"tap_layer": 2}}
    defaults = {"train": {"stage": "joint", "seed": 0, "new_field": 1.0}, "align": {"tap_layer": 2}}
    assert study.departures(tree, defaults) == {"train": {"stage": "ar"}}
    assert study.departures({"train": {"seed": 3}}, defaults) == {"train": {"seed": 3}}


def test_ar_runs_on_bitwise_equal_tokenizers_are_one_job(tmp_path):
    import torch

    from gear.models.autoencoder import build_tokenizer

    st = study.build_study(SMALL, ("main",))
    lt0, plus = st.ar[("GEAR lambda_tok=0", 0)], st.ar[("LlamaGen-REPA+", 0)]
    assert lt0.overrides == plus.overrides and lt0.init != plus.init
    assert study.job_key(lt0, SMALL, [], same) != study.job_key(plus, SMALL, [], same)  # tokenizers not trained yet
    assert study.job_key(lt0, SMALL, [], same, "w") == study.job_key(plus, SMALL, [], same, "w")
    assert study.job_key(lt0, SMALL, [], same, "w") != study.job_key(lt0, SMALL, [], same, "v")
    # the digest reads the weights bit for bit, not where they are kept
    torch.manual_seed(0)
    tok = build_tokenizer("vq-tiny", base_channels=16, z_channels=32, norm_groups=8)
    tok.save_pretrained(tmp_path / "a")
    tok.save_pretrained(tmp_path / "b")
    assert study.tokenizer_digest(tmp_path / "a") == study.tokenizer_digest(tmp_path / "b")
    with torch.no_grad():
        next(tok.parameters()).view(-1)[0] += 1e-6
    tok.save_pretrained(tmp_path / "c")
    assert study.tokenizer_digest(tmp_path / "c") != study.tokenizer_digest(tmp_path / "a")
    # in the cache: once both tokenizers are trained and equal, the two AR jobs share one run and its result
    cache = study.ResultCache(tmp_path / "cache", SMALL, [], same)
    cache.dir(lt0)  # its tokenizer is not trained: a provisional key, under which nothing is named
    named = [f.read_text() for f in (tmp_path / "cache" / "jobs" / ".keys").glob("*")]
    assert named and not [n for n in named if n.startswith("gear-lambda-tok0-ar")]  # its tokenizer's are named
    for job in (lt0.init.init, plus.init, lt0.init):
        cache.save_result(job, {"tokenizer": {}, "tokenizer_weights": "equal" if job.init else "warm"})
    assert cache.same_run(lt0, plus)
    cache.save_result(plus, {"points": [{"step": s, "fid": 2.0} for s in plus.evals]})
    assert cache.result(lt0)["points"][0]["fid"] == 2.0
    # a second process asks for the other job first: one directory all the same, named once in jobs/.keys/
    second = study.ResultCache(tmp_path / "cache", SMALL, [], same)
    assert second.dir(lt0) == cache.dir(plus) == cache.dir(lt0) and second.dir(lt0).name.startswith("llamagen-repa-plus")
    third = study.ResultCache(tmp_path / "fresh", SMALL, [], same)
    fourth = study.ResultCache(tmp_path / "fresh", SMALL, [], same)
    for c in (third, fourth):
        for job in (lt0.init.init, plus.init, lt0.init):
            if c is third:
                c.save_result(job, {"tokenizer": {}, "tokenizer_weights": "equal" if job.init else "warm"})
    assert third.dir(lt0) == fourth.dir(plus) and third.dir(lt0).name.startswith("gear-lambda-tok0")
    other = study.ResultCache(tmp_path / "cache2", SMALL, [], same)
    for job in (lt0.init.init, plus.init, lt0.init):
        other.save_result(job, {"tokenizer": {}, "tokenizer_weights": f"{job.name}" if job.init else "warm"})
    assert not other.same_run(lt0, plus)
    # the plan counts one run once: equal tokenizers save the second AR run's steps and evaluations
    part = study.Study(SMALL, ("main",), jobs=[lt0.init.init, plus.init, lt0.init, plus, lt0])
    one_ar = SMALL.ar_steps * study.COSTS["ar-repa"] + len(plus.evals) * study.COSTS["fid"] + study.COSTS["setup"]
    fresh = study.ResultCache(tmp_path / "cache3", SMALL, [], same)
    for job in (lt0.init.init, plus.init, lt0.init):
        fresh.save_result(job, {"tokenizer": {}, "tokenizer_weights": "equal" if job.init else "warm"})
    assert study.estimate_seconds(part, other) - study.estimate_seconds(part, fresh) == pytest.approx(one_ar + study.COSTS["extract"])


def test_the_source_fingerprint_reads_code_not_comments_or_docstrings(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "m.py").write_text('"""Doc."""\n\ndef f(x):\n    """Twice."""\n    return 2 * x  # comment\n')
    before = study.source_fingerprint([pkg])
    (pkg / "m.py").write_text('"""Another doc."""\n\n\ndef f(x):\n    # a new comment\n    return 2 * x\n')
    assert study.source_fingerprint([pkg]) == before
    (pkg / "m.py").write_text('def f(x):\n    return 3 * x\n')
    assert study.source_fingerprint([pkg]) != before
    assert study.code_version().split("+")[0] != "unknown"


def test_the_cache_keeps_results_progress_and_locks(tmp_path):
    cache = study.ResultCache(tmp_path, SMALL, [], same)
    job = study.build_study(SMALL, ("main",)).ar[("GEAR", 1)]
    assert cache.result(job) is None and cache.progress(job) == []
    cache.save_progress(job, [{"step": 10, "fid": 50.0}])
    assert cache.progress(job) == [{"step": 10, "fid": 50.0}] and cache.result(job) is None
    cache.save_result(job, {"points": [{"step": s, "fid": 50.0 - s} for s in job.evals]})
    assert study.ResultCache(tmp_path, SMALL, [], same).result(job)["points"][0]["fid"] == 40.0  # a new process sees it
    longer = dataclasses.replace(job, steps=2 * job.steps, evals=(*job.evals, 2 * job.steps))
    assert cache.dir(longer) == cache.dir(job) and cache.result(longer) is None  # a larger budget continues the run
    shorter = dataclasses.replace(job, steps=job.evals[1], evals=job.evals[:2])  # reads the points of its schedule
    assert [p["step"] for p in cache.result(shorter)["points"]] == list(job.evals[:2])
    assert cache.dir(job).name.startswith("gear-ar-s1-")
    assert study.ResultCache(tmp_path, SMALL, ["optim.lr=1e-3"], same).result(job) is None  # other settings, other key

    assert cache.claim(job) and cache.claim(job)  # this process holds it
    cache.release(job)
    (cache.dir(job) / "lock").write_text("1")  # pid 1 is alive: another process works on the job
    assert not cache.claim(job)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (cache.dir(job) / "lock").write_text(str(dead.pid))  # a process that died: its lock is stale
    assert cache.claim(job)


def test_the_plan_estimate_counts_only_what_a_continued_run_has_left(tmp_path):
    st = study.build_study(SMALL, ("main",))
    cache = study.ResultCache(tmp_path, SMALL, [], same)
    fresh = study.estimate_seconds(st, cache)
    job = st.ar[("GEAR", 0)]
    cache.save_progress(job, [{"step": s, "fid": 1.0} for s in job.evals if s <= SMALL.ar_steps // 2])
    left = sum(s > SMALL.ar_steps // 2 for s in job.evals)
    saved = (SMALL.ar_steps // 2) * study.COSTS["ar-repa"] + (len(job.evals) - left) * study.COSTS["fid"]
    assert study.estimate_seconds(st, cache) == pytest.approx(fresh - saved)


class RecordingRunner(reproduce.Runner):
    """Runs nothing: records the order and writes a result, as a finished job would."""

    def __init__(self, cache):
        super().__init__(cache.budget, cache, None, "cpu", lambda message: None)
        self.order = []

    def run(self, job):
        assert job.init is None or self.cache.result(job.init) is not None, "a job ran before its tokenizer"
        self.order.append(job)
        self.cache.save_result(job, {"points": [{"step": s, "fid": 1.0} for s in job.evals],
                                     **({} if job.kind == "ar" else {"tokenizer_weights": f"{job.name}-{job.seed}"})})


def test_a_job_records_every_piece_and_every_commit_it_ran_on(tmp_path):
    st = study.build_study(SMALL, ("main",))
    cache = study.ResultCache(tmp_path, SMALL, [], same)
    job = st.tokenizers[("warm-up", 0)]

    class Stub(reproduce.Runner):
        calls = 0

        def _run_tokenizer(self, job):
            Stub.calls += 1
            if Stub.calls == 1:
                raise KeyboardInterrupt  # the first piece is stopped
            return {"tokenizer": {}, "tokenizer_weights": "w",
                    "points": [{"step": 1, "code": "old", "source": ""}, {"step": 2, "code": "", "source": "s0"}]}

    runner = Stub(SMALL, cache, None, "cpu", lambda m: None, code={"commit": "new", "source": "s1"})
    with pytest.raises(KeyboardInterrupt):
        runner.run(job)
    runner.run(job)
    result = cache.result(job)
    assert len(cache.pieces(job)) == 2 and result["wall_seconds"] == pytest.approx(sum(cache.pieces(job)))
    assert result["code"] == ["new", "old"] and result["source"] == ["s0", "s1"]


def test_a_continued_study_runs_only_what_is_missing_and_leaves_held_jobs(tmp_path):
    st = study.build_study(SMALL, ("main",))
    cache = study.ResultCache(tmp_path, SMALL, [], same)
    first = RecordingRunner(cache)
    first.run_all(st.jobs[:5])
    assert first.order == st.jobs[:5]
    held = st.jobs[6]
    cache.dir(held).mkdir(parents=True)
    (cache.dir(held) / "lock").write_text("1")  # another live process is on it
    second = RecordingRunner(cache)
    second.run_all(st.jobs, wait=False)
    assert held not in second.order and not set(second.order) & set(st.jobs[:5])
    assert set(second.order) == set(st.jobs) - set(st.jobs[:5]) - {held}
    (cache.dir(held) / "lock").unlink()
    third = RecordingRunner(cache)
    third.run_all(st.jobs)
    assert third.order == [held]


# ---------------------------------------------------------------------------- the report from made-up results


def synthetic_cache(tmp_path, gear_offset=5.0, ste_perplexity=4.0, lt0_equal=False):
    """Results for every job of SMALL: FID falls with steps, GEAR below the baselines by ``gear_offset``;
    ``lt0_equal``: the lambda_tok=0 tokenizers are bitwise tokenizer+'s (so its AR runs are the baseline's)."""
    st = study.build_study(SMALL, study.PARTS)
    cache = study.ResultCache(tmp_path, SMALL, [], same)
    offsets = {"LlamaGen": 40.0, "LlamaGen-REPA": 30.0, "LlamaGen+": 38.0, "LlamaGen-REPA+": 28.0,
               "GEAR": 28.0 - gear_offset, "GEAR lambda_tok=0": 27.0, "STE": 90.0}
    for job in st.jobs:
        if job.kind == "ar":
            if cache.result(job) is not None:
                continue  # one run of two jobs (bitwise-equal tokenizers)
            method = next((m for (m, s), j in st.ar.items() if j is job), "GEAR")
            pts = [{"step": s, "fid": offsets[method] + 400.0 / s + 0.2 * job.seed, "precision": 0.5, "recall": 0.4,
                    "class_accuracy": 0.7} for s in job.evals]
            cache.save_result(job, {"points": pts, "wall_seconds": 10.0})
        else:
            ste = "train.joint_mode=ste" in job.overrides
            tok = {"rfid": 4.0 + 0.1 * job.seed if "gear" in job.name else 5.0, "psnr": 20.0, "ssim": 0.7,
                   "codebook_usage": 0.1 if ste else 1.0, "codebook_perplexity": ste_perplexity if ste else 400.0}
            name = "tokenizer-plus" if lt0_equal and job.name == "gear-lt0-joint" else job.name
            cache.save_result(job, {"tokenizer": tok, "wall_seconds": 10.0, "tokenizer_weights": f"{name}-{job.seed}"})
    return st, cache


def claims_table(text):
    section = text.split("## The paper's claims", 1)[1].split("##", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    return {r[0].strip(): r[1].strip() for r in rows[1:]}


def test_report_states_a_verdict_per_claim(tmp_path):
    st, cache = synthetic_cache(tmp_path)
    c = study_report.collect(st, cache)
    assert c.complete
    text = study_report.write_report(c, tmp_path / "out", "python benchmarks/reproduce.py", "CPU", ["fid_vs_steps.png"], {}).read_text()
    verdicts = claims_table(text)
    assert len(verdicts) == 5 and "PARTIAL" not in text
    assert verdicts["STE collapses the codebook"] == "reproduced"
    assert verdicts[f"GEAR beats {study.BASELINE} at equal AR steps (FID)"] == "reproduced"
    assert verdicts["Reconstruction kept or improved (rFID, GEAR vs tokenizer+)"] == "reproduced"
    # GEAR's curve 23 + 400/s + 0.2 seed reaches the baseline's final FID (28 + 10 + 0.2) at s = 400/15.2 -> 26.3,
    # interpolated between its evaluations at 20 and 30
    assert "GEAR reaches it at" in text and "26" in text
    assert "## Ablations" in text and "lambda_tok=1.5" in text and "lfq-tiny" in text and "tap layer 1" in text
    assert "Convergence criterion" in text
    # the REPA check in one line: LlamaGen 40 + 400/20, LlamaGen-REPA 30 + 20, each variant (made up as GEAR's
    # curve) 23 + 20; the noise yardstick is the two main methods' half seed ranges at step 20 (0.2 + 0.2)
    assert "no alignment 60.00, the default alignment 50.00; the best variant, tap layer 1, 43.00 (8 variants" in text
    assert "within ±0.40" in text
    assert "controls (LlamaGen+, GEAR lambda_tok=0, STE) seeds 0, 1, LlamaGen and LlamaGen-REPA seed 0." in text


def test_report_judges_each_control_against_the_seed_spread_and_lists_jobs_with_their_code(tmp_path):
    st, cache = synthetic_cache(tmp_path)
    job = st.ar[("GEAR lambda_tok=0", 1)]
    cache.save_result(job, {**cache.result(job), "code": ["abc1234567", ""], "source": ["", "f00d"]})
    text = study_report.write_report(study_report.collect(st, cache), tmp_path / "out", "cmd", "CPU", [], {}).read_text()
    section = text.split("## Controls", 1)[1].split("##", 1)[0]
    rows = {r.strip("|").split("|")[0].strip(): [x.strip() for x in r.strip("|").split("|")]
            for r in section.splitlines() if r.startswith("| ") and "---" not in r}
    # final FID = offset + 400 / 40 + 0.2 x seed: lambda_tok=0 37.0-37.2 (seeds 0, 1), GEAR 33.0-33.4, baseline 38.0-38.4
    assert rows["GEAR lambda_tok=0 vs GEAR"][2:] == ["37.10 ± 0.10 (2)", "33.20 ± 0.20 (3)", "3.90",
                                                     "outside the seed spread: GEAR lambda_tok=0 higher"]
    assert rows[f"GEAR lambda_tok=0 vs {study.BASELINE}"][-1] == "outside the seed spread: GEAR lambda_tok=0 lower"
    assert rows[f"{study.BASELINE} vs GEAR"][-1] == f"outside the seed spread: {study.BASELINE} higher"
    jobs = text.split("## Jobs: time and code", 1)[1]
    assert f"Jobs done: {len(st.jobs)} of {len(st.jobs)}" in jobs and "abc1234567 (1 jobs)" in jobs
    assert "| gear-lambda-tok0-ar | 1 | ar | 40 | 0.2 | abc1234567 | f00d |" in jobs


def test_report_names_a_control_that_is_the_same_run_and_counts_its_time_once(tmp_path):
    st, cache = synthetic_cache(tmp_path, lt0_equal=True)
    text = study_report.write_report(study_report.collect(st, cache), tmp_path / "out", "cmd", "CPU", [], {}).read_text()
    row = next(r for r in text.split("## Controls", 1)[1].splitlines() if r.startswith(f"| GEAR lambda_tok=0 vs {study.BASELINE}"))
    assert "the same runs at seeds 0, 1: bitwise-equal tokenizers" in row
    assert "| gear-lambda-tok0-ar | 0 | ar | 40 | the run of llamagen-repa-plus-ar |" in text
    shared = sum(cache.same_run(st.ar[("GEAR lambda_tok=0", s)], st.ar[(study.BASELINE, s)]) for s in SMALL.seeds[:2])
    assert shared == 2 and f"{(len(st.jobs) - shared) * 10.0 / 3600:.2f} h" in text


def test_report_says_inconclusive_within_seed_noise_and_partial_when_unfinished(tmp_path):
    st, cache = synthetic_cache(tmp_path, gear_offset=0.1, ste_perplexity=390.0)
    text = study_report.write_report(study_report.collect(st, cache), tmp_path / "a", "cmd", "CPU", [], {}).read_text()
    verdicts = claims_table(text)
    assert verdicts[f"GEAR beats {study.BASELINE} at equal AR steps (FID)"].startswith("inconclusive")
    assert verdicts["STE collapses the codebook"] == "not reproduced at this scale"
    (cache.dir(st.ar[("GEAR", 2)]) / "result.json").unlink()
    c = study_report.collect(st, cache)
    assert not c.complete
    assert "PARTIAL" in study_report.write_report(c, tmp_path / "b", "cmd", "CPU", [], {}).read_text()


def test_claims_stay_inconclusive_on_one_seed_one_family_or_a_collapsing_control(tmp_path):
    st, cache = synthetic_cache(tmp_path, gear_offset=20.0, ste_perplexity=4.0)
    for seed in (1, 2):  # one seed of the main comparison left
        for method in ("GEAR", study.BASELINE):
            (cache.dir(st.ar[(method, seed)]) / "result.json").unlink()
    ibq = st.families[("ibq-tiny", "GEAR")][1]
    (cache.dir(ibq) / "result.json").unlink()
    gear_long = cache.dir(st.long_joint["GEAR"]) / "result.json"
    result = json.loads(gear_long.read_text())
    result["tokenizer"]["codebook_perplexity"] = 4.0  # GEAR run as long collapses as much as STE
    gear_long.write_text(json.dumps(result))
    verdicts = claims_table(study_report.write_report(study_report.collect(st, cache), tmp_path / "r", "cmd", "CPU",
                                                      [], {}).read_text())
    assert verdicts["GEAR converges faster (AR steps to reach the baseline's final FID)"] == "inconclusive (one seed)"
    assert verdicts["The gain holds for LFQ and IBQ (one seed)"].startswith("inconclusive (1 of 2 families run")
    assert verdicts["STE collapses the codebook"] == "inconclusive (GEAR's codebook collapses too)"
    assert verdicts[f"GEAR beats {study.BASELINE} at equal AR steps (FID)"].startswith("inconclusive")


def test_convergence_is_judged_against_the_baselines_own_steps_to_reach():
    verdict = study_report.convergence_verdict
    # reaching the baseline's final FID at 3/4 of its budget looks like a 1.3x speed-up over that budget, but the
    # baseline itself got there sooner on every seed
    v, text = verdict([2786, 3344, 3057], [2509, 2572, 2562], 4000, True, one_seed=False)
    assert v.startswith("not reproduced (GEAR reaches it later") and "1.31x over the baseline's budget" in text
    assert "0.83x over its own steps to reach" in text
    assert verdict([300, 350, 400], [2500, 2600, None], 4000, True, one_seed=False)[0] == "reproduced"
    assert verdict([300, 350, 400], [2500, 2600, None], 4000, False, one_seed=False)[0].startswith("reproduced within")
    assert verdict([300, 350, 400], [2500, 2600, 2550], 4000, True, one_seed=True)[0] == "inconclusive (one seed)"
    assert verdict([3000, None, 3900], [2500, 2600, 2550], 4000, True, one_seed=False)[0] == "not reproduced"
    assert verdict([2400, 2700, 2500], [2500, 2600, 2550], 4000, True, one_seed=False)[0] == "inconclusive at this scale"


def test_only_a_released_setting_collapse_reproduces_the_ste_claim(tmp_path):
    st, cache = synthetic_cache(tmp_path, ste_perplexity=390.0)  # STE keeps its codebook ...
    lr4 = cache.dir(st.long_joint["STE, lr x4"]) / "result.json"
    result = json.loads(lr4.read_text())
    result["tokenizer"]["codebook_perplexity"] = 4.0  # ... except at 4x the learning rate
    lr4.write_text(json.dumps(result))
    verdicts = claims_table(study_report.write_report(study_report.collect(st, cache), tmp_path / "r", "cmd", "CPU",
                                                      [], {}).read_text())
    assert verdicts["STE collapses the codebook"] == "not reproduced at the released settings (collapses with STE, lr x4)"


def test_codebook_metrics_are_read_from_a_run_log(tmp_path):
    rows = [{"step": 10, "codebook/usage_window": 0.5, "codebook/perplexity": 100.0}, {"step": 20, "tok/l1": 0.1},
            {"step": 30, "codebook/usage_window": 0.25, "codebook/perplexity": 40.0}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    series = plots.read_metrics(tmp_path, ("codebook/usage_window", "codebook/perplexity"))
    assert series["codebook/usage_window"] == ([10, 30], [0.5, 0.25])
    assert series["codebook/perplexity"] == ([10, 30], [100.0, 40.0])


# ---------------------------------------------------------------------------- the whole study, --quick


def _fashion_mnist_installed() -> bool:
    from gear.data.fashion_mnist import resolve_root

    return (resolve_root() / "train-images-idx3-ubyte.gz").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not _fashion_mnist_installed(), reason="Fashion-MNIST idx files not installed")
def test_quick_study_interrupted_and_continued_writes_a_full_report(tmp_path, monkeypatch):
    cache_dir, report_dir = tmp_path / "cache", tmp_path / "results"
    args = ["--quick", "--threads", "1", "--cache-dir", str(cache_dir), "--report-dir", str(report_dir)]
    calls = {"n": 0}
    evaluate = reproduce.Runner.eval_generation

    def dies_on_the_fifth_evaluation(self, run_dir, step):
        calls["n"] += 1
        if calls["n"] == 5:
            calls["stopped"] = run_dir
            raise KeyboardInterrupt  # as if the study were stopped in the middle of an AR run
        return evaluate(self, run_dir, step)

    monkeypatch.setattr(reproduce.Runner, "eval_generation", dies_on_the_fifth_evaluation)
    with pytest.raises(KeyboardInterrupt):
        reproduce.main(args)
    assert not (report_dir / "REPORT.md").exists()  # nothing partial where the finished report goes
    monkeypatch.setattr(reproduce.Runner, "eval_generation", evaluate)
    report = reproduce.main(args)
    assert report == report_dir / "REPORT.md"
    text = report.read_text()
    assert "PARTIAL" not in text and len(claims_table(text)) == 5
    results = json.loads((report_dir / "results.json").read_text())
    assert results["complete"] and all(j["result"] is not None for j in results["jobs"])
    budget = study.PRESETS["quick"]
    for job in results["jobs"]:
        for p in (job["result"].get("points") or []):
            assert math.isfinite(p["fid"])
    # the interrupted AR run continued from its checkpoint: every step was trained once
    run = calls["stopped"]
    stopped = next(j for j in results["jobs"] if f"-s{j['seed']}-{j['key']}" in run.parent.name)
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if "ar/ntp" in x]
    assert steps == list(range(1, budget.ar_steps + 1))
    # its time counts both pieces, and it records the commit and source it ran on
    pieces = json.loads((run.parent / "pieces.json").read_text())
    assert len(pieces) == 2 and stopped["result"]["wall_seconds"] == pytest.approx(sum(pieces))
    assert all(p["code"] and p["source"] for p in stopped["result"]["points"])
    assert stopped["result"]["code"] and stopped["result"]["source"]
    # everything is cached: a third call trains nothing
    again = subprocess.run([sys.executable, str(BENCHMARKS / "reproduce.py"), *args, "--plan"], capture_output=True, text=True)
    assert f"{len(results['jobs'])} jobs, {len(results['jobs'])} done" in again.stdout
    if plots.have_matplotlib():
        assert (report_dir / "fid_vs_steps.png").is_file() and (report_dir / "codebook_vs_joint_steps.png").is_file()
    # a longer AR budget continues the cached AR runs: the new steps only, the earlier evaluations kept
    before = json.loads((run.parent / "progress.json").read_text())
    reproduce.main([*args, "--parts", "main", "--ar-steps", str(budget.ar_steps + 4)])
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if "ar/ntp" in x]
    assert steps == list(range(1, budget.ar_steps + 5))  # every step trained once, in order
    after = json.loads((run.parent / "progress.json").read_text())
    assert after[: len(before)] == before and after[-1]["step"] == budget.ar_steps + 4
