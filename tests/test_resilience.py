"""Training that survives what clusters do to it: non-finite steps, full disks, signals, bad data and bad files."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import gear.files
from gear.cli import main
from gear.config import load_config
from gear.data.bad_samples import BadSample, BadSamples, substitutions
from gear.data.fashion_mnist import resolve_root
from gear.files import UnsafeFileError, WriteError, atomic_write, save_tensors
from gear.train import checkpoint as ckpt
from gear.train import steps
from gear.train.loop import Trainer

needs_fmnist = pytest.mark.skipif(
    not (resolve_root() / "train-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST idx files not installed"
)
REPO = Path(__file__).resolve().parents[1]
TINY = [
    "data.limit=64", "train.batch_size=8", "train.log_every=1", "train.progress=false", "train.ema_decay=0.9",
    "model.tokenizer_overrides={base_channels: 16, z_channels: 32, norm_groups: 8}", "align.projector_dim=64",
    "eval.samples_per_class=1", "eval.sample_classes=[0, 1]", "model.tokenizer_init=", "loss.perceptual_weight=0",
]


def tiny(run_dir, steps_, *extra):
    return [*TINY, f"train.out_dir={run_dir}", f"train.steps={steps_}", f"train.sample_every={max(steps_, 1)}",
            f"train.checkpoint_every={max(steps_, 1)}", *extra]


def joint(run_dir, steps_, *extra, resume=False) -> Trainer:
    return Trainer(load_config(REPO / "configs/fmnist-joint.yaml", tiny(run_dir, steps_, *extra)), resume=resume)


def full_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    state = {f"{n}.{k}": v for n, m in trainer.trained.items() for k, v in m.state_dict().items()}
    state |= {f"ema.{n}.{k}": v for n, e in trainer.emas.items() for k, v in e.state_dict().items()}
    for n, u in trainer.opts.items():
        for i, s in u.optimizer.state_dict()["state"].items():
            state |= {f"opt.{n}.{i}.{k}": v for k, v in s.items()}
    return state


def assert_equal_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def nan_ntp_at(calls: set[int] | None, first: int = 0):
    """next_token_loss that returns NaN (gradients included) on the given 0-based calls, or on every call >= first."""
    original, count = steps.next_token_loss, [0]

    def poisoned(logits, tokens):
        loss = original(logits, tokens)
        i, count[0] = count[0], count[0] + 1
        bad = i in calls if calls is not None else i >= first
        return loss * float("nan") if bad else loss

    return poisoned


# ------------------------------------------------------------------ non-finite guard


@needs_fmnist
def test_a_nan_step_is_skipped_and_equals_a_run_without_that_step(tmp_path, monkeypatch):
    monkeypatch.setattr(steps, "next_token_loss", nan_ntp_at({2}))  # the 3rd iteration's AR loss
    poisoned = joint(tmp_path / "nan", 5)
    poisoned.fit()
    monkeypatch.undo()
    skipped = joint(tmp_path / "skip", 5)
    skipped.cfg.train.steps = 2
    skipped.fit()
    skipped.step, skipped.cfg.train.steps = 3, 5  # step 3's batch is never trained on
    skipped.fit()
    assert_equal_states(full_state(poisoned), full_state(skipped))  # weights, EMA, AdamW moments and step counts
    summary = json.loads((tmp_path / "nan" / "summary.json").read_text())
    assert summary["skipped_steps"] == 1 and summary["step"] == 5
    logged = [json.loads(line) for line in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/skipped_steps"] for r in logged] == [0, 0, 1, 1, 1]
    assert "ar/ntp" not in logged[2]  # the skipped step's NaN stays out of the averages
    assert all(np.isfinite(r["ar/ntp"]) for i, r in enumerate(logged) if i != 2)


@needs_fmnist
def test_repeated_nan_steps_stop_the_run_with_a_finite_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(steps, "next_token_loss", nan_ntp_at(None, first=2))
    run = tmp_path / "diverged"
    args = tiny(run, 6, "train.checkpoint_every=1", "train.max_bad_steps=2")
    assert main(["train", str(REPO / "configs/fmnist-joint.yaml"), *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("gear train: error: step 4: ar/ntp is nan, 2 steps in a row (train.max_bad_steps=2)")
    assert "last checkpoint (step 3)" in err[-1] and "gear resume" in err[-1]
    payload = ckpt.load_checkpoint(ckpt.checkpoint_path(run))
    assert payload["step"] == 3 and payload["guard"] == {"skipped": 1, "in_a_row": 1, "skipped_samples": 0}
    tensors = [t for tree in (payload["modules"], payload["emas"]) for m in tree.values() for t in m.values()]
    assert all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())
    import gear

    gear.load_generator(run), gear.load_tokenizer(run)  # the exports are finite too (loading checks)


def test_a_model_with_nan_weights_is_refused(tmp_path):
    import gear

    tok = gear.build_tokenizer("vq-tiny")
    with torch.no_grad():
        next(tok.parameters()).view(-1)[0] = float("nan")
    tok.save_pretrained(tmp_path / "tok")
    with pytest.raises(ValueError, match="holds NaN or inf .* diverged run"):
        gear.load_tokenizer(tmp_path / "tok")


# ------------------------------------------------------------------ durable writes and IO errors


def test_a_failed_write_names_the_file_and_cause_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "ckpt" / "last.pt"
    atomic_write(target, lambda tmp: Path(tmp).write_bytes(b"good"))

    def full_disk(tmp):
        Path(tmp).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(WriteError) as info:
        atomic_write(target, full_disk)
    message = str(info.value)
    assert message == f"cannot write {target}: No space left on device (the previous file, if any, is intact)"
    assert info.value.errno == errno.ENOSPC and target.read_bytes() == b"good"
    assert os.listdir(target.parent) == ["last.pt"]  # no temporary file left behind
    # a writer in another language reports the OS error in its message (safetensors does)
    with pytest.raises(WriteError, match="Read-only file system"):
        atomic_write(target, lambda tmp: (_ for _ in ()).throw(RuntimeError("I/O error: Read-only file system (os error 30)")))
    with pytest.raises(ZeroDivisionError):  # anything else is a bug, not an IO error: it is not disguised
        atomic_write(target, lambda tmp: 1 / 0)


def test_torch_save_reports_the_disk_error_that_torch_hides(tmp_path, monkeypatch):
    class FullAfter:
        def __init__(self, path, mode):
            self.f, self.written = open(path, mode), 0

        def write(self, data):
            self.written += len(data)
            if self.written > 1000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(data)

        def flush(self):
            self.f.flush()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(gear.files, "open", FullAfter, raising=False)
    with pytest.raises(OSError) as info:
        save_tensors({"x": torch.zeros(10_000)}, tmp_path / "x.pt")
    assert info.value.errno == errno.ENOSPC  # torch itself raises "RuntimeError: unexpected pos ..."


def test_atomic_writes_fsync_the_file_and_its_directory(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def record(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(gear.files.os, "fsync", record)
    atomic_write(tmp_path / "a.bin", lambda tmp: Path(tmp).write_bytes(b"x"))
    assert str(tmp_path) in synced and any(Path(p).parent == tmp_path and ".a.bin." in p for p in synced)


@needs_fmnist
def test_a_full_disk_during_training_stops_with_one_line_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    calls = [0]
    real = ckpt.save_tensors

    def fail_second(obj, path):
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(obj, path)

    monkeypatch.setattr(ckpt, "save_tensors", fail_second)
    run = tmp_path / "full"
    assert main(["train", str(REPO / "configs/fmnist-tokenizer.yaml"), *tiny(run, 3, "train.checkpoint_every=1")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gear train: error: step 2: cannot write ")
    assert "No space left on device" in err[0] and f"gear resume {run}" in err[0]
    assert ckpt.load_checkpoint(ckpt.checkpoint_path(run))["step"] == 1


# ------------------------------------------------------------------ bad files and retention


def test_a_pickled_object_is_refused_as_possible_code(tmp_path):
    path = tmp_path / "checkpoints" / "last.pt"
    path.parent.mkdir()
    torch.save({"format_version": 1, "step": 1, "payload": Path("x")}, path)  # a pickled object, not a tensor
    with pytest.raises(UnsafeFileError) as info:
        ckpt.load_checkpoint(path)
    message = str(info.value)
    assert "could run code" in message and "was not loaded" in message and "truncated" not in message
    data = ckpt.save_checkpoint(tmp_path / "ok.pt", {"x": torch.zeros(100)}).read_bytes()
    (tmp_path / "ok.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        ckpt.load_checkpoint(tmp_path / "ok.pt")


def test_retention_keeps_n_older_checkpoints_and_resume_falls_back(tmp_path):
    for step in range(1, 6):
        ckpt.save_run_checkpoint(tmp_path, step, {"step": step, "w": torch.full((10,), float(step))}, keep=2)
    names = sorted(os.listdir(tmp_path / "checkpoints"))
    assert names == ["last.pt", "step_0000003.pt", "step_0000004.pt", "step_0000005.pt"]
    last = ckpt.checkpoint_path(tmp_path)
    assert ckpt.load_for_resume(tmp_path).payload["step"] == 5
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 3])  # damage the latest (its step file is the same file)
    resumed = ckpt.load_for_resume(tmp_path)
    assert resumed.payload["step"] == 4 and "step_0000004.pt (step 4)" in resumed.note and "truncated" in resumed.note
    # resumed from step 4, the run saves step 5 again: the damaged file is replaced, older ones pruned
    ckpt.save_run_checkpoint(tmp_path, 5, {"step": 5, "w": torch.zeros(10)}, keep=1)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["last.pt", "step_0000004.pt", "step_0000005.pt"]
    assert ckpt.load_for_resume(tmp_path).note == ""
    ckpt.save_run_checkpoint(tmp_path / "none", 7, {"step": 7}, keep=0)
    assert os.listdir(tmp_path / "none" / "checkpoints") == ["last.pt"]


# ------------------------------------------------------------------ bad data


def test_bad_samples_skip_to_the_next_readable_item_deterministically():
    bad = {2, 3, 7}

    def load(i):
        if i in bad:
            raise BadSample(f"item{i}.png", "broken")
        return i

    skip = BadSamples("skip", load, 8)
    assert [skip.read(i) for i in range(8)] == [0, 1, 4, 4, 4, 5, 6, 0]  # 7 wraps around to 0
    assert [BadSamples("skip", load, 8).read(i) for i in (3, 7)] == [4, 0]  # the same in a fresh process
    assert str(skip.error(3)) == "cannot read item3.png (broken); set data.on_bad_sample=skip to train on without " \
                                 "it, or remove or replace the file" and skip.error(4) is None
    with pytest.raises(BadSample, match="item2.png"):
        BadSamples("stop", load, 8).read(2)
    with pytest.raises(ValueError, match="none of the 3 items"):
        BadSamples("skip", lambda i: load(2), 3).read(0)
    assert substitutions([5, 3, 7], torch.tensor([5, 4, 0])) == [(3, 4), (7, 0)]


def image_folder(root: Path, corrupt: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 7), ("val", 4)):
        for cls in ("a", "b"):
            for i in range(per_class):
                path = root / split / cls / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(path)
    for i in range(corrupt):
        (root / "train" / "a" / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    return root


def imagefolder_run(root, run_dir, steps_, *extra, resume=False) -> Trainer:
    args = tiny(run_dir, steps_, "data.name=imagefolder", f"data.root={root}", "data.image_size=32", *extra)
    return Trainer(load_config(REPO / "configs/fmnist-tokenizer.yaml", args), resume=resume)


def test_corrupt_images_are_skipped_deterministically_across_a_resume(tmp_path):
    root = image_folder(tmp_path / "data")
    one = imagefolder_run(root, tmp_path / "one", 4, "data.on_bad_sample=skip")
    one.fit()
    two = imagefolder_run(root, tmp_path / "two", 4, "data.on_bad_sample=skip", "train.checkpoint_every=2")
    two.cfg.train.steps = 2
    two.fit()
    resumed = imagefolder_run(root, tmp_path / "two", 4, "data.on_bad_sample=skip", "train.checkpoint_every=2", resume=True)
    resumed.fit()
    assert_equal_states(full_state(one), full_state(resumed))
    listed = [json.loads(line) for line in (tmp_path / "one" / "bad_samples.jsonl").read_text().splitlines()]
    assert listed and {Path(e["source"]).name for e in listed} <= {"0.png", "1.png"}
    assert all(e["replaced_by"] != e["index"] and "UnidentifiedImageError" in e["error"] for e in listed)
    assert (tmp_path / "two" / "bad_samples.jsonl").read_text() == (tmp_path / "one" / "bad_samples.jsonl").read_text()
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["skipped_samples"] == len(listed) == one.bad_data.count


def test_a_corrupt_image_stops_the_run_with_its_name_by_default(tmp_path, capsys):
    root = image_folder(tmp_path / "data", corrupt=1)
    args = tiny(tmp_path / "run", 3, "data.name=imagefolder", f"data.root={root}", "data.num_workers=1")
    assert main(["train", str(REPO / "configs/fmnist-tokenizer.yaml"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"gear train: error: cannot read {root / 'train' / 'a' / '0.png'} (UnidentifiedImageError")
    assert "data.on_bad_sample=skip" in err[0]


# ------------------------------------------------------------------ signals


def test_a_second_signal_exits_at_once():
    code = ("import os, signal, time\n"
            "from gear.train.preemption import StopSignals\n"
            "with StopSignals() as s:\n"
            "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.2); print('first:', s.received, flush=True)\n"
            "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(5); print('still running', flush=True)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGTERM
    assert done.stdout == "first: SIGTERM\n" and "SIGTERM received" in done.stderr


def start_training(run_dir: Path, steps_: int, *extra: str, resume: bool = False) -> subprocess.Popen:
    """`gear train` (or `gear resume`) in a child process with this process's number of torch threads."""
    if resume:
        args = ["resume", str(run_dir), f"train.steps={steps_}", *extra]
    else:
        args = ["train", str(REPO / "configs/fmnist-joint.yaml"), *tiny(run_dir, steps_, *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.Popen([sys.executable, "-m", "gear.cli", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def logged_steps(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.is_file() else 0


@needs_fmnist
def test_sigterm_writes_a_checkpoint_exits_0_and_resumes_exactly(tmp_path):
    run = tmp_path / "run"
    child = start_training(run, 200, "train.checkpoint_every=1000")
    deadline = time.time() + 600
    while logged_steps(run) < 2 and child.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=600)
    assert child.returncode == 0, err
    stopped = ckpt.load_checkpoint(ckpt.checkpoint_path(run))["step"]
    assert 2 <= stopped < 200
    assert f"stopped by SIGTERM at step {stopped}" in out and f"gear resume {run}" in out
    assert "SIGTERM received" in err
    resumed = Trainer(load_config(run / "config.yaml", [f"train.steps={stopped + 2}"]), resume=True)
    resumed.fit()
    reference = joint(tmp_path / "reference", stopped + 2, "train.checkpoint_every=1000")
    reference.fit()
    assert_equal_states(full_state(reference), full_state(resumed))


def newest_logged_step(run_dir: Path, after_line: int) -> int:
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines()[after_line:] if metrics.is_file() else []
    return max((json.loads(line)["step"] for line in lines if line.strip()), default=0)


@pytest.mark.slow
@needs_fmnist
def test_chaos_kill_9_at_random_moments_then_resume_is_bit_identical(tmp_path):
    """8 SIGKILLs, each 1-4 steps past the last checkpoint plus up to half a second (so some land mid-step and some
    mid-checkpoint), each followed by a resume; the final checkpoint equals an uninterrupted run's."""
    total, rng = 48, np.random.default_rng(2026)  # 8 kills advance at most 32 steps: no child ends before its kill
    run, reference = tmp_path / "chaos", tmp_path / "reference"
    extra = ("train.checkpoint_every=2", "train.keep_checkpoints=1")
    kills, moments = 0, []
    while kills < 8:
        start = ckpt.load_for_resume(run).payload["step"] if ckpt.has_checkpoint(run) else 0
        target = min(total - 1, start + int(rng.integers(1, 5)))
        seen = logged_steps(run)
        child = start_training(run, total, *extra, resume=start > 0)
        while newest_logged_step(run, seen) < target and child.poll() is None:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.5))
        assert child.poll() is None, child.stderr.read()
        child.kill()  # SIGKILL: no handler runs
        child.communicate()
        kills += 1
        moments.append((start, newest_logged_step(run, seen)))
    while not (ckpt.has_checkpoint(run) and ckpt.load_for_resume(run).payload["step"] == total):
        child = start_training(run, total, *extra, resume=ckpt.has_checkpoint(run))
        assert child.wait(timeout=1200) == 0, child.stderr.read()
    child = start_training(reference, total, *extra)
    assert child.wait(timeout=1200) == 0, child.stderr.read()
    a = ckpt.load_checkpoint(ckpt.checkpoint_path(run))
    b = ckpt.load_checkpoint(ckpt.checkpoint_path(reference))
    print(f"kills (resumed from step, killed after logging step): {moments}")

    def flat(tree, prefix=""):
        if isinstance(tree, dict):
            return {k: v for key, value in tree.items() for k, v in flat(value, f"{prefix}.{key}").items()}
        return {prefix: tree}

    fa, fb = flat({k: a[k] for k in ("modules", "optimizers", "emas")}), flat({k: b[k] for k in ("modules", "optimizers", "emas")})
    assert fa.keys() == fb.keys()
    for k in fa:
        same = torch.equal(fa[k], fb[k]) if isinstance(fa[k], torch.Tensor) else fa[k] == fb[k]
        assert same, f"{k} differs after {kills} kills"


def _disagreeing_worker(rank: int, world: int, port: int, run_dir: str) -> None:
    """Rank 1 alone sees a NaN metric in the 1st iteration and alone receives SIGTERM in the 2nd."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from gear.train.distributed import teardown_distributed
    from test_distributed import overrides

    original, calls = steps.STEPS["joint"], [0]

    def step(*args):
        result = original(*args)
        calls[0] += 1
        if rank == 1 and calls[0] == 1:
            result.metrics["ar/ntp"] = result.metrics["ar/ntp"] * float("nan")
        if rank == 1 and calls[0] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    steps.STEPS["joint"] = step
    try:
        trainer = Trainer(load_config(REPO / "configs/fmnist-joint.yaml", overrides(run_dir, 10)))
        summary = trainer.fit()
        Path(run_dir, f"rank{rank}.json").write_text(json.dumps(
            {"step": summary.step, "stopped_by": summary.stopped_by, "skipped": trainer.guard.skipped}))
    finally:
        teardown_distributed()


@needs_fmnist
def test_processes_agree_on_skipping_and_stopping(tmp_path):
    import torch.multiprocessing as mp
    from test_distributed import _free_port

    mp.spawn(_disagreeing_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["step"] for r in ranks] == [2, 2] and [r["skipped"] for r in ranks] == [1, 1]
    assert ranks[1]["stopped_by"] == "SIGTERM" and ranks[0]["stopped_by"] == "a stop signal to another process"
    assert ckpt.load_checkpoint(ckpt.checkpoint_path(tmp_path))["step"] == 2


@needs_fmnist
def test_resume_past_a_refused_last_pt_prints_only_its_own_line(tmp_path, capfd):
    run = tmp_path / "run"
    assert main(["train", str(REPO / "configs/fmnist-tokenizer.yaml"), *tiny(run, 2, "train.checkpoint_every=1")]) == 0
    # a last.pt of the newer pickle protocol (4), holding a pickled object: refused, with no note of torch's own
    torch.save({"format_version": 1, "step": 2, "payload": Path("x")}, ckpt.checkpoint_path(run), pickle_protocol=4)
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as seen:  # what a terminal would print
        warnings.simplefilter("always")
        assert main(["resume", str(run), "train.steps=3"]) == 0
    assert [str(w.message) for w in seen] == []
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "last.pt holds pickled objects that could run code: resuming from" in err[0], err
    assert "step_0000001.pt (step 1) instead" in err[0]
    assert json.loads((run / "summary.json").read_text())["step"] == 3


def test_a_file_of_the_newer_pickle_protocol_is_refused_for_what_it_is(tmp_path):
    path = tmp_path / "p4.pt"
    torch.save({"w": torch.zeros(3)}, path, pickle_protocol=4)  # plain tensors, but opcodes the safe reader lacks
    with pytest.raises(UnsafeFileError, match="pickle protocol the safe reader does not read") as info:
        gear.files.load_tensors(path)
    assert "torch.save's default protocol" in str(info.value) and "holds pickled Python objects" not in str(info.value)
