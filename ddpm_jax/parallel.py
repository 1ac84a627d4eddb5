"""Data parallelism over devices with jax.pmap: the axis name, replicated state, batches.

Every pmapped function of ddpm_jax uses the axis name ``AXIS``. Global batches are split
evenly over processes and then over each process's local devices.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np

AXIS = "batch"


def per_device_batch(global_batch_size: int) -> tuple[int, int]:
  """(process-local batch, per-device batch) of a global batch split over every device."""
  processes, local = jax.process_count(), jax.local_device_count()
  if global_batch_size < 1 or global_batch_size % (processes * local):
    raise ValueError(
      f"global batch {global_batch_size} is not a positive multiple of the "
      f"{processes * local} devices ({processes} processes x {local} local)"
    )
  return global_batch_size // processes, global_batch_size // (processes * local)


def replicate(tree: Any, devices: Sequence[jax.Device] | None = None) -> Any:
  """A copy of ``tree`` on every device, laid out exactly as jax.pmap lays out its outputs.

  (flax.jax_utils.replicate's layout differs, so the first pmapped train step would be
  compiled twice: once for it and once for the step's own outputs.)
  """
  devices = list(devices or jax.local_devices())
  broadcast = jax.pmap(lambda x, _: x, in_axes=(None, 0), axis_name=AXIS, devices=devices)
  return broadcast(tree, np.zeros(len(devices), np.int8))


def unreplicate(tree: Any) -> Any:
  """The first device's copy of a pmap-replicated tree, as NumPy arrays.

  Reads device 0's shard directly (indexing x[0] would compile a gather per leaf shape;
  flax.jax_utils.unreplicate keeps the device axis of a pmap over one of several devices).
  """

  def first(x: Any) -> np.ndarray:
    if not isinstance(x, jax.Array):
      return np.asarray(x)[0]
    data = np.asarray(x.addressable_shards[0].data)
    return data[0] if data.ndim == x.ndim else data

  return jax.tree.map(first, tree)


def prefetch_to_device(iterator: Iterator[Any], size: int = 2) -> Iterator[Any]:
  """Puts each batch (a pytree of [local_devices, ...] arrays) on the local devices.

  Leaves are sharded along axis 0 over `jax.local_devices()` (the order `jax.pmap` uses),
  with the sharding pmap expects, so a pmapped function consumes them without another
  host-to-device copy. `size` batches are kept in flight (transfers are asynchronous).
  """
  if size < 1:
    raise ValueError(f"prefetch size={size} must be >= 1")
  devices = jax.local_devices()
  mesh = jax.sharding.Mesh(np.array(devices), ("devices",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("devices"))

  def put(leaf):
    if np.shape(leaf)[:1] != (len(devices),):
      raise ValueError(
        f"a batch leaf of shape {np.shape(leaf)} does not lead with the "
        f"{len(devices)} local devices"
      )
    return jax.device_put(leaf, sharding)

  def generate() -> Iterator[Any]:
    queue: collections.deque = collections.deque()
    for batch in iterator:
      queue.append(jax.tree_util.tree_map(put, batch))  # Asynchronous transfer.
      if len(queue) == size:
        yield queue.popleft()
    yield from queue

  return generate()
