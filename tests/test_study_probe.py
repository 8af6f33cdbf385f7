"""benchmarks/study_probe.py: a study job's key changes when the code changes what the job computes, and only then."""

from __future__ import annotations

import dataclasses
import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
study = importlib.import_module("study")
study_probe = importlib.import_module("study_probe")

TINY = study.Budget(warmup_steps=4, joint_steps=3, ar_steps=8, dense_until=4, dense_every=4, sparse_every=4,
                    short_ar_steps=4, long_joint_steps=6, seeds=(0,), control_seeds=1, fid_samples=20, recon_samples=20)
EXTRA = ["train.device=cpu"]


@pytest.fixture(scope="module")
def setting():
    from gear.config import load_config
    from gear.eval.runs import reference_classifier

    data = dataclasses.replace(load_config(study.CONFIGS / "fmnist-tokenizer.yaml", EXTRA).data, limit=0)
    held = {}

    def reference():
        if "c" not in held:
            held["c"] = reference_classifier(data)
        return held["c"]

    st = study.build_study(TINY, ("main",))
    jobs = {"warm-up": st.tokenizers[("warm-up", 0)], "tokenizer+": st.tokenizers[("tokenizer+", 0)],
            "GEAR": st.tokenizers[("GEAR", 0)], "GEAR ar": st.ar[("GEAR", 0)], "plus ar": st.ar[("LlamaGen-REPA+", 0)]}
    return data, reference, jobs


def behaviours(root: Path, setting) -> dict[str, str]:
    data, reference, jobs = setting
    probe = study_probe.Probe(root, TINY, EXTRA, data, reference, log=lambda _: None)
    return {name: probe(job) for name, job in jobs.items()}


def test_probes_repeat_and_follow_behaviour_not_form(tmp_path, setting, monkeypatch):
    first = behaviours(tmp_path / "a", setting)
    assert behaviours(tmp_path / "b", setting) == first  # measured afresh: the same numbers
    assert len(set(first.values())) == len(first)

    # kept on disk by source fingerprint: a second study reads them, it trains nothing
    from gear.train.loop import Trainer

    monkeypatch.setattr(Trainer, "fit", lambda self: pytest.fail("a kept probe was measured again"))
    assert behaviours(tmp_path / "a", setting) == first
    monkeypatch.undo()

    # the same computation written differently: every job keeps its key
    import gear.train.steps as steps

    soft_tokens = steps.soft_tokens
    monkeypatch.setattr(steps, "soft_tokens", lambda d, temperature, *a, **k: soft_tokens(d, temperature * 1.0, *a, **k))
    assert behaviours(tmp_path / "c", setting) == first

    # the soft branch computes something else: the GEAR joint stage and the AR trained on it change, nothing else
    monkeypatch.setattr(steps, "soft_tokens", lambda d, temperature, *a, **k: soft_tokens(d, temperature * 2.0, *a, **k))
    after = behaviours(tmp_path / "d", setting)
    assert {name for name in first if after[name] != first[name]} == {"GEAR", "GEAR ar"}
