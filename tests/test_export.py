"""gear export: LlamaGen's and GEAR's checkpoint layouts, checked against the anchors' published key layouts.

The official layouts are the tiny fixtures of tests/fixtures/released/ (state dicts of the anchors' own classes:
LlamaGen's VQModel and Transformer, Open-MAGVIT2's LFQ, SEED-Voken's IBQ in taming names), as in test_released.py.
GEAR's models use those same names (its VQModel without the ``codebook_used`` buffer), so a file "loads strictly"
there when its keys and shapes are exactly the fixture's.
"""

from __future__ import annotations

import pathlib

import pytest
import torch

from gear.cli import main
from gear.files import load_tensors
from gear.models.export import export
from helpers import TINY_RUN
from test_released import GPT, TOKENIZERS, _override_args, drifted, lightning, weights

USAGE = "quantize.codebook_used"


def gear_layout(family: str) -> dict[str, torch.Tensor]:
    """GEAR's VQModel / LFQModel / IBQModel state dict for the fixture architecture."""
    state = weights(family)
    return {k: v for k, v in state.items() if k != USAGE} if family == "vq" else state


def assert_same_tensors(got: dict, want: dict) -> None:
    """Strict: the same keys, and every tensor equal (dtype, shape and values)."""
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


def convert(src: pathlib.Path, preset_and_overrides, out: pathlib.Path) -> None:
    preset, overrides = preset_and_overrides
    assert main(["convert", str(src), "--preset", preset, *_override_args(overrides), "--out", str(out)]) == 0


# --- round trips: convert, then export, gives back the tensors convert took ------------------


def test_llamagen_round_trip_of_a_vq_tokenizer_and_a_gpt(tmp_path, capsys):
    torch.save({"model": weights("vq")}, tmp_path / "vq_ds16_c2i.pt")
    torch.save({"model": weights("gpt")}, tmp_path / "c2i_B_256.pt")
    convert(tmp_path / "vq_ds16_c2i.pt", TOKENIZERS["vq"], tmp_path / "run" / "tokenizer")
    convert(tmp_path / "c2i_B_256.pt", GPT, tmp_path / "run" / "generator")
    capsys.readouterr()
    assert main(["export", str(tmp_path / "run"), "--format", "llamagen", "--out", str(tmp_path / "llamagen")]) == 0
    printed = capsys.readouterr().out
    assert "vq_ds16_c2i.pt" in printed and "c2i_*.pt" in printed
    tok = load_tensors(tmp_path / "llamagen" / "tokenizer.pt")
    gpt = load_tensors(tmp_path / "llamagen" / "generator.pt")
    assert list(tok) == ["model"] and list(gpt) == ["model"]
    assert_same_tensors(tok["model"], weights("vq"))   # LlamaGen's VQModel names, codebook_used included
    assert_same_tensors(gpt["model"], weights("gpt"))  # LlamaGen's Transformer names; freqs_cis is recomputed there


@pytest.mark.parametrize("family", ["vq", "lfq", "ibq"])
@pytest.mark.parametrize("layout", ["gear", "released"])
def test_gear_round_trip_for_every_family(family, layout, tmp_path, capsys):
    ema, live = gear_layout(family), drifted(gear_layout(family))
    if layout == "gear":  # GEAR's own file: {vq, vq_ema, discriminator}; convert takes vq_ema
        src = tmp_path / f"{family}-with-gan.pt"
        torch.save({"vq": live, "vq_ema": ema, "discriminator": {"main.0.weight": torch.randn(4, 3, 4, 4)}}, src)
    elif family == "vq":  # LlamaGen's vq_ds16_c2i.pt
        ema = weights("vq")
        src = tmp_path / "vq_ds16_c2i.pt"
        torch.save({"model": ema}, src)
    else:  # Open-MAGVIT2 / IBQ Lightning checkpoint; convert takes the model_ema shadows
        src = tmp_path / "pretrain.ckpt"
        torch.save({"state_dict": lightning(live, ema)}, src)
    convert(src, TOKENIZERS[family], tmp_path / "tok")
    capsys.readouterr()
    assert main(["export", str(tmp_path / "tok"), "--format", "gear", "--out", str(tmp_path / "gear.pt")]) == 0
    assert "no discriminator" in capsys.readouterr().out  # a model directory has none
    out = load_tensors(tmp_path / "gear.pt")
    assert set(out) == {"vq", "vq_ema", "args"}
    want = {k: v for k, v in ema.items() if k != USAGE}  # GEAR's VQModel has no usage buffer
    assert_same_tensors(out["vq_ema"], want)
    assert_same_tensors(out["vq"], want)  # one weight set in a model directory
    names = {k: tuple(v.shape) for k, v in gear_layout(family).items()}
    assert {k: tuple(v.shape) for k, v in out["vq"].items()} == names  # GEAR's model names (taming for IBQ)
    assert out["args"]["codebook_size"] == TOKENIZERS[family][1]["codebook_size"]
    assert "vq_model" not in out["args"]  # a tiny architecture has no GEAR registry name


def test_a_gear_export_is_read_back_by_the_released_reader(tmp_path):
    """The other direction of the same layout: what export writes, `gear convert` reads (taming names for IBQ)."""
    src = tmp_path / "ibq.pt"
    torch.save({"vq_ema": gear_layout("ibq")}, src)
    convert(src, TOKENIZERS["ibq"], tmp_path / "a")
    export(tmp_path / "a", "gear", tmp_path / "ibq-gear.pt")
    convert(tmp_path / "ibq-gear.pt", TOKENIZERS["ibq"], tmp_path / "b")
    a, b = (load_tensors(tmp_path / "ibq-gear.pt")["vq"], torch.load(tmp_path / "ibq.pt")["vq_ema"])
    assert_same_tensors(a, b)
    from safetensors.torch import load_file

    assert_same_tensors(load_file(tmp_path / "b" / "model.safetensors"), load_file(tmp_path / "a" / "model.safetensors"))


