"""gear.run on tiny trained runs: opening a tokenizer, a class and a text run (config, kind, EMA or live models,
metrics and summary), a directory that is not a run, and a mismatched tokenizer/generator pair."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import tiny_runs

import gear
from gear.config import load_config
from gear.data.fashion_mnist import resolve_root
from gear.models.gpt_t2i import TextGPT
from gear.run import (
    Run,
    append_metrics,
    check_pair,
    is_text_run,
    open_run,
    read_metrics,
    read_run_config,
    read_summary,
    write_run_config,
    write_summary,
)
from gear.text.pipeline import load_text_to_image

pytestmark = pytest.mark.skipif(
    not (resolve_root() / "train-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST idx files not installed"
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tiny_runs(tmp_path_factory.mktemp("runs"))


def states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_tokenizer_run(runs):
    tok_dir, _ = runs
    run = open_run(tok_dir)
    assert isinstance(run, Run) and run.kind == "tokenizer" and run.path == tok_dir
    assert run.config == load_config(tok_dir / "config.yaml") and run.config.train.stage == "tokenizer"
    assert run.model_dir("tokenizer") == tok_dir / "tokenizer"
    assert run.model_dir("tokenizer", ema=False) == tok_dir / "tokenizer-live"
    tok, gen = run.load_pair()
    assert gen is None and not tok.training
    live = run.load_tokenizer(ema=False)
    assert states_equal(tok, gear.load_tokenizer(tok_dir)) and states_equal(live, gear.load_tokenizer(tok_dir, ema=False))
    assert not states_equal(tok, live), "EMA (decay 0.9) and live weights differ after two steps"
    with pytest.raises(FileNotFoundError, match="holds no saved generator"):
        run.load_generator()
    assert not is_text_run(tok_dir)


def test_a_class_run_with_its_metrics_and_summary(runs):
    _, ar_dir = runs
    run = open_run(str(ar_dir))
    assert run.kind == "class" and run.config.train.stage == "ar" and not is_text_run(ar_dir)
    tok, gen = run.load_pair()
    assert not isinstance(gen, TextGPT) and gen.config.vocab_size == tok.codebook_size and not gen.training
    live_tok, live_gen = run.load_pair(ema=False)
    assert states_equal(gen, gear.load_generator(ar_dir)) and states_equal(live_gen, gear.load_generator(ar_dir, ema=False))
    assert not states_equal(gen, live_gen)
    # the log the trainer wrote: one record per step (train.log_every=1), read as the page reads it
    lines = [json.loads(line) for line in (ar_dir / "metrics.jsonl").read_text().splitlines()]
    assert run.metrics() == lines and [r["step"] for r in lines] == [1, 2] and "ar/ntp" in lines[0]
    summary = run.summary()
    assert summary == json.loads((ar_dir / "summary.json").read_text()) and summary["stage"] == "ar" and summary["step"] == 2


def test_a_text_run(t2i_runs):
    _, t2i_dir = t2i_runs
    run = open_run(t2i_dir)
    assert run.kind == "text" and is_text_run(t2i_dir) and run.config.text.encoder
    tok, gen = run.load_pair()
    assert isinstance(gen, TextGPT) and gen.config.vocab_size == tok.codebook_size
    pipe = load_text_to_image(run)
    assert states_equal(pipe.generator, gen) and states_equal(pipe.tokenizer, tok)
    live = load_text_to_image(t2i_dir, ema=False)
    assert not states_equal(live.generator, gen)


def test_a_directory_that_is_not_a_run(runs, tmp_path):
    tok_dir, ar_dir = runs
    for path in (tmp_path, tmp_path / "missing", ar_dir / "generator", ar_dir / "config.yaml"):
        with pytest.raises(FileNotFoundError, match=r"config.yaml not found: pass a run directory written by `gear train`"):
            open_run(path)
    with pytest.raises(FileNotFoundError, match="config.yaml not found"):
        load_text_to_image(tmp_path)
    # a config.yaml but no saved models: the run opens (nothing loaded yet), loading names what is missing
    shutil.copy(ar_dir / "config.yaml", tmp_path / "config.yaml")
    run = open_run(tmp_path)
    assert run.kind == "tokenizer"
    with pytest.raises(FileNotFoundError, match="holds no saved tokenizer"):
        run.load_pair()


def test_a_mismatched_pair_is_refused(runs, tmp_path):
    _, ar_dir = runs
    mixed = tmp_path / "mixed"
    shutil.copytree(ar_dir, mixed)
    gear.build_tokenizer("vq-tiny", codebook_size=256).save_pretrained(mixed / "tokenizer")
    run = open_run(mixed)
    with pytest.raises(ValueError, match="mismatched tokenizer and generator: codebook has 256 codes"):
        run.load_pair()
    tok, gen = open_run(ar_dir).load_pair()
    check_pair(tok, gen, image_size=32)
    with pytest.raises(ValueError, match="token grid at downsample 4 is not 64 px"):
        check_pair(tok, gen, image_size=64)


def test_config_metrics_and_summary_files(runs, tmp_path):
    _, ar_dir = runs
    cfg = read_run_config(ar_dir, ["train.steps=7"])
    assert cfg.train.steps == 7 and read_run_config(ar_dir).train.steps == 2
    write_run_config(tmp_path, cfg)
    assert read_run_config(tmp_path) == cfg
    assert read_metrics(tmp_path) == [] and read_summary(tmp_path) == {}
    append_metrics(tmp_path, 1, {"tok/l1": 0.5})
    append_metrics(tmp_path, 2, {"tok/l1": 0.25, "eval/fid": 30.0})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "tok/l')  # a line still being written
    assert read_metrics(tmp_path) == [{"step": 1, "tok/l1": 0.5}, {"step": 2, "tok/l1": 0.25, "eval/fid": 30.0}]
    write_summary(tmp_path, {"stage": "joint", "step": 2})
    assert read_summary(tmp_path) == {"stage": "joint", "step": 2}
    (tmp_path / "summary.json").write_text('{"stage": ')
    assert read_summary(tmp_path) == {}
