"""The text-conditioned GPT: prefix mask, padding invariance, empty captions, KV cache vs teacher forcing, caption
dropout, dual stream, save/load."""

import pytest
import torch

import gear
from gear.models.generators import GENERATORS, generator_class
from gear.models.gpt import CONDITIONS, GPT, GPT_PRESETS, GPTConfig, build_generator
from gear.models.gpt_t2i import TextCondition, TextGPT, fit_left, prefix_mask
from gear.models.sampling import sample_logits

TEXT_DIM = 12


def text_model(seed: int = 0, **overrides) -> TextGPT:
    """A small TextGPT with weights large enough that attention and logits are far from uniform."""
    torch.manual_seed(seed)
    base = dict(vocab_size=32, grid_size=4, num_classes=1, dim=64, n_layer=3, n_head=4, multiple_of=32,
                condition="text", text_dim=TEXT_DIM, text_len=10)
    model = TextGPT(GPTConfig(**(base | overrides)))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
        model.set_null_caption(captions([1], length=4, seed=9))
    return model.eval()


def captions(lengths: list[int], length: int, seed: int = 0, pad_value: float = 0.0) -> TextCondition:
    """Left-padded random captions with the given numbers of real tokens."""
    g = torch.Generator().manual_seed(seed)
    features = torch.full((len(lengths), length, TEXT_DIM), pad_value)
    mask = torch.zeros(len(lengths), length, dtype=torch.bool)
    for i, n in enumerate(lengths):
        if n:
            features[i, length - n :] = torch.randn(n, TEXT_DIM, generator=g)
            mask[i, length - n :] = True
    return TextCondition(features, mask)


def image_tokens(model, batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, model.config.seq_len - 1), generator=g)


def test_the_class_and_text_models_come_from_one_config():
    assert type(build_generator("gpt-tiny")).__name__ == "GPT"
    assert generator_class(GPT_PRESETS["gpt-t2i"]) is TextGPT
    assert sorted(GENERATORS) == sorted(CONDITIONS)  # every condition a config accepts has its class
    with torch.device("meta"):
        big = build_generator("gpt-t2i")
    # GEAR's T2I AR: 36 layers, dim 1440, 12 dual-stream blocks, captions of 2048-d features
    assert sum("wqkv_text" in n for n, _ in big.named_parameters()) == 12
    assert big.cls_embedding.fc1.weight.shape == (1440, 2048) and big.cls_embedding.fc1.bias is None
    assert 1.0e9 < big.num_params() < 1.2e9


def test_dual_stream_blocks_are_the_first_third_and_zero_turns_them_off():
    model = text_model(n_layer=6)
    dual = [hasattr(b.attention, "wqkv_text") and hasattr(b, "attention_norm_text") for b in model.layers]
    assert dual == [True, True, False, False, False, False]
    assert not any(hasattr(b.attention, "wqkv_text") for b in text_model(dual_stream_layers=0).layers)
    # image-stream names are the class-conditional GPT's
    assert "layers.0.attention.wqkv.weight" in model.state_dict() and "layers.0.feed_forward.w1.weight" in model.state_dict()


