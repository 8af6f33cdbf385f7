import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from gear.data import DataConfig, FashionMNIST, ImageFolder, Sample, build_dataset, read_idx, save_image_grid, to_uint8_image
from gear.data.fashion_mnist import DEFAULT_ROOT, ROOT_ENV
from gear.data.transforms import center_crop_arr, pad_to, resize_short_side, to_tensor_minus1_1

REAL_ROOT = Path(DEFAULT_ROOT)


def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fmnist(root: Path, n_train: int = 6, n_test: int = 3, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, (n,), dtype=np.uint8)
        (root / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
        (root / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
        data[prefix] = (images, labels)
    return data


# --- idx parsing -------------------------------------------------------------------------------------


def test_read_idx_plain_and_gzip(tmp_path):
    array = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    (tmp_path / "a-idx3-ubyte").write_bytes(idx_bytes(array))
    (tmp_path / "a-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(array)))
    for name in ("a-idx3-ubyte", "a-idx3-ubyte.gz"):
        out = read_idx(tmp_path / name)
        assert out.dtype == np.uint8 and out.shape == (2, 3, 5)
        np.testing.assert_array_equal(out, array)


def test_read_idx_truncated_or_corrupt_names_the_file(tmp_path):
    good = idx_bytes(np.ones((3, 4, 4), dtype=np.uint8))
    cases = {
        "short-data": good[:-5],  # header says 3 images, data stops early
        "long-data": good + b"\x00",
        "short-header": good[:9],
        "bad-magic": b"\x08\x03" + good[2:],
    }
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(ValueError, match=name):
            read_idx(tmp_path / name)
    (tmp_path / "cut.gz").write_bytes(gzip.compress(good)[:-12])
    with pytest.raises(ValueError, match=r"cut\.gz.*dataset-fashion-mnist"):
        read_idx(tmp_path / "cut.gz")
    with pytest.raises(FileNotFoundError, match=r"missing\.gz.*data\.root"):
        read_idx(tmp_path / "missing.gz")


# --- Fashion-MNIST on tiny idx files ---------------------------------------------------------------------


def test_fashion_mnist_pads_to_32_with_black(tmp_path):
    data = write_fmnist(tmp_path)
    ds = FashionMNIST(tmp_path, "train", image_size=32)
    images, labels = data["train"]
    assert len(ds) == len(images)
    for i in range(len(ds)):
        s = ds[i]
        assert isinstance(s, Sample) and s.index == i
        assert s.image.shape == (3, 32, 32) and s.image.dtype == torch.float32
        assert s.label.dtype == torch.int64 and int(s.label) == labels[i]
        assert torch.equal(s.image[0], s.image[1]) and torch.equal(s.image[0], s.image[2])
        expected = torch.from_numpy(images[i]).float() / 127.5 - 1
        torch.testing.assert_close(s.image[0, 2:30, 2:30], expected)
        border = torch.cat([s.image[:, :2].flatten(), s.image[:, 30:].flatten(), s.image[:, :, :2].flatten(), s.image[:, :, 30:].flatten()])
        assert torch.all(border == -1)


def test_fashion_mnist_sizes_limit_and_env_root(tmp_path, monkeypatch):
    data = write_fmnist(tmp_path / "fm")
    monkeypatch.setenv(ROOT_ENV, str(tmp_path / "fm"))
    test = FashionMNIST(split="test", image_size=28, limit=2)
    assert len(test) == 2
    torch.testing.assert_close(test[1].image[0], torch.from_numpy(data["t10k"][0][1]).float() / 127.5 - 1)
    small = FashionMNIST(split="train", image_size=16)
    s = small[0]
    assert s.image.shape == (3, 16, 16) and s.image.min() >= -1 and s.image.max() <= 1
    small.set_epoch(3)
    assert torch.equal(small[0].image, s.image)
    with pytest.raises(ValueError, match="split"):
        FashionMNIST(split="valid")
    with pytest.raises(IndexError):
        small[len(small)]


def test_fashion_mnist_missing_files_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte\.gz.*dataset-fashion-mnist"):
        FashionMNIST(tmp_path)


@pytest.mark.skipif(not (REAL_ROOT / "t10k-labels-idx1-ubyte.gz").is_file(), reason=f"Fashion-MNIST not installed at {REAL_ROOT}")
def test_real_fashion_mnist():
    train, test = FashionMNIST(REAL_ROOT, "train"), FashionMNIST(REAL_ROOT, "test")
    assert (len(train), len(test)) == (60000, 10000)
    for ds in (train, test):
        assert torch.equal(ds.labels.unique(), torch.arange(10))
        for i in (0, 1, len(ds) - 1):
            s = ds[i]
            assert s.image.shape == (3, 32, 32) and s.index == i and 0 <= int(s.label) <= 9
            assert s.image.min() >= -1 and s.image.max() <= 1 and s.image.max() > 0  # not an empty image
            ring = torch.ones(32, 32, dtype=torch.bool)
            ring[2:30, 2:30] = False
            assert torch.all(s.image[:, ring] == -1)


# --- ImageFolder ----------------------------------------------------------------------------------------


def write_png(path: Path, width: int, height: int, seed: int) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "imgs"
    write_png(root / "zebra" / "a.png", 20, 12, 0)
    write_png(root / "zebra" / "sub" / "b.png", 12, 20, 1)
    write_png(root / "ant" / "c.PNG", 16, 16, 2)
    write_png(root / "ant" / "d.png", 30, 10, 3)
    (root / "ant" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_classes_and_eval_center_crop(folder):
    ds = ImageFolder(folder, image_size=8, train=False)
    assert ds.classes == ["ant", "zebra"] and ds.num_classes == 2
    assert [(p.name, y) for p, y in ds.samples] == [("c.PNG", 0), ("d.png", 0), ("a.png", 1), ("b.png", 1)]
    for i, (path, label) in enumerate(ds.samples):
        s = ds[i]
        assert s.image.shape == (3, 8, 8) and int(s.label) == label and s.index == i
        resized = np.asarray(resize_short_side(Image.open(path).convert("RGB"), 8))
        top, left = (resized.shape[0] - 8) // 2, (resized.shape[1] - 8) // 2
        torch.testing.assert_close(s.image, to_tensor_minus1_1(resized[top : top + 8, left : left + 8]))
        assert torch.equal(ds[i].image, s.image)
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch.image.shape == (4, 3, 8, 8) and batch.label.tolist() == [0, 0, 1, 1]


def windows(resized: np.ndarray, size: int) -> list[torch.Tensor]:
    """Every crop and flipped crop a train sample may be."""
    h, w = resized.shape[:2]
    crops = [resized[t : t + size, l : l + size] for t in range(h - size + 1) for l in range(w - size + 1)]
    return [to_tensor_minus1_1(c) for c in crops] + [to_tensor_minus1_1(c[:, ::-1]) for c in crops]


def test_image_folder_train_augmentation_is_reproducible(folder):
    ds = ImageFolder(folder, image_size=8, train=True, seed=7)
    index = 1  # d.png, 30x10 -> resized to 24x8: 17 crops x 2 flips
    allowed = windows(np.asarray(resize_short_side(Image.open(ds.samples[index][0]).convert("RGB"), 8)), 8)
    by_epoch = []
    for epoch in range(6):
        ds.set_epoch(epoch)
        first = ds[index].image
        ds[0], ds[3]  # other items drawn in between must not change it
        assert torch.equal(ds[index].image, first)
        assert any(torch.equal(first, a) for a in allowed)
        by_epoch.append(first)
    assert any(not torch.equal(by_epoch[0], e) for e in by_epoch[1:])

    again = ImageFolder(folder, image_size=8, train=True, seed=7)  # a resumed run
    again.set_epoch(4)
    assert torch.equal(again[index].image, by_epoch[4])
    other_seed = ImageFolder(folder, image_size=8, train=True, seed=8)
    draws = []
    for epoch in range(6):
        other_seed.set_epoch(epoch)
        draws.append(other_seed[index].image)
    assert any(not torch.equal(a, b) for a, b in zip(draws, by_epoch))


def test_image_folder_flip_happens_and_can_be_disabled(folder):
    square = 0  # c.PNG is 16x16: resized to 8x8, so the only freedom is the flip
    flips = set()
    for flip in (True, False):
        ds = ImageFolder(folder, image_size=8, train=True, random_flip=flip)
        ref = ImageFolder(folder, image_size=8, train=False)[square].image
        for epoch in range(16):
            ds.set_epoch(epoch)
            img = ds[square].image
            flipped = torch.equal(img, ref.flip(-1))
            assert flipped or torch.equal(img, ref)
            flips.add((flip, flipped))
    assert flips == {(True, True), (True, False), (False, False)}


def test_image_folder_errors(folder, tmp_path):
    (folder / "zebra" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    ds = ImageFolder(folder, image_size=8, train=False)
    broken = [i for i, (p, _) in enumerate(ds.samples) if p.name == "broken.png"][0]
    with pytest.raises(ValueError, match=r"broken\.png"):
        ds[broken]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        ImageFolder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "nowhere")
    (tmp_path / "empty" / "cls").mkdir()
    with pytest.raises(ValueError, match="holds no image"):
        ImageFolder(tmp_path / "empty")


# --- transforms -----------------------------------------------------------------------------------------


def test_uint8_round_trip_and_clipping():
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    x = to_tensor_minus1_1(pixels)
    assert x.shape == (3, 5, 7) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(to_uint8_image(x), torch.from_numpy(pixels).permute(2, 0, 1))
    assert to_uint8_image(torch.tensor([-3.0, -1.0, 0.0, 1.0, 2.0])).tolist() == [0, 0, 128, 255, 255]


def test_pad_to_and_center_crop_arr():
    x = torch.ones(1, 3, 5)
    y = pad_to(x, 8, value=-1)
    assert y.shape == (1, 8, 8) and y.sum() == 15 - (64 - 15)
    assert torch.all(y[0, 2:5, 1:6] == 1)  # 5 rows of padding: 2 on top, 3 below; 3 columns: 1 left, 2 right
    with pytest.raises(ValueError, match="larger"):
        pad_to(x, 4)
    big = Image.fromarray(np.random.default_rng(1).integers(0, 256, (100, 70, 3), dtype=np.uint8))
    out = center_crop_arr(big, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8


def test_save_image_grid(tmp_path):
    images = torch.rand(5, 3, 6, 4) * 2 - 1
    path = save_image_grid(images, tmp_path / "sub" / "grid.png", nrow=2, padding=3)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (3 * (6 + 3) + 3, 2 * (4 + 3) + 3, 3)
    np.testing.assert_array_equal(grid[3:9, 3:7], to_uint8_image(images[0]).permute(1, 2, 0).numpy())
    np.testing.assert_array_equal(grid[12:18, 10:14], to_uint8_image(images[3]).permute(1, 2, 0).numpy())
    assert np.all(grid[:3] == 0) and np.all(grid[21:, 10:] == 0)  # padding and the empty sixth cell
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        save_image_grid(images[0], tmp_path / "bad.png")


# --- build_dataset --------------------------------------------------------------------------------------


def test_build_dataset(tmp_path, folder):
    write_fmnist(tmp_path / "fm", n_train=6, n_test=3)
    cfg = DataConfig(root=str(tmp_path / "fm"), limit=4)
    assert len(build_dataset(cfg, "train")) == 4 and len(build_dataset(cfg, "val")) == 3
    split_root = tmp_path / "inet"
    split_root.mkdir()
    (split_root / "train").symlink_to(folder)
    (split_root / "val").mkdir(parents=True)
    write_png(split_root / "val" / "ant" / "v.png", 9, 9, 5)
    icfg = DataConfig(name="imagefolder", root=str(split_root), image_size=8)
    train, val = build_dataset(icfg, "train", seed=3), build_dataset(icfg, "val")
    assert isinstance(train, ImageFolder) and train.train and train.seed == 3 and len(train) == 4
    assert not val.train and len(val) == 1 and val[0].image.shape == (3, 8, 8)
    with pytest.raises(ValueError, match="fashion-mnist"):
        DataConfig(name="cifar")
    cfg.name = "cifar"
    with pytest.raises(ValueError, match="imagefolder"):
        build_dataset(cfg)
    with pytest.raises(ValueError, match="split"):
        build_dataset(DataConfig(), "dev")
