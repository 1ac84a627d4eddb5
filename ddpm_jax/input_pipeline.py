"""Training and evaluation batches: a dataset (datasets.py, data_sources.py) -> uint8 batches.

Batches are uint8 [local_devices, per_device_batch, H, W, C] (what `jax.pmap` consumes);
`to_model_input` maps them to [-1, 1] on the device (Ho et al. 2020, §3.3: integers 0..255
scaled linearly, no dequantization), and the train step draws the random horizontal flips
there (`flip_on_device`). Training batch `step` covers positions [step*B, (step+1)*B) of an
endless stream of seeded epoch permutations, so it is a pure function of (seed, step) and a
resumed run sees exactly the batches of an uninterrupted one. Each process takes its
contiguous slice of the global batch. Small datasets are held in host memory; large ones
(`DatasetSpec.streamed`) stream through tf.data with a per-epoch seeded shuffle of each
process's part.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import data_sources, datasets, hosts, parallel
from ddpm_jax import rng as rng_lib
from ddpm_jax.errors import ConfigError


def _in_memory_train(
  source: data_sources.ArraySource, global_batch: int, local_batch: int, seed: int, start_step: int
) -> Iterator[np.ndarray]:
  """Global batch `step` = positions [step*B, (step+1)*B) of the epoch permutations."""
  n, start = source.num_examples, jax.process_index() * local_batch
  perms: dict[int, np.ndarray] = {}
  for step in itertools.count(start_step):
    positions = np.arange(step * global_batch, (step + 1) * global_batch, dtype=np.int64)
    positions = positions[start : start + local_batch]
    epochs, offsets = np.divmod(positions, n)
    indices = np.empty_like(positions)
    for epoch in np.unique(epochs):
      if epoch not in perms:
        perms = {e: p for e, p in perms.items() if e >= epoch - 1}  # Keep memory bounded.
        perms[epoch] = rng_lib.host_rng(seed, rng_lib.HostStream.PERMUTATION, epoch).permutation(n)
      indices[epochs == epoch] = perms[epoch][offsets[epochs == epoch]]
    yield source.gather(indices)


def _streamed_train(
  data_config, local_batch: int, seed: int, start_step: int
) -> Iterator[np.ndarray]:
  """Each process streams its shard: epoch e is the shard shuffled with a seed from (seed, e).

  This process's batch `step` covers positions [step*B_local, (step+1)*B_local) of the
  concatenated epochs, so resuming skips (undecoded) examples to that offset.
  """
  tf, tfds, encoded, decode = data_sources.tfds_stream(
    data_config, data_config.train_split, per_process=True
  )
  n = int(encoded.cardinality())
  if n < 0:  # Unknown: count the (still encoded) examples once.
    n = int(encoded.reduce(tf.constant(0, tf.int64), lambda count, _: count + 1))
  if n == 0:
    raise ConfigError(f"split {data_config.train_split!r} of {data_config.dataset} is empty")
  buffer = int(data_config.shuffle_buffer)

  def epoch_batches(epoch: int, skip: int):
    shuffle_seed = int(
      rng_lib.host_rng(seed, rng_lib.HostStream.SHUFFLE, epoch).integers(2**31 - 1)
    )
    ds = encoded.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=False).skip(skip)
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE).batch(local_batch)
    return tfds.as_numpy(ds.prefetch(tf.data.AUTOTUNE))

  def generate() -> Iterator[np.ndarray]:
    epoch, skip = divmod(start_step * local_batch, n)
    pending = None
    while True:
      for batch in epoch_batches(epoch, skip):
        pending = batch if pending is None else np.concatenate([pending, batch])
        while len(pending) >= local_batch:
          images, pending = pending[:local_batch], pending[local_batch:]
          yield images
      epoch, skip = epoch + 1, 0

  return generate()


def create_train_iterator(
  data_config, *, global_batch_size: int, seed: int, start_step: int = 0
) -> Iterator[np.ndarray]:
  """Endless training batches, uint8 [local_devices, per_device_batch, H, W, C].

  Batch number `step` depends only on (seed, step), so `start_step=k` resumes exactly where
  an uninterrupted run would be at step k. No flips: the train step draws them on the
  device. Data loading happens here, before the first batch is asked for.
  """
  local_batch, per_device = parallel.per_device_batch(global_batch_size)
  if datasets.get(data_config.dataset).streamed:
    batches = _streamed_train(data_config, local_batch, seed, start_step)
  else:
    source = data_sources.array_source(data_config, data_config.train_split)
    batches = _in_memory_train(source, global_batch_size, local_batch, seed, start_step)
  shape = (jax.local_device_count(), per_device) + data_sources.image_shape(data_config)
  return (np.ascontiguousarray(batch).reshape(shape) for batch in batches)


def create_eval_iterator(
  data_config, *, global_batch_size: int, split: str | None = None, num_examples: int = -1
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """One ordered pass (no shuffle, no flip) over the first `num_examples` (-1: all) of a
  split (default: data.eval_split).

  Yields (images uint8 [local_devices, per_device, H, W, C], mask bool [local_devices,
  per_device]). Every process yields the same number of batches (global batch b holds
  examples [b*B, (b+1)*B), each process its contiguous slice); the last one is zero-padded
  and `mask` marks the real examples.
  """
  spec = datasets.get(data_config.dataset)
  split = data_config.eval_split if split is None else split
  spec.check_split(split, "split")
  local_batch, per_device = parallel.per_device_batch(global_batch_size)
  image_shape = data_sources.image_shape(data_config)
  start = jax.process_index() * local_batch
  out_shape = (jax.local_device_count(), per_device)

  def pack(real: np.ndarray, valid: int) -> tuple[np.ndarray, np.ndarray]:
    """This process's real examples of a global batch with `valid` examples -> padded batch."""
    images = np.zeros((local_batch,) + image_shape, np.uint8)
    images[: len(real)] = real
    mask = start + np.arange(local_batch) < valid
    return images.reshape(out_shape + image_shape), mask.reshape(out_shape)

  if spec.streamed:
    tf, tfds, encoded, decode = data_sources.tfds_stream(data_config, split)
    known = int(encoded.cardinality())
    if num_examples > known >= 0:
      raise ConfigError(f"num_examples={num_examples} exceeds the {known} examples of {split!r}")
    ds = encoded.take(num_examples).map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    batches = tfds.as_numpy(ds.batch(global_batch_size).prefetch(tf.data.AUTOTUNE))
    return (pack(batch[start : start + local_batch], len(batch)) for batch in batches)

  source = data_sources.array_source(data_config, split)
  if num_examples > source.num_examples:
    raise ConfigError(
      f"num_examples={num_examples} exceeds the {source.num_examples} examples of {split!r}"
    )
  total = source.num_examples if num_examples == -1 else num_examples

  def generate() -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for first in range(0, total, global_batch_size):
      lo, hi = first + start, min(first + start + local_batch, total)
      real = source.gather(np.arange(lo, max(lo, hi), dtype=np.int64))
      yield pack(real, min(global_batch_size, total - first))

  return generate()


