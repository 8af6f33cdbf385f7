"""The study's lambda_tok = 0 control is what it claims to be: from one warm-up, a joint stage with the REPA
gradient into the tokenizer off gives the tokenizer exactly the updates the tokenizer stage gives it (the same
data, losses, optimizer, EMA and carried discriminator), so the two differ only in the soft branch."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
study = importlib.import_module("study")

TINY = study.Budget(warmup_steps=3, joint_steps=3, batch_size=4, data_limit=32, seeds=(0,), control_seeds=1,
                    reference_seeds=1)


def train(job, out: Path, init: Path | None = None, extra=()) -> Path:
    from gear.train.loop import Trainer

    cfg = study.resolved_config(job, TINY, ["train.device=cpu", *extra], out_dir=str(out), init_dir=str(init or ""))
    Trainer(cfg).fit()
    return out


@pytest.mark.parametrize("discriminator", ["carried", "fresh"])
def test_lambda_tok0_joint_stage_updates_the_tokenizer_as_the_tokenizer_stage_does(tmp_path, discriminator):
    """Carried from the warm-up (the recipe) or fresh: a joint stage builds a fresh discriminator from the random
    state a tokenizer stage builds it from."""
    from gear.train.checkpoint import load_checkpoint

    warm = study.warmup_job(TINY)
    warm_dir = train(warm, tmp_path / "warm")
    jobs = study.tokenizer_jobs(TINY, warm, 0, TINY.joint_steps)
    extra = ["model.discriminator_init=fresh"] if discriminator == "fresh" else []
    runs = {label: train(jobs[label], tmp_path / label.replace(" ", "_"), warm_dir, extra)
            for label in ("tokenizer+", "GEAR lambda_tok=0", "GEAR")}
    digest = {label: study.tokenizer_digest(d) for label, d in runs.items()}
    assert digest["GEAR lambda_tok=0"] == digest["tokenizer+"]  # EMA weights, bit for bit
    assert study.tokenizer_digest(runs["GEAR lambda_tok=0"], ema=False) == study.tokenizer_digest(runs["tokenizer+"], ema=False)
    a, b = (load_checkpoint(runs[x] / "checkpoints" / "last.pt") for x in ("tokenizer+", "GEAR lambda_tok=0"))
    for name, t in a["modules"]["discriminator"].items():
        assert torch.equal(t, b["modules"]["discriminator"][name]), name
    assert digest["GEAR"] != digest["tokenizer+"]  # the soft branch does reach the tokenizer
