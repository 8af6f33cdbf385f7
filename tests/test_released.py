"""Released checkpoint files: layouts, strictness, and numerics against the anchors' own classes.

tests/fixtures/released/ holds tiny random-weight models built with the official classes
(Open-MAGVIT2 LFQ, SEED-Voken IBQ, LlamaGen VQ and GPT) and their outputs; see its README.md.
"""

from __future__ import annotations

import pathlib

import pytest
import torch
from safetensors.torch import load_file, save_file

import gear
from gear.cli import main
from gear.config import load_config
from gear.models.autoencoder import build_tokenizer
from gear.models.magvit2 import depth_to_space
from gear.models.released import read_checkpoint, released_generator, released_tokenizer
from gear.train.build import generator_from_config, tokenizer_from_config

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "released"

# The fixtures' architectures as this project's presets plus overrides (GroupNorm: 32 groups, as upstream).
TOKENIZERS = {
    "lfq": ("lfq-tiny", dict(codebook_size=64, codebook_dim=6, z_channels=6, base_channels=32, channel_mult=(1, 2),
                             num_res_blocks=1, norm_groups=32)),
    "ibq": ("ibq-tiny", dict(codebook_size=64, codebook_dim=16, z_channels=32, base_channels=32, channel_mult=(1, 1),
                             num_res_blocks=1, norm_groups=32)),
    "vq": ("vq-tiny", dict(codebook_size=64, codebook_dim=8, z_channels=32, base_channels=32, channel_mult=(1, 1),
                           num_res_blocks=1, norm_groups=32)),
}
GPT = ("gpt-tiny", dict(vocab_size=64, grid_size=4, num_classes=10, dim=64, n_layer=2, n_head=4, multiple_of=32))
BUFFERS = {"quantize.codebook_used"}  # LitEma shadows parameters only


def weights(name: str) -> dict[str, torch.Tensor]:
    """A fixture's official state dict (stored as float16, exactly: its values lie on the float16 grid)."""
    return {k: v.float() for k, v in load_file(str(FIXTURES / f"{name}_weights.safetensors")).items()}


def io(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / f"{name}_io.safetensors"))


def drifted(state: dict[str, torch.Tensor], seed: int = 7) -> dict[str, torch.Tensor]:
    """'Live' weights that differ from ``state`` (the EMA) everywhere but in buffers."""
    g = torch.Generator().manual_seed(seed)
    return {k: v if k in BUFFERS else v + 0.01 * torch.randn(v.shape, generator=g) for k, v in state.items()}


def lightning(live: dict, ema: dict) -> dict:
    """An Open-MAGVIT2 / IBQ Lightning state_dict: live keys, LitEma shadows (dots removed), loss module keys."""
    flat = dict(live)
    flat["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 3, 3)
    flat["loss.logvar"] = torch.zeros(())
    flat["model_ema.decay"] = torch.tensor(0.999)
    flat["model_ema.num_updates"] = torch.tensor(1234, dtype=torch.int32)
    for key, value in ema.items():
        if key not in BUFFERS:
            flat["model_ema." + key.replace(".", "")] = value
    flat["model_ema.lossdiscriminatormain0weight"] = torch.randn(4, 3, 3, 3)
    return flat


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# --- the 16x presets --------------------------------------------------------------------


def test_16x_presets_have_the_released_parameter_counts():
    with torch.device("meta"):
        counts = {name: sum(p.numel() for p in build_tokenizer(name).parameters()) for name in ("vq-16", "lfq-16", "ibq-16")}
    assert counts == {"vq-16": 71_883_403, "lfq-16": 115_094_033, "ibq-16": 110_982_019}


def test_lfq16_has_the_open_magvit2_names_and_shapes():
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in build_tokenizer("lfq-16").state_dict().items()}
    expected = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.1.block.3.conv2.weight": (128, 128, 3, 3),
        "encoder.down.2.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.3.downsample.weight": (256, 256, 3, 3),
        "encoder.down.3.downsample.bias": (256,),
        "encoder.mid_block.3.norm2.weight": (512,),
        "encoder.conv_out.weight": (14, 512, 1, 1),
        "decoder.conv_in.weight": (512, 14, 3, 3),
        "decoder.mid_block.3.conv1.weight": (512, 512, 3, 3),
        "decoder.adaptive.4.gamma.weight": (512, 14),
        "decoder.adaptive.3.beta.bias": (512,),
        "decoder.adaptive.0.gamma.weight": (128, 14),
        "decoder.up.3.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.up.1.upsample.conv1.weight": (512, 128, 3, 3),
        "decoder.up.0.block.3.conv1.weight": (128, 128, 3, 3),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    assert {k: shapes.get(k) for k in expected} == expected
    absent = ["encoder.conv_in.bias", "encoder.down.0.block.0.conv1.bias", "encoder.down.4.downsample.weight",
              "decoder.up.0.upsample.conv1.weight", "decoder.adaptive.0.gn.weight", "quant_conv.weight"]
    assert not [k for k in absent if k in shapes]
    assert not any(".attn" in k or "mid.1" in k for k in shapes)  # no attention anywhere


