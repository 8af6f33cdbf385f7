import pytest
import torch

from gear.eval.classifier import (
    Classifier,
    ClassifierConfig,
    classifier_accuracy,
    classifier_features,
    predict,
    train_classifier,
)


def toy_set(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three separable classes of 32x32 RGB images: a bright top, middle or bottom band, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = -torch.ones(n, 3, 32, 32) + 0.3 * torch.randn(n, 3, 32, 32, generator=g)
    for i, c in enumerate(labels.tolist()):
        images[i, :, 10 * c : 10 * c + 12] += 1.5
    return images.clamp(-1, 1), labels


SMALL = ClassifierConfig(num_classes=3, widths=(8, 16, 32), feature_dim=32)


@pytest.fixture(scope="module")
def trained():
    x, y = toy_set(96, seed=0)
    return train_classifier(x, y, steps=30, batch_size=16, config=SMALL, seed=0)


def test_learns_a_separable_set(trained):
    x, y = toy_set(60, seed=1)  # fresh images
    untrained = classifier_accuracy(Classifier(trained.config), x, y)
    result = classifier_accuracy(trained, x, y)
    assert result.accuracy >= 0.95 and result.num == 60
    assert result.loss < untrained.loss
    assert (predict(trained, x) == y).float().mean().item() == pytest.approx(result.accuracy)
    assert not trained.training


def test_features_grey_input_and_shapes(trained):
    x, _ = toy_set(4, seed=2)
    feats = classifier_features(trained, x)
    assert feats.shape == (4, trained.config.feature_dim)
    grey = x[:, :1]
    torch.testing.assert_close(trained(grey), trained(grey.expand(-1, 3, -1, -1)))
    with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\)"):
        trained(torch.zeros(2, 3, 28, 28))


def test_save_load_roundtrip_and_name(trained, tmp_path):
    trained.save_pretrained(tmp_path / "clf")
    back = Classifier.from_pretrained(tmp_path / "clf").eval()
    x, _ = toy_set(6, seed=3)
    torch.testing.assert_close(back(x), trained(x))
    assert back.name == trained.name
    assert Classifier(trained.config).name != trained.name  # the name follows the weights


def test_training_is_reproducible():
    x, y = toy_set(32, seed=4)
    a = train_classifier(x, y, steps=3, batch_size=8, config=SMALL, seed=7)
    b = train_classifier(x, y, steps=3, batch_size=8, config=SMALL, seed=7)
    assert a.name == b.name


def test_default_config_follows_the_data():
    x, y = toy_set(6, seed=6)
    model = train_classifier(x, y, steps=1, batch_size=6)
    assert model.config.num_classes == 3 and model.config.feature_dim == 128


def test_bad_labels_raise():
    x, y = toy_set(8, seed=5)
    with pytest.raises(ValueError, match=r"labels must be \(N,\)"):
        train_classifier(x, y[:4], steps=1)
    with pytest.raises(ValueError, match="labels must lie"):
        train_classifier(x, y + 5, steps=1, config=ClassifierConfig(num_classes=3))


def test_a_saved_classifier_carries_a_generic_model_card(tmp_path):
    Classifier(ClassifierConfig()).save_pretrained(tmp_path / "clf")
    card = (tmp_path / "clf" / "README.md").read_text()
    assert "# gear classifier" in card and "- kind: classifier" in card and "from_pretrained" in card
