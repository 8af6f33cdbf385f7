"""KV-cache sampling: cache equals a full pass, CFG plumbing, filters, seeding, and no state left on the model."""

import pytest
import torch

from gear.models import sampling
from gear.models.gpt import GPT, GPTConfig
from gear.models.sampling import KVCache, StaticKVCache, sample_logits




def random_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=32, grid_size=4, num_classes=5, dim=64, n_layer=2, n_head=4, multiple_of=32)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    return model.eval()


def reference_generate(model: GPT, labels, *, cfg_scale: float, seed: int, cfg_interval: int = -1,
                       **filters) -> torch.Tensor:
    """Sampling without a cache: one full forward over the whole prefix per token. With ``cfg_interval`` = N >= 0,
    LlamaGen's count: the token sampled after the prefill and the next N + 1 are guided, the rest conditional."""
    gen = torch.Generator().manual_seed(seed)
    guided = cfg_scale != 1.0
    cond = torch.cat([labels, torch.full_like(labels, model.null_class)]) if guided else labels
    tokens = torch.empty(len(labels), 0, dtype=torch.long)
    num_guided = model.config.seq_len if cfg_interval == -1 else 1 + (cfg_interval + 1)
    with torch.no_grad():
        for _ in range(model.config.seq_len):
            logits = model(torch.cat([tokens, tokens]) if guided else tokens, cond).logits[:, -1]
            if guided:
                c, u = logits.chunk(2)
                logits = u + cfg_scale * (c - u) if tokens.shape[1] < num_guided else c
            nxt = sample_logits(logits, generator=gen, **filters)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
    g = model.config.grid_size
    return tokens.view(len(labels), g, g)


def record_class_inputs(model: GPT) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    model.cls_embedding.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    return seen


def module_state(model: GPT) -> dict:
    return {name: (sorted(vars(m)), m.training) for name, m in model.named_modules()}


def test_kv_cache_gives_the_logits_of_one_full_forward():
    model = random_model()
    cfg = model.config
    tokens = torch.randint(0, cfg.vocab_size, (3, cfg.seq_len - 1))
    labels = torch.tensor([0, 4, cfg.num_classes])
    with torch.no_grad():
        full = model(tokens, labels).logits
        x = torch.cat([model.cls_embedding(labels), model.tok_embeddings(tokens)], dim=1)
        cache = KVCache(cfg.n_layer, cfg.seq_len)
        # a multi-position prefill, a chunk at an offset (explicit causal mask), then one position per step
        pieces = [model.forward_cached(x[:, :3], 0, cache), model.forward_cached(x[:, 3:7], 3, cache)]
        pieces += [model.forward_cached(x[:, t : t + 1], t, cache) for t in range(7, cfg.seq_len)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-4)


def test_static_cache_step_equals_the_growing_cache_step():
    """The CUDA-graph decode step (full-length cache, position as a tensor) computes what the eager one does."""
    model = random_model()
    cfg = model.config
    tokens = torch.randint(0, cfg.vocab_size, (3, cfg.seq_len - 1))
    labels = torch.tensor([0, 4, cfg.num_classes])
    with torch.no_grad():
        x = torch.cat([model.cls_embedding(labels), model.tok_embeddings(tokens)], dim=1)
        growing, static = KVCache(cfg.n_layer, cfg.seq_len), StaticKVCache(cfg.n_layer, cfg.seq_len)
        for t in range(cfg.seq_len):
            eager = model.forward_cached(x[:, t : t + 1], t, growing)
            graphable = model.forward_cached(x[:, t : t + 1], torch.tensor([t]), static)
            torch.testing.assert_close(graphable, eager, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="one position per step"):
        model.forward_cached(x[:, :2], torch.tensor([0]), StaticKVCache(cfg.n_layer, cfg.seq_len))


def test_cuda_graph_needs_a_cuda_model():
    with pytest.raises(ValueError, match="cuda_graph=True needs the model on a CUDA device"):
        sampling.generate(random_model(), torch.tensor([1]), cuda_graph=True)


