"""Weights from released checkpoint files (LlamaGen, Open-MAGVIT2, IBQ, GEAR), loaded strictly.

A released file is read without unpickling code (``torch.load(weights_only=True)``, or safetensors),
its layout is recognised, its keys are renamed to this project's parameter names, and it must fit the
chosen architecture exactly: a missing, unexpected or mis-shaped key stops the load.

Layouts (``module.`` / ``_orig_mod.`` key prefixes, left by DDP and torch.compile, are removed in all):
- Lightning: ``{"state_dict": {live keys, "model_ema.<name without dots>" shadows, "loss.*", ...}}``
  (Open-MAGVIT2 and IBQ releases); the EMA shadows are taken by default, ``loss.*`` is skipped;
- trainer dicts: ``{"vq": ..., "vq_ema": ...}`` for tokenizers, ``{"ar": ..., "ema": ...}`` for generators
  (GEAR's trainers), and LlamaGen's ``{"model": ..., "ema": ...}`` (``ema`` optional);
- a bare state dict (LlamaGen GPT-XXL/3B saved from FSDP, or any ``.safetensors`` file).

Renaming: IBQ files use taming's names (``encoder.down.{i}.block.{j}``, ``encoder.mid.block_1``,
``decoder.up.{i}`` counted from the highest resolution), which map onto the conv backbone's LlamaGen
names (``encoder.conv_blocks.{i}.res.{j}``, ``encoder.mid.0``, ``decoder.conv_blocks.{levels-1-i}``).
Open-MAGVIT2 and LlamaGen names are this project's own; ``conv_to_taming`` is the way back (gear.models.export).

The discriminator a GEAR file or a run directory carries (``read_discriminator``) is read here too: GEAR's
``{vq,lfq,ibq}-with-gan.pt`` (its warm-up) and its trainers' checkpoints hold it under ``discriminator``, taming's
NLayerDiscriminator with the same names and shapes (``main.N.*``) as gear.losses.discriminator's PatchGAN; a run
directory of this project holds it in ``checkpoints/last.pt`` (``modules.discriminator``).

A file may be named by a Hub reference (``hf://BinLin203/GEAR-VQ/gear-vq.pt``; gear.hub), fetched into the
Hugging Face cache; nothing is fetched for a local path.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from gear.files import load_tensors
from gear.hub import resolve
from gear.models.autoencoder import Tokenizer, build_tokenizer
from gear.models.gpt import GPT, build_generator
from gear.run import checkpoint_path

RELEASED_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
EMA_PREFIX = "model_ema."
EMA_BOOKKEEPING = ("decay", "num_updates")
# (EMA key, live key) pairs of trainer dicts, most specific first.
TRAINER_KEYS = {"tokenizer": (("vq_ema", "vq"), ("ema", "model")), "generator": (("ema", "ar"), ("ema", "model"))}
# Parts of a training checkpoint that are not the model: the Lightning loss module (discriminator, LPIPS).
SKIPPED_PREFIXES = {"tokenizer": ("loss.",), "generator": ()}
# Buffers some releases carry and others do not; they never affect outputs (VQ usage window).
OPTIONAL_KEYS = ("quantize.codebook_used",)
SHOWN = 3  # offending keys named in an error


@dataclass(frozen=True)
class ReleasedWeights:
    """A released file's weights under this project's parameter names, and where they came from."""

    state: dict[str, Tensor]
    layout: str   # e.g. "Lightning checkpoint (state_dict) with model_ema shadows, taming parameter names"
    source: str   # which weights: "EMA shadows (model_ema.*)", "EMA weights under 'vq_ema'", "live weights", ...
    skipped: int  # keys that are not part of the model (loss modules, EMA bookkeeping), EMA shadows aside
    shadowed: frozenset[str] = frozenset()  # keys whose value is a model_ema shadow

    def describe(self) -> str:
        skipped = f", {self.skipped} training-only keys skipped" if self.skipped else ""
        return f"{self.layout}; took the {self.source}{skipped}"


@dataclass(frozen=True)
class DiscriminatorWeights:
    """A PatchGAN's weights (this project's, or GEAR's NLayerDiscriminator: the same names) and where they are from."""

    state: dict[str, Tensor]
    source: str   # the run directory or file, as named (a Hub reference stays one)
    detail: str   # where in it: "checkpoints/last.pt, step 500" | "its 'discriminator'"

    def describe(self) -> str:
        return f"{self.source} ({self.detail})"


def is_released_file(path: str | Path) -> bool:
    """True for a path that names a checkpoint file (by its suffix) rather than a model directory."""
    return Path(path).suffix in RELEASED_SUFFIXES and not Path(path).is_dir()


