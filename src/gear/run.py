"""A run directory: what `gear train` writes into ``train.out_dir`` and what every reader opens.

    RUN/
      config.yaml                        the resolved Config the run trained with (`gear resume` reads it back)
      checkpoints/                       training state to resume from (gear.train.checkpoint)
      tokenizer/  generator/             EMA weights, save_pretrained directories (what sampling uses)
      tokenizer-live/  generator-live/   the raw (non-EMA) weights
      tb/                                TensorBoard scalars
      metrics.jsonl                      one JSON record per logged step: {"step": N, "tok/l1": ..., ...}
      samples/  recon/                   preview grids, step_0000500.png
      summary.json                       the last values of a finished stage
      bad_samples.jsonl                  data items trained without (data.on_bad_sample=skip)

    run = open_run("runs/demo/ar")            # config.yaml read and checked, the run's kind found
    run.kind                                   # "tokenizer" | "class" | "text"
    tok, gen = run.load_pair(ema=True)         # gen is None for a tokenizer run
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from gear.hub import resolve
from gear.models.autoencoder import Tokenizer
from gear.models.gpt import GPT, GPTConfig
from gear.models.pretrained import CONFIG_NAME, read_config

if TYPE_CHECKING:
    from gear.config import Config

CONFIG_FILE = "config.yaml"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_NAME = "last.pt"        # the latest checkpoint; step_*.pt beside it (gear.train.checkpoint)
TOKENIZER_DIR = "tokenizer"
GENERATOR_DIR = "generator"
LIVE_SUFFIX = "-live"
TB_DIR = "tb"
METRICS_FILE = "metrics.jsonl"
SAMPLES_DIR = "samples"
RECON_DIR = "recon"
SUMMARY_FILE = "summary.json"
BAD_SAMPLES_FILE = "bad_samples.jsonl"

RunKind = Literal["tokenizer", "class", "text"]


# ---------------------------------------------------------------------- saved models


def checkpoint_path(run_dir: str | Path) -> Path:
    """The run's latest training checkpoint (what `gear resume` continues and a later stage's discriminator reads)."""
    return Path(run_dir) / CHECKPOINT_DIR / CHECKPOINT_NAME


def model_dir(path: str | Path, kind: str, ema: bool = True) -> Path:
    """A saved model directory, given either that directory or a run directory that holds one (a local path, or a Hub
    reference ``hf://OWNER/REPO[@REVISION][/FOLDER]`` fetched into the Hugging Face cache)."""
    path = Path(resolve(path))
    if (path / CONFIG_NAME).is_file():
        return path
    sub = path / (kind if ema else kind + LIVE_SUFFIX)
    if (sub / CONFIG_NAME).is_file():
        return sub
    raise FileNotFoundError(
        f"{path} holds no saved {kind}: expected {path / CONFIG_NAME} or {sub / CONFIG_NAME} "
        f"(a run directory written by `gear train`)"
    )


def check_pair(tokenizer: Tokenizer, generator: GPT, image_size: int | None = None) -> None:
    """A tokenizer and an AR belong together when the AR's vocabulary is the codebook (and grids agree)."""
    if generator.config.vocab_size != tokenizer.codebook_size:
        raise ValueError(
            f"mismatched tokenizer and generator: codebook has {tokenizer.codebook_size} codes, "
            f"the generator's vocabulary is {generator.config.vocab_size}; load the pair saved by the same run"
        )
    if image_size is not None and generator.config.grid_size * tokenizer.downsample != image_size:
        raise ValueError(
            f"mismatched tokenizer and generator: a {generator.config.grid_size}x{generator.config.grid_size} token grid "
            f"at downsample {tokenizer.downsample} is not {image_size} px"
        )


def load_pair(path: str | Path, ema: bool = True, device: str = "cpu") -> tuple[Tokenizer, GPT | None]:
    """The tokenizer and generator a run saved (EMA or live weights), in eval mode and checked to belong together;
    no generator (None) for a tokenizer run."""
    tok = Tokenizer.from_pretrained(model_dir(path, TOKENIZER_DIR, ema=ema), map_location=device).eval()
    try:
        gen_dir = model_dir(path, GENERATOR_DIR, ema=ema)
    except FileNotFoundError:
        return tok, None
    gen = GPT.from_pretrained(gen_dir, map_location=device).eval()
    check_pair(tok, gen)
    return tok, gen


def is_text_run(path: str | Path) -> bool:
    """True when the run's generator is text-conditioned (its generator/config.json says condition "text")."""
    return _generator_condition(path) == "text"


def _generator_condition(path: str | Path) -> str | None:
    try:
        return read_config(model_dir(path, GENERATOR_DIR), "generator", GPTConfig).condition
    except FileNotFoundError:
        return None


# ---------------------------------------------------------------------- config, metrics, summary


def read_run_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The run's config.yaml (with ``key=value`` overrides on top, as `gear resume` takes them)."""
    from gear.config import load_config

    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        raise FileNotFoundError(f"{config} not found: pass a run directory written by `gear train`")
    return load_config(config, overrides)


def write_run_config(path: str | Path, cfg: Config) -> None:
    from gear.config import save_config

    save_config(cfg, Path(path) / CONFIG_FILE)


def append_metrics(path: str | Path, step: int, metrics: dict) -> None:
    """One line ``{"step": step, **metrics}`` at the end of metrics.jsonl."""
    with open(Path(path) / METRICS_FILE, "a") as f:
        f.write(json.dumps({"step": step, **metrics}) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    """The records of metrics.jsonl ([] when there is none); unparsable lines (one still being written) are skipped."""
    file = Path(path) / METRICS_FILE
    if not file.is_file():
        return []
    records = []
    for line in file.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def write_summary(path: str | Path, summary: dict) -> None:
    (Path(path) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))


def read_summary(path: str | Path) -> dict:
    """summary.json ({} while the run has not finished a stage, or when the file cannot be read)."""
    try:
        return json.loads((Path(path) / SUMMARY_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


# ---------------------------------------------------------------------- an opened run


@dataclass(frozen=True)
class Run:
    """A run directory opened: its resolved config and its kind; models are loaded on request."""

    path: Path
    config: Config
    kind: RunKind  # "tokenizer": no generator; "class": class-conditional; "text": text-conditioned

    def model_dir(self, model: str, ema: bool = True) -> Path:
        """tokenizer/ or generator/ (EMA), tokenizer-live/ or generator-live/ (``ema=False``)."""
        return model_dir(self.path, model, ema=ema)

    def load_tokenizer(self, ema: bool = True, device: str = "cpu") -> Tokenizer:
        return Tokenizer.from_pretrained(self.model_dir(TOKENIZER_DIR, ema), map_location=device).eval()

    def load_generator(self, ema: bool = True, device: str = "cpu") -> GPT:
        """The generator (a TextGPT for a text run); FileNotFoundError for a tokenizer run."""
        return GPT.from_pretrained(self.model_dir(GENERATOR_DIR, ema), map_location=device).eval()

    def load_pair(self, ema: bool = True, device: str = "cpu") -> tuple[Tokenizer, GPT | None]:
        """The checked pair (no generator for a tokenizer run)."""
        tok = self.load_tokenizer(ema, device)
        if self.kind == "tokenizer":
            return tok, None
        gen = self.load_generator(ema, device)
        check_pair(tok, gen)
        return tok, gen

    def metrics(self) -> list[dict]:
        return read_metrics(self.path)

    def summary(self) -> dict:
        return read_summary(self.path)


def open_run(path: str | Path) -> Run:
    """The run directory at ``path``; FileNotFoundError when it holds no config.yaml (not a run directory)."""
    config = read_run_config(path)
    condition = _generator_condition(path)
    kind: RunKind = "tokenizer" if condition is None else "text" if condition == "text" else "class"
    return Run(Path(path), config, kind)
