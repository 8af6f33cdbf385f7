"""Hub references, resolved by huggingface_hub itself against a cache laid out as its documentation describes.

No network: the cache is written here (models--OWNER--REPO/{blobs,refs,snapshots}), offline mode is
huggingface_hub's own setting, and the 'missing' answers come from a local HTTP server speaking the Hub's
error headers to the real client.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import pathlib
import subprocess
import sys
import threading

import pytest
import torch
from huggingface_hub import constants

import gear
from gear.cli import main
from gear.hub import is_hub_ref, parse, resolve
from gear.models.pretrained import ModelOrigin
from test_released import TOKENIZERS, weights

ROOT = pathlib.Path(__file__).resolve().parents[1]


def cache_file(cache: pathlib.Path, repo: str, path: str, data: bytes, commit: str, ref: str | None = "main") -> None:
    """One file of ``repo`` at ``commit`` in the documented cache layout: the blob named by its sha256, the
    snapshot entry a relative symlink to it, ``refs/REF`` holding the commit."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    entry = folder / "snapshots" / commit / path
    entry.parent.mkdir(parents=True, exist_ok=True)
    entry.symlink_to(os.path.relpath(blob, entry.parent))
    if ref:
        (folder / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (folder / "refs" / ref).write_text(commit)


def cache_dir(cache: pathlib.Path, repo: str, directory: pathlib.Path, commit: str, ref: str, prefix: str = "") -> None:
    for file in sorted(directory.rglob("*")):
        if file.is_file():
            cache_file(cache, repo, prefix + file.relative_to(directory).as_posix(), file.read_bytes(), commit, ref)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """huggingface_hub's cache and offline switch (read once at its import) pointed at a fresh folder."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


MAIN, V1 = "1" * 40, "2" * 40


def test_local_paths_pass_through_untouched(tmp_path):
    for path in (tmp_path / "x.pt", str(tmp_path), "runs/demo/joint", "hf:/not-a-ref"):
        assert resolve(path) is path
    assert not is_hub_ref(pathlib.Path("hf://a/b"))  # a Path is a local path (and Path collapses the //)


def test_references_parse_as_the_hubs_uris():
    ref = parse("hf://BinLin203/GEAR-VQ/gear-vq.pt")
    assert (ref.repo_id, ref.path, ref.revision, ref.is_file) == ("BinLin203/GEAR-VQ", "gear-vq.pt", None, True)
    ref = parse("hf://models/me/run@v1.0/tokenizer")
    assert (ref.repo_id, ref.path, ref.revision, ref.is_file) == ("me/run", "tokenizer", "v1.0", False)
    assert parse("hf://me/run@refs/pr/3/a.pt").revision == "refs/pr/3"
    assert str(parse("hf://me/run@v1/a/b.pt")) == "hf://me/run@v1/a/b.pt"
    for bad, words in [("hf://me", "expected hf://OWNER/REPO"), ("hf://me/run/a.pt@v1", "the revision goes after"),
                       ("hf://datasets/me/data/x.pt", "only model repositories"), ("hf://me/run/../x.pt", "'..'")]:
        with pytest.raises(ValueError, match=words.replace("(", r"\(")):
            parse(bad)


def test_a_file_a_directory_and_a_revision_resolve_from_the_cache(offline_cache, tmp_path):
    torch.save({"model": weights("vq")}, tmp_path / "vq_ds16_c2i.pt")
    cache_file(offline_cache, "FoundationVision/LlamaGen", "vq_ds16_c2i.pt", (tmp_path / "vq_ds16_c2i.pt").read_bytes(), MAIN)
    preset, overrides = TOKENIZERS["vq"]
    # a released file, through the public loader (released.py resolves it)
    tok = gear.load_tokenizer("hf://FoundationVision/LlamaGen/vq_ds16_c2i.pt", preset=preset, **overrides)
    assert all(torch.equal(v, weights("vq")[k]) for k, v in tok.state_dict().items())
    path = resolve("hf://FoundationVision/LlamaGen/vq_ds16_c2i.pt")
    assert path == offline_cache / "models--FoundationVision--LlamaGen" / "snapshots" / MAIN / "vq_ds16_c2i.pt"
    # a model directory (the repository, or a folder of it), with a revision: another commit, another model
    a = gear.build_tokenizer(preset, **overrides)
    b = gear.build_tokenizer(preset, **overrides)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b", ModelOrigin(stage="tokenizer", step=400))
    cache_dir(offline_cache, "me/tok", tmp_path / "a", MAIN, "main")
    cache_dir(offline_cache, "me/tok", tmp_path / "b", V1, "v1", prefix="tokenizer/")
    loaded = type(a).from_pretrained("hf://me/tok")
    assert all(torch.equal(v, a.state_dict()[k]) for k, v in loaded.state_dict().items())
    for ref in ("hf://me/tok@v1/tokenizer", f"hf://me/tok@{V1}/tokenizer"):
        loaded = type(b).from_pretrained(ref)
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert resolve("hf://me/tok@v1/tokenizer") == offline_cache / "models--me--tok" / "snapshots" / V1 / "tokenizer"


def test_convert_takes_a_hub_file_and_writes_a_model_card(offline_cache, tmp_path, capsys):
    torch.save({"vq": weights("vq")}, tmp_path / "gear-vq.pt")
    cache_file(offline_cache, "BinLin203/GEAR-VQ", "gear-vq.pt", (tmp_path / "gear-vq.pt").read_bytes(), MAIN)
    preset, overrides = TOKENIZERS["vq"]
    args = [f"{k}={list(v) if isinstance(v, tuple) else v}" for k, v in overrides.items()]
    assert main(["convert", "hf://BinLin203/GEAR-VQ/gear-vq.pt", "--preset", preset, *args,
                 "--out", str(tmp_path / "out")]) == 0
    assert "from hf://BinLin203/GEAR-VQ/gear-vq.pt" in capsys.readouterr().out
    card = (tmp_path / "out" / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: gear" in front and "- vq-tokenizer" in front
    assert "converted from: hf://BinLin203/GEAR-VQ/gear-vq.pt" in card and "preset: custom" in card


def test_a_model_card_names_the_preset_and_the_stage(tmp_path):
    gen = gear.build_generator("gpt-tiny")
    gen.save_pretrained(
        tmp_path / "gen", ModelOrigin(stage="joint", step=250, weights="EMA", run_config={"train": {"stage": "joint", "steps": 250}}))
    card = (tmp_path / "gen" / "README.md").read_text()
    assert "- class-conditional" in card and "- stage-joint" in card
    assert "preset: gpt-tiny" in card and "training stage: joint, step 250, EMA weights" in card
    assert "## Training config" in card and "steps: 250" in card
    assert f"parameters: {sum(p.numel() for p in gen.parameters()):,}" in card


def test_offline_and_uncached_is_one_line_with_the_fetch_command(offline_cache, capsys):
    cache_file(offline_cache, "BinLin203/GEAR-VQ", "other.pt", b"x", MAIN)
    for ref, command in [("hf://BinLin203/GEAR-VQ/gear-vq.pt", "`hf download BinLin203/GEAR-VQ gear-vq.pt`"),
                         ("hf://BinLin203/Warmup-VQ@v2/vq-with-gan.pt",
                          "`hf download BinLin203/Warmup-VQ vq-with-gan.pt --revision v2`")]:
        with pytest.raises(FileNotFoundError) as excinfo:
            resolve(ref)
        message = str(excinfo.value)
        assert "\n" not in message and message.startswith(f"{ref} is not in the Hugging Face cache")
        assert "HF_HUB_OFFLINE=1" in message and command in message
    assert main(["convert", "hf://BinLin203/GEAR-VQ/gear-vq.pt", "--preset", "vq-16", "--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gear convert: error: hf://BinLin203/GEAR-VQ/gear-vq.pt is not in") and err.count("\n") == 1
    with pytest.raises(FileNotFoundError, match="hf download me/none --include 'config.json'"):
        gear.models.autoencoder.Tokenizer.from_pretrained("hf://me/none")


class FakeHub(http.server.BaseHTTPRequestHandler):
    """Answers as the Hub does for what does not exist: 404 with its X-Error-Code header."""

    def _answer(self):
        code = "RepoNotFound" if "/no-such-repo/" in self.path else "EntryNotFound"
        self.send_response(404)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Type", "application/json")
        body = json.dumps({"error": code}).encode()
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(body)

    do_HEAD = do_GET = _answer

    def log_message(self, *args):
        pass


def test_a_missing_repo_or_file_is_one_line(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}", "HF_HUB_CACHE": str(tmp_path),
               "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONPATH": str(ROOT / "src")}
        script = ("from gear.hub import resolve\n"
                  "for ref in ('hf://me/no-such-repo/x.pt', 'hf://me/tok/absent.pt'):\n"
                  "    try:\n        resolve(ref)\n    except FileNotFoundError as err:\n        print(err)\n")
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    finally:
        server.shutdown()
    lines = done.stdout.splitlines()
    assert len(lines) == 2, done.stdout + done.stderr
    assert lines[0].startswith("hf://me/no-such-repo/x.pt: no model repository me/no-such-repo on the Hugging Face Hub")
    assert lines[1].startswith("hf://me/tok/absent.pt: me/tok has no file 'absent.pt' at revision main")
