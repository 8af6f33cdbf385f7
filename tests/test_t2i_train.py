"""Text-to-image end to end on a few captioned Fashion-MNIST images: training lowers the loss, exact resume, the
joint stage with text, sampling from prompts (CLI and Python API), `gear eval t2i`, and bad input."""

import json

import pytest
import torch
from helpers import t2i_overrides
from PIL import Image

import gear
from gear.cli import main
from gear.config import ConfigError, load_config
from gear.data.fashion_mnist import resolve_root
from gear.eval import runs
from gear.models.gpt_t2i import TextGPT
from gear.text import CaptionTruncated
from gear.train.loop import Trainer

pytestmark = pytest.mark.skipif(
    not (resolve_root() / "train-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST idx files not installed"
)

@pytest.fixture(scope="module")
def runs_dir(t2i_runs):
    """The shared tiny run (tests/conftest.py); its feature cache and a 20-step reference classifier for eval."""
    tok, _ = t2i_runs
    mp = pytest.MonkeyPatch()
    mp.setenv("GEAR_CACHE", str(tok.parent / "cache"))
    mp.setattr(runs, "CLASSIFIER_STEPS", 20)  # the real one trains 1,500 steps once and is cached
    yield t2i_runs
    mp.undo()


def test_a_tiny_text_to_image_run_lowers_its_loss(runs_dir):
    _, t2i = runs_dir
    ntp = [json.loads(line)["ar/ntp"] for line in (t2i / "metrics.jsonl").read_text().splitlines()]
    assert len(ntp) == 30 and sum(ntp[-5:]) / 5 < sum(ntp[:5]) / 5 - 0.5
    gen = gear.load_generator(t2i)
    assert isinstance(gen, TextGPT) and gen.config.text_len == 16 and gen.config.text_dim == 384
    assert gen.null_mask.sum() == 2  # the empty caption, [CLS] [SEP], saved with the weights
    assert gear.is_text_run(t2i) and list((t2i / "cache").glob("*")) == [] and list((t2i / "samples").glob("*.png"))


def test_sample_from_prompts_and_the_python_api(runs_dir, tmp_path, capsys):
    _, t2i = runs_dir
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a small dark sneaker\n\na bright bag\n")
    out = tmp_path / "grid.png"
    assert main(["sample", str(t2i), "--prompts", str(prompts), "--prompt", "a coat", "--per-class", "2",
                 "--cfg-scale", "3", "--out", str(out)]) == 0
    assert "3 prompts x 2 samples" in capsys.readouterr().out and Image.open(out).size[0] > 2 * 64
    pipe = gear.load_text_to_image(t2i)
    a = pipe(["a small dark sneaker", "a bag"], cfg_scale=3.0, seed=0)
    b = pipe(["a small dark sneaker", "a bag"], cfg_scale=3.0, seed=0)
    assert a.shape == (2, 3, 32, 32) and torch.equal(a, b) and a.min() >= -1 and a.max() <= 1


def test_bad_prompts_and_encoders_get_one_line_errors(runs_dir, tmp_path, capsys):
    tok, t2i = runs_dir
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert main(["sample", str(t2i), "--prompts", str(empty)]) == 2
    assert main(["sample", str(t2i)]) == 2
    assert main(["sample", str(t2i), "--prompts", str(tmp_path / "missing.txt")]) == 2
    long = " ".join(["word"] * 30)
    with pytest.warns(CaptionTruncated, match="1 caption.s. longer than the 16-token prefix were truncated"):
        assert main(["sample", str(t2i), "--prompt", long, "--per-class", "1", "--out", str(tmp_path / "x.png")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == f"gear sample: error: --prompts {empty} holds no prompt: write one prompt per line"
    assert "is text-conditioned: pass --prompt TEXT" in err[1] and "no such file" in err[2] and len(err) == 3
    assert main(["train", "configs/fmnist-t2i.yaml", *t2i_overrides(tmp_path / "q", 1, f"model.tokenizer_init={tok}",
                                                                 "text.encoder=qwen3-1.7b")]) == 2
    assert capsys.readouterr().err.strip() == ("gear train: error: text encoder qwen3-1.7b loads from a local folder: "
                                               "set text.encoder_path=/path/to/qwen3-1.7b")
    with pytest.raises(ConfigError, match="must be set to train a generator on captions"):
        load_config("configs/fmnist-t2i.yaml", ["text.encoder="])
    with pytest.raises(ConfigError, match="captioned data set"):
        load_config("configs/fmnist-ar.yaml", ["text.encoder=minilm-l6"])


@pytest.mark.slow
def test_eval_t2i_writes_the_adherence_report(runs_dir, tmp_path):
    _, t2i = runs_dir
    out = tmp_path / "t2i.json"
    assert main(["eval", "t2i", str(t2i), "--num", "10", "--batch-size", "10", "--out", str(out)]) == 0
    m = json.loads(out.read_text())
    assert 0 <= m["class_accuracy_heldout"] <= 1 and 0 <= m["class_accuracy_shuffled"] <= 1
    assert m["chance"]["class_accuracy"] == 0.1 and m["cfg_scale"] == 3.0
    for scale in ("cfg_1", "cfg_3"):
        assert set(m[scale]) == {"train", "heldout", "heldout_names", "shuffled", "fid_classifier"}
        assert set(m[scale]["heldout"]) == {"class_accuracy", "brightness_match", "size_match"}


def test_text_resume_is_exact(runs_dir, tmp_path):
    tok, _ = runs_dir
    extra = [f"model.tokenizer_init={tok}"]
    one = Trainer(load_config("configs/fmnist-t2i.yaml", t2i_overrides(tmp_path / "one", 4, *extra)))
    one.fit()
    half = t2i_overrides(tmp_path / "two", 4, *extra, "train.checkpoint_every=2")
    first = Trainer(load_config("configs/fmnist-t2i.yaml", half))
    first.cfg.train.steps = 2
    first.fit()
    torch.manual_seed(99)  # caption dropout is seeded per step, not by the process's RNG
    second = Trainer(load_config("configs/fmnist-t2i.yaml", half), resume=True)
    second.fit()
    for (k, a), b in zip(one.m.generator.state_dict().items(), second.m.generator.state_dict().values()):
        assert torch.equal(a, b), f"generator.{k} differs after resume"


@pytest.mark.slow
def test_the_joint_stage_takes_captions(runs_dir, tmp_path):
    tok, _ = runs_dir
    extra = [f"model.tokenizer_init={tok}"]
    joint = ["train.stage=joint", "loss.perceptual_weight=0", "data.name=fashion-mnist-captions"]
    assert main(["train", "configs/fmnist-joint.yaml", *t2i_overrides(tmp_path / "joint", 2, *extra, *joint,
                                                                  "text.encoder=minilm-l6")]) == 0
    summary = json.loads((tmp_path / "joint" / "summary.json").read_text())
    assert {"tok/align_tok", "ar/ntp"} <= set(summary)
    assert isinstance(gear.load_generator(tmp_path / "joint"), TextGPT)