def test_ibq16_has_four_res_blocks_and_a_256_codebook():
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in build_tokenizer("ibq-16").state_dict().items()}
    assert shapes["encoder.conv_blocks.0.res.3.conv1.weight"] == (128, 128, 3, 3)
    assert shapes["encoder.conv_blocks.4.attn.3.q.weight"] == (512, 512, 1, 1)
    assert shapes["decoder.conv_blocks.4.res.4.conv2.weight"] == (128, 128, 3, 3)
    assert shapes["quant_conv.weight"] == (256, 256, 1, 1) and shapes["quantize.embedding.weight"] == (16384, 256)
    assert "encoder.conv_blocks.0.res.4.conv1.weight" not in shapes


def test_depth_to_space_is_channel_major_not_pixel_shuffle():
    c = 3
    x = torch.randn(2, 4 * c, 5, 6)
    y = depth_to_space(x, 2)
    assert y.shape == (2, c, 10, 12)
    for i in range(2):
        for j in range(2):  # input channel (i * 2 + j) * C + c lands at row offset i, column offset j
            assert torch.equal(y[:, :, i::2, j::2], x[:, (i * 2 + j) * c:(i * 2 + j + 1) * c])
    assert not torch.equal(y, torch.nn.functional.pixel_shuffle(x, 2))


# --- numerics against the official classes ------------------------------------------------


@pytest.mark.parametrize("family", ["lfq", "ibq", "vq"])
def test_released_tokenizers_reproduce_the_official_indices_and_reconstructions(family, tmp_path):
    preset, overrides = TOKENIZERS[family]
    official, ref = weights(family), io(family)
    if family == "vq":  # LlamaGen: {"model": state_dict}
        torch.save({"model": official}, tmp_path / "vq_ds16_c2i.pt")
        path = tmp_path / "vq_ds16_c2i.pt"
    else:  # Lightning checkpoint whose EMA shadows hold the reference weights
        torch.save({"state_dict": lightning(drifted(official), official), "global_step": 10}, tmp_path / "x.ckpt")
        path = tmp_path / "x.ckpt"
    tok = gear.load_tokenizer(path, preset=preset, **overrides).eval()
    with torch.no_grad():
        out = tok(ref["images"])
        assert torch.equal(out.quant.indices, ref["indices"])
        assert rel_err(out.reconstruction, ref["reconstruction"]) < 1e-5
        assert rel_err(tok.decode(ref["indices"]), ref["reconstruction"]) < 1e-5
    if family != "vq":  # the live weights are really different ones
        live = gear.load_tokenizer(path, preset=preset, ema=False, **overrides).eval()
        with torch.no_grad():
            assert rel_err(live(ref["images"]).reconstruction, ref["reconstruction"]) > 1e-3


