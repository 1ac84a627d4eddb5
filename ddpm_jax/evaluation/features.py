"""The feature-extractor interface of FID / IS: any network mapping uint8 images to
(features, logits or None), jitted once and run in fixed-size batches sharded over the
local devices; `sample_statistics`, which streams images into the statistics FID and IS
are computed from; and `variables_fingerprint`, which identifies network weights in cache
keys.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ddpm_jax.evaluation import metrics

# (variables, uint8 images [B, H, W, C]) -> (features [B, D], logits [B, K] or None).
ApplyFn = Callable[[Any, jax.Array], tuple[jax.Array, jax.Array | None]]


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
        f"{self.name} needs images of size {tuple(self.image_hw)}, got {tuple(shape[1:3])}"
      )
    if shape[3] not in self.channels:
      raise ValueError(f"{self.name} accepts {self.channels} channels, got {shape[3]}")

  def num_logits(self, image_shape: tuple[int, ...]) -> int | None:
    """K of the logits for images of shape [H, W, C] (traced, not run), or None."""
    if self.logits_name is None:
      return None
    images = jax.ShapeDtypeStruct((1,) + tuple(image_shape), np.uint8)
    _, logits = jax.eval_shape(self.apply_fn, self.variables, images)
    return None if logits is None else int(logits.shape[-1])

  def __call__(self, images: np.ndarray) -> tuple[jax.Array, jax.Array | None]:
    """Runs the network on one batch, on the default device (no batching, no jit)."""
    self.check_images(np.shape(images))
    return self.apply_fn(self.variables, images)


def _check_batch_size(batch_size: Any) -> int:
  if (
    isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1
  ):
    raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
  return int(batch_size)


def iterate_features(
  extractor: FeatureExtractor, chunks: Iterable[np.ndarray], batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
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
        raise ValueError(
          f"{extractor.name} returns features of shape {out[0].shape}, "
          f"expected {(padded, extractor.feature_dim)}"
        )
      apply = jax.jit(
        extractor.apply_fn, in_shardings=(replicated, batch_sharding), out_shardings=batch_sharding
      )
      variables = jax.device_put(extractor.variables, replicated)
    if count < padded:
      chunk = np.concatenate([chunk, np.zeros((padded - count,) + chunk.shape[1:], np.uint8)])
    result = apply(variables, jax.device_put(chunk, batch_sharding))
    if pending is not None:
      yield fetch(*pending)
    pending = (result, count)
  if pending is not None:
    yield fetch(*pending)


def extract_features(
  extractor: FeatureExtractor, images_uint8: np.ndarray, batch_size: int = 500
) -> tuple[np.ndarray, np.ndarray | None]:
  """Features (and logits) of all images [N, H, W, C], in batches of `batch_size`.

  `images_uint8` may be any indexable uint8 array (e.g. a np.memmap of samples.npz); one
  batch at a time is copied to the devices.

  Returns:
    features float32 [N, D] and logits float32 [N, K] (None if the network has none).
  """
  if getattr(images_uint8, "dtype", None) != np.uint8:
    raise ValueError(
      f"images must be uint8 (quantized samples), got {getattr(images_uint8, 'dtype', None)}"
    )
  extractor.check_images(images_uint8.shape)
  batch_size = _check_batch_size(batch_size)
  num = images_uint8.shape[0]
  if num == 0:
    raise ValueError("images must contain at least one image, got N=0")
  chunks = (images_uint8[start : start + batch_size] for start in range(0, num, batch_size))
  results = list(iterate_features(extractor, chunks, batch_size))
  features = np.concatenate([f for f, _ in results])
  logits = None if results[0][1] is None else np.concatenate([lg for _, lg in results])
  return features, logits


class Progress:
  """A `progress` callback that logs "<label>: <done>[/<total>] images, <rate> images/s"
  through ``log`` at most once every ``every_s`` seconds."""

  def __init__(
    self, label: str, log: Callable[[str], Any], *, total: int | None = None, every_s: float = 30.0
  ):
    self.label, self.log, self.total, self.every_s = label, log, total, every_s
    self.started = self.last = time.monotonic()

  def __call__(self, done: int) -> None:
    now = time.monotonic()
    if now - self.last >= self.every_s:
      self.last = now
      of = "" if self.total is None else f"/{self.total}"
      self.log(f"{self.label}: {done}{of} images, {done / (now - self.started):.1f} images/s")


def sample_statistics(
  extractor: FeatureExtractor,
  chunks: Iterable[tuple[np.ndarray, np.ndarray]],
  batch_size: int,
  *,
  image_shape: tuple[int, ...],
  num_samples: int,
  num_splits: int,
  progress: Callable[[int], None] | None = None,
) -> tuple[metrics.RunningStatistics, metrics.InceptionScoreSums | None]:
  """The FID statistics and Inception Score sums of images streamed through `extractor`.

  `chunks` yields (global indices int64 [n], uint8 images [n, H, W, C]) in any order and of
  any size (each is cut into batches of `batch_size`); the indices, in [0, num_samples),
  place each image's logits in its Inception Score part. Neither the images, nor the
  features, nor the logits are kept: the result merges across processes (a process may
  have seen only its share, or nothing). `progress` is called with the count so far after
  each batch.
  """
  running = metrics.RunningStatistics(extractor.feature_dim)
  num_logits = extractor.num_logits(image_shape)
  scores = (
    None if num_logits is None else metrics.InceptionScoreSums(num_samples, num_splits, num_logits)
  )
  pending: collections.deque = collections.deque()

  def images() -> Iterator[np.ndarray]:
    for indices, batch in chunks:
      for start in range(0, len(indices), batch_size):
        pending.append(indices[start : start + batch_size])
        yield batch[start : start + batch_size]

  for features, logits in iterate_features(extractor, images(), batch_size):
    indices = pending.popleft()
    running.update(features)
    if scores is not None:
      scores.update(logits, indices)
    if progress is not None:
      progress(running.count)
  return running, scores
