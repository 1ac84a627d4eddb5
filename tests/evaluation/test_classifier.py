"""Tests of the dataset classifier used as a feature network (ddpm_jax.evaluation.classifier)."""

import gzip
import os

import chex
import numpy as np
import pytest

from ddpm_jax.evaluation import classifier
from ddpm_jax.evaluation import features as features_lib

_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
_SMALL = dict(steps=60, batch_size=32, width=8, feature_dim=16)


def _separable(num: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """8x8 grayscale images: noise in [0, 60], plus a bright 4x4 quadrant given by the label."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 4, num)
  images = rng.integers(0, 61, (num, 8, 8, 1)).astype(np.uint8)
  for i, label in enumerate(labels):
    r, c = divmod(int(label), 2)
    images[i, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] += 180
  return images, labels


@pytest.fixture(scope="module")
def data():
  return _separable(256, 0), _separable(100, 1)


@pytest.fixture(scope="module")
def params(data):
  (images, labels), _ = data
  return classifier.train_classifier(images, labels, num_classes=4, seed=0, **_SMALL)


def test_learns_separable_data(data, params):
  _, (test_images, test_labels) = data
  assert classifier.classifier_accuracy(params, test_images, test_labels) >= 0.95


def test_deterministic_given_seed(data, params):
  (images, labels), _ = data
  again = classifier.train_classifier(images, labels, num_classes=4, seed=0, **_SMALL)
  chex.assert_trees_all_equal(again, params)
  other = classifier.train_classifier(images, labels, num_classes=4, seed=1, **_SMALL)
  assert not np.array_equal(other["embed"]["kernel"], params["embed"]["kernel"])


def test_extractor(data, params):
  _, (test_images, _) = data
  extractor = classifier.classifier_feature_extractor(params, (8, 8, 1))
  assert extractor.name == "small-cnn" and extractor.logits_name.endswith("(4 classes)")
  features, logits = features_lib.extract_features(extractor, test_images, batch_size=48)
  chex.assert_shape(features, (100, 16))
  chex.assert_shape(logits, (100, 4))
  direct_features, direct_logits = extractor(test_images)
  np.testing.assert_allclose(features, direct_features, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits, direct_logits, rtol=1e-5, atol=1e-5)
  assert np.all(features >= 0)  # ReLU embedding.
  with pytest.raises(ValueError, match="size"):
    features_lib.extract_features(extractor, np.zeros((2, 28, 28, 1), np.uint8))


def test_accuracy_matches_logits(data, params):
  _, (test_images, test_labels) = data
  _, logits = classifier.classifier_feature_extractor(params, (8, 8, 1))(test_images)
  expected = np.mean(np.argmax(np.asarray(logits), -1) == test_labels)
  assert classifier.classifier_accuracy(params, test_images, test_labels) == pytest.approx(expected)


def test_cache_path_depends_on_recipe(tmp_path):
  recipe = dict(classifier.DEFAULT_RECIPE, split="train")
  path = classifier.classifier_cache_path(str(tmp_path), "lsun/cat", recipe)
  assert os.path.dirname(path) == str(tmp_path)
  assert os.path.basename(path).startswith("classifier_lsun_cat_") and path.endswith(".npz")
  assert path == classifier.classifier_cache_path(str(tmp_path), "lsun/cat", dict(recipe))
  for change in (dict(steps=1), dict(split="train[:100]")):
    assert path != classifier.classifier_cache_path(
      str(tmp_path), "lsun/cat", dict(recipe, **change)
    )


def test_cache(data, params, tmp_path, monkeypatch):
  (images, labels), (test_images, test_labels) = data
  path = str(tmp_path / "classifier_toy.npz")
  kwargs = dict(_SMALL, num_classes=4, steps=3, seed=0)  # Same shapes: no recompilation.
  first, meta = classifier.load_or_train_classifier(
    path, images, labels, eval_images=test_images, eval_labels=test_labels, **kwargs
  )
  assert os.path.exists(path)
  assert meta["test_accuracy"] == pytest.approx(
    classifier.classifier_accuracy(first, test_images, test_labels)
  )

  def fail(*unused_args, **unused_kwargs):
    raise AssertionError("a cached classifier must not be retrained")

  monkeypatch.setattr(classifier, "train_classifier", fail)
  second, meta2 = classifier.load_or_train_classifier(path, images, labels, **kwargs)
  chex.assert_trees_all_equal(second, first)
  assert meta2 == meta
  assert meta["num_classes"] == 4 and meta["image_shape"] == [8, 8, 1] and meta["steps"] == 3
  for change in (dict(num_classes=3), dict(steps=4)):
    with pytest.raises(ValueError, match="delete it"):
      classifier.load_or_train_classifier(path, images, labels % 3, **dict(kwargs, **change))
  with pytest.raises(ValueError, match="unknown classifier options"):
    classifier.load_or_train_classifier(path, images, labels, **dict(kwargs, depth=3))


@pytest.mark.parametrize(
  "change, match",
  [
    ("float", "uint8"),
    ("labels_range", r"\[0, 4\)"),
    ("labels_shape", "labels"),
    ("classes", "num_classes"),
    ("batch", "batch_size"),
  ],
)
def test_bad_input(data, change, match):
  (images, labels), _ = data
  kwargs = dict(num_classes=4, steps=1, batch_size=8)
  if change == "float":
    images = images.astype(np.float32)
  elif change == "labels_range":
    labels = labels + 1
  elif change == "labels_shape":
    labels = labels[:-1]
  elif change == "classes":
    kwargs["num_classes"] = 1
  else:
    kwargs["batch_size"] = 1000
  with pytest.raises(ValueError, match=match):
    classifier.train_classifier(images, labels, **kwargs)


def _read_idx(name: str, offset: int) -> np.ndarray:
  with gzip.open(os.path.join(_FASHION_MNIST, name)) as f:
    return np.frombuffer(f.read(), np.uint8, offset=offset)


@pytest.mark.skipif(
  not os.path.isdir(_FASHION_MNIST),
  reason=f"Fashion-MNIST not installed at {_FASHION_MNIST} (apt-get install dataset-fashion-mnist)",
)
def test_fashion_mnist_slice():
  images = _read_idx("train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28, 1)[:2000]
  labels = _read_idx("train-labels-idx1-ubyte.gz", 8)[:2000]
  test_images = _read_idx("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28, 1)[:1000]
  test_labels = _read_idx("t10k-labels-idx1-ubyte.gz", 8)[:1000]
  params = classifier.train_classifier(
    images, labels, num_classes=10, steps=150, batch_size=32, width=16, seed=0
  )
  # 10 balanced classes: chance is 0.1; 150 steps on 2,000 images give 0.81-0.82 (seeds 0-2).
  assert classifier.classifier_accuracy(params, test_images, test_labels) >= 0.7
