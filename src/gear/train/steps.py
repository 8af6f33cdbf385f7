"""One training iteration of each stage: the paper's update rule, written out.

    theta_tok <- theta_tok - eta * grad( L_VQ  + lambda_tok * L_align(soft) )
    theta_AR  <- theta_AR  - eta * grad( L_NTP + lambda_AR  * L_align(hard) )

Each ``update_*`` function computes one loss and its gradient for one optimizer; ``gear_step`` composes them in
the paper's order; the soft side of the tokenizer update (softmax(-d / T), its top-k and sparse forms) is
``gear.models.soft``. The optimizers step together afterwards (``apply_all``), once the trainer has checked that
every loss and gradient norm is finite: the updates read only this iteration's tokenizer output, so stepping
them at the end gives the same numbers as stepping each right after its backward. Nothing here knows about
logging or checkpoints; under DDP, modules used frozen are unwrapped (``unwrap``) so that only the update that
trains a module goes through its wrapper.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from gear.align.repa import repa_loss
from gear.config import Config, OptimConfig
from gear.losses.discriminator import hinge_d_loss, hinge_g_loss
from gear.models.autoencoder import TokenizerOutput
from gear.models.soft import soft_statistics, soft_tokens


@dataclass
class Updater:
    """An optimizer with its parameters and clip norm. ``backward(loss)`` adds the loss's gradient; ``apply()``
    steps the optimizer and ``discard()`` drops the gradient. The trainer calls one of them once every loss and
    gradient norm of the iteration is known to be finite (``gear.train.guard``).

    With ``accumulate = n`` the first n - 1 calls of ``backward`` only add ``grad(loss) / n``; the n-th also clips.
    """

    optimizer: torch.optim.Optimizer
    params: list[nn.Parameter]
    grad_clip: float
    accumulate: int = 1
    _calls: int = field(default=0, init=False, repr=False)

    def backward(self, loss: Tensor) -> Tensor | None:
        """Returns the gradient norm before clipping once the last micro-batch is in, else None."""
        if self._calls == 0:
            self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(loss.device.type, enabled=False):  # backward runs outside the forward's autocast
            (loss / self.accumulate if self.accumulate > 1 else loss).backward()
        self._calls += 1
        if self._calls < self.accumulate:
            return None
        self._calls = 0
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip if self.grad_clip > 0 else float("inf"))
        return norm.full_tensor() if isinstance(norm, DTensor) else norm  # FSDP: the norm over all shards

    def apply(self) -> None:
        self.optimizer.step()

    def discard(self) -> None:
        self._calls = 0
        self.optimizer.zero_grad(set_to_none=True)


def apply_all(opts: dict[str, Updater]) -> None:
    """Step every optimizer of an iteration (the trainer does this after checking the losses)."""
    for updater in opts.values():
        updater.apply()


def adamw(params: list[nn.Parameter], lr: float, o: OptimConfig) -> torch.optim.AdamW:
    """AdamW with the config's betas, eps and weight decay; the fused kernel where every parameter is a plain
    CPU or CUDA float tensor (on CPU ~3.5x faster than the default per-parameter loop; equal up to float rounding).
    FSDP's sharded DTensors keep the default implementation."""
    fused = all(not isinstance(p, DTensor) and p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                             fused=fused or None)


@dataclass
class Modules:
    """The modules of one run; those a stage does not use are None."""

    tokenizer: nn.Module
    teacher: nn.Module | None = None
    generator: nn.Module | None = None
    projector: nn.Module | None = None
    discriminator: nn.Module | None = None
    discriminator_loss: nn.Module | None = None   # DiscriminatorHinge(discriminator), DDP-wrapped when distributed
    perceptual: nn.Module | None = None