def read_checkpoint(path: str | Path) -> Any:
    """The file's content: safetensors directly, anything else with ``torch.load(weights_only=True)``; a Hub
    reference is fetched first."""
    path = Path(resolve(path))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"cannot read {path} ({_first_line(err)}): the file is truncated or not safetensors") from None
    return load_tensors(path, "checkpoint")


def extract(content: Any, kind: str, ema: bool = True, levels: int | None = None) -> ReleasedWeights:
    """Find the ``kind`` ("tokenizer" | "generator") weights in a checkpoint's content and rename them.

    ``levels``: the number of resolutions of a conv-backbone tokenizer; taming names are renamed only when given.
    """
    if not isinstance(content, dict):
        raise ValueError(f"holds a {type(content).__name__}, not a dict of tensors")
    flat, layout, source = _unwrap(content, kind, ema)
    flat, prefixes = _strip_wrappers(flat)
    if prefixes:
        layout += f", keys prefixed {' / '.join(repr(p) for p in prefixes)}"
    if any(k.startswith(EMA_PREFIX) for k in flat):
        layout += " with model_ema shadows"
    flat, source, skipped, shadowed = _apply_ema(flat, ema, source)
    kept = {k: v for k, v in flat.items() if not k.startswith(SKIPPED_PREFIXES[kind])}
    skipped += len(flat) - len(kept)
    if kind == "tokenizer" and levels is not None and _has_taming_names(kept):
        kept = {_taming_to_conv(k, levels): v for k, v in kept.items()}
        shadowed = {_taming_to_conv(k, levels) for k in shadowed}
        layout += ", taming parameter names"
    return ReleasedWeights(kept, layout, source, skipped, frozenset(shadowed))


def read_discriminator(source: str | Path) -> DiscriminatorWeights | None:
    """The discriminator that ``source`` holds: a run directory's (``checkpoints/last.pt``, ``modules.discriminator``)
    or a checkpoint file's ``discriminator`` (GEAR's layout, as `gear export --format gear` writes it too); None when
    it holds none (a model directory, a released file without one, a run trained without the GAN term). Its
    optimizer state is never read."""
    path = Path(resolve(source))
    if path.is_dir():
        ckpt = checkpoint_path(path)
        if not ckpt.is_file():
            return None
        payload = load_tensors(ckpt, "checkpoint")
        modules = payload.get("modules") if isinstance(payload, dict) else None
        state = modules.get("discriminator") if isinstance(modules, dict) else None
        detail = f"{ckpt.relative_to(path)}, step {payload.get('step')}" if isinstance(payload, dict) else ""
    else:
        content = read_checkpoint(path)
        state = content.get("discriminator") if isinstance(content, dict) else None
        detail = "its 'discriminator'"
    if not isinstance(state, dict) or not state:
        return None
    try:
        state, _ = _strip_wrappers(state)  # GEAR's trainers save from DDP
    except ValueError as err:
        raise ValueError(f"{source}: the discriminator {err}") from None
    return DiscriminatorWeights(state, str(source), detail)


def mismatches(expected: dict[str, Tensor], state: dict[str, Tensor]) -> str:
    """The keys of ``state`` that keep it from loading strictly into a model whose state dict is ``expected``
    ("" when it fits): the first few missing, unexpected and mis-shaped ones, on one line."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                 if k in state and state[k].shape != v.shape]
    return "; ".join(f"{name} {len(keys)}: {', '.join(keys[:SHOWN])}{', ...' if len(keys) > SHOWN else ''}"
                     for name, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
                     if keys)


def released_tokenizer(path: str | Path, preset: str, ema: bool = True, **overrides) -> tuple[Tokenizer, ReleasedWeights]:
    """A tokenizer of ``preset`` (with TokenizerConfig ``overrides``) holding a released file's weights."""
    content = read_checkpoint(path)  # a missing, truncated or unsafe file fails before anything is built
    model = build_tokenizer(preset, **overrides)
    return model, load_into(model, content, path, "tokenizer", preset, ema)


def released_generator(path: str | Path, preset: str, ema: bool = True, **overrides) -> tuple[GPT, ReleasedWeights]:
    """A generator of ``preset`` (with GPTConfig ``overrides``, e.g. grid_size=24 for 384 px) holding a released file's weights."""
    content = read_checkpoint(path)
    model = build_generator(preset, **overrides)
    return model, load_into(model, content, path, "generator", preset, ema)


