"""Training and evaluation data for DDPM: datasets -> per-device uint8 batches.

Batches are uint8 [local_devices, per_device_batch, H, W, C] (what `jax.pmap` consumes);
`to_model_input` maps them to [-1, 1] on device (Ho et al. 2020, §3.3: integers 0..255
scaled linearly, no dequantization). Training batch `step` covers positions
[step*B, (step+1)*B) of an endless stream of seeded epoch permutations, so it and its random
horizontal flips (the paper's only augmentation, App. B) are pure functions of (seed, step)
and a resumed run sees exactly the batches of an uninterrupted one. Each process takes its
contiguous slice of the global batch.

Sources (read by `data_sources`): small tfds datasets (cifar10, fashion_mnist) are held in
host memory; large ones (celeb_a_hq/256, lsun/*) stream through tf.data with a per-epoch
seeded shuffle of each process's part; "fashion_mnist_files" parses Debian's
dataset-fashion-mnist idx files; "synthetic" needs no files. Only the tfds sources import
TensorFlow.
"""

from __future__ import annotations

import collections
import itertools
import os
import re
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import data_sources
# Re-exported: the readers' public names stay importable from here.
from ddpm_jax.data_sources import (  # pylint: disable=unused-import
    FASHION_MNIST_DIR, FASHION_MNIST_FILES, SYNTHETIC_NUM_EXAMPLES, center_crop_and_resize,
    read_idx_images)
from ddpm_jax.data_sources import APT_HINT, ArraySource, array_source

DATASETS: tuple[str, ...] = (
    "cifar10", "celeb_a_hq/256", "lsun/church_outdoor", "lsun/bedroom", "lsun/cat",
    "fashion_mnist", "fashion_mnist_files", "synthetic")
_IN_MEMORY_TFDS = ("cifar10", "fashion_mnist")
_STREAMED_TFDS = ("celeb_a_hq/256", "lsun/church_outdoor", "lsun/bedroom", "lsun/cat")
# (image_size, num_channels) of datasets served at their native shape only. LSUN images have
# varying sizes and are always cropped and resized, so any image_size works (3 channels).
_NATIVE_SHAPES = {"cifar10": (32, 3), "fashion_mnist": (28, 1), "fashion_mnist_files": (28, 1),
                  "celeb_a_hq/256": (256, 3)}
_SPLITS = {"cifar10": ("train", "test"), "fashion_mnist": ("train", "test"),
           "fashion_mnist_files": ("train", "test"), "celeb_a_hq/256": ("train",),
           "lsun/church_outdoor": ("train", "validation"), "lsun/bedroom": ("train", "validation"),
           "lsun/cat": ("train",), "synthetic": ("train", "test")}
# Tags that keep the independent random streams drawn from one user seed apart (the
# synthetic source uses 4, see data_sources).
_PERM_TAG, _FLIP_TAG, _SHUFFLE_TAG = 1, 2, 3


def _int_at_least(value: Any, name: str, minimum: int = 1) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    raise ValueError(f"{name}={value!r} must be {what}")
  return int(value)


def _check_split(dataset: str, split: str, field: str) -> None:
  """Allowed: a split name of the dataset; tfds sources also take a slice like train[:1000]."""
  allowed = _SPLITS[dataset]
  tfds_source = dataset in _IN_MEMORY_TFDS + _STREAMED_TFDS
  match = re.fullmatch(r"([A-Za-z_]+)(\[[^\]]*\])?", split) if isinstance(split, str) else None
  if match is None or match.group(1) not in allowed or (match.group(2) and not tfds_source):
    how = " (optionally sliced, e.g. train[:1000])" if tfds_source else ""
    raise ValueError(f"{field}={split!r} is not a split of {dataset!r}; allowed: "
                     f"{', '.join(allowed)}{how}")


