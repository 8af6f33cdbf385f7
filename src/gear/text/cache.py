"""Text features computed once and kept on disk: one safetensors file per (encoder, weights, max length, padding
side, caption set).

The file holds ``features`` (N, T, D) float32 (zero at padded positions), ``mask`` (N, T) and the N deduplicated,
sorted captions; its metadata repeats what the features depend on. A file is used only when all of that matches the
request, so a stale or foreign file is refused with a message saying to delete it (it is then rebuilt), never used.
Encoding runs in a fixed order and batch size, so a rebuilt file holds the same bits.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from gear.files import atomic_write
from gear.models.gpt_t2i import TextCondition
from gear.text.encoders import TextEncoder

FORMAT = "gear-text-features-1"


def default_cache_dir() -> Path:
    return Path(os.environ.get("GEAR_CACHE", Path.home() / ".cache" / "gear")) / "text"


def unique_captions(captions) -> list[str]:
    return sorted(set(captions))


def cache_path(encoder: TextEncoder, captions: list[str], cache_dir: Path) -> Path:
    ident = encoder.identity()
    digest = hashlib.sha256("\n".join(captions).encode()).hexdigest()[:16]
    return cache_dir / (f"{ident['encoder']}-{ident['weights_sha256'][:16]}-len{ident['max_length']}-"
                        f"{ident['padding_side']}-{digest}.safetensors")


@dataclass
class FeatureCache:
    """Features of a fixed set of captions; ``lookup`` gathers a batch of them by caption text."""

    path: Path
    captions: list[str]
    features: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self) -> None:
        self.index = {c: i for i, c in enumerate(self.captions)}

    def lookup(self, captions: list[str]) -> TextCondition:
        try:
            rows = torch.tensor([self.index[c] for c in captions], dtype=torch.long)
        except KeyError as err:
            raise ValueError(f"caption {err.args[0][:60]!r} is not in the text feature cache {self.path}") from None
        return TextCondition(self.features[rows], self.mask[rows])


def build(encoder: TextEncoder, captions: list[str], path: Path) -> FeatureCache:
    cond = encoder.encode(captions)
    meta = {"format": FORMAT, **encoder.identity(), "num_captions": str(len(captions))}
    tensors = {"features": cond.features.contiguous(), "mask": cond.mask.to(torch.uint8).contiguous(),
               "captions_json": torch.frombuffer(bytearray(json.dumps(captions).encode()), dtype=torch.uint8)}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: save_file(tensors, p, metadata=meta))
    return FeatureCache(path, captions, cond.features, cond.mask)


def read(path: Path, encoder: TextEncoder, captions: list[str]) -> FeatureCache:
    """The cache at ``path`` if it holds exactly these captions encoded by this encoder; else ValueError."""
    refuse = f"text feature cache {path} {{}}; delete it to rebuild it"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(refuse.format(f"cannot be read ({err})")) from None
    expected = {"format": FORMAT, **encoder.identity()}
    wrong = {k: meta.get(k) for k, v in expected.items() if meta.get(k) != v}
    if wrong:
        raise ValueError(refuse.format(f"was written for {wrong}, not {dict((k, expected[k]) for k in wrong)}"))
    if not {"features", "mask", "captions_json"} <= set(tensors):
        raise ValueError(refuse.format("lacks features, mask or captions"))
    stored = json.loads(bytes(tensors["captions_json"].numpy()).decode())
    if stored != captions:
        raise ValueError(refuse.format("holds another set of captions"))
    features, mask = tensors["features"], tensors["mask"].bool()
    if features.shape != (len(captions), encoder.max_length, encoder.dim) or mask.shape != features.shape[:2]:
        raise ValueError(refuse.format(f"holds features of shape {tuple(features.shape)}"))
    return FeatureCache(path, captions, features, mask)


def load_or_build(encoder: TextEncoder, captions, cache_dir: str | Path | None = None) -> FeatureCache:
    """The features of the deduplicated ``captions``: read from the cache file when there, else computed and saved."""
    captions = unique_captions(captions)
    path = cache_path(encoder, captions, Path(cache_dir) if cache_dir else default_cache_dir())
    if path.is_file():
        return read(path, encoder, captions)
    return build(encoder, captions, path)
