import numpy as np
import pytest
import scipy.linalg

from gear.eval.fid import FeatureStats, cached_reference_stats, compute_stats, fid_from_stats, frechet_distance, stats_key


@pytest.fixture
def feats():
    return np.random.default_rng(0).normal(size=(400, 32)) @ np.random.default_rng(1).normal(size=(32, 32))


def test_fid_of_a_set_against_itself_is_zero(feats):
    s = compute_stats(feats)
    assert abs(fid_from_stats(s, s)) < 1e-6


def test_fid_grows_with_noise(feats):
    a = compute_stats(feats)
    noise = np.random.default_rng(2).normal(size=feats.shape)
    fids = [fid_from_stats(a, compute_stats(feats + std * noise)) for std in (0.0, 0.1, 0.3, 1.0, 3.0)]
    assert abs(fids[0]) < 1e-6
    assert all(lo < hi for lo, hi in zip(fids, fids[1:])), fids


def test_matches_direct_sqrtm_computation(feats):
    other = feats[:300] * 1.3 + 0.5
    mu1, mu2 = feats.mean(0), other.mean(0)
    s1, s2 = np.cov(feats, rowvar=False), np.cov(other, rowvar=False)
    direct = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
    got = fid_from_stats(compute_stats(feats), compute_stats(other))
    assert got == pytest.approx(direct, rel=1e-6)


def test_closed_form_for_diagonal_gaussians():
    # For commuting (diagonal) covariances the distance is |dmu|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = 1.0 + 4.0 + (1 - 3) ** 2 + (2 - 1) ** 2
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)


def test_rank_deficient_covariances_give_a_finite_real_value():
    rng = np.random.default_rng(3)
    a, b = compute_stats(rng.normal(size=(5, 16))), compute_stats(rng.normal(size=(5, 16)) + 1.0)
    value = fid_from_stats(a, b)
    assert np.isfinite(value) and value > 0


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="one D"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="N >= 2"):
        compute_stats(np.zeros((1, 3)))


def test_stats_save_load_roundtrip(tmp_path, feats):
    s = compute_stats(feats, keep_features=True)
    path = s.save(tmp_path / "ref.npz")
    back = FeatureStats.load(path)
    np.testing.assert_array_equal(back.mu, s.mu)
    np.testing.assert_array_equal(back.sigma, s.sigma)
    np.testing.assert_array_equal(back.features, feats.astype(np.float32))
    assert back.n == 400
    assert FeatureStats.load(compute_stats(feats).save(tmp_path / "nofeat.npz")).features is None


def test_load_of_a_corrupt_file_raises(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an npz")
    with pytest.raises(ValueError, match="recompute"):
        FeatureStats.load(bad)


def test_cached_reference_stats_computes_once(tmp_path, feats):
    calls = []

    def compute():
        calls.append(1)
        return compute_stats(feats)

    key = stats_key("toy", "inception-2015-12-05-clean", 400)
    first = cached_reference_stats(key, tmp_path, compute)
    second = cached_reference_stats(key, tmp_path, compute)
    assert len(calls) == 1
    np.testing.assert_array_equal(first.sigma, second.sigma)
    cached_reference_stats(stats_key("toy", "inception-2015-12-05-clean", 200), tmp_path, compute)
    assert len(calls) == 2  # another sample count is another cache entry
    assert len(list(tmp_path.glob("*.npz"))) == 2
