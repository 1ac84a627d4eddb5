"""Frechet Inception Distance, Inception Score and feature statistics.

The paper reports FID and IS on 50,000 samples (Ho et al. 2020, App. B), computed with the
original TTUR (FID, Heusel et al. 2017) and OpenAI (IS, Salimans et al. 2016) code on the
pool3 features / 1008-way logits of the Inception 2015-12-05 network; samples are quantized
to uint8 first. This module holds the network-independent metrics:

* `compute_statistics` / `RunningStatistics` / `frechet_distance`: Gaussian statistics of
  features (at once, or streamed batch by batch) and the Frechet distance between two
  Gaussians, in float64 with `scipy.linalg.sqrtm` as TTUR.
* `inception_score` / `InceptionScoreSums`: exp(E_x KL(p(y|x) || p(y))) averaged over
  splits, as the OpenAI code, from per-split sums that merge across processes.
* `save_stats` / `load_stats`: cached statistics (.npz) with a JSON meta record.

The networks that produce the features are run by features.py.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import scipy.linalg
import scipy.special


def compute_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and covariance of features [N, D], in float64 (as TTUR: np.cov, N-1 divisor)."""
  features = np.asarray(features)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"features must have shape [N >= 2, D], got {features.shape}")
  features = features.astype(np.float64)
  mu = features.mean(axis=0)
  sigma = np.cov(features, rowvar=False)
  return mu, np.atleast_2d(sigma)


def _check_gaussian(mu: np.ndarray, sigma: np.ndarray, which: str) -> None:
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(
      f"mu{which} must be [D] and sigma{which} [D, D], got {mu.shape} and {sigma.shape}"
    )
  if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
    raise ValueError(f"mu{which} and sigma{which} must be finite")


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
  # Singular products are handled by the caller (eps offset), so scipy's warning is noise.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    return scipy.linalg.sqrtm(matrix)


def frechet_distance(
  mu1: np.ndarray,
  sigma1: np.ndarray,
  mu2: np.ndarray,
  sigma2: np.ndarray,
  *,
  eps: float = 1e-6,
  imag_tol: float = 1e-3,
) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, eq. 6).

  d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), in float64. As in
  TTUR: if sqrtm of the product is not finite (near-singular product), `eps` * I is added to
  both covariances and the square root recomputed; a complex result whose diagonal has
  imaginary parts above `imag_tol` raises ValueError, a smaller one is dropped.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  _check_gaussian(mu1, sigma1, "1")
  _check_gaussian(mu2, sigma2, "2")
  if mu1.shape != mu2.shape:
    raise ValueError(f"mu1 and mu2 differ in dimension: {mu1.shape} vs {mu2.shape}")
  if eps < 0:
    raise ValueError(f"eps must be >= 0, got {eps}")

  diff = mu1 - mu2
  covmean = _sqrtm(sigma1 @ sigma2)
  if not np.all(np.isfinite(covmean)):
    warnings.warn(
      f"frechet_distance: singular covariance product; adding {eps} to the diagonals",
      RuntimeWarning,
      stacklevel=2,
    )
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0.0, atol=imag_tol):
      raise ValueError(
        f"sqrtm(sigma1 sigma2) has imaginary part {np.max(np.abs(covmean.imag)):.3g} "
        f"> {imag_tol}; are both covariances positive semi-definite?"
      )
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def inception_score_parts(indices: np.ndarray, num_examples: int, num_splits: int) -> np.ndarray:
  """The Inception Score part of each global example index: as the OpenAI code, part i of
  N examples cut into `num_splits` consecutive parts holds indices [i N // s, (i+1) N // s)."""
  bounds = np.arange(1, num_splits, dtype=np.int64) * num_examples // num_splits
  return np.searchsorted(bounds, np.asarray(indices, np.int64), side="right")


