"""Save/load a model as a directory: ``config.json`` (its dataclass config) + ``model.safetensors`` + ``README.md``.

Loading never unpickles: the config is JSON and the weights are safetensors. The directory may be named by a Hub
reference (``hf://OWNER/REPO``, ``hf://OWNER/REPO/tokenizer``; gear.hub), fetched into the Hugging Face cache.

``README.md`` is the model card: the Hub's metadata (library name, tags) and what is known when the model is saved
(its kind, config, parameter count, and when the saver says so the training stage, step and run config, or the
file it was converted from), so that ``hf upload OWNER/REPO DIR`` publishes a repository that loads as
``gear.load_tokenizer("hf://OWNER/REPO")``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gear.files import atomic_write
from gear.hub import resolve

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
LIBRARY_NAME = "gear"

M = TypeVar("M", bound="Pretrained")


@dataclass(frozen=True)
class ModelOrigin:
    """What a saver knows about a model beyond its weights and config; written into the model card."""

    stage: str | None = None            # the training stage that produced it: tokenizer | joint | ar | t2i ...
    step: int | None = None
    weights: str | None = None          # which weight set of the run: "EMA", "live", or "frozen" (not trained in that stage)
    run_config: dict | None = None      # the run's whole config, as plain data (dataclasses.asdict)
    converted_from: str | None = None   # a released file and how it was read (gear convert)


class Pretrained:
    """Mixin for ``nn.Module`` classes built from one dataclass config held in ``self.config``.

    Subclasses set ``config_class`` and ``kind`` (a short name written into config.json so that a
    tokenizer directory is never loaded as a generator, or the other way round).
    """

    config_class: ClassVar[type]
    kind: ClassVar[str]

    def preset(self) -> str | None:
        """The name of the preset this model's config is exactly (for its model card); None for a custom one."""
        return None

    def save_pretrained(self, directory: str | os.PathLike, origin: ModelOrigin | None = None) -> Path:
        """Write config.json, model.safetensors and the model card README.md (with ``origin`` when given)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        payload = {"kind": self.kind, "config": dataclasses.asdict(self.config)}
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        card = model_card(self.kind, self.config, sum(p.numel() for p in self.parameters()), origin, self.preset())
        atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(payload, indent=2)))
        atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(state, p))
        atomic_write(directory / CARD_NAME, lambda p: Path(p).write_text(card, encoding="utf-8"))
        return directory

    @classmethod
    def from_pretrained(cls: type[M], directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> M:
        directory = resolve(directory)
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
    path = Path(resolve(directory)) / CONFIG_NAME
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


def preset_name(config: Any, presets: dict[str, Any]) -> str | None:
    """The preset whose config ``config`` is, exactly; None for a custom one."""
    return next((name for name, preset in presets.items() if preset == config), None)


def model_card(kind: str, config: Any, num_params: int, origin: ModelOrigin | None = None,
               preset: str | None = None) -> str:
    """The README.md of a model directory: Hub metadata (YAML front matter) and what is known at save time."""
    from huggingface_hub import ModelCardData

    origin = origin or ModelOrigin()
    if kind == "tokenizer":
        tags = ["image-tokenizer", f"{config.quantizer}-tokenizer"]
        what = (f"a {config.quantizer.upper()} image tokenizer ({config.backbone} backbone, {config.codebook_size} codes, "
                f"downsample {2 ** (len(config.channel_mult) - 1)})")
        load = "tok = gear.load_tokenizer({where}\ncodes = tok.encode(images)  # images in [-1, 1], (B, 3, H, W)"
        pipeline = None
    elif kind == "generator":
        text = config.condition == "text"
        tags = ["autoregressive-image-generation", "text-to-image" if text else "class-conditional"]
        what = (f"an autoregressive image generator ({config.n_layer} layers, dim {config.dim}, {config.vocab_size}-code "
                f"vocabulary, {config.grid_size} x {config.grid_size} tokens, "
                + ("text-conditioned)" if text else f"{config.num_classes} classes)"))
        load = "gpt = gear.load_generator({where}\ntokens = gpt.generate(labels, cfg_scale=1.5, seed=0)"
        pipeline = "text-to-image" if text else None
    else:  # another saved module (e.g. the reference classifier of gear.eval): its class's from_pretrained loads it
        tags, what, pipeline = [kind], f"a {kind}", None
        load = f"# {kind} = <its class>.from_pretrained({{where}}"
    stage = origin.stage
    meta = ModelCardData(library_name=LIBRARY_NAME, tags=["gear", *tags, *([f"stage-{stage}"] if stage else [])],
                         pipeline_tag=pipeline)
    facts = [f"- kind: {kind}", f"- preset: {preset or 'custom (see config.json)'}", f"- parameters: {num_params:,}"]
    if stage:
        facts.append(f"- training stage: {stage}" + (f", step {origin.step}" if origin.step is not None else "")
                     + (f", {origin.weights} weights" if origin.weights else ""))
    if origin.converted_from:
        facts.append(f"- converted from: {origin.converted_from}")
    where = '"hf://OWNER/REPO")  # or the path of this directory; hf://OWNER/REPO@REVISION for a revision'
    lines = [
        "---", meta.to_yaml().strip(), "---", "",
        f"# gear {kind}", "",
        f"This is {what}, saved by the `gear` library's `save_pretrained`: "
        "`config.json` holds its config, `model.safetensors` its weights.", "",
        *facts, "",
        "```python", "import gear", "", load.format(where=where), "```", "",
        "## Config", "", "```yaml", _yaml(dataclasses.asdict(config)), "```",
    ]
    if origin.run_config is not None:
        lines += ["", "## Training config", "", "```yaml",
                  _yaml(origin.run_config), "```"]
    return "\n".join(lines) + "\n"


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(_plain(data), sort_keys=False, default_flow_style=None).strip()


def _plain(value: Any) -> Any:
    # YAML-safe: tuples as lists, paths as strings
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
