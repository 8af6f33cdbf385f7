"""`gear eval gen|recon` on a tiny trained run: JSON out, the ADM .npz layout, training-time FID."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gear.cli import main
from gear.data.fashion_mnist import resolve_root
from gear.eval import runs

pytestmark = pytest.mark.skipif(
    not (resolve_root() / "train-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST idx files not installed"
)

TINY = [
    "data.limit=64", "train.batch_size=8", "train.progress=false", "train.steps=2", "train.log_every=1",
    "train.sample_every=100", "train.checkpoint_every=2", "model.tokenizer_init=", "loss.perceptual_weight=0",
    "align.projector_dim=64", "model.tokenizer_overrides={base_channels: 16, z_channels: 32, norm_groups: 8}",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("GEAR_CACHE", str(cache))
    mp.setattr(runs, "CLASSIFIER_STEPS", 20)  # the real one trains 1,500 steps once and is cached
    run_dir = tmp_path_factory.mktemp("run")
    # a joint run with a small FID on the classifier's features every 2 steps
    assert main(["train", "configs/fmnist-joint.yaml", *TINY, f"train.out_dir={run_dir}", "eval.fid_every=2",
                 "eval.fid_samples=20"]) == 0
    yield run_dir
    mp.undo()


def test_training_logs_a_small_fid(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    fid_rows = [r for r in rows if "eval/fid" in r]
    assert len(fid_rows) == 1 and fid_rows[0]["step"] == 2
    assert np.isfinite(fid_rows[0]["eval/fid"]) and 0 <= fid_rows[0]["eval/class_accuracy"] <= 1


def test_eval_gen_writes_metrics_and_an_adm_npz(run, tmp_path):
    out, npz = tmp_path / "gen.json", tmp_path / "samples.npz"
    args = ["eval", "gen", str(run), "--num", "20", "--batch-size", "10", "--feature", "classifier", "--out", str(out),
            "--npz", str(npz)]
    assert main(args) == 0
    metrics = json.loads(out.read_text())
    assert np.isfinite(metrics["fid"]) and metrics["num"] == 20
    assert 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    assert 0 <= metrics["class_accuracy"] <= 1 and 0 < metrics["classifier_test_accuracy"] <= 1
    arr = np.load(npz)["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (20, 32, 32, 3)
    assert main(args[:-2] + ["--out", str(tmp_path / "again.json")]) == 0
    assert json.loads((tmp_path / "again.json").read_text())["fid"] == metrics["fid"], "same seed, same samples"


def test_eval_recon_reports_rfid_psnr_ssim_and_codebook_usage(run, tmp_path):
    out = tmp_path / "recon.json"
    assert main(["eval", "recon", str(run), "--num", "4", "--batch-size", "4", "--out", str(out)]) == 0
    m = json.loads(out.read_text())
    assert np.isfinite(m["rfid"]) and m["psnr"] > 0 and -1 <= m["ssim"] <= 1
    assert 0 < m["codebook_usage"] <= 1 and m["codebook_perplexity"] >= 1
    assert m["feature"] != "classifier"


def test_eval_of_a_tokenizer_run_without_generator_says_so(run, tmp_path, capsys):
    import shutil

    tok_only = tmp_path / "tok"
    shutil.copytree(run, tok_only)
    shutil.rmtree(tok_only / "generator")
    assert main(["eval", "gen", str(tok_only), "--num", "4", "--feature", "classifier"]) == 2
    assert "holds no generator" in capsys.readouterr().err
