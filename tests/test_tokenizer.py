import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from gear.models.autoencoder import (
    TOKENIZER_PRESETS,
    Tokenizer,
    TokenizerConfig,
    build_tokenizer,
)
from gear.models.pretrained import WEIGHTS_NAME




TINY = ["vq-tiny", "lfq-tiny", "ibq-tiny"]


def tiny(preset: str, seed: int = 0) -> Tokenizer:
    torch.manual_seed(seed)
    return build_tokenizer(preset).eval()


def images(b: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


# --- LlamaGen VQ-16 layout, written out from its tokenizer definition -------------------------
# Encoder: conv_in, 5 levels of 2 res blocks (attention after each res block of the last level,
# a stride-2 conv between levels), mid = [res, attn, res], norm_out, conv_out -> 256.
# Decoder: conv_in 256 -> 512, mid, 5 levels from the lowest resolution with 3 res blocks each,
# nearest-upsample + conv between levels, norm_out, conv_out -> 3. 1x1 quant convs around a
# 16384 x 8 embedding, plus the persistent buffer quantize.codebook_used (65536,).


def _conv(prefix, cin, cout, k):
    return {f"{prefix}.weight": (cout, cin, k, k), f"{prefix}.bias": (cout,)}


def _norm(prefix, c):
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,)}


def _res(prefix, cin, cout):
    t = {**_norm(f"{prefix}.norm1", cin), **_conv(f"{prefix}.conv1", cin, cout, 3)}
    t |= {**_norm(f"{prefix}.norm2", cout), **_conv(f"{prefix}.conv2", cout, cout, 3)}
    if cin != cout:
        t |= _conv(f"{prefix}.nin_shortcut", cin, cout, 1)
    return t


def _attn(prefix, c):
    t = _norm(f"{prefix}.norm", c)
    for name in ("q", "k", "v", "proj_out"):
        t |= _conv(f"{prefix}.{name}", c, c, 1)
    return t


def llamagen_vq16_table() -> dict[str, tuple[int, ...]]:
    ch, mult, blocks, zc = 128, (1, 1, 2, 2, 4), 2, 256
    t = _conv("encoder.conv_in", 3, ch, 3)
    cin = ch
    for i, m in enumerate(mult):
        for j in range(blocks):
            t |= _res(f"encoder.conv_blocks.{i}.res.{j}", cin, ch * m)
            cin = ch * m
            if i == len(mult) - 1:
                t |= _attn(f"encoder.conv_blocks.{i}.attn.{j}", cin)
        if i != len(mult) - 1:
            t |= _conv(f"encoder.conv_blocks.{i}.downsample.conv", cin, cin, 3)
    t |= _res("encoder.mid.0", cin, cin) | _attn("encoder.mid.1", cin) | _res("encoder.mid.2", cin, cin)
    t |= _norm("encoder.norm_out", cin) | _conv("encoder.conv_out", cin, zc, 3)
    t |= _conv("quant_conv", zc, 8, 1) | _conv("post_quant_conv", 8, zc, 1)
    t |= {"quantize.embedding.weight": (16384, 8), "quantize.codebook_used": (65536,)}
    cin = ch * mult[-1]
    t |= _conv("decoder.conv_in", zc, cin, 3)
    t |= _res("decoder.mid.0", cin, cin) | _attn("decoder.mid.1", cin) | _res("decoder.mid.2", cin, cin)
    for n, i in enumerate(reversed(range(len(mult)))):
        for j in range(blocks + 1):
            t |= _res(f"decoder.conv_blocks.{n}.res.{j}", cin, ch * mult[i])
            cin = ch * mult[i]
            if i == len(mult) - 1:
                t |= _attn(f"decoder.conv_blocks.{n}.attn.{j}", cin)
        if i != 0:
            t |= _conv(f"decoder.conv_blocks.{n}.upsample.conv", cin, cin, 3)
    t |= _norm("decoder.norm_out", cin) | _conv("decoder.conv_out", cin, 3, 3)
    return t


