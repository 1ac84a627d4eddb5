"""Frechet Inception Distance, Inception Score and the feature-extractor interface.

The paper reports FID and IS on 50,000 samples (Ho et al. 2020, App. B), computed with the
original TTUR (FID, Heusel et al. 2017) and OpenAI (IS, Salimans et al. 2016) code on the
pool3 features / 1008-way logits of the Inception 2015-12-05 network; samples are quantized
to uint8 first. This module holds the network-independent parts:

* `compute_statistics` / `RunningStatistics` / `frechet_distance`: Gaussian statistics of
  features (at once, or streamed batch by batch) and the Frechet distance between two
  Gaussians, in float64 with `scipy.linalg.sqrtm` as TTUR.
* `inception_score`: exp(E_x KL(p(y|x) || p(y))) averaged over splits, as the OpenAI code.
* `save_stats` / `load_stats`: cached statistics (.npz) with a JSON meta record;
  `variables_fingerprint` identifies network weights in cache keys.
* `FeatureExtractor`, `iterate_features` and `extract_features`: any network mapping uint8
  images to (features, logits or None), jitted once and run in fixed-size batches sharded
  over the local devices.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
import scipy.linalg
import scipy.special
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# (variables, uint8 images [B, H, W, C]) -> (features [B, D], logits [B, K] or None).
ApplyFn = Callable[[Any, jax.Array], tuple[jax.Array, jax.Array | None]]


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
        f"mu{which} must be [D] and sigma{which} [D, D], got {mu.shape} and {sigma.shape}")
  if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
    raise ValueError(f"mu{which} and sigma{which} must be finite")


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
  # Singular products are handled by the caller (eps offset), so scipy's warning is noise.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    return scipy.linalg.sqrtm(matrix)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray, *, eps: float = 1e-6,
                     imag_tol: float = 1e-3) -> float:
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
        RuntimeWarning, stacklevel=2)
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0.0, atol=imag_tol):
      raise ValueError(
          f"sqrtm(sigma1 sigma2) has imaginary part {np.max(np.abs(covmean.imag)):.3g} "
          f"> {imag_tol}; are both covariances positive semi-definite?")
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def inception_score(logits: np.ndarray, num_splits: int = 10) -> tuple[float, float]:
  """Inception Score (Salimans et al. 2016) from logits [N, C], as the OpenAI code.

  p(y|x) = softmax(logits) over all C classes (1008 for the Inception network); the N
  examples are cut into `num_splits` consecutive parts (part i: [i N // s, (i+1) N // s)),
  and for each part IS = exp(mean_x KL(p(y|x) || p(y))) with p(y) the part's mean of
  p(y|x). Returns the mean and the (population) standard deviation over parts. Computed in
  float64 through log-softmax, so underflowing probabilities contribute 0, not NaN.
  """
  logits = np.asarray(logits)
  if logits.ndim != 2:
    raise ValueError(f"logits must have shape [N, C], got {logits.shape}")
  if not 1 <= num_splits <= logits.shape[0]:
    raise ValueError(f"num_splits must be in [1, N={logits.shape[0]}], got {num_splits}")
  log_p = scipy.special.log_softmax(logits.astype(np.float64), axis=1)
  n = log_p.shape[0]
  scores = []
  for i in range(num_splits):
    part = log_p[i * n // num_splits:(i + 1) * n // num_splits]
    log_py = scipy.special.logsumexp(part, axis=0) - math.log(part.shape[0])
    kl = np.sum(np.exp(part) * (part - log_py[None, :]), axis=1)
    scores.append(math.exp(float(np.mean(kl))))
  return float(np.mean(scores)), float(np.std(scores))


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
      raise ValueError(f"features must have shape [B, {self.mean.shape[0]}], "
                       f"got {features.shape}")
    if features.shape[0]:
      mean = features.mean(axis=0)
      centred = features - mean
      self.merge(features.shape[0], mean, centred.T @ centred)

  def statistics(self) -> tuple[np.ndarray, np.ndarray]:
    """(mu [D], sigma [D, D]) with the N-1 divisor, as `compute_statistics`."""
    if self.count < 2:
      raise ValueError(f"statistics need at least 2 features, got {self.count}")
    return self.mean.copy(), self.m2 / (self.count - 1)


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray,
               meta: Mapping[str, Any] | None = None) -> None:
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


def variables_fingerprint(variables: Any) -> str:
  """First 12 hex digits of a sha256 over a pytree's leaf paths, dtypes, shapes and bytes.

  Any change to any weight changes it, so caches keyed on it never serve statistics of
  another network.
  """
  digest = hashlib.sha256()
  leaves, _ = jax.tree_util.tree_flatten_with_path(variables)
  for path, leaf in leaves:
    array = np.ascontiguousarray(jax.device_get(leaf))
    digest.update(f"{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape};".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()[:12]


@dataclasses.dataclass(frozen=True)
class FeatureExtractor:
  """A feature network: uint8 images [B, H, W, C] -> (features [B, D], logits or None).

  Attributes:
    name: identifies the network in evaluation records (fid.json) and cache keys; a
      change of the network's code must come with a new name.
    apply_fn: pure function (variables, uint8 images) -> (features, logits or None);
      jitted and sharded over devices by `iterate_features`.
    variables: the network's weights, passed to `apply_fn`.
    feature_dim: D.
    image_hw: required (H, W) of the inputs, or None when any size is accepted.
    channels: accepted channel counts C.
    logits_name: what the logits are (for the Inception Score record), or None.
    info: extra facts for evaluation records (e.g. the classifier's test accuracy).
  """
  name: str
  apply_fn: ApplyFn
  variables: Any
  feature_dim: int
  image_hw: tuple[int, int] | None = None
  channels: tuple[int, ...] = (1, 3)
  logits_name: str | None = None
  info: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def check_images(self, shape: tuple[int, ...]) -> None:
    """Raises ValueError unless `shape` is a batch of images this network accepts."""
    if len(shape) != 4:
      raise ValueError(f"images must have shape [N, H, W, C], got {tuple(shape)}")
    if self.image_hw is not None and tuple(shape[1:3]) != tuple(self.image_hw):
      raise ValueError(
          f"{self.name} needs images of size {tuple(self.image_hw)}, got {tuple(shape[1:3])}")
    if shape[3] not in self.channels:
      raise ValueError(f"{self.name} accepts {self.channels} channels, got {shape[3]}")

  def __call__(self, images: np.ndarray) -> tuple[jax.Array, jax.Array | None]:
    """Runs the network on one batch, on the default device (no batching, no jit)."""
    self.check_images(np.shape(images))
    return self.apply_fn(self.variables, images)


def _check_batch_size(batch_size: Any) -> int:
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
      or batch_size < 1:
    raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
  return int(batch_size)


def iterate_features(extractor: FeatureExtractor, chunks: Iterable[np.ndarray],
                     batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
  """Runs `extractor` on each uint8 chunk [n <= batch_size, H, W, C] of `chunks`.

  Every chunk is zero-padded to one batch shape (batch_size rounded up to a multiple of the
  local device count), so the network compiles once; the batch is sharded over the local
  devices and the padding dropped. Chunk i+1 is dispatched before chunk i's results are
  fetched, so host transfers overlap compute. Yields float32 (features [n, D], logits
  [n, K] or None) per chunk.
  """
  batch_size = _check_batch_size(batch_size)
  devices = jax.local_devices()
  padded = -(-batch_size // len(devices)) * len(devices)
  mesh = Mesh(np.array(devices), ("batch",))
  batch_sharding = NamedSharding(mesh, PartitionSpec("batch"))
  replicated = NamedSharding(mesh, PartitionSpec())
  apply, variables, pending = None, None, None

  def fetch(result: tuple[jax.Array, jax.Array | None], count: int):
    logits = None if result[1] is None else np.asarray(result[1], np.float32)[:count]
    return np.asarray(result[0], np.float32)[:count], logits

  for chunk in chunks:
    chunk = np.asarray(chunk)
    if chunk.dtype != np.uint8:
      raise ValueError(f"images must be uint8 (quantized samples), got {chunk.dtype}")
    extractor.check_images(chunk.shape)
    count = chunk.shape[0]
    if count > batch_size:
      raise ValueError(f"a chunk of {count} images exceeds batch_size={batch_size}")
    if apply is None:  # Compile for the first chunk's image shape.
      batch_shape = jax.ShapeDtypeStruct((padded,) + chunk.shape[1:], np.uint8)
      out = jax.eval_shape(extractor.apply_fn, extractor.variables, batch_shape)
      if out[0].shape != (padded, extractor.feature_dim):
        raise ValueError(f"{extractor.name} returns features of shape {out[0].shape}, "
                         f"expected {(padded, extractor.feature_dim)}")
      apply = jax.jit(extractor.apply_fn, in_shardings=(replicated, batch_sharding),
                      out_shardings=batch_sharding)
      variables = jax.device_put(extractor.variables, replicated)
    if count < padded:
      chunk = np.concatenate([chunk, np.zeros((padded - count,) + chunk.shape[1:], np.uint8)])
    result = apply(variables, jax.device_put(chunk, batch_sharding))
    if pending is not None:
      yield fetch(*pending)
    pending = (result, count)
  if pending is not None:
    yield fetch(*pending)


def extract_features(extractor: FeatureExtractor, images_uint8: np.ndarray,
                     batch_size: int = 500) -> tuple[np.ndarray, np.ndarray | None]:
  """Features (and logits) of all images [N, H, W, C], in batches of `batch_size`.

  `images_uint8` may be any indexable uint8 array (e.g. a np.memmap of samples.npz); one
  batch at a time is copied to the devices.

  Returns:
    features float32 [N, D] and logits float32 [N, K] (None if the network has none).
  """
  if getattr(images_uint8, "dtype", None) != np.uint8:
    raise ValueError(
        f"images must be uint8 (quantized samples), got {getattr(images_uint8, 'dtype', None)}")
  extractor.check_images(images_uint8.shape)
  batch_size = _check_batch_size(batch_size)
  num = images_uint8.shape[0]
  if num == 0:
    raise ValueError("images must contain at least one image, got N=0")
  chunks = (images_uint8[start:start + batch_size] for start in range(0, num, batch_size))
  results = list(iterate_features(extractor, chunks, batch_size))
  features = np.concatenate([f for f, _ in results])
  logits = None if results[0][1] is None else np.concatenate([l for _, l in results])
  return features, logits
