"""The discriminator carried across stages: from a tokenizer run's checkpoint or a GEAR file's ``discriminator``
(``model.tokenizer_init``, or ``model.discriminator_init``), fresh only when there is none, refused when its shapes
do not fit, and never reloaded by a resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from gear.cli import main
from gear.config import ConfigError, load_config
from gear.data.fashion_mnist import resolve_root
from gear.files import load_tensors
from gear.losses.discriminator import PatchGANDiscriminator
from gear.train import checkpoint as ckpt
from gear.train.build import discriminator_start
from gear.train.loop import Trainer
from gear.train.stage import build_modules
from helpers import TINY_RUN
from test_export import gear_layout
from test_hub import MAIN, cache_file, offline_cache  # noqa: F401 (a fixture)
from test_released import TOKENIZERS, drifted

pytestmark = pytest.mark.skipif(
    not (resolve_root() / "train-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST idx files not installed"
)

TINY_TOKENIZER = "model.tokenizer_overrides={base_channels: 16, z_channels: 32, norm_groups: 8}"
SMALL_DISC = ["loss.disc_channels=8", "loss.disc_layers=2"]  # the GEAR files' discriminator below


def config(stage_yaml: str, run, steps: int, *extra: str):
    return load_config(f"configs/fmnist-{stage_yaml}.yaml", [*TINY_RUN, TINY_TOKENIZER, f"train.out_dir={run}",
                                                             f"train.steps={steps}", f"train.checkpoint_every={steps}",
                                                             f"train.sample_every={steps}", *extra])


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def assert_equal(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def differs(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


def saved_discriminator(run) -> dict[str, torch.Tensor]:
    return load_tensors(ckpt.checkpoint_path(run))["modules"]["discriminator"]


def summary(run) -> dict:
    return json.loads((run / "summary.json").read_text())


def trained_discriminator(channels: int = 8, layers: int = 2, seed: int = 3) -> dict[str, torch.Tensor]:
    """A PatchGAN state unlike any fresh one: weights and BatchNorm statistics moved, a step counter set."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in PatchGANDiscriminator(channels=channels, n_layers=layers).state_dict().items():
        if value.is_floating_point():
            out[key] = value + 0.1 * torch.rand(value.shape, generator=g)  # rand: running_var stays positive
        else:
            out[key] = torch.full_like(value, 1234)
    return out


def gear_file(path, family: str, disc: dict, prefix: str = ""):
    """A GEAR trainer checkpoint (``{vq,lfq,ibq}-with-gan.pt``): the tokenizer's two weight sets, the discriminator."""
    torch.save({"vq": drifted(gear_layout(family)), "vq_ema": gear_layout(family),
                "discriminator": {prefix + k: v for k, v in disc.items()}, "steps": 100}, path)
    return path


