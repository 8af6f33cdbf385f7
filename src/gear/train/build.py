"""Build a run's models from its config (initial weights from a run directory, a saved model or a released file),
and find where its discriminator starts (a run directory's, a GEAR file's, or a fresh one)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from gear.config import Config, LossConfig
from gear.models.autoencoder import Tokenizer, build_tokenizer
from gear.models.gpt import GPT, build_generator
from gear.models.gpt_t2i import TextCondition
from gear.models.released import (DiscriminatorWeights, is_released_file, mismatches, read_discriminator,
                                  released_generator, released_tokenizer)
from gear.run import GENERATOR_DIR, TOKENIZER_DIR, check_pair, model_dir

FRESH = "fresh"  # model.discriminator_init's value for a new discriminator, and what summary.json then says


def tokenizer_from_config(cfg: Config) -> Tokenizer:
    """The preset with its overrides; weights from ``model.tokenizer_init`` when given."""
    init = cfg.model.tokenizer_init
    if init and is_released_file(init):  # a released checkpoint of model.tokenizer's architecture
        overrides = cfg.model.tokenizer_overrides
        return released_tokenizer(init, cfg.model.tokenizer, ema=cfg.model.init_from_ema, **overrides)[0]
    if init:
        saved = Tokenizer.from_pretrained(model_dir(init, TOKENIZER_DIR, ema=cfg.model.init_from_ema))
        return _with_overrides(saved, cfg.model.tokenizer_overrides, "model.tokenizer_overrides")
    return build_tokenizer(cfg.model.tokenizer, **cfg.model.tokenizer_overrides)


def _load_strict(model, state: dict, source) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{source} does not fit the chosen preset: {str(err).splitlines()[0]}") from None


def _with_overrides(model, overrides: dict, key: str):
    """A loaded model whose config takes ``overrides`` (e.g. a loss weight or dropout); shapes must not change."""
    if not overrides:
        return model
    try:
        config = dataclasses.replace(model.config, **overrides)
    except TypeError as err:
        raise ValueError(f"{key}: {err}") from None
    rebuilt = type(model)(config)
    _load_strict(rebuilt, model.state_dict(), f"{key}={overrides}")
    return rebuilt


def generator_from_config(cfg: Config, tokenizer: Tokenizer, num_classes: int, null: TextCondition | None = None) -> GPT:
    """The AR preset sized to the tokenizer (vocabulary, token grid) and the data (classes); for text conditioning
    (``null``: the encoder's empty caption) sized to the encoder's features and ``text.max_length``."""
    grid = cfg.data.image_size // tokenizer.downsample
    if cfg.data.image_size % tokenizer.downsample:
        raise ValueError(
            f"data.image_size={cfg.data.image_size} is not a multiple of the tokenizer's downsample {tokenizer.downsample}"
        )
    derived = {"vocab_size": tokenizer.codebook_size, "grid_size": grid, "num_classes": num_classes}
    if null is not None:
        derived |= {"condition": "text", "text_dim": null.features.shape[-1], "text_len": cfg.text.max_length}
    init = cfg.model.generator_init
    if init and is_released_file(init):  # a released checkpoint of model.generator's architecture
        overrides = _with_derived(cfg.model.generator_overrides, derived)
        gen = released_generator(init, cfg.model.generator, ema=cfg.model.init_from_ema, **overrides)[0]
    elif init:
        gen = GPT.from_pretrained(model_dir(init, GENERATOR_DIR, ema=cfg.model.init_from_ema))
        extra = {k: v for k, v in cfg.model.generator_overrides.items() if k not in derived}
        gen = _with_overrides(gen, extra, "model.generator_overrides")
    else:
        gen = build_generator(cfg.model.generator, **_with_derived(cfg.model.generator_overrides, derived))
    check_pair(tokenizer, gen, image_size=cfg.data.image_size)
    for key, value in derived.items():
        if getattr(gen.config, key) != value:
            raise ValueError(f"model.generator_init has {key}={getattr(gen.config, key)} but this run needs {value} "
                             "(data set classes, text encoder and text.max_length must match)")
    if null is not None:
        gen.set_null_caption(null)
    return gen


def _with_derived(overrides: dict, derived: dict) -> dict:
    """Generator overrides plus the values the tokenizer and data fix; a disagreeing override is an error."""
    out = dict(overrides)
    for key, value in derived.items():
        if key in out and out[key] != value:
            raise ValueError(f"model.generator_overrides.{key}={out[key]} disagrees with the tokenizer/data ({value}); drop it")
        out[key] = value
    return out


@dataclass(frozen=True)
class DiscriminatorStart:
    """Where a stage's discriminator starts: ``weights`` (None: a fresh one) and the line the run logs about it
    ("" for a tokenizer stage from scratch)."""

    weights: DiscriminatorWeights | None
    note: str

    @property
    def source(self) -> str:
        """summary.json's "discriminator": "fresh", or the run directory or file it came from."""
        return self.weights.source if self.weights is not None else FRESH


def discriminator_start(cfg: Config) -> DiscriminatorStart:
    """``model.discriminator_init`` when set (``fresh``: a new one; a source that holds none is an error), else
    ``model.tokenizer_init``'s discriminator when it holds one (a run directory, a GEAR file), else a fresh one.
    Only the weights are carried: the discriminator's optimizer state starts anew, as in GEAR's joint stage."""
    named, init = cfg.model.discriminator_init, cfg.model.tokenizer_init
    if named == FRESH:
        return DiscriminatorStart(None, "discriminator: fresh (model.discriminator_init=fresh)")
    if named:
        weights = read_discriminator(named)
        if weights is None:
            raise ValueError(f"model.discriminator_init={named} holds no discriminator: name a run directory of a stage "
                             "with a GAN term or a GEAR checkpoint file with a 'discriminator' (such as vq-with-gan.pt), "
                             f"or {FRESH}")
    elif init:
        weights = read_discriminator(init)
        if weights is None:
            why = ("holds no 'discriminator'" if is_released_file(init) else
                   "holds none: a model directory never does, a run directory's checkpoints/last.pt may")
            return DiscriminatorStart(None, f"discriminator: fresh (model.tokenizer_init={init} {why}; "
                                            "model.discriminator_init names one)")
    else:  # a warm-up from scratch has nothing to carry and says nothing; a joint stage says it starts fresh
        return DiscriminatorStart(None, "" if cfg.train.stage == "tokenizer" else
                                  "discriminator: fresh (no model.tokenizer_init)")
    return DiscriminatorStart(weights, f"discriminator: from {weights.describe()}, its weights only (its optimizer "
                                       "state starts anew)")


def load_discriminator(disc: nn.Module, weights: DiscriminatorWeights, loss: LossConfig) -> None:
    """Load ``weights`` into the stage's fresh PatchGAN; shapes other than loss.disc_channels / disc_layers stop."""
    expected = disc.state_dict()
    state = dict(weights.state)
    for key in expected:  # BatchNorm's step counter: bookkeeping a file may leave out
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = expected[key]
    wrong = mismatches(expected, state)
    if wrong:
        raise ValueError(
            f"the discriminator of {weights.describe()} does not fit loss.disc_channels={loss.disc_channels}, "
            f"loss.disc_layers={loss.disc_layers}: {wrong}{_discriminator_guess(state)}; set those to the source's, "
            f"or start a fresh one with model.discriminator_init={FRESH}"
        )
    disc.load_state_dict(state)


def _discriminator_guess(state: dict) -> str:
    first = state.get("main.0.weight")
    if first is None or first.ndim != 4:
        return ""
    layers = sum(k.endswith(".running_mean") for k in state)  # one BatchNorm per layer
    return f" (it looks like disc_channels={first.shape[0]}, disc_layers={layers})"
