"""Two CPU processes (gloo) train exactly like one with the same global batch, and their checkpoint resumes in one."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from gear.config import ConfigError, load_config
from gear.data.fashion_mnist import resolve_root
from gear.models.gpt import GPT
from gear.train.loop import Trainer

pytestmark = pytest.mark.skipif(
    not (resolve_root() / "train-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST idx files not installed"
)

# Dropout masks are drawn per process, so they cannot match a one-process run: switch them off here. So is the
# GAN term: on CPU the discriminator's BatchNorm keeps per-process statistics (SyncBatchNorm is CUDA-only).
# AdamW's epsilon is raised: parameters whose true gradient is zero (e.g. attention key biases) get float noise
# that a tiny epsilon would turn into full +-lr steps of random sign in either run.
NO_DROPOUT = "{token_dropout: 0.0, resid_dropout: 0.0, ffn_dropout: 0.0, class_dropout: 0.0}"


def overrides(run_dir, steps, *extra):
    return [
        f"train.out_dir={run_dir}", f"train.steps={steps}", "train.batch_size=8", "train.log_every=1",
        "train.checkpoint_every=2", "train.sample_every=1000", "train.progress=false", "train.ema_decay=0.9",
        "optim.eps=1e-5", "optim.lr=1e-4", "data.limit=64", "model.tokenizer_init=", "loss.perceptual_weight=0", "loss.gan_weight=0", "align.projector_dim=64",
        "model.tokenizer_overrides={base_channels: 16, z_channels: 32, norm_groups: 8}",
        f"model.generator_overrides={NO_DROPOUT}", "eval.samples_per_class=1", "eval.sample_classes=[0]", *extra,
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, run_dir: str, steps: int, extra: tuple[str, ...], resume: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from gear.train.distributed import teardown_distributed

    try:
        Trainer(load_config("configs/fmnist-joint.yaml", overrides(run_dir, steps, *extra)), resume=resume).fit()
    finally:
        teardown_distributed()


def run_two_processes(run_dir, steps, *extra, resume=False):
    mp.spawn(_worker, args=(2, _free_port(), str(run_dir), steps, extra, resume), nprocs=2, join=True)


def trained_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    state = {f"{name}.{k}": v for name, mod in trainer.trained.items() for k, v in mod.state_dict().items()}
    return state | {f"ema.{name}.{k}": v for name, ema in trainer.emas.items() for k, v in ema.state_dict().items()}


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), f"{k}: max diff {(a[k] - b[k]).abs().max():.3g}"
        else:
            assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    run = tmp_path_factory.mktemp("single")
    trainer = Trainer(load_config("configs/fmnist-joint.yaml", overrides(run, 3)))
    trainer.fit()
    return trainer, run


def test_two_processes_match_one_process(single, tmp_path):
    one, one_dir = single
    run_two_processes(tmp_path, 3)
    two = Trainer(load_config("configs/fmnist-joint.yaml", overrides(tmp_path, 3)), resume=True)
    assert two.step == 3
    assert_close(trained_state(one), trained_state(two))
    # codebook usage is counted over both ranks' tokens: the same number as one process over the whole batch
    log_one = [json.loads(line) for line in (one_dir / "metrics.jsonl").read_text().splitlines()]
    log_two = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["codebook/usage_batch"] for r in log_one] == [r["codebook/usage_batch"] for r in log_two]
    assert [round(r["ar/ntp"], 4) for r in log_one] == [round(r["ar/ntp"], 4) for r in log_two]


def test_a_two_process_checkpoint_resumes_in_one_process(single, tmp_path):
    one, _ = single
    run_two_processes(tmp_path, 2)
    resumed = Trainer(load_config("configs/fmnist-joint.yaml", overrides(tmp_path, 3)), resume=True)
    assert resumed.step == 2
    resumed.fit()
    assert_close(trained_state(one), trained_state(resumed))


def test_two_processes_train_with_the_gan_and_write_one_run(tmp_path):
    run_two_processes(tmp_path, 2, "loss.gan_weight=0.1")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["step"] == 2 and "disc/loss" in summary
    assert (tmp_path / "recon").is_dir() and (tmp_path / "generator" / "model.safetensors").is_file()


# FSDP: the generator, its EMA and the projector are sharded over the two processes; checkpoints hold full tensors.


def test_fsdp_two_processes_match_one_process(single, tmp_path):
    one, _ = single
    run_two_processes(tmp_path, 3, "train.parallel=fsdp")
    two = Trainer(load_config("configs/fmnist-joint.yaml", overrides(tmp_path, 3)), resume=True)  # one process
    assert two.step == 3
    assert_close(trained_state(one), trained_state(two))
    # rank 0 gathered the shards for the exported models and the sample grid
    exported = GPT.from_pretrained(tmp_path / "generator").state_dict()
    assert_close(exported, one.emas["generator"].module.state_dict())
    assert len(list((tmp_path / "samples").glob("*.png"))) == 1


def test_fsdp_resumes_sharded_with_gradient_accumulation(tmp_path):
    # The codebook entropy term averages over a micro-batch, so accumulation changes it: off in both runs here.
    no_entropy = "model.tokenizer_overrides={base_channels: 16, z_channels: 32, norm_groups: 8, entropy_ratio: 0.0}"
    one = Trainer(load_config("configs/fmnist-joint.yaml", overrides(tmp_path / "one", 3, no_entropy)))
    one.fit()
    fsdp = ("train.parallel=fsdp", "train.grad_accum_steps=2", no_entropy)
    run_two_processes(tmp_path / "two", 2, *fsdp)
    run_two_processes(tmp_path / "two", 3, *fsdp, resume=True)  # sharded resume: modules, AdamW moments, EMA
    resumed = Trainer(load_config("configs/fmnist-joint.yaml", overrides(tmp_path / "two", 3, no_entropy)), resume=True)
    assert resumed.step == 3
    assert_close(trained_state(one), trained_state(resumed))


def test_fsdp_rejects_compile():
    with pytest.raises(ConfigError, match="train.compile"):
        load_config("configs/fmnist-joint.yaml", ["train.parallel=fsdp", "train.compile=true"])
