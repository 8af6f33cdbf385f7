"""align.soft_branch=shared: the alignment gradient at the hard tokens, from the AR update's own forward."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers import batch, step_cfg, tiny_modules

from gear.align.repa import repa_loss
from gear.config import ConfigError, load_config
from gear.models.gpt import build_generator
from gear.train.steps import Updater, apply_all, frozen, gear_step, hard_point_gradient

GRID = 8


def modules_without_dropout():
    m = tiny_modules()
    gen = build_generator("gpt-tiny", vocab_size=512, grid_size=GRID, num_classes=10, token_dropout=0.0,
                          resid_dropout=0.0, ffn_dropout=0.0)
    gen.load_state_dict(m.generator.state_dict())
    return dataclasses.replace(m, generator=gen.train())


def test_hard_point_gradient_is_the_soft_branch_gradient_at_the_one_hot_input():
    """Without dropout, g = d(lambda_tok * L_align)/d(embedding) at the hard tokens, projected on the table, is the
    exact soft branch's gradient w.r.t. its (B, L-1, K) input evaluated at the one-hot assignment."""
    m = modules_without_dropout()
    cfg = step_cfg(class_dropout=0.0, lambda_tok=0.5, lambda_ar=0.25)
    images, labels = batch()
    target = m.teacher(images, GRID)
    indices = m.tokenizer.encode(images)
    _, align, grad = hard_point_gradient(m, cfg, indices, labels, target)
    tokens = indices.view(len(labels), -1)
    one_hot = F.one_hot(tokens[:, :-1], m.tokenizer.codebook_size).float().requires_grad_()
    with frozen(m.generator, m.projector):
        hidden = m.generator(one_hot, labels, tap_layer=cfg.tap_layer, stop_at_tap=True).hidden
        exact = cfg.lambda_tok * repa_loss(m.projector(hidden), target)
    (expected,) = torch.autograd.grad(exact, one_hot)
    torch.testing.assert_close(align, exact, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad @ m.generator.tok_embeddings.weight.detach().t(), expected, rtol=1e-4, atol=1e-7)


def test_shared_step_trains_the_ar_exactly_and_the_tokenizer_through_the_soft_weights():
    images, labels = batch()
    after = {}
    for branch in ("exact", "shared"):
        m = tiny_modules()
        target = m.teacher(images, GRID)
        tok_params, ar_params = list(m.tokenizer.parameters()), [*m.generator.parameters(), *m.projector.parameters()]
        opts = {"tokenizer": Updater(torch.optim.SGD(tok_params, lr=0.1), tok_params, 0.0),
                "generator": Updater(torch.optim.SGD(ar_params, lr=0.1), ar_params, 0.0)}
        torch.manual_seed(3)
        metrics = gear_step(m, opts, step_cfg(soft_branch=branch), images, labels, target).metrics
        apply_all(opts)
        after[branch] = (copy.deepcopy(m), metrics)
    (exact, em), (shared, sm) = after["exact"], after["shared"]
    # the AR update does not depend on the soft branch: same parameters, same losses
    for a, b in zip(shared.generator.parameters(), exact.generator.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(sm["ar/loss"], em["ar/loss"])
    # the tokenizer moved, its encoder and codebook by the alignment term too, and differently from the exact branch
    enc_s, enc_e = shared.tokenizer.encoder.conv_in.weight, exact.tokenizer.encoder.conv_in.weight
    assert not torch.equal(enc_s, enc_e)
    assert all(p.requires_grad for p in shared.generator.parameters())
    assert set(sm) == set(em)


def test_shared_branch_is_opt_in_and_checked():
    assert load_config(None).align.soft_branch == "exact"
    with pytest.raises(ConfigError, match="align.soft_branch"):
        load_config(None, ["align.soft_branch=hard"])
    with pytest.raises(ConfigError, match="joint_mode=gear"):
        load_config(None, ["align.soft_branch=shared", "train.joint_mode=ste"])
