"""benchmarks/study_probe.py: a study job's key changes when the code changes what the job computes, and only then."""

from __future__ import annotations

import dataclasses
import importlib
import json
import shutil
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
study = importlib.import_module("study")
study_probe = importlib.import_module("study_probe")
reproduce = importlib.import_module("reproduce")

TINY = study.Budget(warmup_steps=4, joint_steps=3, ar_steps=8, dense_until=4, dense_every=4, sparse_every=4,
                    short_ar_steps=4, long_joint_steps=6, seeds=(0,), control_seeds=1, fid_samples=20, recon_samples=20)
EXTRA = ["train.device=cpu"]


@pytest.fixture(scope="module")
def setting():
    from gear.config import load_config

    data = dataclasses.replace(load_config(study.CONFIGS / "fmnist-tokenizer.yaml", EXTRA).data, limit=0)
    evaluation = reproduce.Evaluation(data, "cpu", TINY.cfg_scale)
    st = study.build_study(TINY, ("main",))
    jobs = {"warm-up": st.tokenizers[("warm-up", 0)], "tokenizer+": st.tokenizers[("tokenizer+", 0)],
            "GEAR": st.tokenizers[("GEAR", 0)], "GEAR ar": st.ar[("GEAR", 0)], "plus ar": st.ar[("LlamaGen-REPA+", 0)]}
    return evaluation, jobs


def behaviours(root: Path, setting, source: str) -> dict[str, str]:
    evaluation, jobs = setting
    probe = study_probe.Probe(root, TINY, EXTRA, evaluation, log=lambda _: None, source=source)
    return {name: probe(job) for name, job in jobs.items()}


def test_probes_repeat_and_follow_behaviour_not_form(tmp_path, setting, monkeypatch):
    first = behaviours(tmp_path / "a", setting, "v1")
    assert behaviours(tmp_path / "b", setting, "v1") == first  # measured afresh: the same numbers
    assert len(set(first.values())) == len(first)

    # kept on disk per source fingerprint: a second study reads them, it trains nothing
    from gear.train.loop import Trainer

    fit = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self: pytest.fail("a kept probe was measured again"))
    assert behaviours(tmp_path / "a", setting, "v1") == first
    monkeypatch.setattr(Trainer, "fit", fit)

    # new code that computes the same up to float rounding (here: distances off by one part in 10^7): every job
    # keeps its key, though the soft branch's numbers moved
    import gear.train.steps as steps

    soft_tokens = steps.soft_tokens
    monkeypatch.setattr(steps, "soft_tokens", lambda d, *a, **k: soft_tokens(d * (1 + 1e-7), *a, **k))
    assert behaviours(tmp_path / "a", setting, "v2") == first
    probe = study_probe.Probe(tmp_path / "a", TINY, EXTRA, setting[0], source="v2")
    v1, v2 = (json.loads((probe.dir(setting[1]["GEAR"]) / f"{v}.json").read_text()) for v in ("v1", "v2"))
    assert v2["same_as"] == "v1" and v2["numbers"] != v1["numbers"]

    # the soft branch computes something else: the GEAR joint stage's probe changes, no other. (Its AR's job key
    # follows through the joint job's key, then through the weights it trained; the AR's own probe, two steps on a
    # tokenizer that moved two steps, need not.)
    monkeypatch.setattr(steps, "soft_tokens", lambda d, temperature, *a, **k: soft_tokens(d, temperature * 2.0, *a, **k))
    after = behaviours(tmp_path / "a", setting, "v3")
    assert {name for name in first if after[name] != first[name]} == {"GEAR"}
    gear_ar = setting[1]["GEAR ar"]
    # only the newest source's runs are kept (records of every source stay); a probe whose init's run is gone
    # runs the init again
    probe = study_probe.Probe(tmp_path / "a", TINY, EXTRA, setting[0], source="v3")
    assert sorted(p.name for p in probe.dir(gear_ar.init).iterdir() if p.is_dir()) == ["run-v3"]
    assert {p.name for p in probe.dir(gear_ar.init).glob("*.json")} == {"v1.json", "v2.json", "v3.json"}
    shutil.rmtree(probe.run_dir(gear_ar.init))
    (probe.dir(gear_ar) / "v3.json").unlink()
    assert probe(gear_ar) == after["GEAR ar"] and probe.run_dir(gear_ar.init).is_dir()
    keys = [study.job_key(gear_ar, TINY, EXTRA, lambda job, b=b: b[next(n for n, j in setting[1].items() if j == job)])
            for b in (first, after)]
    assert keys[0] != keys[1]


def test_close_is_float_rounding_against_each_sums_magnitude():
    old = {"w": 0.0, "w|abs": 100.0, "eval/fid": 50.0, "x": "nan"}
    assert study_probe.close({"w": 0.009, "w|abs": 100.0, "eval/fid": 50.004, "x": "nan"}, old)
    assert not study_probe.close({"w": 0.02, "w|abs": 100.0, "eval/fid": 50.0, "x": "nan"}, old)
    assert not study_probe.close({"w": 0.0, "w|abs": 100.0, "eval/fid": 50.01, "x": "nan"}, old)
    assert not study_probe.close({"w": 0.0, "w|abs": 100.0, "eval/fid": 50.0}, old)