def validate_data_config(data_config) -> None:
  """Checks config.data cheaply (names, shapes, folders exist); reads no data.

  Raises:
    ValueError: one line naming the bad field value and what is allowed.
  """
  dataset = data_config.dataset
  if dataset not in DATASETS:
    raise ValueError(f"data.dataset={dataset!r} is unknown; allowed: {', '.join(DATASETS)}")
  size = _int_at_least(data_config.image_size, "data.image_size")
  channels = _int_at_least(data_config.num_channels, "data.num_channels")
  if dataset in _NATIVE_SHAPES and (size, channels) != _NATIVE_SHAPES[dataset]:
    want_size, want_channels = _NATIVE_SHAPES[dataset]
    raise ValueError(f"data.image_size={size}, data.num_channels={channels} do not match "
                     f"{dataset!r}, which is {want_size}x{want_size}x{want_channels}")
  if dataset.startswith("lsun/") and channels != 3:
    raise ValueError(f"data.num_channels={channels} but {dataset!r} images have 3 channels")
  if dataset in _STREAMED_TFDS:
    _int_at_least(getattr(data_config, "shuffle_buffer", 1), "data.shuffle_buffer")
  for field in ("train_split", "eval_split"):
    _check_split(dataset, getattr(data_config, field), f"data.{field}")
  data_dir = data_config.data_dir
  if data_dir and "://" not in data_dir and not os.path.isdir(data_dir):
    hint = f"; it should hold the idx files ({APT_HINT})" if "files" in dataset else ""
    raise ValueError(f"data.data_dir={data_dir!r} is not an existing folder{hint}")
  if dataset == "fashion_mnist_files" and data_dir:  # No tfds fallback with an explicit folder.
    for split in (data_config.train_split, data_config.eval_split):
      path = data_sources.fashion_mnist_path(data_dir, split)
      if not os.path.isfile(path):
        raise ValueError(f"Fashion-MNIST file {path} not found in data.data_dir; {APT_HINT} "
                         f"(files under {data_sources.FASHION_MNIST_DIR}) or point "
                         "data.data_dir at them")


def _per_device_batch(global_batch_size: int) -> tuple[int, int]:
  """Returns (process-local batch, per-device batch); ValueError if not divisible."""
  global_batch_size = _int_at_least(global_batch_size, "global_batch_size")
  processes, local = jax.process_count(), jax.local_device_count()
  if global_batch_size % (processes * local):
    raise ValueError(f"global_batch_size={global_batch_size} is not divisible by the "
                     f"{processes * local} devices ({processes} processes x {local} local)")
  return global_batch_size // processes, global_batch_size // (processes * local)


def _flip(images: np.ndarray, flips: np.ndarray) -> np.ndarray:
  """Mirrors images[i] left-right where flips[i]; in place when the array is writeable."""
  out = images if images.flags.writeable else images.copy()
  out[flips] = out[flips, :, ::-1]
  return out


def _train_flips(seed: int, step: int, global_batch: int, local_batch: int) -> np.ndarray:
  """This process's slice of the flip decisions of global batch `step`."""
  flips = np.random.default_rng((seed, _FLIP_TAG, step)).random(global_batch) < 0.5
  start = jax.process_index() * local_batch
  return flips[start:start + local_batch]


def _in_memory_train(source: ArraySource, global_batch: int, local_batch: int, seed: int,
                     start_step: int, flip: bool) -> Iterator[np.ndarray]:
  """Global batch `step` = positions [step*B, (step+1)*B) of the epoch permutations."""
  n, start = source.num_examples, jax.process_index() * local_batch
  perms: dict[int, np.ndarray] = {}
  for step in itertools.count(start_step):
    positions = np.arange(step * global_batch, (step + 1) * global_batch, dtype=np.int64)
    positions = positions[start:start + local_batch]
    epochs, offsets = np.divmod(positions, n)
    indices = np.empty_like(positions)
    for epoch in np.unique(epochs):
      if epoch not in perms:
        perms = {e: p for e, p in perms.items() if e >= epoch - 1}  # Keep memory bounded.
        perms[epoch] = np.random.default_rng((seed, _PERM_TAG, int(epoch))).permutation(n)
      indices[epochs == epoch] = perms[epoch][offsets[epochs == epoch]]
    images = source.gather(indices)
    yield _flip(images, _train_flips(seed, step, global_batch, local_batch)) if flip else images


