"""The three stages end to end on a few Fashion-MNIST images: checkpoints, exact resume, CLI, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import gear
from gear.cli import main
from gear.config import ConfigError, load_config
from gear.data.fashion_mnist import resolve_root
from gear.train import checkpoint as ckpt
from gear.train.loop import Trainer

pytestmark = pytest.mark.skipif(
    not (resolve_root() / "train-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST idx files not installed"
)

# A tokenizer and AR small enough for a step in well under a second on one core.
TINY = [
    "data.limit=64",
    "train.batch_size=8",
    "train.log_every=1",
    "train.progress=false",
    "train.ema_decay=0.9",
    "model.tokenizer_overrides={base_channels: 16, z_channels: 32, norm_groups: 8}",
    "align.projector_dim=64",
    "eval.samples_per_class=1",
    "eval.sample_classes=[0, 1]",
]


def overrides(run_dir, steps, *extra):
    return [*TINY, f"train.out_dir={run_dir}", f"train.steps={steps}", f"train.sample_every={steps}",
            f"train.checkpoint_every={steps}", *extra]


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """Run tokenizer -> joint -> ar once (2 steps each) and share the run directories."""
    root = tmp_path_factory.mktemp("runs")
    tok, joint, ar = root / "tok", root / "joint", root / "ar"
    assert main(["train", "configs/fmnist-tokenizer.yaml", *overrides(tok, 2)]) == 0
    assert main(["train", "configs/fmnist-joint.yaml", *overrides(joint, 2, f"model.tokenizer_init={tok}")]) == 0
    assert main(["train", "configs/fmnist-ar.yaml", *overrides(ar, 2, f"model.tokenizer_init={joint}")]) == 0
    return tok, joint, ar


def test_each_stage_writes_a_checkpoint_models_and_logs(stages):
    for run in stages:
        assert ckpt.checkpoint_path(run).is_file()
        assert (run / "tokenizer" / "model.safetensors").is_file()
        assert (run / "config.yaml").is_file() and any((run / "tb").iterdir())
        summary = json.loads((run / "summary.json").read_text())
        assert summary["step"] == 2 and 0 < summary["codebook/usage_window"] <= 1
        assert list((run / "recon").glob("*.png"))
    joint = json.loads((stages[1] / "summary.json").read_text())
    assert {"tok/align_tok", "ar/ntp", "ar/align_cos", "disc/loss", "soft/entropy"} <= set(joint)
    assert (stages[2] / "generator" / "model.safetensors").is_file()


def test_the_ar_stage_keeps_the_tokenizer_it_was_given(stages):
    _, joint, ar = stages
    a, b = gear.load_tokenizer(joint), gear.load_tokenizer(ar)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_sample_and_reconstruct_from_a_run(stages, tmp_path):
    ar = stages[2]
    out = tmp_path / "grid.png"
    assert main(["sample", str(ar), "--classes", "0,3", "--per-class", "2", "--cfg-scale", "1.5", "--out", str(out)]) == 0
    assert Image.open(out).size[0] > 2 * 32
    img = tmp_path / "in.png"
    Image.fromarray((torch.rand(40, 30, 3) * 255).byte().numpy()).save(img)
    assert main(["reconstruct", str(stages[0]), str(img), "--out", str(tmp_path / "rec")]) == 0
    assert (tmp_path / "rec" / "in_recon.png").is_file()


def test_sample_rejects_a_mismatched_tokenizer_and_generator(stages, tmp_path, capsys):
    import shutil

    run = tmp_path / "mixed"
    shutil.copytree(stages[2], run)
    gear.build_tokenizer("vq-tiny", codebook_size=256).save_pretrained(run / "tokenizer")
    assert main(["sample", str(run), "--out", str(tmp_path / "x.png")]) == 2
    assert "mismatched tokenizer and generator" in capsys.readouterr().err


def exit_status(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as stop:  # argparse's own errors
        return stop.code


@pytest.mark.parametrize(
    "args, message",
    [
        (["--cfg-scale", "-1"], "argument --cfg-scale: must be >= 0.0, got -1"),
        (["--classes", "42"], "classes 42 are outside this generator's classes 0..9"),
        (["--classes", "0,x"], "argument --classes: expected comma-separated class ids"),
        (["--per-class", "0"], "argument --per-class: must be >= 1, got 0"),
        (["--top-p", "1.5"], "argument --top-p: must be in (0, 1], got 1.5"),
        (["--temperature", "0"], "argument --temperature: must be > 0.0, got 0"),
    ],
)
def test_sample_rejects_out_of_range_values_in_one_line(stages, tmp_path, capsys, args, message):
    out = tmp_path / "x.png"
    assert exit_status(["sample", str(stages[2]), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gear sample: error: {message}") and err.count("\n") == 1
    assert not out.exists()


def test_resume_is_exact(tmp_path):
    """4 steps in one go == 2 steps, a restart from the checkpoint, 2 more (same parameters on CPU)."""
    extra = ["model.tokenizer_init=", "loss.perceptual_weight=0"]  # a fresh tokenizer; GAN, EMA, dropout all on
    one = Trainer(load_config("configs/fmnist-joint.yaml", overrides(tmp_path / "one", 4, *extra)))
    one.fit()
    load_config_half = overrides(tmp_path / "two", 4, *extra, "train.checkpoint_every=2")
    first = Trainer(load_config("configs/fmnist-joint.yaml", load_config_half))
    first.cfg.train.steps = 2
    first.fit()
    torch.manual_seed(1234)  # a restart must not depend on the process's RNG
    second = Trainer(load_config("configs/fmnist-joint.yaml", load_config_half), resume=True)
    assert second.step == 2
    second.fit()
    for name, module in one.trained.items():
        for (k, a), b in zip(module.state_dict().items(), second.trained[name].state_dict().values()):
            assert torch.equal(a, b), f"{name}.{k} differs after resume"
    for name, ema in one.emas.items():
        for a, b in zip(ema.state_dict().values(), second.emas[name].state_dict().values()):
            assert torch.equal(a, b)


def test_a_truncated_checkpoint_is_refused_and_left_alone(tmp_path, capsys):
    path = ckpt.save_checkpoint(tmp_path / "checkpoints" / "last.pt", {"step": 1, "x": torch.zeros(1000)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        ckpt.load_checkpoint(path)
    assert path.read_bytes() == data[: len(data) // 2]


@pytest.mark.parametrize(
    "bad, message",
    [
        ("train.stepz=3", "unknown config key train.stepz"),
        ("train.steps=many", "train.steps expects int"),
        ("align.temperature=-1", "align.temperature"),
        ("train.stage=finetune", "train.stage"),
        ("data.name=cifar", "data.name"),
        ("train.ste_ntp_weight=2", "train.ste_ntp_weight"),  # the joint configs run GEAR, not STE
    ],
)
def test_bad_config_values_stop_with_the_key_named(bad, message, capsys):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/fmnist-joint.yaml", [bad])
    assert main(["train", "configs/fmnist-joint.yaml", bad]) == 2
    err = capsys.readouterr().err
    assert message.split()[-1] in err and err.count("\n") == 1


NO_DROPOUT = "model.generator_overrides={token_dropout: 0.0, resid_dropout: 0.0, ffn_dropout: 0.0, class_dropout: 0.0}"


def ar_trainer(run_dir, *extra) -> Trainer:
    cfg = load_config("configs/fmnist-ar.yaml", overrides(run_dir, 2, "model.tokenizer_init=", NO_DROPOUT, *extra))
    return Trainer(cfg)


@pytest.mark.parametrize("option", ["train.grad_accum_steps=2", "train.grad_checkpointing=true"])
def test_accumulation_and_checkpointing_do_not_change_the_update(tmp_path, option):
    plain = ar_trainer(tmp_path / "plain")
    plain.fit()
    other = ar_trainer(tmp_path / "other", option)
    other.fit()
    a, b = plain.m.generator.state_dict(), other.m.generator.state_dict()
    assert a.keys() == b.keys(), "checkpointing wrappers must not leak into parameter names"
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    assert not torch.equal(a["tok_embeddings.weight"], ar_trainer(tmp_path / "fresh").m.generator.tok_embeddings.weight)
