"""WebDataset shards split by process and loader worker (data.stream_split=shards), served by a real HTTP server on
127.0.0.1: each shard once per epoch, each sample once per epoch, resume without reading finished shards again,
bad shards and samples under data.on_bad_sample, pipe: shards only when allowed."""

from __future__ import annotations

import io
import json
import os
import re
import socket
import threading
from collections import Counter
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from gear.data import DataConfig, ShardedCaptions, build_dataset
from gear.data import shard_io
from gear.data.bad_samples import BadSample, SkippedSample, substitutions
from gear.data.shards import SHARD_STRIDE, merge_states
from gear.train.batches import batch_stream

SHARDS, PER_SHARD = 8, 4


def write_shards(folder: Path, shards: int = SHARDS, per_shard: int = PER_SHARD, bad: tuple[int, ...] = ()) -> None:
    """Shards s00.tar ... of ``per_shard`` 20x20 PNGs each; sample ``shard * 100 + place`` is unreadable if in ``bad``."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with wds.TarWriter(str(folder / f"s{s:02d}.tar")) as sink:
            for place in range(per_shard):
                buf = io.BytesIO()
                Image.fromarray(np.full((20, 20, 3), 7 * s + place, dtype=np.uint8)).save(buf, format="PNG")
                png = b"garbage" if s * 100 + place in bad else buf.getvalue()
                sink.write({"__key__": f"k{s}_{place}", "png": png, "txt": f"shard {s} sample {place}".encode()})


class _Handler(SimpleHTTPRequestHandler):
    def do_GET(self):
        self.server.requests.append(self.path.lstrip("/"))
        super().do_GET()

    def log_message(self, *args):
        pass


class ShardServer:
    """``folder`` over HTTP on 127.0.0.1 in a thread; ``requests`` lists the paths asked for, in order."""

    def __init__(self, folder: Path):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(folder)))
        self.httpd.requests = self.requests = []
        self.httpd.timeout = 5
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def __enter__(self) -> ShardServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def server(tmp_path):
    write_shards(tmp_path / "www")
    with ShardServer(tmp_path / "www") as srv:
        yield srv


def pattern(server: ShardServer) -> str:
    return server.url(f"s{{00..{SHARDS - 1:02d}}}.tar")


def shard_of(index: int) -> str:
    return f"s{index // SHARD_STRIDE:02d}.tar"


def indices(stream, steps: int) -> list[list[int]]:
    return [batch.samples.index.tolist() for _, batch in zip(range(steps), stream)]


# ------------------------------------------------------------------ the split, in one process


def test_each_reader_reads_its_own_shards_and_every_sample_comes_once_per_epoch(tmp_path):
    write_shards(tmp_path)
    cfg = DataConfig(name="webdataset", root=str(tmp_path / "s{00..07}.tar"), image_size=16, shuffle_buffer=6)
    # two processes (run one after the other here) x two loader workers; 32 samples, global batch 4: 8 steps/epoch
    per_epoch = [Counter(), Counter()]
    for rank in (0, 1):
        ds = build_dataset(cfg, "train", seed=3)
        got = indices(batch_stream(ds, 4, seed=3, start_step=0, rank=rank, world_size=2, num_workers=2, end_step=16), 16)
        for step, batch in enumerate(got):
            per_epoch[step // 8].update(batch)
        assert ds.bytes_read == 2 * 4 * os.path.getsize(tmp_path / "s00.tar")  # 2 readers x 2 shards x 2 epochs
    everything = {s * SHARD_STRIDE + p for s in range(SHARDS) for p in range(PER_SHARD)}
    assert all(set(c) == everything and set(c.values()) == {1} for c in per_epoch)
    # the shuffle buffer mixes a reader's shards: its samples do not come in shard order
    ds = build_dataset(cfg, "train", seed=3)
    flat = [i for b in indices(batch_stream(ds, 2, 3, 0, 0, 1, num_workers=0, end_step=8), 8) for i in b]
    assert flat != sorted(flat) and len({i // SHARD_STRIDE for i in flat[:4]}) > 1


def test_fewer_shards_than_readers_stop_with_one_line(tmp_path):
    write_shards(tmp_path, shards=3)
    ds = build_dataset(DataConfig(name="webdataset", root=str(tmp_path / "s{00..02}.tar"), image_size=16), "train")
    with pytest.raises(ValueError, match="3 webdataset shards cannot feed 4 readers .*data.stream_split=exact"):
        next(batch_stream(ds, 4, 0, 0, 0, 2, num_workers=2))


def test_very_uneven_shards_are_warned_about(tmp_path):
    from gear.data.shards import UnevenShards

    write_shards(tmp_path / "a", shards=1, per_shard=1)
    write_shards(tmp_path / "b", shards=1, per_shard=40)
    ds = ShardedCaptions([str(tmp_path / "a" / "s00.tar"), str(tmp_path / "b" / "s00.tar")], image_size=16)
    with pytest.warns(UnevenShards, match="shard sizes range from"):
        ds.configure(0, 1, 0, 2, 0)


def test_config_checks_for_the_shard_options():
    with pytest.raises(ValueError, match="data.stream_split must be one of"):
        DataConfig(name="webdataset", stream_split="nodes")
    with pytest.raises(ValueError, match="data.num_workers must be 0 with data.stream_split=exact"):
        DataConfig(name="webdataset", stream_split="exact", num_workers=2)
    with pytest.raises(ValueError, match="data.allow_pipe=true"):
        DataConfig(name="webdataset", root="pipe:curl -s https://example.com/a.tar")
    DataConfig(name="webdataset", num_workers=2)  # the shard split runs in loader workers


def test_pipe_shards_run_only_when_allowed(tmp_path):
    write_shards(tmp_path, shards=2)
    root = f"pipe:cat {tmp_path}/s{{00..01}}.tar"
    with pytest.raises(ValueError, match="run a shell command"):
        ShardedCaptions(root, image_size=16)
    ds = ShardedCaptions(root, image_size=16, allow_pipe=True, shuffle_buffer=0)
    got = indices(batch_stream(ds, 2, 0, 0, 0, 1, end_step=4), 4)
    assert sorted(i for b in got for i in b) == [s * SHARD_STRIDE + p for s in range(2) for p in range(PER_SHARD)]


# ------------------------------------------------------------------ over HTTP, in one process


def test_a_resumed_stream_continues_exactly_and_reads_no_finished_shard(server):
    cfg = DataConfig(name="webdataset", root=pattern(server), image_size=16, shuffle_buffer=3)
    # one process, two loader workers: 2 readers x 16 samples, local batch 2: 16 steps per epoch
    whole = indices(batch_stream(build_dataset(cfg, "train", seed=5), 2, 5, 0, 0, 1, num_workers=2, end_step=16), 16)
    assert Counter(server.requests) == Counter(f"s{s:02d}.tar" for s in range(SHARDS))  # each shard once in the epoch

    del server.requests[:]
    first = build_dataset(cfg, "train", seed=5)
    part = indices(batch_stream(first, 2, 5, 0, 0, 1, num_workers=2, end_step=7), 7)
    saved = merge_states([first.state_dict()])
    saved = torch.load(io.BytesIO(_serialized(saved)), weights_only=True)  # as the checkpoint stores it
    del server.requests[:]
    again = build_dataset(cfg, "train", seed=5)
    again.load_state_dict(saved)
    rest = indices(batch_stream(again, 2, 5, 7, 0, 1, num_workers=2, end_step=16), 9)
    assert part + rest == whole  # no sample twice, none skipped, the same order

    trained_before = Counter(shard_of(i) for b in part for i in b)
    finished = {s for s, n in trained_before.items() if n == PER_SHARD}
    assert finished and not finished & set(server.requests)
    assert len(server.requests) == len(set(server.requests))
    # what it reopened: shards it had open or had samples of in its shuffle buffer, and the ones not started
    assert set(server.requests) == {f"s{s:02d}.tar" for s in range(SHARDS)} - finished

    # another layout (one reader instead of two) cannot continue the stream: it starts at the next epoch
    other = build_dataset(cfg, "train", seed=5)
    other.load_state_dict(saved)
    note = other.configure(0, 1, 0, 2, 7, 8)
    assert "starts at epoch 1" in note and all(s["epoch"] == 1 for s in other.states.values())


def _serialized(state) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def test_the_exact_split_reads_http_shards_as_local_ones(server, tmp_path):
    def first_batches(root):
        cfg = DataConfig(name="webdataset", root=root, image_size=16, stream_split="exact")
        stream = batch_stream(build_dataset(cfg, "train", seed=2), 4, 2, 0, 1, 2)
        return [b.samples.caption for _, b in zip(range(3), stream)]

    remote = first_batches(pattern(server))
    assert remote == first_batches(str(tmp_path / "www" / "s{00..07}.tar"))
    assert len({c for batch in remote for c in batch}) == 6


def test_a_missing_remote_shard_is_retried_then_skipped_or_stops(server, monkeypatch):
    monkeypatch.setattr(shard_io, "RETRY_DELAY_S", 0.0)
    urls = [server.url("s00.tar"), server.url("gone.tar"), server.url("s01.tar")]
    ds = ShardedCaptions(urls, image_size=16, train=False, on_bad_sample="stop")
    with pytest.raises(BadSample, match=r"cannot read http://127\.0\.0\.1:\d+/gone\.tar \(shard could not be read in 3"):
        indices(batch_stream(ds, 2, 0, 0, 0, 1, end_step=4), 4)
    assert server.requests.count("gone.tar") == shard_io.READ_TRIES

    del server.requests[:]
    ds = ShardedCaptions(urls, image_size=16, train=False, on_bad_sample="skip")
    with pytest.warns(SkippedSample, match=r"skipped shard http://127\.0\.0\.1:\d+/gone\.tar"):
        got = indices(batch_stream(ds, 2, 0, 0, 0, 1, end_step=4), 4)
    assert sorted(i for b in got for i in b) == [s * SHARD_STRIDE + p for s in (0, 2) for p in range(PER_SHARD)]


def test_a_run_on_a_missing_remote_shard_stops_with_one_line_or_trains_on(server, tmp_path, monkeypatch, capsys):
    from gear.cli import main

    monkeypatch.setattr(shard_io, "RETRY_DELAY_S", 0.0)
    write_shards(tmp_path / "val", shards=1)
    root = server.url("{s00,gone,s01}.tar")
    args = ["train", "configs/fmnist-tokenizer.yaml", "data.name=webdataset", f"data.root={root}",
            f"data.val_root={tmp_path / 'val' / 's00.tar'}", "data.image_size=32", "data.shuffle_buffer=0",
            "train.batch_size=4", "train.steps=3", "train.progress=false", "train.sample_every=100",
            "loss.perceptual_weight=0", "loss.gan_weight=0",
            "model.tokenizer_overrides={base_channels: 8, z_channels: 16, norm_groups: 4}"]
    assert main([*args, f"train.out_dir={tmp_path / 'stop'}"]) != 0
    err = capsys.readouterr().err
    assert re.search(r"gear train: error: cannot read http://127\.0\.0\.1:\d+/gone\.tar \(shard could not be read", err)
    with pytest.warns(SkippedSample, match="gone.tar"):
        assert main([*args, f"train.out_dir={tmp_path / 'skip'}", "data.on_bad_sample=skip"]) == 0
    assert json.loads((tmp_path / "skip" / "summary.json").read_text())["step"] == 3  # 12 samples: into epoch 1


def test_bad_samples_give_their_place_to_the_next_readable_one(tmp_path):
    write_shards(tmp_path, shards=2, bad=(1, 2))
    ds = ShardedCaptions(str(tmp_path / "s{00..01}.tar"), image_size=16, train=False, on_bad_sample="skip")
    batches = list(batch_stream(ds, 3, 0, 0, 0, 1, end_step=2))
    assert [b.samples.index.tolist() for b in batches] == [[0, 3, SHARD_STRIDE], [SHARD_STRIDE + 1, SHARD_STRIDE + 2,
                                                                                  SHARD_STRIDE + 3]]
    assert substitutions(batches[0].requested, batches[0].samples.index) == [(1, 3), (2, SHARD_STRIDE)]
    assert "png image" in ds.bad_samples.error(1).reason and "k0_2 in" in ds.bad_samples.error(2).source
    stop = ShardedCaptions(str(tmp_path / "s{00..01}.tar"), image_size=16, train=False)
    with pytest.raises(BadSample, match="cannot read k0_1 in .*s00.tar"):
        list(batch_stream(stop, 3, 0, 0, 0, 1, end_step=2))


# ------------------------------------------------------------------ training: two gloo processes x two workers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shard_run_config(run_dir, root: str, val_root: str, steps: int, batch_size: int = 4):
    from gear.config import load_config

    return load_config("configs/fmnist-tokenizer.yaml", [
        "data.name=webdataset", f"data.root={root}", f"data.val_root={val_root}", "data.image_size=32",
        "data.num_workers=2", "data.shuffle_buffer=3", f"train.batch_size={batch_size}", f"train.steps={steps}",
        "train.progress=false", f"train.out_dir={run_dir}", "train.sample_every=1000", "train.checkpoint_every=1000",
        "train.log_every=1000", "loss.perceptual_weight=0", "loss.gan_weight=0",
        "model.tokenizer_overrides={base_channels: 8, z_channels: 16, norm_groups: 4}"])


def recording_batch_stream(trained: dict[int, list[int]]):
    """batch_stream that notes the sample indices of each step's batch in ``trained``."""
    def recording(*args, **kw):
        for step, batch in enumerate(batch_stream(*args, **kw), start=args[3]):
            trained[step] = batch.samples.index.tolist()
            yield batch
    return recording