def fixture_tokenizer(family: str) -> list[str]:
    """model.tokenizer and its overrides for the released fixtures' tiny architecture."""
    preset, overrides = TOKENIZERS[family]
    text = ", ".join(f"{k}: {list(v) if isinstance(v, tuple) else v}" for k, v in overrides.items())
    return [f"model.tokenizer={preset}", "model.tokenizer_overrides={" + text + "}"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A 2-step tokenizer run: its checkpoint holds a trained discriminator (loss.gan_start=0)."""
    run = tmp_path_factory.mktemp("disc") / "tok"
    assert main(["train", "configs/fmnist-tokenizer.yaml", *TINY_RUN, TINY_TOKENIZER, f"train.out_dir={run}"]) == 0
    return run


# --- a run directory: make demo's joint stage ---------------------------------------------------------------


def test_a_joint_stage_starts_from_the_tokenizer_runs_discriminator(tok, tmp_path, capsys):
    source = saved_discriminator(tok)
    fresh = Trainer(config("joint", tmp_path / "fresh", 1, f"model.tokenizer_init={tok}", "model.discriminator_init=fresh"))
    assert differs(state(fresh.m.discriminator), source)  # so the comparison below can fail
    capsys.readouterr()

    trainer = Trainer(config("joint", tmp_path / "joint", 1, f"model.tokenizer_init={tok}"))
    assert_equal(state(trainer.m.discriminator), source)  # step 0: the source's tensors, BatchNorm statistics too
    err = capsys.readouterr().err
    assert f"discriminator: from {tok} (checkpoints/last.pt, step 2), its weights only" in err
    trainer.fit()
    assert summary(tmp_path / "joint")["discriminator"] == str(tok)
    saved = load_tensors(ckpt.checkpoint_path(tmp_path / "joint"))
    assert saved["discriminator_init"] == str(tok)
    assert differs(saved["modules"]["discriminator"], source)  # and then it trained
    # weights only: the joint stage's AdamW took its first step (the tokenizer run's took two)
    steps = {int(s["step"]) for s in saved["optimizers"]["discriminator"]["state"].values()}
    assert steps == {1}


def test_the_demos_joint_stage_carries_it(tok, tmp_path):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("demo_stage", Path("scripts/demo_stage.py"))
    demo_stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo_stage)
    # as `make demo-tokenizer` runs it: the joint config with model.tokenizer_init=$(DEMO)/tokenizer
    assert demo_stage.run_stage("configs/fmnist-joint.yaml", tmp_path / "joint",
                                [*TINY_RUN, TINY_TOKENIZER, f"model.tokenizer_init={tok}", "train.steps=1"]) == 0
    assert summary(tmp_path / "joint")["discriminator"] == str(tok)


def test_a_resumed_joint_run_keeps_its_own(tok, tmp_path, capsys):
    source_run = tmp_path / "tok"
    shutil.copytree(tok, source_run)
    run = tmp_path / "joint"
    Trainer(config("joint", run, 1, f"model.tokenizer_init={source_run}")).fit()
    own = saved_discriminator(run)
    assert differs(own, saved_discriminator(source_run))
    ckpt.checkpoint_path(source_run).unlink()  # the source is not read again: it may be gone
    capsys.readouterr()

    resumed = Trainer(config("joint", run, 2, f"model.tokenizer_init={source_run}"), resume=True)
    assert_equal(state(resumed.m.discriminator), own)
    err = capsys.readouterr().err
    assert f"discriminator: the run's own, from its checkpoint (step 1; it started from {source_run})" in err
    assert "discriminator: from" not in err and "discriminator: fresh" not in err
    resumed.fit()
    assert summary(run)["discriminator"] == str(source_run)  # where it started, still


def test_a_continued_tokenizer_stage_carries_it_too(tok, tmp_path):
    trainer = Trainer(config("tokenizer", tmp_path / "more", 1, f"model.tokenizer_init={tok}"))
    assert_equal(state(trainer.m.discriminator), saved_discriminator(tok))


# --- a GEAR file: {vq,lfq,ibq}-with-gan.pt ----------------------------------------------------------------


@pytest.mark.parametrize("family", ["vq", "lfq", "ibq"])
def test_a_joint_stage_starts_from_a_gear_files_discriminator(family, tmp_path):
    disc = trained_discriminator()
    path = gear_file(tmp_path / f"{family}-with-gan.pt", family, disc)
    cfg = load_config(None, [*fixture_tokenizer(family), f"model.tokenizer_init={path}", *SMALL_DISC,
                             "train.stage=joint", "data.image_size=16"])
    start = discriminator_start(cfg)
    assert start.source == str(path) and f"from {path} (its 'discriminator')" in start.note
    m = build_modules(cfg, num_classes=10, target_dim=24, perceptual=False, discriminator=start.weights)
    assert_equal(state(m.discriminator), disc)


def test_a_joint_run_from_a_gear_file_says_so(tmp_path, capsys):
    disc = trained_discriminator()
    path = gear_file(tmp_path / "vq-with-gan.pt", "vq", disc, prefix="module.")  # saved from DDP
    run = tmp_path / "joint"
    cfg = config("joint", run, 1, *fixture_tokenizer("vq"), f"model.tokenizer_init={path}", *SMALL_DISC,
                 "data.image_size=16")
    trainer = Trainer(cfg)
    assert_equal(state(trainer.m.discriminator), disc)
    assert f"discriminator: from {path} (its 'discriminator')" in capsys.readouterr().err
    trainer.fit()
    assert summary(run)["discriminator"] == str(path)


def test_the_warm_up_file_on_the_hub_gives_its_discriminator(offline_cache, tmp_path):
    disc = trained_discriminator()
    local = gear_file(tmp_path / "vq-with-gan.pt", "vq", disc)
    cache_file(offline_cache, "BinLin203/Warmup-VQ", "vq-with-gan.pt", local.read_bytes(), MAIN)
    ref = "hf://BinLin203/Warmup-VQ/vq-with-gan.pt"
    cfg = load_config(None, [*fixture_tokenizer("vq"), f"model.tokenizer_init={ref}", *SMALL_DISC,
                             "train.stage=joint", "data.image_size=16"])
    start = discriminator_start(cfg)
    assert start.source == ref  # summary.json names the reference, not the cache path
    m = build_modules(cfg, num_classes=10, target_dim=24, perceptual=False, discriminator=start.weights)
    assert_equal(state(m.discriminator), disc)


# --- fresh, explicit, refused ------------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["none", "model directory", "file without one"])
def test_a_fresh_discriminator_is_reported(init, tok, tmp_path, capsys):
    if init == "file without one":
        path = tmp_path / "vq_ds16_c2i.pt"
        torch.save({"model": gear_layout("vq")}, path)
        extra = [*fixture_tokenizer("vq"), f"model.tokenizer_init={path}", "data.image_size=16", *SMALL_DISC]
        why = f"model.tokenizer_init={path} holds no 'discriminator'"
    elif init == "model directory":
        extra = [f"model.tokenizer_init={tok / 'tokenizer'}"]
        why = "a model directory never does"
    else:
        extra, why = ["model.tokenizer_init="], ""
    run = tmp_path / "joint"
    trainer = Trainer(config("joint", run, 1, *extra))
    if init == "model directory":  # the run directory around it holds one; the model directory does not
        assert differs(state(trainer.m.discriminator), saved_discriminator(tok))
    err = capsys.readouterr().err
    assert "discriminator: fresh" in err and why in err
    trainer.fit()
    assert summary(run)["discriminator"] == "fresh"
    assert "discriminator_init" not in load_tensors(ckpt.checkpoint_path(run))  # the checkpoint of a fresh start is as before


def test_a_fresh_discriminator_is_the_same_in_both_stages(tmp_path):
    """A joint stage builds its AR and projector before the discriminator: their draws must not change a fresh one
    (the study's tokenizer+ and GEAR lambda_tok=0 continuations then start from the same)."""
    def fresh(stage_yaml: str, seed: int) -> dict[str, torch.Tensor]:
        cfg = config(stage_yaml, tmp_path, 1, "model.tokenizer_init=", f"train.seed={seed}")
        torch.manual_seed(seed)  # as the trainer seeds the build
        return state(build_modules(cfg, num_classes=10, target_dim=24, perceptual=False).discriminator)

    assert_equal(fresh("joint", 0), fresh("tokenizer", 0))
    assert differs(fresh("tokenizer", 1), fresh("tokenizer", 0))


def test_discriminator_init_overrides_the_tokenizer_inits(tok, tmp_path, capsys):
    disc = trained_discriminator(channels=64, layers=3)  # the tokenizer run's shapes (the defaults)
    path = gear_file(tmp_path / "vq-with-gan.pt", "vq", disc)
    trainer = Trainer(config("joint", tmp_path / "a", 1, f"model.tokenizer_init={tok}", f"model.discriminator_init={path}"))
    assert_equal(state(trainer.m.discriminator), disc)
    other = tmp_path / "other"  # another run directory as the discriminator's source
    shutil.copytree(tok, other)
    trainer = Trainer(config("joint", tmp_path / "b", 1, "model.tokenizer_init=", f"model.discriminator_init={other}"))
    assert_equal(state(trainer.m.discriminator), saved_discriminator(tok))
    assert f"discriminator: from {other}" in capsys.readouterr().err
    with pytest.raises(ValueError, match="holds no discriminator") as excinfo:  # named explicitly: must hold one
        discriminator_start(config("joint", tmp_path / "c", 1, f"model.discriminator_init={tok / 'tokenizer'}"))
    assert "\n" not in str(excinfo.value)
    with pytest.raises(ConfigError, match="model.discriminator_init"):  # no discriminator in that stage
        config("ar", tmp_path / "d", 1, f"model.discriminator_init={tok}")


def test_a_mismatched_discriminator_is_refused_in_one_line(tok, tmp_path, capsys):
    code = main(["train", "configs/fmnist-joint.yaml", *TINY_RUN, TINY_TOKENIZER, f"model.tokenizer_init={tok}",
                 "loss.disc_channels=32", f"train.out_dir={tmp_path / 'joint'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("gear train: error: the discriminator of")
    assert "loss.disc_channels=32" in err[0] and "mis-shaped" in err[0]
    assert "it looks like disc_channels=64, disc_layers=3" in err[0]
    assert not ckpt.has_checkpoint(tmp_path / "joint")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="SyncBatchNorm conversion happens on CUDA only")
def test_the_loaded_weights_survive_the_syncbatchnorm_conversion(tmp_path):
    disc = trained_discriminator()
    path = gear_file(tmp_path / "vq-with-gan.pt", "vq", disc)
    cfg = load_config(None, [*fixture_tokenizer("vq"), f"model.tokenizer_init={path}", *SMALL_DISC,
                             "train.stage=joint", "data.image_size=16"])
    m = build_modules(cfg, num_classes=10, device="cuda", target_dim=24, perceptual=False, distributed=True,
                      discriminator=discriminator_start(cfg).weights)
    assert any(isinstance(mod, torch.nn.SyncBatchNorm) for mod in m.discriminator.modules())
    assert_equal(state(m.discriminator), disc)