@dataclass
class StepConfig:
    """The numbers a step needs; built from the run config by ``from_config`` (the config holds the defaults)."""

    temperature: float
    soft_top_k: int
    lambda_tok: float
    lambda_ar: float
    tap_layer: int
    l1_weight: float
    perceptual_weight: float
    gan_weight: float
    gan_active: bool
    class_dropout: float
    straight_through: bool                   # joint_mode == "ste": NTP reaches the tokenizer
    soft_statistics: bool = True             # log soft/entropy and soft/top1 (a softmax over K: on log steps only)
    soft_branch: str = "exact"               # or "shared": the alignment gradient at the hard tokens (approximate)
    ste_ntp_weight: float = 1.0              # straight_through: the NTP loss's weight in the tokenizer update

    @classmethod
    def from_config(cls, cfg: Config, *, tap_layer: int, class_dropout: float, gan_active: bool = True,
                    soft_statistics: bool = True) -> StepConfig:
        a, loss = cfg.align, cfg.loss
        return cls(temperature=a.temperature, soft_top_k=a.soft_top_k, lambda_tok=a.lambda_tok, lambda_ar=a.lambda_ar,
                   tap_layer=tap_layer, l1_weight=loss.l1_weight, perceptual_weight=loss.perceptual_weight,
                   gan_weight=loss.gan_weight, gan_active=gan_active, class_dropout=class_dropout,
                   straight_through=cfg.train.joint_mode == "ste", soft_statistics=soft_statistics,
                   soft_branch=a.soft_branch,
                   ste_ntp_weight=cfg.train.ste_ntp_weight)


@dataclass
class StepResult:
    """Scalar metrics of one iteration (detached tensors; the loop decides when to sync them to floats)."""

    metrics: dict[str, Tensor] = field(default_factory=dict)
    indices: Tensor | None = None            # (B, h, w) hard codes of this batch, for codebook usage


def unwrap(module: nn.Module | None) -> nn.Module | None:
    """The module inside a DistributedDataParallel wrapper: frozen uses must not go through DDP's reducer."""
    return getattr(module, "module", module)


@contextmanager
def frozen(*modules: nn.Module | None, eval_mode: bool = True) -> Iterator[None]:
    """Gradients pass through these modules but never land in them; eval mode (no dropout) meanwhile."""
    live = [m for m in modules if m is not None]
    saved = [(m, m.training, [p.requires_grad for p in m.parameters()]) for m in live]
    for m in live:
        if eval_mode:
            m.eval()
        m.requires_grad_(False)
    try:
        yield
    finally:
        for m, training, flags in saved:
            m.train(training)
            for p, flag in zip(m.parameters(), flags):
                p.requires_grad_(flag)


def reconstruction_loss(m: Modules, cfg: StepConfig, images: Tensor, out: TokenizerOutput) -> dict[str, Tensor]:
    """L_VQ: L1 + perceptual + GAN generator term + the quantizer's codebook/commitment/entropy terms."""
    rec = out.reconstruction
    terms = {
        "l1": cfg.l1_weight * (rec - images).abs().mean(),
        "codebook": out.quant.losses.codebook,
        "commitment": out.quant.losses.commitment,
        "entropy": out.quant.losses.entropy,
    }
    if m.perceptual is not None and cfg.perceptual_weight > 0:
        terms["perceptual"] = cfg.perceptual_weight * m.perceptual(rec, images)
    if m.discriminator is not None and cfg.gan_active and cfg.gan_weight > 0:
        disc = unwrap(m.discriminator)
        with frozen(disc, eval_mode=False):  # batch statistics, as in the discriminator's own update
            terms["gan_g"] = cfg.gan_weight * hinge_g_loss(disc(rec))
    return terms


def tokenizer_terms(m: Modules, cfg: StepConfig, images, labels, target, out: TokenizerOutput) -> dict[str, Tensor]:
    """L_VQ + lambda_tok * L_align(soft): the AR and projector are frozen, gradients pass through them."""
    terms = reconstruction_loss(m, cfg, images, out)
    if m.generator is None or not (cfg.lambda_tok > 0 or cfg.straight_through):
        return terms
    B = images.shape[0]
    soft = soft_tokens(out.quant.d, cfg.temperature, cfg.soft_top_k, B, sparse=not cfg.straight_through)
    generator, projector = unwrap(m.generator), unwrap(m.projector)
    with frozen(generator, projector):
        if cfg.straight_through:  # the collapsing baseline: forward one-hot, backward soft, NTP included
            hard = F.one_hot(out.quant.indices.view(B, -1), soft.shape[-1]).to(soft.dtype)
            soft = soft + (hard - soft).detach()
        ar = generator(soft[:, :-1], labels, tap_layer=cfg.tap_layer, stop_at_tap=not cfg.straight_through)
        if cfg.lambda_tok > 0:
            terms["align_tok"] = cfg.lambda_tok * repa_loss(projector(ar.hidden), target)
        if cfg.straight_through:
            terms["ntp_tok"] = cfg.ste_ntp_weight * next_token_loss(ar.logits, out.quant.indices.view(B, -1))
    return terms