def test_a_run_on_http_shards_with_loader_workers_resumes_on_the_same_samples(server, tmp_path, monkeypatch):
    """One process, two loader workers, through the trainer and its checkpoint: 3 + 3 steps train on the samples
    of 6 uninterrupted ones, and the second part reads no shard the first had finished."""
    from gear.train import loop

    write_shards(tmp_path / "val", shards=1)
    val = str(tmp_path / "val" / "s00.tar")
    whole: dict[int, list[int]] = {}
    monkeypatch.setattr(loop, "batch_stream", recording_batch_stream(whole))
    loop.Trainer(shard_run_config(tmp_path / "whole", pattern(server), val, 6)).fit()
    parts: dict[int, list[int]] = {}
    monkeypatch.setattr(loop, "batch_stream", recording_batch_stream(parts))
    loop.Trainer(shard_run_config(tmp_path / "parts", pattern(server), val, 3)).fit()
    del server.requests[:]
    loop.Trainer(shard_run_config(tmp_path / "parts", pattern(server), val, 6), resume=True).fit()
    assert parts == whole and sorted(whole) == list(range(6))
    finished = {s for s, n in Counter(shard_of(i) for step in range(3) for i in whole[step]).items() if n == PER_SHARD}
    assert finished and not finished & set(server.requests)


