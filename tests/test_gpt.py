"""The LlamaGen-style generator: layout, hard/soft input, tap and early exit, presets, save/load, input checks."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from gear.models.gpt import GPT, GPT_PRESETS, GPTConfig, build_generator, drop_labels, rope_table




def small_config(**overrides) -> GPTConfig:
    base = dict(vocab_size=64, grid_size=4, num_classes=5, dim=64, n_layer=3, n_head=4, multiple_of=32)
    return GPTConfig(**(base | overrides))


def random_model(seed: int = 0, **overrides) -> GPT:
    """A small GPT with weights large enough that attention and logits are far from uniform."""
    torch.manual_seed(seed)
    model = GPT(small_config(**overrides))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    return model.eval()


def random_batch(model: GPT, batch: int = 3, length: int | None = None, seed: int = 1):
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    length = cfg.seq_len - 1 if length is None else length
    tokens = torch.randint(0, cfg.vocab_size, (batch, length), generator=g)
    labels = torch.randint(0, cfg.num_classes + 1, (batch,), generator=g)
    return tokens, labels


def test_parameter_names_and_shapes_follow_llamagen():
    cfg = small_config()
    model = GPT(cfg)
    hidden = cfg.ffn_hidden
    expected = {
        "tok_embeddings.weight": (cfg.vocab_size, cfg.dim),
        "cls_embedding.embedding_table.weight": (cfg.num_classes + 1, cfg.dim),
        "norm.weight": (cfg.dim,),
        "output.weight": (cfg.vocab_size, cfg.dim),
    }
    for i in range(cfg.n_layer):
        expected |= {
            f"layers.{i}.attention.wqkv.weight": (3 * cfg.dim, cfg.dim),
            f"layers.{i}.attention.wo.weight": (cfg.dim, cfg.dim),
            f"layers.{i}.feed_forward.w1.weight": (hidden, cfg.dim),
            f"layers.{i}.feed_forward.w3.weight": (hidden, cfg.dim),
            f"layers.{i}.feed_forward.w2.weight": (cfg.dim, hidden),
            f"layers.{i}.attention_norm.weight": (cfg.dim,),
            f"layers.{i}.ffn_norm.weight": (cfg.dim,),
        }
    state = model.state_dict()
    # the RoPE table is a non-persistent buffer: absent from the state dict, as in LlamaGen checkpoints
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert "freqs_cis" in dict(model.named_buffers())
    assert hidden == 192  # int(8 * 64 / 3) = 170 rounded up to a multiple of 32


def test_init_follows_llamagen():
    model = GPT(GPTConfig(**(dataclasses.asdict(small_config()) | dict(dim=256, n_head=4))))
    assert torch.count_nonzero(model.output.weight) == 0
    w = model.layers[0].feed_forward.w1.weight
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    assert torch.all(model.norm.weight == 1)


def test_rope_table_rows_then_columns_with_zero_class_row():
    grid, head_dim, base = 3, 8, 10000.0
    table = rope_table(grid, head_dim, base, prefix=1)
    assert table.shape == (1 + grid * grid, head_dim // 2, 2)
    assert torch.all(table[0] == 0)  # class token: zero rows, not the identity
    quarter = head_dim // 4
    for r in range(grid):
        for c in range(grid):
            pos = 1 + r * grid + c
            for j in range(quarter):
                theta = base ** (-2 * j / (head_dim // 2))
                for pair, coord in ((j, r), (quarter + j, c)):
                    assert table[pos, pair, 0].item() == pytest.approx(math.cos(coord * theta), abs=1e-6)
                    assert table[pos, pair, 1].item() == pytest.approx(math.sin(coord * theta), abs=1e-6)


@pytest.mark.parametrize("name,expected", [("gpt-b", 111e6), ("gpt-l", 343e6), ("gpt-xl", 775e6), ("gpt-xxl", 1.4e9)])
def test_preset_parameter_counts(name, expected):
    with torch.device("meta"):
        model = GPT(GPT_PRESETS[name])
    assert all(p.is_meta for p in model.parameters())
    assert abs(model.num_params() - expected) / expected < 0.02


def test_tiny_presets_fit_the_cpu_setting():
    for name in ("gpt-tiny", "gpt-mini"):
        cfg = GPT_PRESETS[name]
        assert (cfg.grid_size, cfg.vocab_size, cfg.num_classes) == (8, 512, 10)
    with torch.device("meta"):
        tiny, mini = GPT(GPT_PRESETS["gpt-tiny"]), GPT(GPT_PRESETS["gpt-mini"])
    assert tiny.num_params() < mini.num_params() < 10e6


def test_output_shapes_and_null_class():
    model = random_model()
    cfg = model.config
    for length in (0, 5, cfg.seq_len - 1):
        tokens, labels = random_batch(model, batch=2, length=length)
        out = model(tokens, labels, tap_layer=2)
        assert out.logits.shape == (2, length + 1, cfg.vocab_size) and out.logits.dtype == torch.float32
        assert out.hidden.shape == (2, length + 1, cfg.dim)
    assert model(tokens, labels).hidden is None
    assert model.null_class == cfg.num_classes


def test_causal_position_t_sees_only_class_and_earlier_tokens():
    model = random_model()
    tokens, labels = random_batch(model)
    j = 6
    changed = tokens.clone()
    changed[:, j] = (changed[:, j] + 1) % model.config.vocab_size
    a, b = model(tokens, labels).logits, model(changed, labels).logits
    # input position j + 1 holds token j, so logits 0..j (predicting tokens 0..j) must not move
    torch.testing.assert_close(a[:, : j + 1], b[:, : j + 1], rtol=0, atol=1e-6)
    assert (a[:, j + 1 :] - b[:, j + 1 :]).abs().max() > 1e-3
    other = model(tokens, (labels + 1) % model.config.num_classes).logits
    assert (other[:, 0] - a[:, 0]).abs().max() > 1e-3  # the class token conditions position 0


def test_soft_one_hot_matches_hard_indices():
    model = random_model()
    tokens, labels = random_batch(model)
    hard = model(tokens, labels, tap_layer=2)
    soft = model(F.one_hot(tokens, model.config.vocab_size).float(), labels, tap_layer=2)
    torch.testing.assert_close(soft.hidden, hard.hidden, rtol=0, atol=1e-6)
    torch.testing.assert_close(soft.logits, hard.logits, rtol=0, atol=1e-5)


def test_soft_input_passes_gradient_to_the_assignment_and_uses_the_ar_table():
    model = random_model()
    tokens, labels = random_batch(model)
    soft = torch.randn(*tokens.shape, model.config.vocab_size).softmax(-1).requires_grad_()
    out = model(soft, labels, tap_layer=1, stop_at_tap=True)
    out.hidden.square().sum().backward()
    assert soft.grad is not None and soft.grad.abs().sum() > 0
    assert model.tok_embeddings.weight.grad.abs().sum() > 0


def test_stop_at_tap_returns_the_same_hidden_and_leaves_later_blocks_without_gradient():
    model = random_model()
    tokens, labels = random_batch(model)
    full = model(tokens, labels, tap_layer=2)
    early = model(tokens, labels, tap_layer=2, stop_at_tap=True)
    assert early.logits is None
    torch.testing.assert_close(early.hidden, full.hidden, rtol=0, atol=0)

    early.hidden.square().mean().backward()
    for i, layer in enumerate(model.layers, start=1):
        grads = [p.grad for p in layer.parameters()]
        if i <= 2:
            assert all(g is not None and g.abs().sum() > 0 for g in grads), f"block {i} should get a gradient"
        else:
            assert all(g is None for g in grads), f"block {i} is after the tap and must get no gradient"
    assert model.norm.weight.grad is None and model.output.weight.grad is None


def test_train_mode_without_dropout_equals_eval_mode():
    # behaviour must not switch on self.training except through dropout
    model = random_model(token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0, attn_dropout=0.0)
    tokens, labels = random_batch(model)
    expected = model.eval()(tokens, labels, tap_layer=1).logits
    got = model.train()(tokens, labels, tap_layer=1).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_dropout_is_active_only_in_train_mode():
    model = random_model()
    tokens, labels = random_batch(model)
    model.train()
    assert (model(tokens, labels).logits - model(tokens, labels).logits).abs().max() > 1e-4
    model.eval()
    torch.testing.assert_close(model(tokens, labels).logits, model(tokens, labels).logits, rtol=0, atol=0)


def test_a_few_steps_fit_a_fixed_batch():
    model = random_model(token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0).train()
    tokens, labels = random_batch(model, batch=8, length=model.config.seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        logits = model(tokens[:, :-1], labels).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_save_and_load_give_identical_logits(tmp_path):
    model = random_model()
    tokens, labels = random_batch(model)
    model.save_pretrained(tmp_path / "gen")
    loaded = GPT.from_pretrained(tmp_path / "gen").eval()
    assert loaded.config == model.config
    torch.testing.assert_close(loaded(tokens, labels).logits, model(tokens, labels).logits, rtol=0, atol=0)


def test_load_state_dict_strict_accepts_a_llamagen_style_state_dict():
    # a checkpoint holding only parameters (no RoPE table, no caches) must load strictly
    source, target = random_model(seed=0), GPT(small_config())
    state = {k: v.clone() for k, v in source.state_dict().items()}
    target.load_state_dict(state, strict=True)
    tokens, labels = random_batch(source)
    torch.testing.assert_close(target.eval()(tokens, labels).logits, source(tokens, labels).logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda m: (torch.zeros(2, 16, dtype=torch.long), torch.zeros(2, dtype=torch.long)), r"T<=15"),
        (lambda m: (torch.zeros(2, 4, 63), torch.zeros(2, dtype=torch.long)), r"vocab=64"),
        (lambda m: (torch.zeros(2, 4), torch.zeros(2, dtype=torch.long)), r"int64 of shape \(B, T<=15\)"),
        (lambda m: (torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long)), r"shape \(B,\)"),
        (lambda m: (torch.zeros(2, 4, dtype=torch.long), torch.zeros(3, dtype=torch.long)), r"\(B,\) = \(2,\)"),
        (lambda m: (torch.zeros(2, 4, dtype=torch.long), torch.zeros(2)), r"int64"),
        (lambda m: (torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long)), r"\(B, T\)"),
    ],
)
def test_bad_inputs_raise_value_error(make, match):
    model = random_model()
    tokens, labels = make(model)
    with pytest.raises(ValueError, match=match):
        model(tokens, labels)


def test_bad_tap_arguments_raise_value_error():
    model = random_model()
    tokens, labels = random_batch(model)
    with pytest.raises(ValueError, match=r"\[1, 3\]"):
        model(tokens, labels, tap_layer=4)
    with pytest.raises(ValueError, match=r"\[1, 3\]"):
        model(tokens, labels, tap_layer=0)
    with pytest.raises(ValueError, match="tap_layer"):
        model(tokens, labels, stop_at_tap=True)


def test_config_validation_and_build_generator():
    with pytest.raises(ValueError, match="divisible by n_head"):
        GPTConfig(dim=100, n_head=3)
    with pytest.raises(ValueError, match="divisible by 4"):
        GPTConfig(dim=60, n_head=10)
    with pytest.raises(ValueError, match="cls_token_num"):
        GPTConfig(cls_token_num=2)
    with pytest.raises(ValueError, match="gpt-tiny"):
        build_generator("gpt-huge")
    with pytest.raises(ValueError, match="n_layer"):
        build_generator("gpt-tiny", n_layers=3)
    model = build_generator("gpt-tiny", n_layer=2, token_dropout=0.0)
    assert len(model.layers) == 2 and model.config.token_dropout == 0.0
    assert GPT_PRESETS["gpt-tiny"].n_layer == 4  # the preset itself is untouched


def test_drop_labels():
    labels = torch.randint(0, 10, (4000,))
    assert torch.equal(drop_labels(labels, 0.0, 10), labels)
    assert torch.all(drop_labels(labels, 1.0, 10) == 10)
    a = drop_labels(labels, 0.3, 10, torch.Generator().manual_seed(0))
    b = drop_labels(labels, 0.3, 10, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    dropped = a == 10
    assert 0.25 < dropped.float().mean().item() < 0.35
    assert torch.equal(a[~dropped], labels[~dropped])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        drop_labels(labels, 1.5, 10)


def test_cpu_bf16_autocast_runs_and_returns_float32_logits():
    model = random_model()
    tokens, labels = random_batch(model, batch=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(F.one_hot(tokens, model.config.vocab_size).float(), labels, tap_layer=2)
    # logits are cast to float32; the residual stream stays float32 because the embeddings are
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.hidden).all()
    reference = model(tokens, labels).logits
    assert torch.isfinite(out.logits).all()
    assert F.cosine_similarity(out.logits.flatten(), reference.flatten(), dim=0) > 0.99


def test_traces_as_one_graph_under_torch_compile():
    model = random_model()
    tokens, labels = random_batch(model, batch=2)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(tokens, labels, tap_layer=2)
    torch.testing.assert_close(out.logits, model(tokens, labels).logits, rtol=1e-5, atol=1e-5)