def load_into(model: nn.Module, content: Any, path: str | Path, kind: str, preset: str, ema: bool = True) -> ReleasedWeights:
    """Load a released file's ``content`` (``read_checkpoint``) into ``model`` (built from ``preset``); every key
    must fit exactly. ``path`` names the file in errors."""
    conv = kind == "tokenizer" and model.config.backbone == "conv"
    levels = len(model.config.channel_mult) if conv else None  # only the conv backbone renames taming keys
    try:
        weights = extract(content, kind, ema=ema, levels=levels)
    except ValueError as err:
        raise ValueError(f"{path} {err}") from None
    state = dict(weights.state)
    if kind == "generator":
        _check_rope_table(state.pop("freqs_cis", None), model.config.grid_size, path)
    expected = model.state_dict()
    for key in OPTIONAL_KEYS:
        if key in expected and key not in state:
            state[key] = expected[key]
    wrong = mismatches(expected, state)
    if wrong:
        raise ValueError(
            f"{path} ({weights.layout}) does not fit {kind} preset {preset!r}: {wrong}{_guess(state)}; "
            "choose the preset (and key=value overrides) of the file's architecture"
        )
    if weights.shadowed:  # LitEma shadows every trainable parameter; buffers stay live
        unshadowed = [name for name, _ in model.named_parameters() if name not in weights.shadowed]
        if unshadowed:
            raise ValueError(
                f"{path} ({weights.layout}) has no EMA shadow for {len(unshadowed)} parameters "
                f"({', '.join(unshadowed[:SHOWN])}); load its live weights with ema=False"
            )
    model.load_state_dict(state)
    return weights


def _unwrap(content: dict, kind: str, ema: bool) -> tuple[dict, str, str]:
    """(flat state dict, layout, source) for the nesting of ``content``."""
    for ema_key, live_key in TRAINER_KEYS[kind]:
        has_ema, has_live = isinstance(content.get(ema_key), dict), isinstance(content.get(live_key), dict)
        if has_live or (has_ema and ema_key != "ema"):  # a lone "ema" could be an AR's next to "vq"
            name = f"{{{live_key!r}: ...{f', {ema_key!r}: ...' if has_ema else ''}}} checkpoint"
            if ema and has_ema:
                return content[ema_key], name, f"EMA weights under {ema_key!r}"
            if not has_live:
                raise ValueError(f"({name}) holds only EMA weights under {ema_key!r}; load it with ema=True")
            return content[live_key], name, f"live weights under {live_key!r}"
    if isinstance(content.get("state_dict"), dict):
        return content["state_dict"], "Lightning checkpoint (state_dict)", "live weights"
    if isinstance(content.get("module"), dict):
        return content["module"], "{'module': ...} checkpoint", "live weights"
    if content and all(isinstance(v, Tensor) for v in content.values()):
        return content, "bare state dict", "live weights"
    wanted = sorted({k for pair in TRAINER_KEYS[kind] for k in pair} | {"state_dict"})
    raise ValueError(
        f"holds no {kind} weights: top-level keys {sorted(map(str, content))[:8]}, expected tensors or one of {wanted}"
    )


def _strip_wrappers(flat: dict) -> tuple[dict[str, Tensor], list[str]]:
    out, seen = {}, []
    for key, value in flat.items():
        if not isinstance(value, Tensor):
            raise ValueError(f"holds a {type(value).__name__} under {key!r} where a tensor was expected")
        name = str(key)
        while name.startswith(WRAPPER_PREFIXES):
            prefix = next(p for p in WRAPPER_PREFIXES if name.startswith(p))
            seen += [prefix] if prefix not in seen else []
            name = name[len(prefix):]
        if name in out:
            raise ValueError(f"holds {name!r} twice (with and without a {seen} prefix)")
        out[name] = value
    return out, seen


def _apply_ema(flat: dict[str, Tensor], ema: bool, source: str) -> tuple[dict[str, Tensor], str, int, set[str]]:
    """Replace live weights by their ``model_ema.`` shadows (when asked and present); drop the shadows."""
    shadows = {k[len(EMA_PREFIX):]: v for k, v in flat.items() if k.startswith(EMA_PREFIX)}
    live = {k: v for k, v in flat.items() if not k.startswith(EMA_PREFIX)}
    skipped = sum(name in EMA_BOOKKEEPING for name in shadows)
    shadows = {k: v for k, v in shadows.items() if k not in EMA_BOOKKEEPING}
    if not shadows:
        return live, source, skipped, set()
    if not ema:
        return live, "live weights (model_ema shadows left)", skipped, set()
    by_dotless = {k.replace(".", ""): k for k in live}
    # a loss module's shadows may outlive its live keys (filtered out of some state dicts): training-only too
    orphans = [f"{EMA_PREFIX}{s}" for s in shadows if s not in by_dotless and not s.startswith("loss")]
    skipped += sum(s not in by_dotless for s in shadows) - len(orphans)
    shadows = {k: v for k, v in shadows.items() if k in by_dotless}
    if orphans:
        raise ValueError(f"has EMA shadows without a live weight of the same name: {', '.join(orphans[:SHOWN])}")
    out = dict(live)
    for name, value in shadows.items():
        out[by_dotless[name]] = value
    return out, "EMA shadows (model_ema.*)", skipped, {by_dotless[name] for name in shadows}


