"""Save/load a model as a directory: ``config.json`` (its dataclass config) + ``model.safetensors``.

Loading never unpickles: the config is JSON and the weights are safetensors.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gear.files import atomic_write

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

M = TypeVar("M", bound="Pretrained")


class Pretrained:
    """Mixin for ``nn.Module`` classes built from one dataclass config held in ``self.config``.

    Subclasses set ``config_class`` and ``kind`` (a short name written into config.json so that a
    tokenizer directory is never loaded as a generator, or the other way round).
    """

    config_class: ClassVar[type]
    kind: ClassVar[str]

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        payload = {"kind": self.kind, "config": dataclasses.asdict(self.config)}
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(payload, indent=2)))
        atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(state, p))
        return directory

    @classmethod
    def from_pretrained(cls: type[M], directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> M:
        config = read_config(directory, cls.kind, cls.config_class)
        model = cls(config)
        weights = Path(directory) / WEIGHTS_NAME
        try:
            state = load_file(str(weights), device=str(map_location))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"cannot read {weights}: {err}; the file is missing or truncated, re-save the model") from None
        broken = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
        if broken is not None:
            raise ValueError(f"{weights} holds NaN or inf (in {broken}): it was saved from a diverged run; "
                             "use an earlier checkpoint's weights")
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{weights} does not match its config.json: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
        return model


def read_config(directory: str | os.PathLike, kind: str, config_class: type) -> Any:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected a directory written by save_pretrained()")
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); re-save the model") from None
    if payload.get("kind") != kind:
        raise ValueError(f"{directory} holds a {payload.get('kind')!r} model, not a {kind!r}")
    fields = {f.name for f in dataclasses.fields(config_class)}
    unknown = set(payload["config"]) - fields
    if unknown:
        raise ValueError(f"{path} has unknown config keys {sorted(unknown)}; was it saved by a newer gear?")
    return config_class(**{k: _untuple(v) for k, v in payload["config"].items()})


def _untuple(value: Any) -> Any:
    # JSON turns tuples into lists; configs use tuples for immutability.
    return tuple(value) if isinstance(value, list) else value