def _train(rank: int, world: int, port: int, run_dir: str, root: str, val_root: str, steps: int, resume: bool) -> None:
    """One process of a tokenizer run on the shards; it writes the sample indices of each step it trained on."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from gear.train import loop
    from gear.train.distributed import teardown_distributed

    trained: dict[int, list[int]] = {}
    loop.batch_stream = recording_batch_stream(trained)
    try:
        loop.Trainer(shard_run_config(run_dir, root, val_root, steps), resume=resume).fit()
    finally:
        teardown_distributed()
    path = Path(run_dir) / f"trained-{rank}.json"
    earlier = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**earlier, **{str(k): v for k, v in trained.items()}}))


def train_two_processes(server: ShardServer, run_dir: Path, steps: int, resume: bool = False) -> dict[int, dict]:
    val = run_dir.parent / "val"
    if not val.is_dir():
        write_shards(val, shards=1)
    mp.spawn(_train, args=(2, _free_port(), str(run_dir), pattern(server), str(val / "s00.tar"), steps, resume),
             nprocs=2, join=True)
    return {r: {int(k): v for k, v in json.loads((run_dir / f"trained-{r}.json").read_text()).items()} for r in (0, 1)}


@pytest.fixture(scope="module")
def module_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("www")
    write_shards(folder)
    with ShardServer(folder) as srv:
        yield srv


@pytest.fixture(scope="module")
def one_epoch(module_server, tmp_path_factory):
    """Two processes x two loader workers train one epoch (8 steps of 4 of the 32 samples)."""
    del module_server.requests[:]
    trained = train_two_processes(module_server, tmp_path_factory.mktemp("epoch") / "run", steps=8)
    return trained, list(module_server.requests)


@pytest.mark.slow
def test_two_processes_with_two_workers_read_each_shard_once_and_train_each_sample_once(one_epoch):
    trained, requests = one_epoch
    assert Counter(requests) == Counter(f"s{s:02d}.tar" for s in range(SHARDS))
    samples = Counter(i for rank in trained.values() for batch in rank.values() for i in batch)
    assert samples == Counter({s * SHARD_STRIDE + p: 1 for s in range(SHARDS) for p in range(PER_SHARD)})
    assert all(sorted(rank) == list(range(8)) and all(len(b) == 2 for b in rank.values()) for rank in trained.values())


@pytest.mark.slow
def test_a_stopped_two_process_run_resumes_on_the_same_samples_without_finished_shards(one_epoch, module_server,
                                                                                      tmp_path):
    whole, _ = one_epoch
    del module_server.requests[:]
    before = train_two_processes(module_server, tmp_path / "run", steps=5)
    del module_server.requests[:]
    after = train_two_processes(module_server, tmp_path / "run", steps=8, resume=True)
    assert after == whole  # steps 0-4 from the first part, 5-7 from the resumed one: the uninterrupted run's samples
    trained_before = Counter(shard_of(i) for rank in before.values() for b in rank.values() for i in b)
    finished = {s for s, n in trained_before.items() if n == PER_SHARD}
    assert finished and not finished & set(module_server.requests)
    assert len(module_server.requests) == len(set(module_server.requests))


def test_the_reader_benchmark_runs_on_tiny_shards(capsys):
    import importlib
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    out = importlib.import_module("shard_reader").main(["--shards", "4", "--per-shard", "4", "--pixels", "24",
                                                        "--image-size", "16", "--batch", "4", "--workers", "1", "2"])
    assert set(out) == {"exact (in-process)", "shards, 1 workers", "shards, 2 workers"}
    # each of the two processes reads half the shards in the shard split, all of them in the exact one
    assert out["shards, 2 workers"]["bytes_rank0"] == out["shards, 2 workers"]["bytes_rank1"]
    assert out["exact (in-process)"]["bytes_rank1"] > 1.9 * out["shards, 2 workers"]["bytes_rank1"]
    assert "| shards, 2 workers |" in capsys.readouterr().out
