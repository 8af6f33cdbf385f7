"""Gradient routing of the GEAR joint step: which loss reaches which parameters."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import batch, step_cfg, tiny_modules

from gear.models.gpt import build_generator
from gear.config import OptimConfig
from gear.train.steps import Updater, adamw, apply_all, gear_step, generator_terms, tokenizer_terms, update_tokenizer

GRID = 8


@pytest.fixture()
def modules():
    return tiny_modules()


def grads(loss, params):
    return torch.autograd.grad(loss, list(params), allow_unused=True, retain_graph=True)


def nonzero(g):
    return g is not None and g.abs().sum() > 0


def test_soft_branch_reaches_encoder_and_codebook_only(modules):
    m, cfg = modules, step_cfg()
    images, labels = batch()
    out = m.tokenizer(images)
    terms = tokenizer_terms(m, cfg, images, labels, m.teacher(images, GRID), out)
    align = terms["align_tok"]
    enc = grads(align, m.tokenizer.encoder.parameters())
    assert any(nonzero(g) for g in enc)
    (codebook,) = grads(align, [m.tokenizer.quantize.embedding.weight])
    assert nonzero(codebook)
    # the AR and the projector were frozen: they are not even in the graph of the tokenizer loss
    assert all(g is None for g in grads(align, list(m.generator.parameters()) + list(m.projector.parameters())))
    # the decoder plays no part in the alignment term
    assert all(g is None for g in grads(align, m.tokenizer.decoder.parameters()))


def test_tokenizer_update_leaves_ar_and_projector_without_gradients(modules):
    m, cfg = modules, step_cfg()
    images, labels = batch()
    params = [p for p in m.tokenizer.parameters()]
    opt = Updater(torch.optim.AdamW(params, lr=1e-3), params, 1.0)
    before = [p.detach().clone() for p in m.generator.parameters()]
    update_tokenizer(m, opt, cfg, images, labels, m.teacher(images, GRID), m.tokenizer(images))
    assert all(p.grad is None for p in m.generator.parameters())
    assert all(p.grad is None for p in m.projector.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, m.generator.parameters()))
    assert all(p.requires_grad for p in m.generator.parameters()), "freezing must be undone after the update"
    assert m.tokenizer.encoder.conv_in.weight.grad is not None


@pytest.mark.parametrize("mode", ["gear", "ste"])
def test_ntp_reaches_the_tokenizer_only_straight_through(modules, mode):
    m = modules
    images, labels = batch()
    out = m.tokenizer(images)
    target = m.teacher(images, GRID)
    tok_params = list(m.tokenizer.parameters())
    # the AR update's loss, on the hard indices
    ntp = generator_terms(m, step_cfg(), out.quant.indices, labels, target)["ntp"]
    assert all(g is None for g in grads(ntp, tok_params))
    assert any(nonzero(g) for g in grads(ntp, m.generator.parameters()))
    if mode == "ste":  # the collapsing baseline: the NTP loss enters the tokenizer update straight-through
        cfg = step_cfg(straight_through=True)
        ntp_tok = tokenizer_terms(m, cfg, images, labels, target, out)["ntp_tok"]
        assert any(nonzero(g) for g in grads(ntp_tok, m.tokenizer.encoder.parameters()))
        heavier = tokenizer_terms(m, step_cfg(straight_through=True, ste_ntp_weight=3.0), images, labels, target, out)
        torch.testing.assert_close(heavier["ntp_tok"], 3.0 * ntp_tok)  # train.ste_ntp_weight scales the NTP term
    else:
        cfg = step_cfg()
        assert "ntp_tok" not in tokenizer_terms(m, cfg, images, labels, target, out)


def test_top_k_soft_assignment_is_exact_when_k_is_the_codebook(modules):
    from gear.models.soft import soft_tokens

    d = torch.rand(6, 512)
    full = soft_tokens(d, 0.1, 0, 2)
    assert torch.allclose(soft_tokens(d, 0.1, 512, 2), full)
    top = soft_tokens(d, 0.1, 8, 2)
    assert torch.allclose(top.sum(-1), torch.ones(2, 3))
    assert ((top > 0).sum(-1) == 8).all()
    assert torch.equal(top.argmax(-1), full.argmax(-1))


def test_joint_step_ar_update_leaves_the_tokenizer_untouched(modules):
    """End to end: after the tokenizer update, the AR update changes no tokenizer parameter or gradient."""
    m = modules
    images, labels = batch()
    tok_params = [p for p in m.tokenizer.parameters()]
    ar_params = [*m.generator.parameters(), *m.projector.parameters()]
    opts = {"tokenizer": Updater(torch.optim.SGD(tok_params, lr=0.1), tok_params, 0.0),
            "generator": Updater(torch.optim.SGD(ar_params, lr=0.1), ar_params, 0.0)}
    snapshot = {}

    original = opts["generator"].backward

    def record_then_backward(loss):
        snapshot.update({id(p): (p.detach().clone(), None if p.grad is None else p.grad.clone()) for p in tok_params})
        return original(loss)

    opts["generator"].backward = record_then_backward
    before_ar = [p.detach().clone() for p in ar_params]
    gear_step(m, opts, step_cfg(), images, labels, m.teacher(images, GRID))
    for p in tok_params:
        value, grad = snapshot[id(p)]
        assert torch.equal(p, value) and (grad is None) == (p.grad is None)
        assert grad is None or torch.equal(grad, p.grad)
    assert all(torch.equal(a, b) for a, b in zip(before_ar, ar_params)), "no optimizer steps before apply_all"
    tok_grads = [p.grad.clone() for p in tok_params if p.grad is not None]
    apply_all(opts)
    assert any(not torch.equal(a, b) for a, b in zip(before_ar, ar_params)), "the AR update must train the AR"
    assert tok_grads and all(torch.equal(g, p.grad) for g, p in zip(tok_grads, [p for p in tok_params if p.grad is not None]))


def test_soft_branch_runs_the_ar_in_eval_mode_with_labels_kept(modules):
    """Dropout and class dropout are off in the tokenizer update: two calls give the same alignment loss,
    equal to that of the AR in eval mode with the true labels."""
    m = modules
    gen = build_generator("gpt-tiny", vocab_size=512, grid_size=GRID, num_classes=10, token_dropout=0.5,
                          resid_dropout=0.5, ffn_dropout=0.5)
    gen.load_state_dict(m.generator.state_dict())
    m = dataclasses.replace(m, generator=gen.train())
    images, labels = batch()
    out, target = m.tokenizer(images), m.teacher(images, GRID)
    first = tokenizer_terms(m, step_cfg(class_dropout=1.0), images, labels, target, out)["align_tok"]
    second = tokenizer_terms(m, step_cfg(class_dropout=1.0), images, labels, target, out)["align_tok"]
    kept = tokenizer_terms(m, step_cfg(class_dropout=0.0), images, labels, target, out)["align_tok"]
    assert torch.equal(first, second) and torch.equal(first, kept)
    assert gen.training, "the AR's mode is restored after the update"


def test_soft_statistics_only_when_the_step_logs(modules):
    m = modules
    images, labels = batch()
    tok_params, ar_params = list(m.tokenizer.parameters()), [*m.generator.parameters(), *m.projector.parameters()]
    opts = {"tokenizer": Updater(torch.optim.SGD(tok_params, lr=0.0), tok_params, 0.0),
            "generator": Updater(torch.optim.SGD(ar_params, lr=0.0), ar_params, 0.0)}
    target = m.teacher(images, GRID)
    quiet = gear_step(m, opts, step_cfg(soft_statistics=False), images, labels, target).metrics
    logged = gear_step(m, opts, step_cfg(soft_statistics=True), images, labels, target).metrics
    assert not any(k.startswith("soft/") for k in quiet)
    K = m.tokenizer.codebook_size
    assert 0 <= logged["soft/entropy"] <= torch.log(torch.tensor(float(K))) and 1 / K <= logged["soft/top1"] <= 1


def test_fused_adamw_takes_the_steps_of_the_plain_one():
    torch.manual_seed(0)
    plain = [torch.nn.Parameter(torch.randn(shape)) for shape in ((7, 5), (5,), (3, 4, 2))]
    fused = [torch.nn.Parameter(p.detach().clone()) for p in plain]
    o = OptimConfig(weight_decay=0.01)
    reference = torch.optim.AdamW(plain, lr=1e-2, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    optimizer = adamw(fused, 1e-2, o)
    assert optimizer.param_groups[0]["fused"]
    for _ in range(3):
        grads = [torch.randn_like(p) for p in plain]
        for opt, params in ((reference, plain), (optimizer, fused)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_loading_optimizer_state_keeps_this_process_kernel_choice():
    from gear.train.sharding import load_optimizer_state

    params = [torch.nn.Parameter(torch.randn(4, 3))]
    saved = torch.optim.AdamW(params, lr=1e-2, foreach=False)  # e.g. written by a sharded (unfused) run
    params[0].grad = torch.randn(4, 3)
    saved.step()
    optimizer = adamw(params, 1e-2, OptimConfig())
    load_optimizer_state(optimizer, saved.state_dict())
    assert optimizer.param_groups[0]["fused"] and optimizer.param_groups[0]["foreach"] is None
    assert torch.equal(optimizer.state[params[0]]["exp_avg"], saved.state[params[0]]["exp_avg"])