@pytest.mark.cuda
def test_cuda_graph_sampling_gives_the_eager_tokens():
    model = random_model().cuda()
    labels = torch.tensor([1, 3, 0], device="cuda")
    eager = sampling.generate(model, labels, cfg_scale=1.5, seed=0, cuda_graph=False)
    graphed = sampling.generate(model, labels, cfg_scale=1.5, seed=0, cuda_graph=True)
    assert torch.equal(graphed, eager)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = sampling.generate(model, labels, cfg_scale=1.5, seed=0, cuda_graph=True)
    assert bf16.shape == eager.shape


def test_cache_rejects_positions_past_the_sequence():
    model = random_model()
    cfg = model.config
    cache = KVCache(cfg.n_layer, cfg.seq_len + 1)
    with pytest.raises(ValueError, match="sequence length 17"):  # class token + 16 tokens
        model.forward_cached(torch.zeros(1, 2, cfg.dim), cfg.seq_len, cache)
    with pytest.raises(ValueError, match="cache holds 4 positions"):
        model.forward_cached(torch.zeros(1, 5, cfg.dim), 0, KVCache(cfg.n_layer, 4))


def test_generate_shape_and_seeding():
    model = random_model()
    labels = torch.tensor([0, 1, 2, 3])
    rng = torch.get_rng_state()
    a = model.generate(labels, seed=7)
    b = model.generate(labels, seed=7)
    assert torch.equal(torch.get_rng_state(), rng)  # a seeded call leaves the global RNG alone
    assert a.shape == (4, 4, 4) and a.dtype == torch.long
    assert a.min() >= 0 and a.max() < model.config.vocab_size
    assert torch.equal(a, b)
    assert not torch.equal(a, model.generate(labels, seed=8))


def test_cfg_scale_one_is_plain_conditional_sampling():
    model = random_model()
    labels = torch.tensor([1, 3, 0])
    seen = record_class_inputs(model)
    got = model.generate(labels, cfg_scale=1.0, seed=3)
    assert len(seen) == 1 and torch.equal(seen[0], labels)  # the batch is not doubled
    torch.testing.assert_close(got, reference_generate(model, labels, cfg_scale=1.0, seed=3), rtol=0, atol=0)


def test_cfg_runs_cond_and_null_halves_and_mixes_their_logits():
    model = random_model()
    labels = torch.tensor([1, 3, 0])
    seen = record_class_inputs(model)
    got = model.generate(labels, cfg_scale=2.5, seed=5)
    assert len(seen) == 1
    assert torch.equal(seen[0], torch.tensor([1, 3, 0, 5, 5, 5]))  # [cond; null], null = num_classes
    expected = reference_generate(model, labels, cfg_scale=2.5, seed=5)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.equal(got, model.generate(labels, cfg_scale=1.0, seed=5))


@pytest.mark.parametrize("cfg_interval", [0, 3])
def test_cfg_interval_guides_the_first_tokens_then_samples_the_conditional_logits(cfg_interval):
    model = random_model()
    labels = torch.tensor([1, 3, 0, 2])
    seen = record_class_inputs(model)
    got = model.generate(labels, cfg_scale=4.0, cfg_interval=cfg_interval, seed=5)
    assert torch.equal(seen[0], torch.tensor([1, 3, 0, 2, 5, 5, 5, 5]))  # the null half still runs
    torch.testing.assert_close(got, reference_generate(model, labels, cfg_scale=4.0, cfg_interval=cfg_interval, seed=5),
                               rtol=0, atol=0)
    always = model.generate(labels, cfg_scale=4.0, seed=5)
    guided = cfg_interval + 2  # the prefill's token and the cfg_interval + 1 after it
    assert torch.equal(got.flatten(1)[:, :guided], always.flatten(1)[:, :guided])
    assert not torch.equal(got, always)


def test_a_cfg_interval_past_the_grid_is_guidance_on_every_token():
    model = random_model()
    labels = torch.tensor([1, 3, 0])
    always = model.generate(labels, cfg_scale=2.5, seed=5)
    assert torch.equal(model.generate(labels, cfg_scale=2.5, cfg_interval=model.config.seq_len - 2, seed=5), always)
    with pytest.raises(ValueError, match="cfg_interval must be >= -1"):
        model.generate(labels, cfg_scale=2.5, cfg_interval=-2)


