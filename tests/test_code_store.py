"""The code store: codes and features equal the models' on the fly, the same batches as the data stream, an ar run
on the store equals one that encodes, and a store of other weights or data is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from gear.align.teachers import build_teacher
from gear.cli import main
from gear.config import ConfigError, load_config
from gear.data import DataConfig, build_dataset
from gear.data.fashion_mnist import resolve_root
from gear.models.autoencoder import Tokenizer, build_tokenizer
from gear.train.batches import batch_stream
from gear.train.code_store import CodeStore, extract, extract_for_config
from gear.train.loop import Trainer

HAVE_FMNIST = (resolve_root() / "train-images-idx3-ubyte.gz").is_file()
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST idx files not installed")
SMALL = {"base_channels": 16, "z_channels": 32, "norm_groups": 8}
TINY = [
    "data.limit=48", "train.batch_size=8", "train.log_every=1", "train.progress=false", "train.ema_decay=0.9",
    "align.projector_dim=64", "eval.samples_per_class=1", "eval.sample_classes=[0, 1]",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("tok") / "tokenizer"
    build_tokenizer("vq-tiny", **SMALL).save_pretrained(path)
    return path


def ar_config(tokenizer_dir, out, steps, *extra):
    return load_config("configs/fmnist-ar.yaml", [*TINY, f"model.tokenizer_init={tokenizer_dir}", f"train.out_dir={out}",
                                                  f"train.steps={steps}", f"train.sample_every={steps}",
                                                  f"train.checkpoint_every={steps}", *extra])


@needs_fmnist
def test_codes_and_features_equal_the_tokenizer_and_teacher_on_the_fly(tmp_path):
    data = DataConfig(limit=20)
    dataset = build_dataset(data, "train")
    torch.manual_seed(0)
    tok, teacher = build_tokenizer("vq-tiny", **SMALL).eval(), build_teacher("efficientnet-lite0")
    done = extract(tmp_path / "store", dataset, data, tok, teacher, batch_size=7)  # batches that do not divide 20
    assert sorted(done.wrote) == sorted([done.codes.name, done.features.name])
    store = CodeStore(tmp_path / "store", dataset, data, tok, teacher)
    images = torch.stack([dataset[i].image for i in range(20)])
    with torch.no_grad():
        codes, feats = tok.encode(images), teacher(images, store.grid)
    assert store.views == 1 and torch.equal(torch.from_numpy(store.codes[:, 0].astype(np.int64)), codes)
    assert torch.equal(store.labels, dataset.labels)
    stored = store.features_of(torch.arange(20))
    assert stored.shape == feats.shape
    torch.testing.assert_close(stored, feats.half().float(), atol=2e-3, rtol=2e-3)  # float16, as the feature cache
    again = extract(tmp_path / "store", dataset, data, tok, teacher)
    assert again.wrote == [] and again.codes == done.codes  # a second extraction reuses both entries
    with pytest.raises(ValueError, match="holds no codes"):  # a run under bf16 autocast needs codes encoded so
        CodeStore(tmp_path / "store", dataset, data, tok, teacher, bf16=True)


def _square_folder(root, n=10, size=16):
    g = np.random.default_rng(0)
    for i in range(n):
        d = root / "train" / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(g.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def test_a_flipping_image_folder_streams_the_batches_of_the_data_stream(tmp_path):
    """Both views are stored; the stream picks the one the data set's own augmentation draws, step by step."""
    data = DataConfig(name="imagefolder", root=str(_square_folder(tmp_path / "imgs")), image_size=16, random_flip=True)
    dataset = build_dataset(data, "train", seed=5)
    torch.manual_seed(0)
    tok = build_tokenizer("vq-tiny", **SMALL).eval()
    extract(tmp_path / "store", dataset, data, tok, None, batch_size=4)
    store = CodeStore(tmp_path / "store", dataset, data, tok)
    assert store.views == 2
    live, stored = batch_stream(dataset, 4, 5, 3, 0, 1), store.stream(4, 5, 3)  # from step 3: a resumed run
    flipped = 0
    for _ in range(8):  # 4 epochs of 2 batches: several flip draws per image
        a, b = next(live).samples, next(stored)
        with torch.no_grad():
            assert torch.equal(tok.encode(a.image), b.codes)
        assert torch.equal(a.label, b.label) and torch.equal(a.index, b.index // 2)
        flipped += int((b.index % 2).sum())
    assert 0 < flipped < 32


def test_an_image_whose_crop_varies_is_refused(tmp_path):
    root = _square_folder(tmp_path / "imgs")
    Image.fromarray(np.zeros((16, 24, 3), dtype=np.uint8)).save(root / "train" / "c0" / "wide.png")
    data = DataConfig(name="imagefolder", root=str(root), image_size=16)
    with pytest.raises(ValueError, match="random crop changes every epoch"):
        extract(tmp_path / "store", build_dataset(data, "train"), data, build_tokenizer("vq-tiny", **SMALL), None)


@needs_fmnist
def test_an_ar_run_on_the_store_equals_one_that_encodes_and_resumes_exactly(tokenizer_dir, tmp_path):
    """3 REPA steps encoding on the fly (feature cache on) == 2 steps on the store, a restart, 1 more."""
    live = Trainer(ar_config(tokenizer_dir, tmp_path / "live", 3))
    live.fit()
    store = ["data.code_store=" + str(tmp_path / "store")]
    extract_for_config(ar_config(tokenizer_dir, tmp_path / "unused", 3, *store))
    first = Trainer(ar_config(tokenizer_dir, tmp_path / "stored", 3, *store, "train.checkpoint_every=2"))
    first.cfg.train.steps = 2
    first.fit()
    torch.manual_seed(99)
    second = Trainer(ar_config(tokenizer_dir, tmp_path / "stored", 3, *store, "train.checkpoint_every=2"), resume=True)
    assert second.code_store is not None and second.step == 2
    second.fit()

    def losses(run):
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["ar/ntp"], r["ar/align_ar"]) for r in rows if "ar/ntp" in r]

    a, b = losses(tmp_path / "live"), losses(tmp_path / "stored")
    assert [s for s, *_ in a] == [s for s, *_ in b] == [1, 2, 3]
    np.testing.assert_allclose(np.array(a)[:, 1:], np.array(b)[:, 1:], rtol=1e-5, atol=1e-6)
    for (k, x), y in zip(live.m.generator.state_dict().items(), second.m.generator.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=f"generator.{k} differs")