def _streamed_train(data_config, global_batch: int, local_batch: int, seed: int,
                    start_step: int, flip: bool) -> Iterator[np.ndarray]:
  """Each process streams its shard: epoch e is the shard shuffled with a seed from (seed, e).

  This process's batch `step` covers positions [step*B_local, (step+1)*B_local) of the
  concatenated epochs, so resuming skips (undecoded) examples to that offset.
  """
  tf, tfds, encoded, decode = data_sources.tfds_stream(data_config, data_config.train_split,
                                                      per_process=True)
  n = int(encoded.cardinality())
  if n < 0:  # Unknown: count the (still encoded) examples once.
    n = int(encoded.reduce(tf.constant(0, tf.int64), lambda count, _: count + 1))
  if n == 0:
    raise ValueError(f"split {data_config.train_split!r} of {data_config.dataset} is empty")
  buffer = int(getattr(data_config, "shuffle_buffer", 50_000))

  def epoch_batches(epoch: int, skip: int):
    shuffle_seed = int(np.random.default_rng((seed, _SHUFFLE_TAG, epoch)).integers(2**31 - 1))
    ds = encoded.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=False).skip(skip)
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE).batch(local_batch)
    return tfds.as_numpy(ds.prefetch(tf.data.AUTOTUNE))

  def generate() -> Iterator[np.ndarray]:
    epoch, skip = divmod(start_step * local_batch, n)
    step, pending = start_step, None
    while True:
      for batch in epoch_batches(epoch, skip):
        pending = batch if pending is None else np.concatenate([pending, batch])
        while len(pending) >= local_batch:
          images, pending = pending[:local_batch], pending[local_batch:]
          if flip:
            images = _flip(images, _train_flips(seed, step, global_batch, local_batch))
          yield images
          step += 1
      epoch, skip = epoch + 1, 0

  return generate()


def create_train_iterator(data_config, *, global_batch_size: int, seed: int,
                          start_step: int = 0, random_flip: bool | None = None
                          ) -> Iterator[np.ndarray]:
  """Endless training batches, uint8 [local_devices, per_device_batch, H, W, C].

  Batch number `step` (and its flips) depends only on (seed, step), so `start_step=k`
  resumes exactly where an uninterrupted run would be at step k. ``random_flip`` (default
  data.random_flip) flips on the host; the train loop passes False and flips on the device
  instead (train.train_step), which is several times cheaper (bench/NOTES.md). Validation
  and data loading happen here, before the first batch is asked for.
  """
  validate_data_config(data_config)
  local_batch, per_device = _per_device_batch(global_batch_size)
  seed = _int_at_least(seed, "seed", 0)
  start_step = _int_at_least(start_step, "start_step", 0)
  flip = bool(data_config.random_flip if random_flip is None else random_flip)
  if data_config.dataset in _STREAMED_TFDS:
    batches = _streamed_train(data_config, global_batch_size, local_batch, seed, start_step,
                              flip)
  else:
    source = array_source(data_config, data_config.train_split)
    batches = _in_memory_train(source, global_batch_size, local_batch, seed, start_step, flip)
  shape = (jax.local_device_count(), per_device) + tuple(data_sources.image_shape(data_config))
  return (np.ascontiguousarray(batch).reshape(shape) for batch in batches)


def create_eval_iterator(data_config, *, global_batch_size: int, split: str | None = None,
                         num_examples: int = -1) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """One ordered pass (no shuffle, no flip) over the first `num_examples` of a split.

  Yields (images uint8 [local_devices, per_device, H, W, C], mask bool [local_devices,
  per_device]). Every process yields the same number of batches (global batch b holds
  examples [b*B, (b+1)*B), each process its contiguous slice); the last one is zero-padded
  and `mask` marks the real examples.
  """
  validate_data_config(data_config)
  split = data_config.eval_split if split is None else split
  _check_split(data_config.dataset, split, "split")
  if num_examples != -1:
    num_examples = _int_at_least(num_examples, "num_examples (or -1 for all)")
  local_batch, per_device = _per_device_batch(global_batch_size)
  image_shape = data_sources.image_shape(data_config)
  start = jax.process_index() * local_batch
  out_shape = (jax.local_device_count(), per_device)

  def pack(real: np.ndarray, valid: int) -> tuple[np.ndarray, np.ndarray]:
    """This process's real examples of a global batch with `valid` examples -> padded batch."""
    images = np.zeros((local_batch,) + image_shape, np.uint8)
    images[:len(real)] = real
    mask = start + np.arange(local_batch) < valid
    return images.reshape(out_shape + image_shape), mask.reshape(out_shape)

  if data_config.dataset in _STREAMED_TFDS:
    tf, tfds, encoded, decode = data_sources.tfds_stream(data_config, split)
    known = int(encoded.cardinality())
    if num_examples > known >= 0:
      raise ValueError(f"num_examples={num_examples} exceeds the {known} examples of {split!r}")
    ds = encoded.take(num_examples).map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    batches = tfds.as_numpy(ds.batch(global_batch_size).prefetch(tf.data.AUTOTUNE))
    return (pack(batch[start:start + local_batch], len(batch)) for batch in batches)

  source = array_source(data_config, split)
  if num_examples > source.num_examples:
    raise ValueError(f"num_examples={num_examples} exceeds the {source.num_examples} "
                     f"examples of {split!r}")
  total = source.num_examples if num_examples == -1 else num_examples

  def generate() -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for first in range(0, total, global_batch_size):
      lo, hi = first + start, min(first + start + local_batch, total)
      real = source.gather(np.arange(lo, max(lo, hi), dtype=np.int64))
      yield pack(real, min(global_batch_size, total - first))

  return generate()


