"""Tests of ddpm_jax.evaluation.metrics: statistics, Frechet distance, Inception Score,
running statistics and the statistics file."""

import math
import warnings

import numpy as np
import pytest
import scipy.linalg

from ddpm_jax.evaluation import metrics


def _random_spd(rng: np.random.Generator, dim: int) -> np.ndarray:
  a = rng.normal(size=(dim, dim))
  return a @ a.T / dim + 0.1 * np.eye(dim)


def _reference_fid(mu1, sigma1, mu2, sigma2) -> float:
  """Independent formula: Tr (S1 S2)^(1/2) = sum_i sqrt(eig_i(S1^(1/2) S2 S1^(1/2)))."""
  w, v = np.linalg.eigh(sigma1)
  root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  eig = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
  tr_covmean = np.sum(np.sqrt(np.clip(eig, 0, None)))
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


class TestStatistics:
  def test_mean_and_unbiased_covariance(self):
    x = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    mu, sigma = metrics.compute_statistics(x)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    centred = x.astype(np.float64) - x.astype(np.float64).sum(0) / 50
    np.testing.assert_allclose(mu, x.astype(np.float64).sum(0) / 50, rtol=1e-12)
    np.testing.assert_allclose(sigma, centred.T @ centred / 49, rtol=1e-12)

  @pytest.mark.parametrize("shape", [(10,), (1, 5), (2, 3, 4)])
  def test_bad_shape(self, shape):
    with pytest.raises(ValueError, match="features"):
      metrics.compute_statistics(np.zeros(shape))


class TestFrechetDistance:
  def test_set_against_itself_is_zero(self):
    mu, sigma = metrics.compute_statistics(np.random.default_rng(1).normal(size=(400, 32)))
    assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-8

  def test_matches_eigenvalue_formula(self):
    rng = np.random.default_rng(2)
    a = rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12))
    b = rng.normal(loc=0.5, size=(200, 12)) * 2.0
    stats_a, stats_b = metrics.compute_statistics(a), metrics.compute_statistics(b)
    np.testing.assert_allclose(
      metrics.frechet_distance(*stats_a, *stats_b), _reference_fid(*stats_a, *stats_b), rtol=1e-9
    )

  def test_matches_direct_ttur_computation_on_random_features(self):
    # TTUR's calculate_frechet_distance written out with NumPy / SciPy on raw features.
    rng = np.random.default_rng(8)
    x = rng.normal(size=(500, 24)).astype(np.float32)
    y = (rng.normal(size=(400, 24)) @ rng.normal(size=(24, 24)) * 0.3 + 0.2).astype(np.float32)
    mu1, mu2 = x.astype(np.float64).mean(0), y.astype(np.float64).mean(0)
    s1, s2 = np.cov(x.astype(np.float64), rowvar=False), np.cov(y.astype(np.float64), rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    value = metrics.frechet_distance(*metrics.compute_statistics(x), *metrics.compute_statistics(y))
    np.testing.assert_allclose(value, expected, rtol=1e-10)
    assert value > 1.0

  def test_shifted_sample_set_is_squared_shift(self):
    # Shifting every feature by delta keeps the covariance: FID = ||delta||^2 exactly.
    rng = np.random.default_rng(9)
    x = rng.normal(size=(300, 10)) @ rng.normal(size=(10, 10))
    delta = rng.normal(size=10)
    value = metrics.frechet_distance(
      *metrics.compute_statistics(x), *metrics.compute_statistics(x + delta)
    )
    np.testing.assert_allclose(value, delta @ delta, rtol=1e-7)

  def test_shifted_gaussians_equal_covariance(self):
    rng = np.random.default_rng(3)
    sigma = _random_spd(rng, 16)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    np.testing.assert_allclose(
      metrics.frechet_distance(mu1, sigma, mu2, sigma), np.sum((mu1 - mu2) ** 2), rtol=1e-8
    )

  def test_diagonal_covariances(self):
    # For commuting (diagonal) covariances: sum_i (sqrt(a_i) - sqrt(b_i))^2.
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    mu = np.zeros(3)
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    np.testing.assert_allclose(
      metrics.frechet_distance(mu, np.diag(a), mu, np.diag(b)), expected, rtol=1e-12
    )

  def test_singular_product_uses_eps_offset(self):
    # [[0, 1], [0, 0]] has no square root: sqrtm is not finite, so eps*I is added.
    # sqrt((1+e) [[e, 1], [0, e]]) has trace 2 sqrt(e (1+e)), hence FID = 2 - 4 sqrt(e(1+e)).
    eps = 1e-6
    sigma1, sigma2, mu = np.array([[0.0, 1.0], [0.0, 0.0]]), np.eye(2), np.zeros(2)
    with pytest.warns(RuntimeWarning, match="singular"):
      value = metrics.frechet_distance(mu, sigma1, mu, sigma2, eps=eps)
    np.testing.assert_allclose(value, 2 - 4 * math.sqrt(eps * (1 + eps)), rtol=1e-9)

  def test_regular_product_does_not_warn(self):
    sigma = _random_spd(np.random.default_rng(4), 5)
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      metrics.frechet_distance(np.zeros(5), sigma, np.ones(5), 2 * sigma)

  def test_large_imaginary_part_raises(self):
    # A negative eigenvalue of the product gives sqrtm a diagonal imaginary part of 1.
    with pytest.raises(ValueError, match="imaginary"):
      metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([-1.0, 1.0]))

  @pytest.mark.parametrize(
    "mu2, sigma2",
    [(np.zeros(3), np.eye(3)), (np.zeros(2), np.eye(3)), (np.zeros(2), np.full((2, 2), np.nan))],
  )
  def test_bad_shapes_and_values(self, mu2, sigma2):
    with pytest.raises(ValueError):
      metrics.frechet_distance(np.zeros(2), np.eye(2), mu2, sigma2)


