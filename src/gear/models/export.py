"""Models of this project in the anchors' own checkpoint layouts, for their sampling and evaluation scripts.

The readers of those layouts live in gear.models.released; these are the writers. (gear.eval.export is another
thing: sample images as an evaluator's npz.)

- ``llamagen``: a directory with ``tokenizer.pt`` laid out as LlamaGen's ``vq_ds16_c2i.pt`` (``{"model": state}``,
  VQ tokenizers only: LlamaGen has no LFQ or IBQ model) and/or ``generator.pt`` as its ``c2i_*.pt``
  (``{"model": state}``). Each holds one weight set: the EMA of a run (what sampling uses), or its live weights
  with ``live=True``, or a model directory's only set. The names are LlamaGen's own (this project's conv backbone
  and GPT use them); ``freqs_cis`` is not stored, LlamaGen recomputes it.
- ``gear``: one file as GEAR's ``train_gear.py`` checkpoints: ``vq`` (live) and ``vq_ema``, ``discriminator`` (a
  run's, from ``checkpoints/last.pt``, read by gear.models.released.read_discriminator as a joint stage reads it), ``ar`` and ``ema`` when there is a generator, and ``args`` with the
  architecture facts GEAR's ``src/inference.py`` reads. Tokenizer names are GEAR's models': LlamaGen's for VQ
  (without the usage buffer ``quantize.codebook_used``), Open-MAGVIT2's for LFQ, taming's for IBQ. A model
  directory holds one weight set, written under both ``vq`` and ``vq_ema`` (``ar`` and ``ema``).

Sources are read through the public loaders (gear.load_tokenizer / gear.load_generator): a model directory, a
run directory (its tokenizer and generator, EMA and live), or a Hub reference to either.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from gear.files import atomic_write, save_tensors
from gear.hub import resolve
from gear.models.autoencoder import TOKENIZER_PRESETS, Tokenizer, TokenizerConfig
from gear.models.gpt import GPT, GPTConfig
from gear.models.pretrained import CONFIG_NAME
from gear.models.released import DiscriminatorWeights, conv_to_taming, is_released_file, read_discriminator

FORMATS = ("llamagen", "gear")
LLAMAGEN_TOKENIZER = "tokenizer.pt"
LLAMAGEN_GENERATOR = "generator.pt"
USAGE_BUFFER = "quantize.codebook_used"    # LlamaGen's VQ carries it (show_usage); GEAR's VQ model has none
ANCHOR_GROUPS = 32                          # LlamaGen's, taming's and Open-MAGVIT2's GroupNorm(32, ...)
# Fields that decide a tokenizer's parameter shapes (the others are loss settings).
ARCH_FIELDS = ("quantizer", "backbone", "codebook_size", "codebook_dim", "base_channels", "channel_mult",
               "num_res_blocks", "z_channels", "image_channels", "norm_groups")
GEAR_TOKENIZERS = {"vq-16": "VQ-16", "lfq-16": "LFQ-16", "ibq-16": "IBQ-16"}   # GEAR's models.Tokenizers names
GEAR_GENERATORS = {(12, 12, 384): "LlamaGen-S", (12, 12, 768): "LlamaGen-B", (24, 16, 1024): "LlamaGen-L",
                   (36, 20, 1280): "LlamaGen-XL", (48, 24, 1536): "LlamaGen-XXL", (48, 40, 2560): "LlamaGen-XXXL"}


@dataclass
class Source:
    """What a model directory or run directory holds. ``*_live`` is None where there is one weight set only."""

    name: str
    tokenizer: Tokenizer | None = None
    tokenizer_live: Tokenizer | None = None
    generator: GPT | None = None
    generator_live: GPT | None = None
    discriminator: DiscriminatorWeights | None = None
    is_run: bool = False


@dataclass(frozen=True)
class Exported:
    files: tuple[Path, ...]
    notes: tuple[str, ...] = field(default=())   # one line per file: what it holds

    def describe(self) -> str:
        return "\n".join(self.notes)


def read_source(source: str | Path) -> Source:
    """The models of a model directory, a run directory, or a Hub reference to one."""
    import gear

    path = Path(resolve(source))
    if is_released_file(path):
        raise ValueError(f"{source} is a checkpoint file: `gear convert` it into a model directory first, "
                         "then export that directory")
    if not path.is_dir():
        raise FileNotFoundError(f"{source}: no such model directory or run directory")
    if (path / CONFIG_NAME).is_file():  # a model directory: one model, one weight set
        kind = json.loads((path / CONFIG_NAME).read_text()).get("kind")
        if kind == "tokenizer":
            return Source(str(source), tokenizer=gear.load_tokenizer(path))
        if kind == "generator":
            return Source(str(source), generator=gear.load_generator(path))
        raise ValueError(f"{path / CONFIG_NAME} holds a {kind!r} model: expected a tokenizer or a generator")
    out = Source(str(source), is_run=True)
    for ema in (True, False):
        try:
            tok = gear.load_tokenizer(path, ema=ema)
        except FileNotFoundError:
            tok = None
        try:
            gen = gear.load_generator(path, ema=ema)
        except FileNotFoundError:
            gen = None
        if ema:
            out.tokenizer, out.generator = tok, gen
        else:
            out.tokenizer_live, out.generator_live = tok, gen
    if out.tokenizer is None and out.generator is None:
        raise FileNotFoundError(f"{source} holds no saved tokenizer or generator (expected config.json, or a run "
                                "directory's tokenizer/ or generator/)")
    return out


# --- one model's state in an anchor's names -----------------------------------------------------


def _state(model: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def _check_anchor_tokenizer(config: TokenizerConfig, layout: str) -> None:
    if config.norm_groups != ANCHOR_GROUPS:
        raise ValueError(f"{layout}'s tokenizers normalise with {ANCHOR_GROUPS} GroupNorm groups but this one has "
                         f"norm_groups={config.norm_groups}: its weights would load there and compute something else")
    if config.image_channels != 3:
        raise ValueError(f"{layout}'s tokenizers take RGB images; this one has image_channels={config.image_channels}")


def _check_anchor_generator(config: GPTConfig, layout: str) -> None:
    if config.condition != "class":
        raise ValueError(f"{layout}'s c2i layout holds class-conditional generators; this one is "
                         f"{config.condition}-conditioned (export the run's tokenizer/ folder alone)")


def llamagen_tokenizer_state(tok: Tokenizer) -> dict[str, Tensor]:
    """The state dict of LlamaGen's VQModel of the same size (``VQ_models``, codebook_show_usage=True)."""
    config = tok.config
    if config.quantizer != "vq" or config.backbone != "conv":
        raise ValueError(f"LlamaGen's layout holds VQ tokenizers only, this is {config.quantizer.upper()}: "
                         "export it with --format gear")
    _check_anchor_tokenizer(config, "LlamaGen")
    return _state(tok)


