"""The ADM evaluator's protocol: each metric against a plain independent implementation on tiny inputs."""

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import linalg

import gear.eval.adm as adm
from gear.cli import main
from gear.eval.adm import ADMEvaluator, iter_images_npz, resize_bilinear_tf1, squared_distances_fp16
from gear.eval.fid import FeatureStats, compute_stats
from gear.eval.inception import FIDInception
from gear.eval.prdc import precision_recall


@pytest.fixture
def no_hub_weights(tmp_path, monkeypatch):
    """An empty torch hub cache, so no logits weight is found unless a test puts one there."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def write_port_file(path, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """A state dict laid out like pytorch-fid's port file (only the keys that matter here)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"fc.weight": weight, "fc.bias": bias if bias is not None else torch.zeros(1008),
             "Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3)}
    torch.save(state, path)
    return path


class CodedSpatial(torch.nn.Module):
    """Stands in for the Inception: pool = mean pixel, mixed_6/conv[n, c, h, w] = 1e6 n + 1000 c + 17 h + w."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def pool_and_spatial(self, pixels):
        assert pixels.shape[1:] == (3, 299, 299)
        self.calls += 1
        n = len(pixels)
        pool = pixels.mean(dim=(1, 2, 3))[:, None].expand(n, 2048)
        c, h, w = torch.meshgrid(torch.arange(192.0), torch.arange(17.0), torch.arange(17.0), indexing="ij")
        spatial = torch.arange(n, dtype=torch.float32)[:, None, None, None] * 1e6 + (1000 * c + 17 * h + w)[None]
        return pool, spatial


# ---- the TF1 resize ----

def test_tf1_resize_matches_a_hand_computed_case():
    # 2x2 -> 3x3: scale 2/3, source coordinates 0, 2/3, 4/3 -> taps (0,0,w0), (0,1,w2/3), (1,1,w1/3 -> edge)
    x = torch.tensor([[0.0, 100.0], [200.0, 300.0]])[None, :, :, None]
    out = resize_bilinear_tf1(x, 3)[0, :, :, 0]
    expected = torch.tensor([[0.0, 200 / 3, 100.0], [400 / 3, 200.0, 700 / 3], [200.0, 800 / 3, 300.0]])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-4)
    # a 1x3 row to 5: coordinates 0, .6, 1.2, 1.8, 2.4; the last one repeats the edge, nothing is extrapolated
    rows = resize_bilinear_tf1(torch.tensor([0.0, 10.0, 20.0]).reshape(1, 1, 3, 1), 5)[0, :, :, 0]
    torch.testing.assert_close(rows, torch.tensor([[0.0, 6.0, 12.0, 18.0, 20.0]] * 5), rtol=0, atol=1e-5)
    # not the half-pixel resize of torch (or TF2): that one samples at (i + .5) * scale - .5
    half_pixel = F.interpolate(x.permute(0, 3, 1, 2), size=(3, 3), mode="bilinear", align_corners=False)[0, 0]
    assert (half_pixel - expected).abs().max() > 10


def test_tf1_resize_keeps_299_images_and_channels_apart():
    x = torch.rand(2, 299, 299, 3) * 255
    assert torch.equal(resize_bilinear_tf1(x, 299), x)
    grey = torch.rand(1, 5, 7, 1)
    rgb = resize_bilinear_tf1(grey.expand(-1, -1, -1, 3), 11)
    assert rgb.shape == (1, 11, 11, 3) and torch.equal(rgb[..., 0], rgb[..., 2])
    torch.testing.assert_close(rgb[..., :1], resize_bilinear_tf1(grey, 11))


# ---- activations ----

def test_spatial_features_are_the_first_7_channels_in_nhwc_order(no_hub_weights):
    net = CodedSpatial()
    evaluator = ADMEvaluator(network=net)
    pool, spatial = evaluator.compute_activations([np.zeros((2, 8, 8, 3), np.uint8), np.full((1, 8, 8, 3), 255, np.uint8)])
    assert pool.shape == (3, 2048) and spatial.shape == (3, 17 * 17 * 7) and spatial.dtype == np.float32
    assert pool[0, 0] == 0.0 and pool[2, 0] == pytest.approx(255.0)
    # flat index (h * 17 + w) * 7 + c
    assert spatial[0, 0] == 0 and spatial[0, 1] == 1000 and spatial[0, 6] == 6000  # channels first: c = 0..6
    assert spatial[0, 7] == 1 and spatial[0, 7 * 17] == 17  # then w, then h
    assert spatial[1, 7 * 17 * 2 + 7 * 3 + 5] == 1e6 + 5000 + 17 * 2 + 3
    assert spatial[0].max() == 6000 + 16 * 17 + 16  # nothing of channel 7 or beyond
    assert net.calls == 2  # one pass per batch


def test_activations_of_the_real_network(no_hub_weights):
    net = FIDInception()
    images = np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    pool, spatial = ADMEvaluator(network=net).compute_activations([images])
    pixels = resize_bilinear_tf1(torch.from_numpy(images).float(), 299).permute(0, 3, 1, 2)
    np.testing.assert_allclose(pool, net(pixels).numpy(), rtol=1e-5, atol=1e-6)
    x = (pixels - 128) / 128  # the network's blocks by hand up to mixed_6's first branch
    for name, block in net.net.net.layers.named_children():
        if name == "mixed_6":
            conv = block.conv(x)
            break
        x = block(x)
    np.testing.assert_allclose(spatial, conv[:, :7].permute(0, 2, 3, 1).reshape(2, -1).numpy(), rtol=1e-5, atol=1e-6)
    assert (spatial >= 0).all() and not np.allclose(spatial[0], spatial[1])


def test_reference_activations_are_cached_by_content(tmp_path, no_hub_weights):
    images = np.random.default_rng(0).integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=images)
    net = CodedSpatial()
    evaluator = ADMEvaluator(network=net, batch_size=2)
    first = evaluator.read_activations(ref, cache_dir=tmp_path / "cache")
    assert net.calls == 3 and len(first[0]) == 5  # batches of 2, 2, 1
    second = evaluator.read_activations(ref, cache_dir=tmp_path / "cache")
    assert net.calls == 3 and all(np.array_equal(a, b) for a, b in zip(first, second))
    np.savez(ref, arr_0=images[::-1])  # same name, other content: a new entry
    evaluator.read_activations(ref, cache_dir=tmp_path / "cache")
    assert net.calls == 6 and len(list((tmp_path / "cache").glob("*.npz"))) == 2


def test_npz_batches_stream_in_order(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, size=(7, 4, 5, 3), dtype=np.uint8)
    for save in (np.savez, np.savez_compressed):
        save(tmp_path / "x.npz", arr_0=images, mu=np.zeros(3))
        batches = list(iter_images_npz(tmp_path / "x.npz", 3))
        assert [len(b) for b in batches] == [3, 3, 1] and np.array_equal(np.concatenate(batches), images)


# ---- statistics and FID ----

def scipy_fid(mu1, sigma1, mu2, sigma2):
    covmean = linalg.sqrtm(sigma1 @ sigma2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def test_frechet_distance_matches_numpy_with_scipy_sqrtm(no_hub_weights):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(60, 6)), rng.normal(0.3, 1.5, size=(50, 6)) @ rng.normal(size=(6, 6))
    evaluator = ADMEvaluator()
    sa, sb = evaluator.compute_statistics(a), evaluator.compute_statistics(b)
    assert isinstance(sa, FeatureStats)
    np.testing.assert_allclose(sa.mu, a.mean(0))
    np.testing.assert_allclose(sa.sigma, np.cov(a, rowvar=False))
    expected = scipy_fid(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert expected > 1.0
    np.testing.assert_allclose(sa.frechet_distance(sb), expected, rtol=1e-8)
    np.testing.assert_allclose(sb.frechet_distance(sa), expected, rtol=1e-8)
    assert abs(sa.frechet_distance(sa)) < 1e-9


def test_stored_statistics_are_taken_over_computed_ones(tmp_path, no_hub_weights):
    rng = np.random.default_rng(0)
    acts = (rng.normal(size=(10, 4)), rng.normal(size=(10, 3)))
    stored = {"mu": np.arange(4.0), "sigma": np.eye(4) * 2, "mu_s": np.ones(3), "sigma_s": np.eye(3) * 5}
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((10, 2, 2, 3), np.uint8), **stored)
    pool, spatial = ADMEvaluator().read_statistics(tmp_path / "ref.npz", acts)
    for got, mu, sigma in ((pool, "mu", "sigma"), (spatial, "mu_s", "sigma_s")):
        assert np.array_equal(got.mu, stored[mu]) and np.array_equal(got.sigma, stored[sigma]) and got.n == 10
    np.savez(tmp_path / "plain.npz", arr_0=np.zeros((10, 2, 2, 3), np.uint8))
    pool, spatial = ADMEvaluator().read_statistics(tmp_path / "plain.npz", acts)
    np.testing.assert_allclose(pool.sigma, compute_stats(acts[0]).sigma)
    np.testing.assert_allclose(spatial.mu, acts[1].mean(0))
    np.savez(tmp_path / "half.npz", arr_0=np.zeros((10, 2, 2, 3), np.uint8), mu=stored["mu"], sigma=stored["sigma"])
    with pytest.raises(ValueError, match="stores mu but not mu_s, sigma_s"):
        ADMEvaluator().read_statistics(tmp_path / "half.npz", acts)


# ---- Inception Score ----

def test_inception_score_of_a_known_softmax_without_the_bias(tmp_path, no_hub_weights):
    # pool row i is the unit vector e_i, so its logits are row i of W: 0 on a block of classes, -30 elsewhere,
    # i.e. a (near) uniform distribution over the block. Split 1: four disjoint blocks -> IS 4; split 2: one
    # block four times -> IS 1; the mean over splits is 2.5.
    logits = torch.full((2048, 1008), -30.0)
    for i, block in enumerate([0, 1, 2, 3, 5, 5, 5, 5]):
        logits[i, 10 * block : 10 * block + 10] = 0.0
    bias = torch.randn(1008, generator=torch.Generator().manual_seed(0)) * 5
    weights = write_port_file(tmp_path / "port.pth", logits.T.contiguous(), bias)
    evaluator = ADMEvaluator(inception_weights=weights)
    pool = np.eye(2048, dtype=np.float32)[:8]
    assert evaluator.compute_inception_score(pool, split_size=4) == pytest.approx(2.5, abs=1e-5)
    assert evaluator.compute_inception_score(pool[:4], split_size=5000) == pytest.approx(4.0, abs=1e-5)


def test_inception_score_matches_a_float64_reference(tmp_path, no_hub_weights):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(1008, 2048, generator=g) * 0.05
    write_port_file(no_hub_weights / adm.LOGITS_FILES[1], weight)  # torch-fidelity's name in the hub cache
    pool = np.random.default_rng(0).gamma(1.0, 1.0, size=(30, 2048)).astype(np.float32)
    logits = pool.astype(np.float64) @ weight.double().numpy().T
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    expected = []
    for part in (probs[:20], probs[20:]):
        py = part.mean(0)
        expected.append(np.exp(np.mean([np.sum(p * np.log(p / py)) for p in part])))
    score = ADMEvaluator().compute_inception_score(pool, split_size=20)
    assert score == pytest.approx(np.mean(expected), rel=1e-4) and score > 1.1


def test_inception_score_is_none_without_the_weights_and_says_how_to_get_them(no_hub_weights):
    evaluator = ADMEvaluator()
    assert evaluator.logits_weight is None
    with pytest.warns(UserWarning, match="pt_inception-2015-12-05-6726825d.pth.*--inception-weights"):
        assert evaluator.compute_inception_score(np.ones((10, 2048), np.float32)) is None


def test_a_weights_file_without_the_logits_is_refused(tmp_path, no_hub_weights):
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="no fc.weight of shape"):
        ADMEvaluator(inception_weights=tmp_path / "other.pth")
    with pytest.raises(FileNotFoundError):
        ADMEvaluator(inception_weights=tmp_path / "absent.pth")


# ---- precision / recall ----

def numpy_fp16_distances(u, v):
    u16, v16 = u.astype(np.float16), v.astype(np.float16)
    norm_u = (u16 * u16).astype(np.float32).sum(1).astype(np.float16)[:, None]
    norm_v = (v16 * v16).astype(np.float32).sum(1).astype(np.float16)[None, :]
    product = (u16.astype(np.float32) @ v16.astype(np.float32).T).astype(np.float16)
    return np.maximum(norm_u - np.float16(2) * product + norm_v, np.float16(0)).astype(np.float32)


def numpy_prec_recall(ref, sample, k=3):
    ref_radii = np.sort(numpy_fp16_distances(ref, ref), axis=1)[:, k]
    sample_radii = np.sort(numpy_fp16_distances(sample, sample), axis=1)[:, k]
    d = numpy_fp16_distances(ref, sample)
    precision = np.mean([(d[:, j] <= ref_radii).any() for j in range(len(sample))])
    recall = np.mean([(d[i] <= sample_radii).any() for i in range(len(ref))])
    return precision, recall


def test_float16_distances_by_hand_and_the_float32_block_fallback():
    # |u|^2 = 10000 and 2 u.v = 20000 are exact in float16, |v|^2 = 10009 rounds to 10008 (spacing 8 there): 8, not 9
    u, v = torch.tensor([[100.0, 0.0]]), torch.tensor([[100.0, 3.0]])
    assert squared_distances_fp16(u, v).item() == 8.0
    # |(300, 0)|^2 = 90000 overflows float16: the whole block, the (100, 0) row too, is recomputed in float32
    block = squared_distances_fp16(torch.tensor([[300.0, 0.0], [100.0, 0.0]]), torch.tensor([[300.0, 3.0], [100.0, 3.0]]))
    assert block[0, 0].item() == 9.0 and block[1, 1].item() == 9.0


def test_float16_distances_match_numpy_float16_arithmetic():
    rng = np.random.default_rng(0)
    # multiples of 1/4 keep every float32 sum exact, so only the float16 roundings matter
    u, v = rng.integers(-120, 120, size=(20, 8)) / 4, rng.integers(-120, 120, size=(15, 8)) / 4
    got = squared_distances_fp16(torch.tensor(u, dtype=torch.float32), torch.tensor(v, dtype=torch.float32)).numpy()
    expected = numpy_fp16_distances(u, v)
    assert np.array_equal(got, expected)
    assert not np.array_equal(expected, ((u[:, None] - v[None]) ** 2).sum(-1))  # the rounding is there


def test_precision_recall_use_float16_distances_on_a_hand_checkable_case(no_hub_weights):
    # reference: (96, y) for y = 0, 4, 8, 12; every float16 step is exact, so the radii (3rd neighbour, squared)
    # are 144, 64, 64, 144. Sample (97, 24) is sqrt(145) from (96, 12): outside its ball in exact arithmetic, but
    # |s|^2 = 9985 rounds to 9984 in float16 and 9360 - 2 * 9600 + 9984 = 144 puts it inside. The three other
    # samples are far from every reference; every reference lies within the samples' wide balls.
    ref = np.array([[96, 0], [96, 4], [96, 8], [96, 12]], dtype=np.float32)
    sample = np.array([[97, 24], [96, 100], [96, 104], [96, 108]], dtype=np.float32)
    evaluator = ADMEvaluator()
    assert evaluator.manifold_radii(torch.from_numpy(ref)).tolist() == [144.0, 64.0, 64.0, 144.0]
    assert evaluator.compute_prec_recall(ref, sample) == (0.25, 1.0)
    assert tuple(precision_recall(ref, sample)) == (0.0, 1.0)  # exact distances


def test_precision_recall_match_a_plain_implementation_over_blocks(monkeypatch, no_hub_weights):
    rng = np.random.default_rng(0)
    ref = (rng.integers(-60, 60, size=(40, 6)) / 4).astype(np.float32)
    sample = (rng.integers(-60, 60, size=(30, 6)) / 4 + 8).astype(np.float32)
    expected = numpy_prec_recall(ref, sample)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    assert ADMEvaluator().compute_prec_recall(ref, sample) == pytest.approx(expected, abs=0)
    monkeypatch.setattr(adm, "DISTANCE_BLOCK", 7)  # the 10,000 x 10,000 blocks, shrunk
    assert ADMEvaluator().compute_prec_recall(ref, sample) == pytest.approx(expected, abs=0)


def test_precision_recall_need_more_than_k_points(no_hub_weights):
    with pytest.raises(ValueError, match="more than 3"):
        ADMEvaluator().compute_prec_recall(np.zeros((3, 4)), np.zeros((5, 4)))


# ---- the command ----

@pytest.mark.parametrize("make, message", [
    (lambda p: None, "not found"),
    (lambda p: p.write_text("not a zip"), "is not an .npz file"),
    (lambda p: np.savez(p, images=np.zeros((4, 8, 8, 3), np.uint8)), "has no arr_0 \\(it holds images\\)"),
    (lambda p: np.savez(p, arr_0=np.zeros((4, 8, 8, 3), np.float32)), "arr_0 is float32, expected uint8"),
    (lambda p: np.savez(p, arr_0=np.zeros((4, 8, 8), np.uint8)), "arr_0 has shape \\(4, 8, 8\\)"),
    (lambda p: np.savez(p, arr_0=np.zeros((4, 8, 8, 1), np.uint8)), "expected uint8 RGB images"),
    (lambda p: np.savez(p, arr_0=np.zeros((3, 8, 8, 3), np.uint8)), "holds 3 images; the metrics need more than 3"),
])
@pytest.mark.parametrize("which", ["samples", "ref"])
def test_bad_files_get_one_line(tmp_path, capsys, no_hub_weights, make, message, which):
    good, bad = tmp_path / "good.npz", tmp_path / "bad.npz"
    np.savez(good, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    make(bad)
    samples, ref = (bad, good) if which == "samples" else (good, bad)
    assert main(["eval", "adm", str(samples), "--ref", str(ref), "--cache-dir", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gear eval: error: ") and "\n" not in err and str(bad) in err
    assert re.search(message, err), err


def test_adm_needs_ref_and_its_flags_belong_to_adm(tmp_path, capsys):
    assert main(["eval", "adm", str(tmp_path / "s.npz")]) == 2
    assert "needs --ref" in capsys.readouterr().err
    assert main(["eval", "gen", str(tmp_path), "--ref", "x.npz"]) == 2
    assert "belong to `gear eval adm" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_scores_a_sample_file_against_a_reference(tmp_path, capsys, no_hub_weights):
    # ~30 s: 8 images through the Inception, then two 2000-d Frechet distances
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8))
    np.savez(tmp_path / "samples.npz", arr_0=rng.integers(0, 200, size=(4, 48, 48, 3), dtype=np.uint8))
    write_port_file(tmp_path / "port.pth", torch.randn(1008, 2048) * 0.01)
    args = ["eval", "adm", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npz"), "--batch-size", "3",
            "--inception-weights", str(tmp_path / "port.pth"), "--cache-dir", str(tmp_path / "cache"),
            "--out", str(tmp_path / "metrics.json")]
    assert main(args) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["num_samples"] == 4 and metrics["num_reference"] == 4 and metrics["what"] == "adm"
    assert metrics["fid"] > 0 and metrics["sfid"] > 0 and metrics["inception_score"] >= 1.0
    assert 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    assert json.loads(capsys.readouterr().out) == metrics
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1  # the reference's activations only