@needs_fmnist
def test_a_store_of_other_weights_or_data_is_refused(tokenizer_dir, tmp_path, capsys):
    root = tmp_path / "store"
    ntp_only = ["align.lambda_ar=0", f"data.code_store={root}"]
    assert main(["extract", "configs/fmnist-ar.yaml", *TINY, f"model.tokenizer_init={tokenizer_dir}", *ntp_only]) == 0
    assert "written" in capsys.readouterr().out
    Trainer(ar_config(tokenizer_dir, tmp_path / "ok", 1, *ntp_only))  # opens

    retrained = tmp_path / "retrained"
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    with torch.no_grad():
        tok.quant_conv.weight.add_(1e-3)  # the same path and shapes, other weights: the store is stale
    tok.save_pretrained(retrained)
    cases = [
        ([f"model.tokenizer_init={retrained}", *ntp_only], "holds no codes of this tokenizer"),
        ([f"model.tokenizer_init={tokenizer_dir}", *ntp_only, "data.limit=40"], "holds no codes of this tokenizer"),
        ([f"model.tokenizer_init={tokenizer_dir}", f"data.code_store={root}"], "holds no features"),  # REPA: no teacher
    ]
    for extra, message in cases:
        cfg = load_config("configs/fmnist-ar.yaml", [*TINY, "train.steps=1", f"train.out_dir={tmp_path / 'x'}", *extra])
        with pytest.raises(ValueError, match=message):
            Trainer(cfg)
    args = [*TINY, f"model.tokenizer_init={retrained}", *ntp_only, f"train.out_dir={tmp_path / 'cli'}", "train.steps=1"]
    assert main(["train", "configs/fmnist-ar.yaml", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gear train: error:") and "gear extract" in err and len(err.splitlines()) == 1
    entry = next(root.glob("codes-*"))  # an entry whose contents do not match its name
    meta = json.loads((entry / "meta.json").read_text())
    meta["key"]["data"]["content"] = "0" * 64
    (entry / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="other weights or data than its name says"):
        Trainer(ar_config(tokenizer_dir, tmp_path / "ok2", 1, *ntp_only))


def test_the_store_is_an_ar_stage_option():
    with pytest.raises(ConfigError, match="data.code_store"):
        load_config("configs/fmnist-joint.yaml", ["data.code_store=runs/codes"])
    with pytest.raises(ValueError, match="data.code_store=DIR"):
        extract_for_config(load_config("configs/fmnist-ar.yaml"))


def test_a_teacher_whose_targets_changed_gets_a_new_features_key():
    from gear.align.teachers import DinoV2Teacher
    from gear.train.code_store import features_key

    class Patches(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.proj = torch.nn.Conv2d(3, 4, 4, stride=4)

    data = {"name": "x", "content": "0"}
    plain = features_key(Patches(), 8, data, bf16=False)
    assert "teacher_version" not in plain  # the keys of stores made with unchanged teachers stay what they were
    versioned = Patches()
    versioned.targets_version = DinoV2Teacher.targets_version
    key = features_key(versioned, 8, data, bf16=False)
    assert key["teacher_version"] == 2 and {k: v for k, v in key.items() if k != "teacher_version"} == plain
