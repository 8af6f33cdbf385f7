"""Captioned Fashion-MNIST (templates, measured attributes at per-class tertiles, held-out templates and names), the
JSONL manifest and WebDataset readers, and data.on_bad_sample."""

import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from gear.data import DataConfig, build_dataset
from gear.data.captioned import BadSample, JsonlCaptions, SkippedSample, WebDatasetCaptions
from gear.data.fashion_mnist import resolve_root
from gear.data.fmnist_captions import (HELDOUT_TEMPLATES, NAMES, CaptionedFashionMNIST, attribute_levels, caption,
                                       grey_28, measure, prompts, thresholds)
from gear.train.batches import batch_stream

needs_fmnist = pytest.mark.skipif(not (resolve_root() / "train-images-idx3-ubyte.gz").is_file(),
                                  reason="Fashion-MNIST idx files not installed")


@pytest.fixture(scope="module")
def train_split():
    return CaptionedFashionMNIST(split="train")


@needs_fmnist
def test_captions_are_deterministic_and_attributes_split_each_class_in_thirds(train_split):
    again = CaptionedFashionMNIST(split="train", limit=500)
    assert again.image_captions == train_split.image_captions[:500]
    levels = attribute_levels(measure(train_split.images.numpy()), train_split.labels.numpy(), thresholds(None))
    for c in range(len(NAMES)):
        in_class = levels[train_split.labels.numpy() == c]
        for a in range(2):
            shares = np.bincount(in_class[:, a], minlength=3) / len(in_class)
            assert np.all(np.abs(shares - 1 / 3) < 0.02), (c, a, shares)


@needs_fmnist
def test_held_out_templates_and_names_never_appear_in_training_captions(train_split):
    heldout_names = [n[-1] for n in NAMES]
    for text in train_split.captions:
        assert not any(re.search(rf"\b{re.escape(name)}\b", text) for name in heldout_names), text
        assert not text.startswith(("an image showing", "product shot")) and ":" not in text
    # every training caption names its class with a training name
    sample = train_split[3]
    assert any(name in sample.caption for name in NAMES[int(sample.label)][:-1])


@needs_fmnist
def test_measured_attributes_survive_the_image_layout(train_split):
    """The eval measures samples at 32 px in [-1, 1]: that must give the levels the caption was written from."""
    images = torch.stack([train_split[i].image for i in range(300)])
    labels = train_split.labels[:300].numpy()
    from_samples = attribute_levels(measure(grey_28(images)), labels, thresholds(None))
    from_idx = attribute_levels(measure(train_split.images[:300].numpy()), labels, thresholds(None))
    assert (from_samples == from_idx).mean() > 0.97


def test_prompts_carry_their_class_and_attributes():
    asked = prompts(20, "heldout", heldout_names=True, seed=3)
    assert [p.label for p in asked[:10]] == list(range(10))
    for p in asked:
        assert NAMES[p.label][-1] in p.text
        assert p.text == caption(next(t for t in HELDOUT_TEMPLATES if caption(t, NAMES[p.label][-1], *p.levels) == p.text),
                                 NAMES[p.label][-1], *p.levels)
    assert prompts(20, "heldout", seed=3) == prompts(20, "heldout", seed=3)
    assert caption("{a} {noun}", "ankle boot", 0, 0) == "an ankle boot"


def write_png(path, value=128, size=(40, 30)):
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)


def test_jsonl_manifest_reads_images_and_handles_bad_samples(tmp_path):
    for i in range(3):
        write_png(tmp_path / f"{i}.png", value=40 * i)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    lines = [{"image": "0.png", "caption": "a grey square"}, {"image": "broken.png", "caption": "broken"},
             {"image": "1.png", "caption": "another square"}, {"image": "2.png", "caption": ""}]
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    with pytest.raises(BadSample, match=r"cannot read .*train.jsonl line 4 .*data.on_bad_sample=skip"):
        JsonlCaptions(manifest, image_size=16)
    with pytest.warns(SkippedSample) as caught:
        ds = JsonlCaptions(manifest, image_size=16, train=False, on_bad_sample="skip")
    assert [str(w.message).split(" (")[0].rsplit(" ", 2)[1:] for w in caught] == [["line", "4"], ["line", "5"]]
    assert len(ds) == 3 and ds.captions == ["a grey square", "another square", "broken"]
    assert ds[0].image.shape == (3, 16, 16) and ds[0].caption == "a grey square" and ds[0].index == 0
    substitute = ds[1]  # the next readable item, carrying its own index: the trainer lists the substitution
    assert substitute.caption == "another square" and substitute.index == 2
    assert "broken.png" in ds.bad_samples.error(1).source and ds.bad_samples.error(0) is None
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(lines[1]) + "\n")
    with pytest.raises(BadSample, match="broken.png"):
        JsonlCaptions(good, image_size=16)[0]