def _has_taming_names(state: dict) -> bool:
    return any(k.startswith(("encoder.down.", "encoder.mid.block_1.", "decoder.up.")) for k in state)


def _taming_to_conv(key: str, levels: int) -> str:
    """One taming/IBQ parameter name -> the conv backbone's LlamaGen name."""
    key = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.conv_blocks.\1.res.", key)
    key = re.sub(r"^encoder\.down\.(\d+)\.(attn|downsample)\.", r"encoder.conv_blocks.\1.\2.", key)
    key = re.sub(r"^(encoder|decoder)\.mid\.block_1\.", r"\1.mid.0.", key)
    key = re.sub(r"^(encoder|decoder)\.mid\.attn_1\.", r"\1.mid.1.", key)
    key = re.sub(r"^(encoder|decoder)\.mid\.block_2\.", r"\1.mid.2.", key)
    match = re.match(r"^decoder\.up\.(\d+)\.(block|attn|upsample)\.(.*)$", key)
    if match:
        level, part, rest = int(match[1]), match[2], match[3]
        part = "res" if part == "block" else part
        key = f"decoder.conv_blocks.{levels - 1 - level}.{part}.{rest}"
    return key


def conv_to_taming(key: str, levels: int) -> str:
    """One conv-backbone (LlamaGen) parameter name -> taming's, as IBQ's and GEAR's IBQ models name it."""
    key = re.sub(r"^encoder\.conv_blocks\.(\d+)\.res\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"^encoder\.conv_blocks\.(\d+)\.(attn|downsample)\.", r"encoder.down.\1.\2.", key)
    key = re.sub(r"^(encoder|decoder)\.mid\.0\.", r"\1.mid.block_1.", key)
    key = re.sub(r"^(encoder|decoder)\.mid\.1\.", r"\1.mid.attn_1.", key)
    key = re.sub(r"^(encoder|decoder)\.mid\.2\.", r"\1.mid.block_2.", key)
    match = re.match(r"^decoder\.conv_blocks\.(\d+)\.(res|attn|upsample)\.(.*)$", key)
    if match:
        level, part, rest = int(match[1]), match[2], match[3]
        part = "block" if part == "res" else part
        key = f"decoder.up.{levels - 1 - level}.{part}.{rest}"
    return key


def _check_rope_table(table: Tensor | None, grid_size: int, path) -> None:
    """Older GPT files may carry the RoPE table; it then tells the grid the weights were trained on."""
    if table is None or table.ndim < 1:
        return
    grid = math.isqrt(max(table.shape[0] - 1, 0))
    if grid * grid + 1 == table.shape[0] and grid != grid_size:
        raise ValueError(
            f"{path} carries a RoPE table for a {grid}x{grid} token grid but grid_size={grid_size}; pass grid_size={grid}"
        )


def _guess(state: dict[str, Tensor]) -> str:
    """A hint at what the file holds, for the error message."""
    if any(k.startswith("decoder.adaptive.") for k in state):
        return " (it looks like an Open-MAGVIT2 LFQ tokenizer: preset lfq-16)"
    codebook = state.get("quantize.embedding.weight")
    if codebook is not None and codebook.ndim == 2:
        family = "vq-16" if codebook.shape[1] <= 32 else "ibq-16"
        return f" (it looks like a conv tokenizer with a {codebook.shape[0]} x {codebook.shape[1]} codebook: preset {family}?)"
    embed = state.get("tok_embeddings.weight")
    if embed is not None and embed.ndim == 2:
        layers = sum(1 for k in state if k.endswith(".attention.wqkv.weight"))
        classes = state.get("cls_embedding.embedding_table.weight")
        n_cls = f", num_classes={classes.shape[0] - 1}" if classes is not None else ""
        return f" (it looks like a GPT with n_layer={layers}, dim={embed.shape[1]}, vocab_size={embed.shape[0]}{n_cls})"
    return ""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