class InceptionScoreSums:
  """The Inception Score (Salimans et al. 2016) of N examples from sums over each part.

  For a part with n examples, mean_x KL(p(y|x) || p(y)) = (1/n) sum_x sum_y p(y|x) log
  p(y|x) - sum_y p(y) log p(y), with p(y) = (1/n) sum_x p(y|x). So per part three sums
  suffice: n, sum_x of the negative entropy of p(y|x), and sum_x p(y|x) [C]. They add up
  in any order of the examples (each example is placed by its global index) and across
  processes (`merge`), so the logits of N examples never have to be in one place; the
  score equals that of all logits at once up to float64 rounding.
  """

  def __init__(self, num_examples: int, num_splits: int, num_classes: int):
    if not 1 <= num_splits <= num_examples:
      raise ValueError(f"num_splits must be in [1, N={num_examples}], got {num_splits}")
    self.num_examples, self.num_splits = int(num_examples), int(num_splits)
    # Columns: count, sum of sum_y p log p, then sum of p(y|x) per class.
    self.sums = np.zeros((num_splits, num_classes + 2), np.float64)

  def update(self, logits: np.ndarray, indices: np.ndarray) -> None:
    """Adds examples with logits [B, C] and global indices [B] in [0, N)."""
    logits, indices = np.asarray(logits), np.asarray(indices, np.int64)
    if logits.ndim != 2 or logits.shape != (indices.shape[0], self.sums.shape[1] - 2):
      raise ValueError(
        f"logits must have shape [B, {self.sums.shape[1] - 2}] for indices "
        f"[B], got {logits.shape} and {indices.shape}"
      )
    if indices.size and (indices.min() < 0 or indices.max() >= self.num_examples):
      raise ValueError(f"indices must lie in [0, {self.num_examples})")
    log_p = scipy.special.log_softmax(logits.astype(np.float64), axis=1)
    p = np.exp(log_p)
    neg_entropy = np.sum(np.where(p > 0, p * log_p, 0.0), axis=1)
    parts = inception_score_parts(indices, self.num_examples, self.num_splits)
    for part in np.unique(parts):
      rows = parts == part
      self.sums[part, 0] += rows.sum()
      self.sums[part, 1] += neg_entropy[rows].sum()
      self.sums[part, 2:] += p[rows].sum(axis=0)

  def merge(self, sums: np.ndarray) -> None:
    """Adds the `sums` of another set of examples (another process's share)."""
    self.sums += np.asarray(sums, np.float64)

  def score(self) -> tuple[float, float]:
    """(mean, population std) over the parts of exp(mean_x KL(p(y|x) || p(y)))."""
    counts = self.sums[:, 0]
    expected = np.diff(np.arange(self.num_splits + 1) * self.num_examples // self.num_splits)
    if not np.array_equal(counts, expected):
      raise ValueError(
        f"the parts hold {counts.astype(int).tolist()} examples, expected "
        f"{expected.tolist()}: each of the N examples exactly once"
      )
    p_y = self.sums[:, 2:] / counts[:, None]
    kl = self.sums[:, 1] / counts - np.sum(scipy.special.xlogy(p_y, p_y), axis=1)
    scores = np.exp(kl)
    return float(np.mean(scores)), float(np.std(scores))


def inception_score(logits: np.ndarray, num_splits: int = 10) -> tuple[float, float]:
  """Inception Score (Salimans et al. 2016) from logits [N, C], as the OpenAI code.

  p(y|x) = softmax(logits) over all C classes (1008 for the Inception network); the N
  examples are cut into `num_splits` consecutive parts (part i: [i N // s, (i+1) N // s)),
  and for each part IS = exp(mean_x KL(p(y|x) || p(y))) with p(y) the part's mean of
  p(y|x). Returns the mean and the (population) standard deviation over parts, computed
  in float64 by `InceptionScoreSums`.
  """
  logits = np.asarray(logits)
  if logits.ndim != 2:
    raise ValueError(f"logits must have shape [N, C], got {logits.shape}")
  sums = InceptionScoreSums(logits.shape[0], num_splits, logits.shape[1])
  sums.update(logits, np.arange(logits.shape[0]))
  return sums.score()


class RunningStatistics:
  """Mean and covariance of features streamed in batches, in float64.

  Batches are merged with the pairwise update of Chan et al. (1979): mean and the
  centred sum of outer products M2 are combined exactly, so the result equals
  `compute_statistics` of all features at once (up to float64 rounding) without holding
  them in memory (a 3M-image LSUN split has 24 GB of pool3 features).
  """

  def __init__(self, dim: int):
    if dim < 1:
      raise ValueError(f"dim must be >= 1, got {dim}")
    self.count = 0
    self.mean = np.zeros(dim, np.float64)
    self.m2 = np.zeros((dim, dim), np.float64)

  def merge(self, count: int, mean: np.ndarray, m2: np.ndarray) -> None:
    """Adds a set of `count` features with mean `mean` [D] and centred M2 [D, D]."""
    if count == 0:
      return
    total = self.count + count
    delta = np.asarray(mean, np.float64) - self.mean
    self.m2 += m2 + np.outer(delta, delta) * (self.count * count / total)
    self.mean += delta * (count / total)
    self.count = total

  def update(self, features: np.ndarray) -> None:
    """Adds features [B, D] (B may be 0)."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[1] != self.mean.shape[0]:
      raise ValueError(f"features must have shape [B, {self.mean.shape[0]}], got {features.shape}")
    if features.shape[0]:
      mean = features.mean(axis=0)
      centred = features - mean
      self.merge(features.shape[0], mean, centred.T @ centred)

  def statistics(self) -> tuple[np.ndarray, np.ndarray]:
    """(mu [D], sigma [D, D]) with the N-1 divisor, as `compute_statistics`."""
    if self.count < 2:
      raise ValueError(f"statistics need at least 2 features, got {self.count}")
    return self.mean.copy(), self.m2 / (self.count - 1)


def save_stats(
  path: str, mu: np.ndarray, sigma: np.ndarray, meta: Mapping[str, Any] | None = None
) -> None:
  """Writes statistics (float64 mu [D], sigma [D, D]) and a JSON meta record, atomically."""
  mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
  _check_gaussian(mu, sigma, "")
  meta_json = json.dumps(dict(meta or {}), sort_keys=True)
  directory = os.path.dirname(path)
  if directory:
    os.makedirs(directory, exist_ok=True)
  tmp_path = f"{path}.tmp{os.getpid()}.npz"
  np.savez(tmp_path, mu=mu, sigma=sigma, meta=np.array(meta_json))
  os.replace(tmp_path, path)


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
  """Reads statistics written by `save_stats`: (mu, sigma, meta)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"no statistics file at {path!r}")
  with np.load(path, allow_pickle=False) as data:
    missing = {"mu", "sigma", "meta"} - set(data.files)
    if missing:
      raise ValueError(f"{path!r} is not a statistics file: missing keys {sorted(missing)}")
    mu, sigma, meta = data["mu"], data["sigma"], json.loads(str(data["meta"]))
  _check_gaussian(mu, sigma, "")
  return mu, sigma, meta
