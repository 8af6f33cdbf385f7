import numpy as np
import pytest
import torch

from gear.data.transforms import to_uint8_image
from gear.eval.export import save_adm_npz, write_adm_npz_chunks


def test_float_images_become_uint8_nhwc(tmp_path):
    images = torch.zeros(2, 3, 4, 5)
    images[0, 0] = -1.0
    images[0, 1] = 1.0
    images[1, 2, 1, 2] = 0.5
    path = save_adm_npz(images, tmp_path / "samples")
    assert path.name == "samples.npz"
    with np.load(path, allow_pickle=False) as data:
        assert data.files == ["arr_0"]
        arr = data["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (2, 4, 5, 3)
    assert (arr[0, :, :, 0] == 0).all() and (arr[0, :, :, 1] == 255).all() and (arr[0, :, :, 2] == 128).all()
    assert arr[1, 1, 2, 2] == round(1.5 * 127.5)
    expected = (images.clamp(-1, 1).add(1).mul(127.5).round().permute(0, 2, 3, 1)).to(torch.uint8).numpy()
    np.testing.assert_array_equal(arr, expected)


def test_uint8_and_grey(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, size=(3, 6, 6, 3), dtype=np.uint8)
    with np.load(save_adm_npz(rgb, tmp_path / "a.npz")) as data:
        np.testing.assert_array_equal(data["arr_0"], rgb)
    grey = torch.linspace(-1, 1, 16).view(1, 1, 4, 4)
    with np.load(save_adm_npz(grey, tmp_path / "g.npz")) as data:
        arr = data["arr_0"]
    assert arr.shape == (1, 4, 4, 3) and (arr[..., 0] == arr[..., 2]).all()


def test_bad_input_raises(tmp_path):
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        save_adm_npz(torch.full((1, 3, 4, 4), 200.0), tmp_path / "x.npz")
    with pytest.raises(ValueError, match="N, C, H, W"):
        save_adm_npz(torch.zeros(3, 4, 4), tmp_path / "x.npz")


def test_chunks_stream_into_the_npz_np_savez_would_write(tmp_path):
    from gear.eval.adm import images_npz_shape, iter_images_npz

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 5, 6, 3), dtype=np.uint8)
    labels = np.arange(7) % 3
    path = write_adm_npz_chunks(iter([images[:3], images[3:6], images[6:]]), 7, tmp_path / "s.npz", labels=labels)
    with np.load(path, allow_pickle=False) as data:
        assert data.files == ["arr_0", "arr_1"]
        np.testing.assert_array_equal(data["arr_0"], images)
        np.testing.assert_array_equal(data["arr_1"], labels)
    assert images_npz_shape(path) == (7, 5, 6, 3)  # the ADM evaluator's streaming reader takes it too
    np.testing.assert_array_equal(np.concatenate(list(iter_images_npz(path, 4))), images)


@pytest.mark.parametrize("chunks, num, says", [
    ([np.zeros((2, 4, 4, 3), np.uint8)], 3, "2 images written, 3 announced"),
    ([np.zeros((2, 4, 4, 3), np.uint8)] * 2, 3, "more than the 3 images"),
    ([np.zeros((2, 4, 4, 3), np.uint8), np.zeros((1, 5, 4, 3), np.uint8)], 3, r"chunk of images \(5, 4, 3\)"),
    ([np.zeros((2, 4, 4, 1), np.uint8)], 2, r"uint8 \(n, H, W, 3\)"),
])
def test_chunks_that_do_not_add_up_leave_no_file(tmp_path, chunks, num, says):
    with pytest.raises(ValueError, match=says):
        write_adm_npz_chunks(iter(chunks), num, tmp_path / "s.npz")
    assert list(tmp_path.iterdir()) == []


def test_reference_npz_script_writes_the_held_out_split(tmp_path):
    import importlib.util
    from pathlib import Path

    from gear.config import load_config
    from gear.data.fashion_mnist import resolve_root
    from gear.eval.runs import held_out_batches
    from gear.run import write_run_config

    if not (resolve_root() / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST idx files not installed")
    script = Path(__file__).resolve().parent.parent / "scripts" / "reference_npz.py"
    spec = importlib.util.spec_from_file_location("reference_npz", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = load_config("configs/fmnist-tokenizer.yaml")
    write_run_config(tmp_path, cfg)
    assert module.main([str(tmp_path), "--num", "7", "--batch-size", "3", "--out", str(tmp_path / "ref.npz")]) == 0
    expected = to_uint8_image(next(held_out_batches(cfg.data, 7, 7))).permute(0, 2, 3, 1).numpy()
    with np.load(tmp_path / "ref.npz") as data:
        assert data["arr_0"].shape == (7, cfg.data.image_size, cfg.data.image_size, 3)
        np.testing.assert_array_equal(data["arr_0"], np.repeat(expected, 3, axis=-1) if expected.shape[-1] == 1 else expected)
        assert data["arr_1"].shape == (7,)