def test_vq16_matches_llamagen_keys_and_shapes():
    with torch.device("meta"):
        model = build_tokenizer("vq-16")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = llamagen_vq16_table()
    assert set(ours) == set(expected), (sorted(set(ours) - set(expected))[:5], sorted(set(expected) - set(ours))[:5])
    assert ours == expected
    samples = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.conv_blocks.2.res.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.conv_blocks.4.res.1.conv2.weight": (512, 512, 3, 3),
        "encoder.conv_blocks.4.attn.1.proj_out.weight": (512, 512, 1, 1),
        "encoder.conv_blocks.3.downsample.conv.weight": (256, 256, 3, 3),
        "encoder.mid.1.q.weight": (512, 512, 1, 1),
        "encoder.mid.2.norm2.bias": (512,),
        "encoder.norm_out.weight": (512,),
        "encoder.conv_out.weight": (256, 512, 3, 3),
        "quant_conv.weight": (8, 256, 1, 1),
        "quantize.embedding.weight": (16384, 8),
        "quantize.codebook_used": (65536,),
        "post_quant_conv.weight": (256, 8, 1, 1),
        "decoder.conv_in.weight": (512, 256, 3, 3),
        "decoder.conv_blocks.0.attn.2.k.weight": (512, 512, 1, 1),
        "decoder.conv_blocks.1.res.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.conv_blocks.3.upsample.conv.weight": (128, 128, 3, 3),
        "decoder.norm_out.weight": (128,),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    for key, shape in samples.items():
        assert ours[key] == shape, key
    assert "decoder.conv_blocks.4.upsample.conv.weight" not in ours
    assert "encoder.conv_blocks.4.downsample.conv.weight" not in ours


def test_vq16_parameter_count_is_llamagens_72m():
    with torch.device("meta"):
        model = build_tokenizer("vq-16")
    n_params = sum(p.numel() for p in model.parameters())
    buffers = {"quantize.codebook_used"}
    from_table = sum(torch.Size(s).numel() for k, s in llamagen_vq16_table().items() if k not in buffers)
    assert n_params == from_table == 71_883_403


@pytest.mark.parametrize(
    "preset, size, dim, n_quant_params",
    [("vq-16", 16384, 8, 1), ("lfq-16", 2**14, 14, 0), ("ibq-16", 16384, 256, 1)],
)
def test_full_size_presets_build_on_meta(preset, size, dim, n_quant_params):
    with torch.device("meta"):
        model = build_tokenizer(preset)
    assert model.downsample == 16 and model.codebook_size == size and model.quantize.code_dim == dim
    assert len(list(model.quantize.parameters())) == n_quant_params
    if preset == "lfq-16":  # Open-MAGVIT2: the encoder's 14 channels are the LFQ latent
        assert isinstance(model.quant_conv, torch.nn.Identity) and model.encoder.conv_out.out_channels == 14
    else:
        assert model.quant_conv.weight.shape == (dim, 256, 1, 1)
    if preset == "ibq-16":
        assert model.quantize.embedding.weight.shape == (16384, 256)


@pytest.mark.parametrize("preset", TINY)
def test_forward_shapes(preset):
    model = tiny(preset)
    out = model(images())
    assert out.reconstruction.shape == (2, 3, 32, 32)
    assert out.quant.indices.shape == (2, 8, 8) and out.quant.indices.dtype == torch.long
    assert out.quant.z_q.shape == (2, model.config.codebook_dim, 8, 8)
    assert out.quant.d.shape == (2 * 64, model.codebook_size)
    assert model.downsample == 4 and model.codebook_size == 512


@pytest.mark.parametrize("preset", TINY)
def test_decode_of_encode_equals_forward_reconstruction(preset):
    model = tiny(preset)
    x = images()
    indices = model.encode(x)
    assert indices.shape == (2, 8, 8) and indices.dtype == torch.long
    out = model(x)
    assert torch.equal(indices, out.quant.indices)
    assert torch.allclose(model.decode(indices), out.reconstruction, atol=1e-5)
    assert torch.allclose(model.decode_latent(out.quant.z_q), out.reconstruction, atol=1e-6)