def write_shard(path, items):
    import webdataset as wds

    with wds.TarWriter(str(path)) as sink:
        for key, image, text, kind in items:
            sample = {"__key__": key}
            if image == "bad":
                sample["png"] = b"garbage"
            elif image is not None:
                buf = io.BytesIO()
                Image.fromarray(np.full((20, 20, 3), image, dtype=np.uint8)).save(buf, format="PNG")
                sample["png"] = buf.getvalue()
            if kind == "json":
                sample["json"] = json.dumps({"caption": text}).encode()
            elif kind == "txt":
                sample["txt"] = text.encode()
            sink.write(sample)


def test_webdataset_shards_stream_captions_and_split_batches_over_ranks(tmp_path):
    write_shard(tmp_path / "a.tar", [(f"a{i}", 10 * i, f"caption a{i}", "json") for i in range(5)])
    write_shard(tmp_path / "b.tar", [(f"b{i}", 10 * i, f"caption b{i}", "txt") for i in range(5)])
    urls = str(tmp_path / "{a,b}.tar")
    cfg = DataConfig(name="webdataset", root=urls, image_size=16, stream_split="exact")
    one = next(batch_stream(build_dataset(cfg, "train", seed=1), 4, seed=1, start_step=2, rank=0, world_size=1)).samples
    halves = [next(batch_stream(build_dataset(cfg, "train", seed=1), 4, seed=1, start_step=2, rank=r, world_size=2)).samples
              for r in (0, 1)]
    assert one.caption == halves[0].caption + halves[1].caption  # the one-process batch, split over two ranks
    assert torch.equal(one.image, torch.cat([h.image for h in halves]))
    assert len(set(one.caption)) == 4 and all(c.startswith("caption ") for c in one.caption)


def test_webdataset_bad_samples_stop_or_are_replaced(tmp_path):
    write_shard(tmp_path / "s.tar", [("k0", 5, "first", "json"), ("k1", "bad", "broken", "json"),
                                     ("k2", 7, "", "txt"), ("k3", 9, "last", "txt")])
    with pytest.raises(BadSample, match="cannot read k1 in .*s.tar"):
        list(zip(range(4), WebDatasetCaptions(str(tmp_path / "s.tar"), image_size=16, train=False)))
    stream = WebDatasetCaptions(str(tmp_path / "s.tar"), image_size=16, train=False, on_bad_sample="skip")
    got = [(s.caption, s.index) for _, s in zip(range(4), stream)]
    # each bad sample's place goes to the next readable one of the slice, so every later position keeps its sample
    assert got == [("first", 0), ("last", 3), ("last", 3), ("last", 3)]
    assert sorted(stream.bad_samples.skipped) == [1, 2] and "png image" in stream.bad_samples.error(1).reason


def test_a_stream_lists_its_skips_in_the_run_like_an_image_folder(tmp_path):
    """A training run on shards with bad samples: full batches, the skips in bad_samples.jsonl."""
    from gear.cli import main

    write_shard(tmp_path / "s.tar", [(f"k{i}", "bad" if i in (2, 5) else 20 * i, f"caption {i}", "txt") for i in range(8)])
    run = tmp_path / "run"
    assert main(["train", "configs/fmnist-tokenizer.yaml", "data.name=webdataset", f"data.root={tmp_path / 's.tar'}",
                 "data.image_size=32", "data.on_bad_sample=skip", "data.stream_split=exact", "train.batch_size=4", "train.steps=2",
                 "train.progress=false", f"train.out_dir={run}", "train.sample_every=100", "train.checkpoint_every=2",
                 "model.tokenizer_overrides={base_channels: 16, z_channels: 32, norm_groups: 8}"]) == 0
    listed = [json.loads(line) for line in (run / "bad_samples.jsonl").read_text().splitlines()]
    assert [(x["step"], x["index"], x["replaced_by"]) for x in listed] == [(1, 2, 3), (2, 5, 6)]
    assert all("in " + str(tmp_path / "s.tar") in x["source"] for x in listed)
    assert json.loads((run / "summary.json").read_text())["skipped_samples"] == 2
