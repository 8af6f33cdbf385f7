"""The cheap soft branch: sparse top-k soft input to the AR equals the dense one, and top-k is exact at k = K."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from gear.align.repa import repa_loss
from gear.models.gpt import GPT, GPTConfig
from gear.models.soft import SparseSoft, soft_assignment, soft_tokens
from gear.train.steps import Modules, frozen, tokenizer_terms
from helpers import batch, step_cfg, tiny_modules

GRID = 8




def random_gpt(vocab: int = 64) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab, grid_size=4, num_classes=5, dim=64, n_layer=3, n_head=4, multiple_of=32))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    return model.eval()


def random_sparse(batch: int, length: int, k: int, vocab: int, seed: int = 1) -> SparseSoft:
    """k distinct codes per position with softmax weights."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(batch, length, vocab, generator=g).argsort(-1)[..., :k]
    weights = torch.randn(batch, length, k, generator=g).softmax(-1)
    return SparseSoft(idx, weights)


def scattered(s: SparseSoft, vocab: int) -> torch.Tensor:
    return torch.zeros(*s.indices.shape[:-1], vocab).scatter(-1, s.indices, s.weights)


def test_sparse_soft_input_equals_its_scattered_dense_input():
    model = random_gpt()
    s = random_sparse(3, model.config.seq_len - 1, 5, model.config.vocab_size)
    labels = torch.tensor([0, 4, 5])
    dense_input = scattered(s, model.config.vocab_size)
    torch.testing.assert_close(model.embed_tokens(s), model.embed_tokens(dense_input), rtol=1e-6, atol=1e-6)
    sparse = model(s, labels, tap_layer=2)
    dense = model(dense_input, labels, tap_layer=2)
    # the two embeddings differ only in summation order; three blocks of weights at std 0.2 amplify that
    torch.testing.assert_close(sparse.hidden, dense.hidden, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sparse.logits, dense.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s.to_dense(model.config.vocab_size), scattered(s, model.config.vocab_size))


def test_sparse_soft_weights_get_the_dense_gradient_through_a_frozen_model():
    model = random_gpt()
    vocab = model.config.vocab_size
    s = random_sparse(2, 7, 4, vocab)
    w = s.weights.clone().requires_grad_()
    dense = scattered(s, vocab).requires_grad_()
    labels = torch.tensor([1, 2])
    with frozen(model):
        model(SparseSoft(s.indices, w), labels, tap_layer=2, stop_at_tap=True).hidden.square().sum().backward()
        model(dense, labels, tap_layer=2, stop_at_tap=True).hidden.square().sum().backward()
    assert w.grad.abs().sum() > 0
    torch.testing.assert_close(w.grad, dense.grad.gather(-1, s.indices), rtol=1e-4, atol=1e-5)
    assert all(p.grad is None for p in model.parameters())


def test_sparse_soft_slices_like_a_dense_tensor_and_checks_its_shapes():
    s = random_sparse(2, 15, 3, 64)
    head = s[:, :-1]
    assert head.indices.shape == head.weights.shape == (2, 14, 3)
    assert torch.equal(head.indices, s.indices[:, :-1])
    model = random_gpt()
    labels = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="SparseSoft"):
        model(SparseSoft(s.indices, s.weights[..., :2]), labels)
    with pytest.raises(ValueError, match="SparseSoft"):
        model(SparseSoft(s.indices.int(), s.weights), labels)
    with pytest.raises(ValueError, match="at most L - 1"):
        model(random_sparse(2, 16, 3, 64), labels)


def test_sparse_input_runs_no_vocabulary_sized_matmul():
    model = random_gpt(vocab=1024)
    s = random_sparse(2, 15, 4, 1024)
    labels = torch.tensor([0, 1])

    def flops(tokens) -> int:
        with FlopCounterMode(display=False) as counter:
            model(tokens, labels, tap_layer=1, stop_at_tap=True)
        return counter.get_total_flops()

    dense_embedding = 2 * 2 * 15 * 1024 * model.config.dim
    assert flops(scattered(s, 1024)) - flops(s) >= dense_embedding