def iterate_share(
  data_config, split: str, *, batch_size: int, num_examples: int = -1
) -> Iterator[np.ndarray]:
  """This process's share of the first `num_examples` (-1: all) of a split, in chunks of at
  most `batch_size` uint8 images [n, H, W, C] in stored order, unpadded.

  The shares of the processes are contiguous, disjoint and cover the examples; each
  process reads only its own (a streamed split through tfds' per-process even split of
  `split[:num_examples]`, an in-memory one by index). For statistics merged across
  processes afterwards, such as the FID reference; no process sees the others' images.
  """
  spec = datasets.get(data_config.dataset)
  spec.check_split(split, "split")
  if num_examples != -1 and "[" in split:
    raise ConfigError(
      f"the first {num_examples} examples of a sliced split ({split!r}): "
      "give either the slice or the count"
    )
  if spec.streamed:
    limited = split if num_examples == -1 else f"{split}[:{num_examples}]"
    tf, tfds, encoded, decode = data_sources.tfds_stream(data_config, limited, per_process=True)
    ds = encoded.map(decode, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)
    return iter(tfds.as_numpy(ds.prefetch(tf.data.AUTOTUNE)))
  source = data_sources.array_source(data_config, split)
  if num_examples > source.num_examples:
    raise ConfigError(
      f"num_examples={num_examples} exceeds the {source.num_examples} examples of {split!r}"
    )
  total = source.num_examples if num_examples == -1 else num_examples
  mine = hosts.my_slice(total)

  def generate() -> Iterator[np.ndarray]:
    for first in range(mine.start, mine.stop, batch_size):
      stop = min(first + batch_size, mine.stop)
      yield source.gather(np.arange(first, stop, dtype=np.int64))

  return generate()


def load_labeled_arrays(
  data_config, split: str, num_examples: int = -1
) -> tuple[np.ndarray, np.ndarray]:
  """The first `num_examples` (-1: all) of an in-memory split with their class labels.

  For the classifier feature network of the FID / IS evaluation; images and labels are in
  the split's stored order, the order of `create_eval_iterator`. Labels come from the idx
  label files ({train,t10k}-labels-idx1-ubyte.gz), tfds' "label" feature, or for
  "synthetic" the stand-in i % 10.

  Returns:
    (uint8 images [N, H, W, C], int32 labels [N]).
  """
  spec = datasets.get(data_config.dataset)
  spec.check_split(split, "split")
  if spec.streamed or not spec.labeled:
    raise ConfigError(
      f"data.dataset={spec.name!r} is streamed or unlabeled: the classifier "
      "feature network needs an in-memory dataset with labels ("
      f"{', '.join(s.name for s in datasets.SPECS if s.labeled)})"
    )
  if (
    isinstance(num_examples, bool)
    or not isinstance(num_examples, (int, np.integer))
    or (num_examples < 1 and num_examples != -1)
  ):
    raise ConfigError(f"num_examples={num_examples!r} must be a positive integer or -1 (all)")
  return data_sources.labeled_arrays(data_config, split, int(num_examples))


def to_model_input(images_uint8):
  """uint8 images -> float32 in [-1, 1] (x / 127.5 - 1, paper §3.3); NumPy or jnp (on device)."""
  xp = np if isinstance(images_uint8, np.ndarray) else jnp
  return xp.asarray(images_uint8).astype(xp.float32) / 127.5 - 1.0


def flip_on_device(images: jax.Array, flips: jax.Array) -> jax.Array:
  """Mirrors images[i] ([B, H, W, C]) left-right where flips[i]: the device-side random flip
  of training (paper App. B: random horizontal flips for CIFAR-10, LSUN and CelebA-HQ)."""
  return jnp.where(flips[:, None, None, None], images[:, :, ::-1], images)