def llamagen_generator_state(gpt: GPT) -> dict[str, Tensor]:
    """The state dict of LlamaGen's c2i Transformer of the same size (``GPT_models``; freqs_cis is recomputed)."""
    _check_anchor_generator(gpt.config, "LlamaGen")
    return _state(gpt)


def gear_tokenizer_state(tok: Tokenizer) -> dict[str, Tensor]:
    """The state dict of GEAR's VQModel / LFQModel / IBQModel of the same size, in their names."""
    config = tok.config
    _check_anchor_tokenizer(config, "GEAR")
    state = _state(tok)
    if config.quantizer == "vq":
        state.pop(USAGE_BUFFER, None)
    if config.quantizer == "ibq" and config.backbone == "conv":
        levels = len(config.channel_mult)
        state = {conv_to_taming(k, levels): v for k, v in state.items()}
    return state


def gear_generator_state(gpt: GPT) -> dict[str, Tensor]:
    _check_anchor_generator(gpt.config, "GEAR")
    return _state(gpt)


def gear_args(tok: Tokenizer | None, gpt: GPT | None) -> dict:
    """The architecture facts of a GEAR checkpoint's ``args`` that its inference.py reads (known ones only)."""
    args: dict = {}
    if tok is not None:
        c = tok.config
        arch = {f: getattr(c, f) for f in ARCH_FIELDS}
        name = next((GEAR_TOKENIZERS[p] for p in GEAR_TOKENIZERS
                     if {f: getattr(TOKENIZER_PRESETS[p], f) for f in ARCH_FIELDS} == arch), None)
        args.update(vq_model=name, codebook_size=c.codebook_size, codebook_embed_dim=c.codebook_dim,
                    downsample_ratio=2 ** (len(c.channel_mult) - 1))
    if gpt is not None:
        c = gpt.config
        args.update(ar_model=GEAR_GENERATORS.get((c.n_layer, c.n_head, c.dim)), num_classes=c.num_classes,
                    cls_token_num=c.cls_token_num, codebook_size=c.vocab_size)
        if tok is not None:
            args["image_size"] = c.grid_size * args["downsample_ratio"]
    return {k: v for k, v in args.items() if v is not None}