def test_top_k_equals_the_full_assignment_at_k_equal_K_and_renormalizes_below():
    g = torch.Generator().manual_seed(0)
    d = torch.rand(2 * 6, 40, generator=g) * 4
    full = soft_assignment(d, 0.1).view(2, 6, 40)
    for sparse in (False, True):
        torch.testing.assert_close(soft_tokens(d, 0.1, 40, 2, sparse=sparse), full)
        torch.testing.assert_close(soft_tokens(d, 0.1, 0, 2, sparse=sparse), full)
    top = soft_tokens(d, 0.1, 7, 2, sparse=True)
    assert top.indices.shape == top.weights.shape == (2, 6, 7)
    # independently: mask all but the 7 smallest d, renormalize
    keep = d <= d.sort(-1).values[:, 6:7]
    expected = torch.where(keep, full.view(-1, 40), 0.0)
    expected = (expected / expected.sum(-1, keepdim=True)).view(2, 6, 40)
    torch.testing.assert_close(top.to_dense(40), expected)
    torch.testing.assert_close(soft_tokens(d, 0.1, 7, 2, sparse=False), expected)
    # a code that holds no mass can be dropped: k = K - 1 then equals the full assignment
    far = d.clone()
    far[:, 0] = 1e3
    torch.testing.assert_close(soft_tokens(far, 0.1, 39, 2, sparse=True).to_dense(40),
                               soft_assignment(far, 0.1).view(2, 6, 40))


@pytest.fixture(scope="module")
def modules() -> Modules:
    return tiny_modules()


def tokenizer_params(m: Modules) -> list[torch.nn.Parameter]:
    return [*m.tokenizer.encoder.parameters(), *m.tokenizer.quant_conv.parameters(), m.tokenizer.quantize.embedding.weight]


def test_sparse_and_dense_top_k_paths_give_the_same_tokenizer_gradients(modules):
    m = modules
    cfg = step_cfg(soft_top_k=16)
    images, labels = batch()
    target = m.teacher(images, GRID)
    out = m.tokenizer(images)
    params = tokenizer_params(m)

    sparse_loss = tokenizer_terms(m, cfg, images, labels, target, out)["align_tok"]
    soft = soft_tokens(out.quant.d, cfg.temperature, cfg.soft_top_k, images.shape[0], sparse=False)
    assert soft.shape == (4, GRID * GRID, m.tokenizer.codebook_size)
    with frozen(m.generator, m.projector):
        hidden = m.generator(soft[:, :-1], labels, tap_layer=cfg.tap_layer, stop_at_tap=True).hidden
        dense_loss = cfg.lambda_tok * repa_loss(m.projector(hidden), target)
    torch.testing.assert_close(sparse_loss, dense_loss, rtol=1e-5, atol=1e-6)

    g_sparse = torch.autograd.grad(sparse_loss, params, retain_graph=True)
    g_dense = torch.autograd.grad(dense_loss, params, retain_graph=True)
    assert any(g.abs().sum() > 0 for g in g_sparse)
    for a, b in zip(g_sparse, g_dense):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    # only codes some token kept receive codebook gradient (a kept code whose weight underflows gets none)
    kept = set(torch.topk(out.quant.d, cfg.soft_top_k, dim=-1, largest=False).indices.unique().tolist())
    rows = set((g_sparse[-1].abs().sum(-1) > 0).nonzero().flatten().tolist())
    assert rows and rows <= kept and len(kept) < m.tokenizer.codebook_size


def test_straight_through_still_works_with_top_k(modules):
    m = modules
    cfg = step_cfg(soft_top_k=16, straight_through=True)
    images, labels = batch()
    terms = tokenizer_terms(m, cfg, images, labels, m.teacher(images, GRID), m.tokenizer(images))
    grads = torch.autograd.grad(terms["ntp_tok"], list(m.tokenizer.encoder.parameters()), allow_unused=True)
    assert torch.isfinite(terms["ntp_tok"]) and any(g is not None and g.abs().sum() > 0 for g in grads)
