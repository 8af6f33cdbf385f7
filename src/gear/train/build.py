"""Build a run's models from its config (initial weights from a run directory, a saved model or a released file)."""

from __future__ import annotations

import dataclasses

from gear.config import Config
from gear.models.autoencoder import Tokenizer, build_tokenizer
from gear.models.gpt import GPT, build_generator
from gear.models.gpt_t2i import TextCondition
from gear.models.released import is_released_file, released_generator, released_tokenizer
from gear.run import GENERATOR_DIR, TOKENIZER_DIR, check_pair, model_dir


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
