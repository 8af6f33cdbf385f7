"""The GPU check and the side-by-side benchmark run end to end on tiny sizes (no timing is asserted)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
gpu_check = importlib.import_module("gpu_check")
ab_compare = importlib.import_module("ab_compare")


def test_gpu_check_tiny_on_cpu_writes_every_section(tmp_path):
    out = tmp_path / "gpu_check.md"
    # step times with compilation and the nested pytest run are the slow sections: see the slow test below
    gpu_check.main(["--tiny", "--device", "cpu", "--threads", "1", "--rounds", "1", "--skip", "steps", "tests", "--out", str(out)])
    text = out.read_text()
    for heading in ("## AR step MFU", "## Sampling", "## FSDP2 (one process)"):
        assert heading in text
    assert "all metrics finite: True" in text
    assert "| 2 | " in text  # the tiny sampling batches


@pytest.mark.slow
def test_gpu_check_tiny_on_cpu_all_sections(tmp_path):
    out = tmp_path / "gpu_check.md"
    gpu_check.main(["--tiny", "--device", "cpu", "--threads", "1", "--rounds", "1", "--out", str(out)])
    text = out.read_text()
    assert "| frozen |" in text and "| soft top-16 |" in text and "## CUDA-marked tests" in text


def test_gpu_check_refuses_cuda_without_a_gpu(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit):
        gpu_check.main(["--device", "cuda"])
    assert "torch sees no CUDA device" in capsys.readouterr().err


def test_ab_compare_reports_agreement_of_identical_digests():
    digest = {"first_step": {"tok/loss": 2.0}, "param_abs_sums": {"tokenizer": 10.0}}
    result = {"digests": {"A": digest, "B": digest}}
    assert "max rel diff 0.0e+00" in ab_compare.agreement(result)
    tokens = {"digests": {"A": {"tokens": [1, 2, 3]}, "B": {"tokens": [1, 5, 3]}}}
    assert ab_compare.agreement(tokens) == "tokens differ at 1 positions"


@pytest.mark.slow
def test_sample_set_memory_runs_gear_sample_twice(tmp_path):
    out = tmp_path / "memory.md"
    importlib.import_module("sample_set_memory").main(["--nums", "4", "8", "--batch-size", "4", "--out", str(out)])
    text = out.read_text()
    assert "| 4 | " in text and "| 8 | " in text and "2x the samples: peak RSS x**" in text


@pytest.mark.slow
def test_tokenizer_paths_finds_no_difference_but_the_soft_branch(tmp_path):
    """benchmarks/tokenizer_paths.py on a tiny budget: the study's two tokenizer paths never part; its positive
    control (the soft branch on in path B) parts at the first step."""
    out = subprocess.run([sys.executable, str(BENCHMARKS / "tokenizer_paths.py"), "--steps", "2", "--warmup-steps", "2",
                          "--batch", "4", "--limit", "16", "--variants", "study,ctl-soft-branch",
                          "--work", str(tmp_path)], capture_output=True, text=True, check=True).stdout
    rows = {line.split()[0]: line for line in out.splitlines()
            if line.split() and line.split()[0] in ("study", "ctl-soft-branch")}
    assert rows["study"].count("never") == 4 and "DIFF" not in rows["study"]
    assert "step 1" in rows["ctl-soft-branch"]
    fit = out.split("Trainer.fit", 1)[1]
    assert "bitwise equal" in fit and "DIFFERENT" not in fit
