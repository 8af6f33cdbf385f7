"""The build of one training stage from its config: its modules, which of them train, their optimizers and
learning rates, the precision its steps run at, and whether it aligns the AR to a teacher.

The trainer (``loop.py``), ``gear train --dry-run`` (``dryrun.py``), ``gear extract`` (``code_store.py``) and the
benchmarks build a stage here, so a run, its memory estimate and its measured cost are of the same modules.

    stage                 trains                                      helpers (frozen)
    tokenizer             tokenizer, discriminator (loss.gan_weight)  perceptual network
    joint                 tokenizer, generator, projector, discrim.   perceptual network, teacher
    ar                    generator, projector                        tokenizer, teacher
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from gear.align.repa import Projector
from gear.align.teachers import build_teacher
from gear.config import Config, OptimConfig
from gear.losses.discriminator import PatchGANDiscriminator
from gear.losses.perceptual import build_perceptual_loss
from gear.models.autoencoder import Tokenizer
from gear.models.gpt_t2i import TextCondition
from gear.models.released import DiscriminatorWeights
from gear.train.build import generator_from_config, load_discriminator, tokenizer_from_config
from gear.train.steps import DiscriminatorHinge, Modules, Updater, adamw

TOKENIZER_STAGES = ("tokenizer", "joint")   # the stages that train the tokenizer
GENERATOR_STAGES = ("joint", "ar")          # the stages with an AR generator
# one optimizer per group; the projector learns with the AR (it is frozen in the tokenizer's update)
OPTIMIZER_GROUPS = {"tokenizer": ("tokenizer",), "generator": ("generator", "projector"),
                    "discriminator": ("discriminator",)}


def needs_alignment(cfg: Config) -> bool:
    """Whether the stage builds a teacher and a projector: a REPA term of the tokenizer (joint) or of the AR."""
    stage, a = cfg.train.stage, cfg.align
    return (stage == "joint" and (a.lambda_tok > 0 or a.lambda_ar > 0)) or (stage == "ar" and a.lambda_ar > 0)


def tap_layer(cfg: Config, n_layer: int) -> int:
    """The 1-based block whose output is aligned: ``align.tap_layer``, or n_layer // 3 when it is 0."""
    tap = cfg.align.tap_layer or max(1, n_layer // 3)
    if tap > n_layer:
        raise ValueError(f"align.tap_layer={tap} but the generator has {n_layer} layers")
    return tap


def uses_bf16(cfg: Config, device: torch.device | str) -> bool:
    """``train.precision``: bf16, fp32, or auto = bf16 autocast on CUDA and float32 elsewhere."""
    p = cfg.train.precision
    return p == "bf16" or (p == "auto" and torch.device(device).type == "cuda")


def autocast(cfg: Config, device: torch.device | str):
    """The context the stage's forward passes run in (a new one per call)."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16) if uses_bf16(cfg, device) else contextlib.nullcontext()


def micro_batch(cfg: Config, world_size: int) -> int:
    """Images per process and forward pass: train.batch_size split over the processes and grad_accum_steps."""
    t = cfg.train
    local = t.batch_size // world_size
    if t.batch_size % world_size or local % t.grad_accum_steps:
        raise ValueError(f"train.batch_size={t.batch_size} must split evenly over {world_size} "
                         f"processes x train.grad_accum_steps={t.grad_accum_steps}")
    return local // t.grad_accum_steps


def trains_discriminator(cfg: Config) -> bool:
    """Whether the stage builds (and trains) a PatchGAN: a tokenizer-training stage with loss.gan_weight > 0."""
    return cfg.train.stage in TOKENIZER_STAGES and cfg.loss.gan_weight > 0


def build_modules(cfg: Config, num_classes: int, device: torch.device | str = "cpu", *,
                  null: TextCondition | None = None, tokenizer: Tokenizer | None = None, target_dim: int = 0,
                  perceptual: bool = True, distributed: bool = False,
                  discriminator: DiscriminatorWeights | None = None) -> Modules:
    """The modules of ``cfg.train.stage``, seeded by the caller, built in a fixed order (tokenizer, generator,
    teacher, projector, perceptual network, discriminator) so that one seed gives one set of weights; a fresh
    discriminator is the same in a tokenizer and a joint stage of one seed.

    ``null``: the text encoder's empty caption, for a text-conditioned AR. ``tokenizer``: use this one instead of
    the config's (a resumed ar run keeps the tokenizer it started with). ``target_dim``: the alignment target's
    width when it does not come from the config's teacher (a benchmark's random target, the dry run); no teacher
    is built then. ``perceptual=False`` leaves the perceptual network out (the dry run: its weights stay on disk).
    ``distributed``: the discriminator's batch norm syncs over processes (CUDA only). ``discriminator``: weights
    the PatchGAN starts from (``build.discriminator_start``; the trainer's choice, a resume passes none), loaded over
    the fresh one so that every other module's initial weights stay those of the seed."""
    stage, dev = cfg.train.stage, torch.device(device)
    tokenizer = (tokenizer if tokenizer is not None else tokenizer_from_config(cfg)).to(dev)
    m = Modules(tokenizer=tokenizer)
    # Where a tokenizer stage builds its perceptual network and discriminator from: a joint stage returns there after
    # its AR, teacher and projector, so that one seed gives both stages the same fresh discriminator (its draws then
    # repeat some of the AR side's; nothing is drawn after it).
    after_tokenizer = torch.random.get_rng_state()
    if stage in GENERATOR_STAGES:
        m.generator = generator_from_config(cfg, tokenizer, num_classes, null).to(dev)
        tap_layer(cfg, m.generator.config.n_layer)  # a tap below the last block, checked before anything trains
    if needs_alignment(cfg):
        if not target_dim:
            m.teacher = build_teacher(cfg.align.teacher, path=cfg.align.teacher_path or None).to(dev)
        m.projector = Projector(m.generator.config.dim, target_dim or m.teacher.feature_dim, cfg.align.projector_dim).to(dev)
    if stage in TOKENIZER_STAGES:
        torch.random.set_rng_state(after_tokenizer)
        if perceptual and cfg.loss.perceptual_weight > 0:
            m.perceptual = build_perceptual_loss(
                cfg.loss.perceptual, vgg_path=cfg.loss.lpips_vgg_path or None, lpips_path=cfg.loss.lpips_heads_path or None
            ).to(dev)
        if trains_discriminator(cfg):
            m.discriminator = PatchGANDiscriminator(channels=cfg.loss.disc_channels, n_layers=cfg.loss.disc_layers).to(dev)
            if discriminator is not None:  # before the conversion below, which copies weights and statistics over
                load_discriminator(m.discriminator, discriminator, cfg.loss)
            if distributed and dev.type == "cuda":  # SyncBatchNorm is CUDA-only; on CPU, per-process stats
                m.discriminator = nn.SyncBatchNorm.convert_sync_batchnorm(m.discriminator)
            m.discriminator_loss = DiscriminatorHinge(m.discriminator)
    if stage == "ar":
        tokenizer.eval().requires_grad_(False)
    if cfg.train.grad_checkpointing and m.generator is not None:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

        from gear.models.gpt import Block
        from gear.models.gpt_t2i import TextBlock

        # wraps each block; the wrapper strips its own prefix from state dicts, so checkpoints stay plain
        apply_activation_checkpointing(m.generator, check_fn=lambda mod: isinstance(mod, (Block, TextBlock)))
    if cfg.train.compile:  # in place: parameter names and state dicts stay those of the plain modules
        for mod in (m.tokenizer, m.generator, m.discriminator):
            if mod is not None:
                mod.compile()
    return m


def trained_modules(stage: str, m: Modules) -> dict[str, nn.Module]:
    """The modules the stage updates, by name (the keys of checkpoints and of ``OPTIMIZER_GROUPS``' members)."""
    mods = {
        "tokenizer": m.tokenizer if stage in TOKENIZER_STAGES else None,
        "generator": m.generator,
        "projector": m.projector,
        "discriminator": m.discriminator,
    }
    return {k: v for k, v in mods.items() if v is not None}


def base_lr(o: OptimConfig, group: str) -> float:
    return o.disc_lr if group == "discriminator" else o.lr


def learning_rate(o: OptimConfig, group: str, step: int) -> float:
    """The rate of 0-based ``step``: linear warm-up over optim.warmup_steps, then constant (a function of the step:
    nothing to checkpoint)."""
    scale = min(1.0, (step + 1) / o.warmup_steps) if o.warmup_steps > 0 else 1.0
    return base_lr(o, group) * scale


def set_learning_rates(opts: dict[str, Updater], o: OptimConfig, step: int) -> None:
    for group, updater in opts.items():
        for param_group in updater.optimizer.param_groups:
            param_group["lr"] = learning_rate(o, group, step)


def build_optimizers(cfg: Config, trained: dict[str, nn.Module]) -> dict[str, Updater]:
    """One AdamW per group of ``OPTIMIZER_GROUPS`` that has trained parameters, accumulating over
    train.grad_accum_steps micro-batches."""
    o = cfg.optim
    opts = {}
    for group, members in OPTIMIZER_GROUPS.items():
        params = [p for key in members if key in trained for p in trained[key].parameters()]
        if params:
            opts[group] = Updater(adamw(params, base_lr(o, group), o), params, o.grad_clip,
                                  accumulate=cfg.train.grad_accum_steps)
    return opts