class TestInceptionScore:
  def test_uniform_logits_score_one(self):
    mean, std = metrics.inception_score(np.zeros((100, 1008)), num_splits=10)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)

  @pytest.mark.parametrize("confidence", [3.0, 200.0])
  def test_balanced_confident_logits(self, confidence):
    # Each split holds every class equally often, so p(y) is uniform and
    # IS = exp(log C - H(p(y|x))) = C exp(-H), with p(y|x) = softmax(confidence * onehot).
    num_classes, splits = 7, 5
    labels = np.tile(np.arange(num_classes), 3 * splits)
    logits = confidence * np.eye(num_classes)[labels]
    z = math.exp(confidence) + num_classes - 1
    p_top, p_rest = math.exp(confidence) / z, 1.0 / z
    entropy = -p_top * math.log(p_top) - (num_classes - 1) * p_rest * math.log(p_rest)
    mean, std = metrics.inception_score(logits, num_splits=splits)
    np.testing.assert_allclose(mean, num_classes * math.exp(-entropy), rtol=1e-10)
    assert std == pytest.approx(0.0, abs=1e-9)

  def test_matches_direct_openai_formula(self):
    logits = np.random.default_rng(5).normal(scale=3.0, size=(103, 20))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    scores = []
    for i in range(4):
      part = probs[i * 103 // 4 : (i + 1) * 103 // 4]
      kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
      scores.append(np.exp(kl.sum(1).mean()))
    mean, std = metrics.inception_score(logits, num_splits=4)
    np.testing.assert_allclose([mean, std], [np.mean(scores), np.std(scores)], rtol=1e-10)

  def test_sums_of_shares_in_any_order_merge_to_the_score_of_all(self):
    """Each process sums its examples (placed by global index, any order); the merged sums
    give the score of all logits at once."""
    logits = np.random.default_rng(8).normal(scale=4.0, size=(103, 12))
    order = np.random.default_rng(9).permutation(103)
    shares = [order[:40], order[40:41], order[41:]]
    merged = metrics.InceptionScoreSums(103, 10, 12)
    for share in shares:
      part = metrics.InceptionScoreSums(103, 10, 12)
      for chunk in np.array_split(share, 3):
        part.update(logits[chunk], chunk)
      merged.merge(part.sums)
    np.testing.assert_allclose(merged.score(), metrics.inception_score(logits, 10), rtol=1e-12)
    missing = metrics.InceptionScoreSums(103, 10, 12)
    missing.update(logits[:-1], np.arange(102))
    with pytest.raises(ValueError, match="each of the N examples exactly once"):
      missing.score()

  @pytest.mark.parametrize("splits", [0, 11])
  def test_bad_num_splits(self, splits):
    with pytest.raises(ValueError, match="num_splits"):
      metrics.inception_score(np.zeros((10, 3)), num_splits=splits)


def test_stats_round_trip(tmp_path):
  rng = np.random.default_rng(6)
  mu, sigma = rng.normal(size=8), _random_spd(rng, 8)
  path = str(tmp_path / "ref" / "cifar10_train.npz")
  metrics.save_stats(path, mu, sigma, {"dataset": "cifar10", "split": "train", "n": 50000})
  mu2, sigma2, meta = metrics.load_stats(path)
  np.testing.assert_array_equal(mu2, mu)
  np.testing.assert_array_equal(sigma2, sigma)
  assert meta == {"dataset": "cifar10", "split": "train", "n": 50000}
  with pytest.raises(FileNotFoundError):
    metrics.load_stats(str(tmp_path / "absent.npz"))


class TestRunningStatistics:
  @pytest.mark.parametrize("sizes", [(500,), (7, 0, 130, 1, 62), (1, 1, 1, 1)])
  def test_equals_statistics_of_all_features(self, sizes):
    rng = np.random.default_rng(10)
    x = (rng.normal(size=(sum(sizes), 6)) @ rng.normal(size=(6, 6)) + 100.0).astype(np.float32)
    running = metrics.RunningStatistics(6)
    for part in np.split(x, np.cumsum(sizes)[:-1]):
      running.update(part)
    mu, sigma = running.statistics()
    expected_mu, expected_sigma = metrics.compute_statistics(x)
    assert running.count == x.shape[0]
    np.testing.assert_allclose(mu, expected_mu, rtol=1e-12)
    np.testing.assert_allclose(sigma, expected_sigma, rtol=1e-9, atol=1e-12)

  def test_bad_input(self):
    running = metrics.RunningStatistics(3)
    with pytest.raises(ValueError, match="shape"):
      running.update(np.zeros((4, 2)))
    running.update(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="at least 2"):
      running.statistics()