def test_cfg_scale_zero_samples_from_the_null_class_alone():
    model = random_model()
    labels = torch.tensor([1, 3, 0])
    unconditional = model.generate(torch.full_like(labels, model.null_class), cfg_scale=1.0, seed=11)
    torch.testing.assert_close(model.generate(labels, cfg_scale=0.0, seed=11), unconditional, rtol=0, atol=0)


def test_filters_are_applied_in_generate():
    model = random_model()
    labels = torch.tensor([2, 4])
    greedy = model.generate(labels, top_k=1, seed=0)
    assert torch.equal(greedy, model.generate(labels, top_k=1, seed=1))
    assert torch.equal(greedy, model.generate(labels, top_p=1e-6, seed=2))
    assert torch.equal(greedy, model.generate(labels, temperature=1e-4, seed=3))
    assert torch.equal(greedy, reference_generate(model, labels, cfg_scale=1.0, seed=0, top_k=1))


def test_sample_logits_top_k_top_p_temperature():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().repeat(4000, 1)
    gen = torch.Generator().manual_seed(0)

    def draws(**kw):
        return sample_logits(logits, generator=gen, **kw)

    assert set(draws().tolist()) == {0, 1, 2, 3}
    assert set(draws(top_k=2).tolist()) == {0, 1}
    assert set(draws(top_p=0.7).tolist()) == {0, 1}
    assert set(draws(top_p=0.9).tolist()) == {0, 1, 2}
    assert set(draws(top_p=0.3).tolist()) == {0}
    assert set(draws(top_k=3, top_p=0.99).tolist()) == {0, 1, 2}
    assert set(draws(temperature=1e-3).tolist()) == {0}
    freq = torch.bincount(draws(top_k=2), minlength=4).float() / len(logits)
    torch.testing.assert_close(freq[:2], torch.tensor([0.625, 0.375]), rtol=0, atol=0.04)  # renormalized 5:3
    hot = torch.bincount(draws(temperature=2.0), minlength=4).float() / len(logits)
    assert hot[3] > 0.08  # temperature 2 flattens: p(3) = sqrt(.05) / sum(sqrt(p)) ~ 0.12


def test_no_cache_or_mode_change_left_on_the_model():
    model = random_model()
    model.train()
    model.layers[0].eval()  # mixed train/eval flags must come back exactly
    before = module_state(model)
    a = model.generate(torch.tensor([1, 2]), cfg_scale=1.5, seed=0)
    assert module_state(model) == before
    model.eval()
    assert torch.equal(a, model.generate(torch.tensor([1, 2]), cfg_scale=1.5, seed=0))  # no dropout while sampling


def test_no_cache_left_after_an_exception(monkeypatch):
    model = random_model().train()
    before = module_state(model)
    calls = 0

    def failing(logits, **kw):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("boom")
        return sample_logits(logits, **kw)

    monkeypatch.setattr(sampling, "sample_logits", failing)
    with pytest.raises(RuntimeError, match="boom"):
        model.generate(torch.tensor([1, 2]), cfg_scale=2.0, seed=0)
    assert calls == 3
    assert module_state(model) == before


@pytest.mark.parametrize(
    "labels,kw,match",
    [
        (torch.tensor([[1, 2]]), {}, r"shape \(B,\)"),
        (torch.tensor([1.0]), {}, r"int64"),
        (torch.tensor([6]), {}, r"\[0, 5\]"),
        (torch.tensor([-1]), {}, r"\[0, 5\]"),
        (torch.tensor([1]), {"temperature": 0.0}, "temperature"),
        (torch.tensor([1]), {"top_k": -1}, "top_k"),
        (torch.tensor([1]), {"top_p": 0.0}, "top_p"),
        (torch.tensor([1]), {"top_p": 1.5}, "top_p"),
    ],
)
def test_bad_arguments_raise_value_error(labels, kw, match):
    with pytest.raises(ValueError, match=match):
        random_model().generate(labels, **kw)