def test_prefix_mask_layout():
    mask = prefix_mask(torch.tensor([[False, True, True]]), num_image=2)[0, 0]
    expected = torch.tensor([
        [1, 0, 0, 0, 0],   # a padded caption row: its diagonal only
        [0, 1, 0, 0, 0],   # caption rows: causal among real caption tokens, no image columns
        [0, 1, 1, 0, 0],
        [0, 1, 1, 1, 0],   # image rows: every real caption token, causal among image tokens
        [0, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_image_logits_ignore_padding_length_and_padded_garbage():
    model = text_model()
    tokens = image_tokens(model)
    short = captions([3, 1, 4], length=4)
    long_garbage = fit_left(short, 9)
    noise = torch.randn(long_garbage.features.shape) * 50
    long_garbage = TextCondition(torch.where(long_garbage.mask[..., None], long_garbage.features, noise), long_garbage.mask)
    with torch.no_grad():
        a = model(tokens, short).logits
        b = model(tokens, long_garbage).logits
    assert a.shape == (3, model.config.seq_len, model.config.vocab_size)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # and the captions do steer the image logits
    with torch.no_grad():
        other = model(tokens, captions([3, 1, 4], length=4, seed=5)).logits
    assert (other - a).abs().max() > 1e-2


def test_an_empty_caption_gives_finite_logits():
    model = text_model()
    empty = captions([0, 0], length=5, pad_value=float("nan"))  # nothing real; padded features never read
    with torch.no_grad():
        out = model(image_tokens(model, batch=2), empty, tap_layer=1)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.hidden).all()
    assert out.hidden.shape == (2, model.config.seq_len, model.config.dim)  # aligned on the image positions


def test_caption_rows_never_see_image_tokens():
    model = text_model()
    cond = captions([2, 3, 4], length=4)
    with torch.no_grad():
        a = model(image_tokens(model, seed=1), cond).logits[:, 0]
        b = model(image_tokens(model, seed=2), cond).logits[:, 0]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # the first image token is predicted from the caption alone


def test_kv_cache_logits_equal_teacher_forcing():
    model = text_model()
    cfg = model.config
    cond = captions([2, 4, 0], length=5)
    tokens = image_tokens(model)
    with torch.no_grad():
        full = model(tokens, cond).logits
        from gear.models.sampling import KVCache

        n_text = 5
        key_mask = torch.cat([cond.mask, torch.ones(3, cfg.seq_len, dtype=torch.bool)], dim=1)
        cache = KVCache(cfg.n_layer, n_text + cfg.seq_len - 1)
        pieces = [model.forward_cached(model.cls_embedding(cond.features), 0, cache, key_mask, n_text)[:, -1:]]
        emb = model.tok_embeddings(tokens)
        pieces += [model.forward_cached(emb[:, t : t + 1], n_text + t, cache, key_mask, n_text) for t in range(cfg.seq_len - 1)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-4)


def reference_generate(model: TextGPT, cond: TextCondition, cfg_scale: float, seed: int) -> torch.Tensor:
    """Sampling without a cache: one teacher-forced forward over the whole prefix per token."""
    gen = torch.Generator().manual_seed(seed)
    guided = cfg_scale != 1.0
    B, T = cond.mask.shape
    both = TextCondition.cat([cond, model.null_condition(B, T)]) if guided else cond
    tokens = torch.empty(B, 0, dtype=torch.long)
    with torch.no_grad():
        for _ in range(model.config.seq_len):
            logits = model(torch.cat([tokens, tokens]) if guided else tokens, both).logits[:, -1]
            if guided:
                c, u = logits.chunk(2)
                logits = u + cfg_scale * (c - u)
            tokens = torch.cat([tokens, sample_logits(logits, generator=gen)[:, None]], dim=1)
    return tokens.view(B, model.config.grid_size, model.config.grid_size)


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_generation_equals_teacher_forcing(cfg_scale):
    model = text_model().train()  # generate switches to eval mode itself and restores the flags
    cond = captions([2, 5, 1, 0], length=6)
    ours = model.generate(cond, cfg_scale=cfg_scale, seed=3)
    assert model.training and all(m.training for m in model.modules())
    ref = reference_generate(model.eval(), cond, cfg_scale, seed=3)
    assert torch.equal(ours, ref)
    assert not any("cache" in k for m in model.modules() for k in vars(m))


def test_cfg_null_is_the_empty_caption_buffer():
    model = text_model()
    null = model.null_condition(2, 6)
    assert null.mask.sum(1).tolist() == [1, 1] and null.features.shape == (2, 6, TEXT_DIM)
    with pytest.raises(ValueError, match="cannot fit"):
        fit_left(captions([5], length=6), 3)


def test_caption_dropout_rate_and_determinism():
    model = text_model()
    cond = captions([3] * 4000, length=4)
    torch.manual_seed(7)
    a = model.drop_condition(cond, 0.1)
    torch.manual_seed(7)
    b = model.drop_condition(cond, 0.1)
    assert torch.equal(a.features, b.features) and torch.equal(a.mask, b.mask)
    dropped = (a.mask != cond.mask).any(1)
    assert 0.085 < dropped.float().mean() < 0.115
    null = model.null_condition(1, 4)
    assert torch.equal(a.features[dropped], null.features.expand(int(dropped.sum()), -1, -1))
    assert torch.equal(a.features[~dropped], cond.features[~dropped])
    assert model.drop_condition(cond, 0.0) is cond


def test_save_and_load_round_trip(tmp_path):
    model = text_model()
    model.save_pretrained(tmp_path / "gen")
    loaded = gear.load_generator(tmp_path / "gen").eval()
    assert isinstance(loaded, TextGPT) and loaded.config == model.config
    assert isinstance(GPT.from_pretrained(tmp_path / "gen"), TextGPT)  # the base class loads either kind
    assert torch.equal(loaded.null_features, model.null_features) and torch.equal(loaded.null_mask, model.null_mask)
    cond, tokens = captions([2, 3, 4], length=4), image_tokens(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens, cond).logits, model(tokens, cond).logits, rtol=0, atol=0)


def test_bad_conditions_are_rejected():
    model = text_model()
    tokens = image_tokens(model, batch=2)
    with pytest.raises(ValueError, match="TextCondition"):
        model(tokens, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="prefix takes 1..10"):
        model(tokens, captions([1, 1], length=11))
    with pytest.raises(ValueError, match="3 captions for a batch of 2"):
        model(tokens, captions([1, 1, 1], length=4))
    with pytest.raises(ValueError, match="text_dim >= 1"):
        GPTConfig(condition="text")


def test_dry_run_sizes_gears_text_to_image_ar():
    from gear.config import load_config
    from gear.train.dryrun import dry_run

    report = dry_run(load_config("configs/t2i256-ar.yaml"), world_size=8)  # no encoder folder needed
    assert 1.0e9 < report.parameters["generator"] < 1.1e9 and report.tokens_per_image == 256
    assert report.memory_gib["activations (estimate)"] > 0
