"""`gear train CONFIG --dry-run`: sizes and memory of a paper-scale config, on the meta device."""

from __future__ import annotations

import resource

import pytest

from gear.cli import main
from gear.config import load_config
from gear.train.dryrun import dry_run


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_gpt_xl_config_reports_775m_parameters_without_allocating_them():
    before = _max_rss_mib()
    report = dry_run(load_config("configs/imagenet256-joint.yaml"), world_size=8)
    assert report.parameters["generator"] == pytest.approx(774.7e6, rel=1e-3)
    assert report.tokens_per_image == 256 and report.world_size == 8
    # 775M fp32 parameters alone would take 2.9 GiB; on the meta device the process barely grows
    assert _max_rss_mib() - before < 500
    assert report.memory_gib["total (DDP)"] > report.memory_gib["weights+grads+AdamW+EMA"] > 775e6 * 20 / 2**30


def test_fsdp_divides_the_generator_state_by_the_number_of_processes():
    ddp = dry_run(load_config("configs/imagenet256-joint.yaml"), world_size=8)
    fsdp = dry_run(load_config("configs/imagenet256-joint.yaml", ["train.parallel=fsdp"]), world_size=8)
    generator_state = 20 * (ddp.parameters["generator"] + ddp.parameters["projector"]) / 2**30
    saved = ddp.memory_gib["weights+grads+AdamW+EMA"] - fsdp.memory_gib["weights+grads+AdamW+EMA"]
    assert saved == pytest.approx(generator_state * 7 / 8, rel=0.02)  # the projector has no EMA: 16 of its 20 bytes
    assert "total (FSDP)" in fsdp.memory_gib and fsdp.memory_gib["sampling copy (rank 0)"] > 2.8


def test_cli_dry_run_prints_the_report(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert main(["train", "configs/imagenet256-joint.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "generator" in out and "774.70M" in out and "global batch: 256 = 8 processes x 32" in out
    # overrides may follow the flag
    assert main(["train", "configs/imagenet256-joint.yaml", "--dry-run", "train.parallel=fsdp"]) == 0
    assert "total (FSDP)" in capsys.readouterr().out


def test_gradient_accumulation_shrinks_the_activations_of_one_forward():
    one = dry_run(load_config("configs/imagenet256-joint.yaml"), world_size=8)
    two = dry_run(load_config("configs/imagenet256-joint.yaml", ["train.grad_accum_steps=2"]), world_size=8)
    act = "activations (estimate)"
    assert two.memory_gib[act] == pytest.approx(one.memory_gib[act] / 2, rel=1e-6)
    with pytest.raises(ValueError, match="grad_accum_steps"):
        dry_run(load_config("configs/imagenet256-joint.yaml", ["train.grad_accum_steps=5"]), world_size=8)