@pytest.mark.parametrize("preset", TINY)
def test_training_gradients_reach_encoder_decoder_and_codebook(preset):
    model = tiny(preset).train()
    x = images()
    out = model(x)
    ((out.reconstruction - x).abs().mean() + out.quant.losses.total).backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0  # through the straight-through estimator
    assert model.decoder_last_layer().grad.abs().sum() > 0
    if preset != "lfq-tiny":
        assert model.quantize.embedding.weight.grad.abs().sum() > 0


def test_decoder_last_layer_is_the_final_conv_weight():
    model = tiny("vq-tiny")
    layer = model.decoder_last_layer()
    assert isinstance(layer, torch.nn.Parameter) and layer is model.decoder.conv_out.weight
    assert layer.shape[0] == 3


@pytest.mark.parametrize("preset", TINY)
def test_save_and_load_pretrained_give_identical_outputs(preset, tmp_path):
    model = tiny(preset)
    x = images()
    model(x)  # fills the VQ usage window, which must round-trip too
    model.save_pretrained(tmp_path)
    loaded = Tokenizer.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    a, b = model(x), loaded(x)
    assert torch.equal(a.reconstruction, b.reconstruction) and torch.equal(a.quant.indices, b.quant.indices)


def test_loading_a_truncated_weights_file_raises(tmp_path):
    tiny("vq-tiny").save_pretrained(tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated"):
        Tokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("preset", TINY)
def test_tiny_presets_fit_the_cpu_budget(preset):
    # ~5.5 GFLOP for forward + backward of 16 images: well under 0.2 s on one CPU core.
    model = tiny(preset).train()
    x = images(16)
    with FlopCounterMode(display=False) as counter:
        out = model(x)
        ((out.reconstruction - x).abs().mean() + out.quant.losses.total).backward()
    assert counter.get_total_flops() < 7e9


def test_build_tokenizer_rejects_unknown_names():
    with pytest.raises(ValueError, match="vq-tiny"):
        build_tokenizer("vq-32")
    with pytest.raises(ValueError, match="codebook_size"):
        build_tokenizer("vq-tiny", codebook_sise=8)
    model = build_tokenizer("vq-tiny", codebook_size=256)
    assert model.codebook_size == 256 and TOKENIZER_PRESETS["vq-tiny"].codebook_size == 512


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(quantizer="fsq"), "quantizer"),
        (dict(quantizer="lfq", codebook_size=500, codebook_dim=9), "2 \\*\\* codebook_dim"),
        (dict(channel_mult=()), "channel_mult"),
        (dict(base_channels=30), "norm_groups"),
        (dict(entropy_temperature=0.0), "entropy_temperature"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TOKENIZER_PRESETS["vq-tiny"], **overrides)


def test_config_defaults_are_llamagen_vq16_and_lists_become_tuples():
    assert TokenizerConfig() == TOKENIZER_PRESETS["vq-16"]
    assert TokenizerConfig(channel_mult=[1, 2]).channel_mult == (1, 2)


def test_bad_inputs_raise_clear_errors():
    model = tiny("vq-tiny")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.encode(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="multiples of 4"):
        model(torch.rand(2, 3, 30, 32))
    with pytest.raises(ValueError, match=r"\(B, h, w\)"):
        model.decode(torch.zeros(2, 64, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, 8, h, w\)"):
        model.decode_latent(torch.zeros(2, 4, 8, 8))


def test_generated_tokens_decode_without_no_grad():
    from gear.models.gpt import build_generator

    tok = build_tokenizer("vq-tiny")
    gen = build_generator("gpt-tiny", vocab_size=tok.codebook_size, grid_size=4, num_classes=10).eval()
    images = tok.decode(gen.generate(torch.tensor([0, 1]), cfg_scale=1.5, seed=0))  # inference tensors in
    assert images.shape == (2, 3, 4 * tok.downsample, 4 * tok.downsample) and not images.requires_grad
