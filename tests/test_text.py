"""Text encoders (MiniLM-L6 from its wheel, offline) and the on-disk feature cache."""

import shutil

import pytest
import torch
from safetensors import safe_open

from gear.text import CaptionTruncated, TextEncoder, resolve_encoder_path
from gear.text.cache import cache_path, load_or_build, unique_captions


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder("minilm-l6", max_length=12)


def test_features_are_left_padded_with_zeroed_pads(encoder):
    cond = encoder.encode(["", "a small dark ankle boot"])
    assert cond.features.shape == (2, 12, 384) and cond.mask.dtype == torch.bool
    n = cond.mask.sum(1).tolist()
    assert n[0] == 2 and n[1] > 2  # [CLS] [SEP] for the empty caption
    for row, count in enumerate(n):
        assert cond.mask[row, -count:].all() and not cond.mask[row, :-count].any()  # real tokens end the prefix
        assert (cond.features[row, :-count] == 0).all() and (cond.features[row, -count:].abs().sum(-1) > 0).all()


def test_features_do_not_depend_on_the_prefix_length(encoder):
    short = encoder.encode(["a bright sneaker"])
    encoder.max_length = 20
    try:
        long = encoder.encode(["a bright sneaker"])
    finally:
        encoder.max_length = 12
    n = int(short.mask.sum())
    torch.testing.assert_close(long.features[0, -n:], short.features[0, -n:], rtol=0, atol=1e-5)


def test_a_long_caption_is_truncated_with_a_warning(encoder):
    with pytest.warns(CaptionTruncated, match="longer than the 12-token prefix"):
        cond = encoder.encode(["one two three four five six seven eight nine ten eleven twelve thirteen"])
    assert cond.mask.all()


def test_encoders_that_are_not_installed_fail_in_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="set text.encoder_path=/path/to/qwen3-1.7b"):
        resolve_encoder_path("qwen3-1.7b")
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        TextEncoder("qwen3-1.7b", path=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="unknown text encoder 'clip'"):
        resolve_encoder_path("clip")


def test_cache_is_rebuilt_bit_identically_and_reused(encoder, tmp_path, monkeypatch):
    captions = ["a bag", "a dark coat", "a bag", "trousers, small"]
    first = load_or_build(encoder, captions, tmp_path)
    assert first.captions == unique_captions(captions) and len(first.captions) == 3
    path = first.path
    with safe_open(str(path), framework="pt") as f:
        meta, stored = f.metadata(), f.get_tensor("features")
    assert meta["encoder"] == "minilm-l6" and meta["max_length"] == "12" and meta["padding_side"] == "left"
    assert meta["weights_sha256"] == encoder.weights_sha256
    path.unlink()
    again = load_or_build(encoder, captions, tmp_path)
    with safe_open(str(path), framework="pt") as f:  # rebuilt bit-identically (the header's key order may differ)
        assert f.metadata() == meta and torch.equal(f.get_tensor("features"), stored)
    monkeypatch.setattr(encoder, "encode", lambda *a, **k: pytest.fail("a valid cache must not be recomputed"))
    reused = load_or_build(encoder, list(reversed(captions)), tmp_path)
    assert torch.equal(reused.features, stored) and torch.equal(again.features, stored)
    batch = reused.lookup(["trousers, small", "a bag"])
    assert torch.equal(batch.features[1], stored[reused.index["a bag"]])


def test_a_stale_or_foreign_cache_is_refused(encoder, tmp_path):
    captions = ["a bag", "a coat"]
    built = load_or_build(encoder, captions, tmp_path)
    encoder.max_length = 16
    try:
        target = cache_path(encoder, unique_captions(captions), tmp_path)
        shutil.copy(built.path, target)  # features of a 12-token prefix under the 16-token name
        with pytest.raises(ValueError, match="was written for .*max_length.*delete it to rebuild it"):
            load_or_build(encoder, captions, tmp_path)
    finally:
        encoder.max_length = 12
    target = cache_path(encoder, unique_captions(["x"]), tmp_path)
    target.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot be read"):
        load_or_build(encoder, ["x"], tmp_path)