@pytest.mark.parametrize("layout", ["model", "bare"])
def test_released_gpt_reproduces_the_official_logits(layout, tmp_path):
    preset, overrides = GPT
    official, ref = weights("gpt"), io("gpt")
    torch.save({"model": official} if layout == "model" else official, tmp_path / "c2i.pt")
    gpt = gear.load_generator(tmp_path / "c2i.pt", preset=preset, **overrides).eval()
    with torch.no_grad():
        logits = gpt(ref["tokens"], ref["labels"]).logits
    assert logits.shape == ref["logits"].shape == (2, 16, 64)
    assert rel_err(logits, ref["logits"]) < 1e-5


# --- layouts: the right tensors land on the right keys ---------------------------------------


def _write(layout: str, live: dict, ema: dict, path: pathlib.Path) -> pathlib.Path:
    """``path`` in one released layout; its EMA weights are ``ema`` where the layout has any."""
    if layout == "lightning":
        torch.save({"state_dict": lightning(live, ema), "epoch": 3}, path.with_suffix(".ckpt"))
        return path.with_suffix(".ckpt")
    if layout == "lightning-safetensors":
        save_file(lightning(live, ema), path.with_suffix(".safetensors"))
        return path.with_suffix(".safetensors")
    content = {
        "model": {"model": live, "ema": ema},
        "bare": live,
        "trainer": {"vq": live, "vq_ema": ema, "ar": {"x": torch.zeros(1)}, "ema": {"x": torch.zeros(1)},
                    "discriminator": {"w": torch.zeros(2)}, "steps": 5},
        "prefixed": {"model": {f"_orig_mod.{k}": v for k, v in live.items()},
                     "ema": {f"module._orig_mod.{k}": v for k, v in ema.items()}},
        "safetensors": None,
    }[layout]
    if layout == "safetensors":
        save_file(live, path.with_suffix(".safetensors"))
        return path.with_suffix(".safetensors")
    torch.save(content, path.with_suffix(".pt"))
    return path.with_suffix(".pt")


LAYOUTS = ["lightning", "lightning-safetensors", "model", "bare", "trainer", "prefixed", "safetensors"]
HAS_EMA = {"lightning", "lightning-safetensors", "model", "trainer", "prefixed"}


