import numpy as np
import pytest

import gear.eval.prdc as prdc
from gear.eval.prdc import knn_radii, precision_recall


def test_a_set_against_itself_is_one_one():
    x = np.random.default_rng(0).normal(size=(200, 16))
    assert precision_recall(x, x) == (1.0, 1.0)


def test_a_far_shifted_set_is_zero_zero():
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(150, 16)), rng.normal(size=(120, 16)) + 100.0
    assert precision_recall(real, fake) == (0.0, 0.0)


def test_hand_computed_one_dimensional_case():
    # k=1: every real point's radius is 1, so 0.5 is inside the real manifold and 10 is not.
    # The two fake points are each other's neighbour at distance 9.5, which covers all real points.
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    fake = np.array([[0.5], [10.0]])
    pr = precision_recall(real, fake, k=1)
    assert pr.precision == 0.5 and pr.recall == 1.0


def test_knn_radii_are_kth_neighbour_distances():
    x = np.array([[0.0], [1.0], [3.0], [7.0]])
    import torch

    got = knn_radii(torch.as_tensor(x), k=2).sqrt().numpy()
    np.testing.assert_allclose(got, [3.0, 2.0, 3.0, 6.0])


def test_chunked_matches_unchunked(monkeypatch):
    rng = np.random.default_rng(2)
    real, fake = rng.normal(size=(90, 8)), rng.normal(size=(70, 8)) * 1.3 + 0.2
    whole = precision_recall(real, fake)
    monkeypatch.setattr(prdc, "_BLOCK_ENTRIES", 1000)  # about ten rows per block
    assert precision_recall(real, fake) == whole
    assert 0.0 < whole.precision < 1.0 and 0.0 < whole.recall < 1.0


def test_bad_input_raises():
    with pytest.raises(ValueError, match="one D"):
        precision_recall(np.zeros((10, 3)), np.zeros((10, 4)))
    with pytest.raises(ValueError, match="k must be"):
        precision_recall(np.random.rand(3, 2), np.random.rand(5, 2), k=3)