# --- writing -----------------------------------------------------------------------------------


def export(source: str | Path, fmt: str, out: str | Path, live: bool = False) -> Exported:
    """Write ``source`` (a model or run directory, or a Hub reference) in ``fmt`` ("llamagen" | "gear") to ``out``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    src = read_source(source)
    if live and not src.is_run:
        raise ValueError(f"{source} is a model directory with one weight set: live=True applies to run directories")
    if live and fmt == "gear":
        raise ValueError("the gear layout holds both weight sets (vq and vq_ema, ar and ema): drop --live")
    if fmt == "llamagen":
        return _export_llamagen(src, Path(out), live)
    if src.is_run:  # only this layout holds it: the run's whole checkpoint is read for it
        src.discriminator = read_discriminator(source)
    return _export_gear(src, Path(out))


def _refuse_existing(path: Path) -> None:
    if path.exists():
        raise ValueError(f"{path} already exists; pass another --out or remove it first")


def _export_llamagen(src: Source, out: Path, live: bool) -> Exported:
    which = "live weights" if live else ("EMA weights" if src.is_run else "weights")
    tok = src.tokenizer_live if live else src.tokenizer
    gen = src.generator_live if live else src.generator
    if (tok is None and src.tokenizer is not None) or (gen is None and src.generator is not None):
        raise FileNotFoundError(f"{src.name} holds no live weights (tokenizer-live/ or generator-live/)")
    # every check before any write: a refused source leaves nothing half-written
    jobs = []
    if tok is not None:
        jobs.append((out / LLAMAGEN_TOKENIZER, llamagen_tokenizer_state(tok), "VQ tokenizer", "vq_ds16_c2i.pt"))
    if gen is not None:
        jobs.append((out / LLAMAGEN_GENERATOR, llamagen_generator_state(gen), "c2i generator", "c2i_*.pt"))
    for path, *_ in jobs:
        _refuse_existing(path)
    notes = []
    for path, state, what, like in jobs:
        atomic_write(path, lambda tmp, s=state: save_tensors({"model": s}, tmp))
        notes.append(f"{path}: {what}, {which} of {src.name}, as LlamaGen's {like} ({{'model': ...}}, {len(state)} tensors)")
    return Exported(tuple(p for p, *_ in jobs), tuple(notes))


def _export_gear(src: Source, out: Path) -> Exported:
    payload: dict = {}
    held = []
    if src.tokenizer is not None:
        payload["vq_ema"] = gear_tokenizer_state(src.tokenizer)
        payload["vq"] = gear_tokenizer_state(src.tokenizer_live) if src.tokenizer_live is not None else payload["vq_ema"]
        held.append(f"{src.tokenizer.config.quantizer.upper()} tokenizer (vq, vq_ema"
                    + (")" if src.tokenizer_live is not None else ": the same one weight set)"))
    if src.discriminator is not None:
        payload["discriminator"] = src.discriminator.state
        held.append(f"discriminator ({src.discriminator.detail})")
    elif src.tokenizer is not None:
        held.append("no discriminator (the source has none: GEAR's joint stage needs one)")
    if src.generator is not None:
        payload["ema"] = gear_generator_state(src.generator)
        payload["ar"] = gear_generator_state(src.generator_live) if src.generator_live is not None else payload["ema"]
        held.append("generator (ar, ema" + (")" if src.generator_live is not None else ": the same one weight set)"))
    payload["args"] = gear_args(src.tokenizer, src.generator)
    _refuse_existing(out)
    atomic_write(out, lambda tmp: save_tensors(payload, tmp))
    return Exported((out,), (f"{out}: GEAR checkpoint of {src.name}: {'; '.join(held)}; args {payload['args']}",))
