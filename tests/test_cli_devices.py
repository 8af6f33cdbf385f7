"""Every command that takes --device refuses a device this machine lacks, or a nonsense one, in one line."""

from __future__ import annotations

import argparse

import pytest
import torch

from gear.cli import build_parser, main
from helpers import tiny_runs


def commands_with_device() -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name for name, p in sub.choices.items() if any("--device" in a.option_strings for a in p._actions)}


@pytest.fixture(scope="module")
def argv(tmp_path_factory):
    """A real run directory for each command, so that only the device can stop it."""
    root = tmp_path_factory.mktemp("devices")
    tok, ar = tiny_runs(root)
    image = root / "image.png"
    from PIL import Image

    Image.new("RGB", (28, 28), (120, 30, 200)).save(image)
    return {
        "sample": [["sample", str(ar), "--out", str(root / "s.png")]],
        "edit": [["edit", str(ar), str(image), "--keep", "top:4", "--classes", "1", "--out", str(root / "e.png")]],
        "reconstruct": [["reconstruct", str(tok), str(image), "--out", str(root / "rec")]],
        "eval": [*(["eval", what, str(ar), "--num", "2"] for what in ("gen", "recon", "t2i")),
                 ["eval", "adm", str(root / "samples.npz"), "--ref", str(root / "ref.npz")]],
        "serve": [["serve", str(ar)]],
    }


def test_every_command_taking_a_device_is_covered(argv):
    assert commands_with_device() == set(argv)


@pytest.mark.parametrize("device, says", [
    ("nonsense", "--device=nonsense is not a device; use cpu, cuda, cuda:N or mps"),
    ("cuda:x", "--device=cuda:x is not a device"),
    ("meta", "gear runs on cpu, cuda[:N] or mps, not meta"),
])
def test_a_nonsense_device_is_one_line(argv, capsys, device, says):
    for runs in argv.values():
        for args in runs:
            assert main([*args, "--device", device]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith(f"gear {args[0]}: error: ") and says in err[0], err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_without_a_gpu_is_one_line(argv, capsys):
    for runs in argv.values():
        for args in runs:
            for device in ("cuda", "cuda:1"):
                assert main([*args, "--device", device]) == 2
                err = capsys.readouterr().err.strip().splitlines()
                assert err == [f"gear {args[0]}: error: --device={device} but no CUDA device is visible; "
                               "use --device=cpu"], err