def generator_terms(m: Modules, cfg: StepConfig, indices: Tensor, labels, target) -> dict[str, Tensor]:
    """L_NTP + lambda_AR * L_align(hard), on detached hard indices: nothing reaches the tokenizer."""
    tokens = indices.detach().view(indices.shape[0], -1)
    labels = unwrap(m.generator).drop_condition(labels, cfg.class_dropout)  # class labels or a TextCondition
    use_align = cfg.lambda_ar > 0
    out = m.generator(tokens[:, :-1], labels, tap_layer=cfg.tap_layer if use_align else None)
    terms = {"ntp": next_token_loss(out.logits, tokens)}
    if use_align:
        terms["align_ar"] = cfg.lambda_ar * repa_loss(m.projector(out.hidden), target)
    return terms


def shared_tokenizer_terms(m: Modules, cfg: StepConfig, images, out: TokenizerOutput,
                           hard_point: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
    """``tokenizer_terms`` of ``align.soft_branch=shared`` (approximate), with the AR and projector frozen by the
    caller. ``hard_point`` = (lambda_tok * L_align(hard), g), g its gradient w.r.t. the AR's input embedding at
    the hard tokens (``hard_point_gradient``): the tokenizer gets <g, soft @ E_AR> to first order, with the value
    lambda_tok * L_align(hard). No soft forward through the AR."""
    align, grad = hard_point
    soft = soft_tokens(out.quant.d, cfg.temperature, cfg.soft_top_k, images.shape[0], sparse=True)
    terms = reconstruction_loss(m, cfg, images, out)
    linear = (grad * unwrap(m.generator).embed_tokens(soft[:, :-1])).sum()
    terms["align_tok"] = align.detach() + linear - linear.detach()
    return terms


def update_tokenizer(m: Modules, opt: Updater, cfg: StepConfig, images, labels, target, out,
                     hard_point: tuple[Tensor, Tensor] | None = None) -> dict[str, Tensor]:
    """theta_tok <- theta_tok - eta * grad(L_VQ + lambda_tok * L_align(soft)); the soft branch to first order
    around the hard tokens when ``hard_point`` is given (``shared_tokenizer_terms``)."""
    # Frozen through the backward as well: with activation checkpointing the AR blocks are re-run there.
    with frozen(unwrap(m.generator), unwrap(m.projector)):
        if hard_point is None:
            terms = tokenizer_terms(m, cfg, images, labels, target, out)
        else:
            terms = shared_tokenizer_terms(m, cfg, images, out, hard_point)
        loss = sum(terms.values())
        norm = opt.backward(loss)
    metrics = {f"tok/{k}": v.detach() for k, v in terms.items()}
    metrics["tok/loss"] = loss.detach()
    return _with_norm(metrics, "grad_norm/tokenizer", norm)


class DiscriminatorHinge(nn.Module):
    """Real and fake images through the discriminator in ONE module call (DDP allows one forward per backward)."""

    def __init__(self, discriminator: nn.Module):
        super().__init__()
        self.discriminator = discriminator

    def forward(self, real: Tensor, fake: Tensor) -> Tensor:
        return hinge_d_loss(self.discriminator(real), self.discriminator(fake))


def update_discriminator(m: Modules, opt: Updater, images: Tensor, reconstruction: Tensor) -> dict[str, Tensor]:
    """Hinge loss on real images vs the detached reconstruction."""
    loss = m.discriminator_loss(images, reconstruction.detach())
    return _with_norm({"disc/loss": loss.detach()}, "grad_norm/discriminator", opt.backward(loss))


def update_generator(m: Modules, opt: Updater, cfg: StepConfig, indices: Tensor, labels, target) -> dict[str, Tensor]:
    """theta_AR <- theta_AR - eta * grad(L_NTP + lambda_AR * L_align(hard))."""
    return _generator_update(opt, cfg, generator_terms(m, cfg, indices, labels, target))


def _generator_update(opt: Updater, cfg: StepConfig, terms: dict[str, Tensor]) -> dict[str, Tensor]:
    loss = sum(terms.values())
    metrics = {f"ar/{k}": v.detach() for k, v in terms.items()}
    if "align_ar" in terms:
        metrics["ar/align_cos"] = -terms["align_ar"].detach() / cfg.lambda_ar
    metrics["ar/loss"] = loss.detach()
    return _with_norm(metrics, "grad_norm/generator", opt.backward(loss))


def _with_norm(metrics: dict[str, Tensor], key: str, norm: Tensor | None) -> dict[str, Tensor]:
    if norm is not None:
        metrics[key] = norm
    return metrics


def next_token_loss(logits: Tensor, tokens: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens.reshape(-1))


# ---------------------------------------------------------------------------- the three stages


def tokenizer_step(m: Modules, opts: dict[str, Updater], cfg: StepConfig, images, labels, target=None) -> StepResult:
    """Stage 0, warm-up: reconstruction + GAN, no AR."""
    out = m.tokenizer(images)
    metrics = update_tokenizer(m, opts["tokenizer"], cfg, images, labels, None, out)
    if m.discriminator is not None and cfg.gan_active:
        metrics |= update_discriminator(m, opts["discriminator"], images, out.reconstruction)
    return StepResult(metrics, out.quant.indices.detach())


def gear_step(m: Modules, opts: dict[str, Updater], cfg: StepConfig, images, labels, target) -> StepResult:
    """Stage 1, GEAR: one tokenizer forward, then tokenizer, discriminator and AR updates.

    ``soft_branch``: "exact" runs the frozen AR on the soft tokens for the tokenizer update (the paper); "shared"
    (approximate) runs the AR update's forward first, and its gradient at the hard tokens serves the tokenizer
    update too (``hard_point_gradient``). The AR update itself is the same exact one in both."""
    out = m.tokenizer(images)                                                  # one tokenizer forward
    ar_terms = hard_point = None
    if cfg.soft_branch == "shared":
        ar_terms, align, grad = hard_point_gradient(m, cfg, out.quant.indices, labels, target)
        hard_point = (align, grad)
    metrics = update_tokenizer(m, opts["tokenizer"], cfg, images, labels, target, out, hard_point)
    if m.discriminator is not None and cfg.gan_active:
        metrics |= update_discriminator(m, opts["discriminator"], images, out.reconstruction)
    if ar_terms is None:
        ar_terms = generator_terms(m, cfg, out.quant.indices, labels, target)
    metrics |= _generator_update(opts["generator"], cfg, ar_terms)
    if cfg.soft_statistics:
        metrics |= soft_statistics(out.quant.d.detach(), cfg.temperature)
    return StepResult(metrics, out.quant.indices.detach())


def hard_point_gradient(m: Modules, cfg: StepConfig, indices: Tensor, labels, target):
    """The AR update's terms, lambda_tok * L_align(hard) and its gradient w.r.t. the AR's input embedding (B, L-1, dim)
    (AR in train mode, one backward to the input, no weight gradients). The AR graph is kept for the AR update's
    backward."""
    embedded: list[Tensor] = []
    hook = unwrap(m.generator).tok_embeddings.register_forward_hook(lambda mod, args, output: embedded.append(output))
    try:
        ar_terms = generator_terms(m, cfg, indices, labels, target)
    finally:
        hook.remove()
    align = ar_terms["align_ar"] * (cfg.lambda_tok / cfg.lambda_ar)
    (grad,) = torch.autograd.grad(align, embedded[0], retain_graph=True)
    return ar_terms, align, grad


def ar_step(m: Modules, opts: dict[str, Updater], cfg: StepConfig, images, labels, target) -> StepResult:
    """Stage 2 and the baselines: the AR on a frozen tokenizer (with REPA when lambda_ar > 0)."""
    with torch.no_grad():
        indices = unwrap(m.tokenizer).encode(images)
    metrics = update_generator(m, opts["generator"], cfg, indices, labels, target)
    return StepResult(metrics, indices)


def ar_step_on_codes(m: Modules, opts: dict[str, Updater], cfg: StepConfig, codes, labels, target) -> StepResult:
    """``ar_step`` on codes precomputed by the frozen tokenizer (a code store): the same update, no encoding."""
    return StepResult(update_generator(m, opts["generator"], cfg, codes, labels, target), codes)


STEPS = {"tokenizer": tokenizer_step, "joint": gear_step, "ar": ar_step}