# --- a run directory: both weight sets, the discriminator -----------------------------------


@pytest.fixture(scope="module")
def joint_run(tmp_path_factory):
    """A 2-step joint run on Fashion-MNIST with the anchors' 32 GroupNorm groups (so both layouts can hold it)."""
    run = tmp_path_factory.mktemp("export") / "joint"
    assert main(["train", "configs/fmnist-joint.yaml", *TINY_RUN, "model.tokenizer_init=", f"train.out_dir={run}",
                 "model.tokenizer_overrides={base_channels: 32, z_channels: 32, norm_groups: 32}"]) == 0
    return run


def test_a_run_exports_to_gear_with_its_discriminator_and_both_weight_sets(joint_run, tmp_path):
    from safetensors.torch import load_file

    done = export(joint_run, "gear", tmp_path / "gear.pt")
    out = load_tensors(tmp_path / "gear.pt")
    assert set(out) == {"vq", "vq_ema", "discriminator", "ar", "ema", "args"}
    saved = {name: load_file(joint_run / name / "model.safetensors")
             for name in ("tokenizer", "tokenizer-live", "generator", "generator-live")}
    drop = lambda s: {k: v for k, v in s.items() if k != USAGE}  # noqa: E731
    assert_same_tensors(out["vq_ema"], drop(saved["tokenizer"]))
    assert_same_tensors(out["vq"], drop(saved["tokenizer-live"]))
    assert_same_tensors(out["ema"], saved["generator"])
    assert_same_tensors(out["ar"], saved["generator-live"])
    assert not all(torch.equal(out["vq"][k], out["vq_ema"][k]) for k in out["vq"])  # really two weight sets
    disc = load_tensors(joint_run / "checkpoints" / "last.pt")["modules"]["discriminator"]
    assert_same_tensors(out["discriminator"], disc)
    assert all(k.startswith("main.") for k in out["discriminator"])  # NLayerDiscriminator's names
    assert out["args"]["image_size"] == 32 and out["args"]["num_classes"] == 10
    assert "discriminator" in done.describe()


def test_a_run_exports_to_llamagen_ema_by_default_live_on_request(joint_run, tmp_path):
    from safetensors.torch import load_file

    export(joint_run, "llamagen", tmp_path / "ema")
    export(joint_run, "llamagen", tmp_path / "live", live=True)
    for folder, suffix in (("ema", ""), ("live", "-live")):
        tok = load_tensors(tmp_path / folder / "tokenizer.pt")["model"]
        gpt = load_tensors(tmp_path / folder / "generator.pt")["model"]
        assert_same_tensors(tok, load_file(joint_run / f"tokenizer{suffix}" / "model.safetensors"))
        assert_same_tensors(gpt, load_file(joint_run / f"generator{suffix}" / "model.safetensors"))
    # the fixture's LlamaGen key layout, at this run's sizes: the same names
    assert set(tok) >= {"quantize.embedding.weight", USAGE, "encoder.conv_in.weight", "post_quant_conv.weight"}
    assert not any(k.startswith(("encoder.down.", "decoder.up.")) for k in tok)


# --- refusals: one line, nothing written -----------------------------------------------------


@pytest.mark.parametrize("family", ["lfq", "ibq"])
def test_llamagen_refuses_lfq_and_ibq(family, tmp_path, capsys):
    torch.save({"vq_ema": gear_layout(family)}, tmp_path / "src.pt")
    convert(tmp_path / "src.pt", TOKENIZERS[family], tmp_path / "tok")
    capsys.readouterr()
    assert main(["export", str(tmp_path / "tok"), "--format", "llamagen", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gear export: error: LlamaGen's layout holds VQ tokenizers only") and err.count("\n") == 1
    assert "--format gear" in err and not (tmp_path / "out").exists()


def test_other_refusals(tmp_path, capsys):
    torch.save({"model": weights("vq")}, tmp_path / "vq.pt")
    convert(tmp_path / "vq.pt", TOKENIZERS["vq"], tmp_path / "tok")
    convert(tmp_path / "vq.pt", ("vq-tiny", {**TOKENIZERS["vq"][1], "norm_groups": 16}), tmp_path / "tok16")
    capsys.readouterr()
    cases = [
        (["export", str(tmp_path / "vq.pt"), "--format", "gear", "--out", str(tmp_path / "x.pt")], "gear convert"),
        (["export", str(tmp_path / "tok"), "--format", "llamagen", "--live", "--out", str(tmp_path / "o")],
         "applies to run directories"),
        (["export", str(tmp_path / "tok16"), "--format", "gear", "--out", str(tmp_path / "x.pt")], "norm_groups=16"),
        (["export", str(tmp_path / "absent"), "--format", "gear", "--out", str(tmp_path / "x.pt")], "no such"),
    ]
    for argv, words in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("gear export: error:") and err.count("\n") == 1 and words in err, err
    assert main(["export", str(tmp_path / "tok"), "--format", "gear", "--out", str(tmp_path / "x.pt")]) == 0
    before = (tmp_path / "x.pt").read_bytes()
    assert main(["export", str(tmp_path / "tok"), "--format", "gear", "--out", str(tmp_path / "x.pt")]) == 2
    assert "already exists" in capsys.readouterr().err and (tmp_path / "x.pt").read_bytes() == before
