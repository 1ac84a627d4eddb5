"""Samples from a config's sampler on every device: the training grids, --mode=sample and
the samples that FID is computed on all come from here.

Batch i of a pass seeded with s draws its noise from fold_in(key(s), i), and device d from
fold_in(that key, d) (rng.py), so the samples depend on the seed and the per-device batch.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from ddpm_jax import diffusion
from ddpm_jax import factories
from ddpm_jax import hosts
from ddpm_jax import parallel
from ddpm_jax import rng as rng_lib
from ddpm_jax import samplers
from ddpm_jax.models import unet as unet_lib


def make_pmapped_sampler(config: ml_collections.ConfigDict, model: unet_lib.UNet,
                         schedule: diffusion.DiffusionSchedule, per_device: int
                         ) -> Callable[[Any, jax.Array], jnp.ndarray]:
  """pmapped (params, rng) -> uint8 samples [devices, per_device, H, W, C] of
  config.sampling's method; device d draws from fold_in(rng, d)."""
  size, channels = int(config.data.image_size), int(config.data.num_channels)
  options = samplers.from_config(config.sampling)
  spec = factories.create_model_spec(config.diffusion)

  def sample_fn(params: Any, rng: jax.Array) -> jnp.ndarray:
    rng = jax.random.fold_in(rng, jax.lax.axis_index(parallel.AXIS))
    x = samplers.generate(schedule, factories.model_fn(model, params), rng,
                          (per_device, size, size, channels), options, spec=spec)
    return samplers.to_uint8(x)

  return jax.pmap(sample_fn, axis_name=parallel.AXIS, in_axes=(0, None))


def generate_samples(config: ml_collections.ConfigDict, params: Any, num_samples: int, *,
                     seed: int) -> np.ndarray:
  """num_samples uint8 images [N, H, W, C] made on all devices of all processes, in global
  batches of sampling.batch_size, returned on every process."""
  batch = int(config.sampling.batch_size)
  model, schedule = factories.create_model(config), factories.create_schedule(config.diffusion)
  sampler = make_pmapped_sampler(config, model, schedule, batch // jax.device_count())
  replicated = parallel.replicate(params)
  num_batches = -(-num_samples // batch)
  out, start = [], time.perf_counter()
  for i in range(num_batches):
    images = np.asarray(sampler(replicated, rng_lib.batch_key(seed, i)))
    # Every process's devices in global device order: the batch of one process with all.
    out.append(hosts.gather(images.reshape((-1,) + images.shape[2:])))
    done = min((i + 1) * batch, num_samples)
    rate = done / (time.perf_counter() - start)
    logging.info("sampled %d/%d images, %.2f images/s, ETA %.0f s", done, num_samples, rate,
                 (num_samples - done) / rate)
  return np.concatenate(out)[:num_samples]


def sampler_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What produced a sample set, stored with the samples and in fid.json: the sampler's
  method and options (samplers.settings) and the seed."""
  return dict(samplers.settings(samplers.from_config(config.sampling)),
              seed=int(config.sampling.seed))
