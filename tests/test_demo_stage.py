"""scripts/demo_stage.py: a demo stage is trained, continued after an interruption, and stops the make when it
ended early."""

import importlib.util
import json
from pathlib import Path

import pytest
from helpers import TINY_RUN

from gear.data.fashion_mnist import resolve_root

pytestmark = pytest.mark.skipif(
    not (resolve_root() / "train-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST idx files not installed"
)

spec = importlib.util.spec_from_file_location("demo_stage", Path(__file__).parent.parent / "scripts" / "demo_stage.py")
demo_stage = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo_stage)

TINY_TOKENIZER = [*TINY_RUN, "model.tokenizer_overrides={base_channels: 16, z_channels: 32, norm_groups: 8}"]


def test_a_stage_is_trained_continued_and_checked(tmp_path, monkeypatch, capsys):
    run = tmp_path / "tok"
    assert demo_stage.run_stage("configs/fmnist-tokenizer.yaml", run, TINY_TOKENIZER) == 0  # 2 steps
    assert json.loads((run / "summary.json").read_text())["step"] == 2
    assert demo_stage.run_stage("configs/fmnist-tokenizer.yaml", run, TINY_TOKENIZER) == 0  # finished: left alone
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2

    # an interrupted stage (its config asks for more steps than its checkpoint holds) is continued, not refused
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("steps: 2", "steps: 3"))
    assert demo_stage.run_stage("configs/fmnist-tokenizer.yaml", run, TINY_TOKENIZER) == 0
    assert json.loads((run / "summary.json").read_text())["step"] == 3

    # a stage whose command returned 0 short of its last step (stopped by a signal) stops the make
    config.write_text(config.read_text().replace("steps: 3", "steps: 5"))
    monkeypatch.setattr(demo_stage, "gear", lambda argv: 0)
    assert demo_stage.run_stage("configs/fmnist-tokenizer.yaml", run, TINY_TOKENIZER) == 1
    assert "stopped at step 3 of 5; run make again" in capsys.readouterr().err
