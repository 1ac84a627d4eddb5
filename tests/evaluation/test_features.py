"""Tests of ddpm_jax.evaluation.features: the fingerprint of a network's variables and batched
feature extraction."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax.evaluation import features as features_lib


def test_variables_fingerprint():
  tree = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": {"c": np.ones(2)}}
  same = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": {"c": np.ones(2)}}
  assert features_lib.variables_fingerprint(tree) == features_lib.variables_fingerprint(same)
  assert len(features_lib.variables_fingerprint(tree)) == 12
  changed = {"a": tree["a"].copy(), "b": {"c": np.ones(2)}}
  changed["a"][1, 2] += 1e-6
  reshaped = {"a": tree["a"].reshape(3, 2), "b": tree["b"]}
  renamed = {"x": tree["a"], "b": tree["b"]}
  for other in (changed, reshaped, renamed):
    assert features_lib.variables_fingerprint(other) != features_lib.variables_fingerprint(tree)


def _toy_extractor(with_logits: bool) -> features_lib.FeatureExtractor:
  """features = flattened pixels @ W; logits = per-image channel sums (or None)."""
  w = np.random.default_rng(7).normal(size=(4 * 4 * 3, 5)).astype(np.float32)

  def apply_fn(variables, images):
    x = images.astype(jnp.float32).reshape(images.shape[0], -1)
    return x @ variables, (images.astype(jnp.float32).sum((1, 2)) if with_logits else None)

  return features_lib.FeatureExtractor(
    "toy", apply_fn, w, feature_dim=5, image_hw=(4, 4), channels=(3,)
  )


class TestExtractFeatures:
  @pytest.mark.parametrize("num, batch_size", [(13, 5), (8, 8), (3, 16)])
  def test_matches_direct_computation(self, num, batch_size):
    images = np.random.default_rng(num).integers(0, 256, (num, 4, 4, 3), dtype=np.uint8)
    extractor = _toy_extractor(with_logits=True)
    features, logits = features_lib.extract_features(extractor, images, batch_size)
    chex.assert_shape(features, (num, 5))
    chex.assert_shape(logits, (num, 3))
    np.testing.assert_allclose(
      features, images.reshape(num, -1).astype(np.float32) @ extractor.variables, rtol=1e-5
    )
    np.testing.assert_array_equal(logits, images.astype(np.float32).sum((1, 2)))

  def test_iterate_features_chunks(self):
    images = np.random.default_rng(11).integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
    extractor = _toy_extractor(with_logits=False)
    chunks = [images[:3], images[3:3], images[3:10]]
    results = list(features_lib.iterate_features(extractor, chunks, batch_size=7))
    assert [f.shape[0] for f, _ in results] == [3, 0, 7]
    np.testing.assert_allclose(
      np.concatenate([f for f, _ in results]),
      images.reshape(10, -1).astype(np.float32) @ extractor.variables,
      rtol=1e-5,
    )
    with pytest.raises(ValueError, match="exceeds batch_size"):
      list(features_lib.iterate_features(extractor, [images], batch_size=7))

  def test_no_logits(self):
    images = np.zeros((6, 4, 4, 3), np.uint8)
    features, logits = features_lib.extract_features(_toy_extractor(with_logits=False), images, 4)
    chex.assert_shape(features, (6, 5))
    assert logits is None

  @pytest.mark.parametrize(
    "images, match",
    [
      (np.zeros((2, 4, 4, 3), np.float32), "uint8"),
      (np.zeros((2, 5, 4, 3), np.uint8), "size"),
      (np.zeros((2, 4, 4, 1), np.uint8), "channels"),
      (np.zeros((4, 4, 3), np.uint8), "shape"),
    ],
  )
  def test_bad_images(self, images, match):
    with pytest.raises(ValueError, match=match):
      features_lib.extract_features(_toy_extractor(True), images, 4)

  def test_bad_batch_size_and_feature_dim(self):
    images = np.zeros((2, 4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="batch_size"):
      features_lib.extract_features(_toy_extractor(True), images, 0)
    wrong = features_lib.FeatureExtractor(
      "wrong", _toy_extractor(True).apply_fn, _toy_extractor(True).variables, feature_dim=6
    )
    with pytest.raises(ValueError, match="features of shape"):
      features_lib.extract_features(wrong, images, 4)