@pytest.mark.parametrize("family", ["ibq", "lfq"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_loads_the_ema_weights_by_default_and_the_live_ones_on_request(family, layout, tmp_path):
    preset, overrides = TOKENIZERS[family]
    ema, live = weights(family), drifted(weights(family))
    # what each weight set looks like once loaded (the bare layout is checked against the official numbers above)
    save_file(ema, tmp_path / "ema.safetensors")
    save_file(live, tmp_path / "live.safetensors")
    want_ema = released_tokenizer(tmp_path / "ema.safetensors", preset, **overrides)[0].state_dict()
    want_live = released_tokenizer(tmp_path / "live.safetensors", preset, **overrides)[0].state_dict()
    path = _write(layout, live, ema, tmp_path / "released")
    got_ema, report = released_tokenizer(path, preset, **overrides)
    got_live, _ = released_tokenizer(path, preset, ema=False, **overrides)
    want = want_ema if layout in HAS_EMA else want_live
    for key, value in got_ema.state_dict().items():
        assert torch.equal(value, want[key]), key
    for key, value in got_live.state_dict().items():
        assert torch.equal(value, want_live[key]), key
    assert ("EMA" in report.source) == (layout in HAS_EMA)
    if layout.startswith("lightning"):
        assert "with model_ema shadows" in report.layout
        assert report.skipped == 4  # loss.* (2), model_ema.decay / num_updates
    if family == "ibq":
        assert "taming" in report.layout  # encoder.down.* -> encoder.conv_blocks.*, decoder.up reversed
    if layout == "prefixed":
        assert "'module.'" in report.layout and "'_orig_mod.'" in report.layout


def test_a_gear_trainer_dict_gives_the_tokenizer_and_the_generator_their_own_weights(tmp_path):
    tok_ema, tok_live = weights("vq"), drifted(weights("vq"))
    gpt_ema, gpt_live = weights("gpt"), drifted(weights("gpt"))
    torch.save({"vq": tok_live, "vq_ema": tok_ema, "ar": gpt_live, "ema": gpt_ema, "steps": 100}, tmp_path / "gear.pt")
    for ema in (True, False):
        tok = gear.load_tokenizer(tmp_path / "gear.pt", ema=ema, preset=TOKENIZERS["vq"][0], **TOKENIZERS["vq"][1])
        gpt = gear.load_generator(tmp_path / "gear.pt", ema=ema, preset=GPT[0], **GPT[1])
        tok_want, gpt_want = (tok_ema, gpt_ema) if ema else (tok_live, gpt_live)
        assert all(torch.equal(v, tok_want[k]) for k, v in tok.state_dict().items())
        assert all(torch.equal(v, gpt_want[k]) for k, v in gpt.state_dict().items())


def test_a_vq_file_without_the_usage_buffer_loads(tmp_path):
    # GEAR's own VQ model has no quantize.codebook_used; the buffer never changes outputs
    state = {k: v for k, v in weights("vq").items() if k != "quantize.codebook_used"}
    torch.save({"vq": state}, tmp_path / "gear-vq.pt")
    tok = gear.load_tokenizer(tmp_path / "gear-vq.pt", preset=TOKENIZERS["vq"][0], **TOKENIZERS["vq"][1]).eval()
    ref = io("vq")
    with torch.no_grad():
        assert torch.equal(tok.encode(ref["images"]), ref["indices"])


# --- errors: one line each, nothing half-loaded ---------------------------------------------


def test_a_truncated_file_is_refused(tmp_path):
    preset, overrides = TOKENIZERS["lfq"]
    torch.save({"model": weights("lfq")}, tmp_path / "full.pt")
    save_file(weights("lfq"), tmp_path / "full.safetensors")
    for name in ("full.pt", "full.safetensors"):
        data = (tmp_path / name).read_bytes()
        cut = tmp_path / f"cut{pathlib.Path(name).suffix}"
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(ValueError) as excinfo:
            released_tokenizer(cut, preset, **overrides)
        assert "truncated" in one_line_error(excinfo)


def test_a_file_of_another_architecture_names_the_layout_and_the_offending_keys(tmp_path):
    torch.save({"state_dict": lightning(weights("lfq"), weights("lfq"))}, tmp_path / "pretrain256_16384.ckpt")
    preset, overrides = TOKENIZERS["ibq"]
    with pytest.raises(ValueError) as excinfo:
        released_tokenizer(tmp_path / "pretrain256_16384.ckpt", preset, **overrides)
    message = one_line_error(excinfo)
    assert "Lightning checkpoint" in message and "does not fit tokenizer preset 'ibq-tiny'" in message
    assert "missing" in message and "unexpected" in message and "Open-MAGVIT2" in message


def test_a_missing_key_and_a_wrong_shape_are_named(tmp_path):
    preset, overrides = TOKENIZERS["lfq"]
    state = weights("lfq")
    del state["decoder.adaptive.1.beta.bias"]
    torch.save({"model": state}, tmp_path / "m.pt")
    with pytest.raises(ValueError) as excinfo:
        released_tokenizer(tmp_path / "m.pt", preset, **overrides)
    assert "missing 1: decoder.adaptive.1.beta.bias" in one_line_error(excinfo)
    torch.save(weights("gpt"), tmp_path / "gpt.pt")
    with pytest.raises(ValueError) as excinfo:
        released_generator(tmp_path / "gpt.pt", GPT[0], **{**GPT[1], "vocab_size": 128})
    message = one_line_error(excinfo)
    assert "mis-shaped" in message and "tok_embeddings.weight (64, 64) vs (128, 64)" in message
    assert "vocab_size=64" in message  # the hint says what the file holds


def test_a_file_of_the_other_kind_is_refused(tmp_path):
    torch.save({"model": weights("vq")}, tmp_path / "vq.pt")
    with pytest.raises(ValueError) as excinfo:
        gear.load_generator(tmp_path / "vq.pt", preset=GPT[0], **GPT[1])
    assert "does not fit generator preset" in one_line_error(excinfo)
    torch.save({"vq": weights("vq")}, tmp_path / "tok-only.pt")
    with pytest.raises(ValueError) as excinfo:
        gear.load_generator(tmp_path / "tok-only.pt", preset=GPT[0], **GPT[1])
    assert "holds no generator weights" in one_line_error(excinfo)


class _RunsCode:
    """Unpickling this touches a file: what a malicious checkpoint could do."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_a_pickled_object_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"model": weights("vq"), "args": _RunsCode(marker)}, tmp_path / "c2i_B_256.pt")
    with pytest.raises(ValueError) as excinfo:
        released_tokenizer(tmp_path / "c2i_B_256.pt", TOKENIZERS["vq"][0], **TOKENIZERS["vq"][1])
    message = one_line_error(excinfo)
    assert "could run code" in message and "not loaded" in message and "a pickled getattr" in message
    assert not marker.exists()


def test_shadows_must_cover_every_parameter_when_the_ema_is_taken(tmp_path):
    preset, overrides = TOKENIZERS["lfq"]
    flat = lightning(weights("lfq"), weights("lfq"))
    del flat["model_ema.encoderconv_inweight"]
    torch.save({"state_dict": flat}, tmp_path / "x.ckpt")
    with pytest.raises(ValueError) as excinfo:
        released_tokenizer(tmp_path / "x.ckpt", preset, **overrides)
    assert "no EMA shadow for 1 parameters (encoder.conv_in.weight)" in one_line_error(excinfo)
    released_tokenizer(tmp_path / "x.ckpt", preset, ema=False, **overrides)  # the live weights are complete
    flat = lightning(weights("lfq"), weights("lfq"))
    flat["model_ema.lossperceptual_lossnetslice10weight"] = torch.zeros(1)  # a filtered-out loss key's shadow: skipped
    flat["model_ema.encoderextraweight"] = torch.zeros(1)
    torch.save({"state_dict": flat}, tmp_path / "y.ckpt")
    with pytest.raises(ValueError) as excinfo:
        released_tokenizer(tmp_path / "y.ckpt", preset, **overrides)
    assert "EMA shadows without a live weight of the same name: model_ema.encoderextraweight" in one_line_error(excinfo)


def test_a_rope_table_in_the_file_must_match_the_grid(tmp_path):
    state = weights("gpt")
    state["freqs_cis"] = torch.zeros(1 + 24 * 24, 8, 2)  # a 384 px model's table
    torch.save({"model": state}, tmp_path / "c2i_XL_384.pt")
    with pytest.raises(ValueError) as excinfo:
        released_generator(tmp_path / "c2i_XL_384.pt", GPT[0], **GPT[1])
    assert "pass grid_size=24" in one_line_error(excinfo)
    gpt, _ = released_generator(tmp_path / "c2i_XL_384.pt", GPT[0], **{**GPT[1], "grid_size": 24})
    assert gpt.config.seq_len == 576


def test_paths_and_presets_must_agree(tmp_path):
    torch.save(weights("vq"), tmp_path / "vq.pt")
    with pytest.raises(ValueError, match="pass preset=NAME"):
        gear.load_tokenizer(tmp_path / "vq.pt")
    with pytest.raises(ValueError, match="preset and overrides apply only"):
        gear.load_tokenizer(tmp_path, preset="vq-tiny")
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        gear.load_tokenizer(tmp_path / "absent.ckpt", preset="vq-tiny")
    assert read_checkpoint(tmp_path / "vq.pt").keys() == weights("vq").keys()


# --- gear convert and model.*_init ----------------------------------------------------------


def _override_args(overrides: dict) -> list[str]:
    return [f"{k}={list(v) if isinstance(v, tuple) else v}" for k, v in overrides.items()]


def test_convert_writes_a_model_directory_every_command_loads(tmp_path, capsys):
    preset, overrides = TOKENIZERS["lfq"]
    ema = weights("lfq")
    torch.save({"state_dict": lightning(drifted(ema), ema)}, tmp_path / "pretrain.ckpt")
    out = tmp_path / "run" / "tokenizer"
    assert main(["convert", str(tmp_path / "pretrain.ckpt"), "--preset", preset, *_override_args(overrides),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Lightning checkpoint" in printed and "EMA shadows" in printed
    tok = gear.load_tokenizer(tmp_path / "run").eval()
    assert tok.config.backbone == "magvit2" and tok.config.channel_mult == (1, 2)
    ref = io("lfq")
    with torch.no_grad():
        assert rel_err(tok(ref["images"]).reconstruction, ref["reconstruction"]) < 1e-5
    assert main(["convert", str(tmp_path / "pretrain.ckpt"), "--preset", preset, *_override_args(overrides),
                 "--out", str(tmp_path / "live"), "--live"]) == 0
    assert "took the live weights" in capsys.readouterr().out
    live = gear.load_tokenizer(tmp_path / "live")
    assert torch.equal(live.state_dict()["encoder.conv_in.weight"], drifted(ema)["encoder.conv_in.weight"])
    # nothing already saved is overwritten; bad keys are one-line errors
    before = (out / "model.safetensors").read_bytes()
    assert main(["convert", str(tmp_path / "pretrain.ckpt"), "--preset", preset, *_override_args(overrides),
                 "--out", str(out)]) == 2
    assert "already holds a saved model" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before
    assert main(["convert", str(tmp_path / "pretrain.ckpt"), "--preset", preset, "num_blocks=2", "--out",
                 str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gear convert: error:") and err.count("\n") == 1 and "TokenizerConfig" in err


def test_convert_a_gpt_with_its_grid(tmp_path, capsys):
    torch.save(weights("gpt"), tmp_path / "c2i_XXL_384.pt")
    out = tmp_path / "gpt"
    assert main(["convert", str(tmp_path / "c2i_XXL_384.pt"), "--preset", GPT[0], *_override_args(GPT[1]),
                 "--out", str(out)]) == 0
    assert "bare state dict" in capsys.readouterr().out
    gpt = gear.load_generator(out).eval()
    ref = io("gpt")
    with torch.no_grad():
        assert rel_err(gpt(ref["tokens"], ref["labels"]).logits, ref["logits"]) < 1e-5


def test_model_inits_accept_released_files(tmp_path):
    preset, overrides = TOKENIZERS["lfq"]
    torch.save({"state_dict": lightning(drifted(weights("lfq")), weights("lfq"))}, tmp_path / "tok.ckpt")
    torch.save({"model": weights("gpt")}, tmp_path / "gpt.pt")
    gpt_overrides = {k: v for k, v in GPT[1].items() if k not in ("vocab_size", "grid_size", "num_classes")}
    cfg = load_config(None, [
        f"model.tokenizer={preset}", f"model.tokenizer_init={tmp_path / 'tok.ckpt'}",
        "model.tokenizer_overrides={" + ", ".join(f"{k}: {list(v) if isinstance(v, tuple) else v}"
                                                  for k, v in overrides.items()) + "}",
        f"model.generator={GPT[0]}", f"model.generator_init={tmp_path / 'gpt.pt'}",
        "model.generator_overrides={" + ", ".join(f"{k}: {v}" for k, v in gpt_overrides.items()) + "}",
        "data.image_size=8",  # downsample 2 -> the GPT's 4 x 4 grid
    ])
    tok = tokenizer_from_config(cfg)
    want = released_tokenizer(tmp_path / "tok.ckpt", preset, **overrides)[0]
    assert all(torch.equal(v, want.state_dict()[k]) for k, v in tok.state_dict().items())
    gpt = generator_from_config(cfg, tok, num_classes=10)
    assert all(torch.equal(v, weights("gpt")[k]) for k, v in gpt.state_dict().items())
    assert gpt.config.grid_size == 4
    wrong = load_config(None, [f"model.generator={GPT[0]}", f"model.generator_init={tmp_path / 'gpt.pt'}",
                               "model.generator_overrides={" + ", ".join(f"{k}: {v}" for k, v in gpt_overrides.items()) + "}",
                               "data.image_size=8"])
    with pytest.raises(ValueError, match="does not fit generator preset"):
        generator_from_config(wrong, build_tokenizer("vq-tiny", base_channels=32, channel_mult=(1, 1), norm_groups=32,
                                                     codebook_size=32), num_classes=10)
