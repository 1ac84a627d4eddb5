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
from ddpm_jax import sampling
from ddpm_jax.models import unet as unet_lib


def make_p_sample(config: ml_collections.ConfigDict, model: unet_lib.UNet,
                  schedule: diffusion.DiffusionSchedule, per_device: int
                  ) -> Callable[[Any, jax.Array], jnp.ndarray]:
  """pmapped (params, rng) -> uint8 samples [devices, per_device, H, W, C] (config.sampling)."""
  size, channels = int(config.data.image_size), int(config.data.num_channels)
  diff = config.diffusion

  options = sampler_options(config)

  def sample_fn(params: Any, rng: jax.Array) -> jnp.ndarray:
    rng = jax.random.fold_in(rng, jax.lax.axis_index(parallel.AXIS))
    x = sampling.generate(schedule, factories.model_fn(model, params), rng,
                          (per_device, size, size, channels),
                          model_mean_type=diff.model_mean_type,
                          model_var_type=diff.model_var_type, **options)
    return sampling.to_uint8(x)

  return jax.pmap(sample_fn, axis_name=parallel.AXIS, in_axes=(0, None))


def generate_samples(config: ml_collections.ConfigDict, params: Any, num_samples: int, *,
                     seed: int) -> np.ndarray:
  """num_samples uint8 images [N, H, W, C] made on all devices of all processes, in global
  batches of sampling.batch_size, returned on every process."""
  batch = int(config.sampling.batch_size)
  model, schedule = factories.create_model(config), factories.create_schedule(config.diffusion)
  p_sample = make_p_sample(config, model, schedule, batch // jax.device_count())
  p_params = parallel.replicate(params)
  num_batches = -(-num_samples // batch)
  out, start = [], time.perf_counter()
  for i in range(num_batches):
    images = np.asarray(p_sample(p_params, rng_lib.batch_key(seed, i)))
    # Every process's devices in global device order: the batch of one process with all.
    out.append(hosts.gather(images.reshape((-1,) + images.shape[2:])))
    done = min((i + 1) * batch, num_samples)
    rate = done / (time.perf_counter() - start)
    logging.info("sampled %d/%d images, %.2f images/s, ETA %.0f s", done, num_samples, rate,
                 (num_samples - done) / rate)
  return np.concatenate(out)[:num_samples]


def sampler_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The keyword arguments of `sampling.generate` that config.sampling sets for its method
  (only those the method uses): the one map from the config to a sampler."""
  smp = config.sampling
  ancestral = dict(clip_denoised=bool(smp.clip_denoised))
  ddim = dict(num_steps=int(smp.num_steps), eta=float(smp.eta), ddim_skip=str(smp.ddim_skip),
              clip_denoised=bool(smp.ddim_clip_denoised))
  if smp.method == "ancestral":
    return dict(method="ancestral", **ancestral)
  if smp.method == "ddim":
    return dict(method="ddim", **ddim)
  if smp.method == "pc":  # The predictor's own options, then the corrector's.
    return dict(method="pc", predictor=str(smp.predictor),
                **(ancestral if smp.predictor == "ancestral" else ddim),
                corrector_steps=int(smp.corrector_steps), snr=float(smp.snr))
  return dict(method="annealed_langevin", num_steps=int(smp.num_steps),
              ddim_skip=str(smp.ddim_skip), langevin_steps=int(smp.langevin_steps),
              langevin_step_size=float(smp.langevin_step_size))


def sampler_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What produced a sample set, stored with the samples and in fid.json: the sampler's
  options and the seed."""
  return dict(sampler_options(config), seed=int(config.sampling.seed))
