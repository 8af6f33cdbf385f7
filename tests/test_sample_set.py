"""`gear sample RUN --num N --npz OUT`: chunks fixed by sample index, the same images in one process or two (gloo),
a restart that skips finished chunks, and the settings it refuses to mix."""

from __future__ import annotations

import os
import socket
from collections import Counter

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from gear.cli import main
from gear.models.autoencoder import build_tokenizer
from gear.models.gpt import build_generator
from gear.run import load_pair
from gear.sample_set import SampleSetSettings, chunk_dir, chunk_file, write_sample_set

SET = ["--num", "11", "--batch-size", "3", "--cfg-scale", "2.0", "--seed", "4"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A class-conditional run directory (tokenizer/ and generator/) with random weights, as `gear sample` reads it."""
    root = tmp_path_factory.mktemp("set-run")
    torch.manual_seed(0)
    tok = build_tokenizer("vq-tiny")
    gen = build_generator("gpt-tiny", vocab_size=tok.codebook_size, grid_size=4, num_classes=5)
    for p in gen.parameters():  # the output layer starts at zero
        torch.nn.init.normal_(p, std=0.05)
    tok.save_pretrained(root / "tokenizer")
    gen.save_pretrained(root / "generator")
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, argv: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    assert main(argv) == 0


def sample_in_processes(world: int, argv: list[str]) -> None:
    """`gear sample` as torchrun starts it: ``world`` processes with RANK/WORLD_SIZE set (gloo on the CPU)."""
    mp.spawn(_worker, args=(world, _free_port(), argv), nprocs=world, join=True)


def read(path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return data["arr_0"], data["arr_1"]


def test_two_processes_write_the_samples_of_one(run, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each of the two processes
    try:
        assert main(["sample", str(run), *SET, "--npz", str(tmp_path / "one.npz")]) == 0
    finally:
        torch.set_num_threads(threads)
    sample_in_processes(2, ["sample", str(run), *SET, "--npz", str(tmp_path / "two.npz")])
    one, two = read(tmp_path / "one.npz"), read(tmp_path / "two.npz")
    assert one[0].shape == (11, 16, 16, 3) and one[0].dtype == np.uint8
    np.testing.assert_array_equal(two[0], one[0])  # bit for bit
    np.testing.assert_array_equal(two[1], one[1])
    assert one[1].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0]  # class-balanced by sample index
    assert len({a.tobytes() for a in one[0]}) == 11  # every chunk has its own seed: no repeated image
    assert not chunk_dir(tmp_path / "one.npz").exists() and not chunk_dir(tmp_path / "two.npz").exists()


class Killed(Exception):
    pass


def test_a_run_killed_midway_restarts_to_the_same_npz(run, tmp_path):
    tok, gen = load_pair(run)
    settings = SampleSetSettings(num=11, chunk_size=3, cfg_scale=2.0, seed=4)
    whole = write_sample_set(tok, gen, settings, tmp_path / "whole.npz").path

    def kill_after_two(chunk: int) -> None:  # a process killed once two chunks are on disk
        if chunk == 1:
            raise Killed

    out = tmp_path / "killed.npz"
    with pytest.raises(Killed):
        write_sample_set(tok, gen, settings, out, on_chunk=kill_after_two)
    parts = chunk_dir(out)
    assert not out.exists() and sorted(p.name for p in parts.glob("chunk_*")) == ["chunk_000000.npy", "chunk_000001.npy"]
    (parts / ".chunk_000002.npy.x1y2.npy").write_bytes(b"\x93NUMPY torn")  # a write the kill interrupted

    drawn: list[int] = []
    result = write_sample_set(tok, gen, settings, out, on_chunk=drawn.append)
    assert drawn == [2, 3] and result.drawn == 5  # only the missing chunks
    np.testing.assert_array_equal(read(out)[0], read(whole)[0])
    np.testing.assert_array_equal(read(out)[1], read(whole)[1])
    assert not parts.exists()


def test_a_restart_with_other_settings_is_refused(run, tmp_path, capsys):
    out = tmp_path / "s.npz"
    chunk_dir(out).mkdir()
    tok, gen = load_pair(run)

    def kill(chunk: int) -> None:
        raise Killed

    with pytest.raises(Killed):
        write_sample_set(tok, gen, SampleSetSettings(num=6, chunk_size=3, seed=4), out, on_chunk=kill)
    assert main(["sample", str(run), "--num", "6", "--batch-size", "3", "--seed", "5", "--npz", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gear sample: error: ") and "other settings (seed, source differ)" in err
    assert chunk_file(chunk_dir(out), 0).is_file()  # nothing saved is lost


def test_random_labels_and_class_subsets(run, tmp_path):
    out = tmp_path / "r.npz"
    assert main(["sample", str(run), "--num", "40", "--batch-size", "8", "--cfg-scale", "1", "--labels", "random",
                 "--classes", "1,3", "--npz", str(out)]) == 0
    labels = read(out)[1]
    assert set(labels.tolist()) == {1, 3} and labels.tolist() != [1, 3] * 20  # drawn, not interleaved
    settings = SampleSetSettings(num=40, chunk_size=8, labels="random", classes=(1, 3))
    np.testing.assert_array_equal(labels, settings.all_labels(5))  # fixed by the seed
    balanced = SampleSetSettings(num=12, classes=(1, 3, 4)).all_labels(5)
    assert Counter(balanced.tolist()) == {1: 4, 3: 4, 4: 4}


@pytest.mark.parametrize("argv, says", [
    (["--num", "5"], "add --npz OUT.npz"),
    (["--num", "5", "--npz", "x.npz", "--per-class", "2"], "drop --per-class and --out"),
    (["--num", "5", "--npz", "x.npz", "--out", "g.png"], "drop --per-class and --out"),
    (["--npz", "x.npz"], "add --num N"),
    (["--labels", "random"], "add --num N"),
    (["--num", "5", "--npz", "x.npy"], "must end in .npz"),
    (["--num", "5", "--npz", "x.npz", "--classes", "7"], "classes 7 are outside"),
])
def test_bad_sample_set_arguments_are_one_line(run, tmp_path, capsys, argv, says):
    argv = [a if not a.startswith("x.") else str(tmp_path / a) for a in argv]
    assert main(["sample", str(run), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gear sample: error: ") and says in err[0], err
    assert not list(tmp_path.iterdir())


def test_eval_takes_the_sampling_options_for_gen_only(capsys):
    assert main(["eval", "adm", "s.npz", "--ref", "r.npz", "--top-k", "5"]) == 2
    assert "belong to `gear eval gen`" in capsys.readouterr().err


def test_a_grid_takes_cfg_interval_and_writes_it_in_its_command(run, tmp_path):
    from gear.sample import SampleSettings, sample_images

    settings = SampleSettings(classes=(1, 2), per_class=4, cfg_scale=30.0, cfg_interval=0, seed=2)
    assert "--cfg-interval 0" in settings.command(str(run))
    tok, gen = load_pair(run)
    limited = sample_images(tok, gen, settings)
    always = sample_images(tok, gen, SampleSettings(classes=(1, 2), per_class=4, cfg_scale=30.0, seed=2))
    assert limited.shape == always.shape and not torch.equal(limited, always)
    assert main(["sample", str(run), "--cfg-interval", "1", "--per-class", "1", "--out", str(tmp_path / "g.png")]) == 0
