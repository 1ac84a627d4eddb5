"""Samples from a config's sampler on every device: the training grids, --mode=sample and
the samples that FID is computed on all come from here.

Batch i of a pass seeded with s draws its noise from fold_in(key(s), i), and device d from
fold_in(that key, d) (rng.py), so the samples depend on the seed and the per-device batch.
Image g of a pass is image g % B of global batch g // B (B = sampling.batch_size), made by
the process and device that `batch_share` names; each process keeps its own images.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from ddpm_jax import diffusion, factories, parallel, samplers
from ddpm_jax import rng as rng_lib
from ddpm_jax.models import unet as unet_lib


def make_pmapped_sampler(
  config: ml_collections.ConfigDict,
  model: unet_lib.UNet,
  schedule: diffusion.DiffusionSchedule,
  per_device: int,
) -> Callable[[Any, jax.Array], jnp.ndarray]:
  """pmapped (params, rng) -> uint8 samples [devices, per_device, H, W, C] of
  config.sampling's method; device d draws from fold_in(rng, d)."""
  size, channels = int(config.data.image_size), int(config.data.num_channels)
  options = samplers.from_config(config.sampling)
  spec = factories.create_model_spec(config.diffusion)

  def sample_fn(params: Any, rng: jax.Array) -> jnp.ndarray:
    rng = jax.random.fold_in(rng, jax.lax.axis_index(parallel.AXIS))
    x = samplers.generate(
      schedule,
      factories.model_fn(model, params),
      rng,
      (per_device, size, size, channels),
      options,
      spec=spec,
    )
    return samplers.to_uint8(x)

  return jax.pmap(sample_fn, axis_name=parallel.AXIS, in_axes=(0, None))


def batch_share(
  batch_index: int, global_batch: int, process: int, process_count: int
) -> np.ndarray:
  """Global indices of the images that ``process`` makes in global batch ``batch_index``:
  the batch covers [i B, (i+1) B), every process a contiguous block of B / P of it in
  process order, and within that block its local devices in order (jax.pmap's layout)."""
  local = global_batch // process_count
  return batch_index * global_batch + process * local + np.arange(local, dtype=np.int64)


def process_indices(
  num_samples: int, global_batch: int, process: int, process_count: int
) -> np.ndarray:
  """All global indices < num_samples that ``process`` makes, ascending (its shard)."""
  batches = -(-num_samples // global_batch)
  indices = np.concatenate(
    [batch_share(i, global_batch, process, process_count) for i in range(batches)]
    or [np.zeros(0, np.int64)]
  )
  return indices[indices < num_samples]


def local_batches(
  config: ml_collections.ConfigDict, params: Any, num_samples: int, *, seed: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """This process's share of num_samples images made on every device of every process.

  The images come in global batches of sampling.batch_size; for each one this yields the
  images of this process's devices only, with their global indices (`batch_share`):
  (int64 indices [n], uint8 images [n, H, W, C]), indices >= num_samples dropped. No image
  leaves its process, so a host holds one batch at a time; image g is the same whatever
  the process count, given the per-device batch. Every process must consume the whole
  iterator (each batch is one pmapped program over all devices).
  """
  batch = int(config.sampling.batch_size)
  model, schedule = factories.create_model(config), factories.create_schedule(config.diffusion)
  sampler = make_pmapped_sampler(config, model, schedule, batch // jax.device_count())
  replicated = parallel.replicate(params)
  start = time.perf_counter()
  for i in range(-(-num_samples // batch)):
    images = np.asarray(sampler(replicated, rng_lib.batch_key(seed, i)))  # Local devices.
    indices = batch_share(i, batch, jax.process_index(), jax.process_count())
    keep = indices < num_samples
    yield indices[keep], images.reshape((-1,) + images.shape[2:])[keep]
    done = min((i + 1) * batch, num_samples)
    rate = done / (time.perf_counter() - start)
    logging.info(
      "sampled %d/%d images, %.2f images/s, ETA %.0f s",
      done,
      num_samples,
      rate,
      (num_samples - done) / rate,
    )


def sampler_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What produced a sample set, stored with the samples and in fid.json: the sampler's
  method and options (samplers.settings) and the seed."""
  return dict(
    samplers.settings(samplers.from_config(config.sampling)), seed=int(config.sampling.seed)
  )