def load_labeled_arrays(data_config, split: str,
                        num_examples: int = -1) -> tuple[np.ndarray, np.ndarray]:
  """The first `num_examples` (-1: all) of an in-memory split with their class labels.

  For the classifier feature network of the FID / IS evaluation. Images and labels are in
  the split's stored order, the order of `create_eval_iterator`. Sources:
  "fashion_mnist_files" reads the idx label files next to the image files
  ({train,t10k}-labels-idx1-ubyte.gz, magic 2049), falling back to tfds like the images;
  the small tfds datasets (cifar10, fashion_mnist) read tfds' "label" feature; "synthetic"
  has no real classes: its label of example i is i % 10, a deterministic stand-in that lets
  the pipeline run (a classifier cannot learn it from the random images).

  Returns:
    (uint8 images [N, H, W, C], int32 labels [N]).
  Raises:
    ValueError: a streamed dataset (the classifier needs an in-memory dataset with labels),
      a bad split or num_examples, or label files that are corrupt or do not match.
  """
  validate_data_config(data_config)
  dataset = data_config.dataset
  if dataset in _STREAMED_TFDS:
    raise ValueError(f"data.dataset={dataset!r} is streamed: the classifier feature network "
                     "needs an in-memory dataset with labels ("
                     f"{', '.join(_IN_MEMORY_TFDS + ('fashion_mnist_files', 'synthetic'))})")
  _check_split(dataset, split, "split")
  if num_examples != -1 and (isinstance(num_examples, bool) or num_examples < 1
                             or not isinstance(num_examples, (int, np.integer))):
    raise ValueError(f"num_examples={num_examples!r} must be a positive integer or -1 (all)")
  return data_sources.read_labeled_arrays(data_config, split, num_examples)


def to_model_input(images_uint8):
  """uint8 images -> float32 in [-1, 1] (x / 127.5 - 1, paper §3.3); NumPy or jnp (on device)."""
  xp = np if isinstance(images_uint8, np.ndarray) else jnp
  return xp.asarray(images_uint8).astype(xp.float32) / 127.5 - 1.0


def flip_on_device(images: jax.Array, flips: jax.Array) -> jax.Array:
  """Mirrors images[i] ([B, H, W, C]) left-right where flips[i]: the device-side random flip
  of training (paper App. B: random horizontal flips for CIFAR-10, LSUN and CelebA-HQ)."""
  return jnp.where(flips[:, None, None, None], images[:, :, ::-1], images)


def prefetch_to_device(iterator: Iterator[Any], size: int = 2) -> Iterator[Any]:
  """Puts each batch (a pytree of [local_devices, ...] arrays) on the local devices.

  Leaves are sharded along axis 0 over `jax.local_devices()` (the order `jax.pmap` uses),
  with the sharding pmap expects, so a pmapped function consumes them without another
  host-to-device copy. `size` batches are kept in flight (transfers are asynchronous).
  """
  size = _int_at_least(size, "size")
  devices = jax.local_devices()
  mesh = jax.sharding.Mesh(np.array(devices), ("devices",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("devices"))

  def put(leaf):
    if np.shape(leaf)[:1] != (len(devices),):
      raise ValueError(f"a batch leaf of shape {np.shape(leaf)} does not lead with the "
                       f"{len(devices)} local devices")
    return jax.device_put(leaf, sharding)

  def generate() -> Iterator[Any]:
    queue: collections.deque = collections.deque()
    for batch in iterator:
      queue.append(jax.tree_util.tree_map(put, batch))  # Asynchronous transfer.
      if len(queue) == size:
        yield queue.popleft()
    yield from queue

  return generate()
