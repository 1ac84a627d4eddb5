"""Tests of ddpm_jax.evaluation.sample_quality: config checks, caches and evaluate_samples.

The dataset is a small Fashion-MNIST-format data_dir written here whose 4 classes are easy
(a bright quadrant per class), so a few classifier steps learn it; the expected values are
the statistics of the features computed directly.
"""

import dataclasses
import os

import chex
import jax
import numpy as np
import pytest

from configs import default as default_config
from ddpm_jax import config_checks, data_sources, datasets, hosts
from ddpm_jax import input_pipeline as ip
from ddpm_jax.errors import ConfigError
from ddpm_jax.evaluation import features as features_lib
from ddpm_jax.evaluation import inception, metrics
from ddpm_jax.evaluation import sample_quality as sq
from tests.conftest import write_idx

NUM = {"train": 100, "test": 60}
_RECIPE = dict(
  classifier_steps=60, classifier_batch_size=32, classifier_width=8, classifier_feature_dim=16
)


def _quadrant_images(num: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  labels = np.arange(num) % 4
  images = rng.integers(0, 61, (num, 28, 28)).astype(np.uint8)
  for i, label in enumerate(labels):
    r, c = divmod(int(label), 2)
    images[i, 14 * r : 14 * r + 14, 14 * c : 14 * c + 14] += 180
  return images, labels


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp("quadrants")
  for seed, (split, num) in enumerate(NUM.items()):
    images, labels = _quadrant_images(num, seed)
    write_idx(folder / data_sources.FASHION_MNIST_FILES[split], [2051, num, 28, 28], images)
    label_file = data_sources.FASHION_MNIST_FILES[split].replace("images-idx3", "labels-idx1")
    write_idx(folder / label_file, [2049, num], labels)
  return str(folder)


def _config(data_dir: str, **eval_overrides):
  config = default_config.get_config()
  config.data.update(
    dataset="fashion_mnist_files", data_dir=data_dir, image_size=28, num_channels=1
  )
  config.eval.update(dict(feature_network="classifier", batch_size=32, **_RECIPE))
  config.eval.update(eval_overrides)
  return config


@pytest.fixture(scope="module")
def setup(data_dir, tmp_path_factory):
  """(config, cache_dir, extractor): the classifier is trained once, here."""
  config, cache_dir = _config(data_dir), str(tmp_path_factory.mktemp("cache"))
  return config, cache_dir, sq.get_feature_extractor(config, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def train_images(setup):
  return ip.load_labeled_arrays(setup[0].data, "train")[0]


# ---------------------------------------------------------------------- config checks


def _check(config):
  """The eval-group checks of the entry (config_checks), with FID on."""
  config_checks.check_eval(config, datasets.get(config.data.dataset))


def test_missing_inception_weights_message(data_dir):
  for path in ("", "/nonexistent/inception_fid.npz"):
    config = _config(data_dir, feature_network="inception", inception_weights=path)
    with pytest.raises(ConfigError) as info:
      _check(config)
    message = str(info.value)
    assert "\n" not in message and f"eval.inception_weights={path!r}" in message
    assert "github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" in message
    assert (
      "python scripts/convert_inception_weights.py --input=pt_inception-2015-12-05-"
      "6726825d.pth --output="
    ) in message


@pytest.mark.parametrize(
  "change, match",
  [
    (dict(eval=dict(feature_network="vgg")), "eval.feature_network='vgg' is unknown"),
    (dict(eval=dict(batch_size=0)), "eval.batch_size=0"),
    (dict(eval=dict(fid_reference_split="validation")), "eval.fid_reference_split"),
    (dict(eval=dict(classifier_steps=-1)), "eval.classifier_steps=-1"),
    (dict(eval=dict(classifier_learning_rate=0.0)), "eval.classifier_learning_rate=0.0"),
    (dict(eval=dict(classifier_seed=-3)), "eval.classifier_seed=-3"),
    (
      dict(
        data=dict(
          dataset="lsun/church_outdoor",
          data_dir="",
          image_size=64,
          num_channels=3,
          eval_split="validation",
        )
      ),
      "in-memory dataset with labels",
    ),
  ],
)
def test_bad_config(data_dir, change, match):
  config = _config(data_dir)
  config.data.update(change.get("data", {}))
  config.eval.update(change.get("eval", {}))
  with pytest.raises(ConfigError, match=match):
    _check(config)


@pytest.mark.parametrize(
  "samples, match",
  [
    (np.zeros((4, 28, 28, 1), np.float32), "uint8"),
    (np.zeros((4, 32, 32, 3), np.uint8), r"uint8 \[N, 28, 28, 1\]"),
    (np.zeros((1, 28, 28, 1), np.uint8), "at least 2 samples"),
  ],
)
def test_bad_samples_fail_before_work(data_dir, samples, match, monkeypatch):
  monkeypatch.setattr(sq, "get_feature_extractor", lambda *a, **k: pytest.fail("work done"))
  with pytest.raises(ValueError, match=match):
    sq.evaluate_samples(samples, _config(data_dir), cache_dir="/nonexistent")


def test_inception_extractor_from_weights_file(data_dir, tmp_path):
  flat = {k: np.full(s, 0.5, np.float32) for k, s in inception.variable_shapes().items()}
  path = str(tmp_path / "inception_fid.npz")
  np.savez(path, **flat)
  config = _config(data_dir, feature_network="inception", inception_weights=path)
  _check(config)
  extractor = sq.get_feature_extractor(config, cache_dir=str(tmp_path))
  assert extractor.name == inception.FEATURES_NAME and extractor.feature_dim == 2048
  assert "1008" in extractor.logits_name and extractor.image_hw is None


# --------------------------------------------------------------------- the classifier


def test_classifier_trained_once_and_tested(setup, monkeypatch):
  config, cache_dir, extractor = setup
  assert extractor.name == "small-cnn" and extractor.feature_dim == 16
  assert extractor.info["classifier_test_accuracy"] >= 0.95  # Chance: 0.25.
  cached = [f for f in os.listdir(cache_dir) if f.startswith("classifier_")]
  assert len(cached) == 1 and cached[0].startswith("classifier_fashion_mnist_files_")
  monkeypatch.setattr(
    sq.classifier,
    "train_classifier",
    lambda *a, **k: pytest.fail("the cached classifier was retrained"),
  )
  again = sq.get_feature_extractor(config, cache_dir=cache_dir)
  assert features_lib.variables_fingerprint(again.variables) == features_lib.variables_fingerprint(
    extractor.variables
  )
  assert again.info == extractor.info


# ---------------------------------------------------------------- reference statistics


def test_reference_statistics_are_those_of_the_train_split(setup, train_images):
  config, cache_dir, extractor = setup
  mu, sigma = sq.reference_statistics(config, extractor, cache_dir=cache_dir)
  features, _ = features_lib.extract_features(extractor, train_images, batch_size=32)
  expected_mu, expected_sigma = metrics.compute_statistics(features)
  np.testing.assert_allclose(mu, expected_mu, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(sigma, expected_sigma, rtol=1e-4, atol=1e-4)


def test_reference_cache_reused_and_invalidated(setup, tmp_path, monkeypatch):
  config, _, extractor = setup
  cache_dir = str(tmp_path)
  first = sq.reference_statistics(config, extractor, cache_dir=cache_dir)
  (name,) = os.listdir(cache_dir)
  fingerprint = features_lib.variables_fingerprint(extractor.variables)
  assert name == f"fid_stats_fashion_mnist_files_train_small-cnn_{fingerprint}.npz"
  _, _, meta = metrics.load_stats(os.path.join(cache_dir, name))
  assert meta["num_examples"] == NUM["train"] and meta["fingerprint"] == fingerprint

  real_iterate = features_lib.iterate_features
  monkeypatch.setattr(
    features_lib,
    "iterate_features",
    lambda *a, **k: pytest.fail("cached statistics were recomputed"),
  )
  chex.assert_trees_all_equal(
    sq.reference_statistics(config, extractor, cache_dir=cache_dir), first
  )

  # Other weights (same name and shapes): new statistics, the old file is kept.
  monkeypatch.setattr(features_lib, "iterate_features", real_iterate)
  changed = dataclasses.replace(
    extractor, variables=jax.tree_util.tree_map(lambda w: w * 1.5, extractor.variables)
  )
  second = sq.reference_statistics(config, changed, cache_dir=cache_dir)
  assert len(os.listdir(cache_dir)) == 2
  assert not np.allclose(second[0], first[0])
  # Another split is another file too.
  sq.reference_statistics(
    _config(config.data.data_dir, fid_reference_split="test"), extractor, cache_dir=cache_dir
  )
  assert len(os.listdir(cache_dir)) == 3


def test_reference_of_the_first_examples_of_the_split(setup, train_images, tmp_path):
  """eval.fid_reference_num_examples (LSUN: 50,000, as StyleGAN2's metric): the statistics
  of the first N images in stored order, cached apart from those of the whole split."""
  config, _, extractor = setup
  first = _config(config.data.data_dir, fid_reference_num_examples=40)
  mu, sigma = sq.reference_statistics(first, extractor, cache_dir=str(tmp_path))
  features, _ = features_lib.extract_features(extractor, train_images[:40], batch_size=32)
  expected_mu, expected_sigma = metrics.compute_statistics(features)
  np.testing.assert_allclose(mu, expected_mu, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(sigma, expected_sigma, rtol=1e-4, atol=1e-4)
  (name,) = os.listdir(tmp_path)
  assert name.startswith("fid_stats_fashion_mnist_files_train_first40_small-cnn_")
  with pytest.raises(ConfigError, match="num_examples=101 exceeds the 100 examples"):
    sq.reference_statistics(
      _config(config.data.data_dir, fid_reference_num_examples=101),
      extractor,
      cache_dir=str(tmp_path),
    )
  # A cache file from before the count was recorded covers the whole split: reused.
  whole = sq.reference_statistics(config, extractor, cache_dir=str(tmp_path))
  path = str(tmp_path / name.replace("_first40", ""))
  _, _, meta = metrics.load_stats(path)
  del meta["first"]
  metrics.save_stats(path, np.zeros_like(whole[0]), np.eye(len(whole[0])), meta)
  np.testing.assert_array_equal(
    sq.reference_statistics(config, extractor, cache_dir=str(tmp_path))[0], 0.0
  )


# ------------------------------------------------------------------- evaluate_samples


def test_train_split_as_samples_has_fid_zero(setup, train_images):
  config, cache_dir, _ = setup
  result = sq.evaluate_samples(train_images, config, cache_dir=cache_dir)
  assert abs(result["fid"]) < 1e-3
  assert result["feature_network"] == "classifier" and result["reference_split"] == "train"
  assert result["feature_extractor"].startswith("small-cnn@")
  assert result["num_samples"] == result["num_reference"] == NUM["train"]
  assert result["classifier_test_accuracy"] >= 0.95
  # 4 balanced, confidently classified classes: IS close to 4.
  assert 3.0 < result["inception_score"] <= 4.0 + 1e-6
  assert result["inception_score_logits"] == "small-cnn class logits (4 classes)"
  assert result["inception_score_splits"] == 10


def test_noise_has_large_fid(setup):
  config, cache_dir, _ = setup
  noise = np.random.default_rng(5).integers(0, 256, (40, 28, 28, 1), dtype=np.uint8)
  result = sq.evaluate_samples(noise, config, cache_dir=cache_dir)
  test_images = ip.load_labeled_arrays(config.data, "test")[0]
  held_out = sq.evaluate_samples(test_images, config, cache_dir=cache_dir)
  assert result["fid"] > 10 * held_out["fid"] and result["fid"] > 1.0
  assert held_out["num_samples"] == NUM["test"]


class _TwoHosts:
  """hosts.gather as process 0 of two sees it: its array, then what process 1 sent in the
  same call (recorded by running process 1's side first with `record`)."""

  def __init__(self):
    self.sent, self.calls = [], 0

  def record(self, array):
    self.sent.append(np.array(array))
    return array

  def gather(self, array):
    other = self.sent[self.calls]
    self.calls += 1
    return np.concatenate([array, other])


def test_statistics_merged_across_processes(monkeypatch):
  """Two processes' statistics (each of its share) combine into those of the whole set;
  the float64 moments travel exactly."""
  rng = np.random.default_rng(7)
  features = rng.normal(size=(90, 5)) @ rng.normal(size=(5, 5)) + 3.0
  parts = [metrics.RunningStatistics(5), metrics.RunningStatistics(5)]
  parts[0].update(features[:50])
  parts[1].update(features[50:])
  hosts_pair = _TwoHosts()
  monkeypatch.setattr(hosts, "multi", lambda: True)
  monkeypatch.setattr(hosts, "gather", hosts_pair.record)
  sq._merge_across_processes(parts[1])
  monkeypatch.setattr(hosts, "gather", hosts_pair.gather)
  merged = sq._merge_across_processes(parts[0])
  mu, sigma = merged.statistics()
  expected_mu, expected_sigma = metrics.compute_statistics(features)
  assert merged.count == 90
  np.testing.assert_allclose(mu, expected_mu, rtol=1e-12)
  np.testing.assert_allclose(sigma, expected_sigma, rtol=1e-12)
